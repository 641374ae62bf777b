"""One certification run: a trained segmenter, a method (training noise + denoiser), one sigma,
certified on the first test images; computed once, then read back from the results store.

A ``Method`` is what the paper compares: SegCertify (a segmenter trained with sigma = 0.25 noise,
no denoiser), ours (a segmenter trained without noise behind a denoiser), or a plain model.
sigma = 0 means no certificate: the plain prediction on the clean image (the paper's sigma 0 rows).

A smoothed run also certifies the same counts at every tau of ``curve_taus`` (each its own Holm
family at level alpha, no extra draws): its curve rows give certified Dice against the radius
R = sigma Phi^-1(tau), one row per image x class x tau.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import medcert_core
from medcert_core import distributed
from medcert_core.certify import (
    TAU_GRID,
    Certificate,
    certified_radius,
    certify_counts_over_taus,
    smallest_certifiable_n,
    warn_if_n_too_small,
)
from medcert_core.devices import AUTO, check_precision, resolve_device
from medcert_core.distributed import Shard
from medcert_core.metrics import MetricAccumulator
from medcert_core.smoothing import (
    Execution,
    SmoothedSegmenter,
    image_seed,
    segmenters_counts,
)
from medcert_core.study.runs import assets, store
from medcert_core.training import TrainConfig, predict_batch
from medcert_core.study.settings import DEFAULTS, DataSpec, TrainingSpec

DEVICE_NOTE = ("the noise comes from torch generators on this device, one per image seeded from (seed, image id); "
               "CPU and CUDA generators give different noise, so the same run on another device gives "
               "other (equally valid) numbers")
MAP_IMAGES = 2  # test images whose label maps are kept for the abstention figures


@dataclass(frozen=True)
class Method:
    """How the base classifier f(D(x + delta)) is built. steps: DDPM calls ("single" or an int).

    note: words for the label only (e.g. "trained on jsrt" for a DDPM of another dataset); not part
    of what a run computes, so not hashed (:meth:`CertificationRun.parameters` drops it).
    """

    name: str
    train_noise: float = 0.0
    denoiser: str = "none"
    steps: str | int = "single"
    note: str = dataclasses.field(default="", compare=False)

    @property
    def label(self) -> str:
        if self.name == "segcertify":
            return "SegCertify"
        kind = self.denoiser.partition(":")[0]
        if kind == "none":
            return f"{self.name} (no denoiser)" if self.name != "plain" else f"plain (noise {self.train_noise:g})"
        steps = "single-step" if self.steps == "single" else f"{self.steps}-step"
        words = [kind, *([self.note] if self.note else []), *([steps] if kind in ("ddpm", "guided-diffusion") else [])]
        return f"{self.name} ({', '.join(words)})"


def ours(denoiser: str, steps: str | int = "single", note: str = "") -> Method:
    """The paper's method: a segmenter trained without noise behind a denoiser (``note``: for the label)."""
    return Method("ours", 0.0, denoiser, steps, note)


def segcertify(train_noise: float = 0.25) -> Method:
    """SegCertify (Fischer et al. 2021): a segmenter trained with Gaussian noise, no denoiser."""
    return Method("segcertify", train_noise, "none")


def plain(train_noise: float = 0.0) -> Method:
    """No smoothing: the segmenter on the clean image (use with sigma = 0)."""
    return Method("plain", train_noise, "none")


