"""Embedded default data: seeded phantom images, no files needed.

Image ``i`` is generated from ``numpy.random.default_rng([seed, i])`` alone, so any subset is
reproducible and its anatomy does not depend on the output size (the pixel noise is drawn last).

- ``variant="chest"``: chest-X-ray-like grayscale images (replicated to 3 channels by default),
  classes ("background", "lung", "heart", "clavicle") painted with the JSRT overlap rule
  (:func:`medcert_core.data.chest.chest_labels`). Each image has its own pose, lung shapes
  (tapered superellipses deformed by low-frequency angular noise), a heart over the medial lower
  lungs, clavicles as thin bright bands across the lung apices, ribs as bright arcs over the lungs,
  a bright mediastinum/spine column, a body outline in dark air, smooth intensity gradients,
  lung texture, random contrast and gamma and pixel noise. Lungs are darker than the soft tissue
  around them, but air outside the body is darker still and ribs brighten the lungs, so no single
  intensity threshold segments them.
- ``variant="lesion"``: RGB skin-lesion/polyp-like images, classes ("background", "lesion"): a
  textured skin-coloured background, a darker irregular blob of random colour with a soft border
  and internal variegation, dark hairs, and vignetting.
"""

from __future__ import annotations

import numpy as np

from medcert_core.data.base import Size, Source
from medcert_core.data.chest import CHEST_CLASSES, chest_labels

PHANTOM_VARIANTS = ("chest", "lesion")
LESION_CLASSES = ("background", "lesion")


