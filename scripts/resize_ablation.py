"""How the DDPM's input is shrunk to its resolution: box (area) averaging against an antialiased
bilinear filter, measured in PSNR and in certified Dice on JSRT.

A box average by an integer factor keeps i.i.d. smoothing noise i.i.d. (std sigma / factor), the
noise the DDPM was trained on; an antialiased bilinear filter leaves neighbouring noise values
correlated. Both ways use the ``jsrt`` profile's cached DDPM (its 64 px model under the 128 px
input) and the same noise; only the shrink differs (and t*, from that shrink's noise factor). The
choice is made on the PSNR of the validation split (``--split val``, the default); the certified
Dice of the first test images only reports what the choice is worth.
Needs the profile's models cached (``./run.sh study --profile jsrt ...`` trains them):

    python scripts/resize_ablation.py --data-root ../shared/data/jsrt
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from medcert_core.denoisers import load_denoiser
from medcert_core.denoisers.diffusion import SHRINKS, resize_noise_factor
from medcert_core.denoisers.gate import psnr_row
from medcert_core.io import user_cache_dir, write_json_atomically
from medcert_core.metrics import MetricAccumulator, paired_bootstrap_interval
from medcert_core.smoothing import Execution, SmoothedSegmenter, image_seed
from medcert_core.study.runs import assets
from medcert_core.study.settings import DataSpec, TrainingSpec
from medcert_core.study.runs.run import CertificationRun, ours
from medcert_core.study.settings import resolved_training, training_spec


def certified_rows(data: DataSpec, training: TrainingSpec, ddpm: str, arch: str, sigma: float,
                   count: int, args: argparse.Namespace, shrink: str) -> list[dict]:
    """Certified scores (one row per image x class) of ``arch`` behind the single-step DDPM at ``sigma``, its
    input shrunk by ``shrink``: the run's segmenter, execution and per-image seeds, as ``runs.compute``
    certifies them (the box rows are the JSRT chapter's for these images). Its own loop, because
    ``runs.compute`` builds the study's denoiser, which always shrinks by box."""
    run = CertificationRun(data, training, arch, ours(ddpm), sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                           tau=args.tau, test_images=count)
    model, config = assets.segmenter(args.cache, data, training, arch, run.method.train_noise, "cpu")
    smoothed = SmoothedSegmenter(model, config.num_classes, sigma, denoiser=load_denoiser(ddpm, sigma, shrink=shrink),
                                 device="cpu", precision=run.precision, **Execution().options())
    test_set = data.load("test")
    accumulator = MetricAccumulator(config.class_names)
    for index in range(min(count, len(test_set))):
        image, target = test_set[index]
        generator = torch.Generator().manual_seed(image_seed(data.seed, test_set.ids[index]))
        certificate = smoothed.certify(image, run.n0, run.n, tau=run.tau, alpha=run.alpha, generator=generator)
        accumulator.add(certificate.labels, target, image_id=str(test_set.ids[index]), sigma=sigma)
    return accumulator.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/jsrt")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--certify-sigmas", type=float, nargs="*", default=[0.5, 1.0],
                        help="sigmas certified on the first test images (none: the PSNR choice alone)")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="split of the PSNR comparison that chooses the shrink (default val)")
    parser.add_argument("--certify-images", type=int, default=10, help="first N test images certified (reported)")
    parser.add_argument("--arch", default="resunetpp")
    parser.add_argument("--n0", type=int, default=10)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--tau", type=float, default=0.75)
    parser.add_argument("--cache", type=Path, default=user_cache_dir())
    parser.add_argument("--output", type=Path, default=Path("results") / "jsrt_resize_ablation.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = DataSpec("jsrt", args.data_root, args.image_size)
    training = resolved_training(training_spec("jsrt"), "cpu")
    folder = assets.ddpm_folder(args.cache, data, training)
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"the jsrt profile's DDPM is not cached at {folder}; run the jsrt study first")
    ddpm = f"ddpm:{folder}"
    chooser = data.load(args.split)
    clean = torch.stack([chooser[i][0] for i in range(len(chooser))])
    psnr, certified = [], []
    for way in SHRINKS:
        for sigma in args.sigmas:
            noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
            row = psnr_row(load_denoiser(ddpm, sigma, shrink=way), noisy, clean, sigma=sigma, name="ddpm single-step")
            psnr.append(row | {"shrink": way})
            print(f"{way:8} sigma {sigma:4}  PSNR {row['psnr_db']:6.2f} dB", flush=True)
        for sigma in args.certify_sigmas:
            rows = certified_rows(data, training, ddpm, args.arch, sigma, args.certify_images, args, way)
            certified += [row | {"shrink": way} for row in rows]
            means = {name: sum(r["dice"] for r in rows if r["class_name"] == name) / args.certify_images
                     for name in ("lung", "heart", "clavicle")}
            abstain = sum(r["abstain"] for r in rows if r["class_id"] == 0) / args.certify_images
            print(f"{way:8} sigma {sigma:4}  certified Dice " + " ".join(f"{k} {v:.3f}" for k, v in means.items())
                  + f"  abstain {100 * abstain:.1f} %", flush=True)
    write_json_atomically({
        "question": "box (area) against antialiased bilinear shrinking of the DDPM's input",
        "ddpm": str(folder), "image_size": args.image_size, "model_resolution": assets.ddpm_image_size(data, training),
        "psnr_split": args.split, "psnr_images": len(chooser), "psnr": psnr,
        "psnr_box_minus_bilinear": box_minus_bilinear(psnr, args.sigmas), "certify": {
            "arch": args.arch, "test_images": args.certify_images, "n0": args.n0, "n": args.n, "alpha": args.alpha,
            "tau": args.tau, "rows": certified},
        "noise_factor": {way: _noise_factor(way, args.image_size, data, training) for way in SHRINKS},
        "machine": platform.platform(),
    }, args.output)
    print(f"wrote {args.output}")


def box_minus_bilinear(psnr: list[dict], sigmas: list[float]) -> dict[str, dict[str, float]]:
    """Per sigma: the mean paired PSNR difference box - bilinear (same images, same noise) in dB, with its
    95 % bootstrap interval over images."""
    per_image = {(row["shrink"], row["sigma"]): row["psnr_db_per_image"] for row in psnr}
    return {f"{sigma:g}": paired_bootstrap_interval([box - bilinear for box, bilinear in
                                                     zip(per_image[("box", sigma)], per_image[("bilinear", sigma)])])
            for sigma in sigmas}


def _noise_factor(way: str, size: int, data: DataSpec, training: TrainingSpec) -> float:
    model = assets.ddpm_image_size(data, training)
    return resize_noise_factor((size, size), model, way)


if __name__ == "__main__":
    main()
