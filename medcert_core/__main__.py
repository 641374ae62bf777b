"""Command line: ``python -m medcert_core COMMAND`` (also the ``medcert`` console script).

    study      the whole study of a profile (quick | jsrt | paper): models, grid, website
    grid       execute one papermill grid (YAML) of chapter notebooks into book/
               (study and grid: --executor slurm runs each chapter as a SLURM job through submitit)
    certify-runs  certify a dataset chapter's runs into the results store; under
               `torchrun --nproc-per-node N -m medcert_core certify-runs ...` each run's images are sharded
    book       build the website from book/
    certify    certify an image file or folder (PNG, TIFF, DICOM, NIfTI, ...) with a medcert checkpoint or any
               exported segmenter (torch.export .pt2, package.module:function): label maps,
               overlay with a legend, JSON summary; a 3D NIfTI volume whole, with a 3D model
    train      train a segmenter on a dataset split and save its checkpoint (resumable)
    evaluate   plain (no noise) test Dice of a checkpoint; appends to a results JSON

Files are data, never code: checkpoints and weights are read with torch.load(weights_only=True)
(tensors and plain containers only); a file that would need arbitrary code to unpickle is refused.
`certify --model package.module:function` is the one exception: it imports your own code.
`certify` draws its noise seed from the OS's entropy unless --seed is given (see `certify --help`).

Bad input (a missing file, a wrong layout, a parameter out of range, an image file larger than the pixel
budget) ends with ``medcert: error: <message>`` on stderr and exit code 2, and so does running out of
memory; set MEDCERT_TRACEBACK=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from medcert_core.checks import INTEGERS, check_parameter
from medcert_core.data import DATASET_NAMES, load_dataset
from medcert_core.data.base import MAX_PIXELS
from medcert_core.devices import PRECISION_CHOICES, resolve_device
from medcert_core.errors import NotebookFailed
from medcert_core.io import write_json_atomically
from medcert_core.models import ARCHITECTURES
from medcert_core.smoothing import COMPILE_MODES
from medcert_core.study.settings import DEFAULTS, PROFILES
from medcert_core.training import PRESETS, evaluate_segmenter, load_segmenter, train_segmenter


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotebookFailed)


def _image_size(text: str) -> int | tuple[int, int]:
    """argparse type of --image-size: "256" -> 256, "384x512" or "384,512" -> (384, 512)."""
    parts = text.lower().replace("x", ",").split(",")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"image size must be N or HxW with positive integers (e.g. 256 or 384x512), got {text!r}")
    return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def _model_input_size(text: str) -> tuple[int, ...]:
    """argparse type of certify's --image-size: "256" -> (256, 256), "384x512" -> (384, 512), and a volumetric
    model's "32x64x64" -> (32, 64, 64)."""
    parts = text.lower().replace("x", ",").split(",")
    if len(parts) == 3:
        if not all(part.strip().isdigit() and int(part) > 0 for part in parts):
            raise argparse.ArgumentTypeError(f"image size must be N, HxW or DxHxW with positive integers (e.g. 256, "
                                             f"384x512 or 32x64x64), got {text!r}")
        return tuple(int(part) for part in parts)
    size = _image_size(text)
    return (size, size) if isinstance(size, int) else size