@dataclass(frozen=True)
class CertificationRun:
    """Everything that defines one run's numbers, hashed (:meth:`key`) with medcert_core's source digest,
    a digest of the data it reads (train and val through its models, test: each split's case ids and
    file bytes) and digests of the weight files it loads by path (a ``ddpm:<folder>``,
    ``guided-diffusion:<file.pt>`` or ``unet:<folder>`` denoiser); ``<kind>:auto`` models are keyed
    by their settings and the data they are trained on.

    Not hashed: the data root (where the data lies), how the base model is executed (batch size,
    channels_last, torch.compile: the draws are batch-size invariant, multi-step denoising
    included) and the device. The device does change the noise, since CPU and CUDA generators
    differ: it is recorded in the run's metadata, with a note, as is the execution. The precision
    changes the base model f(D(.)) itself: it is hashed, resolved (``auto`` is resolved for the device
    before a run is made, so an ``auto`` run and one that names its resolved precision share a key).
    """

    data: DataSpec
    training: TrainingSpec
    arch: str
    method: Method
    sigma: float
    n0: int = DEFAULTS["n0"]
    n: int = DEFAULTS["n"]
    alpha: float = DEFAULTS["alpha"]
    tau: float = DEFAULTS["tau"]
    test_images: int | None = None
    precision: str = DEFAULTS["precision"]
    denoiser_flags: str = DEFAULTS["denoiser_flags"]

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if AUTO in (self.precision, self.training.training_precision):
            raise ValueError("a run's precision and training_precision are what the networks run at (fp32, bf16 or "
                             "fp16): resolve 'auto' for the device first (medcert_core.devices.resolve_precision, "
                             "as Experiment does), so that the key and the cached models' names say it")

    def parameters(self) -> dict[str, Any]:
        parameters = dataclasses.asdict(self)
        parameters["data"].pop("data_root")
        if not parameters["data"]["split_block"]:  # named only when not the default, so existing keys stay valid
            parameters["data"].pop("split_block")
        unnamed = {"training_precision": ("fp32",), "patience": (None,), "flips": (False,),
                   "training_seed": (None, self.data.seed)}  # likewise; the split's seed trains the same models
        for name, defaults in unnamed.items():
            if parameters["training"][name] in defaults:
                parameters["training"].pop(name)
        parameters["method"].pop("note")
        return parameters

    def data_digests(self) -> dict[str, str]:
        """sha256 of each split the run reads (train and val train its segmenter, test is certified)."""
        return {split: self.data.digest(split) for split in ("train", "val", "test")}

    def weight_digests(self) -> dict[str, str]:
        """Digests of the weight files loaded by path: {"denoiser": ...} for a denoiser given by path."""
        digest = assets.denoiser_weights_digest(self.method.denoiser, self.sigma) if self.sigma > 0 else None
        return {"denoiser": digest} if digest else {}

    def key(self) -> dict[str, Any]:
        """What the run's hash covers: parameters, NUMBERS_VERSION, data digests, weight digests.

        Reads the data's files (cached per file in the process) and the weight files given by path.
        """
        return {**self.parameters(), "numbers_version": medcert_core.NUMBERS_VERSION, "data_digest": self.data_digests(),
                "weight_digests": self.weight_digests()}

    @property
    def hash(self) -> str:
        return store.parameter_hash(self.key())


def _tidy_columns(run: CertificationRun) -> dict[str, Any]:
    return {
        "sigma": run.sigma, "radius": certified_radius(run.sigma, run.tau), "n0": run.n0 if run.sigma else 0,
        "n": run.n if run.sigma else 0, "alpha": run.alpha, "tau": run.tau, "method": run.method.name,
        "method_label": run.method.label, "denoiser": run.method.denoiser, "steps": str(run.method.steps),
        "train_noise": run.method.train_noise, "arch": run.arch, "dataset": run.data.dataset,
        "image_size": run.data.image_size, "seed": run.data.seed, "precision": run.precision,
    }


def smoothed_segmenter(run: CertificationRun, cache: Path, device: torch.device,
                       execution: Execution = Execution()) -> tuple[SmoothedSegmenter, TrainConfig]:
    """The run's f(D(.)) smoothed at its sigma (> 0), with the segmenter's config."""
    model, config = assets.segmenter(cache, run.data, run.training, run.arch, run.method.train_noise, device)
    denoiser = assets.denoiser(run.method.denoiser, run.sigma, cache, run.data, run.training,
                               steps=run.method.steps, device=device,  # multi-step noise: per draw, from the smoother
                               flags=run.denoiser_flags)
    smoothed = SmoothedSegmenter(model, config.num_classes, run.sigma, denoiser=denoiser, device=device,
                                 precision=run.precision, **execution.options())
    return smoothed, config


