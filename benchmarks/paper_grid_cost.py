"""How long the paper grid's certifications take on one device, from a measured seconds per image.

Counts the certified images of every run in grids/paper.yaml, the way its chapters build their
runs (dataset chapters: ours for every architecture and SegCertify for the first or, with
``baselines_for: all`` (the template's or the grid's value), for every architecture; the comparison
chapter shares its runs with JSRT's; the ablations add k-step DDPM, the UNet denoiser and no
denoiser), each over the whole test split (medcert's split: 70 / 10 / 20 % of the distributed
images), at every sigma. A run through the diffusion model costs ``steps`` images' worth of
denoiser calls; runs without the DDPM (SegCertify, the UNet denoiser, no denoiser) are counted
apart. Training is not included.

    python benchmarks/paper_grid_cost.py                                   # counts only
    python benchmarks/paper_grid_cost.py --seconds-per-image 0.45 --paper-seconds-per-image 32
    python benchmarks/paper_grid_cost.py --from-json benchmarks/results/bench_pipeline_paper_cuda.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from medcert_core.data.base import split_ids
from medcert_core.study.grid.spec import template_parameters

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTED_IMAGES = {  # annotated images as distributed (what medcert's loaders find)
    "jsrt": 247, "montgomery": 138, "shenzhen": 566, "isic2018": 2594, "cvc_clinicdb": 612,
}
DATASET_CHAPTERS = ("jsrt", "montgomery", "shenzhen", "isic2018", "cvc_clinicdb")


def test_images(dataset: str) -> int:
    """The size of medcert's test split of a dataset (the images left after train and val)."""
    return len(split_ids([str(i) for i in range(DISTRIBUTED_IMAGES[dataset])], "test", seed=0))


def chapter_runs(entry: dict, defaults: dict) -> list[tuple[str, str, str | int]]:
    """(arch, method, denoiser steps) of a grid entry's certification runs at one sigma."""
    notebook = entry["notebook"]
    template = template_parameters(ROOT / "notebooks" / f"{notebook}.ipynb") or {}
    parameters = {**template, **defaults, **entry.get("parameters", {})}
    if notebook in DATASET_CHAPTERS:
        archs = parameters["archs"]
        baselines = archs if parameters.get("baselines_for", "first") == "all" else archs[:1]
        return [(arch, "ours-ddpm", 1) for arch in archs] + [(arch, "segcertify", 0) for arch in baselines]
    arch = parameters["arch"]
    if notebook == "segcertify_vs_ours":
        return [(arch, "ours-ddpm", 1), (arch, "segcertify", 0)]
    if notebook == "ablation_denoising_steps":
        return [(arch, "ours-ddpm", 1)] + [(arch, f"ours-ddpm-{k}", int(k)) for k in parameters["multi_steps"]]
    if notebook == "ablation_denoiser":
        return [(arch, "ours-ddpm", 1), (arch, "ours-unet-denoiser", 0), (arch, "ours-none", 0)]
    raise ValueError(f"unknown chapter {notebook!r}")


def count(grid_file: Path) -> dict:
    """Distinct runs (shared between chapters as the results store shares them) and their images."""
    grid = yaml.safe_load(grid_file.read_text())
    defaults = grid["parameters"]
    runs = set()
    for entry in grid["runs"]:
        dataset = entry["parameters"]["dataset"]
        for arch, method, steps in chapter_runs(entry, defaults):
            for sigma in defaults["sigmas"]:
                runs.add((dataset, arch, method, steps, sigma))
    diffusion_images = sum(test_images(d) * steps for d, _, m, steps, _ in runs if m.startswith("ours-ddpm"))
    other_images = sum(test_images(d) for d, _, m, _, _ in runs if not m.startswith("ours-ddpm"))
    return {
        "grid": str(grid_file.relative_to(ROOT)), "test_images": {d: test_images(d) for d in DISTRIBUTED_IMAGES},
        "runs": len(runs), "draws_per_image": defaults["n0"] + defaults["n"],
        "diffusion_image_equivalents": diffusion_images, "images_without_diffusion": other_images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, default=ROOT / "grids" / "paper.yaml")
    parser.add_argument("--seconds-per-image", type=float, default=None, help="medcert, one image through the DDPM")
    parser.add_argument("--paper-seconds-per-image", type=float, default=None, help="the paper code's approach")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="a bench_pipeline JSON: takes its best medcert setting and its reference")
    args = parser.parse_args()
    result = count(args.grid)
    seconds = {"medcert": args.seconds_per_image, "paper code": args.paper_seconds_per_image}
    if args.from_json:
        bench = json.loads(args.from_json.read_text())
        seconds["medcert"] = min(entry["seconds_per_image"] for entry in bench["medcert"].values()
                                 if isinstance(entry, dict) and "seconds_per_image" in entry)
        seconds["paper code"] = bench["reference"]["seconds_per_image"]
        result["device"] = bench.get("device")
    print(json.dumps(result, indent=2))
    for name, value in seconds.items():
        if value:
            # images without the diffusion model are counted at the full per-image cost: an upper bound
            hours = (result["diffusion_image_equivalents"] + result["images_without_diffusion"]) * value / 3600
            print(f"{name}: {value:g} s per image -> at most {hours:.1f} h for the grid's certifications")


if __name__ == "__main__":
    main()
