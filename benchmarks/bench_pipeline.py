"""Benchmark: certifying whole images with medcert against the paper code's approach, same machine, one run.

(a) The reference (``benchmarks/paper_reference.py``): the denoiser and the segmenter called on one
    noisy draw at a time in fp32 (n0 + n draws), then a Python loop of one scipy ``binomtest`` per
    pixel and statsmodels' Holm. The loop is timed on a subset of pixels and extrapolated to H * W;
    the batch-1 sampling may be timed on a subset of draws (``--reference-draws``) and
    extrapolated. The JSON says which.
(b) ``SmoothedSegmenter.certify`` at each precision / channels_last / compile setting (``--settings``).

Configurations (``--config``):
    paper  the ADM-256 layout built by medcert's guided-diffusion converter (552 M parameters,
           random weights) over the linear 1000-step schedule, smp UNet-resnet34 at 512 px,
           3 channels, 4 classes, n0 = 10, n = 100, sigma 0.5. ``--small`` shrinks it for a CPU:
           64 px input, the same layout as a 32 px diffusion model of width 32, n = 60.
    quick  the quick profile's models at 64 px: the tiny in-project DDPM and the tiny UNet,
           loaded from the model cache (~/.cache/medcert) when there (else the same architectures with random weights).

Per image (median of ``--images`` images after one warm-up image): seconds, the split between
denoiser / segmenter / statistics (a separate instrumented pass that synchronises around each
call), achieved TFLOP/s (FLOPs of one denoiser + segmenter forward counted with
``torch.utils.flop_counter``), peak memory, the ratio to the reference, and the issue's target.

    python benchmarks/bench_pipeline.py --config quick                   # CPU, ~1-2 minutes
    python benchmarks/bench_pipeline.py --config paper --small           # CPU, smallest paper form
    python benchmarks/bench_pipeline.py --config paper --device cuda \\
        --settings fp32,bf16,bf16+cl,bf16+cl+compile                      # the issue's GPU run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import resource
import statistics as stats
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # paper_reference, when run as a script
from paper_reference import (  # noqa: E402
    ABSTAIN,
    per_pixel_statistics,
    pixel_subset,
    reference_certify,
    sample_one_at_a_time,
    synchronize,
)

from medcert_core.devices import cpu_model_name, git_commit, load_average  # noqa: E402
from medcert_core.io import user_cache_dir, write_json_atomically  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROJECT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_SETTINGS = {"cpu": "fp32,bf16", "cuda": "fp32,bf16,bf16+cl,bf16+cl+compile"}
TARGETS = {  # issue 10
    ("paper", "cuda"): {"seconds_per_image_max": 0.45, "speedup_min": 70.0, "statistics_seconds_max": 0.010},
    ("quick", "cpu"): {"speedup_min": 10.0},
}


# ----------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class Setting:
    name: str
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def kwargs(self) -> dict[str, Any]:
        return {"precision": self.precision, "channels_last": self.channels_last, "compile": self.compile}


def parse_setting(text: str) -> Setting:
    """'bf16+cl+compile' -> Setting(precision='bf16', channels_last=True, compile=True)."""
    parts = [part.strip().lower() for part in text.split("+") if part.strip()]
    precision, channels_last, compiled = "fp32", False, False
    for part in parts:
        if part in PRECISIONS:
            precision = part
        elif part in ("cl", "channels_last"):
            channels_last = True
        elif part == "compile":
            compiled = True
        else:
            raise argparse.ArgumentTypeError(
                f"unknown setting part {part!r} in {text!r}; use a precision ({', '.join(PRECISIONS)}) "
                "joined with +cl (channels_last) and/or +compile, e.g. bf16+cl+compile")
    return Setting(text, precision, channels_last, compiled)


# ----------------------------------------------------------------------------------------------
# models and images


@dataclass
class Workload:
    denoiser: torch.nn.Module | None
    segmenter: torch.nn.Module
    num_classes: int
    images: list[torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def parameter_count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def phantom_images(size: int, count: int) -> list[torch.Tensor]:
    from medcert_core.data import load_dataset

    dataset = load_dataset("phantom", None, "test", image_size=size)
    return [dataset[i % len(dataset)][0] for i in range(count)]


def build_paper(args: argparse.Namespace, device: torch.device) -> Workload:
    from diffusers import UNet2DModel

    from medcert_core.denoisers import DiffusionDenoiser, linear_scheduler
    from medcert_core.denoisers.guided_diffusion import unet_config_from_flags
    from medcert_core.models import create_model

    flags = {} if (args.model_size, args.num_channels, args.num_head_channels, args.channel_mult) == (256, 256, 64, "") else {
        "image_size": args.model_size, "num_channels": args.num_channels, "num_head_channels": args.num_head_channels,
        "channel_mult": args.channel_mult}
    config = unet_config_from_flags(**flags)
    torch.manual_seed(args.seed)
    with torch.device(device):  # random init where the model runs: seconds, not a minute, for 552 M parameters
        unet = UNet2DModel(**config)
        segmenter = create_model("unet", 3, args.num_classes)  # smp Unet, resnet34 encoder, encoder_weights=None
    denoiser = DiffusionDenoiser(unet, linear_scheduler(), args.sigma)
    info = {
        "denoiser": {"kind": "DiffusionDenoiser over diffusers UNet2DModel(**unet_config_from_flags(**flags))",
                     "guided_diffusion_flags": flags or "defaults (256x256_diffusion_uncond)",
                     "weights": "random", "sample_size": args.model_size, "num_channels": args.num_channels,
                     "parameters": parameter_count(unet), "schedule": "linear_scheduler() (1000 steps)"},
        "segmenter": {"kind": "create_model('unet', 3, K): smp.Unet('resnet34', encoder_weights=None)",
                      "weights": "random", "parameters": parameter_count(segmenter)},
        "images": f"phantom test images at {args.image_size} px (3 channels)",
    }
    return Workload(denoiser, segmenter, args.num_classes, phantom_images(args.image_size, args.images + 1), info)


def build_quick(args: argparse.Namespace, device: torch.device) -> Workload:
    from diffusers import UNet2DModel

    from medcert_core.denoisers import DDPM_PRESETS, DiffusionDenoiser, linear_scheduler, load_ddpm
    from medcert_core.models import create_model
    from medcert_core.training import PRESETS, load_segmenter

    from medcert_core.study.runs import assets
    from medcert_core.study.settings import DataSpec, resolved_training, training_spec

    cache, data, training = Path(args.cache), DataSpec("phantom", None, 64), resolved_training(training_spec("quick"), "cpu")
    segmenter_file = assets.segmenter_path(cache, data, training, "unet", 0.0)  # the quick study's cache names
    ddpm_folder = assets.ddpm_folder(cache, data, training)
    use_cache = args.weights in ("auto", "cache")
    info: dict[str, Any] = {}
    segmenter = denoiser = None
    if use_cache and segmenter_file.is_file():
        try:
            segmenter, config = load_segmenter(segmenter_file)
            info["segmenter"] = {"kind": f"{config.arch} {config.preset} {config.model_kwargs}",
                                 "weights": f"trained, {segmenter_file.relative_to(PROJECT) if segmenter_file.is_relative_to(PROJECT) else segmenter_file}"}
        except Exception as error:  # noqa: BLE001 - an unreadable cache entry: fall back to random weights
            print(f"could not load {segmenter_file} ({error}); random weights instead")
    if use_cache and ddpm_folder.is_dir():
        try:
            denoiser = load_ddpm(ddpm_folder, args.sigma)
            info["denoiser"] = {"kind": "DiffusionDenoiser over the tiny in-project DDPM",
                                "weights": f"trained, {ddpm_folder.relative_to(PROJECT) if ddpm_folder.is_relative_to(PROJECT) else ddpm_folder}"}
        except Exception as error:  # noqa: BLE001
            print(f"could not load {ddpm_folder} ({error}); random weights instead")
    if args.weights == "cache" and (segmenter is None or denoiser is None):
        raise SystemExit(f"--weights cache: {segmenter_file} or {ddpm_folder} is missing or unreadable")
    torch.manual_seed(args.seed)
    if segmenter is None:
        segmenter = create_model("unet", 3, args.num_classes, **PRESETS["tiny"]["model_kwargs"]["unet"])
        info["segmenter"] = {"kind": f"unet tiny {PRESETS['tiny']['model_kwargs']['unet']}", "weights": "random"}
    if denoiser is None:
        unet = UNet2DModel(sample_size=args.image_size, in_channels=3, out_channels=3, **DDPM_PRESETS["tiny"]["unet"])
        denoiser = DiffusionDenoiser(unet, linear_scheduler(), args.sigma)
        info["denoiser"] = {"kind": "DiffusionDenoiser over the tiny DDPM architecture (DDPM_PRESETS['tiny'])",
                            "weights": "random"}
    info["denoiser"]["parameters"] = parameter_count(denoiser)
    info["segmenter"]["parameters"] = parameter_count(segmenter)
    info["images"] = f"phantom test images at {args.image_size} px (3 channels)"
    return Workload(denoiser.to(device), segmenter.to(device), args.num_classes,
                    phantom_images(args.image_size, args.images + 1), info)


# ----------------------------------------------------------------------------------------------
# measuring


def count_flops(module: torch.nn.Module, batch: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(batch)
    return int(counter.get_total_flops())


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()


def git_state() -> dict[str, Any]:
    """devices.git_commit in this JSON's older form: the commit and whether tracked files had local changes."""
    commit = git_commit(PROJECT)
    if commit is None:
        return {"commit": None}
    return {"commit": commit.removesuffix("-dirty"), "uncommitted_changes": commit.endswith("-dirty")}


