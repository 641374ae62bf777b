"""The study's one schema: every setting a chapter, a grid file, the CLI or the API may give, with its
default, the values it accepts and its one check (which raises); the data and training specs the
settings build; the training profiles.

    settings -> grid (checks grid files against it) -> runs -> store; report only reads the store

Shared settings (:data:`SETTINGS`) are the same in every chapter; a template's parameters cell
names only its own (``archs``, ``denoiser``...) and the shared ones whose value it changes (its
dataset, profile, image size...). A grid value, a ``--set`` override, a notebook parameter and an
``Experiment`` field are checked by :func:`check_setting`, with the same message everywhere.

Profiles (:data:`PROFILES`), how much training a run may spend:

quick: embedded phantoms, tiny models and a tiny DDPM; minutes on 2 CPU cores (the main job).
jsrt:  the real JSRT data at a CPU-feasible 128 px with capacity-matched segmenters trained to
       convergence on validation Dice, and an in-project DDPM.
paper: the paper's sizes and models, for a GPU (its denoiser is OpenAI's 256x256 checkpoint).
smoke: one epoch, a couple of DDPM steps: checks that the pipeline runs, numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medcert_core.checks import check_parameter
from medcert_core.data import DATASET_NAMES, load_dataset
from medcert_core.data.base import dataset_digest
from medcert_core.denoisers import DDPM_PRESETS, parse_spec
from medcert_core.devices import PRECISION_CHOICES, resolve_precision
from medcert_core.io import USER_CACHE
from medcert_core.models import ARCHITECTURES
from medcert_core.smoothing import check_batch_size, compile_mode
from medcert_core.training import PRESETS

DIGEST_LENGTH = 12  # hex digits of the data digest in a cache name
UNET_DENOISER_BATCH = 16  # train_unet_denoiser's batch size
NONE = type(None)


@dataclass(frozen=True)
class DataSpec:
    """Which data a study reads: dataset name, its root (None for phantoms), input size, split seed and
    split block (0: a random split per case; k: runs of k consecutive ids stay together)."""

    dataset: str
    data_root: str | None
    image_size: int | tuple[int, ...]
    seed: int = 0
    split_block: int = 0

    def load(self, split: str):
        return load_dataset(self.dataset, self.data_root, split, image_size=self.image_size, seed=self.seed,
                            split_block=self.split_block)

    @property
    def tag(self) -> str:
        size = self.image_size if isinstance(self.image_size, int) else "x".join(map(str, self.image_size))
        blocks = f"_blocks{self.split_block}" if self.split_block else ""  # named only when not the default
        return f"{self.dataset}_{size}{blocks}"

    def digest(self, *splits: str) -> str:
        """sha256 (hex) of the data these splits read: each split's case ids and file bytes
        (:func:`medcert_core.data.base.dataset_digest`); the root's location does not count."""
        digests = {split: dataset_digest(self.load(split)) for split in splits}
        return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()

    def data_tag(self, *splits: str) -> str:
        """``_data<digest>``: the part of a cache name that names the data a model is trained on."""
        return f"_data{self.digest(*splits)[:DIGEST_LENGTH]}"


