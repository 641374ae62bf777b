"""Benchmark: a dataset chapter's certification runs one by one (before shared draws) against
``run_all`` (its architectures behind one denoiser certified from one set of draws), on the same
images, in one process, each into a fresh results store.

The runs are the chapter's own (``workflow.chapter_runs``: every method, architecture and sigma
of the grid entry, clean rows included) on its first ``--images`` test images. The segmenters are
trained for ``--epochs`` (default 1: the time does not depend on the weights); the denoiser is the
chapter's (``ddpm:auto`` from the cache, trained first if missing). It checks that both ways store
the same rows, then writes seconds for each and the ratio, and per image, what the chapter's
full image count would take at that rate:

    python benchmarks/bench_chapter_shared.py --grid grids/jsrt.yaml --chapter jsrt \\
        --data-root ../shared/data/jsrt --images 3
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from medcert_core.devices import load_average, local_timestamp
from medcert_core.io import write_json_atomically
from medcert_core.study.runs import assets
from medcert_core.study.runs.run import run_all, run_certification
from medcert_core.study.workflow import chapter_runs

RESULTS = Path(__file__).resolve().parent / "results"
COMPARED = ["run", "image_id", "class_id", "dice", "iou", "abstain"]


def train_models(runs, cache: Path, device: str) -> None:
    """Every segmenter and denoiser of the runs, so that no training falls inside a timing."""
    for run in runs:
        assets.segmenter(cache, run.data, run.training, run.arch, run.method.train_noise, device)
        if run.sigma > 0:
            assets.resolve_denoiser_spec(run.method.denoiser, run.sigma, cache, run.data, run.training, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="grids/jsrt.yaml")
    parser.add_argument("--chapter", default="jsrt")
    parser.add_argument("--data-root", default=None, help="the dataset root (none for the phantoms)")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="segmenter epochs (the time does not depend on them)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(RESULTS / "bench_chapter_shared_cpu.json"))
    args = parser.parse_args()
    full = chapter_runs(args.grid, chapter=args.chapter, data_root=args.data_root)[0].test_images
    experiment, runs = chapter_runs(args.grid, chapter=args.chapter, data_root=args.data_root, device=args.device,
                                    overrides={"test_images": args.images, "training": {"epochs": args.epochs}})
    cache = experiment.cache_path
    train_models(runs, cache, args.device)
    for run in runs:
        run.key()  # reads every file digest once, outside the timings
    options = {"cache": cache, "device": experiment.device, "execution": experiment.execution, "progress": False}
    with tempfile.TemporaryDirectory() as one_by_one_dir, tempfile.TemporaryDirectory() as shared_dir:
        start = time.perf_counter()
        one_by_one = pd.concat([run_certification(run, results_dir=one_by_one_dir, **options).assign(run=run.hash)
                                for run in runs], ignore_index=True)
        before = time.perf_counter() - start
        start = time.perf_counter()
        shared = run_all(runs, results_dir=shared_dir, **options)
        after = time.perf_counter() - start
    pd.testing.assert_frame_equal(one_by_one[COMPARED].reset_index(drop=True), shared[COMPARED].reset_index(drop=True))
    payload = {
        "what": "a dataset chapter's certification runs one by one against run_all with shared draws "
                "(benchmarks/bench_chapter_shared.py): same runs, same images, identical stored rows",
        "date": local_timestamp(),
        "grid": args.grid, "chapter": args.chapter, "runs": len(runs),
        "smoothed_runs": sum(run.sigma > 0 for run in runs), "images": args.images,
        "segmenter_epochs": args.epochs, "device": args.device, "threads": torch.get_num_threads(),
        "machine": platform.node(), "cpus": os.cpu_count(), "load_average_before": load_average(),
        "seconds": {"one_by_one": round(before, 1), "shared_draws": round(after, 1)},
        "ratio": round(before / after, 3), "chapter_images": full,
        "seconds_per_image": {"one_by_one": round(before / args.images, 1),
                              "shared_draws": round(after / args.images, 1)},
        "note": "timed on the chapter's first images; the per-image rate times the chapter's image count "
                "estimates the whole chapter's certification (not timed as a whole)",
    }
    print(f"{len(runs)} runs on {args.images} images: one by one {before:.0f} s, shared draws {after:.0f} s, "
          f"ratio {before / after:.2f}; at this rate the chapter's {full} images would take "
          f"{before / args.images * (full or args.images) / 60:.0f} min against "
          f"{after / args.images * (full or args.images) / 60:.0f} min")
    write_json_atomically(payload, args.output)


if __name__ == "__main__":
    main()
