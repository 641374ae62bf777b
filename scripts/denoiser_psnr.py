"""PSNR of the denoisers on a dataset's test split: noisy input, single- and multi-step DDPM, UNet.

Trains what it needs on the training split (cached under --cache, resumable), then writes JSON:

    python scripts/denoiser_psnr.py --dataset jsrt --data-root ../shared/data/jsrt --image-size 128
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from medcert_core.data import load_dataset
from medcert_core.denoisers import load_denoiser, train_ddpm, train_unet_denoiser
from medcert_core.denoisers.gate import psnr_row
from medcert_core.io import write_json_atomically


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="jsrt")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--ddpm-steps", type=int, default=400, help="training steps of the DDPM")
    parser.add_argument("--unet-steps", type=int, default=800, help="training steps of each UNet denoiser")
    parser.add_argument("--multi-steps", type=int, default=10, help="model calls of multi-step denoising")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", type=Path, default=Path("runs"))
    parser.add_argument("--output", type=Path, default=Path("results") / "jsrt_denoiser_psnr.json")
    args = parser.parse_args()

    options = {"image_size": args.image_size}
    train = load_dataset(args.dataset, args.data_root, "train", **options)
    test = load_dataset(args.dataset, args.data_root, "test", **options)
    tag = f"{args.dataset}_{args.image_size}"
    start = time.perf_counter()
    ddpm = train_ddpm(train, args.cache / f"ddpm_{tag}", image_size=args.image_size, steps=args.ddpm_steps,
                      batch_size=args.batch_size, max_sigma=max(args.sigmas), device=args.device)
    unets = {sigma: train_unet_denoiser(train, sigma, args.cache / f"unet_denoiser_{tag}_sigma{sigma}",
                                        steps=args.unet_steps, batch_size=args.batch_size, device=args.device)
             for sigma in args.sigmas}
    training_seconds = time.perf_counter() - start

    clean = torch.stack([test[i][0] for i in range(len(test))])
    rows = []
    for sigma in args.sigmas:
        noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
        denoisers = {
            "noisy input": None,
            "ddpm single-step": load_denoiser(f"ddpm:{ddpm}", sigma),
            f"ddpm multi-step ({args.multi_steps})": load_denoiser(
                f"ddpm:{ddpm}", sigma, steps=args.multi_steps, generator=torch.Generator().manual_seed(1)),
            "unet denoiser": load_denoiser(f"unet:{unets[sigma]}", sigma),
        }
        for name, denoiser in denoisers.items():
            rows.append(psnr_row(denoiser, noisy, clean, sigma=sigma, name=name, batch_size=args.batch_size))
            print(f"sigma {sigma:4}  {name:24} PSNR {rows[-1]['psnr_db']:6.2f} dB")
    result = {
        "dataset": args.dataset, "split": "test", "image_size": args.image_size, "rows": rows,
        "ddpm": {"folder": str(ddpm), "training_steps": args.ddpm_steps, "preset": "tiny",
                 "model_resolution": args.image_size, "timesteps_trained": f"0..t*(sigma={max(args.sigmas)})"},
        "unet_denoiser_training_steps": args.unet_steps, "training_seconds": training_seconds,
        "device": str(torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")),
        "machine": platform.platform(),
    }
    write_json_atomically(result, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
