"""What a chapter notebook builds from its parameters cell: one ``Experiment``.

    experiment = Experiment.from_parameters(globals())      # the notebook's parameters
    results = experiment.run(archs=["unet"], methods=[ours("ddpm:auto"), segcertify()])

Relative ``results_dir`` / ``cache_dir`` are taken from the project root (the folder holding
``_toc.yml`` or ``pyproject.toml`` above the working directory), so a notebook run in Jupyter
from ``notebooks/`` and the same one run by the grid share one results store. ``cache_dir = "user"``
(the default) is the user's cache folder (:func:`medcert_core.io.user_cache_dir`): trained models
outlive the checkout. A ``{cache}`` in a denoiser spec's path is filled with the cache in use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medcert_core.devices import AUTO, check_precision, resolve_device, resolve_precision
from medcert_core.io import CACHE_SUBSTITUTE, USER_CACHE, user_cache_dir
from medcert_core.smoothing import Execution
from medcert_core.study.runs import store
from medcert_core.study.runs.assets import PRECISION_SUBSTITUTE, precision_tag
from medcert_core.study.settings import DataSpec, TrainingSpec
from medcert_core.study.settings import DEFAULTS, resolved_training, training_spec
from medcert_core.study.runs.run import CertificationRun, Method, plain, run_all

PROJECT_MARKERS = ("_toc.yml", "pyproject.toml")


def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) holding _toc.yml or pyproject.toml."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if any((folder / marker).is_file() for marker in PROJECT_MARKERS):
            return folder
    return start


def _under_project(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


@dataclass
class Experiment:
    """The shared settings of a chapter: data, training profile, certificate parameters, where to store
    (defaults: :data:`medcert_core.study.settings.SETTINGS`; ``training_overrides`` is its ``training``)."""

    profile: str = DEFAULTS["profile"]
    dataset: str = DEFAULTS["dataset"]
    data_root: str | None = DEFAULTS["data_root"]
    image_size: int | Sequence[int] = DEFAULTS["image_size"]
    sigmas: Sequence[float] = tuple(DEFAULTS["sigmas"])
    n0: int = DEFAULTS["n0"]
    n: int = DEFAULTS["n"]
    alpha: float = DEFAULTS["alpha"]
    tau: float = DEFAULTS["tau"]
    test_images: int | None = DEFAULTS["test_images"]
    seed: int = DEFAULTS["seed"]
    split_block: int = 0  # a chapter setting (CHAPTER_SETTINGS): only video datasets' templates have it
    device: str = DEFAULTS["device"]
    batch_size: int | str = DEFAULTS["batch_size"]
    precision: str = DEFAULTS["precision"]
    channels_last: bool = DEFAULTS["channels_last"]
    compile: bool | str = DEFAULTS["compile"]
    denoiser_flags: str = DEFAULTS["denoiser_flags"]
    training_overrides: Mapping[str, Any] | None = DEFAULTS["training"]
    results_dir: str = DEFAULTS["results_dir"]
    cache_dir: str = DEFAULTS["cache_dir"]
    progress: bool = True

    @classmethod
    def from_parameters(cls, namespace: Mapping[str, Any]) -> "Experiment":
        """Build from a notebook's parameters; names that are not settings (e.g. ``archs``) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {name: namespace[name] for name in names if name in namespace}
        if isinstance(namespace.get("training"), Mapping):  # a chapter's ``training`` parameter: TrainingSpec overrides
            known["training_overrides"] = dict(namespace["training"])
        return cls(**known)

    def __post_init__(self) -> None:
        self.training  # fail early on an unknown profile or training override
        check_precision(self.precision)
        self.execution  # and on a bad batch size or compile mode
        if self.data_root is not None:
            self.data_root = str(_under_project(self.data_root))

    @property
    def data(self) -> DataSpec:
        size = int(self.image_size) if isinstance(self.image_size, int) else tuple(int(s) for s in self.image_size)
        return DataSpec(self.dataset, self.data_root, size, int(self.seed), int(self.split_block))

    @property
    def training(self) -> TrainingSpec:
        """The profile's TrainingSpec with ``training_overrides`` applied (e.g. {"epochs": 1}), its
        ``training_precision`` resolved for the device (``auto``: bf16 where it runs natively)."""
        return resolved_training(training_spec(self.profile).with_overrides(self.training_overrides), self.device)

    @property
    def execution(self) -> Execution:
        """How the base model runs (batch size, channels_last, torch.compile); precision is a run parameter."""
        return Execution(self.batch_size, bool(self.channels_last), self.compile)

    @property
    def results_path(self) -> Path:
        return _under_project(self.results_dir)

    @property
    def cache_path(self) -> Path:
        return user_cache_dir() if self.cache_dir == USER_CACHE else _under_project(self.cache_dir)

    def in_cache(self, method: Method) -> Method:
        """``method`` with a ``{cache}`` in its denoiser spec filled with :attr:`cache_path` and a
        ``{training_precision}`` with the tag this experiment's trained models carry in their names (``_bf16``,
        or nothing for fp32): a model another chapter trained with the same settings on this machine."""
        filled = method.denoiser.replace(CACHE_SUBSTITUTE, str(self.cache_path))
        filled = filled.replace(PRECISION_SUBSTITUTE, precision_tag(self.training))
        return method if filled == method.denoiser else dataclasses.replace(method, denoiser=filled)

    def certification_run(self, arch: str, method: Method, sigma: float) -> CertificationRun:
        """One run of these settings; the precision resolved for the device, ``{cache}`` filled in."""
        method = self.in_cache(method)
        return CertificationRun(
            data=self.data, training=self.training, arch=arch, method=method, sigma=float(sigma),
            n0=int(self.n0), n=int(self.n), alpha=float(self.alpha), tau=float(self.tau),
            test_images=int(self.test_images) if self.test_images else None,
            precision=resolve_precision(self.precision, self.device),
            denoiser_flags=self.denoiser_flags if method.denoiser.startswith("guided-diffusion:") else "",
        )

    def runs(self, archs: Sequence[str], methods: Sequence[Method]) -> list[CertificationRun]:
        """Every (arch, method, sigma) run; plain methods run once, at sigma 0."""
        return [
            self.certification_run(arch, method, sigma)
            for arch in archs
            for method in methods
            for sigma in ([0.0] if method.name == "plain" else self.sigmas)
        ]

    def run(self, archs: Sequence[str], methods: Sequence[Method]) -> pd.DataFrame:
        """Tidy results of all runs (computed once, then read from the store); also refreshes the aggregate."""
        frame = run_all(self.runs(archs, methods), results_dir=self.results_path, cache=self.cache_path,
                        device=self.device, execution=self.execution, progress=self.progress)
        store.aggregate(self.results_path)
        return frame

    def training_seeds(self, seeds: Sequence[int] | None = None) -> tuple[int, ...]:
        """The seeds models are trained from: ``seeds``, else the one these settings train with (a
        ``training_seed`` override, else the split's ``seed``)."""
        if seeds is not None:
            return tuple(int(seed) for seed in seeds)
        explicit = self.training.training_seed
        return (int(self.seed) if explicit is None else int(explicit),)

    def with_training_seed(self, seed: int) -> "Experiment":
        """These settings with every model trained from ``seed`` (the split and the noise unchanged); the
        split's own seed keeps the runs' existing keys."""
        overrides = {**(self.training_overrides or {}), "training_seed": None if seed == self.seed else int(seed)}
        return dataclasses.replace(self, training_overrides=overrides)

    def run_seeds(self, archs: Sequence[str], methods: Sequence[Method], seeds: Sequence[int]) -> pd.DataFrame:
        """Tidy results of all runs once per training seed, with a ``training_seed`` column: what
        ``tables.paired_differences`` resamples seeds and images over."""
        return pd.concat([self.with_training_seed(seed).run(archs, methods).assign(training_seed=int(seed))
                          for seed in seeds], ignore_index=True)

    def curves(self, archs: Sequence[str], methods: Sequence[Method]) -> pd.DataFrame:
        """Curve rows (image x class x tau) of every smoothed run, computed first if missing."""
        runs = [run for run in self.runs(archs, methods) if run.sigma > 0]
        if not all(store.is_complete(self.results_path, run.hash) for run in runs):
            self.run(archs, methods)
        frames = [store.load_curves(self.results_path, run.hash).assign(run=run.hash, method_label=run.method.label)
                  for run in runs]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def maps(self, arch: str, method: Method, sigma: float) -> dict[str, np.ndarray]:
        """Stored label maps of a completed run (see ``runs.MAP_IMAGES``)."""
        return store.load_maps(self.results_path, self.certification_run(arch, method, sigma).hash)

    def abstention_panels(self, arch: str, methods: Sequence[Method]) -> dict[float, dict[str, np.ndarray]]:
        """{sigma: {"noisy", "target", <method label>: labels}} of completed runs, for ``figures.abstention_maps``."""
        panels = {}
        for sigma in self.sigmas:
            first = self.maps(arch, methods[0], sigma)
            panels[float(sigma)] = {"noisy": first["noisy"], "target": first["target"],
                                    **{method.label: self.maps(arch, method, sigma)["labels"] for method in methods}}
        return panels

    def profile_description(self) -> str:
        """The training profile, with the chapter's overrides of it, e.g. "jsrt (epochs 5)" (a None override
        keeps the profile's value and is not named; the training seeds have their own row)."""
        overrides = ", ".join(f"{name} {value}" for name, value in sorted((self.training_overrides or {}).items())
                              if value is not None)
        return f"{self.profile} ({overrides})" if overrides else self.profile

    def settings_table(self, training_seeds: Sequence[int] | None = None) -> pd.DataFrame:
        """The settings a chapter states: data, input space, certificate parameters, profile, the seeds its
        models are trained from (``training_seeds``, else :meth:`training_seeds`), device."""
        test_set = self.data.load("test")
        image, _ = test_set[0]
        shown = min(len(test_set), self.test_images or len(test_set))
        split = f"split seed {self.seed}" + (f", runs of {self.split_block} consecutive ids" if self.split_block else "")
        seeds = ", ".join(map(str, self.training_seeds(training_seeds)))
        return pd.DataFrame({"setting": [
            "dataset", "certified input space", "test images", "σ", "n0 / n", "α (Holm) / τ", "profile",
            "training seeds", "device", "precision", "training precision",
        ], "value": [
            self.dataset, f"[0, 1]^({'×'.join(map(str, image.shape))})",
            f"{shown} of {len(test_set)} ({split})", ", ".join(f"{s:g}" for s in self.sigmas),
            f"{self.n0} / {self.n}", f"{self.alpha:g} / {self.tau:g}", self.profile_description(),
            seeds, str(resolve_device(self.device)), resolve_precision(self.precision, self.device)
            + (" (auto)" if self.precision == AUTO else ""), self.training.training_precision,
        ]}).set_index("setting")


def combine(*frames: pd.DataFrame) -> pd.DataFrame:
    """Tidy frames of several ``Experiment.run`` calls, each run's rows once."""
    return pd.concat(frames, ignore_index=True).drop_duplicates(["run", "image_id", "class_id"], ignore_index=True)


def clean_baselines(train_noise: float) -> list[Method]:
    """The paper's sigma = 0 rows: the plain model trained without noise and with ``train_noise``."""
    return [plain(0.0), plain(train_noise)]
