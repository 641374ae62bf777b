"""Golden numbers: the certificates, counts, metrics and trained weights of a few seeded tiny
configurations, pinned in ``tests/golden_numbers.json`` together with the ``NUMBERS_VERSION`` they
were computed under.

Runs and models are keyed by :data:`medcert_core.NUMBERS_VERSION`, not by a digest of the source, so
a refactor keeps every stored run valid. The price is this file: a change that moves any number
below fails ``tests/test_golden.py`` until the version is bumped on purpose and the numbers are
written again::

    python -m medcert_core.testing.golden --write   # refuses while NUMBERS_VERSION is unchanged

Everything runs on the CPU with one thread (the same floating-point reductions on every run), with
fixed seeds; integer arrays are pinned by their sha256, floats to a relative 1e-6.

Training is the exception across machines: the same seeded training gives other weights on another
CPU (seen: an AVX-512 Intel Xeon against the machine that wrote the file), while the statistics and
smoothing numbers agree bit for bit. So ``training_and_study`` may carry further pins, one per CPU
platform, in ``"training_pins"``; the computed numbers must match the main pin or one of them. On a
new platform, with the version unchanged and every other number matching::

    python -m medcert_core.testing.golden --add-platform   # appends this CPU's training pin
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

GOLDEN_FILE = Path(__file__).resolve().parents[2] / "tests" / "golden_numbers.json"
RELATIVE_TOLERANCE = 1e-6
IMAGE_SIZE = 32
TRAINING = "training_and_study"  # the one part of the numbers that may differ by CPU
TIMINGS = ("seconds",)  # columns of a run that measure time, not numbers
DENOISERS_PER_SIGMA = {0.25: ("none", "unet", "ddpm_single"), 0.5: ("none", "ddpm_single", "ddpm_2step")}


def array_digest(values: Any) -> str:
    """sha256 (16 hex digits) of an integer array's shape and int64 bytes."""
    array = np.ascontiguousarray(np.asarray(values, dtype=np.int64))
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()[:16]


def float_summary(values: Any) -> list[float]:
    """[sum, sum of squares, first value, last value] of a float array: moves when any value moves."""
    array = np.asarray(values, dtype=np.float64).ravel()
    return [float(array.sum()), float((array ** 2).sum()), float(array[0]), float(array[-1])]


def certificate_numbers(certificate) -> dict[str, Any]:
    """What a Certificate promises: its labels, p-values and radius."""
    return {"labels": array_digest(certificate.labels), "pvalues": float_summary(certificate.pvalues), "radius": float(certificate.radius),
            "abstain_fraction": float(certificate.abstain_fraction)}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one CPU thread inside the block (the same reduction order on every machine run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def statistics_numbers() -> dict[str, Any]:
    """certify_counts on seeded counts: Holm and Bonferroni, two taus."""
    from medcert_core.certify import certify_counts, certify_counts_over_taus

    rng = np.random.default_rng(2023)
    selected = rng.integers(0, 3, size=(8, 8))
    counts = rng.binomial(1000, rng.uniform(0.7, 0.85, size=(8, 8)))  # near tau: Holm and Bonferroni differ
    numbers = {}
    for correction in ("holm", "bonferroni"):
        certificate = certify_counts(selected, counts, 1000, sigma=0.5, tau=0.75, alpha=0.01,
                                     correction=correction, n0=10, num_classes=3)
        numbers[correction] = certificate_numbers(certificate)
    over_taus = certify_counts_over_taus(selected, counts, 1000, sigma=0.5, taus=(0.6, 0.85), alpha=0.001,
                                         n0=10, num_classes=3)
    numbers["over_taus"] = {f"{tau:g}": certificate_numbers(c) for tau, c in zip((0.6, 0.85), over_taus)}
    return numbers


def chest_image() -> tuple[torch.Tensor, np.ndarray]:
    """A 3-channel 32 x 32 chest phantom (C, H, W) in [0, 1] and its labels (H, W)."""
    from medcert_core.data.phantom import chest_phantom

    image, labels = chest_phantom(0, 0, (IMAGE_SIZE, IMAGE_SIZE))
    return torch.from_numpy(np.repeat(image[None], 3, axis=0)), labels


def tiny_segmenter() -> torch.nn.Module:
    from medcert_core.models import create_model
    from medcert_core.training import PRESETS

    torch.manual_seed(0)
    return create_model("unet", 3, 4, **PRESETS["tiny"]["model_kwargs"]["unet"]).eval()


def tiny_denoisers(sigma: float) -> dict[str, torch.nn.Module | None]:
    """No denoiser, a seeded UNet denoiser, a seeded tiny DDPM single-step and 2-step."""
    from diffusers import UNet2DModel

    from medcert_core.denoisers.diffusion import DiffusionDenoiser
    from medcert_core.denoisers.training import DDPM_PRESETS, linear_scheduler
    from medcert_core.denoisers.unet_denoiser import UNetDenoiser
    from medcert_core.training import PRESETS

    torch.manual_seed(1)
    unet_denoiser = UNetDenoiser.build(3, sigma, **PRESETS["tiny"]["model_kwargs"]["unet"]).eval()
    torch.manual_seed(2)
    ddpm = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, **DDPM_PRESETS["tiny"]["unet"]).eval()
    return {"none": None, "unet": unet_denoiser,
            "ddpm_single": DiffusionDenoiser(ddpm, linear_scheduler(), sigma),
            "ddpm_2step": DiffusionDenoiser(ddpm, linear_scheduler(), sigma, steps=2)}