def _json_object(text: str) -> dict:
    """argparse type of --model-kwargs: a JSON object."""
    from medcert_core.models.external import parse_model_kwargs

    try:
        return parse_model_kwargs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _intensity(text: str) -> str:
    """argparse type of --intensity: checked here, parsed again by certify."""
    from medcert_core.data.medical import parse_intensity

    try:
        parse_intensity(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text


def _batch_size(text: str) -> int | str:
    """argparse type of --batch-size: an int >= 1 or "auto"."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'batch size must be an integer >= 1 or "auto", got {text!r}')
    return int(text)


def _parameter(name: str) -> Callable[[str], int | float]:
    """argparse type of a certification parameter (sigma, tau, alpha, n0, n): parsed, range checked."""
    convert, noun = (int, "an integer") if name in INTEGERS else (float, "a number")

    def parse(text: str) -> int | float:
        try:
            value = convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{name} must be {noun}, got {text!r}") from error
        try:
            return check_parameter(name, value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    return parse


def _steps(text: str) -> str | int:
    """argparse type of --steps: "single" or a positive number of DDPM calls."""
    if text == "single":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f'steps must be "single" or a positive integer, got {text!r}')


def _denoiser_spec(text: str) -> str:
    """argparse type of --denoiser: ``none`` or a well-formed ``kind:<path>`` spec."""
    if text != "none":
        from medcert_core.denoisers import parse_spec

        try:
            parse_spec(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error
    return text


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="phantom", choices=DATASET_NAMES)
    parser.add_argument("--data-root", default=None, help="dataset folder (not needed for phantom)")
    parser.add_argument("--image-size", type=_image_size, default=None, help="e.g. 256 or 384x512 (default: the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def _datasets(args: argparse.Namespace, *splits: str):
    return [
        load_dataset(args.dataset, args.data_root, split, image_size=args.image_size, seed=args.seed)
        for split in splits
    ]


def per_class_means(frame: pd.DataFrame) -> dict[str, float]:
    """Mean per-image Dice of each class: {class_name: dice}."""
    return {name: float(value) for name, value in frame.groupby("class_name", sort=False)["dice"].mean().items()}


def command_train(args: argparse.Namespace) -> None:
    train_set, val_set = _datasets(args, "train", "val")
    start = time.perf_counter()
    _, config, history = train_segmenter(
        train_set, val_set, arch=args.arch, preset=args.preset, noise_sigma=args.noise_sigma, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, checkpoint=args.checkpoint, device=args.device,
    )
    print(history.tail(3).to_string(index=False))
    print(f"trained {config.arch} in {time.perf_counter() - start:.0f} s -> {args.checkpoint}")


def command_evaluate(args: argparse.Namespace) -> None:
    (test_set,) = _datasets(args, "test")
    model, config = load_segmenter(args.checkpoint, num_classes=len(test_set.class_names), device=resolve_device(args.device))
    frame = evaluate_segmenter(model, test_set, config.class_names, device=args.device)
    dice = per_class_means(frame)
    print(f"{config.arch} on {args.dataset} test ({len(test_set)} images): "
          + ", ".join(f"{name} {value:.3f}" for name, value in dice.items()))
    if args.results:
        path = Path(args.results)
        results = json.loads(path.read_text()) if path.exists() else []
        results = [entry for entry in results if entry.get("checkpoint") != str(args.checkpoint)]
        results.append({
            "checkpoint": str(args.checkpoint), "dataset": args.dataset, "arch": config.arch,
            "image_size": list(config.image_size), "noise_sigma": config.noise_sigma, "epochs": config.epochs,
            "preset": config.preset, "model_kwargs": config.model_kwargs, "test_images": len(test_set),
            "test_dice": dice, "device": str(resolve_device(args.device)),
        })
        write_json_atomically(results, path)
        print(f"wrote {path}")


def _override(text: str) -> tuple[str, object]:
    """argparse type of --set: KEY=VALUE with VALUE parsed as YAML."""
    from medcert_core.study.grid.spec import parse_override

    try:
        return parse_override(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


SET_HELP = ('KEY=VALUE (repeatable; VALUE in YAML): set a notebook parameter in every grid entry whose template '
            'has it, checked like the grid file, e.g. --set test_images=1 --set "sigmas=[0.5]" --set n=20 '
            '--set "training={epochs: 1, preset: tiny}" --set "denoiser_flags=--num_channels 128 ..."')


def _not_under_torchrun(command: str) -> None:
    from medcert_core.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise ValueError(f"`{command}` executes notebooks and does not shard over torchrun's processes; run "
                         "`torchrun --nproc-per-node N -m medcert_core certify-runs ...` (each run's images over the "
                         f"processes), then `medcert {command}` in one process reads those runs back")


def _slurm_options(args: argparse.Namespace) -> dict[str, object]:
    """The SLURM options given on the command line (None: not given; the grid file's or the default)."""
    return {"partition": args.partition, "gpus_per_job": args.gpus_per_job, "cpus_per_job": args.cpus_per_job,
            "mem_gb": args.mem_gb, "time_min": args.time_min, "sbatch": dict(args.sbatch) or None,
            "log_dir": args.slurm_logs}


def command_study(args: argparse.Namespace) -> None:
    from medcert_core.study.workflow import run_study

    _not_under_torchrun("study")
    index = run_study(args.profile, data_root=args.data_root, device=args.device, grid_file=args.grid,
                      force=args.force, build=not args.no_book, overrides=dict(args.overrides),
                      executor=args.executor, slurm=_slurm_options(args), wait=not args.no_wait)
    if index or not args.no_wait:
        print(f"study {args.profile} done" + (f": open {index}" if index else ""))
    else:
        print(f"study {args.profile}: SLURM jobs pending; run the same command again to collect them and build the website")


def command_grid(args: argparse.Namespace) -> None:
    from medcert_core.study.workflow import grid_report

    _not_under_torchrun("grid")
    report = grid_report(args.grid_file, data_root=args.data_root, device=args.device, force=args.force,
                         overrides=dict(args.overrides), executor=args.executor, slurm=_slurm_options(args),
                         wait=not args.no_wait, only=args.only)
    print("executed notebooks:\n  " + "\n  ".join(str(path) for path in report.outputs))
    if report.pending:
        print("pending (SLURM):\n  " + "\n  ".join(report.pending))


def command_certify_runs(args: argparse.Namespace) -> None:
    from medcert_core.study.workflow import certify_chapter_runs

    frame = certify_chapter_runs(args.profile, grid_file=args.grid, chapter=args.chapter, data_root=args.data_root,
                                 device=args.device, overrides=dict(args.overrides), output=args.output)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for all
        means = frame.groupby(["method_label", "arch", "sigma", "class_name"], sort=False)["dice"].mean()
        print(means.rename("certified dice").reset_index().to_string(index=False))
        print(f"{frame['run'].nunique()} runs, {len(frame)} rows" + (f" -> {args.output}" if args.output else ""))


def _int_at_least(lowest: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < lowest:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lowest}, got {text!r}")
        return int(text)

    return parse


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _sbatch_option(text: str) -> tuple[str, object]:
    """argparse type of --sbatch: KEY=VALUE (an sbatch long option without dashes), or KEY for a flag."""
    key, equals, value = text.partition("=")
    key = key.strip()
    if not key or key.startswith("-") or not all(part.isalnum() for part in key.replace("-", "_").split("_")):
        raise argparse.ArgumentTypeError(f"an sbatch option is KEY=VALUE with an sbatch long option name without "
                                         f"dashes (e.g. account=mylab, qos=high, constraint=a100), got {text!r}")
    return key, value if equals else True


def _add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """--executor and the SLURM options of study and grid (see medcert_core.study.grid.slurm)."""
    parser.add_argument("--executor", choices=["local", "slurm"], default="local",
                        help="local: here, one notebook after another; slurm: one SLURM job per grid entry (submitit)")
    slurm = parser.add_argument_group("SLURM (with --executor slurm; default: the grid file's executor: section)")
    slurm.add_argument("--partition", default=None, help="partition of every job")
    slurm.add_argument("--gpus-per-job", type=_int_at_least(0), default=None, help="GPUs per job (default 0)")
    slurm.add_argument("--cpus-per-job", type=_int_at_least(1), default=None, help="CPUs per job (default 1)")
    slurm.add_argument("--mem-gb", type=_positive_number, default=None, help="memory per job in GB (default: the partition's)")
    slurm.add_argument("--time-min", type=_int_at_least(1), default=None, help="time limit per job in minutes (default 1440)")
    slurm.add_argument("--sbatch", type=_sbatch_option, action="append", default=[], metavar="KEY=VALUE",
                       help="any further sbatch option, repeatable, e.g. --sbatch account=mylab --sbatch qos=high")
    slurm.add_argument("--slurm-logs", default=None, help="folder of the jobs' logs, one subfolder per job (default runs/slurm)")
    slurm.add_argument("--no-wait", action="store_true",
                       help="return once the jobs are submitted; run the same command again to collect them")


def command_book(args: argparse.Namespace) -> None:
    from medcert_core.study.report.book import build_book

    print(f"built {build_book(args.root)}")


def command_certify(args: argparse.Namespace) -> None:
    from medcert_core.single_file import certify_file

    summary = certify_file(
        args.image, args.checkpoint, args.denoiser, args.sigma, model=args.model, model_kwargs=args.model_kwargs,
        num_classes=args.num_classes, in_channels=args.in_channels, image_size=args.image_size,
        class_names=args.class_names, normalize=args.normalize, intensity=args.intensity, slice=args.slice,
        max_pixels=args.max_pixels, output_dir=args.output_dir, n0=args.n0, n=args.n,
        alpha=args.alpha, tau=args.tau, steps=args.steps, seed=args.seed, batch_size=args.batch_size, device=args.device,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile,
        denoiser_flags=args.denoiser_flags, sequential=args.sequential, stop_undecided=args.stop_undecided,
    )
    print(json.dumps(summary, indent=2))


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    """The ``train`` command and its options."""
    train = commands.add_parser("train", help="train a segmenter")
    _add_data_arguments(train)
    train.add_argument("--arch", default="unet", choices=ARCHITECTURES)
    train.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    train.add_argument("--noise-sigma", type=float, default=0.0, help="Gaussian noise augmentation (SegCertify: 0.25)")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--checkpoint", required=True, help="where to save (and resume from)")
    train.set_defaults(run=command_train)


def _add_evaluate_command(commands: argparse._SubParsersAction) -> None:
    """The ``evaluate`` command and its options."""
    evaluate = commands.add_parser("evaluate", help="plain test Dice of a checkpoint")
    _add_data_arguments(evaluate)
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--results", default=None, help="JSON file to add the result to")
    evaluate.set_defaults(run=command_evaluate)


def _add_study_command(commands: argparse._SubParsersAction) -> None:
    """The ``study`` command and its options."""
    study = commands.add_parser("study", help="the whole study: train or reuse models, run the grid, build the book")
    study.add_argument("--profile", default=DEFAULTS["profile"], choices=sorted(PROFILES))
    study.add_argument("--data-root", default=None, help="dataset folder (jsrt) or folder of dataset folders (paper)")
    study.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    study.add_argument("--grid", default=None, help="grid file (default: grids/<profile>.yaml)")
    study.add_argument("--force", action="store_true", help="re-execute notebooks even when already done")
    study.add_argument("--no-book", action="store_true", help="run the grid only, do not build the website")
    study.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                       help=SET_HELP)
    _add_executor_arguments(study)
    study.set_defaults(run=command_study)


def _add_grid_command(commands: argparse._SubParsersAction) -> None:
    """The ``grid`` command and its options."""
    grid = commands.add_parser("grid", help="execute one papermill grid (YAML) into book/")
    grid.add_argument("grid_file")
    grid.add_argument("--data-root", default=None, help="fills {data_root} in the grid's parameters")
    grid.add_argument("--device", default=None, help="overrides the grid's device for every notebook")
    grid.add_argument("--force", action="store_true", help="re-execute notebooks even when already done")
    grid.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                      help=SET_HELP)
    grid.add_argument("--only", action="append", default=None, metavar="OUTPUT",
                      help="execute only the entry with this output name (repeatable), e.g. --only jsrt_256")
    _add_executor_arguments(grid)
    grid.set_defaults(run=command_grid)


