"""Benchmark: seconds to certify one hippocampus MRI volume (n0 = 10, n = 100) with models already loaded, and
seconds per training step of the 3D networks the chapter could train.

The hippocampus chapter's own runs (``grids/hippocampus.yaml``, the models it trained, which must be in the
model cache: run the grid first), one sigma, on its first test volumes: per (architecture, method) the median
seconds of the whole per-volume step a run takes (every draw through denoiser and segmenter, the counts, the
certificate at every tau of the radius curve), and the ratio to SegCertify's 3D U-Net (no denoiser). Run it on a
quiet machine: the JSON records the CPU, threads, load before and after, and the commit.

The training part (``training_rows``): one AdamW step on 16 random volumes of the padded hippocampus size under the
chapter's bf16 autocast, median of 3 after one warm-up, for the 3D DDPM of the tiny preset, the 3D UNet denoiser
at its widths and at the wider ones it had before, and the chapter's 3D U-Net segmenter: what decided which
denoiser the chapter trains.

    python benchmarks/bench_volume_certify.py                     # sigma 0.5, 3 volumes
    python benchmarks/bench_volume_certify.py --volumes 5 --sigma 1.0
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_cpu_precision, when run as a script
from bench_cpu_precision import machine  # noqa: E402

from medcert_core.devices import load_average, resolve_device  # noqa: E402
from medcert_core.io import write_json_atomically  # noqa: E402
from medcert_core.study.runs.run import certify_image, smoothed_segmenter  # noqa: E402
from medcert_core.study.workflow import chapter_runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "grids" / "hippocampus.yaml"
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
OUTPUT = ROOT / "benchmarks" / "results" / "bench_volume_certify.json"


def seconds_per_volume(run, cache: Path, volumes: int) -> list[float]:
    """Seconds of each of the first ``volumes`` test volumes' certification step (models loaded first)."""
    device = resolve_device("cpu")
    smoothed, config = smoothed_segmenter(run, cache, device)
    test_set = run.data.load("test")
    seconds = []
    for index in range(volumes):
        volume, _ = test_set[index]
        start = time.perf_counter()
        certify_image(run, smoothed, volume, test_set.ids[index], config.num_classes)
        seconds.append(time.perf_counter() - start)
    return seconds


def seconds_per_training_step(network: torch.nn.Module, forward, size: tuple[int, ...], batch: int = 16,
                              repeats: int = 3) -> float:
    """Median seconds of one AdamW step (bf16 autocast, fp32 weights) on ``batch`` random volumes of ``size``."""
    generator = torch.Generator().manual_seed(0)
    volumes = torch.rand(batch, 1, *size, generator=generator)
    optimiser = torch.optim.AdamW(network.parameters(), 1e-3)
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = forward(network, volumes)
        output.float().pow(2).mean().backward()
        optimiser.step()
        optimiser.zero_grad()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def training_rows(size: tuple[int, ...]) -> list[dict]:
    """Seconds per training step of 16 volumes for each 3D network the chapter could train."""
    from medcert_core.denoisers.training import DDPM_PRESETS
    from medcert_core.denoisers.unet_denoiser import DEFAULT_MODEL_KWARGS, VOLUME_ARCH
    from medcert_core.denoisers.volume_ddpm import VolumeDiffusionUNet
    from medcert_core.models import create_model
    from medcert_core.training import preset_model

    torch.manual_seed(0)
    timesteps = torch.randint(0, 1000, (16,))
    before = {"channels": (16, 32, 64, 128), "strides": (1, 2, 2), "num_res_units": 2}
    networks = {
        "3D DDPM, tiny preset (noise prediction)": (VolumeDiffusionUNet(1, 1, **DDPM_PRESETS["tiny"]["volume_unet"]),
                                                     lambda net, x: net(x, timesteps).sample),
        "3D UNet denoiser, the chapter's widths": (create_model(VOLUME_ARCH, 1, 1, **DEFAULT_MODEL_KWARGS[VOLUME_ARCH]),
                                                   lambda net, x: net(x)),
        "3D UNet denoiser, the earlier widths": (create_model(VOLUME_ARCH, 1, 1, **before), lambda net, x: net(x)),
        "3D U-Net segmenter, tiny preset": (preset_model("tiny", "unet3d", 1, 3), lambda net, x: net(x)),
    }
    rows = []
    for name, (network, forward) in networks.items():
        rows.append({"network": name, "weights": sum(p.numel() for p in network.parameters()),
                     "seconds per step of 16 volumes": round(seconds_per_training_step(network, forward, size), 2)})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--volumes", type=int, default=3)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    load_before = load_average()
    experiment, runs = chapter_runs(GRID, data_root=str(DATA), device="cpu")
    chosen = [run for run in runs if run.sigma == args.sigma]
    rows = []
    for run in chosen:
        seconds = seconds_per_volume(run, experiment.cache_path, args.volumes)
        rows.append({"architecture": run.arch, "method": run.method.label, "sigma": run.sigma,
                     "seconds per volume (median)": round(statistics.median(seconds), 2),
                     "seconds (each volume)": [round(value, 2) for value in seconds]})
        print(rows[-1], flush=True)
    baseline = next(row for row in rows if row["method"] == "SegCertify")["seconds per volume (median)"]
    for row in rows:
        row["ratio to SegCertify"] = round(row["seconds per volume (median)"] / baseline, 2)
    first = chosen[0]
    result = {"what": __doc__.split("\n\n")[0], "grid": str(GRID.relative_to(ROOT)), "n0": first.n0, "n": first.n,
              "volume voxels (padded)": list(first.data.image_size), "precision": first.precision,
              "machine": machine(), "load_average_before": load_before, "rows": rows}
    result["training_rows"] = training_rows(tuple(first.data.image_size))
    result["load_average_after"] = load_average()
    write_json_atomically(result, args.output)
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