def smoothing_numbers(configurations: dict[float, tuple[str, ...]] = DENOISERS_PER_SIGMA) -> dict[str, Any]:
    """The counts, certificate (n0 = 10, n = 100) and prediction (n = 30) of a seeded tiny UNet on a
    32 x 32 chest phantom behind each tiny denoiser named in ``configurations`` (sigma -> names)."""
    from medcert_core.certify import certify_counts
    from medcert_core.metrics import segmentation_scores
    from medcert_core.smoothing import SmoothedSegmenter

    image, target = chest_image()
    numbers = {}
    for sigma, names in configurations.items():
        denoisers = tiny_denoisers(sigma)
        for name in names:
            denoiser = denoisers[name]
            smoothed = SmoothedSegmenter(tiny_segmenter(), 4, sigma, denoiser=denoiser, batch_size=16, device="cpu")
            selected, counts = smoothed.counts(image, 10, 100, generator=torch.Generator().manual_seed(7))
            certificate = certify_counts(selected, counts, 100, sigma=sigma, n0=10, num_classes=4)
            scores = segmentation_scores(certificate.labels, target, 4)
            numbers[f"sigma{sigma:g}_{name}"] = {
                **certificate_numbers(certificate), "selected": array_digest(selected), "counts": array_digest(counts),
                "dice": float_summary(np.nan_to_num(scores["dice"], nan=-1.0)),
                "predict": array_digest(smoothed.predict(image, 30, generator=torch.Generator().manual_seed(8))),
            }
    return numbers


def state_summary(module: torch.nn.Module) -> list[float]:
    """float_summary over every parameter and buffer of a module, in state-dict order."""
    state = module.state_dict()
    return float_summary(torch.cat([value.detach().double().ravel() for value in state.values()]).numpy())


def training_and_study_numbers() -> dict[str, Any]:
    """A segmenter (1 epoch), a DDPM (2 steps), a UNet denoiser (2 steps) trained on the 32 px chest
    phantoms, and one certification run of the study on them (2 test images)."""
    from medcert_core.study.runs import assets
    from medcert_core.study.runs import run as runs
    from medcert_core.study.settings import DataSpec, TrainingSpec

    data = DataSpec("phantom", None, IMAGE_SIZE, 0)
    training = TrainingSpec(preset="tiny", epochs=1, ddpm_preset="tiny", ddpm_steps=2, unet_denoiser_steps=2)
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / "cache"
        segmenter, _ = assets.segmenter(cache, data, training, "unet", 0.0, device="cpu")
        numbers: dict[str, Any] = {"segmenter": state_summary(segmenter)}
        for spec in ("ddpm:auto", "unet:auto"):
            denoiser = assets.denoiser(spec, 0.5, cache, data, training, device="cpu")
            numbers[spec.split(":")[0]] = state_summary(denoiser)
        for method in (runs.ours("ddpm:auto"), runs.segcertify(0.25)):
            run = runs.CertificationRun(data, training, "unet", method, 0.5, n0=5, n=60, test_images=2)
            output = runs.compute(run, cache, device="cpu", progress=False)
            numbers[f"run_{method.label}"] = run_numbers(output)
    return numbers


def run_numbers(output) -> dict[str, Any]:
    """The tidy rows of a run: each numeric column's summary (timings left out), and the curve rows'."""
    numbers = {}
    for name, frame in (("results", output.rows), ("curves", output.curves)):
        numeric = frame.select_dtypes("number").drop(columns=list(TIMINGS), errors="ignore").fillna(-1.0)
        numbers[name] = {column: float_summary(numeric[column]) for column in sorted(numeric.columns)}
        numbers[name]["rows"] = len(frame)
    return numbers


def golden_numbers() -> dict[str, Any]:
    """Every pinned number, computed now (CPU, one thread; about half a minute)."""
    with one_thread():
        return {"statistics": statistics_numbers(), "smoothing": smoothing_numbers(),
                TRAINING: training_and_study_numbers()}


