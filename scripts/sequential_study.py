"""Sequential against fixed-n certification on real data: draws used, certified Dice and abstention.

For each test image and sigma, one stream of draws (the chapter's per-image seed) is taken to the
largest n_max and its agreement counts are recorded at every look (``SmoothedSegmenter.agreement_path``).
From those records, with no further sampling, each stopping rule is replayed exactly as a direct run
with that seed would run it (``sequential.replay_sequential``; the test suite checks the equality):

- fixed n = n_max (``certify_counts`` on the first n_max draws), for each n_max;
- sequential with at most n_max draws (geometric looks), for each n_max;
- both at every tau of the radius curve (``certify.TAU_GRID``): R = sigma Phi^-1(tau).

All rules see the same draws of the same image, so their differences are paired; intervals are 95 %
percentile bootstraps over test images. Records are kept per image (resumable: a run picks up where
it stopped) and the summary is written atomically:

    python scripts/sequential_study.py --profile jsrt --dataset jsrt --data-root ../shared/data/jsrt \\
        --image-size 128 --arch resunetpp --sigmas 0.25 0.5 1.0 --images 25 --n-max 100 1000 \\
        --records runs/sequential/jsrt_128 --output results/jsrt_sequential.json

Add ``--shard K/N`` to record the images of shard K in one of N processes at once; the command without
it then summarizes from the records.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from medcert_core.certify import TAU_GRID, certify_counts, smallest_certifiable_n
from medcert_core.io import user_cache_dir, write_json_atomically
from medcert_core.metrics import paired_bootstrap_interval, segmentation_scores
from medcert_core.sequential import counts_at, default_looks, replay_sequential
from medcert_core.smoothing import SmoothedSegmenter, image_seed
from medcert_core.study.runs import assets
from medcert_core.study.settings import DataSpec, resolved_training, training_spec


def checkpoints_for(n_maxes: list[int]) -> tuple[int, ...]:
    """Every look of every n_max's schedule (and each n_max): the draw counts to record."""
    return tuple(sorted(set().union(*(default_looks(n) for n in n_maxes))))


