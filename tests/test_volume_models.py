"""Models and denoisers in 3D (issue #38, step 3): MONAI's 3D U-Net at any volume size, a 2D segmenter applied
slice by slice, 3D segmenters trained and loaded back (plain and noise-trained), the 3D UNet denoiser, and
SmoothedSegmenter certifying volumes with each. Tiny networks on tiny volumes: each test takes a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medcert_core.data.decathlon import load_decathlon
from medcert_core.denoisers import load_denoiser, train_unet_denoiser
from medcert_core.denoisers.unet_denoiser import UNetDenoiser
from medcert_core.metrics import segmentation_scores
from medcert_core.models import IMAGE_ARCHITECTURES, VOLUME_ARCHITECTURES, SliceWise, create_model
from medcert_core.models.volumetric import padding_to_multiple
from medcert_core.smoothing import SmoothedSegmenter
from medcert_core.training import augment_batch, evaluate_segmenter, load_segmenter, train_segmenter

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one intra-op thread

UNET3D = {"channels": (4, 8, 8), "strides": (2, 2), "num_res_units": 1}  # a total stride of 4
DENOISER3D = {"channels": (4, 8), "strides": (1,), "num_res_units": 1}
SLICE_NET = {"base_channels": 4}  # resunetpp: H and W multiples of 8


def write_task(root: Path, count: int = 8) -> Path:
    """A Decathlon task of ``count`` cases of shapes (3-5, 4-5, 5), a bright blob labelled organ in each."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for index in range(count):
        shape = (3 + index % 3, 4 + index % 2, 5)
        label = (rng.random(shape) < 0.3).astype(np.uint8)
        image = (rng.random(shape) * 50 + 150 * label).astype(np.float32)
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), root / folder / f"case_{index:03d}.nii.gz")
    meta = {"labels": {"0": "background", "1": "organ"},
            "training": [{"image": f"./imagesTr/case_{index:03d}.nii.gz", "label": f"./labelsTr/case_{index:03d}.nii.gz"}
                         for index in range(count)]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """The train and val splits of a tiny task: items (1, 5, 5, 5), padded; some cases smaller."""
    root = write_task(tmp_path_factory.mktemp("volumes") / "task")
    return load_decathlon("task", root, "train"), load_decathlon("task", root, "val")


class TinyImages(torch.utils.data.Dataset):
    """Two blank (1, 32, 32) images with background masks."""

    class_names = ("background", "organ")

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, 32, 32), torch.zeros(32, 32, dtype=torch.long)