def differences(expected: Any, found: Any, where: str = "") -> list[str]:
    """Where two golden trees disagree: keys, digests, lengths, floats beyond the tolerance."""
    if isinstance(expected, dict) and isinstance(found, dict):
        problems = [f"{where}/{key}: missing now" for key in expected if key not in found]
        problems += [f"{where}/{key}: new" for key in found if key not in expected]
        for key in expected.keys() & found.keys():
            problems += differences(expected[key], found[key], f"{where}/{key}")
        return problems
    if isinstance(expected, list) and isinstance(found, list) and len(expected) == len(found):
        return [problem for index, (a, b) in enumerate(zip(expected, found))
                for problem in differences(a, b, f"{where}[{index}]")]
    if isinstance(expected, float) and isinstance(found, float):
        if math.isclose(expected, found, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-9):
            return []
    elif expected == found:
        return []
    return [f"{where}: pinned {expected!r}, now {found!r}"]


def platform_signature() -> str:
    """The CPU a training pin was computed on: architecture, torch's vector ISA and the model name."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), "")
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {model}".strip()


def without_training(numbers: dict[str, Any]) -> dict[str, Any]:
    """The numbers that must agree bit for bit on every CPU: all but training_and_study."""
    return {key: value for key, value in numbers.items() if key != TRAINING}


def golden_differences(golden: dict[str, Any], computed: dict[str, Any]) -> list[str]:
    """Where computed numbers leave the golden file: statistics and smoothing against the main pin,
    training_and_study against the main pin unless one of the per-platform ``training_pins`` matches."""
    moved = differences(without_training(golden["numbers"]), without_training(computed))
    if not any(not differences(pin["numbers"], computed[TRAINING]) for pin in golden.get("training_pins", [])):
        moved += differences(golden["numbers"][TRAINING], computed[TRAINING], f"/{TRAINING}")
    return moved


def add_platform_pin(path: Path = GOLDEN_FILE) -> str:
    """Append this CPU's training_and_study numbers as a further pin. Refused (ValueError) when the
    version changed or any statistics or smoothing number moved: only training may differ by CPU.
    ``--write`` after a version bump starts the file again with no further pins."""
    from medcert_core import NUMBERS_VERSION
    from medcert_core.io import write_json_atomically

    stored = load_golden(path)
    numbers = golden_numbers()
    if stored["numbers_version"] != NUMBERS_VERSION:
        raise ValueError(f"the file is for NUMBERS_VERSION {stored['numbers_version']}, not {NUMBERS_VERSION}: --write first")
    others = differences(without_training(stored["numbers"]), without_training(numbers))
    if others:
        raise ValueError(f"{len(others)} numbers other than training moved (first: {others[0]}): not a platform difference")
    if not golden_differences(stored, numbers):
        return "this platform's training numbers are already pinned"
    signature = platform_signature()
    stored.setdefault("training_pins", []).append({"platform": signature, "numbers": numbers[TRAINING]})
    write_json_atomically(stored, Path(path))
    return f"added the training pin of {signature}"


def load_golden(path: Path = GOLDEN_FILE) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def write_golden(path: Path = GOLDEN_FILE) -> list[str]:
    """Compute and write the golden file under the current NUMBERS_VERSION. Refused (ValueError) when
    numbers moved but the version did not: a moved number must be a decision, not an accident."""
    from medcert_core import NUMBERS_VERSION
    from medcert_core.io import write_json_atomically

    numbers = golden_numbers()
    moved: list[str] = []
    if Path(path).is_file():
        stored = load_golden(path)
        moved = differences(stored["numbers"], numbers)
        if moved and stored["numbers_version"] == NUMBERS_VERSION:
            raise ValueError(f"{len(moved)} golden numbers moved (first: {moved[0]}) but NUMBERS_VERSION is still "
                             f"{NUMBERS_VERSION}: bump it in medcert_core/__init__.py (every stored run and "
                             f"executed chapter is then recomputed), or undo the change")
    write_json_atomically({"numbers_version": NUMBERS_VERSION, "numbers": numbers}, Path(path))
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write tests/golden_numbers.json")
    parser.add_argument("--add-platform", action="store_true", help="append this CPU's training pin")
    args = parser.parse_args(argv)
    if args.add_platform:
        print(add_platform_pin())
        return 0
    if args.write:
        moved = write_golden()
        print(f"wrote {GOLDEN_FILE} ({len(moved)} numbers moved)")
        return 0
    problems = golden_differences(load_golden(), golden_numbers())
    print("\n".join(problems) or "golden numbers unchanged")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
