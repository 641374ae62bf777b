"""Benchmark: medcert's ``certify`` against the paper code's per-pixel approach, same machine, one run.

The baseline follows the approach of the paper's released code (a Python loop over pixels: the
mode of the n0 selection draws, the count of the n estimation draws, one scipy binomial test
per pixel, then statsmodels' Holm over all pixels). Both get the same (n0 + n, H, W) two-class
sample tensor; the benchmark checks that they certify the same pixels, prints both timings and
their ratio, and writes JSON.

    python benchmarks/bench_certify.py                 # 512 x 512, n0 = 10, n = 100
    python benchmarks/bench_certify.py --size 128      # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import scipy
import torch
from scipy.stats import binomtest
from statsmodels.stats.multitest import multipletests

from medcert_core import ABSTAIN, certify
from medcert_core.io import write_json_atomically


def paper_style_certify(samples: np.ndarray, n0: int, num_classes: int, tau: float, alpha: float) -> np.ndarray:
    """Per-pixel Python loop, as the paper's code does it. samples (n0 + n, H, W) -> labels (H, W)."""
    draws, height, width = samples.shape
    flat = samples.reshape(draws, -1)
    n = draws - n0
    classes = np.empty(flat.shape[1], dtype=np.int64)
    pvalues = np.empty(flat.shape[1])
    for pixel in range(flat.shape[1]):
        column = flat[:, pixel]
        votes = np.zeros(num_classes)
        for draw in range(n0):
            votes[column[draw]] += 1
        selected = int(np.argmax(votes))
        count = int(np.sum(column[n0:] == selected))
        classes[pixel] = selected
        pvalues[pixel] = binomtest(count, n, tau, alternative="greater").pvalue
    reject = multipletests(pvalues, alpha=alpha, method="holm")[0]
    classes[~reject] = ABSTAIN
    return classes.reshape(height, width)


def make_samples(size: int, draws: int, seed: int) -> np.ndarray:
    """A two-class (draws, size, size) tensor: a disk whose boundary pixels are uncertain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    distance = np.hypot(yy - 0.5, xx - 0.5) - 0.3
    probability_one = 1 / (1 + np.exp(distance * 60))
    return (rng.random((draws, size, size)) < probability_one).astype(np.int64)


def best_of(repeats: int, function) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--n0", type=int, default=10)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--tau", type=float, default=0.75)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "bench_certify.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    samples = make_samples(args.size, args.n0 + args.n, seed=0)
    samples_torch = torch.from_numpy(samples)
    run = lambda data: certify(data, args.n0, sigma=0.25, tau=args.tau, alpha=args.alpha)  # noqa: E731
    ours_numpy = best_of(5, lambda: run(samples))
    ours_torch = best_of(5, lambda: run(samples_torch))

    start = time.perf_counter()
    baseline_labels = paper_style_certify(samples, args.n0, 2, args.tau, args.alpha)
    baseline = time.perf_counter() - start

    labels = run(samples).labels
    identical = bool(np.array_equal(labels, baseline_labels))
    result = {
        "benchmark": "certify vs paper-style per-pixel loop (scipy binomtest + statsmodels Holm)",
        "shape": list(samples.shape),
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
        "tau": args.tau,
        "certified_fraction": float((labels != ABSTAIN).mean()),
        "identical_labels": identical,
        "seconds_baseline": baseline,
        "seconds_medcert_numpy": ours_numpy,
        "seconds_medcert_torch_cpu": ours_torch,
        "speedup_numpy": baseline / ours_numpy,
        "speedup_torch_cpu": baseline / ours_torch,
        "threads": 1,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"numpy": np.__version__, "scipy": scipy.__version__, "torch": torch.__version__},
    }
    print(f"baseline (per-pixel loop):  {baseline:9.3f} s")
    print(f"medcert certify, numpy:     {ours_numpy:9.4f} s   {result['speedup_numpy']:8.0f}x")
    print(f"medcert certify, torch CPU: {ours_torch:9.4f} s   {result['speedup_torch_cpu']:8.0f}x")
    print(f"identical labels: {identical}; certified fraction {result['certified_fraction']:.3f}")
    write_json_atomically(result, args.output)
    print(f"wrote {args.output}")
    if not identical:
        raise SystemExit("the two implementations disagree")


if __name__ == "__main__":
    main()
