"""Train a grid's models before its chapters, several at once on a multi-core CPU.

A chapter trains the models it needs when the cache lacks them, one after another, in its own
kernel; the small models of a CPU study use the cores poorly that way (a tiny network at 64 px
barely gains from a second thread). Before a local grid runs, :func:`missing_models` reads from
every pending entry's parameters (the template's defaults, then the grid's values) which
segmenters and in-project denoisers it will ask for, and :func:`warm_cache` trains the missing
ones in parallel processes of one thread each, longest first.

This is a matter of speed only: every model is trained by the same function, under the same lock
and cache key, as the chapter would train it (``medcert_core.study.runs.assets``). A model the
plan misses is trained by its chapter as before; one the plan names but no chapter uses costs
time and nothing else. GPU and SLURM grids skip it: there each chapter trains on its own device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from medcert_core.study.runs import assets
from medcert_core.study.settings import DataSpec, TrainingSpec

AUTO_SPECS = {"ddpm:auto": "ddpm", "unet:auto": "unet"}
ORDER = {"ddpm": 0, "segmenter": 1, "unet": 2}  # longest first: the DDPM trains for the most steps


@dataclass(frozen=True)
class ModelJob:
    """One model a chapter will ask for: a segmenter (arch, training noise) or ``ddpm:auto`` /
    ``unet:auto`` (the UNet denoiser of one sigma), for one data and training setting."""

    kind: str  # "segmenter", "ddpm" or "unet"
    data: DataSpec
    training: TrainingSpec
    cache: Path
    arch: str = ""
    noise_sigma: float = 0.0
    sigma: float = 0.0  # the sigma a UNet denoiser is trained for
    device: str = "cpu"

    @property
    def path(self) -> Path:
        """Where the cache keeps it (its key)."""
        if self.kind == "segmenter":
            return assets.segmenter_path(self.cache, self.data, self.training, self.arch, self.noise_sigma)
        return assets.cached_denoiser_folder(self.kind, self.sigma, self.cache, self.data, self.training)

    @property
    def complete(self) -> bool:
        return assets.marker_path(self.path).is_file()

    def train(self) -> None:
        """Train it (or find it complete) exactly as a chapter would, under the model's lock."""
        if self.kind == "segmenter":
            assets.segmenter(self.cache, self.data, self.training, self.arch, self.noise_sigma, self.device)
        else:
            assets.resolve_denoiser_spec(f"{self.kind}:auto", self.sigma, self.cache, self.data, self.training,
                                         self.device)


def jobs_of_parameters(parameters: Mapping[str, Any]) -> list[ModelJob]:
    """The models a chapter with these parameters (template defaults, then the grid's) asks for:
    each architecture's segmenter, the SegCertify baseline's noisy one, ``ddpm:auto`` and
    ``unet:auto`` (one per sigma) wherever a denoiser parameter names them; for each of its
    ``training_seeds``."""
    from medcert_core.study.experiment import Experiment

    base = Experiment.from_parameters(parameters)
    return [job for seed in base.training_seeds(parameters.get("training_seeds"))
            for job in _jobs_of_experiment(base.with_training_seed(seed), parameters)]


def _jobs_of_experiment(experiment, parameters: Mapping[str, Any]) -> list[ModelJob]:
    """:func:`jobs_of_parameters` for one experiment (one training seed)."""
    common = {"data": experiment.data, "training": experiment.training, "cache": experiment.cache_path}
    archs = list(parameters.get("archs") or ([parameters["arch"]] if parameters.get("arch") else []))
    jobs = [ModelJob("segmenter", arch=arch, **common) for arch in archs]
    if "segcertify_noise" in parameters and archs:
        with_baselines = archs if parameters.get("baselines_for") == "all" else archs[:1]
        jobs += [ModelJob("segmenter", arch=arch, noise_sigma=float(parameters["segcertify_noise"]), **common)
                 for arch in with_baselines]
    specs = [parameters.get("denoiser"), parameters.get("unet_denoiser"),
             *dict(parameters.get("other_denoisers") or {}).values()]
    for kind in dict.fromkeys(AUTO_SPECS[spec] for spec in specs if spec in AUTO_SPECS):
        sigmas = [float(sigma) for sigma in experiment.sigmas] if kind == "unet" else [0.0]
        jobs += [ModelJob(kind, sigma=sigma, **common) for sigma in sigmas]
    return jobs


def missing_models(parameter_sets: Iterable[Mapping[str, Any]]) -> list[ModelJob]:
    """The models of all these chapters that the cache lacks, each once, longest first (a chapter whose
    data or settings cannot be read is left to report its own error)."""
    jobs: dict[Path, ModelJob] = {}
    for parameters in parameter_sets:
        try:
            planned = [(job.path, job) for job in jobs_of_parameters(parameters)]  # the paths read the data
        except (OSError, ValueError):
            continue  # unreadable data or a bad setting: the chapter itself reports it, as without the warm-up
        for path, job in planned:
            jobs.setdefault(path, job)
    return sorted((job for job in jobs.values() if not job.complete), key=lambda job: ORDER[job.kind])


def warm_before_grid(entries: list, notebooks_dir: Path) -> list[tuple[str, float]]:
    """:func:`warm_cache` for the models of these grid entries that the cache lacks, when they run on a
    CPU (``device`` auto without a GPU, or cpu); nothing otherwise."""
    from medcert_core.devices import resolve_device
    from medcert_core.study.grid.spec import template_parameters

    parameter_sets = [{**(template_parameters(notebooks_dir / f"{entry.notebook}.ipynb") or {}), **entry.parameters}
                      for entry in entries]
    on_cpu = [parameters for parameters in parameter_sets
              if resolve_device(parameters.get("device", "auto")).type == "cpu"]
    return warm_cache(missing_models(on_cpu)) if on_cpu else []


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _train(job: ModelJob) -> tuple[str, float]:
    start = time.perf_counter()
    job.train()
    return job.path.name, time.perf_counter() - start


def warm_cache(jobs: list[ModelJob], workers: int | None = None) -> list[tuple[str, float]]:
    """Train ``jobs`` in ``workers`` processes of one thread each (default: one per CPU core, at most one
    per job); returns (model, seconds) per job. Fewer than two jobs or one core: nothing to gain, the
    chapters train them. A failed training raises, naming the model."""
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers < 2:
        return []
    names = ", ".join(job.path.name for job in jobs)
    print(f"[medcert] training {len(jobs)} models in {workers} processes of one thread each before the chapters: "
          f"{names}", flush=True)
    start, trained = time.perf_counter(), []
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
        futures = {pool.submit(_train, job): job for job in jobs}
        for future, job in futures.items():
            try:
                trained.append(future.result())
            except Exception as error:
                raise RuntimeError(f"training {job.kind} {job.path.name} failed: {error}") from error
    print(f"[medcert] {len(jobs)} models trained in {time.perf_counter() - start:.0f} s", flush=True)
    return trained
