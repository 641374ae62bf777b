"""Where the networks run and at what precision: the one low module that smoothing, the denoisers and
training import (downward only).

``precision`` is the autocast of the networks only (fp32 | bf16 | fp16 | auto): the noise, x + delta,
the counts and the statistics stay in fp32 / int64 / fp64 outside it, so it never touches the
guarantee, only which deterministic function f(D(.)) is certified. ``auto`` resolves, per device, to
bf16 where the hardware runs it natively (a GPU that supports bf16; a CPU with AMX or AVX-512 BF16
instructions) and to fp32 elsewhere; what it resolved to is what a run records and is keyed by.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"
PRECISION_CHOICES = (*PRECISIONS, AUTO)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with native bf16 matmul / dot products


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' or None -> CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_precision(precision: str) -> None:
    """precision must name an autocast setting of the networks: fp32 (none), bf16, fp16 or auto."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {list(PRECISION_CHOICES)}, got {precision!r}")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU listed in ``cpuinfo`` (empty where there is no such file)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this machine's CPU has AMX or AVX-512 BF16 (where bf16 autocast is faster than fp32)."""
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: str | torch.device | None) -> str:
    """``auto`` -> bf16 on a GPU that supports it or a CPU with native bf16 (:func:`cpu_has_native_bf16`),
    else fp32; fp32 / bf16 / fp16 as given. ValueError naming the valid values."""
    check_precision(precision)
    if precision != AUTO:
        return precision
    device = resolve_device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast of the networks at ``precision`` (resolved: not ``auto``) on ``device`` (nothing for fp32)."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def cpu_model_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name from ``cpuinfo`` (else ``platform.processor()``), for benchmark and cost records."""
    import platform

    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def machine_record() -> dict[str, object]:
    """What a benchmark, cost or choice JSON records of the machine it ran on: CPU model, its native bf16
    flags, cores, torch threads and version, host name (the sessions of this project do not all get the same
    CPU, so a timing is only compared with one taken on the same model)."""
    import os
    import platform

    return {"cpu": cpu_model_name(), "bf16_flags": sorted(set(BF16_CPU_FLAGS) & cpu_flags()),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "host": platform.node()}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: how busy the machine was when a timing was taken."""
    import os

    return [round(load, 2) for load in os.getloadavg()]


def local_timestamp() -> str:
    """Now, to the second, in local time with its UTC offset (e.g. ``2026-12-07T16:49:51+0000``): when a run,
    a training or a job a record describes ended or started."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def git_commit(folder: str | Path = ".") -> str | None:
    """The checked-out commit of the repository holding ``folder`` (+ "-dirty" with local changes; None outside
    a repository or without git): which code a run, benchmark or choice was made with."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
