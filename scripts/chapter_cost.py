"""The time a dataset chapter's stored runs took, as committed JSON.

Each completed run's ``metadata.json`` records the seconds from its start to its end (for runs that
shared their draws, the group's time divided among its runs) and the commit and device it ran on.
A run trains the models it needs that are not cached yet, so the first run to need a segmenter or
a denoiser carries its training time: on a fresh cache the total is the chapter's whole cost, on a
warm one its certification alone. This script collects those of one dataset, so a chapter's cost
can be cited from a committed file rather than the ignored ``runs/`` folder.

    python scripts/chapter_cost.py --dataset isic2017 --out results/isic2017_chapter_cost.json
    python scripts/chapter_cost.py --dataset montgomery --image-size 256 --out results/montgomery_256_chapter_cost.json

A grid trains the models its chapters lack before running them (``study.warm``); those seconds are in no
run. Each model's completion marker in the model cache (``--cache``, default the user's) keeps what its
training took: ``models`` lists those of the dataset (at the size), beside the runs. Models marked before
markers kept it have none; for them ``--warm-up MODELS SECONDS`` records the grid log's wall time by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from medcert_core.devices import load_average, machine_record
from medcert_core.io import user_cache_dir, write_json_atomically
from medcert_core.study.runs.store import METADATA


def run_cost(metadata: dict[str, Any]) -> dict[str, Any]:
    """One run's setting (method, arch, sigma, test images) and its seconds (training of uncached models included)."""
    parameters = metadata["parameters"]
    return {"run": metadata["hash"], "method": parameters["method"], "arch": parameters["arch"],
            "sigma": parameters["sigma"], "test_images": parameters["test_images"],
            "image_size": parameters["data"]["image_size"],
            "training_seed": parameters["training"].get("training_seed"),
            "seconds": round(float(metadata["seconds"]), 1), "device": metadata["device"],
            "git_commit": metadata["git_commit"], "finished": metadata["finished"]}


def chapter_costs(results_dir: Path, dataset: str, image_size: int | None = None) -> list[dict[str, Any]]:
    """Every completed run of ``dataset`` (at ``image_size`` px, None: any) in the results store, in the order
    they finished."""
    runs = [json.loads(path.read_text()) for path in sorted(results_dir.glob(f"runs/*/{METADATA}"))]
    mine = [run_cost(run) for run in runs if run["parameters"]["data"]["dataset"] == dataset
            and image_size in (None, run["parameters"]["data"]["image_size"])]
    return sorted(mine, key=lambda run: run["finished"])


def model_costs(cache: Path, dataset: str, image_size: int | None = None) -> list[dict[str, Any]]:
    """The training record of every cached model of ``dataset`` (at ``image_size`` px, None: any) whose
    completion marker has one: segmenters (``<dataset>_<size>_...``) and denoisers (``ddpm_`` / ``unet_``
    before it), in the order they finished."""
    size = r"\d+(?:x\d+)?" if image_size is None else str(image_size)
    name = re.compile(rf"^(?:ddpm_|unet_)?{re.escape(dataset)}_{size}_")
    markers = [json.loads(path.read_text()) for folder in ("segmenters", "denoisers")
               for path in sorted((cache / folder).glob("*.complete"))]
    models = [{"model": marker["model"], "seconds": marker["training"]["seconds"],
               "threads": marker["training"]["machine"]["torch_threads"],
               "load_average": marker["training"]["load_average"], "finished": marker["training"]["finished"]}
              for marker in markers if "training" in marker and name.match(marker["model"])]
    return sorted(models, key=lambda model: model["finished"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--image-size", type=int, default=None, help="only runs at this size (default: any)")
    parser.add_argument("--results", type=Path, default=Path("runs/results"), help="the results store")
    parser.add_argument("--cache", type=Path, default=None,
                        help="the model cache whose markers record each model's training (default: the user's, "
                             "$MEDCERT_CACHE else ~/.cache/medcert)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--warm-up", nargs=2, type=float, default=None, metavar=("MODELS", "SECONDS"),
                        help="models the grid's warm-up trained before the runs and its wall seconds (its log's "
                             "'[medcert] N models trained in S s'): not in the runs' own seconds")
    args = parser.parse_args(argv)
    runs = chapter_costs(args.results, args.dataset, args.image_size)
    at_size = "" if args.image_size is None else f" at {args.image_size} px"
    if not runs:
        parser.error(f"no completed run of dataset {args.dataset!r}{at_size} in {args.results}")
    total = sum(run["seconds"] for run in runs)
    models = model_costs(args.cache or user_cache_dir(), args.dataset, args.image_size)
    write_json_atomically({
        "what": (f"seconds of every stored {args.dataset} run{at_size}, start to end: certification, and the training of "
                 f"the models the run needed that were not cached yet (the first run to need one trains it)"),
        "total_seconds": round(total, 1), "runs": runs,
        "models": {"what": ("each cached model's training seconds, from its completion marker (of the process "
                            "that finished it): a model a run trained is also in that run's seconds, one the "
                            "grid's warm-up trained in none"),
                   "seconds": round(sum(model["seconds"] for model in models), 1), "trained": models},
        **({"warm_up": {"models": int(args.warm_up[0]), "wall_seconds": round(args.warm_up[1], 1),
                        "what": "models trained before the runs, in one-thread processes, one per CPU core"}}
           if args.warm_up else {}),
        "machine": machine_record(),
        "load_average_when_written": load_average()}, args.out)
    print(f"{len(runs)} runs of {args.dataset}{at_size}: {total:.0f} s ({total / 60:.1f} min); "
          f"{len(models)} models with a training record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
