"""Write synthetic stand-ins for the paper's five datasets and denoiser into DATA_DIR, in the layouts
and file formats they are distributed in (see medcert_core/testing/fixtures.py), then run the paper
grid on them without the real data (numbers mean nothing):

    python scripts/write_paper_fixtures.py /tmp/paper_data --native 1
    python -m medcert_core study --profile paper --data-root /tmp/paper_data --device cpu \\
        --set "denoiser_flags=$(cat /tmp/paper_data/MODEL_FLAGS.txt)" \\
        --set test_images=1 --set "sigmas=[0.5]" --set n0=1 --set n=2 --set batch_size=3 \\
        --set "archs=[unet]" --set arch=unet --set "multi_steps=[2]" \\
        --set "training={epochs: 1, preset: tiny, unet_denoiser_steps: 1, unet_denoiser_batch_size: 2}"

(about 5 minutes on 2 CPU cores: tests/test_paper_profile.py runs exactly this).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from medcert_core.testing.fixtures import DATASETS, write_paper_fixtures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="folder to write jsrt/, montgomery/, ..., the checkpoint into")
    parser.add_argument("--images", type=int, default=6, help="cases per dataset (>= 6: 4 train, 1 val, 1 test)")
    parser.add_argument("--native", type=int, default=None,
                        help="images per dataset at the distributed sizes (default: all; the others at 1/4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--no-checkpoint", action="store_true", help="do not write the guided-diffusion checkpoint")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    fixtures = write_paper_fixtures(args.data_dir, images=args.images, native=args.native, seed=args.seed,
                                    datasets=tuple(args.datasets), checkpoint=not args.no_checkpoint)
    print(f"wrote {', '.join(fixtures.datasets)} into {fixtures.root} in {time.perf_counter() - start:.0f} s")
    if not args.no_checkpoint:
        print(f"checkpoint {fixtures.checkpoint}, its flags: {fixtures.model_flags}")


if __name__ == "__main__":
    main()
