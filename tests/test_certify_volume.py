"""``certify`` on a whole NIfTI volume (issue #38, step 4): a volume given without --slice is certified whole by a
volumetric model, with its labels written as NIfTI on the input's affine.

- the labels equal SmoothedSegmenter's certificate of the same [0, 1] tensor (computed here from the stored values
  by the window's formula) with the recorded noise seed; abstain is its own value in the label NIfTI;
- the JSON says how the file became the tensor, and the radius in stored values: R x (WIDTH - 1) for a fixed
  window, none (with the reason) for a mapping that reads the volume itself;
- a program that needs sizes in multiples of 4 runs on the volume padded with zeros inside the base model, and
  only the volume's own voxels are certified and written;
- refusals: a 2D model given a volume, a 3D model given a 2D image, 4D data, a volume in a folder, a volume
  larger than the model's fixed size, an n too small for the volume's voxels, a file beyond the voxel budget.
"""

from __future__ import annotations

import json
import types
import warnings

import nibabel
import numpy as np
import pytest
import torch
from PIL import Image

from medcert_core import ABSTAIN
from medcert_core.__main__ import main
from medcert_core.data.base import ImageTooLarge
from medcert_core.single_file import certify_file
from medcert_core.single_volume import PaddedVolume
from medcert_core.smoothing import SmoothedSegmenter
from medcert_core.testing.medical_files import write_nifti

warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one intra-op thread

