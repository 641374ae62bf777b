"""Capacity-matched segmenter widths, chosen on the validation split.

Trains each candidate width of each architecture on a dataset's training split (bf16 autocast where
the CPU runs it natively, ``--patience`` epochs without a better validation Dice end it, at most
``--epochs``) and records its weights, its multiply-accumulates per image, the best validation Dice
(mean over foreground classes of the per-image Dice), the epoch it was reached at, the curve and the
seconds. The candidates stay within the budget of the ``matched`` preset (``medcert_core.training``):
the three architectures within 2x of each other in weights. The JSON also gives every preset's weights
and multiply-accumulates per image at this input (``"presets"``). The test split is never read.

    python scripts/choose_presets.py --dataset jsrt --data-root ../shared/data/jsrt --image-size 128
    python scripts/choose_presets.py --dataset cvc_clinicdb --data-root ../shared/data/cvc_clinicdb \\
        --image-size 144 192 --split-block 8 --flips --output results/preset_choice_cvc_clinicdb_val.json

A finished candidate is kept in the output and skipped when the script runs again with the same recipe
and input (resumable); an output of another recipe is refused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from medcert_core.data import load_dataset
from medcert_core.devices import git_commit, load_average, local_timestamp, machine_record, resolve_precision
from medcert_core.io import write_json_atomically
from medcert_core.models import IMAGE_ARCHITECTURES, create_model, model_capacity
from medcert_core.training import PRESETS, preset_capacity, train_segmenter

ROOT = Path(__file__).resolve().parents[1]
# name -> arch and model_kwargs, all within 2.2-4.2 M weights: UNet on a ResNet-18 encoder without its last
# stage (decoder widths 128-16 or 192-24), ResUNet++ at 12 or 16 base channels, DeepLabV2 on 3 ResNet-18 stages
CANDIDATES: dict[str, dict[str, Any]] = {
    "unet-r18-d4-dec128": {"arch": "unet", "model_kwargs": {
        "encoder_name": "resnet18", "encoder_depth": 4, "decoder_channels": [128, 64, 32, 16]}},
    "unet-r18-d4-dec192": {"arch": "unet", "model_kwargs": {
        "encoder_name": "resnet18", "encoder_depth": 4, "decoder_channels": [192, 96, 48, 24]}},
    "resunetpp-base12": {"arch": "resunetpp", "model_kwargs": {"base_channels": 12}},
    "resunetpp-base16": {"arch": "resunetpp", "model_kwargs": {"base_channels": 16}},
    "deeplabv2-r18-3stages": {"arch": "deeplabv2", "model_kwargs": {"backbone": "resnet18", "backbone_stages": 3}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--image-size", type=int, nargs="+", default=[128])
    parser.add_argument("--split-block", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=60, help="the most epochs (the cosine schedule's length)")
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--flips", action="store_true", help="random flips (not for chest X-rays)")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names of CANDIDATES")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if len(args.image_size) not in (1, 2):
        parser.error(f"--image-size takes SIZE or H W, got {args.image_size}")
    size = tuple(args.image_size) if len(args.image_size) == 2 else (args.image_size[0],) * 2
    output = args.output or ROOT / "results" / f"preset_choice_{args.dataset}_val.json"
    names = args.candidates.split(",")
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        parser.error(f"unknown candidates {unknown}; valid: {list(CANDIDATES)}")
    options = {"image_size": size, "split_block": args.split_block}
    train, val = (load_dataset(args.dataset, args.data_root, split, **options) for split in ("train", "val"))
    image, _ = train[0]
    recipe = {"preset": "matched", "max_epochs": args.epochs, "patience": args.patience, "flips": args.flips,
              "precision": resolve_precision("auto", "cpu"), "seed": 0}
    result = json.loads(output.read_text()) if output.is_file() else {"candidates": {}}
    if result["candidates"] and (result.get("recipe") != recipe or result.get("image_size") != list(size)
                                 or result.get("split_block") != args.split_block):
        parser.error(f"{output} holds candidates of another recipe or input ({result.get('recipe')}, "
                     f"{result.get('image_size')}, split block {result.get('split_block')}): give another --output")
    commit = git_commit(ROOT)
    result.update({
        "what": __doc__.split("\n\n")[0], "dataset": args.dataset, "image_size": list(size),
        "split_block": args.split_block, "train_images": len(train), "val_images": len(val),
        "recipe": recipe,
        "machine": machine_record(),
    })
    result["presets"] = {  # every preset's widths at this dataset's input, for the reference's table
        preset: {arch: preset_capacity(preset, arch, in_channels=image.shape[0], num_classes=len(train.class_names),
                                       size=size) for arch in IMAGE_ARCHITECTURES}
        for preset in PRESETS}
    for name in names:
        if name in result["candidates"]:
            print(f"{name}: done before, kept")
            continue
        candidate = CANDIDATES[name]
        load_before = load_average()[0]
        start = time.perf_counter()
        _, config, history = train_segmenter(
            train, val, arch=candidate["arch"], preset="matched", model_kwargs=candidate["model_kwargs"],
            epochs=args.epochs, patience=args.patience, flips=args.flips, seed=0, device="cpu", precision="auto",
            progress=False)
        curve = [round(float(v), 4) for v in history["val_dice"]]
        best = max(curve)
        result["candidates"][name] = {
            **candidate, **model_capacity(create_model(candidate["arch"], image.shape[0], len(train.class_names),
                                                       **candidate["model_kwargs"]), (1, image.shape[0], *size)),
            "best_val_dice": best, "best_epoch": curve.index(best) + 1, "epochs_run": len(curve),
            "val_dice_per_epoch": curve, "seconds": round(time.perf_counter() - start, 1),
            "load_average_before": load_before,
            "date": local_timestamp(), "commit": commit,
        }
        print(f"{name}: best val Dice {best} at epoch {curve.index(best) + 1} of {len(curve)}", flush=True)
        write_json_atomically(result, output)
    write_json_atomically(result, output)
    print(f"-> {output}")


if __name__ == "__main__":
    main()
