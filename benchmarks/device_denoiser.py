"""Write a random-weight ADM denoiser for the device check's JSRT chapter, and print its spec as JSON.

The paper grid reads OpenAI's ``256x256_diffusion_uncond.pt`` (``guided-diffusion:<file.pt>``), which
no machine here has. This writes a checkpoint of the same layout with random weights (timings and
memory do not depend on the weights) in guided-diffusion's own key layout, with
``medcert_core.testing.fixtures.write_guided_diffusion_checkpoint``.

    python benchmarks/device_denoiser.py --form full  --out .device/run   # ADM-256, 552 M parameters
    python benchmarks/device_denoiser.py --form small --out .device/run   # the ADM layout at 32 px, width 32

Prints {"denoiser": SPEC, "denoiser_flags": MODEL_FLAGS, "kind": ..., "seconds": ...}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medcert_core.testing.fixtures import write_guided_diffusion_checkpoint

# 256x256_diffusion_uncond's MODEL_FLAGS, as guided-diffusion's README gives them
FLAGS = {
    "full": ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 "
             "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
             "--num_res_blocks 2 --resblock_updown True --use_fp16 False --use_scale_shift_norm True"),
    # bench_pipeline.py --small: the same layout as a 32 px model of width 32 (for 64 px inputs)
    "small": ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 32 "
              "--channel_mult 1,2,2 --learn_sigma True --noise_schedule linear --num_channels 32 "
              "--num_head_channels 32 --num_res_blocks 2 --resblock_updown True --use_fp16 False "
              "--use_scale_shift_norm True"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--form", choices=sorted(FLAGS), default="full")
    parser.add_argument("--out", type=Path, default=Path(".device/run"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    flags = FLAGS[args.form]
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_guided_diffusion_checkpoint(args.out / f"adm_{args.form}_random.pt", flags, seed=args.seed)
    print(json.dumps({"denoiser": f"guided-diffusion:{path}", "denoiser_flags": flags,
                      "kind": "guided-diffusion checkpoint (OpenAI key layout), random weights",
                      "seconds": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
