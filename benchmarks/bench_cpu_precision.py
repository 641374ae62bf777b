"""Benchmark: what bf16 autocast (on a CPU with AMX / AVX-512 BF16) buys the study, and what it changes.

In one run on one machine, against fp32 as the baseline:

1. **Throughput** of each network the study uses, at the jsrt profile's sizes (128 px, 3 channels,
   batch 16; the DDPM at its 64 px): the three tiny segmenters, the in-project DDPM (through its
   DiffusionDenoiser, single step), FFDNet (off the shelf, real weights) and the UNet denoiser, at
   fp32, bf16, bf16 + channels_last and, unless ``--no-compile``, bf16 + channels_last + torch.compile
   (its compile time apart): seconds per batch (median of ``--repeats`` after two warm-up calls)
   and the ratio to fp32. Random weights except FFDNet's: the time does not depend on them.
2. **Training**: each segmenter trained ``--epochs`` epochs on the JSRT training split at 128 px, once
   with fp32 and once under bf16 autocast (fp32 master weights), same seed: seconds per epoch and
   the validation Dice per epoch (the precision must not cost accuracy at equal epochs).
3. **Agreement**: the fp32-trained segmenters on the JSRT test images, each alone and behind FFDNet on
   one noisy copy at sigma 0.25: the share of pixels whose class under bf16 equals fp32's.
4. **Certification**: those segmenters behind FFDNet at ``--sigma`` on the first ``--images`` JSRT
   test images (n0 10, n 100, alpha 0.001, batch 32, the same noise), at fp32 (how the study runs today)
   and at bf16 + channels_last: seconds per image and the certified Dice per foreground class, bf16
   minus fp32 as a paired 95 % bootstrap interval over images.

The JSON records the CPU model and flags, the thread count, the load average before and after and
the commit: timings taken while other work runs say little.

    python benchmarks/bench_cpu_precision.py                       # about 25 minutes on 2 cores
    python benchmarks/bench_cpu_precision.py --epochs 1 --images 2 --repeats 2 --no-compile   # a smoke run
    python benchmarks/bench_cpu_precision.py --archs resunetpp --epochs 20 --parts training,agreement,certification \
        --output benchmarks/results/bench_cpu_precision_resunetpp_e20.json   # a converged ResUNet++ only
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcert_core.data import load_dataset
from medcert_core.denoisers import DDPM_PRESETS, DiffusionDenoiser, linear_scheduler, load_denoiser
from medcert_core.denoisers.unet_denoiser import UNetDenoiser
from medcert_core.devices import (BF16_CPU_FLAGS, autocast, cpu_flags, git_commit, load_average, local_timestamp,
                                  machine_record)
from medcert_core.io import write_json_atomically
from medcert_core.metrics import MetricAccumulator, paired_bootstrap_interval
from medcert_core.models import create_model
from medcert_core.smoothing import SmoothedSegmenter, classes_from_logits, image_seed
from medcert_core.training import PRESETS, train_segmenter

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_cpu_precision.json"
ARCHS = ("unet", "resunetpp", "deeplabv2")
SETTINGS = ("fp32", "bf16", "bf16+cl", "bf16+cl+compile")
PARTS = ("throughput", "training", "agreement", "certification")
FFDNET = ROOT.parent / "shared" / "weights" / "ffdnet" / "ffdnet_color.pth"
SIZE, CHANNELS, CLASSES, BATCH = 128, 3, 4, 16


def machine() -> dict[str, Any]:
    """CPU model, its bf16 flags, threads, torch version, commit."""
    return {**machine_record(), "commit": git_commit(ROOT), "date": local_timestamp()}


def networks(sigma: float) -> dict[str, torch.nn.Module]:
    """name -> the network in eval mode, called on a (B, 3, 128, 128) batch in [0, 1]."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    found = {arch: create_model(arch, CHANNELS, CLASSES, **PRESETS["tiny"]["model_kwargs"][arch]) for arch in ARCHS}
    unet = UNet2DModel(sample_size=64, in_channels=CHANNELS, out_channels=CHANNELS, **DDPM_PRESETS["tiny"]["unet"])
    found["ddpm (64 px, single step)"] = DiffusionDenoiser(unet, linear_scheduler(), sigma)
    found["ffdnet"] = load_denoiser(f"ffdnet:{FFDNET}", sigma)
    found["unet denoiser"] = UNetDenoiser.build(CHANNELS, sigma, encoder_name="resnet18",
                                               decoder_channels=(128, 64, 32, 16, 8))
    return {name: module.eval() for name, module in found.items()}


