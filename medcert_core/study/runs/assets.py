"""Trained models a study needs, built once and cached: segmenters, the in-project DDPM, UNet denoisers.

Every function returns what is in the cache when it is there and trains it otherwise (training
itself checkpoints and resumes). Cache names spell out everything that defines the model, the data
it is trained on included (``_data<digest>``: the training splits' case ids and file bytes, see
:meth:`DataSpec.digest`), so a changed setting or changed data trains a new model instead of
silently reusing an old one.

A cached model is complete when its marker ``<model>.complete`` exists: written atomically after the
model's files (fsynced), it lists their sizes and sha256, and what its training took (seconds, threads,
machine, load: ``scripts/chapter_cost.py`` reads them). A model without its marker is incomplete:
trained again (resumed from a checkpoint that loads; one that does not load is deleted). A model
with its marker is never deleted: one that does not match its marker or does not load raises,
naming the file.

Several processes may share one cache (SLURM jobs, torchrun ranks, notebooks): each model is looked
up and trained under its own lock (``<cache>/locks/<model>.lock``, an flock that dies with its
process), so two processes needing the same uncached model train it once: the second waits, then
loads what the first saved. A process killed while training leaves a checkpoint (atomic) that the
next one resumes. Each training says so on stderr: ``[medcert] training <kind> <name> (host, pid)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from medcert_core.data import IMAGE_DATASET_NAMES
from medcert_core.data.base import as_size
from medcert_core.denoisers import (
    load_denoiser,
    parse_spec,
    resize_noise_factor,
    train_ddpm,
    train_unet_denoiser,
)
from medcert_core.io import (
    file_digest,
    file_lock,
    fsync_path,
    load_weights,
    write_json_atomically,
)
from medcert_core.devices import AUTO, load_average, local_timestamp, machine_record, resolve_device
from medcert_core.study.runs.store import weight_files, weights_digest
from medcert_core.study.settings import UNET_DENOISER_BATCH, DataSpec, TrainingSpec
from medcert_core.training import TrainConfig, load_segmenter, train_segmenter

AUTO = "auto"  # denoiser location meaning "train it in the project", e.g. "ddpm:auto"
COMPLETE = ".complete"  # suffix of a cached model's completion marker
LOADED_FILES = {"ddpm": ("unet", "scheduler"), "unet": ("unet_denoiser.pt",)}  # what a folder spec loads
FINISHED = {"ddpm": "model_index.json", "unet": "unet_denoiser.pt"}  # each trainer's own last-written file


def segmenter_path(cache: Path, data: DataSpec, training: TrainingSpec, arch: str, noise_sigma: float) -> Path:
    epochs = training.epochs if training.epochs is not None else "default"
    return (Path(cache) / "segmenters" / f"{data.tag}_{arch}_{training.preset}_e{epochs}_noise{noise_sigma}"
            f"{recipe_tag(training)}{precision_tag(training)}_seed{training_seed(data, training)}"
            f"{data.data_tag('train', 'val')}.pt")


def training_seed(data: DataSpec, training: TrainingSpec) -> int:
    """The seed every model of a run is trained with: ``training.training_seed``, else the split's seed
    (so a run without one names and trains its models as before)."""
    return data.seed if training.training_seed is None else training.training_seed


def recipe_tag(training: TrainingSpec) -> str:
    """``_p<patience>`` and ``_flips`` in a segmenter's name when its recipe has them; nothing otherwise, so
    existing caches stay valid."""
    return (f"_p{training.patience}" if training.patience is not None else "") + ("_flips" if training.flips else "")


PRECISION_SUBSTITUTE = "{training_precision}"  # in a denoiser spec's path: the precision tag of the run's training


def precision_tag(training: TrainingSpec) -> str:
    """``_bf16`` (``_fp16``) in a cached model's name when it was trained under autocast; nothing for fp32,
    so existing caches stay valid. ValueError for ``auto``: a name says what the model was trained at."""
    if training.training_precision == AUTO:
        raise ValueError("training_precision 'auto' names no model: resolve it for the device first "
                         "(Experiment.training does)")
    return "" if training.training_precision == "fp32" else f"_{training.training_precision}"


# --- completion markers ---------------------------------------------------------------------------

def marker_path(model: Path) -> Path:
    """The completion marker of a cached model (file or folder): ``<model>.complete`` beside it."""
    model = Path(model)
    return model.with_name(model.name + COMPLETE)


def model_files(model: Path) -> dict[str, Path]:
    """The files of a cached model by name: the file itself, or every file below its folder."""
    model = Path(model)
    if model.is_file():
        return {model.name: model}
    return {file.relative_to(model).as_posix(): file for file in weight_files(model)}


def training_record(started: float) -> dict[str, Any]:
    """What a marker keeps of the training that ``started`` at this ``time.perf_counter()``: its seconds (of
    the process that finished it: a resumed training counts its last part only), the machine and its threads,
    the load average and when it ended."""
    return {"seconds": round(time.perf_counter() - started, 1), "machine": machine_record(),
            "load_average": load_average(),
            "finished": local_timestamp()}


def mark_complete(model: Path, training: dict[str, Any] | None = None) -> Path:
    """Write the model's completion marker, atomically, once its files are on the disk (fsynced):
    each file's size and sha256, checked by :func:`check_complete`, and ``training`` (its
    :func:`training_record`) when it was trained here."""
    files = model_files(model)
    if not files:
        raise FileNotFoundError(f"no model files at {model} to mark complete")
    for file in {*files.values(), *(file.parent for file in files.values())}:
        fsync_path(file)
    entries = {name: {"size": file.stat().st_size, "sha256": file_digest(file)} for name, file in files.items()}
    record = {"model": Path(model).name, "files": entries, **({"training": training} if training else {})}
    return write_json_atomically(record, marker_path(model))


def check_complete(model: Path) -> None:
    """Raise ValueError naming the file when a model marked complete differs from its marker
    (a file missing, of another size or other bytes). Nothing is deleted."""
    marker = marker_path(model)
    try:
        expected = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"unreadable completion marker {marker} ({error!r}); the model {model} is kept") from error
    found = model_files(model) if Path(model).exists() else {}
    for name, entry in expected.items():
        file = found.get(name)
        if file is None or file.stat().st_size != entry["size"] or file_digest(file) != entry["sha256"]:
            raise ValueError(f"cached model file {Path(model) / name if Path(model).is_dir() else model} "
                             f"does not match its completion marker {marker} (missing, truncated or "
                             f"changed); it is kept: remove it and the marker to train it again")


def model_lock(cache: Path, model: Path, what: str):
    """Context manager: the lock of one cached model (``<cache>/locks/<model path in the cache>.lock``)."""
    model = Path(model)
    try:
        name = model.resolve().relative_to(Path(cache).resolve()).as_posix()
    except ValueError:  # a model outside the cache: its name suffices
        name = model.name
    return file_lock(Path(cache) / "locks" / f"{name}.lock", what)


def announce_training(kind: str, model: Path) -> None:
    """One stderr line per model trained, naming the process: shows which job of a grid trained what."""
    print(f"[medcert] training {kind} {Path(model).name} (host {socket.gethostname()}, pid {os.getpid()})",
          file=sys.stderr, flush=True)


def segmenter(cache: Path, data: DataSpec, training: TrainingSpec, arch: str, noise_sigma: float = 0.0,
              device: str | torch.device = "auto") -> tuple[torch.nn.Module, TrainConfig]:
    """The segmenter of ``arch`` trained on ``data`` with Gaussian noise ``noise_sigma`` (0: none).

    Looked up and trained under the model's lock: trained once however many processes ask at once.
    """
    path = segmenter_path(cache, data, training, arch, noise_sigma)
    with model_lock(cache, path, f"segmenter {path.name}"):
        return _cached_or_trained_segmenter(path, data, training, arch, noise_sigma, device)


def _cached_or_trained_segmenter(path: Path, data: DataSpec, training: TrainingSpec, arch: str, noise_sigma: float,
                                 device: str | torch.device) -> tuple[torch.nn.Module, TrainConfig]:
    """The complete cached segmenter, else trained (resuming a checkpoint that loads), then marked complete."""
    if marker_path(path).is_file():
        return load_cached_segmenter(path, device)
    discard_unreadable_checkpoint(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    announce_training("segmenter", path)
    started = time.perf_counter()
    model, config, _ = train_segmenter(
        data.load("train"), data.load("val"), arch=arch, preset=training.preset, noise_sigma=noise_sigma,
        epochs=training.epochs, seed=training_seed(data, training), checkpoint=path, device=device,
        precision=training.training_precision,
        patience=training.patience, flips=training.flips,
    )
    mark_complete(path, training_record(started))
    return model, config


def load_cached_segmenter(path: Path, device: str | torch.device) -> tuple[torch.nn.Module, TrainConfig]:
    """A segmenter marked complete: checked against its marker and loaded; any failure raises
    ValueError naming the file, which is kept."""
    check_complete(path)
    try:
        return load_segmenter(path, device=resolve_device(device))
    except Exception as error:
        raise ValueError(f"cached segmenter {path} is marked complete but does not load ({error}); it is kept: "
                         f"remove it and {marker_path(path).name} to train it again") from error


def discard_unreadable_checkpoint(path: Path) -> None:
    """Delete a checkpoint without completion marker that does not load (provably incomplete, e.g.
    emptied by a power loss); one that loads is left for training to resume."""
    if not path.is_file():
        return
    try:
        load_weights(path, map_location="cpu")  # data only, nothing in the file runs
    except Exception as error:
        warnings.warn(f"unreadable segmenter checkpoint {path} without completion marker ({error}); "
                      f"training it again", stacklevel=3)
        path.unlink()


def is_volume_data(data: DataSpec) -> bool:
    """Whether ``data`` gives volumes (C, D, H, W): any dataset that is not one of the 2D ones."""
    return data.dataset not in IMAGE_DATASET_NAMES


def ddpm_folder(cache: Path, data: DataSpec, training: TrainingSpec) -> Path:
    """Where ``ddpm:auto`` is cached: ``ddpm_<data>_...`` for images, ``ddpm3d_<data>_...`` for volumes (a 3D
    network at the volumes' own size; ``ddpm_image_size`` is refused for them, see :func:`ddpm_image_size`)."""
    volumes = is_volume_data(data)
    if volumes:
        ddpm_image_size(data, training)  # refuses a resolution for volumes before anything is named
    steps = training.ddpm_steps if training.ddpm_steps is not None else "default"
    recipe = ""  # named only when not the default, so existing caches stay valid
    if training.ddpm_ema_decay is not None:
        recipe += f"_ema{training.ddpm_ema_decay:g}"
    if training.ddpm_focus_share > 0 and training.ddpm_focus_sigmas:
        recipe += f"_focus{training.ddpm_focus_share:g}-" + "-".join(f"{s:g}" for s in training.ddpm_focus_sigmas)
    if training.ddpm_image_size is not None:
        recipe += f"_at{training.ddpm_image_size}"
    recipe += precision_tag(training)
    kind = "ddpm3d" if volumes else "ddpm"
    return (Path(cache) / "denoisers" / f"{kind}_{data.tag}_{training.ddpm_preset}_s{steps}"
            f"_max{training.ddpm_max_sigma}{recipe}_seed{training_seed(data, training)}{data.data_tag('train')}")


def ddpm_image_size(data: DataSpec, training: TrainingSpec) -> tuple[int, int] | None:
    """The in-project DDPM's (H, W): its height is the profile's ``ddpm_image_size``, else the input's
    height up to 256; its width keeps the input's aspect (a 144 x 192 input at 72: 72 x 96).

    None for volumes: the 3D DDPM works at the volumes' own size (padded inside the network and cropped
    back), so nothing resizes them or their noise; a ``ddpm_image_size`` for volumes is a ValueError."""
    if is_volume_data(data):
        if training.ddpm_image_size is not None:
            raise ValueError(f"ddpm_image_size = {training.ddpm_image_size} resizes images to the DDPM's resolution; "
                             f"{data.dataset} gives volumes, which the 3D DDPM denoises at their own size (padded "
                             "inside the network, cropped back): leave ddpm_image_size null")
        return None
    height, width = as_size(data.image_size)
    model_height = training.ddpm_image_size or min(height, 256)
    return model_height, max(1, round(model_height * width / height))


def ddpm_focus_sigmas(data: DataSpec, training: TrainingSpec) -> tuple[float, ...]:
    """The study's focus sigmas in the DDPM's own noise scale: shrinking the input to the model's
    resolution (a box average by integer factors) lowers the noise std the model sees."""
    model = ddpm_image_size(data, training)
    if model is None:  # volumes: the noise reaches the 3D DDPM as it is
        return tuple(float(sigma) for sigma in training.ddpm_focus_sigmas)
    size = as_size(data.image_size)
    factor = resize_noise_factor(tuple(size), model)
    return tuple(float(sigma) * factor for sigma in training.ddpm_focus_sigmas)


def unet_denoiser_folder(cache: Path, data: DataSpec, training: TrainingSpec, sigma: float) -> Path:
    batch = training.unet_denoiser_batch_size  # named only when not the default, so existing caches stay valid
    batch_tag = "" if batch == UNET_DENOISER_BATCH else f"_b{batch}"
    return (Path(cache) / "denoisers" / f"unet_{data.tag}_sigma{sigma}_s{training.unet_denoiser_steps}{batch_tag}"
            f"{precision_tag(training)}_seed{training_seed(data, training)}{data.data_tag('train')}")


def resolve_denoiser_spec(spec: str, sigma: float, cache: Path, data: DataSpec, training: TrainingSpec,
                          device: str | torch.device = "auto") -> str:
    """Turn ``ddpm:auto`` / ``unet:auto`` into the cached folder, training it first if needed.

    Other specs pass through; a ``{sigma}`` in a path is filled in (one UNet denoiser per sigma).
    A cached folder counts when marked complete (checked against its marker); without its marker
    it is trained again (resumed), a finished-looking one that does not load deleted first.
    """
    kind, _, location = spec.partition(":")
    if location != AUTO:
        return filled_spec(spec, sigma)
    folder = cached_denoiser_folder(kind, sigma, cache, data, training)
    with model_lock(cache, folder, f"denoiser {folder.name}"):  # trained once, however many processes ask
        if marker_path(folder).is_file():  # complete: nothing to load the data for
            check_complete(folder)
            return f"{kind}:{folder}"
        discard_unloadable_denoiser(kind, folder, sigma)
        announce_training(f"{kind} denoiser", folder)
        started = time.perf_counter()
        train_set = data.load("train")
        if kind == "ddpm":
            train_ddpm(train_set, folder, preset=training.ddpm_preset, steps=training.ddpm_steps,
                       image_size=ddpm_image_size(data, training), max_sigma=training.ddpm_max_sigma,
                       seed=training_seed(data, training), device=device, ema_decay=training.ddpm_ema_decay,
                       focus_sigmas=ddpm_focus_sigmas(data, training), focus_share=training.ddpm_focus_share,
                       precision=training.training_precision)
        else:
            train_unet_denoiser(train_set, sigma, folder, steps=training.unet_denoiser_steps,
                                batch_size=training.unet_denoiser_batch_size, seed=training_seed(data, training),
                                device=device,
                                precision=training.training_precision)
        mark_complete(folder, training_record(started))
    return f"{kind}:{folder}"


def filled_spec(spec: str, sigma: float) -> str:
    """``spec`` with a ``{sigma}`` in its path filled in."""
    return spec.replace("{sigma}", f"{sigma:g}")


def cached_denoiser_folder(kind: str, sigma: float, cache: Path, data: DataSpec, training: TrainingSpec) -> Path:
    """Where ``<kind>:auto`` is cached (ddpm or unet; ValueError otherwise)."""
    if kind == "ddpm":
        return ddpm_folder(cache, data, training)
    if kind == "unet":
        return unet_denoiser_folder(cache, data, training, sigma)
    raise ValueError(f"only ddpm:auto and unet:auto can be trained in the project, not {kind}:{AUTO}")


def discard_unloadable_denoiser(kind: str, folder: Path, sigma: float) -> None:
    """Delete a denoiser folder without completion marker that looks finished but does not load
    (provably incomplete); an unfinished one is left for its trainer to resume."""
    if not (folder / FINISHED[kind]).is_file():
        return
    try:
        load_denoiser(f"{kind}:{folder}", sigma)
    except Exception as error:
        warnings.warn(f"unloadable denoiser {folder} without completion marker ({error}); training it again",
                      stacklevel=3)
        shutil.rmtree(folder)


def denoiser_weights_digest(spec: str, sigma: float) -> str | None:
    """Digest of the weight files a denoiser spec given by path loads (``ddpm:<folder>``: its unet/ and
    scheduler/; ``unet:<folder>``: unet_denoiser.pt; a file spec: the file); None for ``none`` and
    ``<kind>:auto``, which are keyed by their settings and data. FileNotFoundError naming a missing path."""
    if spec == "none" or spec.partition(":")[2] == AUTO:
        return None
    kind, path = parse_spec(filled_spec(spec, sigma))
    if not path.exists():
        raise FileNotFoundError(f"denoiser {spec!r}: {path} does not exist")
    if path.is_file() or kind not in LOADED_FILES:
        return weights_digest(path)
    return _parts_digest(path, LOADED_FILES[kind])


def _parts_digest(folder: Path, parts: tuple[str, ...]) -> str:
    """Digest of the named files / subfolders of ``folder`` (a missing one counts as absent)."""
    digests = {part: weights_digest(folder / part) for part in parts if (folder / part).exists()}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


def denoiser(spec: str, sigma: float, cache: Path, data: DataSpec, training: TrainingSpec, *,
             steps: str | int = "single", generator: torch.Generator | None = None,
             device: str | torch.device = "auto", flags: str = "") -> torch.nn.Module | None:
    """The denoiser of ``spec`` for ``sigma`` (None for "none"); diffusion ones use ``steps`` calls.

    ``flags``: a guided-diffusion checkpoint's MODEL_FLAGS string (a chapter's ``denoiser_flags``;
    "" for 256x256_diffusion_uncond.pt); other kinds of denoiser ignore it.
    """
    resolved = resolve_denoiser_spec(spec, sigma, cache, data, training, device)
    try:
        return load_denoiser(resolved, sigma, steps=steps, generator=generator,  # options only reach diffusion ones
                             flags=flags or None)
    except Exception as error:
        if spec.partition(":")[2] != AUTO:
            raise
        raise ValueError(f"cached denoiser {resolved.partition(':')[2]} is marked complete but does not load "
                         f"({error}); it is kept: remove it and its .complete marker to train it again") from error
