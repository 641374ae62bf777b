"""Attack our own certificates: L2 PGD at the certified radius on the quick study's models.

For each method (ours = DDPM-denoised, SegCertify = noise-trained segmenter) and sigma: certify
each phantom test image, attack it with SmoothAdv-style PGD at 0.999 R, certify the attacked image
with fresh noise, count certified pixels that flip to another certified class; attack the
undefended segmenter with the same PGD at the same radius. The sharp attack then takes the
certified pixels with the lowest agreement counts, a group at a time, pushes them towards their
runner-up class with PGD at the same radius, and measures with fresh draws how far their smoothed
probability falls against the Lipschitz bound Phi(Phi^-1(p_before) - eps / sigma). Trains the
quick models if the cache (the study's: ~/.cache/medcert, see medcert_core.io.user_cache_dir) lacks them. Writes
results/attack.json and a figure:

    python scripts/attack_certificates.py            # about 30 min on 1 CPU thread, models cached
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medcert_core import ABSTAIN
from medcert_core.attack import PGDConfig, SharpConfig
from medcert_core.smoothing import DRAW_BATCH
from medcert_core.study.soundness import (
    attack_payload,
    attack_run,
    pgd_parameters,
    summarize_attack,
    summarize_groups,
)
from medcert_core.io import user_cache_dir, write_atomically, write_json_atomically
from medcert_core.study.settings import DataSpec
from medcert_core.study.settings import resolved_training, training_spec
from medcert_core.study.runs.run import CertificationRun, Method, ours, segcertify

PALETTE = np.array([[20, 20, 20], [70, 130, 220], [230, 160, 40], [90, 190, 90], [180, 90, 200], [60, 200, 200]],
                   dtype=np.uint8)
ABSTAIN_COLOR, FLIP_COLOR = np.array([255, 255, 255], np.uint8), np.array([230, 30, 30], np.uint8)


def colorize(labels: np.ndarray, flips: np.ndarray | None = None) -> np.ndarray:
    """(H, W) class ids / ABSTAIN -> (H, W, 3) uint8: palette, abstain white, flips red."""
    rgb = PALETTE[np.clip(labels, 0, len(PALETTE) - 1) % len(PALETTE)]
    rgb[labels == ABSTAIN] = ABSTAIN_COLOR
    if flips is not None:
        rgb[flips] = FLIP_COLOR
    return rgb


def gray(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) uint8 of the channel mean."""
    value = (np.clip(image.mean(0), 0, 1) * 255).astype(np.uint8)
    return np.repeat(value[..., None], 3, axis=2)


def perturbation(delta: np.ndarray) -> np.ndarray:
    """(C, H, W) perturbation -> (H, W, 3) uint8, channel mean, gray = 0, scaled to its own max."""
    mean = delta.mean(0)
    scale = max(float(np.abs(mean).max()), 1e-12)
    return gray(np.broadcast_to(0.5 + 0.5 * mean / scale, delta.shape))