def record_image(smoothed: SmoothedSegmenter, image: torch.Tensor, seed: int, n0: int, checkpoints: tuple[int, ...],
                 path: Path) -> dict[str, np.ndarray]:
    """The image's recorded draws, from ``path`` when an earlier run wrote them, else sampled and saved."""
    if path.is_file():
        with np.load(path) as saved:
            if tuple(saved["checkpoints"]) == checkpoints:
                return dict(saved)
    start = time.perf_counter()
    selected, cumulative = smoothed.agreement_path(image, n0, checkpoints,
                                                   generator=torch.Generator().manual_seed(seed))
    record = {"selected": selected, "cumulative": cumulative.astype(np.int32), "checkpoints": np.array(checkpoints),
              "seconds": np.float64(time.perf_counter() - start)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez_compressed(partial, **record)
    partial.replace(path)
    return record


def rule_name(stop_undecided: float) -> str:
    """"sequential", or "sequential, stop at F undecided" for a sequential rule that stops early."""
    return "sequential" if stop_undecided == 0 else f"sequential, stop at {stop_undecided:g} undecided"


def rules_of(record: dict[str, np.ndarray], target: np.ndarray, *, sigma: float, n0: int, alpha: float,
             n_maxes: list[int], stop_undecided: list[float], num_classes: int) -> list[dict]:
    """One row per (rule, n_max, tau): estimation draws used, per-class certified Dice, abstention."""
    checkpoints, cumulative, selected = record["checkpoints"], record["cumulative"], record["selected"]
    rows = []
    for n_max in n_maxes:
        for tau in TAU_GRID:
            fixed = certify_counts(selected, counts_at(checkpoints, cumulative, n_max), n_max, sigma=sigma, tau=tau,
                                   alpha=alpha, n0=n0)
            results = [("fixed", fixed, n_max)]
            for fraction in stop_undecided:
                sequential = replay_sequential(selected, checkpoints, cumulative, n_max=n_max, sigma=sigma, tau=tau,
                                               alpha=alpha, n0=n0, stop_undecided=fraction)
                results.append((rule_name(fraction), sequential.certificate, sequential.draws))
            for rule, certificate, draws in results:
                scores = segmentation_scores(certificate.labels, target, num_classes)
                rows.append({"rule": rule, "n_max": n_max, "tau": tau, "radius": certificate.radius, "draws": draws,
                             "dice": scores["dice"].tolist(), "abstain": float(scores["abstain"])})
    return rows


def summarize(per_image: dict[str, list[dict]], class_names: list[str], *, n_maxes: list[int], tau: float,
              num_pixels: int, alpha: float) -> dict:
    """Means over images per (rule, n_max, tau), and each sequential rule minus fixed with 95 % paired
    intervals."""
    images = sorted(per_image)
    rules = list(dict.fromkeys(row["rule"] for row in per_image[images[0]]))
    sequential_rules = [rule for rule in rules if rule != "fixed"]
    foreground = list(range(1, len(class_names)))

    def rows(rule: str, n_max: int, at_tau: float) -> list[dict]:
        return [next(r for r in per_image[i] if r["rule"] == rule and r["n_max"] == n_max and r["tau"] == at_tau)
                for i in images]

    def mean_dice(row: dict) -> float:
        return float(np.nanmean([row["dice"][c] for c in foreground]))

    table, curves = {}, {}
    for n_max in n_maxes:
        chosen_rows = {rule: rows(rule, n_max, tau) for rule in rules}
        entry = {rule: {
            "mean_draws": float(np.mean([r["draws"] for r in chosen])),
            "draws_saved_percent": 100 * (1 - float(np.mean([r["draws"] for r in chosen])) / n_max),
            "dice": {class_names[c]: float(np.nanmean([r["dice"][c] for r in chosen])) for c in foreground},
            "mean_foreground_dice": float(np.mean([mean_dice(r) for r in chosen])),
            "abstain_percent": 100 * float(np.mean([r["abstain"] for r in chosen])),
        } for rule, chosen in chosen_rows.items()}
        fixed = chosen_rows["fixed"]
        for rule in sequential_rules:
            sequential = chosen_rows[rule]
            entry[rule]["minus_fixed"] = {
                "mean_foreground_dice": paired_bootstrap_interval([mean_dice(s) - mean_dice(f)
                                                                   for s, f in zip(sequential, fixed)]),
                "abstain_percent": paired_bootstrap_interval([100 * (s["abstain"] - f["abstain"])
                                                              for s, f in zip(sequential, fixed)]),
                **{f"dice {class_names[c]}": paired_bootstrap_interval(
                    [s["dice"][c] - f["dice"][c] for s, f in zip(sequential, fixed)]) for c in foreground},
            }
        table[str(n_max)] = entry
        curves[str(n_max)] = [
            {"tau": at_tau, "radius": rows("fixed", n_max, at_tau)[0]["radius"],
             "reachable_with_fixed_n": n_max >= smallest_certifiable_n(num_pixels, at_tau, alpha, "holm"),
             **{rule: {"mean_foreground_dice": float(np.mean([mean_dice(r) for r in rows(rule, n_max, at_tau)])),
                       "mean_draws": float(np.mean([r["draws"] for r in rows(rule, n_max, at_tau)]))}
                for rule in rules}}
            for at_tau in TAU_GRID]
    return {"at_tau": table, "radius_curve": curves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="jsrt")
    parser.add_argument("--dataset", default="jsrt")
    parser.add_argument("--data-root", default=None, help="the dataset root (none for the phantoms)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--arch", default="resunetpp")
    parser.add_argument("--denoiser", default="ddpm:auto")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--images", type=int, default=25, help="the first N test images (the chapter's)")
    parser.add_argument("--n0", type=int, default=10)
    parser.add_argument("--n-max", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--stop-undecided", type=float, nargs="+", default=[0.0, 0.01],
                        help="sequential rules: 0 stops when every pixel is decided, F > 0 at F undecided")
    parser.add_argument("--tau", type=float, default=0.75, help="the tau of the table (the curve covers TAU_GRID)")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--cache", default=str(user_cache_dir()))
    parser.add_argument("--records", required=True, help="folder of per-image records (resumable)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shard", default="0/1", help="K/N: record only the images with index %% N == K (run N of "
                        "them at once, then once without --shard to write the summary from the records)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*draws cannot certify any pixel")  # the curve marks those taus
    if args.threads:
        torch.set_num_threads(args.threads)
    data, cache = DataSpec(args.dataset, args.data_root, args.image_size), Path(args.cache)
    training = resolved_training(training_spec(args.profile), "cpu")
    model, config = assets.segmenter(cache, data, training, args.arch, 0.0, device="cpu")
    test_set = data.load("test")
    n_maxes, checkpoints = sorted(args.n_max), checkpoints_for(args.n_max)
    shard, shards = (int(part) for part in args.shard.split("/"))
    summary = {}
    for sigma in args.sigmas:
        denoiser = assets.denoiser(args.denoiser, sigma, cache, data, training, device="cpu")
        smoothed = SmoothedSegmenter(model, config.num_classes, sigma, denoiser=denoiser, device="cpu", batch_size=32)
        per_image, seconds = {}, []
        for index in range(shard, min(args.images, len(test_set)), shards):
            image, target = test_set[index]
            image_id = test_set.ids[index]
            record = record_image(smoothed, image, image_seed(data.seed, image_id), args.n0, checkpoints,
                                  Path(args.records) / f"sigma{sigma:g}" / f"{image_id}.npz")
            seconds.append(float(record["seconds"]))
            per_image[image_id] = rules_of(record, np.asarray(target), sigma=sigma, n0=args.n0, alpha=args.alpha,
                                           n_maxes=n_maxes, stop_undecided=args.stop_undecided,
                                           num_classes=config.num_classes)
            print(f"sigma {sigma:g}: image {index + 1} ({image_id}) recorded", flush=True)
        if shards > 1:
            continue  # a shard only records; the run without --shard summarizes
        summary[f"{sigma:g}"] = summarize(per_image, list(config.class_names), n_maxes=n_maxes, tau=args.tau,
                                          num_pixels=int(np.prod(image.shape[-2:])), alpha=args.alpha)
        summary[f"{sigma:g}"]["sampling_seconds_per_image"] = float(np.median(seconds))
        write_json_atomically({
            "what": "sequential (anytime-valid, geometric looks) against fixed-n certification, replayed from one "
                    "recorded stream of draws per image (scripts/sequential_study.py)",
            "dataset": args.dataset, "image_size": args.image_size, "arch": args.arch, "denoiser": args.denoiser,
            "profile": args.profile, "test_images": len(per_image), "n0": args.n0, "n_max": n_maxes,
            "tau": args.tau, "alpha": args.alpha, "stop_undecided": args.stop_undecided, "looks": {str(n): list(default_looks(n)) for n in n_maxes},
            "machine": platform.node(), "threads": torch.get_num_threads(), "sigmas": summary,
        }, args.output)


if __name__ == "__main__":
    main()
