"""Colours for label maps, shared by the CLI's overlays and the study's figures.

Class k is ``PALETTE[k % len(PALETTE)]`` (background black); abstained pixels are white
(:data:`ABSTAIN_COLOUR`). ``png_data_uri`` embeds an RGB image in HTML with nothing to fetch.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from medcert_core.certify import ABSTAIN

# background black, abstain white, then one colour per foreground class
PALETTE = np.array([[0, 0, 0], [230, 75, 53], [77, 187, 213], [0, 160, 135], [243, 155, 127], [145, 209, 194],
                    [132, 145, 180], [220, 220, 0]], dtype=np.uint8)


ABSTAIN_COLOUR = np.array([255, 255, 255], dtype=np.uint8)


def colour_labels(labels: np.ndarray) -> np.ndarray:
    """(H, W) class ids or ABSTAIN -> (H, W, 3) uint8: background black, abstain white."""
    rgb = PALETTE[np.clip(labels, 0, len(PALETTE) - 1)]
    rgb[labels == ABSTAIN] = ABSTAIN_COLOUR
    return rgb


def grey_image(image: np.ndarray) -> np.ndarray:
    """(C, H, W) float image (any range) -> (H, W, 3) uint8, clipped to [0, 1]."""
    rgb = image.mean(0, keepdims=True).repeat(3, 0) if image.shape[0] != 3 else image
    return (np.clip(rgb.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)


def png_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
