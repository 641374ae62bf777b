"""The MMSE gate: a denoiser earns its place when its single-step estimate (the posterior mean,
the minimum-MSE estimate) scores a PSNR at least that of its own sampled multi-step chain and of
the UNet trained to denoise, at every sigma (DESIGN.md). ``scripts/denoiser_gate.py`` measures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from medcert_core.metrics import paired_bootstrap_interval, psnr


def mmse_gate_failures(psnr_db: Mapping[tuple[float, str], float], sigmas: Sequence[float], *,
                       single: str, rivals: Sequence[str]) -> list[str]:
    """The gate's failed comparisons, as sentences (empty: passed).

    psnr_db: mean test PSNR in dB by (sigma, denoiser name); every (sigma, name) asked must be there.
    """
    failures = []
    for sigma in sigmas:
        mine = psnr_db[(sigma, single)]
        for rival in rivals:
            theirs = psnr_db[(sigma, rival)]
            if mine < theirs:
                failures.append(f"sigma {sigma:g}: {single} {mine:.2f} dB < {rival} {theirs:.2f} dB")
    return failures


def best_per_sigma(rows: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> dict[float, str]:
    """Per sigma, the candidate denoiser of highest mean PSNR among ``rows`` (each with "sigma", "denoiser",
    "psnr_db"); a candidate without a row at some sigma is not considered there."""
    best: dict[float, tuple[float, str]] = {}
    for row in rows:
        if row["denoiser"] in candidates and row["psnr_db"] > best.get(row["sigma"], (-np.inf, ""))[0]:
            best[row["sigma"]] = (row["psnr_db"], row["denoiser"])
    return {sigma: name for sigma, (_, name) in best.items()}


def psnr_row(denoiser: torch.nn.Module | None, noisy: torch.Tensor, clean: torch.Tensor, *, sigma: float, name: str,
             batch_size: int = 16, valid: torch.Tensor | None = None) -> dict[str, Any]:
    """Mean and std PSNR (dB) of a denoiser (None: the noisy input itself) on (N, C, H, W) images (or
    (N, C, D, H, W) volumes), and each image's (for paired comparisons of denoisers on the same noise).

    valid: optional bool (N, *spatial) mask of the pixels that count (padded volumes: their real voxels)."""
    with torch.inference_mode():
        estimate = noisy if denoiser is None else torch.cat([denoiser(batch) for batch in noisy.split(batch_size)])
    values = psnr(estimate, clean, valid=valid)
    return {"sigma": sigma, "denoiser": name, "psnr_db": float(values.mean()), "psnr_std_db": float(values.std()),
            "images": len(values), "psnr_db_per_image": [round(float(value), 4) for value in values]}


def paired_psnr_differences(rows: Sequence[Mapping[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Per sigma, each denoiser's PSNR minus ``reference``'s, image by image (same noise), with the 95 %
    paired bootstrap interval over images (``metrics.paired_bootstrap_interval``); the noisy input is left out."""
    per_image = {(row["sigma"], row["denoiser"]): row["psnr_db_per_image"] for row in rows}
    differences = []
    for (sigma, name), values in per_image.items():
        if name in (reference, "noisy input") or (sigma, reference) not in per_image:
            continue
        paired = [value - base for value, base in zip(values, per_image[(sigma, reference)], strict=True)]
        interval = paired_bootstrap_interval(paired)
        differences.append({"sigma": sigma, "denoiser": name, "minus": reference, "mean_db": interval["mean"],
                            "low_db": interval["low"], "high_db": interval["high"], "images": interval["images"]})
    return differences