def compute(run: CertificationRun, cache: Path, *, device: str | torch.device = "auto",
            execution: Execution = Execution(), progress: bool = True,
            shard: Shard = Shard()) -> RunOutput:
    """Certify the run's test images: tidy rows, label maps of the first MAP_IMAGES, curve rows.

    ``shard``: only this process's images (``shard.indices``), for :func:`assemble` to merge.
    """
    return assemble([certify_images(run, cache, device=device, execution=execution, progress=progress, shard=shard)])


@dataclass
class ShardResult:
    """What one process computed of a run: rows and maps per test image index (picklable, to gather)."""

    rows: dict[int, list[dict[str, Any]]]
    maps: dict[int, dict[str, np.ndarray]]
    class_names: list[str]
    curves: dict[int, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)


@dataclass
class RunOutput:
    """A computed run: tidy rows (image x class), label maps of the first images, curve rows
    (image x class x tau; empty for sigma = 0)."""

    rows: pd.DataFrame
    maps: dict[str, np.ndarray]
    curves: pd.DataFrame


def curve_taus(tau: float) -> tuple[float, ...]:
    """The tau grid of a run's radius curve: ``TAU_GRID`` and the run's own tau, ascending."""
    return tuple(sorted({*TAU_GRID, float(tau)}))


def curve_rows(certificates: list[Certificate], taus: tuple[float, ...], target: torch.Tensor, image_id: str,
               class_names: list[str], columns: dict[str, Any], valid: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """One row per class x tau of one image: its certified scores at tau (over its ``valid`` pixels when
    given), with tau, its radius and ``reachable``: whether n draws can certify any pixel at that tau (if
    not, every pixel abstains by construction and the row says nothing about the model)."""
    accumulator = MetricAccumulator(class_names)
    for certificate, tau in zip(certificates, taus):
        reachable = certificate.n >= smallest_certifiable_n(certificate.labels.numel(), tau, certificate.alpha,
                                                            certificate.correction)
        accumulator.add(certificate.labels.cpu(), target, image_id=image_id, valid=valid,
                        **{**columns, "tau": tau, "radius": certified_radius(columns["sigma"], tau),
                           "reachable": reachable})
    return accumulator.rows


def certify_images(run: CertificationRun, cache: Path, *, device: str | torch.device = "auto",
                   execution: Execution = Execution(), progress: bool = True, shard: Shard = Shard()) -> ShardResult:
    """Certify the run's test images of ``shard`` (all of them by default), each with the noise of its
    own generator, seeded from (run seed, image id): the numbers do not depend on the sharding."""
    device = resolve_device(device)
    smoothed = None
    if run.sigma > 0:
        smoothed, config = smoothed_segmenter(run, cache, device, execution)
    else:
        model, config = assets.segmenter(cache, run.data, run.training, run.arch, run.method.train_noise, device)
    test_set = run.data.load("test")
    result = ShardResult({}, {}, list(config.class_names))
    description = f"{run.method.label} {run.arch} sigma={run.sigma:g}"
    for index in tqdm(shard.indices(test_count(run, test_set)), desc=description, disable=not progress, leave=False):
        image, target = test_set[index]
        start = time.perf_counter()
        if smoothed is None:
            labels, certificates = predict_batch(model, image[None].to(device))[0].cpu(), None
        else:
            labels, certificates = certify_image(run, smoothed, image, test_set.ids[index], config.num_classes)
        record_image(result, run, index, test_set, labels, certificates, time.perf_counter() - start)
    return result


def certify_image(run: CertificationRun, smoothed: SmoothedSegmenter, image: torch.Tensor, image_id: Any,
                  num_classes: int) -> tuple[torch.Tensor, list[Certificate]]:
    """One test image's certified labels and curve certificates, from the noise of its own generator
    (seeded from the run's seed and ``image_id``, on the smoother's device)."""
    generator = torch.Generator(device=smoothed.device).manual_seed(image_seed(run.data.seed, image_id))
    return certified_labels(run, *smoothed.counts(image, run.n0, run.n, generator=generator), num_classes)


def test_count(run: CertificationRun, test_set) -> int:
    """How many test images the run certifies: ``test_images`` or the whole split."""
    return len(test_set) if not run.test_images else min(run.test_images, len(test_set))


def certified_labels(run: CertificationRun, selected: torch.Tensor, counts: torch.Tensor,
                     num_classes: int) -> tuple[torch.Tensor, list[Certificate]]:
    """The run's label map (H, W) at its tau, and the same counts certified at every tau of its curve."""
    warn_if_n_too_small(selected.numel(), run.n, run.tau, run.alpha, "holm", stacklevel=3)
    taus = curve_taus(run.tau)
    certificates = certify_counts_over_taus(selected, counts, run.n, sigma=run.sigma, taus=taus, alpha=run.alpha,
                                            n0=run.n0, num_classes=num_classes)
    return certificates[taus.index(run.tau)].labels.cpu(), certificates


def scored_pixels(test_set, index: int) -> torch.Tensor | None:
    """The item's own pixels (voxels) when the dataset pads its items (a volume dataset's ``real_voxels``),
    else None: every pixel is scored."""
    real = getattr(test_set, "real_voxels", None)
    return real(index) if real is not None else None


def record_image(result: ShardResult, run: CertificationRun, index: int, test_set, labels: torch.Tensor,
                 certificates: list[Certificate] | None, seconds: float) -> None:
    """Add one test image's tidy rows, curve rows (smoothed runs) and, for the first images, maps; scored
    on its own pixels only (:func:`scored_pixels`: padding never counts)."""
    image, target = test_set[index]
    columns, image_id, valid = _tidy_columns(run), str(test_set.ids[index]), scored_pixels(test_set, index)
    if certificates is not None:
        result.curves[index] = curve_rows(certificates, curve_taus(run.tau), target, image_id, result.class_names,
                                          columns, valid)
    accumulator = MetricAccumulator(result.class_names)
    accumulator.add(labels, target, image_id=image_id, valid=valid, seconds=seconds, **columns)
    result.rows[index] = accumulator.rows
    if index < MAP_IMAGES:
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(index))
        result.maps[index] = {"image": image.numpy(), "noisy": (image + run.sigma * noise).numpy(),
                              "target": target.numpy(), "labels": labels.numpy()}