def _add_certify_runs_command(commands: argparse._SubParsersAction) -> None:
    """The ``certify-runs`` command and its options."""
    runs = commands.add_parser("certify-runs", help="certify a dataset chapter's runs into the results store "
                               "(under torchrun: each run's test images sharded over the processes)")
    runs.add_argument("--profile", default=DEFAULTS["profile"], choices=sorted(PROFILES))
    runs.add_argument("--grid", default=None, help="grid file (default: grids/<profile>.yaml)")
    runs.add_argument("--chapter", default=None, help="the grid entry (output name; default: its first dataset chapter)")
    runs.add_argument("--data-root", default=None, help="fills {data_root} in the grid's parameters")
    runs.add_argument("--device", default=None, help="overrides the grid's device (under torchrun on GPUs: cuda)")
    runs.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                      help=SET_HELP)
    runs.add_argument("--output", default=None, help="CSV of the tidy rows of every run (written by rank 0)")
    runs.set_defaults(run=command_certify_runs)


def _add_book_command(commands: argparse._SubParsersAction) -> None:
    """The ``book`` command and its options."""
    book = commands.add_parser("book", help="build the website from book/ (no notebook is executed)")
    book.add_argument("--root", default=".", help="folder holding _config.yml and _toc.yml")
    book.set_defaults(run=command_book)