def labels_numpy(labels: Any) -> np.ndarray:
    return labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)


class Timed:
    """Stands in for a module inside SmoothedSegmenter: synchronises and times every call."""

    def __init__(self, module: Any, name: str, totals: dict[str, float], calls: dict[str, int],
                 device: torch.device) -> None:
        self.__dict__.update(module=module, name=name, totals=totals, calls=calls, device=device)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        synchronize(self.device)
        start = time.perf_counter()
        result = self.module(*args, **kwargs)
        synchronize(self.device)
        self.totals[self.name] += time.perf_counter() - start
        self.calls[self.name] += 1
        return result

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.__dict__["module"], attribute)


def instrumented_split(smoothed: Any, certify_once: Callable[[], float], device: torch.device,
                       compiled: bool) -> dict[str, Any]:
    """One certification with the networks and ``certify_counts`` timed call by call (synchronised).

    Eager: the denoiser and the segmenter are wrapped where SmoothedSegmenter looks them up. Compiled:
    f(D(.)) is one graph, and swapping its modules would recompile it, so the compiled callable
    (``SmoothedSegmenter._forward``) is timed as a whole ("networks").
    """
    import medcert_core.smoothing as smoothing_module

    totals = {"denoiser": 0.0, "segmenter": 0.0, "networks": 0.0, "statistics": 0.0}
    calls = dict.fromkeys(totals, 0)
    wrapped = {}  # (owner, attribute, name) -> original
    if compiled:
        wrapped[(smoothed, "_forward", "networks")] = smoothed._forward
    else:
        wrapped[(smoothed, "segmenter", "segmenter")] = smoothed.segmenter
        if smoothed.denoiser is not None:
            wrapped[(smoothed, "denoiser", "denoiser")] = smoothed.denoiser
    wrapped[(smoothing_module, "certify_counts", "statistics")] = smoothing_module.certify_counts
    try:
        for (owner, attribute, name), original in wrapped.items():
            setattr(owner, attribute, Timed(original, name, totals, calls, device))
        seconds = certify_once()
    finally:
        for (owner, attribute, _), original in wrapped.items():
            setattr(owner, attribute, original)
    split: dict[str, Any] = {"instrumented_total_seconds": seconds}
    for name in totals:
        if calls[name]:
            split[f"{name}_seconds"] = totals[name]
    split["rest_seconds"] = seconds - sum(totals.values())
    split["rest_is"] = "noise drawing, counting, host transfers, Python"
    split["calls"] = {name: count for name, count in calls.items() if count}
    if compiled:
        split["note"] = ("compiled: denoiser and segmenter run as one graph, timed together as networks_seconds; "
                         "see the eager setting of the same precision for their split")
    return split