def _grid(size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: y (H, 1) and x (1, W)."""
    h, w = size
    y = ((np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1)[:, None]
    x = ((np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1)[None, :]
    return y, x


def _smooth_field(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, terms: int,
                  freq: tuple[float, float]) -> np.ndarray:
    """Random smooth field (H, W), a sum of ``terms`` plane cosines, scaled to about [-1, 1]."""
    f = (rng.uniform(*freq, size=terms) * np.pi).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, size=terms).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=terms).astype(np.float32)
    field = np.zeros((y.shape[0], x.shape[1]), dtype=np.float32)
    for k in range(terms):  # cos(a x + b y + p), separable into 1-D factors
        ax, by = f[k] * np.cos(theta[k]) * x + phase[k], f[k] * np.sin(theta[k]) * y
        field += np.cos(ax) * np.cos(by) - np.sin(ax) * np.sin(by)
    return field / np.float32(np.sqrt(terms))


def _blob(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, center: tuple[float, float],
          radii: tuple[float, float], angle: float, power: float, wobble: float,
          taper: float = 0.0) -> np.ndarray:
    """Normalised radius field (H, W) of a deformed superellipse: < 1 inside, 1 on the border.

    ``taper`` > 0 widens the shape towards its bottom; ``wobble`` is the amplitude of a random
    low-frequency (2 to 5 lobes) deformation of the border.
    """
    cos, sin = np.cos(angle), np.sin(angle)
    dy, dx = y - center[0], x - center[1]
    v = (cos * dy - sin * dx) / radii[0]
    u = (sin * dy + cos * dx) / radii[1] / (1 + taper * np.clip(v, -1, 1))
    r = (np.abs(u) ** power + np.abs(v) ** power) ** (1 / power)
    direction = (u + 1j * v) / np.maximum(np.hypot(u, v), 1e-6)  # exp(i phi), phi the polar angle
    lobes = np.arange(2, 6)
    amps = (wobble * rng.uniform(0.3, 1, size=4) / lobes ** 0.5).astype(np.float32)
    phases = np.exp(1j * rng.uniform(0, 2 * np.pi, size=4)).astype(np.complex64)
    border = np.ones_like(r)
    power_k = direction * direction
    for k in range(4):  # border = 1 + sum_k a_k cos(k phi + p_k), lobes k = 2..5
        border += amps[k] * (power_k * phases[k]).real
        power_k = power_k * direction
    return (r / border).astype(np.float32)


def _soft(r: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-indicator (H, W) in [0, 1] of a radius field, edge width ``edge``."""
    return (0.5 + 0.5 * np.tanh((1 - r) / edge)).astype(np.float32)


def _curve_band(y: np.ndarray, x: np.ndarray, ends: tuple[float, float],
                heights: tuple[float, float], bow: float, half_width: float) -> np.ndarray:
    """Soft profile (H, W) in [0, 1] of a thin band around a bowed curve y(x) between x ``ends``.

    The centre line runs linearly from ``heights[0]`` at ``ends[0]`` to ``heights[1]`` at
    ``ends[1]`` plus ``bow * sin(pi t)``; the profile is Gaussian across it with rounded ends.
    """
    t = (x - ends[0]) / (ends[1] - ends[0])
    centre = heights[0] + (heights[1] - heights[0]) * t + bow * np.sin(np.pi * np.clip(t, 0, 1))
    across = np.exp(-(((y - centre) / half_width) ** 2))
    along = np.clip(np.minimum(t, 1 - t) * abs(ends[1] - ends[0]) / half_width + 1, 0, 1)
    return (across * along).astype(np.float32)


def _ribs(rng: np.random.Generator, y: np.ndarray, lateral: np.ndarray, top: float,
          bottom: float, reach: float, scale: float) -> np.ndarray:
    """Soft profile (H, W) of one side's posterior ribs: arcs from ``top`` to ``bottom``.

    ``lateral`` (H, W) is the distance from the midline towards this side; ribs fade out at
    the spine and beyond ``reach``.
    """
    spacing, first = rng.uniform(0.12, 0.16) * scale, top + rng.uniform(-0.02, 0.06)
    slope, curvature = rng.uniform(0.2, 0.4), rng.uniform(0.5, 0.9)
    width = rng.uniform(0.02, 0.032) * scale
    count = int((bottom + 0.05 - first) / spacing) + 1
    rib_index = (y - first + slope * lateral - curvature * lateral ** 2) / spacing
    offset = (rib_index - np.clip(np.round(rib_index), 0, count - 1)) * spacing
    fade = np.clip((lateral - 0.03) / 0.05, 0, 1) * np.clip((reach - lateral) / 0.1, 0, 1)
    return np.exp(-((offset / width) ** 2)) * fade


def _chest_side(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, side: int,
                pose: tuple[float, float, float, float]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One side (-1 image left, +1 image right) of the thorax: lung radius field, clavicle
    band profile and rib profile, all (H, W); ``pose`` = (tilt, centre x, centre y, scale)."""
    tilt, cx0, cy0, scale = pose
    center = (cy0 + rng.uniform(-0.08, 0.04), cx0 + side * rng.uniform(0.3, 0.38) * scale)
    radii = (rng.uniform(0.46, 0.58) * scale, rng.uniform(0.19, 0.26) * scale)
    lung = _blob(rng, y, x, center, radii, tilt + side * rng.uniform(-0.05, 0.12),
                 rng.uniform(2.2, 3.4), rng.uniform(0.04, 0.09), rng.uniform(0.15, 0.35))
    apex = center[0] - radii[0]
    ends = (cx0 + side * rng.uniform(0.05, 0.12), cx0 + side * rng.uniform(0.58, 0.75))
    heights = (apex + rng.uniform(0.15, 0.25), apex + rng.uniform(0.0, 0.1))
    pixel = float(abs(y[1, 0] - y[0, 0]))  # at least ~3.5 px thick, so small inputs keep a learnable band
    clavicle = _curve_band(y, x, ends, heights, rng.uniform(-0.05, 0.04),
                           max(rng.uniform(0.04, 0.055) * scale, 2.1 * pixel))
    lateral = side * (x - cx0 - tilt * y)
    reach = abs(center[1] - cx0) + 1.4 * radii[1]
    ribs = _ribs(rng, y, lateral, apex, center[0] + radii[0], reach, scale)
    return lung, clavicle, ribs


def chest_phantom(seed: int, index: int, size: Size = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Chest-X-ray-like image float32 (H, W) in [0, 1] and labels int64 (H, W) in {0, 1, 2, 3}."""
    rng = np.random.default_rng([seed, index])
    y, x = _grid(size)
    tilt, cx0, cy0 = rng.uniform(-0.07, 0.07), rng.uniform(-0.07, 0.07), rng.uniform(-0.06, 0.04)
    scale = rng.uniform(0.88, 1.06)
    body = _soft(_blob(rng, y, x, (cy0 + 0.35, cx0), (1.35, rng.uniform(0.74, 0.88)), tilt,
                       rng.uniform(2.5, 4), 0.03), 0.03)
    (lung_r, clav_r, ribs_r), (lung_l, clav_l, ribs_l) = (
        _chest_side(rng, y, x, side, (tilt, cx0, cy0, scale)) for side in (-1, 1))
    heart_center = (cy0 + rng.uniform(0.2, 0.32) * scale, cx0 + rng.uniform(0.06, 0.15) * scale)
    heart_radii = (rng.uniform(0.19, 0.26) * scale, rng.uniform(0.26, 0.34) * scale)
    heart = _blob(rng, y, x, heart_center, heart_radii, tilt - rng.uniform(0.15, 0.45), 2.0, 0.04)
    lung_soft = np.maximum(_soft(lung_r, 0.04), _soft(lung_l, 0.04))
    heart_soft = _soft(heart, 0.05)
    ribs, clavicles = np.maximum(ribs_r, ribs_l), np.maximum(clav_r, clav_l)
    mediastinum = 0.5 + 0.5 * np.tanh((rng.uniform(0.07, 0.12) - np.abs(x - cx0 - tilt * y)) / 0.03)
    vertebrae = 1 + 0.15 * np.cos(2 * np.pi * (y - cy0) / rng.uniform(0.14, 0.2))

    air, tissue = rng.uniform(0.0, 0.1), rng.uniform(0.5, 0.62)
    image = air + (tissue - air) * body
    texture = 0.04 * _smooth_field(rng, y, x, 6, (4, 9))
    image = image - lung_soft * (1 - 0.85 * heart_soft) * (rng.uniform(0.28, 0.4) + texture)
    image = image + body * (rng.uniform(0.12, 0.25) * mediastinum * vertebrae * (1 - lung_soft)
                            + rng.uniform(0.0, 0.06) * heart_soft
                            + rng.uniform(0.1, 0.2) * ribs + rng.uniform(0.3, 0.45) * clavicles)
    image = image + rng.uniform(0.03, 0.1) * _smooth_field(rng, y, x, 3, (0.3, 1.0))
    image = np.clip(image, 0, 1) ** rng.uniform(0.7, 1.4)
    low, high = rng.uniform(0.0, 0.08), rng.uniform(0.85, 1.0)
    noise = rng.normal(0, rng.uniform(0.015, 0.045), size=size).astype(np.float32)
    image = low + (high - low) * image + noise
    labels = chest_labels((lung_r < 1) | (lung_l < 1), heart < 1, clavicles > 0.5)
    return np.clip(image, 0, 1).astype(np.float32), labels


def lesion_phantom(seed: int, index: int, size: Size = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Skin-lesion/polyp-like RGB image float32 (H, W, 3) in [0, 1], labels int64 (H, W) {0, 1}."""
    rng = np.random.default_rng([seed, index])
    y, x = _grid(size)
    skin = np.array([rng.uniform(0.75, 0.92), rng.uniform(0.5, 0.7), rng.uniform(0.4, 0.6)],
                    dtype=np.float32)
    shade = (1 + 0.06 * _smooth_field(rng, y, x, 4, (0.5, 2))
             + 0.03 * _smooth_field(rng, y, x, 6, (6, 12)))
    image = skin * shade[..., None]

    center = (rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25))
    radii = (rng.uniform(0.25, 0.6), rng.uniform(0.25, 0.6))
    lesion = _blob(rng, y, x, center, radii, rng.uniform(0, np.pi), rng.uniform(1.7, 2.6),
                   rng.uniform(0.15, 0.35))
    colour = skin * rng.uniform(0.35, 0.8) * rng.uniform(0.75, 1.1, size=3).astype(np.float32)
    variegation = 1 + rng.uniform(0.1, 0.3) * _smooth_field(rng, y, x, 5, (2, 8))
    weight = _soft(lesion, rng.uniform(0.03, 0.1))[..., None]
    image = image * (1 - weight) + (colour * variegation[..., None]) * weight

    for _ in range(rng.integers(0, 6)):  # hairs: thin dark curves at random angles
        angle = rng.uniform(0, np.pi)
        along = np.cos(angle) * x + np.sin(angle) * y
        across = -np.sin(angle) * x + np.cos(angle) * y
        curve = rng.uniform(-0.8, 0.8) + rng.uniform(-0.25, 0.25) * along ** 2
        hair = np.exp(-(((across - curve) / rng.uniform(0.006, 0.012)) ** 2))[..., None]
        image = image * (1 - 0.8 * hair) + rng.uniform(0.05, 0.2) * 0.8 * hair

    radius2 = x ** 2 + y ** 2
    image = image * (1 - rng.uniform(0.0, 0.35) * radius2)[..., None]
    image = image + rng.normal(0, rng.uniform(0.01, 0.035), size=(*size, 3)).astype(np.float32)
    labels = (lesion < 1).astype(np.int64)
    return np.clip(image, 0, 1).astype(np.float32), labels


def phantom_source(root: object, image_size: Size, *, seed: int = 0, variant: str = "chest",
                   num_images: int = 60) -> Source:
    """Generated dataset of ``num_images`` images from ``seed`` (``root`` is ignored)."""
    if variant not in PHANTOM_VARIANTS:
        raise ValueError(
            f"unknown phantom variant {variant!r}; valid: {', '.join(PHANTOM_VARIANTS)}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    generate = chest_phantom if variant == "chest" else lesion_phantom
    width = max(4, len(str(num_images - 1)))
    ids = [f"{variant}_{i:0{width}d}" for i in range(num_images)]

    def load(case_id: str) -> tuple[np.ndarray, np.ndarray]:
        return generate(seed, int(case_id.rsplit("_", 1)[1]), image_size)

    classes = CHEST_CLASSES if variant == "chest" else LESION_CLASSES
    return Source(ids, load, classes, image_size)