@dataclass(frozen=True)
class TrainingSpec:
    """How models are trained when the cache lacks them (see ``medcert_core.training.PRESETS``).

    Segmenters: ``preset`` (widths and defaults: see ``PRESETS``), ``epochs`` (None: the preset's; with
    ``patience``, the most epochs: training stops after ``patience`` epochs without a better validation
    Dice, the best epoch's weights kept) and ``flips`` (random flips in the augmentation, for images
    without a left and right); the in-project DDPM: ``ddpm_preset``, ``ddpm_steps`` (None: the preset's)
    and the largest sigma it is trained for, the decay of its weights' moving average (None: none) and
    the share of training timesteps drawn near the t* of ``ddpm_focus_sigmas``, its resolution
    (``ddpm_image_size``; None: the input's, at most 256); the UNet denoisers: ``unet_denoiser_steps``
    and ``unet_denoiser_batch_size``. For all of them: ``training_precision``, the autocast of training
    (fp32 master weights; a cached model's name says it when not fp32; ``auto`` is resolved for the
    device by :attr:`Experiment.training`, like a run's ``precision``), and ``training_seed`` (None: the
    split's seed; repeated trainings of one setting differ only in it). A profile fixes them
    (:data:`PROFILES`); a chapter's ``training`` parameter overrides some (:meth:`with_overrides`).
    """

    preset: str = "tiny"
    epochs: int | None = None
    ddpm_preset: str = "tiny"
    ddpm_steps: int | None = None
    ddpm_max_sigma: float = 1.0
    unet_denoiser_steps: int = 300
    unet_denoiser_batch_size: int = UNET_DENOISER_BATCH
    ddpm_ema_decay: float | None = None
    ddpm_focus_sigmas: tuple[float, ...] = ()
    ddpm_focus_share: float = 0.0
    ddpm_image_size: int | None = None
    training_precision: str = "fp32"  # autocast of the forward passes in training: fp32 | bf16 | fp16 | auto
    patience: int | None = None  # segmenters: stop after this many epochs without a better validation Dice
    flips: bool = False  # segmenters: random flips in the augmentation (colonoscopy, skin; not chest X-rays)
    training_seed: int | None = None  # seed of every model trained here; None: the split's seed

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "TrainingSpec":
        """This spec with some fields replaced, e.g. ``{"epochs": 1, "preset": "tiny"}`` (a chapter's
        ``training`` parameter, ``--set "training={epochs: 1}"``); None or {} changes nothing.

        Raises ValueError naming a field that does not exist (listing the valid ones) or a value
        of the wrong type or range (see :func:`check_training_overrides`).
        """
        if overrides is None:
            return self
        check_training_overrides(overrides)
        return dataclasses.replace(self, **overrides)


def _training_field_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not valid for TrainingSpec field ``name``; None if it is (a helper of
    :func:`check_training_overrides`, which raises)."""
    choices = {"preset": sorted(PRESETS), "ddpm_preset": sorted(DDPM_PRESETS),
               "training_precision": list(PRECISION_CHOICES)}
    if name in choices:
        return None if value in choices[name] else f"must be one of {choices[name]}, got {value!r}"
    if name == "patience":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        return None if ok else f"must be null or an integer >= 1 (epochs), got {value!r}"
    if name == "training_seed":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
        return None if ok else f"must be null or an integer >= 0, got {value!r}"
    if name == "flips":
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if name == "ddpm_ema_decay":
        ok = value is None or (isinstance(value, float) and 0 < value < 1)
        return None if ok else f"must be null or a number in (0, 1), got {value!r}"
    if name == "ddpm_focus_share":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
        return None if ok else f"must be a number in [0, 1], got {value!r}"
    if name == "ddpm_focus_sigmas":
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(item, (int, float)) and not isinstance(item, bool) and item > 0 for item in value)
        return None if ok else f"must be a list of numbers > 0, got {value!r}"
    if name == "ddpm_max_sigma":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        return None if ok else f"must be a number > 0, got {value!r}"
    optional = name in ("epochs", "ddpm_steps", "ddpm_image_size")  # None: the preset's own number
    if (value is None and optional) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return None
    return f"must be an integer >= 1{' or null (the preset default)' if optional else ''}, got {value!r}"


def check_training_overrides(overrides: Any) -> None:
    """ValueError unless ``overrides`` is a mapping of TrainingSpec field -> valid value; the message
    names the field and its valid values (or lists the valid fields)."""
    names = [f.name for f in dataclasses.fields(TrainingSpec)]
    example = "e.g. {epochs: 1, preset: tiny, unet_denoiser_steps: 2}"
    if not isinstance(overrides, Mapping):
        raise ValueError(f"training overrides must be a mapping of TrainingSpec fields ({example}), got {overrides!r}")
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; valid: {names}")
    for name, value in overrides.items():
        problem = _training_field_problem(name, value)
        if problem:
            raise ValueError(f"training setting {name!r} {problem}")


PROFILES: dict[str, TrainingSpec] = {
    # the CPU profiles train under bf16 autocast where the CPU runs it natively (auto; fp32 elsewhere):
    # at equal epochs as accurate as fp32 and 1.5-2.3x faster (benchmarks/results/bench_cpu_precision.json)
    "quick": TrainingSpec(preset="tiny", epochs=40, ddpm_preset="tiny", ddpm_steps=300, unet_denoiser_steps=200,
                          training_precision="auto"),
    # the DDPM earns its place (scripts/denoiser_gate.py): EMA weights, timesteps focused on the study's
    # t*, at 64 px (the 128 px input box-averaged by 2, the paper's 512 -> 256 in small), 3000 steps
    # segmenters at matched capacity, trained to convergence: the cosine schedule over at most 60 epochs, stopped
    # after 8 without a better validation Dice (results/preset_choice_jsrt_val.json)
    "jsrt": TrainingSpec(preset="matched", epochs=60, patience=8, ddpm_preset="tiny", ddpm_steps=3000,
                         ddpm_image_size=64,
                         ddpm_ema_decay=0.999, ddpm_focus_sigmas=(0.25, 0.5, 1.0), ddpm_focus_share=0.5,
                         unet_denoiser_steps=800, training_precision="auto"),
    "smoke": TrainingSpec(preset="tiny", epochs=1, ddpm_preset="tiny", ddpm_steps=2, unet_denoiser_steps=2),
    "paper": TrainingSpec(preset="paper", epochs=None, ddpm_preset="paper", ddpm_steps=None, unet_denoiser_steps=5000),
}


def training_spec(profile: str) -> TrainingSpec:
    """The TrainingSpec of ``profile``, as written (``training_precision`` may be ``auto``: see
    :func:`resolved_training`); the error lists the valid names."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    return PROFILES[profile]