def seeded(arch: str, in_channels: int = 1, num_classes: int = 3, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(arch, in_channels, num_classes, **kwargs).eval()


# ------------------------------------------------------------------------------------------------ models


def test_unet3d_returns_logits_at_an_odd_input_size():
    model = seeded("unet3d", **UNET3D)
    x = torch.rand(2, 1, 11, 13, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 3, 11, 13, 9)
        assert torch.allclose(model(x[1:]), logits[1:], atol=1e-5), "one volume's logits depend on its batch-mates"
    assert padding_to_multiple((11, 13, 9), 4) == [0, 3, 0, 3, 0, 1]
    assert padding_to_multiple((8, 4), 4) == [0, 0, 0, 0]


def test_unet3d_refuses_strides_that_do_not_fit_its_widths():
    with pytest.raises(ValueError, match=r"one stride fewer than widths, got channels \(4, 8\) and strides \(2, 2\)"):
        create_model("unet3d", 1, 2, channels=(4, 8), strides=(2, 2))


def test_slicewise_equals_the_2d_model_applied_slice_by_slice():
    net2d = seeded("resunetpp", **SLICE_NET)
    volumes = torch.rand(2, 1, 4, 13, 9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = SliceWise(net2d)(volumes)
        by_hand = torch.stack([torch.stack([net2d(F.pad(volumes[b:b + 1, :, d], (0, 32 - 9, 0, 32 - 13)))[0, :, :13, :9]
                                            for d in range(4)], dim=1) for b in range(2)])
    assert logits.shape == (2, 3, 4, 13, 9)
    assert torch.allclose(logits, by_hand, atol=1e-5)


def test_slicewise_is_a_function_of_each_volume_alone():
    model = seeded("resunetpp-slicewise", **SLICE_NET)
    volumes = torch.rand(2, 1, 3, 8, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        together = model(volumes)
        for index in range(2):
            assert torch.allclose(model(volumes[index:index + 1])[0], together[index], atol=1e-5)
    with pytest.raises(ValueError, match=r"SliceWise segments volume batches \(B, C, D, H, W\), got shape \(1, 1, 8, 8\)"):
        model(torch.rand(1, 1, 8, 8))


def test_volumes_get_intensity_augmentation_only_and_flips_when_asked():
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(2, 1, 3, 4, 5, generator=generator)
    masks = (images[:, 0] > 0.5).long()
    augmented, same_masks = augment_batch(images, masks, generator)
    assert augmented.shape == images.shape and torch.equal(same_masks, masks), "no geometric change"
    assert not torch.equal(augmented, images)
    flipped_images, flipped_masks = augment_batch(images, masks, torch.Generator().manual_seed(0), flips=True)
    assert flipped_masks.shape == masks.shape
    for index in range(2):  # the masks were flipped with their images, along H or W only
        candidates = [masks[index], masks[index].flip(-1), masks[index].flip(-2), masks[index].flip(-1).flip(-2)]
        assert any(torch.equal(flipped_masks[index], candidate) for candidate in candidates)


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize(("arch", "model_kwargs", "noise_sigma", "precision"), [
    ("unet3d", UNET3D, 0.0, "fp32"),
    ("unet3d", UNET3D, 0.25, "bf16"),  # SegCertify's noise-trained model, under bf16 autocast
    ("resunetpp-slicewise", SLICE_NET, 0.0, "fp32"),
])
def test_a_volume_segmenter_trains_and_loads_back(volumes, tmp_path, arch, model_kwargs, noise_sigma, precision):
    train, val = volumes
    path = tmp_path / f"{arch}.pt"
    model, config, history = train_segmenter(train, val, arch=arch, model_kwargs=model_kwargs, epochs=2, batch_size=4,
                                             noise_sigma=noise_sigma, precision=precision, checkpoint=path,
                                             device="cpu", progress=False)
    assert len(history) == 2 and np.isfinite(history["val_dice"]).all() and np.isfinite(history["loss"]).all()
    assert config.image_size == (5, 5, 5) and config.noise_sigma == noise_sigma
    loaded, loaded_config = load_segmenter(path, arch=arch)
    assert loaded_config == config
    x = train[0][0][None]
    with torch.no_grad():
        assert loaded(x).shape == (1, 2, 5, 5, 5)
        assert torch.equal(loaded(x), model(x))


def test_validation_dice_of_a_volume_counts_only_its_real_voxels(volumes):
    _, val = volumes

    class Organ(torch.nn.Module):  # class 1 everywhere, the padding too
        def forward(self, batch):
            return torch.cat([torch.zeros_like(batch[:, :1]), torch.ones_like(batch[:, :1])], dim=1)

    frame = evaluate_segmenter(Organ(), val, val.class_names, device="cpu")
    assert any(val.shapes[case] != val.image_size for case in val.ids), "no padding to leave out"
    for index in range(len(val)):
        _, mask = val[index]
        real = segmentation_scores(torch.ones_like(mask), mask, 2, val.real_voxels(index))["dice"][1]
        assert frame[(frame.image_id == index) & (frame.class_id == 1)].dice.item() == pytest.approx(real)


def test_a_2d_architecture_on_volumes_and_a_3d_one_on_images_are_refused(volumes):
    train, val = volumes
    with pytest.raises(ValueError) as info:
        train_segmenter(train, val, arch="unet", epochs=1, device="cpu", progress=False)
    assert ("architecture 'unet' does not fit this dataset, which gives volumes (C, D, H, W) of shape (1, 5, 5, 5); "
            f"volumetric architectures: {', '.join(VOLUME_ARCHITECTURES)}") in str(info.value)
    with pytest.raises(ValueError) as info:
        train_segmenter(TinyImages(), TinyImages(), arch="unet3d", epochs=1, device="cpu", progress=False)
    assert ("architecture 'unet3d' does not fit this dataset, which gives images (C, H, W) of shape (1, 32, 32); "
            f"2D architectures: {', '.join(IMAGE_ARCHITECTURES)}") in str(info.value)


# ------------------------------------------------------------------------------------------------ denoiser


def test_the_3d_unet_denoiser_trains_on_volumes_and_loads_back(volumes, tmp_path):
    train, _ = volumes
    folder = train_unet_denoiser(train, 0.25, tmp_path / "denoiser", steps=2, batch_size=2, model_kwargs=DENOISER3D,
                                 device="cpu", progress=False)
    denoiser = load_denoiser(f"unet:{folder}", 0.25)
    assert denoiser.config["arch"] == "unet3d" and denoiser.config["image_size"] == [5, 5, 5]
    noisy = train[0][0][None] + 0.25 * torch.randn(1, 1, 5, 5, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert denoiser(noisy).shape == noisy.shape
    with pytest.raises(ValueError, match="volumes .* are used at their own size: leave image_size None"):
        train_unet_denoiser(train, 0.25, tmp_path / "resized", image_size=8, steps=1, device="cpu", progress=False)


def test_a_saved_3d_unet_denoiser_gives_identical_outputs_and_2d_configs_are_unchanged(tmp_path):
    torch.manual_seed(6)
    denoiser = UNetDenoiser.build(1, 0.5, "unet3d", **DENOISER3D).eval()
    denoiser.save(tmp_path / "d")
    loaded = UNetDenoiser.load(tmp_path / "d")
    noisy = torch.rand(2, 1, 5, 7, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(noisy), denoiser(noisy))
    image_denoiser = UNetDenoiser.build(3, 0.5, encoder_name="resnet18", decoder_channels=(8, 8, 8, 8, 8))
    assert set(image_denoiser.config) == {"channels", "sigma", "model_kwargs"}, "2D denoisers save what they saved"


# ------------------------------------------------------------------------------------------------ certification


@pytest.mark.parametrize("segmenter", ["unet3d", "resunetpp-slicewise", "unet3d behind the 3D UNet denoiser"])
def test_smoothed_segmenter_certifies_a_volume(volumes, segmenter):
    train, _ = volumes
    arch = segmenter.split()[0]
    model = seeded(arch, num_classes=2, **(UNET3D if arch == "unet3d" else SLICE_NET))
    denoiser = None
    if "denoiser" in segmenter:
        torch.manual_seed(8)
        denoiser = UNetDenoiser.build(1, 0.25, "unet3d", **DENOISER3D)
    x = train[0][0]
    smoother = SmoothedSegmenter(model, 2, 0.25, denoiser=denoiser, batch_size=8, device="cpu")
    certificate = smoother.certify(x, 4, 30, alpha=0.05, generator=torch.Generator().manual_seed(9))
    assert certificate.labels.shape == (5, 5, 5) and certificate.pvalues.shape == (5, 5, 5)
    again = smoother.certify(x, 4, 30, alpha=0.05, generator=torch.Generator().manual_seed(9))
    assert torch.equal(again.labels, certificate.labels), "one deterministic function of the noisy volume"
