"""The validation Dice per epoch of cached segmenters, read from their checkpoints, as committed JSON.

Training keeps the weights of the epoch with the best validation Dice (mean foreground Dice on the
validation split) and writes that history into each checkpoint; this script only reads it, so a
recipe choice such as the number of epochs can be judged on the validation split, never the test one.

    python scripts/segmenter_history.py ~/.cache/medcert/segmenters/folder_128_*_e5_*.pt \\
        --out results/cxr_lungs_segmenters_val.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from medcert_core.io import load_weights, write_json_atomically


def history_record(checkpoint: Path) -> dict[str, Any]:
    """One checkpoint's recipe (arch, size, training noise, epochs) and validation Dice per epoch."""
    saved = load_weights(checkpoint, map_location="cpu")
    config = saved["config"]
    history = saved["history"]
    return {
        "model": checkpoint.name,
        "arch": config["arch"],
        "image_size": config["image_size"],
        "noise_sigma": config["noise_sigma"],
        "epochs": len(history),
        "val_dice_per_epoch": [round(float(row["val_dice"]), 4) for row in history],
        "loss_per_epoch": [round(float(row["loss"]), 4) for row in history],
        "best_val_dice": round(float(saved["best_val_dice"]), 4),
        "best_epoch": 1 + max(range(len(history)), key=lambda index: history[index]["val_dice"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="segmenter checkpoints (.pt)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    records = [history_record(path) for path in sorted(args.checkpoints)]
    write_json_atomically({"what": "validation mean foreground Dice per epoch (the best epoch's weights are kept)",
                           "segmenters": records}, args.out)
    for record in records:
        print(f"{record['model']}: best val Dice {record['best_val_dice']:.3f} at epoch {record['best_epoch']} "
              f"of {record['epochs']} ({record['val_dice_per_epoch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
