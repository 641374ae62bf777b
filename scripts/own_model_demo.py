"""The "Certify your own model" page, end to end, as a user with an exported model and a DICOM file would.

1. Export a segmenter with ``torch.export`` (dynamic batch), here the JSRT ResUNet++ the jsrt profile
   caches (any nn.Module would do).
2. Write a held-out JSRT test image as a hospital exports a radiograph: a 12-bit MONOCHROME1 DICOM
   (high value = dark) with a VOI window.
3. ``python -m medcert_core certify patient.dcm --model model.pt2 --intensity voi ...``: label maps,
   the overlay with its legend and the JSON, written to ``book/figures/own_model/``.

    python scripts/own_model_demo.py --checkpoint ~/.cache/medcert/segmenters/jsrt_128_resunetpp_..._data<digest>.pt \\
        --denoiser ddpm:~/.cache/medcert/denoisers/ddpm_jsrt_128_..._data<digest> --data-root ../shared/data/jsrt

The book page reads the committed outputs; rerun this script to refresh them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from medcert_core.data import load_dataset
from medcert_core.data.base import read_gray
from medcert_core.testing.medical_files import write_dicom
from medcert_core.training import load_segmenter

OUTPUT = Path("book/figures/own_model")
WORK = Path("runs/own_model")  # the exported model and the DICOM file (not committed)
UID = "1.2.826.0.1.3680043.8.498.20261202"  # fixed: the same bytes, hence the same noise seed, on every run
WINDOW = {"WindowCenter": 2048, "WindowWidth": 4096}  # the whole 12-bit range: voi maps it back to [0, 1]


def export_segmenter(checkpoint: Path, path: Path) -> Path:
    """The checkpoint's network as a torch.export program with a dynamic batch dimension."""
    model, config = load_segmenter(checkpoint)
    example = torch.zeros(2, config.in_channels, *config.image_size)
    batch = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=batch), path)
    return path


def radiograph_as_dicom(data_root: Path, path: Path) -> tuple[Path, str]:
    """The first JSRT test image (its file's 512 x 512) as a 12-bit MONOCHROME1 DICOM; returns (path, case id)."""
    test = load_dataset("jsrt", data_root, "test")
    case = test.ids[0]
    image = read_gray(test.files[case][0])  # (H, W) in [0, 1], bones bright
    stored = np.rint((1 - image) * 4095).astype(np.uint16)  # MONOCHROME1: high = dark
    return write_dicom(path, stored, photometric="MONOCHROME1", bits=12, uid=UID, **WINDOW), case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a medcert segmenter to export")
    parser.add_argument("--denoiser", default="none")
    parser.add_argument("--data-root", type=Path, required=True, help="the JSRT folder")
    parser.add_argument("--sigma", default="0.25")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    model = export_segmenter(args.checkpoint, WORK / "model.pt2")
    dicom, case = radiograph_as_dicom(args.data_root, WORK / "patient.dcm")
    print(f"JSRT test case {case} -> {dicom}; {args.checkpoint.name} -> {model}")
    command = [sys.executable, "-m", "medcert_core", "certify", str(dicom), "--model", str(model),
               "--class-names", "background,lung,heart,clavicle", "--intensity", "voi",
               "--denoiser", args.denoiser, "--sigma", args.sigma, "--seed", "0", "--output-dir", str(args.output_dir)]
    print("python", " ".join(command[1:]))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    print(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
