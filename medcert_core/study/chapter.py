"""What a dataset chapter certifies, in one place: the chapter's notebook and ``medcert certify-runs``
both build a :class:`DatasetChapter` from the same parameters and so compute the same runs.

    chapter = study.DatasetChapter.from_parameters(globals())   # in the notebook
    per_arch, comparison = chapter.per_arch(), chapter.comparison()

Rows (as the paper's Tables 1 and 2): ours for every architecture (``per_arch``); the clean rows
(sigma = 0, trained without and with noise), SegCertify and ours for the first architecture or, with
``baselines_for = "all"``, for every one (``comparison``); ours with the first architecture behind each of
``other_denoisers`` (``other_denoisers_rows``), where the chapter names some. With several ``training_seeds`` every run
is repeated with models trained from each seed (a ``training_seed`` column), and the paired intervals
resample seeds as well as images. No figure code: the notebook draws.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from medcert_core.metrics import paired_bootstrap_interval
from medcert_core.study.experiment import Experiment, clean_baselines
from medcert_core.study.report.tables import paired_differences
from medcert_core.study.runs.run import CertificationRun, Method, ours, plain, segcertify
from medcert_core.study.settings import CHAPTER_SETTINGS

CHAPTER_PARAMETERS = ("archs", "denoiser", "denoise_steps", "segcertify_noise", "baselines_for")
BASELINES_FOR = ("first", "all")


@dataclass(frozen=True)
class DatasetChapter:
    """A dataset chapter: its shared settings (``experiment``, with the models of its first training seed:
    what the figures and the live cells certify) and its own parameters."""

    experiment: Experiment
    archs: tuple[str, ...]
    denoiser: str
    denoise_steps: str | int = CHAPTER_SETTINGS["denoise_steps"].default
    segcertify_noise: float = CHAPTER_SETTINGS["segcertify_noise"].default
    baselines_for: str = CHAPTER_SETTINGS["baselines_for"].default
    training_seeds: tuple[int, ...] = (0,)
    other_denoisers: tuple[tuple[str, str], ...] = ()  # (note, denoiser spec): more rows of ours, first architecture

    def __post_init__(self) -> None:
        if not self.archs:
            raise ValueError("a dataset chapter needs at least one architecture in 'archs'")
        if not self.training_seeds or len(set(self.training_seeds)) != len(self.training_seeds):
            raise ValueError(f"training_seeds must name at least one seed, each once, got {list(self.training_seeds)}")
        if self.baselines_for not in BASELINES_FOR:
            raise ValueError(f"baselines_for must be one of {list(BASELINES_FOR)}, got {self.baselines_for!r}")

    @classmethod
    def is_dataset_chapter(cls, parameters: Mapping[str, Any]) -> bool:
        """Whether a template's parameters are a dataset chapter's (it names every chapter parameter)."""
        return all(name in parameters for name in CHAPTER_PARAMETERS)

    @classmethod
    def from_parameters(cls, namespace: Mapping[str, Any]) -> "DatasetChapter":
        """Build from a notebook's parameters (its ``globals()``) or a grid entry's; ValueError naming a
        missing chapter parameter."""
        missing = [name for name in CHAPTER_PARAMETERS if name not in namespace]
        if missing:
            raise ValueError(f"not a dataset chapter: its parameters lack {missing} (a dataset chapter names "
                             f"{list(CHAPTER_PARAMETERS)})")
        experiment = Experiment.from_parameters(namespace)
        seeds = experiment.training_seeds(namespace.get("training_seeds"))
        others = tuple((str(note), str(spec)) for note, spec in (namespace.get("other_denoisers") or {}).items())
        return cls(experiment.with_training_seed(seeds[0]), tuple(namespace["archs"]), namespace["denoiser"],
                   namespace["denoise_steps"], namespace["segcertify_noise"], namespace["baselines_for"], seeds,
                   others)

    @property
    def ours(self) -> Method:
        return ours(self.denoiser, self.denoise_steps)

    @property
    def segcertify(self) -> Method:
        return segcertify(self.segcertify_noise)

    @property
    def compared(self) -> list[Method]:
        """The smoothed methods side by side in the radius curves and abstention maps."""
        return [self.segcertify, self.ours]

    @property
    def other_denoiser_methods(self) -> list[Method]:
        """Ours behind each of ``other_denoisers`` (single-step where the denoiser is a DDPM), its note in the label."""
        return [ours(spec, self.denoise_steps, note=note) for note, spec in self.other_denoisers]

    @property
    def baseline_archs(self) -> list[str]:
        """The architectures that also get the clean rows and SegCertify."""
        return list(self.archs if self.baselines_for == "all" else self.archs[:1])

    def _comparison_methods(self) -> list[Method]:
        return [*clean_baselines(self.segcertify_noise), self.segcertify, self.ours]

    def settings_table(self) -> pd.DataFrame:
        """The experiment's settings table with the chapter's training seeds (every seed its models are
        trained from)."""
        return self.experiment.settings_table(self.training_seeds)

    def runs(self) -> list[CertificationRun]:
        """Every run the chapter reads, each once (what ``certify-runs`` computes for it), for every seed."""
        runs = [run for seed in self.training_seeds for experiment in [self.experiment.with_training_seed(seed)]
                for run in (*experiment.runs(self.archs, [self.ours]),
                            *experiment.runs(self.baseline_archs, self._comparison_methods()),
                            *experiment.runs(self.archs[:1], self.other_denoiser_methods))]
        return list(dict.fromkeys(runs))  # equal settings, equal run: each once, in order

    def per_arch(self) -> pd.DataFrame:
        """Tidy rows of ours for every architecture and training seed (computed once, then read from the store)."""
        return self.experiment.run_seeds(self.archs, [self.ours], self.training_seeds)

    def comparison(self) -> pd.DataFrame:
        """Tidy rows of the clean rows, SegCertify and ours for the baseline architectures, every training seed."""
        return self.experiment.run_seeds(self.baseline_archs, self._comparison_methods(), self.training_seeds)

    def other_denoisers_rows(self) -> pd.DataFrame:
        """Tidy rows of ours with the first architecture behind the chapter's denoiser and each of
        ``other_denoisers``, every training seed (empty when the chapter names none)."""
        if not self.other_denoisers:
            return pd.DataFrame()
        return self.experiment.run_seeds(self.archs[:1], [self.ours, *self.other_denoiser_methods], self.training_seeds)

    def other_denoisers_against_ours(self) -> pd.DataFrame:
        """Each other denoiser minus the chapter's, image by image, with 95 % paired intervals (empty without
        ``other_denoisers``)."""
        if not self.other_denoisers:
            return pd.DataFrame()
        return paired_differences(self.other_denoisers_rows(), reference=self.ours.label)

    def ours_against_segcertify(self) -> pd.DataFrame:
        """Ours minus SegCertify per baseline architecture, σ and class, image by image, with 95 % paired
        bootstrap intervals (``tables.paired_differences``; "ahead": the interval excludes 0)."""
        frame = self.comparison()
        smoothed = frame[frame["method_label"].isin([self.ours.label, self.segcertify.label])]
        return paired_differences(smoothed, reference=self.segcertify.label)

    def architectures_against_first(self) -> pd.DataFrame:
        """Ours with each architecture minus ours with the first, image by image, with 95 % paired
        intervals: whether the architecture ranking is more than the test images' spread (empty for one
        architecture)."""
        if len(self.archs) < 2:
            return pd.DataFrame()
        return paired_differences(self.per_arch(), reference=self.archs[0], between="arch")

    def curves(self) -> pd.DataFrame:
        """Radius-curve rows of SegCertify and ours for the first architecture (models of the first seed)."""
        return self.experiment.curves(self.archs[:1], self.compared)

    def split_experiments(self) -> dict[str, Experiment]:
        """The chapter's settings on its whole test split, once per split: "blocked" (its ``split_block``)
        and "random" (the paper's split per case); only "random" when the chapter does not block."""
        block = self.experiment.split_block
        splits = {f"blocked ({block} ids)": block, "random": 0} if block else {"random": 0}
        return {name: dataclasses.replace(self.experiment, split_block=value, test_images=None)
                for name, value in splits.items()}

    def plain_dice_by_split(self, confidence: float = 0.95) -> pd.DataFrame:
        """Plain Dice (no noise, no certificate) of the first architecture, trained and tested on each of
        :meth:`split_experiments`: per split and foreground class, the mean over the whole test split, its
        bootstrap interval over test images (NaN below 2 images) and the image count. How much near-duplicate frames of one
        video on both sides of a random split flatter the score."""
        rows = []
        for name, experiment in self.split_experiments().items():
            frame = experiment.run(self.archs[:1], [plain(0.0)])
            for class_name, group in frame[frame["class_id"] > 0].groupby("class_name", sort=False):
                dice = group["dice"].dropna().to_numpy()
                rows.append({"split": name, "class": class_name, **_mean_and_interval(dice, confidence),
                             "test images": len(dice)})
        return pd.DataFrame(rows).set_index(["split", "class"])


def _mean_and_interval(values: np.ndarray, confidence: float) -> dict[str, float]:
    """{"Dice", "low", "high"}: the mean of ``values`` (N,) and its bootstrap interval (NaN below 2 values)."""
    if len(values) < 2:
        return {"Dice": float(values.mean()) if len(values) else np.nan, "low": np.nan, "high": np.nan}
    interval = paired_bootstrap_interval(values, confidence=confidence)
    return {"Dice": interval["mean"], "low": interval["low"], "high": interval["high"]}