def draws_group(run: CertificationRun) -> str:
    """Runs with the same group certify each test image from the same noisy and denoised draws: all but
    the architecture agree (data, method, sigma > 0, n0, n, ...); "" for a run that shares nothing (sigma 0)."""
    if run.sigma <= 0:
        return ""
    parameters = run.parameters()
    parameters.pop("arch")
    return json.dumps({**parameters, "data_root": str(run.data.data_root)}, sort_keys=True, default=str)


def certify_images_together(runs: list[CertificationRun], cache: Path, *, device: str | torch.device = "auto",
                            execution: Execution = Execution(), progress: bool = True) -> list[ShardResult]:
    """:func:`certify_images` of runs of one :func:`draws_group` (one per architecture), each image's draws
    made and denoised once for all of them (``segmenters_counts``): each run's numbers are those it gets
    alone. An image's seconds are the shared time divided by the number of runs."""
    device, first = resolve_device(device), runs[0]
    segmenters, configs = {}, {}
    for run in runs:
        segmenters[run.arch], configs[run.arch] = assets.segmenter(cache, run.data, run.training, run.arch,
                                                                   run.method.train_noise, device)
    names = {tuple(config.class_names) for config in configs.values()}
    if len(names) != 1:
        raise ValueError(f"runs sharing draws must segment the same classes, got {sorted(names)}")
    denoiser = assets.denoiser(first.method.denoiser, first.sigma, cache, first.data, first.training,
                               steps=first.method.steps, device=device, flags=first.denoiser_flags)
    test_set = first.data.load("test")
    num_classes = len(next(iter(names)))
    results = [ShardResult({}, {}, list(next(iter(names)))) for _ in runs]
    description = f"{first.method.label} {'+'.join(segmenters)} sigma={first.sigma:g}"
    for index in tqdm(range(test_count(first, test_set)), desc=description, disable=not progress, leave=False):
        image, _ = test_set[index]
        start = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(image_seed(first.data.seed, test_set.ids[index]))
        counts = segmenters_counts(segmenters, image, first.n0, first.n, num_classes=num_classes, sigma=first.sigma,
                                   denoiser=denoiser, generator=generator, batch_size=execution.batch_size,
                                   device=device, precision=first.precision, channels_last=execution.channels_last)
        labelled = {arch: certified_labels(first, *counts[arch], num_classes) for arch in segmenters}
        seconds = (time.perf_counter() - start) / len(runs)
        for run, result in zip(runs, results):
            record_image(result, run, index, test_set, *labelled[run.arch], seconds)
    return results


