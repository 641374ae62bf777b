"""The soundness experiment: attack the certificates of study runs (``medcert_core.attack``) and
summarise what flips. ``scripts/attack_certificates.py`` runs it on the quick models and writes
``results/attack.json``; ``book/soundness.md`` reports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # text bars: no widget output in executed chapters

from medcert_core.attack import PGDConfig, attack_image
from medcert_core.smoothing import Execution, resolve_device
from medcert_core.study.runs import CertificationRun, smoothed_segmenter


def attack_run(
    run: CertificationRun,
    cache: str | Path,
    *,
    images: int,
    pgd: PGDConfig = PGDConfig(),
    seed: int = 0,
    device: str | torch.device = "auto",
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Attack the certificates of one ``study.runs.CertificationRun`` on its first ``images`` test images.

    Returns (one tidy row per image, the figure arrays of the first image).
    """
    device = resolve_device(device)
    smoothed, _ = smoothed_segmenter(run, Path(cache), device, Execution(batch_size=batch_size))
    test_set = run.data.load("test")
    count = min(images, len(test_set))
    columns = {"dataset": run.data.dataset, "image_size": str(run.data.image_size), "arch": run.arch,
               "method": run.method.name, "method_label": run.method.label, "denoiser": run.method.denoiser,
               "train_noise": run.method.train_noise, "sigma": run.sigma, "n0": run.n0, "n": run.n,
               "alpha": run.alpha, "tau": run.tau, "steps": pgd.steps, "draws": pgd.draws,
               "step_size": pgd.relative_step,
               "eps_factor": pgd.eps_factor, "attack_seed": seed}
    rows, first_maps = [], {}
    description = f"attack {run.method.label} sigma={run.sigma:g}"
    for index in tqdm(range(count), desc=description, disable=not progress, leave=False):
        image, _ = test_set[index]
        row, maps = attack_image(smoothed, image, n0=run.n0, n=run.n, tau=run.tau, alpha=run.alpha, pgd=pgd,
                                 seed=seed, index=index)
        rows.append({**columns, "image_id": str(test_set.ids[index]), **row})
        if index == 0:
            first_maps = maps
    return pd.DataFrame(rows), first_maps


def attack_certificates(runs: Sequence[CertificationRun], cache: str | Path, **options: Any) -> pd.DataFrame:
    """Tidy rows (one per run x image) of :func:`attack_run` over several runs; options as there."""
    frames = [attack_run(run, cache, **options)[0] for run in runs]
    return pd.concat(frames, ignore_index=True)


SUMMARY_COLUMNS = {
    "images": ("image_id", "count"),
    "radius": ("radius", "first"),
    "eps": ("eps", "first"),
    "pixels": ("pixels", "sum"),
    "pixels_attacked": ("certified", "sum"),
    "certified_flips": ("certified_flips", "sum"),
    "images_with_flip": ("certified_flips", lambda flips: int((flips > 0).sum())),
    "worst_image_flips": ("certified_flips", "max"),
    "certified_to_abstain": ("certified_to_abstain", "sum"),
    "noncertified": ("noncertified", "sum"),
    "noncertified_changed": ("noncertified_changed", "sum"),
    "changed_vs_control": ("changed_vs_control", "sum"),
    "changed_vs_control_certified": ("changed_vs_control_certified", "sum"),
    "control_certified_flips": ("control_certified_flips", "sum"),
    "control_certified_to_abstain": ("control_certified_to_abstain", "sum"),
    "control_noncertified_changed": ("control_noncertified_changed", "sum"),
    "base_flips": ("base_flips", "sum"),
    "base_flips_on_certified": ("base_flips_on_certified", "sum"),
    "base_images_flipped": ("base_flips", lambda flips: int((flips > 0).sum())),
    "random_certified_flips": ("random_certified_flips", "sum"),
    "random_certified_to_abstain": ("random_certified_to_abstain", "sum"),
    "random_noncertified_changed": ("random_noncertified_changed", "sum"),
    "random_changed_vs_control": ("random_changed_vs_control", "sum"),
    "base_random_flips": ("base_random_flips", "sum"),
    "loss_clean": ("loss_clean", "mean"),
    "loss_attacked": ("loss_attacked", "mean"),
    "loss_random": ("loss_random", "mean"),
    "seconds": ("seconds", "sum"),
}


def summarize_attack(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, sigma): totals over images (pixels attacked, flips, ...), worst image, seconds."""
    keys = ["method_label", "sigma"]
    summary = frame.groupby(keys, sort=False).agg(**SUMMARY_COLUMNS).reset_index()
    real = keys + ["radius", "eps", "loss_clean", "loss_attacked", "loss_random", "seconds"]
    integer = [name for name in summary.columns if name not in real]
    return summary.astype({name: "int64" for name in integer})


def attack_payload(frame: pd.DataFrame, parameters: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready {parameters, summary, images} of an experiment's tidy rows."""
    return {
        "parameters": parameters,
        "summary": summarize_attack(frame).to_dict(orient="records"),
        "images": frame.to_dict(orient="records"),
    }


def pgd_parameters(pgd: PGDConfig) -> dict[str, Any]:
    return {**asdict(pgd), "relative_step": pgd.relative_step}
