"""ffdnet:<file.pth>: the published FFDNet forward, checked against an independent re-implementation
written here from the layout in ../shared/weights/ffdnet/README.md (explicit index loops for the
pixel (un)shuffle, F.conv2d over the state dict), on the shared file and on random weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medcert_core.denoisers import load_denoiser
from medcert_core.denoisers.ffdnet import (
    MAX_TRAINED_SIGMA,
    expected_layout,
    shrink_factor,
)

SHARED_FFDNET = Path(__file__).resolve().parents[2] / "shared" / "weights" / "ffdnet" / "ffdnet_color.pth"


def reference_forward(state: dict[str, torch.Tensor], image: np.ndarray, level: float) -> np.ndarray:
    """FFDNet as its README describes it, on one (3, H, W) float64 image: replicate-pad odd sizes,
    unshuffle (channel 4c + 2i + j holds x[c, 2h + i, 2w + j]), append the level map, 12 convolutions
    with ReLU between them, shuffle back, crop."""
    _, height, width = image.shape
    padded = np.pad(image, ((0, 0), (0, height % 2), (0, width % 2)), mode="edge")
    half_h, half_w = padded.shape[1] // 2, padded.shape[2] // 2
    features = np.zeros((13, half_h, half_w))
    for c in range(3):
        for i in range(2):
            for j in range(2):
                features[4 * c + 2 * i + j] = padded[c, i::2, j::2]
    features[12] = level
    hidden = torch.from_numpy(features)[None]
    for layer in range(12):
        weight = state[f"model.{2 * layer}.weight"].double()
        bias = state[f"model.{2 * layer}.bias"].double()
        hidden = F.conv2d(hidden, weight, bias, padding=1)
        if layer < 11:
            hidden = hidden.clamp(min=0)
    output = hidden[0].numpy()
    shuffled = np.zeros((3, 2 * half_h, 2 * half_w))
    for c in range(3):
        for i in range(2):
            for j in range(2):
                shuffled[c, i::2, j::2] = output[4 * c + 2 * i + j]
    return shuffled[:, :height, :width]


@pytest.fixture(scope="module")
def random_ffdnet(tmp_path_factory) -> Path:
    """A file of the FFDNet layout with random weights (scaled so activations stay O(1))."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in expected_layout().items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        state[name] = torch.randn(shape, generator=generator) * (math.sqrt(2 / fan_in) if len(shape) > 1 else 0.05)
    path = tmp_path_factory.mktemp("ffdnet") / "random.pth"
    torch.save(state, path)
    return path


def weight_files(random_ffdnet: Path) -> list[Path]:
    return [random_ffdnet, *([SHARED_FFDNET] if SHARED_FFDNET.is_file() else [])]


@pytest.mark.parametrize("size", [(10, 14), (9, 13)])
def test_forward_equals_the_reference_within_the_trained_range(random_ffdnet, size):
    """sigma <= 75/255: the network at the input's resolution, level map sigma, clamped to [0, 1]."""
    sigma = 0.2
    noisy = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    for path in weight_files(random_ffdnet):
        state = torch.load(path, weights_only=True)
        denoiser = load_denoiser(f"ffdnet:{path}", sigma)
        with torch.no_grad():
            output = denoiser(noisy).double().numpy()
        for index in range(2):
            expected = np.clip(reference_forward(state, noisy[index].double().numpy(), sigma), 0, 1)
            assert output[index].shape == expected.shape
            assert np.abs(output[index] - expected).max() < 1e-5, path


