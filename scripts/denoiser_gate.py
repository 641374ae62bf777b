"""The MMSE gate of a profile's in-project DDPM: does it earn its place as the denoiser?

A well-trained single-step estimate is the posterior mean E[x | x + delta], the minimum-MSE
estimate: a sampled multi-step chain cannot beat it in PSNR, and neither should a UNet trained
to denoise one sigma. On the validation split (a choice: the test split only reports), at every
sigma, the gate checks

    PSNR(single-step) >= PSNR(multi-step)   and   PSNR(single-step) >= PSNR(UNet denoiser)

for the very models the profile trains (``ddpm:auto`` and ``unet:auto`` from its TrainingSpec,
trained here when the cache lacks them: resumable). Writes a JSON table and exits 1 when the gate
fails:

    python scripts/denoiser_gate.py --profile jsrt --data-root ../shared/data/jsrt --image-size 128

Volumes (``--dataset hippocampus``, ``--image-size D H W`` or none: the padded size of the task) get the 3D
DDPM at their own size (a profile without ``ddpm_image_size``, or ``--training "{ddpm_image_size: null}"``),
and each volume's PSNR is over its real voxels only (``dataset.real_voxels``), not the padding.

Rows that are reported, not gated: ``--ffdnet FILE`` adds the off-the-shelf FFDNet
(``ffdnet:<file.pth>``) with the shrink above 75/255 (box average to its trained range) and without it
(full resolution, noise map at sigma); ``--other-ddpm NOTE=FOLDER`` (repeatable) adds a DDPM trained on
another dataset, single-step, e.g. ``--other-ddpm "trained on jsrt=~/.cache/medcert/denoisers/ddpm_jsrt_..."``.
The JSON's ``best_per_sigma`` names, per sigma, the denoiser a chapter could certify with (the own DDPM's
single step and the reported rows) of highest validation PSNR: the chapter's choice. ``--no-unet-rival``
leaves the UNet denoisers (three trainings) out; the gate then compares single- and multi-step only.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

from medcert_core.data import IMAGE_DATASET_NAMES
from medcert_core.denoisers import load_denoiser
from medcert_core.denoisers.gate import best_per_sigma, mmse_gate_failures, paired_psnr_differences, psnr_row
from medcert_core.io import user_cache_dir, write_json_atomically
from medcert_core.study.runs.assets import ddpm_image_size, resolve_denoiser_spec
from medcert_core.study.settings import DataSpec, resolved_training, training_spec

SINGLE, MULTI, UNET = "ddpm single-step", "ddpm multi-step", "unet denoiser"
FFDNET, FFDNET_FULL = "ffdnet (box shrink above 75/255)", "ffdnet (no shrink)"


def other_ddpm(text: str) -> tuple[str, str]:
    """argparse type of --other-ddpm: NOTE=FOLDER."""
    note, separator, folder = text.partition("=")
    if not separator or not note or not folder:
        raise argparse.ArgumentTypeError(f"expected NOTE=FOLDER, got {text!r}")
    return note, folder


def reported_denoisers(args: argparse.Namespace, sigma: float) -> dict[str, torch.nn.Module]:
    """The rows next to the gate: FFDNet with and without its shrink, DDPMs of other datasets."""
    rows = {}
    if args.ffdnet:
        rows[FFDNET] = load_denoiser(f"ffdnet:{args.ffdnet}", sigma)
        rows[FFDNET_FULL] = load_denoiser(f"ffdnet:{args.ffdnet}", sigma, shrink="none")
    for note, folder in args.other_ddpm:
        rows[f"ddpm single-step, {note}"] = load_denoiser(f"ddpm:{folder}", sigma)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="jsrt")
    parser.add_argument("--dataset", default="jsrt")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--image-size", type=int, nargs="*", default=None, metavar="N",
                        help="input size: N (square) or H W, e.g. 144 192 (default 128); volumes: D H W (default: the "
                             "largest extent of each axis over the task's volumes)")
    parser.add_argument("--split-block", type=int, default=0,
                        help="0: random split per case; k: runs of k consecutive ids in one split (video)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--multi-steps", type=int, default=10, help="model calls of the multi-step chain")
    parser.add_argument("--training", type=yaml.safe_load, default=None,
                        help='YAML overrides of the profile\'s training, e.g. "{ddpm_steps: 50}"')
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="images the gate is measured on: val (default; the gate chooses the denoiser) or "
                             "test (to report, never to choose)")
    parser.add_argument("--images", type=int, default=None, help="first N images of the split (default: all)")
    parser.add_argument("--ffdnet", type=Path, default=None, help="report FFDNet rows from this ffdnet_color.pth")
    parser.add_argument("--other-ddpm", type=other_ddpm, action="append", default=[], metavar="NOTE=FOLDER",
                        help="report a DDPM trained on another dataset (repeatable)")
    parser.add_argument("--no-unet-rival", action="store_true",
                        help="leave the UNet denoisers out (no training): the gate compares single- and multi-step")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=user_cache_dir())
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON table (default: results/<dataset>_denoiser_gate_<split>.json)")
    args = parser.parse_args()

    volumes = args.dataset not in IMAGE_DATASET_NAMES
    if volumes:
        if args.image_size and len(args.image_size) != 3:
            parser.error(f"--image-size of a volume dataset takes D H W (or nothing), got {args.image_size}")
        if args.image_size:
            image_size = tuple(args.image_size)
        else:  # the task's padded size (the largest extent of each axis), which the cache's names then say
            image_size = tuple(DataSpec(args.dataset, args.data_root, None, split_block=args.split_block)
                               .load(args.split).image_size)
    else:
        sizes = args.image_size if args.image_size is not None else [128]
        if len(sizes) not in (1, 2):
            parser.error(f"--image-size takes N or H W, got {sizes}")
        image_size = sizes[0] if len(sizes) == 1 else tuple(sizes)
    data = DataSpec(args.dataset, args.data_root, image_size, split_block=args.split_block)
    training = resolved_training(training_spec(args.profile).with_overrides(args.training), args.device)
    start = time.perf_counter()
    ddpm = resolve_denoiser_spec("ddpm:auto", max(args.sigmas), args.cache, data, training, args.device)
    unets = {} if args.no_unet_rival else {
        sigma: resolve_denoiser_spec("unet:auto", sigma, args.cache, data, training, args.device) for sigma in args.sigmas}
    training_seconds = time.perf_counter() - start

    images = data.load(args.split)
    count = min(args.images or len(images), len(images))
    clean = torch.stack([images[i][0] for i in range(count)])
    real_voxels = getattr(images, "real_voxels", None)  # a padded volume scores its own voxels only
    valid = torch.stack([real_voxels(i) for i in range(count)]) if real_voxels is not None else None
    rows = []
    for sigma in args.sigmas:
        noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
        denoisers = {
            "noisy input": None,
            SINGLE: load_denoiser(ddpm, sigma),
            MULTI: load_denoiser(ddpm, sigma, steps=args.multi_steps, generator=torch.Generator().manual_seed(1)),
            **({UNET: load_denoiser(unets[sigma], sigma)} if unets else {}),
            **reported_denoisers(args, sigma),
        }
        for name, denoiser in denoisers.items():
            rows.append(psnr_row(denoiser, noisy, clean, sigma=sigma, name=name, batch_size=args.batch_size,
                                 valid=valid))
            print(f"sigma {sigma:4}  {name:18} PSNR {rows[-1]['psnr_db']:6.2f} dB", flush=True)
    failures = mmse_gate_failures({(row["sigma"], row["denoiser"]): row["psnr_db"] for row in rows},
                                  args.sigmas, single=SINGLE, rivals=(MULTI, UNET) if unets else (MULTI,))
    candidates = [SINGLE, *reported_denoisers(args, args.sigmas[0])]
    result = {
        "gate": ("PSNR(single-step) >= PSNR(multi-step) and >= PSNR(UNet denoiser) at every sigma" if unets else
                 "PSNR(single-step) >= PSNR(multi-step) at every sigma (no UNet rival: --no-unet-rival)"),
        "best_per_sigma": {str(sigma): name for sigma, name in best_per_sigma(rows, candidates).items()},
        "passed": not failures, "failures": failures, "rows": rows,
        "paired_against_single_step": paired_psnr_differences(rows, SINGLE),
        "dataset": args.dataset, "split": args.split, "images": count, "image_size": image_size,
        "split_block": args.split_block,
        "profile": args.profile, "training": training.__dict__ | {"ddpm_focus_sigmas": list(training.ddpm_focus_sigmas)},
        "ddpm": {"folder": ddpm.partition(":")[2],
                 "resolution": ddpm_image_size(data, training) or "each volume's own size (3D DDPM)"},
        "psnr_over": "real voxels (padding left out)" if valid is not None else "every pixel",
        "reported_not_gated": {"ffdnet": str(args.ffdnet) if args.ffdnet else None,
                               "other_ddpms": dict(args.other_ddpm)},
        "multi_steps": args.multi_steps, "training_seconds": training_seconds, "device": args.device,
        "machine": platform.platform(),
    }
    output = args.output or Path("results") / f"{args.dataset}_denoiser_gate_{args.split}.json"
    write_json_atomically(result, output)
    print(("gate passed" if not failures else "gate FAILED:\n  " + "\n  ".join(failures)) + f"; wrote {output}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