SHAPE = (6, 8, 10)  # (D, H, W) of the volumes
AFFINE = np.array([[0.0, 0.0, 2.5, -10.0], [0.0, -1.5, 0.0, 20.0], [0.8, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
CENTER, WIDTH = 100.0, 201.0  # window:100,201 maps stored 0 .. 200 linearly to [0, 1]
CERTIFY = dict(denoiser="none", sigma=0.25, n0=5, n=40, alpha=0.01, tau=0.75, seed=7, progress=False)


class Conv3dSegmenter(torch.nn.Module):
    """A 3x3x3 Conv3d with fixed weights, 1 -> 3 classes: logits (B, 3, D, H, W) at the input's size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)
        weights = torch.linspace(-1, 1, self.conv.weight.numel()).reshape(self.conv.weight.shape)
        with torch.no_grad():
            self.conv.weight.copy_((7 * weights).sin() * 0.3)
            self.conv.bias.copy_(torch.tensor([0.0, 0.1, -0.1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PooledSegmenter(Conv3dSegmenter):
    """Conv3d, 2x2x2 max pooling twice and nearest upsampling back: it needs sizes in multiples of 4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.max_pool3d(torch.nn.functional.max_pool3d(self.conv(x), 2), 2)
        return torch.nn.functional.interpolate(pooled, scale_factor=4.0, mode="nearest") + 0.1 * self.conv(x)


class Conv2dSegmenter(torch.nn.Module):
    """A 2D model, (B, 1, H, W) -> (B, 2, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def export(tmp_path, module: torch.nn.Module, example: tuple[int, ...], name: str, dynamic: dict | None = None) -> str:
    """``module`` as a torch.export program (.pt2) with a dynamic batch (and ``dynamic`` axes: {axis: Dim})."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(module.eval(), (torch.zeros(2, *example[1:]),),
                                  dynamic_shapes={"x": {0: batch, **(dynamic or {})}})
    path = tmp_path / name
    torch.export.save(program, path)
    return str(path)


def stored_volume(shape=SHAPE) -> np.ndarray:
    """int16 values 0..200 with structure along every axis (the window maps them to [0, 1])."""
    d, h, w = np.meshgrid(*(np.arange(length) for length in shape), indexing="ij")
    return ((d * 37 + h * 11 + w * 29) % 201).astype(np.int16)


def window_tensor(stored: np.ndarray) -> torch.Tensor:
    """The (1, D, H, W) tensor of window:CENTER,WIDTH, written out: clip((v - (c - 0.5)) / (w - 1) + 0.5, 0, 1)."""
    unit = np.clip((stored.astype(np.float64) - (CENTER - 0.5)) / (WIDTH - 1) + 0.5, 0, 1)
    return torch.from_numpy(unit.astype(np.float32)[None])


def smoothed_labels(module: torch.nn.Module, tensor: torch.Tensor, noise_seed: int) -> np.ndarray:
    """SmoothedSegmenter's certified labels of ``tensor`` with the noise seed a certify run recorded."""
    smoothed = SmoothedSegmenter(module, 3, CERTIFY["sigma"], device="cpu")
    generator = torch.Generator().manual_seed(noise_seed)
    certificate = smoothed.certify(tensor, CERTIFY["n0"], CERTIFY["n"], tau=CERTIFY["tau"], alpha=CERTIFY["alpha"],
                                   generator=generator)
    return certificate.labels.numpy()


@pytest.fixture(scope="module")
def volume_model(tmp_path_factory):
    """The Conv3d segmenter and its .pt2 (a (B, 1, 6, 8, 10) input, dynamic batch)."""
    module = Conv3dSegmenter().eval()
    return module, export(tmp_path_factory.mktemp("model"), module, (1, 1, *SHAPE), "seg3d.pt2")


def test_a_volume_is_certified_whole_and_its_labels_keep_the_inputs_affine(tmp_path, volume_model):
    module, model = volume_model
    stored = stored_volume()
    path = write_nifti(tmp_path / "ct.nii.gz", stored, affine=AFFINE)
    summary = certify_file(path, None, model=model, intensity=f"window:{CENTER:g},{WIDTH:g}",
                                 output_dir=tmp_path / "out", **CERTIFY)

    expected = smoothed_labels(module, window_tensor(stored), summary["noise_seed"])
    assert 0.05 < (expected == ABSTAIN).mean() < 0.95, "some voxels certified, some abstained"
    assert len(np.unique(expected[expected != ABSTAIN])) >= 2, "several classes certified"
    written = nibabel.load(summary["labels_nifti"])
    assert written.shape == SHAPE and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, AFFINE)
    np.testing.assert_allclose(written.header.get_zooms(), nibabel.load(path).header.get_zooms())
    values = np.asarray(written.dataobj)
    assert summary["abstain_value"] == 255
    np.testing.assert_array_equal(values, np.where(expected == ABSTAIN, 255, expected))

    mapping = summary["file_to_tensor"]
    assert mapping["format"] == "nifti" and mapping["intensity"] == f"window:{CENTER:g},{WIDTH:g}"
    assert mapping["axes"].startswith("D, H, W = array axes 0, 1, 2") and mapping["resize"] == "none"
    assert mapping["tensor"] == "[0, 1]^(1x6x8x10)" and mapping["channels"] == "as stored"
    assert mapping["padding"]["appended_voxels"] == [0, 0, 0] and mapping["padding"]["model_input_size"] == [6, 8, 10]
    radius = summary["radius"]
    assert summary["radius_on_the_file"]["unit_image"] == pytest.approx(radius)
    assert summary["radius_on_the_file"]["stored_values"] == pytest.approx(radius * (WIDTH - 1))  # R (high - low)
    assert summary["certified_input_size"] == [6, 8, 10] and summary["model_form"] == "torch.export"
    assert sum(summary["certified_pixels"].values()) == int((expected != ABSTAIN).sum())
    assert summary["abstain_fraction"] == pytest.approx((expected == ABSTAIN).mean())

    assert summary["overlay_slices"] == [{"axis": 0, "index": 3}, {"axis": 1, "index": 4}, {"axis": 2, "index": 5}]
    shapes = [np.array(Image.open(png)).shape for png in summary["overlay_pngs"]]
    assert shapes == [(8, 10, 3), (6, 10, 3), (6, 8, 3)]
    assert np.array(Image.open(summary["legend_png"])).shape[1] > 8 + 10 + 10 + 8
    assert json.loads((tmp_path / "out" / "ct_certificate.json").read_text())["labels_nifti"] == summary["labels_nifti"]


def test_the_command_line_certifies_a_volume_and_an_image_dependent_mapping_has_no_stored_radius(
        tmp_path, volume_model, capsys):
    _, model = volume_model
    floats = stored_volume().astype(np.float32) * 10 - 700  # floats outside [0, 1]: auto reads the volume's range
    path = write_nifti(tmp_path / "mr.nii", floats, affine=AFFINE)
    main(["certify", str(path), "--model", model, "--class-names", "background,a,b", "--sigma", "0.25", "--n0", "5",
          "--n", "40", "--alpha", "0.01", "--seed", "3", "--output-dir", str(tmp_path / "out")])
    summary = json.loads(capsys.readouterr().out)
    assert summary["file_to_tensor"]["image_dependent"] is True
    record = summary["radius_on_the_file"]
    assert record["stored_values"] is None and "depends on the image itself" in record["stored_values_reason"]
    assert set(summary["certified_pixels"]) == {"background", "a", "b"}
    assert nibabel.load(summary["labels_nifti"]).shape == SHAPE


def test_a_model_that_needs_multiples_of_4_runs_on_the_volume_padded_inside_the_base_model(tmp_path):
    module = PooledSegmenter().eval()
    free = {axis: 4 * torch.export.Dim(f"axis{axis}", min=1, max=64) for axis in (2, 3, 4)}
    model = export(tmp_path, module, (1, 1, 8, 8, 12), "pooled.pt2", free)
    stored = stored_volume()
    path = write_nifti(tmp_path / "ct.nii.gz", stored, affine=AFFINE)
    summary = certify_file(path, None, model=model, intensity=f"window:{CENTER:g},{WIDTH:g}",
                                 output_dir=tmp_path / "out", **CERTIFY)
    padding = summary["file_to_tensor"]["padding"]
    assert padding["model_input_size"] == [8, 8, 12] and padding["appended_voxels"] == [2, 0, 2]
    expected = smoothed_labels(PaddedVolume(module, (8, 8, 12)), window_tensor(stored), summary["noise_seed"])
    values = np.asarray(nibabel.load(summary["labels_nifti"]).dataobj)
    assert values.shape == SHAPE
    np.testing.assert_array_equal(values, np.where(expected == ABSTAIN, 255, expected))

    # a fixed-size program larger than the volume pads too; a volume larger than it is refused, never resized
    fixed = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(module, (torch.zeros(1, 1, 8, 8, 12),)), fixed)
    summary = certify_file(path, None, model=str(fixed), output_dir=tmp_path / "fixed", **CERTIFY)
    assert summary["file_to_tensor"]["padding"]["appended_voxels"] == [2, 0, 2]
    big = write_nifti(tmp_path / "big.nii.gz", stored_volume((6, 8, 16)))
    with pytest.raises(ValueError, match=r"takes volumes of 8 x 8 x 12 voxels and this one is 6 x 8 x 16 \(array "
                                         r"axis 2: 16 > 12\); volumes are never resized"):
        certify_file(big, None, model=str(fixed), output_dir=tmp_path / "big", **CERTIFY)