def _add_certify_model_options(certify: argparse.ArgumentParser) -> None:
    """``certify``'s options that name the segmenter and what it takes."""
    model = certify.add_argument_group("the segmenter: --checkpoint or --model")
    model.add_argument("--checkpoint", default=None, help="segmenter checkpoint written by `medcert train`")
    model.add_argument("--model", default=None,
                       help="any other segmenter returning logits (B, K, H, W), or (B, K, D, H, W) for volumes: a "
                            "torch.export program (.pt2; checked "
                            "before it runs: only the members torch.export.save writes, no native code or pickled "
                            "objects, only pure tensor operators, each image of a batch segmented on its own) or "
                            "package.module:function returning an nn.Module. An entry point imports and runs your own "
                            "Python code: the one way user code runs, give only one you trust. A TorchScript file (a "
                            "program) and a torch.save'd module (a pickle) are refused")
    model.add_argument("--model-kwargs", type=_json_object, default=None,
                       help='keyword arguments of the entry point, as JSON, e.g. \'{"in_channels": 1, "out_channels": 2}\'')
    model.add_argument("--num-classes", type=int, default=None,
                       help="K (default: read from the model's output; given, it must match)")
    model.add_argument("--in-channels", type=int, choices=[1, 3], default=None,
                       help="input channels (default: a .pt2's input shape or the module's in_channels attribute)")
    model.add_argument("--image-size", type=_model_input_size, default=None,
                       help="the model's input size, e.g. 256 or 256x256, or DxHxW for a volumetric model (a volume "
                            "is padded up to it, never resized) (default: a .pt2's input shape; for a volume, the "
                            "volume's own size where the model leaves it free)")
    model.add_argument("--class-names", type=lambda text: tuple(text.split(",")), default=None,
                       help="comma-separated, background first (default: background,class_1,...)")
    model.add_argument("--normalize", default=None, metavar="MEAN,STD",
                       help="per-channel normalisation inside the base model, after the noise: MEAN,STD for every "
                            "channel or M1,M2,M3,S1,S2,S3 (the radius stays in the [0, 1] image scale)")