def figure(examples: dict[str, dict[str, np.ndarray]], path: Path, zoom: int = 3) -> None:
    """One row per (method, sigma): x, eps (scaled), certificate at x, at x + eps, base model attacked."""
    from PIL import Image, ImageDraw

    columns = ["image x", "smoothed PGD eps (scaled)", "certificate at x", "certificate at x+eps",
               "base model, own PGD (flips red)", "sharp: attacked pixels (red)", "sharp: eps of group 1 (scaled)"]
    rows = []
    for maps in examples.values():
        certified_flips = (maps["labels"] != ABSTAIN) & (maps["attacked_labels"] != ABSTAIN) & (
            maps["attacked_labels"] != maps["labels"])
        group = maps.get("group_pixels", np.zeros(maps["labels"].shape, dtype=bool))
        group_delta = maps.get("group_adversarial", maps["image"]) - maps["image"]
        rows.append([gray(maps["image"]), perturbation(maps["adversarial"] - maps["image"]), colorize(maps["labels"]),
                     colorize(maps["attacked_labels"], certified_flips),
                     colorize(maps["base_attacked"], maps["base_attacked"] != maps["base_clean"]),
                     colorize(maps["labels"], group), perturbation(group_delta)])
    height, width = rows[0][0].shape[:2]
    cell_h, cell_w, label_w, header = height * zoom, width * zoom, 170, 24
    canvas = Image.new("RGB", (label_w + len(columns) * (cell_w + 6), header + len(rows) * (cell_h + 6)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(columns):
        draw.text((label_w + column * (cell_w + 6), 6), title, fill="black")
    for row, (name, panels) in enumerate(zip(examples, rows)):
        top = header + row * (cell_h + 6)
        draw.multiline_text((6, top + cell_h // 2 - 12), name.replace(", ", "\n"), fill="black")
        for column, panel in enumerate(panels):
            tile = Image.fromarray(np.ascontiguousarray(panel)).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + column * (cell_w + 6), top))
    write_atomically(path, lambda temporary: canvas.save(temporary, format="PNG"))


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick", help="training profile of the models (quick: the main job's)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=10, help="phantom test images per (method, sigma)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--n0", type=int, default=10)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--tau", type=float, default=0.75)
    parser.add_argument("--steps", type=int, default=20, help="PGD steps")
    parser.add_argument("--draws", type=int, default=8, help="noise draws per PGD step (smoothed model)")
    parser.add_argument("--eps-factor", type=float, default=0.999, help="attack radius / certified radius")
    parser.add_argument("--group-sizes", type=int, nargs="*", default=[1, 1, 16],
                        help="sharp attack: the size of each lowest-margin group attacked per image, in order "
                             "(none: no sharp attack)")
    parser.add_argument("--sharp-steps", type=int, default=20, help="sharp attack: PGD steps per group")
    parser.add_argument("--sharp-draws", type=int, default=8, help="sharp attack: noise draws per PGD step")
    parser.add_argument("--estimate-draws", type=int, default=300,
                        help="sharp attack: fresh draws per probability estimate (before, after, random)")
    parser.add_argument("--confidence", type=float, default=0.99, help="sharp attack: two-sided interval level")
    parser.add_argument("--sharp-images", type=int, default=5,
                        help="sharp attack on the first this many images of each setting (5 keeps the run "
                             "near 30 min on one shared CPU thread)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the certification and attack noise")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast of the networks, in certification and in every attack")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 holds up on a shared machine)")
    parser.add_argument("--batch-size", type=int, default=DRAW_BATCH)
    parser.add_argument("--cache", type=Path, default=user_cache_dir())
    parser.add_argument("--output", type=Path, default=Path("results") / "attack.json")
    parser.add_argument("--figure", type=Path, default=Path("book") / "figures" / "attack.png")
    return parser.parse_args()


def attack_settings(args: argparse.Namespace) -> tuple[PGDConfig, SharpConfig | None, int]:
    """The PGD of every image, the sharp attack (None without group sizes) and how many images get it."""
    pgd = PGDConfig(steps=args.steps, draws=args.draws, eps_factor=args.eps_factor)
    sharp = None if not args.group_sizes else SharpConfig(
        group_sizes=tuple(args.group_sizes), steps=args.sharp_steps, draws=args.sharp_draws,
        estimate_draws=args.estimate_draws, confidence=args.confidence)
    return pgd, sharp, min(args.sharp_images, args.images)


def attack_runs(runs: list[CertificationRun], args: argparse.Namespace, pgd: PGDConfig, sharp: SharpConfig | None,
                sharp_images: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """Attack every run's first images: (one row per image, one row per sharp group, the figure's maps per
    "method, sigma")."""
    frames, group_frames, examples = [], [], {}
    for run in runs:
        run_start = time.perf_counter()
        result = attack_run(run, args.cache, images=args.images, pgd=pgd, sharp=sharp, sharp_images=sharp_images,
                            seed=args.seed, device=args.device, batch_size=args.batch_size)
        frames.append(result.images.assign(run_seconds=time.perf_counter() - run_start))
        group_frames.append(result.groups)
        examples[f"{run.method.label}, sigma {run.sigma:g}"] = result.maps
        print(f"{run.method.label} sigma={run.sigma:g}: {time.perf_counter() - run_start:.0f} s "
              f"(training included when the cache lacked the models)", flush=True)
    return pd.concat(frames, ignore_index=True), pd.concat(group_frames, ignore_index=True), examples


def run_parameters(args: argparse.Namespace, data: DataSpec, methods: list[Method], runs: list[CertificationRun],
                   pgd: PGDConfig, sharp: SharpConfig | None, sharp_images: int, seconds: float) -> dict[str, Any]:
    """The parameters recorded with the results: data, models, statistics, both attacks and the machine."""
    channels = int(data.load("test")[0][0].shape[0])
    return {
        "dataset": "phantom", "image_size": args.image_size, "channels": channels,
        "certified_space": f"[0, 1]^({channels}x{args.image_size}x{args.image_size})",
        "profile": args.profile, "arch": "unet",
        "methods": [method.label for method in methods], "sigmas": args.sigmas, "images": args.images,
        "n0": args.n0, "n": args.n, "alpha": args.alpha, "tau": args.tau, "seed": args.seed, "pgd": pgd_parameters(pgd),
        "loss": "SmoothAdv: cross-entropy of the certified class under the mean softmax of m draws, "
                "mean over the certified pixels of x; base model: cross-entropy of its clean prediction, "
                "pixels not yet flipped",
        "precision": runs[0].precision,
        "sharp": None if sharp is None else {**pgd_parameters(sharp), "images": sharp_images},
        "sharp_loss": "per group: mean over its pixels of log G_runner-up - log G_certified (soft smoothed "
                      "classifier, m fresh draws per step); runner-up: the most frequent other class in "
                      "estimate_draws fresh draws at x, ties by the soft probability",
        "sharp_estimate": "p = mean over the group's pixels of P[f(D(. + delta)) = certified class], from "
                          "estimate_draws draws common to x, the group's PGD image and a random direction of "
                          "length eps; Student-t interval at the confidence level over the i.i.d. per-draw "
                          "values; bound = Phi(Phi^-1(p_before_lower) - eps / sigma); drop_fraction = "
                          "(p_before - p_after) / (p_before - Phi(Phi^-1(p_before) - eps / sigma))",
        "device": args.device, "threads": args.threads, "machine": platform.platform(), "seconds": seconds,
        "figure": str(args.figure),
    }


def print_summary(frame: pd.DataFrame, groups: pd.DataFrame) -> None:
    """The attack's counts, one column per (method, sigma), and the sharp attack's per group size."""
    table = summarize_attack(frame).set_index(["method_label", "sigma"]).T
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.map(formatted).to_string())
        if not groups.empty:
            print(summarize_groups(groups).set_index(["method_label", "sigma", "group_pixels"]).T
                  .map(formatted).to_string())


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(args.threads)
    data = DataSpec("phantom", None, args.image_size, 0)
    training = resolved_training(training_spec(args.profile), args.device)
    methods = [ours("ddpm:auto"), segcertify()]
    runs = [CertificationRun(data=data, training=training, arch="unet", method=method, sigma=sigma, n0=args.n0,
                             n=args.n, alpha=args.alpha, tau=args.tau, precision=args.precision)
            for method in methods for sigma in args.sigmas]
    pgd, sharp, sharp_images = attack_settings(args)
    start = time.perf_counter()
    frame, groups, examples = attack_runs(runs, args, pgd, sharp, sharp_images)
    seconds = time.perf_counter() - start
    payload = attack_payload(frame, run_parameters(args, data, methods, runs, pgd, sharp, sharp_images, seconds), groups)
    write_json_atomically(payload, args.output)
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    figure(examples, args.figure)
    print_summary(frame, groups)
    print(f"{seconds:.0f} s in all; wrote {args.output} and {args.figure}")


def formatted(value: float) -> str:
    return f"{int(value)}" if float(value).is_integer() else f"{value:.4g}"


if __name__ == "__main__":
    main()
