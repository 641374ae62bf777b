"""The soundness experiment: attack the certificates of study runs (``medcert_core.attack``) and
summarise what flips, and how close the sharp attack on the lowest-margin pixels comes to the
Lipschitz bound. ``scripts/attack_certificates.py`` runs it on the quick models and writes
``results/attack.json``; ``book/soundness.md`` reports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # text bars: no widget output in executed chapters

from medcert_core.attack import PGDConfig, SharpConfig, attack_image
from medcert_core.devices import resolve_device
from medcert_core.smoothing import Execution
from medcert_core.study.runs.run import CertificationRun, smoothed_segmenter


@dataclass
class RunAttack:
    """One run's attack: images (one tidy row per image), groups (one per group of the sharp attack,
    empty without it), maps (the figure arrays of the first image)."""

    images: pd.DataFrame
    groups: pd.DataFrame
    maps: dict[str, np.ndarray] = field(default_factory=dict)


def attack_run(
    run: CertificationRun,
    cache: str | Path,
    *,
    images: int,
    pgd: PGDConfig = PGDConfig(),
    sharp: SharpConfig | None = None,
    sharp_images: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    batch_size: int = 32,
    progress: bool = True,
) -> RunAttack:
    """Attack the certificates of one ``study.runs.CertificationRun`` on its first ``images`` test images;
    with ``sharp``, the sharp attack too, on the first ``sharp_images`` of them (default: all).

    The networks run at the run's precision (the smoother's).
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
    columns["precision"] = run.precision
    sharp_count = count if sharp_images is None else min(sharp_images, count)
    rows, group_rows, first_maps = [], [], {}
    description = f"attack {run.method.label} sigma={run.sigma:g}"
    for index in tqdm(range(count), desc=description, disable=not progress, leave=False):
        image, _ = test_set[index]
        result = attack_image(smoothed, image, n0=run.n0, n=run.n, tau=run.tau, alpha=run.alpha, pgd=pgd,
                              seed=seed, index=index, sharp=sharp if index < sharp_count else None)
        image_id = str(test_set.ids[index])
        rows.append({**columns, "image_id": image_id, **result.row})
        group_rows += [{"method_label": run.method.label, "sigma": run.sigma, "tau": run.tau, "image_id": image_id,
                        **group} for group in result.groups]
        if index == 0:
            first_maps = result.maps
    return RunAttack(pd.DataFrame(rows), pd.DataFrame(group_rows), first_maps)


def attack_certificates(runs: Sequence[CertificationRun], cache: str | Path,
                        **options: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tidy rows of :func:`attack_run` over several runs: (one per run x image, one per run x group of the
    sharp attack); options as there."""
    results = [attack_run(run, cache, **options) for run in runs]
    return (pd.concat([result.images for result in results], ignore_index=True),
            pd.concat([result.groups for result in results], ignore_index=True))


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


GROUP_SUMMARY_COLUMNS = {
    "groups": ("group", "count"),
    "images": ("image_id", "nunique"),
    "eps": ("eps", "first"),
    "count_min": ("count_min", "min"),
    "count_max": ("count_max", "max"),
    "p_before": ("p_before", "mean"),
    "p_before_min": ("p_before", "min"),
    "p_before_lower_min": ("p_before_lower", "min"),
    "p_after": ("p_after", "mean"),
    "p_after_min": ("p_after", "min"),
    "p_random": ("p_random", "mean"),
    "bound": ("bound", "mean"),
    "bound_point": ("bound_point", "mean"),
    "drop_fraction": ("drop_fraction", "mean"),
    "drop_fraction_median": ("drop_fraction", "median"),
    "drop_fraction_max": ("drop_fraction", "max"),
    "random_drop_fraction": ("random_drop_fraction", "mean"),
    "random_drop_fraction_max": ("random_drop_fraction", "max"),
    "margin_to_bound_min": ("margin_to_bound", "min"),
    "groups_below_bound": ("below_bound", "sum"),
    "groups_below_half": ("below_half", "sum"),
    "groups_before_below_tau": ("before_below_tau", "sum"),
    "seconds": ("seconds", "sum"),
}


def summarize_groups(groups: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, sigma, group size) of the sharp attack's group rows: mean probabilities before
    and after, the mean bound, the share of the allowed drop achieved (mean, median, max; a random
    direction's), the smallest p_after - bound, and how many groups crossed the bound, 1/2 or (before) tau."""
    if groups.empty:
        return pd.DataFrame()
    keys = ["method_label", "sigma", "group_pixels"]
    frame = groups.assign(margin_to_bound=groups["p_after"] - groups["bound"])
    summary = frame.groupby(keys, sort=False).agg(**GROUP_SUMMARY_COLUMNS).reset_index()
    integer = ["groups", "images", "group_pixels", "count_min", "count_max", "groups_below_bound",
               "groups_below_half", "groups_before_below_tau"]
    return summary.astype({name: "int64" for name in integer})


def attack_payload(frame: pd.DataFrame, parameters: dict[str, Any],
                   groups: pd.DataFrame | None = None) -> dict[str, Any]:
    """JSON-ready {parameters, summary, group_summary, images, groups} of an experiment's tidy rows."""
    groups = pd.DataFrame() if groups is None else groups
    return {
        "parameters": parameters,
        "summary": summarize_attack(frame).to_dict(orient="records"),
        "group_summary": summarize_groups(groups).to_dict(orient="records"),
        "images": frame.to_dict(orient="records"),
        "groups": groups.to_dict(orient="records"),
    }


def pgd_parameters(pgd: PGDConfig | SharpConfig) -> dict[str, Any]:
    return {**asdict(pgd), "relative_step": pgd.relative_step}
