"""``medcert certify``'s entry: a file or folder of 2D images, or one whole 3D volume.

A NIfTI file whose header has three axes longer than 1, given without ``slice``, is certified whole by a
volumetric model (:func:`medcert_core.single_volume.certify_volume_file`, one file at a time); everything
else goes to :func:`medcert_core.single_image.certify_image_file`. The run's parameters are checked first,
and a folder that holds a volume is refused before anything is read or drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medcert_core import single_image
from medcert_core.data.medical import is_nifti_volume, parse_intensity
from medcert_core.single_volume import certify_volume_file


def volume_files(path: Path, slice: str | None, max_pixels: int | None) -> list[Path]:
    """The whole 3D NIfTI volumes among the files ``path`` names (none when a ``slice`` is asked for);
    ValueError when a folder holds one (volumes are certified one file at a time)."""
    files = single_image.image_files(path) if path.is_dir() else [path]
    volumes = [file for file in files if slice is None and file.is_file() and is_nifti_volume(file, max_pixels)]
    if volumes and path.is_dir():
        raise ValueError(f"{volumes[0]} is a volume: certify a volume on its own (medcert certify {volumes[0]} ...), "
                         f"or give --slice AXIS:INDEX to certify one slice of each file of {path}")
    return volumes


def certify_file(image_path: str | Path, checkpoint: str | Path | None, denoiser: str, sigma: float, *,
                 intensity: str = "auto", slice: str | None = None, max_pixels: int | None = None, n0: int = 10,
                 n: int = 100, alpha: float = 0.001, tau: float = 0.75, sequential: bool = False,
                 stop_undecided: float = 0.0, steps: str | int = "single", denoiser_flags: str = "",
                 **options: Any) -> dict[str, Any] | list[dict[str, Any]]:
    """Certify ``image_path`` (module doc); the options are :func:`single_image.certify_image_file`'s, ``steps``
    and ``denoiser_flags`` for images only (a volume takes no denoiser yet)."""
    single_image.check_run_options(sigma=sigma, tau=tau, alpha=alpha, n0=n0, n=n, sequential=sequential,
                                   stop_undecided=stop_undecided)
    path, run = Path(image_path), {"n0": n0, "n": n, "alpha": alpha, "tau": tau, "sequential": sequential,
                                   "stop_undecided": stop_undecided, "max_pixels": max_pixels}
    if volume_files(path, slice, max_pixels):
        return certify_volume_file(path, checkpoint, denoiser, sigma, intensity=parse_intensity(intensity), **run,
                                   **options)
    return single_image.certify_image_file(path, checkpoint, denoiser, sigma, intensity=intensity, slice=slice,
                                           steps=steps, denoiser_flags=denoiser_flags, **run, **options)