def test_a_2d_model_given_a_volume_and_a_3d_model_given_an_image_are_refused(tmp_path, volume_model):
    _, model = volume_model
    volume = write_nifti(tmp_path / "ct.nii.gz", stored_volume())
    flat = export(tmp_path, Conv2dSegmenter(), (1, 1, 8, 10), "seg2d.pt2")
    with pytest.raises(ValueError, match=r"ct\.nii\.gz is a volume of shape 6 x 8 x 10 and the model takes 2D images "
                                         r"\(--model .*seg2d\.pt2: its input is .*\): pass --slice AXIS:INDEX .*or "
                                         r"give a 3D model"):
        certify_file(volume, None, model=flat, output_dir=tmp_path, **CERTIFY)
    with pytest.raises(ValueError, match=r"fails on a volume of shape \(1, 1, 6, 8, 10\).*pass --slice AXIS:INDEX"):
        certify_file(volume, None, model="test_certify_volume:Conv2dSegmenter", output_dir=tmp_path,
                           **CERTIFY)
    # with --slice the 2D model certifies one slice of the volume, as before
    summary = certify_file(volume, None, model=flat, slice="0:3", output_dir=tmp_path / "slice",
                                 **CERTIFY | {"n": 20, "alpha": 0.5})
    assert summary["file_to_tensor"]["slice"] == {"axis": 0, "index": 3}

    image = tmp_path / "x.png"
    Image.fromarray(np.arange(80, dtype=np.uint8).reshape(8, 10)).save(image)
    for given in (image, write_nifti(tmp_path / "plane.nii", stored_volume()[0]), volume):
        options = {"slice": "0:2"} if given == volume else {}
        with pytest.raises(ValueError, match=r"the model takes volumes \(B, C, D, H, W\) \(--model .*seg3d\.pt2: its "
                                             r"input is .*\) and .* holds 2D images: give a 3D NIfTI volume"):
            certify_file(given, None, model=model, output_dir=tmp_path, **CERTIFY, **options)
    with pytest.raises(ValueError, match=r"--image-size 6 x 8 x 10\) and .*x\.png holds 2D images"):
        certify_file(image, None, model="test_certify_volume:Conv3dSegmenter", image_size=(6, 8, 10),
                           in_channels=1, output_dir=tmp_path, **CERTIFY)


