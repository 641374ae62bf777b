"""Image readers under hostile files (issue 34): the pixel budget, running out of memory, radii that hold.

Every reader checks the size its file's header declares against the pixel budget before it decodes
anything. The bombs are small files that declare huge images, written streaming (a block compressed
once and repeated), so the test never holds them inflated; ``medcert certify`` refuses each in a
subprocess whose address space is capped 1 GiB above what its imports take, and its peak memory is
read back. Then the mapping records (no radius in stored values through a mapping that reads the
image; the channel step's norm) and the smaller DICOM / TIFF reader fixes.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from medcert_core.__main__ import main
from medcert_core.data import base
from medcert_core.data.base import MAX_PIXELS, ImageTooLarge, read_image, read_mask
from medcert_core.data.medical import parse_intensity, parse_slice, read_with_mapping
from medcert_core.single_image import channel_norm, model_input, radius_on_the_file, read_image_file
from medcert_core.testing.medical_files import write_dicom, write_nifti

REPO = Path(__file__).resolve().parents[1]
HEADROOM = 2 ** 30  # address space the subprocess may take beyond its imports
FRAMES = "frames x rows x columns x channels"
PIXELS = "rows x columns x channels"


# --------------------------------------------------------------------------- files made here


def deflate_repeated(prefix: bytes, block: bytes, count: int, tail: bytes = b"") -> Iterator[bytes]:
    """A raw deflate stream of ``prefix + block * count + tail`` in which ``block`` is compressed only twice:
    after a full flush the compressor starts afresh, so every later copy compresses to the same bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    yield compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = b""
    for index in range(count):
        if index < 2:
            again = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
        yield again
    yield compressor.compress(tail) + compressor.flush()


