"""Command line: ``python -m medcert_core COMMAND`` (also the ``medcert`` console script).

    demo       train a tiny segmenter on the embedded phantoms (cached) and certify test images
    train      train a segmenter on a dataset split and save its checkpoint (resumable)
    evaluate   plain (no noise) test Dice of a checkpoint; appends to a results JSON
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from medcert_core.data import DATASET_NAMES, load_dataset
from medcert_core.io import write_json_atomically
from medcert_core.metrics import MetricAccumulator
from medcert_core.models import ARCHITECTURES
from medcert_core.smoothing import SmoothedSegmenter, resolve_device
from medcert_core.training import PRESETS, evaluate_segmenter, load_segmenter, train_segmenter


def _image_size(text: str | None) -> int | tuple[int, int] | None:
    if text is None:
        return None
    parts = [int(part) for part in text.lower().replace("x", ",").split(",")]
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="phantom", choices=DATASET_NAMES)
    parser.add_argument("--data-root", default=None, help="dataset folder (not needed for phantom)")
    parser.add_argument("--image-size", default=None, help="e.g. 256 or 384x512 (default: the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def _datasets(args: argparse.Namespace, *splits: str):
    return [
        load_dataset(args.dataset, args.data_root, split, image_size=_image_size(args.image_size), seed=args.seed)
        for split in splits
    ]


def per_class_means(frame: pd.DataFrame) -> dict[str, float]:
    """Mean per-image Dice of each class: {class_name: dice}."""
    return {name: float(value) for name, value in frame.groupby("class_name", sort=False)["dice"].mean().items()}


def command_train(args: argparse.Namespace) -> None:
    train_set, val_set = _datasets(args, "train", "val")
    start = time.perf_counter()
    _, config, history = train_segmenter(
        train_set, val_set, arch=args.arch, preset=args.preset, noise_sigma=args.noise_sigma, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, checkpoint=args.checkpoint, device=args.device,
    )
    print(history.tail(3).to_string(index=False))
    print(f"trained {config.arch} in {time.perf_counter() - start:.0f} s -> {args.checkpoint}")


def command_evaluate(args: argparse.Namespace) -> None:
    model, config = load_segmenter(args.checkpoint, device=resolve_device(args.device))
    (test_set,) = _datasets(args, "test")
    frame = evaluate_segmenter(model, test_set, config.class_names, device=args.device)
    dice = per_class_means(frame)
    print(f"{config.arch} on {args.dataset} test ({len(test_set)} images): "
          + ", ".join(f"{name} {value:.3f}" for name, value in dice.items()))
    if args.results:
        path = Path(args.results)
        results = json.loads(path.read_text()) if path.exists() else []
        results = [entry for entry in results if entry.get("checkpoint") != str(args.checkpoint)]
        results.append({
            "checkpoint": str(args.checkpoint), "dataset": args.dataset, "arch": config.arch,
            "image_size": list(config.image_size), "noise_sigma": config.noise_sigma, "epochs": config.epochs,
            "preset": config.preset, "model_kwargs": config.model_kwargs, "test_images": len(test_set),
            "test_dice": dice, "device": str(resolve_device(args.device)),
        })
        write_json_atomically(results, path)
        print(f"wrote {path}")


def command_demo(args: argparse.Namespace) -> None:
    train_set, val_set, test_set = _datasets(args, "train", "val", "test")
    checkpoint = Path(args.cache) / f"demo_{args.arch}_sigma{args.sigma}.pt"
    model, config, _ = train_segmenter(
        train_set, val_set, arch=args.arch, preset="tiny", noise_sigma=args.sigma, epochs=args.epochs,
        seed=args.seed, checkpoint=checkpoint, device=args.device,
    )
    smoothed = SmoothedSegmenter(model, config.num_classes, args.sigma, batch_size=args.batch_size, device=args.device)
    accumulator = MetricAccumulator(config.class_names)
    generator = torch.Generator(device=smoothed.device).manual_seed(args.seed)
    for index in range(min(args.images, len(test_set))):
        image, mask = test_set[index]
        certificate = smoothed.certify(image, args.n0, args.n, alpha=args.alpha, generator=generator)
        accumulator.add(certificate.labels, mask, image_id=test_set.ids[index])
    summary = accumulator.summary()
    summary = summary[summary["class_id"] > 0]
    print(f"\nSegCertify-style certificate of a tiny {args.arch} (trained with noise sigma = {args.sigma}) on "
          f"{len(accumulator.to_frame()['image_id'].unique())} phantom test images; n0 = {args.n0}, n = {args.n}, "
          f"alpha = {args.alpha}, radius R = {certificate.radius:.3f}")
    print(summary[["class_name", "dice", "iou", "abstain_in_class", "abstain"]].to_string(index=False, float_format="%.3f"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medcert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a segmenter")
    _add_data_arguments(train)
    train.add_argument("--arch", default="unet", choices=ARCHITECTURES)
    train.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    train.add_argument("--noise-sigma", type=float, default=0.0, help="Gaussian noise augmentation (SegCertify: 0.25)")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--checkpoint", required=True, help="where to save (and resume from)")
    train.set_defaults(run=command_train)

    evaluate = commands.add_parser("evaluate", help="plain test Dice of a checkpoint")
    _add_data_arguments(evaluate)
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--results", default=None, help="JSON file to add the result to")
    evaluate.set_defaults(run=command_evaluate)

    demo = commands.add_parser("demo", help="certify phantom test images with a tiny model")
    _add_data_arguments(demo)
    demo.add_argument("--arch", default="unet", choices=ARCHITECTURES)
    demo.add_argument("--sigma", type=float, default=0.25)
    demo.add_argument("--epochs", type=int, default=None)
    demo.add_argument("--images", type=int, default=4)
    demo.add_argument("--n0", type=int, default=10)
    demo.add_argument("--n", type=int, default=100)
    demo.add_argument("--alpha", type=float, default=0.001)
    demo.add_argument("--batch-size", type=int, default=22)
    demo.add_argument("--cache", default="cache", help="folder for trained models")
    demo.set_defaults(run=command_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
