"""DICOM and NIfTI files written from arrays, for the tests and the "Certify your own model" page
(made on the spot, never downloaded). Needs pydicom and nibabel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_dicom(path: str | Path, array: np.ndarray, *, photometric: str = "MONOCHROME2", bits: int = 12,
                signed: bool = False, syntax: Any = None, uid: str | None = None, **elements: Any) -> Path:
    """A minimal DICOM file of ``array``: (H, W) grey, (F, H, W) multi-frame or (H, W, 3) RGB, stored as
    ``bits``-bit integers; ``syntax`` a compressed transfer syntax UID (the raw bytes encapsulated, so
    it does not decode); ``uid`` the SOP instance UID (default: a fresh one, so the file's bytes differ from
    run to run); ``elements`` extra attributes (RescaleSlope, WindowCenter, ...)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, uid or generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    colour = array.ndim == 3 and array.shape[-1] == 3
    dataset.Rows, dataset.Columns = array.shape[-3:-1] if colour else array.shape[-2:]
    if array.ndim == 3 and not colour:
        dataset.NumberOfFrames = array.shape[0]
    dataset.SamplesPerPixel = 3 if colour else 1
    if colour:
        dataset.PlanarConfiguration = 0
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 8 if bits <= 8 else 16
    dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = bits, bits - 1, int(signed)
    for name, value in elements.items():
        setattr(dataset, name, value)
    dtype = (np.int16 if signed else np.uint16) if bits > 8 else np.uint8
    raw = array.astype(dtype).tobytes()
    if syntax is None:
        dataset.PixelData = raw
    else:  # a compressed syntax: the bytes encapsulated as one frame (no codec needed to write it)
        from pydicom.encaps import encapsulate

        dataset.PixelData = encapsulate([raw])
        dataset["PixelData"].VR, dataset["PixelData"].is_undefined_length = "OB", True
    dataset.save_as(path, enforce_file_format=True)
    return Path(path)


def write_nifti(path: str | Path, array: np.ndarray, slope: float | None = None,
                inter: float | None = None, affine: np.ndarray | None = None) -> Path:
    """A NIfTI-1 file of ``array`` (the identity affine unless ``affine`` (4, 4) is given), with scl_slope /
    scl_inter when given."""
    import nibabel

    image = nibabel.Nifti1Image(array, np.eye(4) if affine is None else affine)
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    nibabel.save(image, path)
    return Path(path)