def test_4d_data_a_volume_in_a_folder_and_what_cannot_certify_are_refused_before_any_draw(tmp_path, volume_model,
                                                                                          monkeypatch):
    _, model = volume_model
    drawn = []
    monkeypatch.setattr(SmoothedSegmenter, "certify", lambda *args, **kwargs: drawn.append(1))
    series = write_nifti(tmp_path / "series.nii.gz", np.zeros((*SHAPE, 2), np.int16))
    with pytest.raises(ValueError, match=r"series\.nii\.gz has shape \(6, 8, 10, 2\): expected a 3D volume.*4D data"):
        certify_file(series, None, model=model, output_dir=tmp_path, **CERTIFY)
    folder = tmp_path / "folder"
    folder.mkdir()
    write_nifti(folder / "ct.nii.gz", stored_volume())
    with pytest.raises(ValueError, match=r"ct\.nii\.gz is a volume: certify a volume on its own"):
        certify_file(folder, None, model=model, output_dir=tmp_path, **CERTIFY)
    volume = folder / "ct.nii.gz"
    with pytest.raises(ValueError, match=r"n = 3 cannot certify any voxel of a 6 x 8 x 10 volume at tau = 0.75, "
                                         r"alpha = 0.01 \(Holm over 480 voxels\); use n >= \d+"):
        certify_file(volume, None, model=model, output_dir=tmp_path, **CERTIFY | {"n": 3})
    with pytest.raises(ImageTooLarge, match=r"declares 6 x 8 x 10 \(the NIfTI array's dimensions\) = 480 elements"):
        certify_file(volume, None, model=model, max_pixels=479, output_dir=tmp_path, **CERTIFY)
    with pytest.raises(ValueError, match=r"--denoiser unet:.*the denoisers take 2D images"):
        certify_file(volume, None, model=model, output_dir=tmp_path, **CERTIFY | {"denoiser": "unet:x"})
    assert not drawn and not list(tmp_path.glob("*_labels.nii.gz"))