def _in_image_order(per_image: dict[int, list[dict[str, Any]]]) -> pd.DataFrame:
    return pd.DataFrame([row for index in sorted(per_image) for row in per_image[index]])


def assemble(parts: list[ShardResult]) -> RunOutput:
    """The shards of one run merged in test image order, as one process gives them."""
    rows = {index: image_rows for part in parts for index, image_rows in part.rows.items()}
    curves = {index: image_rows for part in parts for index, image_rows in part.curves.items()}
    maps = {index: image_maps for part in parts for index, image_maps in part.maps.items()}
    stacked = {key: np.stack([maps[index][key] for index in sorted(maps)])
               for key in ("image", "noisy", "target", "labels")}
    stacked["class_names"] = np.array(parts[0].class_names)
    return RunOutput(_in_image_order(rows), stacked, _in_image_order(curves))


def _save(run: CertificationRun, key: dict[str, Any], results_dir: str | Path, output: RunOutput, *,
          device: str | torch.device, execution: Execution, seconds: float, **extra: Any) -> None:
    """Store the run under the hash of ``key`` (its :meth:`CertificationRun.key`, computed once), recording
    the key's digests in its metadata."""
    store.save_run(results_dir, store.parameter_hash(key), output.rows, output.maps, run.parameters(),
                   curves=output.curves,
                   device=str(resolve_device(device)),
                   device_note=DEVICE_NOTE, numbers_version=key["numbers_version"], data_digest=key["data_digest"],
                   weight_digests=key["weight_digests"], execution=execution.options(),
                   seconds=seconds, data_root=run.data.data_root, **extra)


def run_certification(run: CertificationRun, *, results_dir: str | Path, cache: str | Path,
                      device: str | torch.device = "auto", execution: Execution = Execution(),
                      progress: bool = True) -> pd.DataFrame:
    """The run's tidy rows: read from the store when complete, else computed and stored.

    Computed under the run's lock (``store.run_lock``): another process needing the same run waits,
    then reads it. Under torchrun (``medcert_core.distributed.init()`` called), the test images are
    sharded over the ranks and rank 0 writes the run (see :func:`run_sharded`).
    """
    shard = distributed.current()
    if shard is not None:
        return run_sharded(run, shard, results_dir=results_dir, cache=cache, device=device, execution=execution,
                           progress=progress)
    key = run.key()  # once: it reads the data's and weights' digests
    run_hash = store.parameter_hash(key)
    if store.is_complete(results_dir, run_hash):
        return store.load_rows(results_dir, run_hash)
    with store.run_lock(results_dir, run_hash):
        if store.is_complete(results_dir, run_hash):  # computed by another process while this one waited
            return store.load_rows(results_dir, run_hash)
        start = time.perf_counter()
        output = compute(run, Path(cache), device=device, execution=execution, progress=progress)
        if store.is_complete(results_dir, run_hash):  # another process finished it meanwhile: keep its record
            return store.load_rows(results_dir, run_hash)
        _save(run, key, results_dir, output, device=device, execution=execution, seconds=time.perf_counter() - start)
    return output.rows