def test_above_the_trained_range_the_image_is_box_averaged_to_a_trained_level(random_ffdnet):
    """sigma = 0.5 > 75/255: k = 2, the network sees the 2x2 box average at level sigma / 2, and its
    output is resized back bilinearly."""
    sigma = 0.5
    assert shrink_factor(sigma) == 2 and shrink_factor(1.0) == 4 and shrink_factor(0.25) == 1
    assert shrink_factor(MAX_TRAINED_SIGMA) == 1
    noisy = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(2))
    state = torch.load(random_ffdnet, weights_only=True)
    small = noisy[0].double().numpy().reshape(3, 6, 2, 8, 2).mean(axis=(2, 4))
    estimate = torch.from_numpy(reference_forward(state, small, sigma / 2))[None].float()
    expected = F.interpolate(estimate, size=(12, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        output = load_denoiser(f"ffdnet:{random_ffdnet}", sigma)(noisy)
        full = load_denoiser(f"ffdnet:{random_ffdnet}", sigma, shrink="none")(noisy)
    assert (output - expected).abs().max() < 1e-5
    unshrunk = np.clip(reference_forward(state, noisy[0].double().numpy(), sigma), 0, 1)
    assert np.abs(full[0].numpy() - unshrunk).max() < 1e-5, "shrink='none': full resolution, level sigma"


def test_grayscale_is_fed_as_three_replicated_channels(random_ffdnet):
    noisy = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    state = torch.load(random_ffdnet, weights_only=True)
    expected = np.clip(reference_forward(state, np.repeat(noisy[0].double().numpy(), 3, axis=0), 0.1), 0, 1).mean(0)
    with torch.no_grad():
        output = load_denoiser(f"ffdnet:{random_ffdnet}", 0.1)(noisy)
    assert output.shape == (1, 1, 8, 8)
    assert np.abs(output[0, 0].numpy() - expected).max() < 1e-5


@pytest.mark.parametrize("sigma", [0.1, 0.5])  # inside the trained range, and box-shrunk above it
def test_a_volume_is_denoised_slice_by_slice_as_each_slice_alone(random_ffdnet, sigma):
    """(B, C, D, H, W): every D-slice denoised as the 2D image it is, whatever its neighbours."""
    volumes = torch.rand(2, 1, 3, 8, 6, generator=torch.Generator().manual_seed(4))
    denoiser = load_denoiser(f"ffdnet:{random_ffdnet}", sigma)
    with torch.no_grad():
        output = denoiser(volumes)
        assert output.shape == volumes.shape
        for item in range(2):
            for depth in range(3):
                alone = denoiser(volumes[item:item + 1, :, depth])
                assert (output[item, :, depth] - alone[0]).abs().max() < 1e-6
        changed = volumes.clone()
        changed[:, :, 0] = 0.5  # another first slice leaves the others' outputs as they were
        assert torch.equal(denoiser(changed)[:, :, 1:], output[:, :, 1:])


@pytest.mark.skipif(not SHARED_FFDNET.is_file(), reason="the shared FFDNet weights are not on this machine")
def test_the_published_network_denoises_a_smooth_image():
    """The real file removes most of the noise of a smooth colour image at sigma 25/255 and 0.5."""
    grid = torch.linspace(0, 1, 64)
    clean = torch.stack([grid[None, :].expand(64, 64), grid[:, None].expand(64, 64),
                         0.5 + 0.3 * torch.sin(6 * grid)[None, :].expand(64, 64)])[None]
    for sigma in (25 / 255, 0.5):
        noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            estimate = load_denoiser(f"ffdnet:{SHARED_FFDNET}", sigma)(noisy)
        noisy_psnr = -10 * math.log10(float((noisy - clean).pow(2).mean()))
        psnr = -10 * math.log10(float((estimate - clean).pow(2).mean()))
        assert psnr > noisy_psnr + 10, (sigma, noisy_psnr, psnr)


def test_a_file_of_another_layout_is_refused_naming_it(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model.0.weight": torch.zeros(64, 13, 3, 3), "model.0.bias": torch.zeros(64)}, path)
    with pytest.raises(ValueError, match=r"other\.pth is not an FFDNet colour state dict .*missing model\.10\.bias"):
        load_denoiser(f"ffdnet:{path}", 0.25)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_denoiser(f"ffdnet:{tmp_path / 'absent.pth'}", 0.25)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    path = tmp_path / "payload.pth"
    torch.save({"model.0.weight": Payload()}, path)
    with pytest.raises(ValueError, match="payload.pth"):
        load_denoiser(f"ffdnet:{path}", 0.25)
    assert not (tmp_path / "ran").exists()


def test_bad_shrink_and_channels(random_ffdnet):
    with pytest.raises(ValueError, match=r"ffdnet shrink must be one of \['box', 'bilinear', 'none'\]"):
        load_denoiser(f"ffdnet:{random_ffdnet}", 0.5, shrink="lanczos")
    with pytest.raises(ValueError, match="3 channels"):
        load_denoiser(f"ffdnet:{random_ffdnet}", 0.5)(torch.rand(1, 2, 8, 8))


def test_ffdnet_auto_is_refused_by_the_chapter_settings():
    from medcert_core.study.settings import check_setting

    with pytest.raises(ValueError, match="only ddpm:auto and unet:auto are trained here"):
        check_setting("denoiser", "ffdnet:auto", {"denoiser": "ddpm:auto"})
    with pytest.raises(ValueError, match="other_denoisers"):
        check_setting("other_denoisers", {"": "ffdnet:x.pth"}, {"other_denoisers": {}})
    check_setting("other_denoisers", {"off the shelf": "ffdnet:x.pth"}, {"other_denoisers": {}})