def test_a_checkpoint_is_volumetric_when_its_image_size_is_d_h_w(tmp_path, monkeypatch):
    """The rule for medcert checkpoints, until a 3D architecture lands: the config's image_size has 3 axes."""
    import medcert_core.single_image as single_image

    module = Conv3dSegmenter().eval()
    config = types.SimpleNamespace(in_channels=1, num_classes=3, image_size=SHAPE,
                                   class_names=("background", "a", "b"))
    monkeypatch.setattr(single_image, "load_segmenter", lambda *args, **kwargs: (module, config))
    volume = write_nifti(tmp_path / "ct.nii.gz", stored_volume())
    summary = certify_file(volume, tmp_path / "unet3d.pt", output_dir=tmp_path / "out",
                                 intensity=f"window:{CENTER:g},{WIDTH:g}", **CERTIFY)
    expected = smoothed_labels(module, window_tensor(stored_volume()), summary["noise_seed"])
    np.testing.assert_array_equal(np.asarray(nibabel.load(summary["labels_nifti"]).dataobj),
                                  np.where(expected == ABSTAIN, 255, expected))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(image)
    with pytest.raises(ValueError, match=r"image_size 6 x 8 x 10\) and .*x\.png holds 2D images"):
        certify_file(image, tmp_path / "unet3d.pt", output_dir=tmp_path, **CERTIFY)
    flat = types.SimpleNamespace(in_channels=1, num_classes=2, image_size=(8, 10), class_names=("background", "a"))
    monkeypatch.setattr(single_image, "load_segmenter", lambda *args, **kwargs: (Conv2dSegmenter().eval(), flat))
    with pytest.raises(ValueError, match=r"image_size 8 x 10\): pass --slice AXIS:INDEX"):
        certify_file(volume, tmp_path / "unet3d.pt", output_dir=tmp_path, **CERTIFY)


def test_a_trained_unet3d_checkpoint_certifies_a_smaller_volume_padded_to_its_size(tmp_path):
    """The rule on a real medcert checkpoint: a unet3d trained here on (5, 5, 5) volumes certifies a (4, 5, 5)
    NIfTI volume, padded inside the base model to the checkpoint's image_size, as SmoothedSegmenter does with
    the loaded model on that padding."""
    from test_volume_models import UNET3D, write_task  # the volume models' tiny Decathlon task and widths

    from medcert_core.data.decathlon import load_decathlon
    from medcert_core.training import load_segmenter, train_segmenter

    root = write_task(tmp_path / "task")
    train, val = load_decathlon("task", root, "train"), load_decathlon("task", root, "val")
    checkpoint = tmp_path / "unet3d.pt"
    train_segmenter(train, val, arch="unet3d", epochs=1, batch_size=2, model_kwargs=UNET3D, checkpoint=checkpoint,
                    progress=False, device="cpu")
    stored = (np.random.default_rng(3).random((4, 5, 5)) * 200).astype(np.float32)
    path = write_nifti(tmp_path / "mr.nii.gz", stored, affine=AFFINE)
    summary = certify_file(path, checkpoint, output_dir=tmp_path / "out", intensity=f"window:{CENTER:g},{WIDTH:g}",
                                 **CERTIFY)
    assert summary["file_to_tensor"]["padding"]["model_input_size"] == [5, 5, 5]
    assert summary["file_to_tensor"]["padding"]["appended_voxels"] == [1, 0, 0]
    model, config = load_segmenter(checkpoint, device="cpu")
    smoothed = SmoothedSegmenter(PaddedVolume(model.eval(), (5, 5, 5)), config.num_classes, CERTIFY["sigma"], device="cpu")
    certificate = smoothed.certify(window_tensor(stored), CERTIFY["n0"], CERTIFY["n"], tau=CERTIFY["tau"],
                                   alpha=CERTIFY["alpha"], generator=torch.Generator().manual_seed(summary["noise_seed"]))
    expected = certificate.labels.numpy()
    np.testing.assert_array_equal(np.asarray(nibabel.load(summary["labels_nifti"]).dataobj),
                                  np.where(expected == ABSTAIN, 255, expected))
    np.testing.assert_allclose(nibabel.load(summary["labels_nifti"]).affine, AFFINE)