def _add_certify_command(commands: argparse._SubParsersAction) -> None:
    """The ``certify`` command and its options."""
    certify = commands.add_parser("certify", help="certify one image file (or a folder) with any segmenter; writes "
                                                  "label maps, overlays with a legend and a JSON summary",
                                  description="Certify an image file, or every image file of a folder (two files "
                                              "with the same stem are refused: their outputs would collide). The "
                                              "noise is unpredictable unless --seed is given (see --seed). "
                                              "Volumes: a 3D NIfTI file given without --slice is certified whole, "
                                              "and the model must then be volumetric, which is read from the model "
                                              "itself: a .pt2 whose input is (B, C, D, H, W), a checkpoint whose "
                                              "image_size is D x H x W, or an entry point that runs on (B, 1, D, H, "
                                              "W); a 2D model is refused (pass --slice AXIS:INDEX), and so is a 3D "
                                              "model given a 2D image, and 4D data. A volume is never resized: "
                                              "it is mapped to [0, 1] by --intensity (window:CENTER,WIDTH keeps a "
                                              "radius in the file's values), axes as stored; where the model needs "
                                              "a larger size (a fixed input size, multiples a .pt2 asks for), zeros "
                                              "are appended at the end of each axis inside the model, after the "
                                              "noise, and only the volume's own voxels are certified. It writes "
                                              "<stem>_labels.nii.gz (abstain as 255, or 65535 past 255 classes; the "
                                              "input's affine), the middle slice along each axis as "
                                              "<stem>_overlay_axis{0,1,2}.png, <stem>_legend.png and "
                                              "<stem>_certificate.json (file_to_tensor, padding, radius_on_the_file).")
    certify.add_argument("image", help="PNG, JPEG, TIFF (8 or 16 bit), BMP, JSRT .IMG, DICOM (.dcm) or NIfTI (.nii, "
                                       ".nii.gz), resized to the model's input size; or a folder of them (one JSON "
                                       "each and certificates.csv); or one 3D NIfTI volume, certified whole at its "
                                       "own size by a 3D model (see above)")
    _add_certify_model_options(certify)
    reading = certify.add_argument_group("reading the image file")
    reading.add_argument("--intensity", default="auto", type=_intensity,
                         help="how stored values map to [0, 1]: auto (integers by their bit depth, DICOM by "
                              "BitsStored after the rescale, integer NIfTI by its dtype's range after scl_slope / scl_inter, floats as "
                              "stored within [0, 1], else by the image's own minimum to maximum), minmax, window:CENTER,WIDTH (DICOM "
                              "linear window in rescaled units, e.g. HU), voi (the DICOM file's own window or VOI "
                              "LUT); MONOCHROME1 is inverted; the JSON's file_to_tensor records every step")
    reading.add_argument("--slice", default=None, metavar="AXIS:INDEX",
                         help="one 2D slice of a 3D NIfTI volume (e.g. 2:40) for a 2D model, or one frame of a "
                              "multi-frame DICOM (0:FRAME); without it, a 3D NIfTI volume is certified whole by a 3D model")
    reading.add_argument("--max-pixels", type=_int_at_least(1), default=MAX_PIXELS, metavar="N",
                         help=f"the pixel budget: a file whose header declares more elements (rows x columns x "
                              f"channels x frames or slices) is refused before decoding (default {MAX_PIXELS} = 2**28)")
    certify.add_argument("--denoiser", type=_denoiser_spec, default="none",
                         help="none | ddpm:<folder> | guided-diffusion:<file.pt> | unet:<folder> | ffdnet:<file.pth> "
                              "(FFDNet, an off-the-shelf natural-image denoiser); 2D images only, a volume takes none")
    certify.add_argument("--sigma", type=_parameter("sigma"), required=True, help="noise level in the [0, 1] input scale")
    certify.add_argument("--denoiser-flags", default="",
                         help='MODEL_FLAGS of a guided-diffusion checkpoint, e.g. "--num_channels 128 --learn_sigma True" '
                              "(default: those of 256x256_diffusion_uncond.pt)")
    certify.add_argument("--steps", type=_steps, default="single", help='DDPM calls: "single" or an int')
    certify.add_argument("--n0", type=_parameter("n0"), default=DEFAULTS["n0"], help="selection draws (>= 1)")
    certify.add_argument("--n", type=_parameter("n"), default=DEFAULTS["n"], help="estimation draws (>= 1)")
    certify.add_argument("--alpha", type=_parameter("alpha"), default=DEFAULTS["alpha"], help="error level, 0 < alpha < 1")
    certify.add_argument("--tau", type=_parameter("tau"), default=DEFAULTS["tau"], help="0.5 <= tau < 1")
    certify.add_argument("--seed", type=int, default=None,
                         help="noise seed (default: drawn from the OS's entropy). Each file's noise is seeded from "
                              "(this seed, the sha256 of its bytes); the JSON and CSV record both seeds. A fixed seed "
                              "is fine to evaluate a fixed test set or to reproduce a recorded certificate (pass its "
                              "'seed'); never give one when certifying inputs someone else chose: who knows the noise "
                              "can craft an input that certifies a wrong class")
    certify.add_argument("--sequential", action="store_true",
                         help="anytime-valid sequential certification: --n becomes the most estimation draws, and "
                              "sampling stops once every pixel is certified or provably cannot be (the JSON records "
                              "the draws used); the guarantee is the same")
    certify.add_argument("--stop-undecided", type=float, default=0.0, metavar="FRACTION",
                         help="with --sequential, stop once at most this fraction of pixels is undecided (they abstain)")
    certify.add_argument("--batch-size", type=_batch_size, default=DEFAULTS["batch_size"],
                         help='noisy draws per forward pass, or "auto" (GPU: the largest that fits; halved on out-of-memory)')
    certify.add_argument("--precision", choices=list(PRECISION_CHOICES), default=DEFAULTS["precision"],
                         help="autocast of the networks only; the noise and statistics stay fp32/fp64. auto: bf16 where the "
                              "device runs it natively (a bf16 GPU, a CPU with AMX or AVX-512 BF16), else fp32")
    certify.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU)")
    certify.add_argument("--compile", nargs="?", const=True, default=False, choices=[True, *COMPILE_MODES],
                         help="torch.compile the base model once (optionally a mode, e.g. max-autotune)")
    certify.add_argument("--device", default="auto")
    certify.add_argument("--output-dir", default=".", help="where the PNGs, a volume's label NIfTI and the JSON go")
    certify.set_defaults(run=command_certify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medcert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_command(commands)
    _add_evaluate_command(commands)
    _add_study_command(commands)
    _add_grid_command(commands)
    _add_certify_runs_command(commands)
    _add_book_command(commands)
    _add_certify_command(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    """The console entry: bad input exits with code 2 and one message (MEDCERT_TRACEBACK=1 re-raises)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        if os.environ.get("MEDCERT_TRACEBACK") == "1":
            raise
        print(f"medcert: error: {error}", file=sys.stderr)
        sys.exit(2)
    except MemoryError as error:
        if os.environ.get("MEDCERT_TRACEBACK") == "1":
            raise
        print(f"medcert: error: out of memory (MemoryError{': ' + str(error) if str(error) else ''}); "
              f"free memory, or use smaller inputs (certify: --max-pixels, --batch-size)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