def seconds_per_call(call: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``call`` after two warm-up calls."""
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(sigma: float, repeats: int, compile: bool) -> dict[str, Any]:
    """Seconds per batch of 16 and the ratio to fp32, per network and setting."""
    batch = torch.rand(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    rows = {}
    for name, module in networks(sigma).items():
        row = {}
        for setting in SETTINGS if compile else SETTINGS[:3]:
            precision = "fp32" if setting == "fp32" else "bf16"
            layout = torch.channels_last if "cl" in setting else torch.contiguous_format
            module.to(memory_format=layout)
            x = batch.contiguous(memory_format=layout)
            function = module
            compile_seconds = None
            if "compile" in setting:
                function = torch.compile(module)
                start = time.perf_counter()
                with torch.inference_mode(), autocast(torch.device("cpu"), precision):
                    function(x)
                compile_seconds = round(time.perf_counter() - start, 1)

            def one_call() -> None:
                with torch.inference_mode(), autocast(torch.device("cpu"), precision):
                    function(x)

            row[setting] = {"seconds_per_batch": round(seconds_per_call(one_call, repeats), 4),
                            **({"compile_seconds": compile_seconds} if compile_seconds is not None else {})}
            print(f"{name:28s} {setting:16s} {row[setting]}", flush=True)
        module.to(memory_format=torch.contiguous_format)
        base = row["fp32"]["seconds_per_batch"]
        for setting in row:
            row[setting]["ratio_to_fp32"] = round(base / row[setting]["seconds_per_batch"], 2)
        rows[name] = row
    return rows


def training(data_root: Path, epochs: int, archs: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, torch.nn.Module]]:
    """Each segmenter trained at fp32 and under bf16 autocast: seconds per epoch, validation Dice per epoch."""
    train, val = (load_dataset("jsrt", data_root, split, image_size=SIZE) for split in ("train", "val"))
    rows, fp32_models = {}, {}
    for arch in archs:
        row = {}
        for precision in ("fp32", "bf16"):
            start = time.perf_counter()
            model, _, history = train_segmenter(train, val, arch=arch, epochs=epochs, seed=0, device="cpu",
                                                precision=precision, progress=False)
            seconds = time.perf_counter() - start
            row[precision] = {"seconds_per_epoch": round(seconds / epochs, 1),
                              "val_dice_per_epoch": [round(float(v), 4) for v in history["val_dice"]],
                              "best_val_dice": round(float(history["val_dice"].max()), 4)}
            print(f"train {arch:10s} {precision}: {row[precision]}", flush=True)
            if precision == "fp32":
                fp32_models[arch] = model
        row["epoch_speedup"] = round(row["fp32"]["seconds_per_epoch"] / row["bf16"]["seconds_per_epoch"], 2)
        row["best_val_dice_bf16_minus_fp32"] = round(row["bf16"]["best_val_dice"] - row["fp32"]["best_val_dice"], 4)
        rows[arch] = row
    return rows, fp32_models


def classes(model: torch.nn.Module, images: torch.Tensor, precision: str) -> torch.Tensor:
    """Class ids (B, H, W) of the plain segmenter at ``precision``."""
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        return classes_from_logits(model(images).float())


def agreement(models: dict[str, torch.nn.Module], data_root: Path, sigma: float) -> dict[str, Any]:
    """Share of test pixels whose bf16 class is the fp32 class: each segmenter alone, and behind FFDNet."""
    test = load_dataset("jsrt", data_root, "test", image_size=SIZE)
    images = torch.stack([test[i][0] for i in range(len(test))])
    noisy = images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    ffdnet = load_denoiser(f"ffdnet:{FFDNET}", sigma).eval()
    inputs = {"clean": (images, images),  # what the segmenters see at fp32 and at bf16
              f"ffdnet at sigma {sigma:g}": (denoised(ffdnet, noisy, "fp32"), denoised(ffdnet, noisy, "bf16"))}
    rows = {}
    for arch, model in models.items():
        model.eval()
        row = {}
        for name, (at_fp32, at_bf16) in inputs.items():
            fp32, bf16 = classes(model, at_fp32, "fp32"), classes(model, at_bf16, "bf16")
            row[name] = round(float((fp32 == bf16).double().mean()), 5)
        rows[arch] = {"test_images": len(test), "pixel_agreement": row}
        print(f"agreement {arch:10s} {row}", flush=True)
    return rows


def denoised(denoiser: torch.nn.Module, noisy: torch.Tensor, precision: str) -> torch.Tensor:
    """The denoiser's output at ``precision`` (the segmenter's input), in batches of 16."""
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        return torch.cat([denoiser(chunk).float() for chunk in noisy.split(BATCH)])


def certification(models: dict[str, torch.nn.Module], data_root: Path, sigma: float, images: int) -> dict[str, Any]:
    """Seconds per image and certified Dice, bf16 + channels_last minus fp32 (paired over images), behind FFDNet."""
    test = load_dataset("jsrt", data_root, "test", image_size=SIZE)
    ffdnet = load_denoiser(f"ffdnet:{FFDNET}", sigma)
    rows = {}
    for arch, model in models.items():
        dice, seconds = {}, {}
        for precision in ("fp32", "bf16"):
            for module in (model, ffdnet):  # SmoothedSegmenter turns them channels_last in place for bf16
                module.to(memory_format=torch.contiguous_format)
            smoother = SmoothedSegmenter(model, CLASSES, sigma, denoiser=ffdnet, batch_size=32, device="cpu",
                                         precision=precision, channels_last=precision == "bf16")
            accumulator, times = MetricAccumulator(test.class_names), []
            for index in range(images):
                image, mask = test[index]
                generator = torch.Generator().manual_seed(image_seed(0, test.ids[index]))
                start = time.perf_counter()
                certificate = smoother.certify(image, 10, 100, alpha=0.001, generator=generator)
                times.append(time.perf_counter() - start)
                accumulator.add(certificate.labels, mask, image_id=index)
            frame = accumulator.to_frame()
            dice[precision] = frame[frame["class_id"] > 0].pivot(index="image_id", columns="class_name", values="dice")
            seconds[precision] = statistics.median(times[1:] or times)
        row = {"images": images, "seconds_per_image": {p: round(s, 2) for p, s in seconds.items()},
               "speedup": round(seconds["fp32"] / seconds["bf16"], 2), "certified_dice": {}}
        for name in dice["fp32"].columns:
            difference = (dice["bf16"][name] - dice["fp32"][name]).to_numpy()
            row["certified_dice"][name] = {"fp32": round(float(dice["fp32"][name].mean()), 4),
                                           "bf16": round(float(dice["bf16"][name].mean()), 4),
                                           "bf16_minus_fp32": {k: (round(v, 4) if isinstance(v, float) else v)
                                                               for k, v in paired_bootstrap_interval(difference).items()}}
        rows[arch] = row
        print(f"certify {arch:10s} {row}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "jsrt")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs per segmenter and precision")
    parser.add_argument("--images", type=int, default=10, help="JSRT test images certified per precision")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per network and setting")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile setting")
    parser.add_argument("--archs", default=",".join(ARCHS), help="segmenters trained, compared and certified")
    parser.add_argument("--parts", default=",".join(PARTS), help="which of the four measurements to run")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    archs, parts = tuple(args.archs.split(",")), tuple(args.parts.split(","))
    for name, given, valid in (("--archs", archs, ARCHS), ("--parts", parts, PARTS)):
        if not set(given) <= set(valid):
            parser.error(f"{name} must be a comma-separated subset of {','.join(valid)}, got {','.join(given)}")
    if {"agreement", "certification"} & set(parts) and "training" not in parts:
        parser.error("agreement and certification use the models trained by the training part")
    if not any(flag in cpu_flags() for flag in BF16_CPU_FLAGS):
        print("this CPU has no AMX / AVX-512 BF16: bf16 runs emulated; the ratios say little about other machines")
    load_before = load_average()
    result: dict[str, Any] = {"what": __doc__.split("\n\n")[0], "machine": machine(),
                              "load_average_before": load_before,
                              "settings": {"image_size": SIZE, "channels": CHANNELS, "batch": BATCH, "sigma": args.sigma,
                                           "epochs": args.epochs, "images": args.images, "repeats": args.repeats,
                                           "archs": list(archs), "parts": list(parts)}}
    if "throughput" in parts:
        result["throughput"] = throughput(args.sigma, args.repeats, args.compile)
    if "training" in parts:
        result["training"], models = training(args.data_root, args.epochs, archs)
    if "agreement" in parts:
        result["agreement"] = agreement(models, args.data_root, args.sigma)
    if "certification" in parts:
        result["certification"] = certification(models, args.data_root, args.sigma, args.images)
    result["load_average_after"] = load_average()
    write_json_atomically(result, args.output)
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