def png_bomb(path: Path, height: int, width: int, bit_depth: int, colour_type: int, planes: int) -> Path:
    """A valid PNG of ``height`` constant rows (a few MB for gigabytes of pixels), its zlib stream written
    streaming with the right Adler-32."""
    row = b"\x00" + b"\x80" * (width * planes * bit_depth // 8)  # filter type 0, then mid-grey samples
    rows = max(k for k in range(1, 65) if height % k == 0 and k * len(row) <= 2 ** 20)  # rows per block
    checksum = 1
    for _ in range(height // rows):
        checksum = zlib.adler32(row * rows, checksum)
    stream = b"\x78\x01" + b"".join(deflate_repeated(b"", row * rows, height // rows)) + struct.pack(">I", checksum)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(base.PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b""))
    return path


def tiff_bomb(path: Path, height: int, width: int) -> Path:
    """A zlib-tiled uint16 RGB TIFF of ``height`` x ``width``: every tile the same pre-compressed bytes."""
    tile = zlib.compress(np.full((512, 512, 3), 0x8080, np.uint16).tobytes())
    tiles = math.ceil(height / 512) * math.ceil(width / 512)
    tifffile.imwrite(path, (tile for _ in range(tiles)), shape=(height, width, 3), dtype=np.uint16,
                     tile=(512, 512), compression="zlib", photometric="rgb")
    return path


def nifti_gz_bomb(path: Path, shape: tuple[int, ...]) -> Path:
    """A .nii.gz of uint8 zeros of ``shape``, gzip'd streaming (a MB per 256 MB of voxels)."""
    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    zeros, remaining = bytes(2 ** 20), math.prod(shape)
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(header.binaryblock + b"\x00" * 4)  # the header, then no extensions
        while remaining:
            handle.write(zeros[:min(remaining, len(zeros))])
            remaining -= min(remaining, len(zeros))
    return path


def deflated(path: Path, source: Path) -> Path:
    """``source`` saved again with the Deflated Explicit VR Little Endian transfer syntax."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    dataset = pydicom.dcmread(source)
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    return path


def deflated_dicom_bomb(path: Path, rows: int, columns: int, frames: int, pixel_bytes: int) -> Path:
    """A Deflated DICOM whose header declares ``frames`` x ``rows`` x ``columns`` 16-bit pixels and whose
    PixelData element holds ``pixel_bytes`` zeros (declared in its element header), deflated streaming."""
    from pydicom.filereader import read_file_meta_info

    plain = write_dicom(path.with_suffix(".plain.dcm"), np.zeros((2, 2)), bits=16, Rows=rows, Columns=columns,
                        NumberOfFrames=frames)
    small = deflated(path.with_suffix(".small.dcm"), plain)
    start = 132 + 12 + int(read_file_meta_info(plain).FileMetaInformationGroupLength)
    body = plain.read_bytes()[start:]
    elements = body[:body.rindex(b"\xe0\x7f\x10\x00OW")]  # the dataset up to its PixelData element
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes)
    block = bytes(2 ** 20)
    count, rest = divmod(pixel_bytes, len(block))
    stream = b"".join(deflate_repeated(elements + pixel_header, block, count, bytes(rest)))
    start = 132 + 12 + int(read_file_meta_info(small).FileMetaInformationGroupLength)
    path.write_bytes(small.read_bytes()[:start] + stream)
    plain.unlink()
    small.unlink()
    return path


def pil_file(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, **options)
    return path


def jpeg_bomb(path: Path, height: int, width: int) -> Path:
    """A 16 x 16 grey JPEG whose frame header (SOF0) says ``height`` x ``width``."""
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def bmp_bomb(path: Path, height: int, width: int) -> Path:
    """An 8 x 8 grey BMP whose info header says ``height`` x ``width``."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, "BMP")
    data = bytearray(buffer.getvalue())
    data[18:26] = struct.pack("<ii", width, height)
    path.write_bytes(bytes(data))
    return path


def gif_bomb(path: Path, height: int, width: int) -> Path:
    """An 8 x 8 GIF whose logical screen and image descriptor say ``height`` x ``width``."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, "GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", width, height)
    at = 13 + (3 * 2 ** ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[at] == 0x21:  # extension blocks before the image descriptor
        at += 2
        while data[at]:
            at += data[at] + 1
        at += 1
    assert data[at] == 0x2C
    data[at + 5:at + 9] = struct.pack("<HH", width, height)
    path.write_bytes(bytes(data))
    return path


def budget_message(path: Path, shape: tuple[int, ...], axes: str, limit: int) -> str:
    elements = math.prod(shape)
    return (f"image file {path}: its header declares {' x '.join(map(str, shape))} ({axes}) = {elements:,} "
            f"elements, more than the limit of {limit:,}; refused before decoding")


# --------------------------------------------------------------------------- the bombs, in a capped subprocess


RUNNER = r"""
import contextlib, io, json, resource, sys, traceback
import medcert_core.single_image, nibabel, png, pydicom.pixels, tifffile, PIL.Image  # what reading imports
from medcert_core.__main__ import main

with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
cap = size + int(sys.argv[2]) if hard == resource.RLIM_INFINITY else min(hard, size + int(sys.argv[2]))
resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
results = []
for argv in json.loads(sys.argv[1]):
    before, stderr = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            main(argv)
            code = 0
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            code = "raised"
            traceback.print_exc()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results.append({"code": code, "stderr": stderr.getvalue(), "maxrss_kb": [before, after]})
print(json.dumps(results))
"""


def certify_capped(tmp_path: Path, runs: list[list[str]]) -> list[dict]:
    """``medcert certify`` on each argument list, in one subprocess capped at HEADROOM above its imports."""
    argvs = [["certify", *run, "--checkpoint", str(tmp_path / "none.pt"), "--sigma", "0.5",
              "--output-dir", str(tmp_path / "out")] for run in runs]
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argvs), str(HEADROOM)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "MEDCERT_TRACEBACK": ""}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the address space from /proc (Linux)")
def test_bombs_of_every_format_are_refused_from_their_header_in_little_memory(tmp_path):
    limit = f"{MAX_PIXELS:,}"
    bombs = {  # file, the shape its header declares, what the shape's numbers are
        "png16": (png_bomb(tmp_path / "rgb16.png", 20000, 20000, 16, 2, 3), (20000, 20000, 3), PIXELS),
        "png8": (png_bomb(tmp_path / "grey8.png", 20000, 20000, 8, 0, 1), (20000, 20000, 1), PIXELS),
        "jpeg": (jpeg_bomb(tmp_path / "photo.jpg", 30000, 30000), (30000, 30000, 1), PIXELS),
        "bmp": (bmp_bomb(tmp_path / "scan.bmp", 30000, 30000), (30000, 30000, 1), PIXELS),
        "gif": (gif_bomb(tmp_path / "anim.gif", 65535, 65535), (65535, 65535, 3), PIXELS),
        "tiff": (tiff_bomb(tmp_path / "slide.tif", 20000, 20000), (20000, 20000, 3), "TIFF axes YXS"),
        "nifti": (nifti_gz_bomb(tmp_path / "volume.nii.gz", (16385, 16385)), (16385, 16385),
                  "the NIfTI array's dimensions"),
        "dicom": (write_dicom(tmp_path / "cine.dcm", np.zeros((2, 2)), bits=16, Rows=20000, Columns=20000,
                              NumberOfFrames=3), (3, 20000, 20000, 1), FRAMES),
        "deflated": (deflated_dicom_bomb(tmp_path / "deflated.dcm", 20000, 20000, 3, 2 * 3 * 20000 * 20000),
                     (3, 20000, 20000, 1), FRAMES),
    }
    # a small header and a huge PixelData: the header passes, the capped inflation does not
    honest_header = deflated_dicom_bomb(tmp_path / "stuffed.dcm", 64, 64, 1, 3 * 2 ** 30)
    assert max(path.stat().st_size for path, _, _ in bombs.values()) < 8 * 2 ** 20, "small files"
    runs = [[str(path)] for path, _, _ in bombs.values()]
    runs += [[str(honest_header)], [str(bombs["nifti"][0]), "--max-pixels", str(2 ** 30)]]
    results = certify_capped(tmp_path, runs)

    report = {}
    for (name, (path, shape, axes)), result in zip(bombs.items(), results):
        assert result["code"] == 2, (name, result["stderr"])
        assert "Traceback" not in result["stderr"], (name, result["stderr"])
        assert f"medcert: error: {budget_message(path, shape, axes, MAX_PIXELS)}" in result["stderr"], name
        assert f"more than the limit of {limit}" in result["stderr"] and "--max-pixels N (certify)" in result["stderr"]
        report[name] = result["maxrss_kb"]
    stuffed, out_of_memory = results[-2:]
    assert stuffed["code"] == 2 and "Traceback" not in stuffed["stderr"], stuffed["stderr"]
    assert (f"medcert: error: image file {honest_header}: its deflated dataset inflates to more than "
            f"{2 * 64 * 64 + 2 * 16 * 2 ** 20:,} bytes") in stuffed["stderr"]
    # the NIfTI bomb let through by a raised budget: it runs out of memory, and says so cleanly
    assert out_of_memory["code"] == 2 and "Traceback" not in out_of_memory["stderr"], out_of_memory["stderr"]
    assert (f"medcert: error: image file {bombs['nifti'][0]}: out of memory while reading it and mapping its "
            f"values to [0, 1]") in out_of_memory["stderr"]
    for name, (before, after) in (report | {"stuffed": stuffed["maxrss_kb"]}).items():
        assert after - before < 100 * 1024, f"{name}: the peak memory grew by {(after - before) // 1024} MB"
    print({name: f"+{(after - before) // 1024} MB over {before // 1024} MB" for name, (before, after)
           in (report | {"stuffed": stuffed["maxrss_kb"], "oom": out_of_memory["maxrss_kb"]}).items()})


# --------------------------------------------------------------------------- every reader, in process


class Decoded(BaseException):
    """Raised by a decoder called where only the header may be read (a BaseException: no handler catches it)."""


def forbid_decoding(monkeypatch) -> None:
    """Every decoder of pixel data fails loudly: what runs is header reading only."""
    import nibabel.arrayproxy
    import png
    import pydicom.dataset
    from PIL import ImageFile

    def decoded(*args, **kwargs):
        raise Decoded("pixel data decoded before the budget was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    monkeypatch.setattr(png.Reader, "asDirect", decoded)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", decoded)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(decoded))
    monkeypatch.setattr(nibabel.arrayproxy.ArrayProxy, "__array__", decoded)
    monkeypatch.setattr(nibabel.arrayproxy.ArrayProxy, "__getitem__", decoded)


def ramp(height: int = 24, width: int = 20, top: int = 255) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) * 37) % (top + 1)


def _colour(top: int = 255) -> np.ndarray:
    return np.stack([ramp(top=top), top - ramp(top=top), ramp(top=top) // 2], axis=-1)


PALETTE = {f"{colour}PaletteColorLookupTable{part}": value for colour, data in
           (("Red", np.arange(256) * 257), ("Green", (255 - np.arange(256)) * 257), ("Blue", np.full(256, 1000)))
           for part, value in (("Descriptor", [256, 0, 16]), ("Data", data.astype("<u2").tobytes()))}
READERS = {  # name: (write the file, the shape its header declares, what its numbers are, --slice)
    "png grey (PIL)": (lambda p: pil_file(p / "a.png", Image.fromarray(ramp().astype(np.uint8))), (24, 20, 1), PIXELS,
                       None),
    "png rgb (PIL)": (lambda p: pil_file(p / "a.png", Image.fromarray(_colour().astype(np.uint8))), (24, 20, 3),
                      PIXELS, None),
    "png palette (PIL, to RGB)": (lambda p: pil_file(p / "a.png", Image.fromarray(ramp().astype(np.uint8)).convert("P")),
                                  (24, 20, 3), PIXELS, None),
    "png 16-bit rgb (pypng)": (lambda p: _png16(p / "a.png"), (24, 20, 3), PIXELS, None),
    "jpeg": (lambda p: pil_file(p / "a.jpg", Image.fromarray(_colour().astype(np.uint8))), (24, 20, 3), PIXELS, None),
    "bmp": (lambda p: pil_file(p / "a.bmp", Image.fromarray(ramp().astype(np.uint8))), (24, 20, 1), PIXELS, None),
    "gif (palette, to RGB)": (lambda p: pil_file(p / "a.gif", Image.fromarray(_colour().astype(np.uint8)).quantize(16)),
                              (24, 20, 3), PIXELS, None),
    "tiff": (lambda p: _tiff(p / "a.tif", _colour(65535).astype(np.uint16)), (24, 20, 3), "TIFF axes YXS", None),
    "dicom": (lambda p: write_dicom(p / "a.dcm", ramp(top=4095)), (1, 24, 20, 1), FRAMES, None),
    "dicom multi-frame": (lambda p: write_dicom(p / "a.dcm", np.stack([ramp(top=4095)] * 3)), (3, 24, 20, 1), FRAMES,
                          "0:1"),
    "dicom deflated": (lambda p: deflated(p / "a.dcm", write_dicom(p / "plain.dcm", ramp(top=4095))), (1, 24, 20, 1),
                       FRAMES, None),
    "dicom rgb": (lambda p: write_dicom(p / "a.dcm", _colour(), photometric="RGB", bits=8), (1, 24, 20, 3), FRAMES,
                  None),
    "dicom palette": (lambda p: write_dicom(p / "a.dcm", ramp(), photometric="PALETTE COLOR", bits=8, **PALETTE),
                      (1, 24, 20, 3), FRAMES, None),
    "nifti 2d": (lambda p: write_nifti(p / "a.nii", ramp().astype(np.int16)), (24, 20), "the NIfTI array's dimensions",
                 None),
    "nifti volume slice": (lambda p: write_nifti(p / "a.nii.gz", np.zeros((6, 7, 5), np.int16)), (6, 7, 5),
                           "the NIfTI array's dimensions", "2:3"),
    "jsrt img": (lambda p: _jsrt(p / "a.IMG"), (2048, 2048), "rows x columns of a JSRT .IMG", None),
}


def _png16(path: Path) -> Path:
    import png

    png.from_array(_colour(65535).astype(np.uint16).reshape(24, -1), "RGB;16").save(path)
    return path


def _tiff(path: Path, array: np.ndarray) -> Path:
    tifffile.imwrite(path, array)
    return path


def _jsrt(path: Path) -> Path:
    np.zeros((2048, 2048), ">u2").tofile(path)
    return path


@pytest.mark.parametrize("name", list(READERS))
def test_every_reader_counts_the_header_size_and_refuses_past_the_budget_before_decoding(tmp_path, monkeypatch, name):
    write, shape, axes, slice_text = READERS[name]
    path = write(tmp_path)
    elements = math.prod(shape)
    slice_spec = parse_slice(slice_text) if slice_text else None
    image, _ = read_image_file(path, slice_spec=slice_spec, max_pixels=elements)  # exactly at the budget: read
    assert image.numel() > 0
    with monkeypatch.context() as patch:
        forbid_decoding(patch)
        with pytest.raises(ImageTooLarge) as info:
            read_image_file(path, slice_spec=slice_spec, max_pixels=elements - 1)
    assert budget_message(path, shape, axes, elements - 1) in str(info.value)
    assert "raise the limit: --max-pixels N (certify) or max_pixels=N" in str(info.value)


def test_the_dataset_readers_use_the_budget_too(tmp_path, monkeypatch):
    path = pil_file(tmp_path / "a.png", Image.fromarray(ramp().astype(np.uint8)))
    with pytest.raises(ImageTooLarge, match=r"24 x 20 x 1 \(rows x columns x channels\) = 480 elements, more than the "
                                            r"limit of 479"):
        read_image(path, max_pixels=479)
    with pytest.raises(ImageTooLarge, match="limit of 400"):
        read_mask(path, max_pixels=400)
    monkeypatch.setattr(base, "MAX_PIXELS", 100)  # the default is read when reading, from one constant
    with pytest.raises(ImageTooLarge, match="limit of 100"):
        read_image(path)
    with pytest.raises(ValueError, match="max_pixels must be an integer >= 1"):
        read_with_mapping(path, max_pixels=0)


def test_pil_s_own_bomb_limit_gives_way_to_the_budget_and_is_put_back(tmp_path, monkeypatch):
    path = pil_file(tmp_path / "a.png", Image.fromarray(ramp(60, 50).astype(np.uint8)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would call 3000 pixels a bomb
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    np.testing.assert_allclose(read_image(path), ramp(60, 50) / 255, atol=1e-7)
    assert Image.MAX_IMAGE_PIXELS == 1000, "PIL's limit is back"
    with pytest.raises(ImageTooLarge, match="limit of 2,999"):
        read_image(path, max_pixels=2999)


def test_a_deflated_dicom_reads_as_stored_and_its_inflation_is_capped(tmp_path, monkeypatch):
    from medcert_core.data import medical

    stored = np.stack([ramp(top=4095), 4095 - ramp(top=4095)])
    path = deflated(tmp_path / "cine.dcm", write_dicom(tmp_path / "plain.dcm", stored))
    image, mapping = read_with_mapping(path, slice_spec=parse_slice("0:1"))
    np.testing.assert_allclose(image, (4095 - ramp(top=4095)) / 4095, atol=1e-6)
    assert mapping["transfer_syntax"] == "Deflated Explicit VR Little Endian"
    # a small header, a PixelData element of 1 MiB: more than 4096 + 2 x 2 x 1 KiB inflated bytes
    monkeypatch.setattr(medical, "DEFLATED_HEADER_BYTES", 1024)
    stuffed = deflated_dicom_bomb(tmp_path / "stuffed.dcm", 32, 64, 1, 2 ** 20)
    with pytest.raises(ImageTooLarge, match=rf"stuffed\.dcm: its deflated dataset inflates to more than {4096 + 2048:,} "
                                            r"bytes, more than the 1 x 32 x 64 x 1 .* 16-bit pixels its header declares"):
        read_with_mapping(stuffed)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"truncated\.dcm: its deflated data ends early"):
        read_with_mapping(truncated)


def test_running_out_of_memory_names_the_file_and_the_cli_exits_2(tmp_path, monkeypatch, capsys):
    from medcert_core.data import medical

    path = write_dicom(tmp_path / "ct.dcm", ramp(top=4095))

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(medical, "map_intensity", out_of_memory)
    with pytest.raises(ImageTooLarge, match=rf"image file {path}: out of memory while reading it and mapping its "
                                            r"values to \[0, 1\] \(MemoryError\); free memory, or refuse such files"):
        read_with_mapping(path)
    with pytest.raises(SystemExit) as exit_info:
        main(["certify", str(path), "--checkpoint", str(tmp_path / "x.pt"), "--sigma", "0.5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"medcert: error: image file {path}: out of memory while reading it" in err
    # anywhere else in a command: one line and exit code 2 as well
    monkeypatch.setattr("medcert_core.single_image.certify_image_file", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        main(["certify", str(path), "--checkpoint", str(tmp_path / "x.pt"), "--sigma", "0.5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "medcert: error: out of memory (MemoryError); free memory, or use smaller inputs" in err


def test_max_pixels_on_the_command_line(tmp_path, capsys):
    path = pil_file(tmp_path / "a.png", Image.fromarray(ramp().astype(np.uint8)))
    with pytest.raises(SystemExit) as exit_info:
        main(["certify", str(path), "--checkpoint", str(tmp_path / "x.pt"), "--sigma", "0.5", "--max-pixels", "479"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"medcert: error: {budget_message(path, (24, 20, 1), PIXELS, 479)}" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["certify", str(path), "--checkpoint", "x.pt", "--sigma", "0.5", "--max-pixels", "0"])
    assert exit_info.value.code == 2
    assert "argument --max-pixels: must be an integer >= 1, got '0'" in capsys.readouterr().err


# --------------------------------------------------------------------------- radii that hold


def _save16(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint16)).save(path)
    return path


def test_minmax_gives_no_radius_in_stored_values(tmp_path):
    """The review's finding: under minmax, lowering one stored value by 20 moved the [0, 1] image by 0.683, 34 times
    what a radius in stored values (20 x unit_per_value) allows."""
    stored = 1000 + np.round(np.linspace(0, 1000, 57 * 64)).reshape(57, 64)
    lowered = stored.copy()
    lowered[0, 0] -= 20  # the minimum, one value, 20 lower
    files = _save16(tmp_path / "a.png", stored), _save16(tmp_path / "b.png", lowered)
    (image, mapping), (moved, _) = (read_with_mapping(path, parse_intensity("minmax")) for path in files)
    shift, allowed = float(np.linalg.norm(moved - image)), 20 * mapping["unit_per_value"]
    assert shift == pytest.approx(0.6835, abs=5e-4) and shift / allowed == pytest.approx(34.18, abs=0.01)
    assert mapping["image_dependent"] is True
    record = radius_on_the_file(0.5, mapping, (1, 57, 64), 1, (57, 64))
    assert record["stored_values"] is None and record["unit_image"] == pytest.approx(0.5)
    assert "depends on the image itself" in record["stored_values_reason"]
    # the same files under the dtype's range: the bound holds, and the radius in stored values is given
    (image, mapping), (moved, _) = (read_with_mapping(path) for path in files)
    assert mapping["image_dependent"] is False
    assert float(np.linalg.norm(moved - image)) <= 20 * mapping["unit_per_value"] * (1 + 1e-6)
    record = radius_on_the_file(0.5, mapping, (1, 57, 64), 1, (57, 64))
    assert record["stored_values"] == pytest.approx(0.5 * 65535) and record["stored_values_reason"] is None


def test_every_mapping_says_whether_it_depends_on_the_image(tmp_path):
    floats = write_nifti(tmp_path / "hu.nii", np.linspace(-1000, 1000, 480, dtype=np.float32).reshape(24, 20))
    unit = write_nifti(tmp_path / "unit.nii", np.linspace(0, 1, 480, dtype=np.float32).reshape(24, 20))
    ct = write_dicom(tmp_path / "ct.dcm", ramp(top=4095), WindowCenter=2000, WindowWidth=1000)
    expected = {(floats, "auto"): True, (unit, "auto"): False, (ct, "auto"): False, (ct, "minmax"): True,
                (ct, "voi"): False, (ct, "window:100,200"): False}
    for (path, intensity), dependent in expected.items():
        mapping = read_with_mapping(path, parse_intensity(intensity))[1]
        assert mapping["image_dependent"] is dependent, (path.name, intensity)
        record = radius_on_the_file(0.3, mapping, (1, 24, 20), 1, (24, 20))
        assert (record["stored_values"] is None) is dependent, (path.name, intensity)
    palette = write_dicom(tmp_path / "palette.dcm", ramp(), photometric="PALETTE COLOR", bits=8, **PALETTE)
    mapping = read_with_mapping(palette)[1]
    record = radius_on_the_file(0.3, mapping, (3, 24, 20), 3, (24, 20))
    assert mapping["image_dependent"] is False and record["stored_values"] is None
    assert "a table, not affine" in record["stored_values_reason"]


def test_integer_nifti_is_mapped_by_its_dtype_range_not_by_the_slice(tmp_path):
    volume = np.stack([ramp() - 100, ramp() * 10 + 3000], axis=-1).astype(np.int16)  # two slices, other ranges
    path = write_nifti(tmp_path / "ct.nii.gz", volume)
    for index in (0, 1):
        image, mapping = read_with_mapping(path, slice_spec=parse_slice(f"2:{index}"))
        np.testing.assert_allclose(image, (volume[..., index].astype(float) + 32768) / 65535, atol=1e-6)
        assert mapping["image_dependent"] is False and mapping["unit_per_value"] == pytest.approx(1 / 65535)
    grey = write_nifti(tmp_path / "xray.nii", ramp().astype(np.uint8))
    np.testing.assert_allclose(read_with_mapping(grey)[0], ramp() / 255, atol=1e-6)
    scaled = write_nifti(tmp_path / "hu.nii", ramp().astype(np.int16), slope=0.5, inter=-10)
    image, mapping = read_with_mapping(scaled)
    low, high = -32768 * 0.5 - 10, 32767 * 0.5 - 10
    np.testing.assert_allclose(image, (ramp() * 0.5 - 10 - low) / (high - low), atol=1e-6)
    record = radius_on_the_file(0.3, mapping, (1, 24, 20), 1, (24, 20))
    assert record["stored_values"] == pytest.approx(0.3 * 65535), "one stored unit moves the image by 1 / 65535"


@pytest.mark.parametrize(("stored", "channels"), [(1, 3), (3, 1), (3, 4), (3, 2)])
def test_the_channel_norm_is_the_norm_of_the_channel_step(stored, channels):
    native = (6, 5)  # model_input at the file's own size: the channel step alone

    def step(x):
        return model_input(x, channels, native)

    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(stored, *native, generator=generator, dtype=torch.float64)
    for _ in range(50):  # power iteration on the step's A^T A
        direction.requires_grad_(True)
        moved = step(direction)
        (pulled,) = torch.autograd.grad(moved, direction, grad_outputs=moved)
        direction = (pulled / pulled.norm()).detach()
    largest = float(step(direction).norm())
    assert channel_norm(stored, channels) == pytest.approx(largest, rel=1e-9)
    assert channel_norm(stored, channels) == pytest.approx(math.sqrt(channels / stored))


# --------------------------------------------------------------------------- smaller reader fixes


def test_a_ybr_dicom_is_converted_to_rgb_once(tmp_path):
    ybr = np.array([[[200, 128, 128], [100, 128, 200]], [[0, 128, 128], [150, 90, 170]]])
    path = write_dicom(tmp_path / "photo.dcm", ybr, photometric="YBR_FULL", bits=8)
    image, mapping = read_with_mapping(path)
    np.testing.assert_allclose(image[0, 0], [200 / 255] * 3, atol=1e-6)  # grey stays grey
    y, cb, cr = ybr[..., 0].astype(float), ybr[..., 1] - 128.0, ybr[..., 2] - 128.0  # PS3.3 C.7.6.3.1.2
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    np.testing.assert_allclose(image * 255, np.clip(rgb, 0, 255), atol=1.0)
    assert mapping["colour"] == "YBR_FULL converted to RGB once, by pydicom"


@pytest.mark.parametrize("slope, intercept", [(0, 0), (math.nan, 0), (math.inf, 0), (1, math.nan)])
def test_a_dicom_rescale_that_maps_nothing_is_refused(tmp_path, slope, intercept):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about writing a non-finite DS
        path = write_dicom(tmp_path / "bad.dcm", ramp(top=4095), RescaleSlope=slope, RescaleIntercept=intercept)
    with pytest.raises(ValueError, match=rf"cannot read DICOM file {path}: RescaleSlope .*, RescaleIntercept .*: the "
                                         r"slope must be a finite number other than 0 and the intercept finite"):
        read_with_mapping(path)


def test_a_rescale_given_without_its_intercept_is_applied_as_recorded(tmp_path):
    path = write_dicom(tmp_path / "half.dcm", ramp(top=4095), RescaleSlope=2)  # pydicom would skip it
    image, mapping = read_with_mapping(path)
    assert mapping["rescale"] == {"slope": 2.0, "intercept": 0.0}
    np.testing.assert_allclose(image, ramp(top=4095) * 2 / (4095 * 2), atol=1e-6)


def test_a_modality_lut_is_refused(tmp_path):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor, item.LUTData = [4096, 0, 16], np.arange(4096, dtype="<u2").tobytes()
    path = write_dicom(tmp_path / "xa.dcm", ramp(top=4095), ModalityLUTSequence=[item])
    with pytest.raises(ValueError, match=rf"cannot read DICOM file {path}: its values go through a Modality LUT "
                                         r"Sequence \(a lookup table\), which medcert does not apply"):
        read_with_mapping(path)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
def test_signed_integer_tiffs_are_mapped_by_their_dtype_range(tmp_path, dtype):
    info = np.iinfo(dtype)
    stored = np.array([[info.min, -1, 0], [1, info.max // 2, info.max]], dtype=dtype)
    path = _tiff(tmp_path / "signed.tif", stored)
    expected = (stored.astype(np.float64) - info.min) / (float(info.max) - info.min)
    image, mapping = read_with_mapping(path)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    np.testing.assert_allclose(read_image(path), expected, atol=1e-6)  # the datasets read it the same
    assert mapping["bits_stored"] == info.bits and mapping["unit_per_value"] == pytest.approx(1 / (2.0 ** info.bits - 1))
    assert image[0, 1] == pytest.approx(0.5, abs=0.002), "-1 sits just below the middle, not clipped to 0"


def test_a_palette_colour_dicom_goes_through_its_palette(tmp_path):
    path = write_dicom(tmp_path / "palette.dcm", ramp(), photometric="PALETTE COLOR", bits=8, **PALETTE)
    image, mapping = read_with_mapping(path)
    index = ramp().astype(float)
    expected = np.stack([index * 257, (255 - index) * 257, np.full_like(index, 1000)], axis=-1) / 65535
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert mapping["unit_per_value"] is None and mapping["formula"].startswith("p = palette(v)")
    broken = write_dicom(tmp_path / "broken.dcm", ramp(), photometric="PALETTE COLOR", bits=8)  # no palette
    with pytest.raises(ValueError, match=rf"cannot read DICOM file {broken}: PALETTE COLOR: its palette cannot be "
                                         r"applied .*; convert the file to RGB"):
        read_with_mapping(broken)