def restore_modules(workload: Workload) -> list[str]:
    """Undo in-place changes a setting may make (weights cast, channels_last), so settings stay independent."""
    changed = []
    for name, module in (("segmenter", workload.segmenter), ("denoiser", workload.denoiser)):
        if module is None:
            continue
        dtypes = {p.dtype for p in module.parameters()}
        if dtypes - {torch.float32}:
            changed.append(f"{name} parameters were {sorted(map(str, dtypes))}: cast back to float32")
            module.float()
        four_d = [p for p in module.parameters() if p.dim() == 4]
        if any(not p.is_contiguous() for p in four_d):
            changed.append(f"{name} was left channels_last: back to contiguous")
            module.to(memory_format=torch.contiguous_format)
        module.eval()
    return changed


# ----------------------------------------------------------------------------------------------
# the reference


def memory_peak(device: torch.device) -> dict[str, int]:
    """Peak GPU memory since the last reset on CUDA, else the process's peak RSS so far."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device))}
    return {"rss_peak_bytes_so_far": rss_peak_bytes()}


def warm_up_reference(args: argparse.Namespace, workload: Workload, device: torch.device) -> None:
    """One untimed batch-1 draw (cuDNN / allocator set-up) and one untimed pass of the statistics on a
    few pixels (scipy / statsmodels first-call costs)."""
    sample_one_at_a_time(workload.denoiser, workload.segmenter, workload.images[0], workload.num_classes,
                         args.sigma, 1, torch.Generator(device=device).manual_seed(12345), device=device)
    warm = np.random.default_rng(0).integers(0, workload.num_classes, (args.n0 + args.n, 4, 4))
    per_pixel_statistics(warm, args.n0, workload.num_classes, args.tau, args.alpha, np.arange(16))


def reference_image(args: argparse.Namespace, workload: Workload, device: torch.device, pixels: np.ndarray,
                    index: int, timed_draws: int | None) -> tuple[dict[str, Any], np.ndarray, bool]:
    """Certify image ``index`` the reference way (seeded with seed + index): (its timings, its labels on
    ``pixels``, whether medcert's ``certify`` of the same samples gives those labels)."""
    from medcert_core.certify import certify

    generator = torch.Generator(device=device).manual_seed(args.seed + index)
    sampling, statistics, samples = reference_certify(
        workload.denoiser, workload.segmenter, workload.images[index], num_classes=workload.num_classes,
        sigma=args.sigma, n0=args.n0, n=args.n, tau=args.tau, alpha=args.alpha, generator=generator,
        device=device, pixels=pixels, timed_draws=timed_draws)
    ours = certify(samples, args.n0, sigma=args.sigma, tau=args.tau, alpha=args.alpha,
                   num_classes=workload.num_classes)
    identical = bool(np.array_equal(labels_numpy(ours.labels).reshape(-1)[pixels], statistics.labels))
    sampled = sampling.extrapolated()
    seconds = sampled["seconds"] + statistics.seconds
    timings = {
        "seconds": seconds,
        "sampling_seconds": sampled["seconds"],
        "denoiser_seconds": sampled["denoiser_seconds"],
        "segmenter_seconds": sampled["segmenter_seconds"],
        "noise_and_transfer_seconds": sampled["noise_and_transfer_seconds"],
        "statistics_seconds": statistics.seconds,
        "statistics_loop_seconds_measured": statistics.loop_seconds,
        "statistics_loop_seconds_extrapolated": statistics.extrapolated_loop_seconds,
        "holm_seconds": statistics.holm_seconds,
        "draws_timed": sampling.draws_run,
        "loop_matches_vectorised_pvalues": statistics.loop_matches_vectorised,
    }
    print(f"reference image {index}: {seconds:8.3f} s  (sampling {sampled['seconds']:.3f} s"
          f"{' extrapolated from ' + str(sampling.draws_run) + ' draws' if timed_draws else ''}, "
          f"statistics {statistics.seconds:.3f} s from {len(pixels)} of {statistics.num_pixels} pixels)")
    return timings, statistics.labels, identical


def reference_summary(args: argparse.Namespace, workload: Workload, per_image: list[dict[str, Any]],
                      pixels: np.ndarray, timed_draws: int | None, identical: bool) -> dict[str, Any]:
    """The reference's medians over its images, what was extrapolated from what, and the per-image timings."""
    draws = args.n0 + args.n
    median = lambda key: stats.median(image[key] for image in per_image)  # noqa: E731
    summary = {
        "approach": "batch-1 fp32 sampling under torch.no_grad (class map to numpy per draw), then a per-pixel "
                    "Python loop: mode of n0, count of n, scipy binomtest(alternative='greater', p=tau); "
                    "statsmodels multipletests(method='holm') over all pixels",
        "images": args.reference_images,
        "seconds_per_image": median("seconds"),
        "split": {key: median(key) for key in ("denoiser_seconds", "segmenter_seconds",
                                               "noise_and_transfer_seconds", "statistics_seconds")},
        "statistics_extrapolated_from_pixels": int(len(pixels)),
        "pixels_per_image": int(workload.images[0].shape[-2] * workload.images[0].shape[-1]),
        "sampling_extrapolated_from_draws": timed_draws,
        "draws_per_image": draws,
        "statistics_identical_to_medcert_certify_on_same_samples": identical,
        "per_image": per_image,
    }
    if len(pixels) >= summary["pixels_per_image"]:
        summary["statistics_extrapolated_from_pixels"] = None  # the loop ran on every pixel
    if timed_draws is not None:
        summary["note"] = (f"sampling timed on {timed_draws} of {draws} draws and scaled by {draws / timed_draws:.2f}; "
                           "the statistics ran on those draws repeated (timing only, labels not compared)")
    return summary


def run_reference(args: argparse.Namespace, workload: Workload, device: torch.device,
                  pixels: np.ndarray) -> tuple[dict[str, Any], np.ndarray | None]:
    """Time the paper code's approach on ``--reference-images`` images; returns (summary, labels of image 0
    on ``pixels``, or None when its sampling was timed on a subset of draws)."""
    draws = args.n0 + args.n
    timed_draws = args.reference_draws if args.reference_draws and args.reference_draws < draws else None
    warm_up_reference(args, workload, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    images = [reference_image(args, workload, device, pixels, index, timed_draws)
              for index in range(args.reference_images)]
    summary = reference_summary(args, workload, [timings for timings, _, _ in images], pixels, timed_draws,
                                all(identical for _, _, identical in images))
    summary.update(memory_peak(device))
    return summary, images[0][1] if timed_draws is None else None


# ----------------------------------------------------------------------------------------------
# medcert at one setting


def certify_timer(smoothed: Any, workload: Workload, args: argparse.Namespace,
                  device: torch.device) -> Callable[[int], tuple[float, np.ndarray]]:
    """certify_once(index) -> (synchronised seconds, labels (H, W)) of certifying image ``index``, seeded
    with seed + index like the reference's image of that index."""

    def certify_once(index: int) -> tuple[float, np.ndarray]:
        generator = torch.Generator(device=device).manual_seed(args.seed + index)
        synchronize(device)
        start = time.perf_counter()
        certificate = smoothed.certify(workload.images[index], args.n0, args.n, tau=args.tau, alpha=args.alpha,
                                       generator=generator)
        labels = labels_numpy(certificate.labels)
        synchronize(device)
        return time.perf_counter() - start, labels

    return certify_once


def time_images(certify_once: Callable[[int], tuple[float, np.ndarray]], args: argparse.Namespace,
                setting: Setting, result: dict[str, Any]) -> tuple[list[float], np.ndarray]:
    """A warm-up on image 0 (compiling, if asked), then images 1..--images timed; records the warm-up and
    the median in ``result``; returns (the timings, image 0's labels)."""
    warmup_seconds, warmup_labels = certify_once(0)
    result["warmup_seconds"] = warmup_seconds
    print(f"  warm-up (image 0{', compiling' if setting.compile else ''}): {warmup_seconds:.3f} s")
    timings = []
    for index in range(1, args.images + 1):
        seconds, _ = certify_once(index)
        timings.append(seconds)
        print(f"  image {index}: {seconds:.3f} s")
    result["seconds_per_image"] = stats.median(timings)
    return timings, warmup_labels


def part_rates(split: dict[str, Any], flops: dict[str, int], args: argparse.Namespace) -> dict[str, float]:
    """Achieved TFLOP/s of the denoiser and the segmenter alone, where the split timed them."""
    rates = {}
    for part in ("denoiser", "segmenter"):
        part_seconds = split.get(f"{part}_seconds")
        if part_seconds:
            rates[f"{part}_achieved_tflop_per_s"] = flops[f"{part}_per_draw"] * (args.n0 + args.n) / part_seconds / 1e12
    return rates


def agreement(labels: np.ndarray, pixels: np.ndarray, reference_labels: np.ndarray | None) -> dict[str, Any]:
    """Image 0's certified fraction and, when the reference certified all its draws, its agreement with the
    reference's labels on ``pixels``."""
    found: dict[str, Any] = {"certified_fraction_image0": float((labels != ABSTAIN).mean())}
    if reference_labels is not None:
        ours = labels.reshape(-1)[pixels]
        found["agreement_with_reference_on_subset"] = float((ours == reference_labels).mean())
        found["pixels_differing_from_reference_on_subset"] = int((ours != reference_labels).sum())
    return found


def run_setting(args: argparse.Namespace, workload: Workload, device: torch.device, setting: Setting,
                flops: dict[str, int], pixels: np.ndarray, reference_labels: np.ndarray | None) -> dict[str, Any]:
    """Certify the images with SmoothedSegmenter at one setting: timings, achieved TFLOP/s, the instrumented
    split, peak memory, and image 0 against the reference."""
    from medcert_core.smoothing import SmoothedSegmenter

    smoothed = SmoothedSegmenter(workload.segmenter, workload.num_classes, args.sigma, denoiser=workload.denoiser,
                                 batch_size=args.batch_size, device=device, **setting.kwargs())
    result: dict[str, Any] = {"setting": setting.kwargs(), "batch_size": args.batch_size}
    certify_once = certify_timer(smoothed, workload, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings, warmup_labels = time_images(certify_once, args, setting, result)
    result["batch_size_resolved"] = smoothed._working_batch  # what batch_size "auto" resolved to
    result["seconds_all_images"] = timings
    result["achieved_tflop_per_s"] = flops["per_draw"] * (args.n0 + args.n) / result["seconds_per_image"] / 1e12
    result["split"] = instrumented_split(smoothed, lambda: certify_once(1)[0], device, setting.compile)
    result.update(part_rates(result["split"], flops, args))
    result.update(memory_peak(device))
    result.update(agreement(warmup_labels, pixels, reference_labels))
    return result


def target_checks(entry: dict[str, Any], target: dict[str, float]) -> dict[str, bool]:
    """Which of the issue's targets one setting meets (seconds per image, speed-up, statistics time)."""
    checks = {}
    if "seconds_per_image_max" in target:
        checks["seconds_per_image"] = entry["seconds_per_image"] <= target["seconds_per_image_max"]
    if "speedup_min" in target:
        checks["speedup"] = entry["speedup_vs_reference"] >= target["speedup_min"]
    if "statistics_seconds_max" in target:
        statistics_seconds = entry["split"].get("statistics_seconds")
        checks["statistics"] = statistics_seconds is not None and statistics_seconds <= target["statistics_seconds_max"]
    return checks


def print_entry(entry: dict[str, Any], target: dict[str, float] | None) -> None:
    split = entry["split"]
    parts = ", ".join(f"{key.replace('_seconds', '')} {split[key]:.3f}" for key in
                      ("denoiser_seconds", "segmenter_seconds", "networks_seconds", "statistics_seconds",
                       "rest_seconds")
                      if split.get(key) is not None)
    print(f"  {entry['seconds_per_image']:.3f} s per image, {entry['speedup_vs_reference']:.1f}x the reference, "
          f"{entry['achieved_tflop_per_s']:.3f} TFLOP/s; split (s): {parts}"
          + (f"; passed: {entry['passed']}" if target else ""))


def benchmark_setting(args: argparse.Namespace, workload: Workload, device: torch.device, setting: Setting,
                      flops: dict[str, int], pixels: np.ndarray, reference: dict[str, Any],
                      reference_labels: np.ndarray | None, target: dict[str, float] | None) -> dict[str, Any]:
    """run_setting with a failure (out of memory, compile error) reported instead of raised; the modules
    restored and memory freed after it; its speed-up against the reference and the issue's target."""
    print(f"medcert {setting.name}:")
    try:
        entry = run_setting(args, workload, device, setting, flops, pixels, reference_labels)
    except Exception as error:  # noqa: BLE001 - one failing setting (out of memory, compile error) is reported
        entry = {"setting": setting.kwargs(), "error": f"{type(error).__name__}: {error}"}
        print(f"  failed: {entry['error']}")
    if setting.compile:
        torch._dynamo.reset()  # drop the compiled graphs (and the tensors they hold) before the next setting
    restored = restore_modules(workload)
    if restored:
        entry["modules_restored_after"] = restored
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "seconds_per_image" in entry:
        entry["speedup_vs_reference"] = reference["seconds_per_image"] / entry["seconds_per_image"]
        if target:
            entry["target_checks"] = target_checks(entry, target)
            entry["passed"] = all(entry["target_checks"].values())
        print_entry(entry, target)
    return entry


# ----------------------------------------------------------------------------------------------
# the run


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("paper", "quick"), default="quick")
    parser.add_argument("--small", action="store_true",
                        help="paper config shrunk for a CPU: 64 px input, the ADM layout at 32 px and width 32, n = 60")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    parser.add_argument("--settings", default=None,
                        help="comma list of precision[+cl][+compile], e.g. fp32,bf16,bf16+cl,bf16+cl+compile "
                             f"(default: {DEFAULT_SETTINGS['cpu']} on CPU, {DEFAULT_SETTINGS['cuda']} on CUDA)")
    parser.add_argument("--images", type=int, default=3, help="timed images per setting (after one warm-up image)")
    parser.add_argument("--reference-images", type=int, default=None,
                        help="images certified the reference way (default: 1 for paper, --images for quick)")
    parser.add_argument("--reference-draws", type=int, default=None,
                        help="time the batch-1 sampling on this many draws and extrapolate to n0 + n")
    parser.add_argument("--stat-pixels", type=int, default=2000, help="pixels the per-pixel loop is timed on")
    parser.add_argument("--batch-size", default="auto", help="'auto' or an int, passed to SmoothedSegmenter")
    parser.add_argument("--image-size", type=int, default=None, help="input size (paper 512, small 64, quick 64)")
    parser.add_argument("--model-size", type=int, default=None, help="paper: diffusion model size (256; small 32)")
    parser.add_argument("--num-channels", type=int, default=None, help="paper: diffusion model width (256; small 32)")
    parser.add_argument("--num-head-channels", type=int, default=None, help="paper: attention head width (64; small 32)")
    parser.add_argument("--channel-mult", default=None,
                        help="paper: guided-diffusion channel_mult ('' = its default for the size; small '1,2,2')")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--n0", type=int, default=10)
    parser.add_argument("--n", type=int, default=None, help="estimation draws (100; small 60)")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--tau", type=float, default=0.75)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=("auto", "cache", "random"), default="auto",
                        help="quick: load the cached trained models (auto: when present) or build random ones")
    parser.add_argument("--cache", default=str(user_cache_dir()), help="quick: the study's model cache")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on a CPU device, as bench_certify.py: on a shared machine "
                             "more threads than free cores make batch-1 calls many times slower; torch's own on CUDA)")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: benchmarks/results/bench_pipeline_<config>[-small]_<device>.json")
    return parser.parse_args()