def resolved_training(spec: TrainingSpec, device: str | None = "auto") -> TrainingSpec:
    """``spec`` with its ``training_precision`` resolved for ``device`` (``auto``: bf16 where it runs
    natively, else fp32): what names the models it trains and keys the runs that use them."""
    return dataclasses.replace(spec, training_precision=resolve_precision(spec.training_precision, device))


# --- the settings ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One setting: its default, the types a value may have, and what else a value must satisfy.

    ``choices``: the valid values (of each item, for a list); ``check``: raises ValueError on a bad
    value (of each item, for a list); ``help``: one line, as in the parameters cells and the CLI.
    """

    default: Any
    types: tuple[type, ...] | None  # None: any type (the check says what is valid)
    help: str
    choices: Sequence[Any] | None = None
    check: Callable[[Any], Any] | None = None


def _ranged(name: str) -> Callable[[Any], Any]:
    return lambda value: check_parameter(name, value)


def _check_split_block(value: int) -> None:
    if value < 0:
        raise ValueError(f"split_block must be >= 0 (0: a random split per case), got {value}")


def _check_denoiser_spec(spec: str) -> None:
    if spec == "none":
        return
    kind, location = parse_spec(spec)
    if str(location) == "auto" and kind not in ("ddpm", "unet"):
        raise ValueError(f"only ddpm:auto and unet:auto are trained here; {kind}: needs a file, got {spec!r}")


def _check_other_denoisers(denoisers: dict) -> None:
    """{label note: denoiser spec}: notes are non-empty strings, specs valid."""
    for note, spec in denoisers.items():
        if not isinstance(note, str) or not note or not isinstance(spec, str):
            raise ValueError(f"expected {{label note: denoiser spec}} with non-empty string notes, got {note!r}: {spec!r}")
        _check_denoiser_spec(spec)


def _check_model_flags(text: str) -> None:
    """ValueError unless ``text`` is a valid guided-diffusion MODEL_FLAGS string."""
    from medcert_core.denoisers.guided_diffusion import parse_model_flags, unet_config_from_flags

    try:
        unet_config_from_flags(**parse_model_flags(text))
    except (TypeError, NotImplementedError) as error:
        raise ValueError(str(error)) from error


def _check_training_seeds(seeds: list | None) -> None:
    """None, or a list of training seeds, each valid as the ``training_seed`` override."""
    for seed in seeds or []:
        problem = _training_field_problem("training_seed", seed) if seed is not None else "must not be null"
        if problem:
            raise ValueError(f"each training seed {problem}")


def _check_training(overrides: Any) -> None:
    if overrides is not None:
        check_training_overrides(overrides)


SETTINGS: dict[str, Setting] = {
    # data
    "profile": Setting("quick", (str,), "training budget: quick | jsrt | smoke | paper", choices=sorted(PROFILES)),
    "dataset": Setting("phantom", (str,), "dataset name", choices=DATASET_NAMES),
    "data_root": Setting(None, None, "dataset folder (None for the embedded phantoms)"),
    "image_size": Setting(64, (int, list), "square input size in pixels, or [H, W]; volumes: padded [D, H, W]"),
    "test_images": Setting(3, (int, NONE), "first N test images (None: the whole test split)"),
    "seed": Setting(0, (int,), "split, noise and training seed (training_seeds repeat the training)"),
    # the certificate
    "sigmas": Setting([0.25, 0.5, 1.0], (list,), "noise levels, in the [0, 1] input scale", check=_ranged("sigma")),
    "n0": Setting(10, (int,), "selection draws per image", check=_ranged("n0")),
    "n": Setting(100, (int,), "estimation draws per image", check=_ranged("n")),
    "alpha": Setting(0.001, (int, float), "family-wise error level (Holm over all pixels or voxels)", check=_ranged("alpha")),
    "tau": Setting(0.75, (int, float), "class probability a pixel (voxel) must exceed to be certified", check=_ranged("tau")),
    # execution
    "device": Setting("auto", (str,), "auto | cpu | cuda | cuda:1 ..."),
    "batch_size": Setting(32, (int, str), 'noisy draws per forward pass, or "auto" (largest that fits the GPU)',
                          check=check_batch_size),
    "precision": Setting("fp32", (str,), "fp32 | bf16 | fp16 | auto (bf16 where the device runs it natively): autocast "
                         "of the networks only",
                         choices=list(PRECISION_CHOICES)),
    "channels_last": Setting(False, (bool,), "channels_last memory format for the networks (GPU)"),
    "compile": Setting(False, (bool, str), "torch.compile the base model once per run (GPU; slow to compile)",
                       check=compile_mode),
    # models
    "denoiser_flags": Setting("", (str,), "MODEL_FLAGS of a guided-diffusion checkpoint; empty for "
                              "256x256_diffusion_uncond", check=_check_model_flags),
    "training": Setting(None, None, 'overrides of the profile\'s training, e.g. {"epochs": 1, "preset": "tiny"}',
                        check=_check_training),
    # paths and display
    "results_dir": Setting("runs/results", (str,), "relative paths are taken from the project root"),
    "cache_dir": Setting(USER_CACHE, (str,), "trained models: \"user\" ($MEDCERT_CACHE, else ~/.cache/medcert) or a folder"),
    "interactive": Setting(True, (bool,), "False on the website: no live widgets"),
}

# A chapter's own settings: named in the templates that have them (their defaults are the templates').
CHAPTER_SETTINGS: dict[str, Setting] = {
    # 2D architectures for image datasets, volumetric ones (unet3d, <arch>-slicewise) for volume datasets: training
    # refuses a mismatch (training.check_architecture_fits)
    "archs": Setting(["unet"], (list,), "Table 1 rows, one per architecture", choices=ARCHITECTURES),
    "arch": Setting("unet", (str,), "architecture", choices=ARCHITECTURES),
    "denoiser": Setting("ddpm:auto", (str,), "ddpm:auto (trained here) | ddpm:<folder> | guided-diffusion:<file.pt> | "
                        "unet:<folder> | ffdnet:<file.pth> | none", check=_check_denoiser_spec),
    "unet_denoiser": Setting("unet:auto", (str,), "unet:auto | unet:<folder with {sigma}>", check=_check_denoiser_spec),
    "other_denoisers": Setting({}, (dict,), '{label note: spec} of more denoiser rows, e.g. {"off the shelf": '
                               '"ffdnet:<file.pth>", "trained on jsrt": "ddpm:<folder>"}', check=_check_other_denoisers),
    "denoise_steps": Setting("single", (str, int), 'DDPM calls from t* to 0: "single" (the paper\'s choice) or an int'),
    "segcertify_noise": Setting(0.25, (int, float), "training noise of the SegCertify baseline"),
    "multi_steps": Setting([4], (list,), "model calls of each multi-step variant"),
    "split_block": Setting(0, (int,), "0: random split per case; k: runs of k consecutive ids in one split (video)",
                           check=_check_split_block),
    "baselines_for": Setting("first", (str,), 'the clean rows and SegCertify for the "first" architecture or "all"',
                             choices=("first", "all")),
    "training_seeds": Setting(None, (list, NONE), "every model trained once per seed, comparisons over seeds and "
                              "images (None: once, from the training seed)", check=_check_training_seeds),
}
ALL_SETTINGS = {**SETTINGS, **CHAPTER_SETTINGS}
DEFAULTS: dict[str, Any] = {name: setting.default for name, setting in SETTINGS.items()}


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if kind is NONE else kind.__name__ for kind in types)


def inferred_types(default: Any) -> tuple[type, ...] | None:
    """The types of a template parameter the schema does not know, from its default; None: any."""
    if default is None:
        return None
    return (int, float) if isinstance(default, float) else (type(default),)


def check_setting(name: str, value: Any, defaults: Mapping[str, Any] = DEFAULTS) -> None:
    """ValueError unless ``value`` is valid for setting ``name`` of a chapter whose settings and defaults
    are ``defaults`` (the schema's, with a template's own parameters): known name, type, choices, range."""
    if name not in defaults:
        raise ValueError(f"unknown parameter {name!r}; valid: {sorted(defaults)}")
    setting = ALL_SETTINGS.get(name)
    types = setting.types if setting is not None else inferred_types(defaults[name])
    if types is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
        raise ValueError(f"parameter {name!r} must be {_type_names(types)} (its default is {defaults[name]!r}), "
                         f"got {type(value).__name__} {value!r}")
    if setting is None or value is None:
        return
    items = value if isinstance(value, list) else [value]
    if setting.choices is not None and any(item not in setting.choices for item in items):
        raise ValueError(f"parameter {name!r}: unknown value {value!r}; valid: {list(setting.choices)}")
    try:
        for item in (items if setting.types == (list,) else [value]):
            if setting.check is not None:
                setting.check(item)
    except ValueError as error:
        raise ValueError(f"parameter {name!r}: {error}") from error


def chapter_defaults(template_parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting of a chapter with its default: the schema's shared ones, then the template's own."""
    return {**DEFAULTS, **template_parameters}


# --- the parameters cell of a template ---------------------------------------------------------

FIRST = ("profile", "dataset", "data_root")  # shown first, then the chapter's own, then the rest
COMMENT_COLUMN = 28


def _literal(value: Any) -> str:
    """``value`` as Python source, strings in double quotes (as the templates write them)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    return repr(value)


def parameters_cell(values: Mapping[str, Any]) -> str:
    """The source of a template's ``parameters`` cell: every shared setting (the template's value, else the
    schema's default) and the template's own parameters, each with its one-line help from the schema."""
    own = [name for name in values if name not in SETTINGS]
    unknown = [name for name in own if name not in CHAPTER_SETTINGS]
    if unknown:
        raise ValueError(f"template parameters {unknown} are not in the schema; add them to CHAPTER_SETTINGS")
    order = [*FIRST, *own, *(name for name in SETTINGS if name not in FIRST)]
    lines = []
    for name in order:
        code = f"{name} = {_literal(values.get(name, ALL_SETTINGS[name].default))}"
        lines.append(f"{code.ljust(COMMENT_COLUMN - 1)} # {ALL_SETTINGS[name].help}")
    return "\n".join(lines)