def run_sharded(run: CertificationRun, shard: Shard, *, results_dir: str | Path, cache: str | Path,
                device: str | torch.device = "auto", execution: Execution = Execution(),
                progress: bool = True) -> pd.DataFrame:
    """One run over the ranks of a process group: each certifies its shard of the test images, rank 0
    gathers, merges them in image order (the rows one process would give) and writes the run; every
    rank returns the stored rows once rank 0 is done. Rank 0 decides whether the run is complete
    already, so all ranks take the same path."""
    key = distributed.from_first(run.key() if shard.first else None)  # rank 0's key, for all ranks
    run_hash = store.parameter_hash(key)
    if distributed.from_first(store.is_complete(results_dir, run_hash) if shard.first else None):
        return store.load_rows(results_dir, run_hash)
    start = time.perf_counter()
    part = certify_images(run, Path(cache), device=device, execution=execution, progress=progress and shard.first,
                          shard=shard)
    parts = distributed.gather_to_first(part)
    if shard.first:
        output = assemble(parts)
        with store.run_lock(results_dir, run_hash):
            if not store.is_complete(results_dir, run_hash):  # another process may have finished it meanwhile
                _save(run, key, results_dir, output, device=device, execution=execution,
                      seconds=time.perf_counter() - start, processes=shard.world_size)
    distributed.barrier()
    return store.load_rows(results_dir, run_hash)


def certify_shared_groups(runs: list[CertificationRun], *, results_dir: str | Path, cache: str | Path,
                          device: str | torch.device = "auto", execution: Execution = Execution(),
                          progress: bool = True) -> list[str]:
    """Compute and store, from one set of draws per image, every group of two or more missing runs that
    differ only in their architecture (:func:`draws_group`); returns the hashes computed. Skipped under
    torchrun and with torch.compile (those runs are computed one by one)."""
    if distributed.current() is not None or execution.compile:
        return []
    groups: dict[str, list[tuple[CertificationRun, dict[str, Any]]]] = {}
    for run in runs:
        if draws_group(run):
            key = run.key()
            if not store.is_complete(results_dir, store.parameter_hash(key)):
                groups.setdefault(draws_group(run), []).append((run, key))
    computed = []
    for keyed in (keyed for keyed in groups.values() if len(keyed) > 1):
        group, keys = [run for run, _ in keyed], [key for _, key in keyed]
        hashes = [store.parameter_hash(key) for key in keys]
        with contextlib.ExitStack() as locks:
            for run_hash in sorted(hashes):  # one order for every process: no deadlock
                locks.enter_context(store.run_lock(results_dir, run_hash))
            if any(store.is_complete(results_dir, run_hash) for run_hash in hashes):
                continue  # another process is on (part of) it: the runs are computed one by one
            start = time.perf_counter()
            parts = certify_images_together(group, Path(cache), device=device, execution=execution, progress=progress)
            seconds = (time.perf_counter() - start) / len(group)
            for run, key, part, run_hash in zip(group, keys, parts, hashes):
                _save(run, key, results_dir, assemble([part]), device=device, execution=execution,
                      seconds=seconds, shared_draws_with=[other for other in hashes if other != run_hash])
                computed.append(run_hash)
    return computed


def run_all(runs: list[CertificationRun], **options: Any) -> pd.DataFrame:
    """Tidy rows of every run (each computed or read back), one progress bar over the runs. Missing runs
    that differ only in their architecture are certified together first (:func:`certify_shared_groups`)."""
    certify_shared_groups(runs, **options)
    frames = []
    bar = tqdm(runs, desc="certification runs", disable=not options.get("progress", True))
    for run in bar:
        bar.set_postfix_str(f"{run.method.label} {run.arch} sigma={run.sigma:g}")
        frames.append(run_certification(run, **options).assign(run=run.hash, method_label=run.method.label))
    return pd.concat(frames, ignore_index=True)