def fill_defaults(args: argparse.Namespace, device: torch.device) -> bool:
    """Fill the options left unset with their config's values (sizes, widths, n, reference images, threads);
    set torch's threads; returns whether this is the small paper form."""
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    small = args.config == "paper" and args.small
    defaults = {"paper": (512, 256, 256, 64, "", 100), "small": (64, 32, 32, 32, "1,2,2", 60),
                "quick": (64, None, None, None, None, 100)}
    image_size, model_size, num_channels, head_channels, channel_mult, n = defaults["small" if small else args.config]
    args.channel_mult = channel_mult if args.channel_mult is None else args.channel_mult
    args.image_size = args.image_size or image_size
    args.model_size = args.model_size or model_size
    args.num_channels = args.num_channels or num_channels
    args.num_head_channels = args.num_head_channels or head_channels
    args.n = args.n or n
    if args.reference_images is None:
        args.reference_images = 1 if args.config == "paper" else args.images
    args.reference_images = max(1, min(args.reference_images, args.images + 1))
    if args.batch_size != "auto":
        args.batch_size = int(args.batch_size)
    return small


def run_header(args: argparse.Namespace, device: torch.device, form: str) -> dict[str, Any]:
    """What the result records before anything is measured: the run, the machine, the versions."""
    import diffusers
    import scipy
    import statsmodels

    result: dict[str, Any] = {
        "benchmark": "whole-image certification: medcert SmoothedSegmenter.certify vs the paper code's approach "
                     "(benchmarks/paper_reference.py)",
        "config": args.config,
        "form": form,
        "complete": False,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": device_name(device), "torch_threads": torch.get_num_threads(),
                   "cpus": os.cpu_count(), "load_average_at_start": load_average()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "numpy": np.__version__, "scipy": scipy.__version__, "statsmodels": statsmodels.__version__},
        "git": git_state(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "input": {"image_size": args.image_size, "channels": 3, "num_classes": args.num_classes},
        "n0": args.n0, "n": args.n, "sigma": args.sigma, "tau": args.tau, "alpha": args.alpha, "seed": args.seed,
    }
    if device.type == "cpu":
        result["device"]["note"] = (
            f"{torch.get_num_threads()} torch thread(s); the load average shows what else ran on the machine "
            "(a shared 2-core machine: timings vary between runs by tens of percent)")
    if device.type == "cuda":
        result["device"].update(cuda=torch.version.cuda, matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    return result


def build_workload(args: argparse.Namespace, device: torch.device, result: dict[str, Any]) -> Workload:
    """The config's models (in eval mode) and images; records the models and their build time in ``result``."""
    start = time.perf_counter()
    workload = (build_paper if args.config == "paper" else build_quick)(args, device)
    workload.segmenter.eval()
    if workload.denoiser is not None:
        workload.denoiser.eval()
    result["models"] = workload.info
    result["models"]["build_seconds"] = time.perf_counter() - start
    print(f"models: denoiser {workload.info['denoiser']['parameters'] / 1e6:.1f} M parameters "
          f"({workload.info['denoiser']['weights']}), segmenter {workload.info['segmenter']['parameters'] / 1e6:.1f} M "
          f"({workload.info['segmenter']['weights']}); built in {result['models']['build_seconds']:.1f} s")
    return workload


def workload_flops(args: argparse.Namespace, workload: Workload, device: torch.device) -> dict[str, Any]:
    """FLOPs of one denoiser + segmenter forward at batch 1, per draw and per image."""
    probe = workload.images[0].to(device).unsqueeze(0)
    denoiser_flops = count_flops(workload.denoiser, probe) if workload.denoiser is not None else 0
    segmenter_flops = count_flops(workload.segmenter, probe)
    flops_per_draw = denoiser_flops + segmenter_flops
    print(f"FLOPs per draw: denoiser {denoiser_flops / 1e9:.2f} G, segmenter {segmenter_flops / 1e9:.2f} G; "
          f"per image {flops_per_draw * (args.n0 + args.n) / 1e12:.3f} T")
    return {"denoiser_per_draw": denoiser_flops, "segmenter_per_draw": segmenter_flops,
            "per_draw": flops_per_draw, "per_image": flops_per_draw * (args.n0 + args.n),
            "counted_with": "torch.utils.flop_counter.FlopCounterMode, one fp32 forward at batch 1"}


def summarize(result: dict[str, Any], reference: dict[str, Any], target: dict[str, float] | None) -> str | None:
    """Record the issue's target and the best setting against the reference; returns the best setting's name."""
    timed = {name: entry for name, entry in result["medcert"].items() if "seconds_per_image" in entry}
    best = min(timed, key=lambda name: timed[name]["seconds_per_image"]) if timed else None
    result["target"] = {**target, "source": "issue 10"} if target else {
        "note": "issue 10 sets targets for the full paper config on a GPU (0.45 s per image, >= 70x, statistics "
                "<= 10 ms) and for quick on a CPU (>= 10x); none for this config/device"}
    result["summary"] = {
        "best_setting": best,
        "seconds_per_image": timed[best]["seconds_per_image"] if best else None,
        "reference_seconds_per_image": reference["seconds_per_image"],
        "speedup_vs_reference": timed[best]["speedup_vs_reference"] if best else None,
        "passed": timed[best].get("passed") if best and target else None,
    }
    return best


def main() -> None:
    from medcert_core.devices import resolve_device

    args = parse_arguments()
    device = resolve_device(args.device)
    small = fill_defaults(args, device)
    settings = [parse_setting(text) for text in (args.settings or DEFAULT_SETTINGS.get(device.type, "fp32")).split(",")
                if text.strip()]
    form = "small" if small else "full"
    label = f"{args.config}{'-small' if small else ''}"
    output = args.output or RESULTS / f"bench_pipeline_{label}_{device.type}.json"
    result = run_header(args, device, form)
    print(f"bench_pipeline: config {label} on {device.type} ({result['device']['name']}), "
          f"n0 = {args.n0}, n = {args.n}, {args.image_size} px")

    start = time.perf_counter()
    workload = build_workload(args, device, result)
    result["flops"] = workload_flops(args, workload, device)
    write_json_atomically(result, output)

    pixels = pixel_subset(args.image_size * args.image_size, args.stat_pixels, seed=args.seed)
    reference, reference_labels = run_reference(args, workload, device, pixels)
    reference["achieved_tflop_per_s"] = result["flops"]["per_image"] / reference["seconds_per_image"] / 1e12
    result["reference"] = reference
    print(f"reference: {reference['seconds_per_image']:.3f} s per image")
    write_json_atomically(result, output)

    result["medcert"] = {}
    target = TARGETS.get((args.config, device.type)) if form == "full" else None
    for setting in settings:
        result["medcert"][setting.name] = benchmark_setting(args, workload, device, setting, result["flops"], pixels,
                                                            reference, reference_labels, target)
        write_json_atomically(result, output)

    best = summarize(result, reference, target)
    result["device"]["load_average_at_end"] = load_average()
    if device.type == "cpu":
        result["rss_peak_bytes"] = rss_peak_bytes()
    result["total_seconds"] = time.perf_counter() - start
    result["complete"] = True
    write_json_atomically(result, output)
    print(f"best: {best} at {result['summary']['seconds_per_image']} s per image, "
          f"{result['summary']['speedup_vs_reference']} x the reference; wrote {output}")

if __name__ == "__main__":
    main()
