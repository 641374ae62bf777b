"""Benchmark: three segmenters behind one denoiser, certified one after another (the baseline: one
``SmoothedSegmenter.certify`` per architecture, the denoiser run for each) against ``certify_segmenters``
(one set of noisy and denoised draws for all three). Same machine, same images, one run, interleaved.

The models are the jsrt profile's at 128 px: the in-project DDPM (from the model cache, ~/.cache/medcert: run the jsrt profile
first) and the tiny UNet, ResUNet++ and DeepLabV2 (random weights: the time does not depend on them), 3 channels, 4 classes, n0 = 10, n = 100, batch 32. It checks
that both ways give the same certificates, then prints and writes seconds per image (median after one
warm-up image) and the ratio:

    python benchmarks/bench_shared_draws.py                      # CPU, about 10 minutes on 2 cores
    python benchmarks/bench_shared_draws.py --device cuda        # a GPU
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

from medcert_core.denoisers import load_denoiser
from medcert_core.io import user_cache_dir, write_json_atomically
from medcert_core.devices import resolve_device
from medcert_core.models import create_model
from medcert_core.smoothing import SmoothedSegmenter, certify_segmenters
from medcert_core.training import PRESETS

ARCHS = ("unet", "resunetpp", "deeplabv2")
DDPM_GLOB = "ddpm_jsrt_128_*"
RESULTS = Path(__file__).resolve().parent / "results"


def denoiser_spec(cache: Path) -> str:
    """The cached JSRT DDPM (a complete one); exits naming the command that trains it when there is none."""
    complete = sorted(path.with_suffix("") for path in cache.glob(f"{DDPM_GLOB}.complete"))
    if not complete:
        raise SystemExit(f"no complete {DDPM_GLOB} in {cache}: run ./run.sh study --profile jsrt first, or give "
                         "--cache pointing at one")
    return f"ddpm:{complete[-1]}"


def segmenters(device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    kwargs = PRESETS["tiny"]["model_kwargs"]
    return {arch: create_model(arch, 3, 4, **kwargs.get(arch, {})).to(device).eval() for arch in ARCHS}


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=3, help="timed images (after one warm-up image)")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--cache", type=Path, default=user_cache_dir() / "denoisers")
    args = parser.parse_args()
    device = resolve_device(args.device)
    spec = denoiser_spec(args.cache)
    denoiser = load_denoiser(spec, args.sigma).to(device)
    models = segmenters(device)
    images = torch.rand(args.images + 1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    rows = []
    for index, image in enumerate(images):
        seed = 100 + index

        def alone():
            return {arch: SmoothedSegmenter(model, 4, args.sigma, denoiser=denoiser, batch_size=32, device=device)
                    .certify(image, 10, 100, generator=torch.Generator(device=device).manual_seed(seed))
                    for arch, model in models.items()}

        def shared():
            return certify_segmenters(models, image, 10, 100, num_classes=4, sigma=args.sigma, denoiser=denoiser,
                                      batch_size=32, device=device,
                                      generator=torch.Generator(device=device).manual_seed(seed))

        baseline_seconds, baseline = timed(alone)
        shared_seconds, together = timed(shared)
        same = all(torch.equal(baseline[arch].pvalues, together[arch].pvalues) for arch in ARCHS)
        if not same:
            raise SystemExit("certify_segmenters differs from the segmenters certified alone: a bug")
        print(f"image {index}{' (warm-up)' if index == 0 else ''}: one after another {baseline_seconds:.1f} s, "
              f"shared draws {shared_seconds:.1f} s, ratio {baseline_seconds / shared_seconds:.2f}")
        if index:
            rows.append({"baseline_s": baseline_seconds, "shared_s": shared_seconds})
    baseline = statistics.median(row["baseline_s"] for row in rows)
    shared = statistics.median(row["shared_s"] for row in rows)
    result = {
        "benchmark": "three segmenters behind one DDPM: one certify per architecture vs certify_segmenters",
        "date": datetime.date.today().isoformat(), "machine": platform.node(), "device": str(device),
        "threads": torch.get_num_threads(), "denoiser": spec, "segmenters": list(ARCHS), "image_size": 128,
        "n0": 10, "n": 100, "batch_size": 32, "sigma": args.sigma, "images_timed": len(rows),
        "seconds_per_image": {"one_after_another": baseline, "shared_draws": shared},
        "ratio": baseline / shared, "identical_certificates": True, "per_image": rows,
    }
    path = RESULTS / f"bench_shared_draws_{device.type}.json"
    write_json_atomically(result, path)
    print(f"median per image: {baseline:.1f} s -> {shared:.1f} s ({baseline / shared:.2f}x); wrote {path}")


if __name__ == "__main__":
    main()
