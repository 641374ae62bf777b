"""The 3D DDPM (issue #38, step 3): MONAI's DiffusionModelUNet at any volume size behind DiffusionDenoiser with
the paper's single-step t* rule, trained by train_ddpm's own loop, saved as medcert's folder (JSON config,
weights-only state_dict) and loaded by ``ddpm:<folder>``, cached by ``ddpm:auto``, certified behind by
SmoothedSegmenter, measured by the MMSE gate's PSNR over real voxels. Tiny networks on tiny volumes."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import medcert_core.denoisers.training as denoiser_training
from medcert_core.denoisers import (
    DDPM_PRESETS,
    DiffusionDenoiser,
    VolumeDiffusionUNet,
    linear_scheduler,
    load_denoiser,
    load_volume_unet,
    timestep_for_sigma,
    train_ddpm,
)
from medcert_core.denoisers.volume_ddpm import CONFIG, WEIGHTS, save_volume_ddpm
from medcert_core.io import UnsafeFileError
from medcert_core.metrics import psnr
from medcert_core.models import create_model
from medcert_core.smoothing import SmoothedSegmenter
from test_safe_files import REFUSAL, hostile_checkpoint
from test_volume_models import UNET3D, write_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one intra-op thread

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"channels": (8, 16), "attention_levels": (False, False), "num_res_blocks": 1, "norm_num_groups": 4,
         "num_head_channels": 16, "use_flash_attention": True}  # total stride 2; MONAI's middle attention block
SHAPE = (1, 8, 10, 12)  # (C, D, H, W): H and W not multiples of the network's stride once it has 3 levels


class TinyVolumes(torch.utils.data.Dataset):
    """Four (1, 8, 10, 12) volumes in [0, 1] (a bright box on a dim background) with their masks."""

    class_names = ("background", "organ")

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.zeros(SHAPE[1:], dtype=torch.long)
        mask[2 + index % 2:6, 3:7 + index % 3, 4:9] = 1
        image = 0.2 + 0.6 * mask[None].float() + 0.05 * torch.rand(SHAPE, generator=torch.Generator().manual_seed(index))
        return image.clamp(0, 1), mask


@pytest.fixture
def small_preset(monkeypatch):
    """The tiny preset's volume network at a fraction of its width (the real one is built in its own test)."""
    monkeypatch.setitem(DDPM_PRESETS["tiny"], "volume_unet", SMALL)


def small_net(seed: int = 0, **settings) -> VolumeDiffusionUNet:
    torch.manual_seed(seed)
    return VolumeDiffusionUNet(1, **{**SMALL, **settings}).eval()


def noisy_volumes(count: int, sigma: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.stack([TinyVolumes()[index][0] for index in range(count)])
    return clean, clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ network


def test_the_3d_network_keeps_an_odd_volume_size_and_each_volume_alone():
    net = small_net(channels=(8, 16, 16), attention_levels=(False, False, False))  # total stride 4
    assert net.multiple == 4 and net.config.sample_size is None and net.config.spatial_dims == 3
    x = torch.randn(3, 1, 7, 9, 11, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([10, 200, 500])
    with torch.no_grad():
        out = net(x, timesteps).sample
        assert out.shape == x.shape
        for index in range(3):
            torch.testing.assert_close(net(x[index:index + 1], timesteps[index:index + 1]).sample[0], out[index],
                                       rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"takes \(B, C, D, H, W\) batches, got shape \(1, 1, 8, 8\)"):
        net(torch.zeros(1, 1, 8, 8), torch.tensor([1]))


def test_the_tiny_presets_volume_network_is_small():
    torch.manual_seed(0)
    net = VolumeDiffusionUNet(1, **DDPM_PRESETS["tiny"]["volume_unet"])
    parameters = sum(parameter.numel() for parameter in net.parameters())
    assert 1_000_000 <= parameters <= 3_000_000, parameters
    assert net.multiple == 4


def test_unknown_network_settings_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown settings \['with_conditioning'\] .* valid: channels, "):
        VolumeDiffusionUNet(1, **SMALL, with_conditioning=True)


# ------------------------------------------------------------------------------------------------ denoising


@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_single_step_is_the_papers_formula_at_t_star_on_the_network_output(sigma):
    net = small_net(1)
    seen = []
    net.register_forward_hook(lambda module, args, output: seen.append(args[1].tolist()))
    denoiser = DiffusionDenoiser(net, linear_scheduler(), sigma)
    clean, noisy = noisy_volumes(2, sigma)
    with torch.no_grad():
        denoised = denoiser(noisy)
    start = timestep_for_sigma(linear_scheduler().alphas_cumprod, sigma)  # no resize: t* of sigma itself
    assert seen == [[start, start]] and denoiser.effective_sigma(1, SHAPE[1:]) == sigma
    abar = float(linear_scheduler().alphas_cumprod[start])
    x_t = math.sqrt(abar) * (2 * noisy - 1)  # x_t* = sqrt(abar) (2 (x + delta) - 1)
    with torch.no_grad():
        eps = net(x_t, torch.full((2,), start)).sample
    x0 = ((x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)  # one step from t* to 0
    expected = ((x0 + 1) / 2).clamp(0, 1)
    assert denoised.shape == noisy.shape
    torch.testing.assert_close(denoised, expected, rtol=0, atol=1e-6)


def test_multi_step_walks_from_t_star_to_zero_and_is_per_volume():
    net = small_net(2)
    seen = []
    net.register_forward_hook(lambda module, args, output: seen.append(int(args[1][0])))
    denoiser = DiffusionDenoiser(net, linear_scheduler(), 0.5, steps=4)
    assert denoiser.stochastic
    _, noisy = noisy_volumes(2, 0.5, seed=3)
    with torch.no_grad():
        together = denoiser(noisy, generators=[torch.Generator().manual_seed(seed) for seed in (7, 8)])
        alone = denoiser(noisy[1:], generators=[torch.Generator().manual_seed(8)])
    start = timestep_for_sigma(linear_scheduler().alphas_cumprod, 0.5)
    assert seen[:4] == denoiser.timesteps(start) and seen[0] == start and seen[3] == 0
    assert together.shape == noisy.shape and 0 <= together.min() and together.max() <= 1
    torch.testing.assert_close(alone[0], together[1], rtol=0, atol=1e-5)
    ddim = DiffusionDenoiser(net, linear_scheduler(), 0.5, steps=4, sampler="ddim")
    with torch.no_grad():
        assert not ddim.stochastic and torch.equal(ddim(noisy), ddim(noisy))


def test_images_for_a_3d_model_volumes_for_a_2d_one_and_a_resize_are_refused():
    from diffusers import UNet2DModel

    net = small_net()
    with pytest.raises(ValueError, match=r"denoises each volume at its own size .* got image_size 32: leave it None"):
        DiffusionDenoiser(net, linear_scheduler(), 0.5, image_size=32)
    with pytest.raises(ValueError, match=r"this 3D diffusion model denoises volumes \(C, D, H, W\); got an input of "
                                         r"shape \(1, 16, 16\)"):
        DiffusionDenoiser(net, linear_scheduler(), 0.5)(torch.rand(2, 1, 16, 16))
    unet2d = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, **DDPM_PRESETS["tiny"]["unet"])
    with pytest.raises(ValueError, match=r"this 2D diffusion model denoises images \(C, H, W\); got an input of "
                                         r"shape \(1, 8, 10, 12\)"):
        DiffusionDenoiser(unet2d, linear_scheduler(), 0.5, input_shape=SHAPE)
    with pytest.raises(ValueError, match="volumes .* are used at their own size: leave image_size None"):
        train_ddpm(TinyVolumes(), Path("unused"), image_size=16, steps=1, progress=False, device="cpu")


# ------------------------------------------------------------------------------------------------ training, saving


def test_a_3d_ddpm_trains_resumes_bit_for_bit_and_loads_back_to_identical_outputs(
        tmp_path, small_preset, crash_on_second_save, monkeypatch):
    settings = dict(steps=3, batch_size=2, max_sigma=1.0, ema_decay=0.9, focus_sigmas=(0.5,), focus_share=0.5,
                    checkpoint_every=1, progress=False, device="cpu")
    published = []
    real_save = denoiser_training.save_volume_ddpm
    monkeypatch.setattr(denoiser_training, "save_volume_ddpm",
                        lambda unet, scheduler, folder: published.append(unet) or real_save(unet, scheduler, folder))
    straight = train_ddpm(TinyVolumes(), tmp_path / "straight", **settings)
    assert sorted(path.relative_to(straight).as_posix() for path in straight.rglob("*") if path.is_file()) == [
        "model_index.json", "scheduler/scheduler_config.json", f"unet/{CONFIG}", f"unet/{WEIGHTS}"]
    config = json.loads((straight / "unet" / CONFIG).read_text())
    assert config == {"architecture": "monai.DiffusionModelUNet", "in_channels": 1, "out_channels": 1,
                      "kwargs": json.loads(json.dumps(SMALL))}
    assert json.loads((straight / "model_index.json").read_text())["_class_name"] == "VolumeDDPM"
    assert torch.load(straight / "unet" / WEIGHTS, weights_only=True).keys() == published[0].state_dict().keys()

    denoiser = load_denoiser(f"ddpm:{straight}", 0.5)
    assert isinstance(denoiser, DiffusionDenoiser) and isinstance(denoiser.unet, VolumeDiffusionUNet)
    assert denoiser.image_size is None and denoiser.spatial_dims == 3
    torch.testing.assert_close(denoiser.alphas_cumprod, linear_scheduler().alphas_cumprod.double(), rtol=0, atol=0)
    x_t = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4))
    timesteps = torch.tensor([30, 300])
    with torch.no_grad():
        assert torch.equal(denoiser.unet(x_t, timesteps).sample, published[0](x_t, timesteps).sample)

    arm, disarm = crash_on_second_save
    arm(denoiser_training)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm(TinyVolumes(), tmp_path / "resumed", **settings)
    assert not (tmp_path / "resumed" / "model_index.json").exists()
    disarm(denoiser_training)
    resumed = train_ddpm(TinyVolumes(), tmp_path / "resumed", **settings)
    assert not (resumed / "training_state.pt").exists()
    a, b = (load_volume_unet(folder).state_dict() for folder in (straight, resumed))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    raw = train_ddpm(TinyVolumes(), tmp_path / "raw", **{**settings, "ema_decay": None})
    c = load_volume_unet(raw).state_dict()
    assert any(not torch.equal(a[name], c[name]) for name in a), "the published weights are the moving average"


def test_a_3d_ddpm_folder_is_data_only(tmp_path):
    folder = save_volume_ddpm(small_net(5), linear_scheduler(), tmp_path / "ddpm")
    marker = tmp_path / "code_ran"
    hostile_checkpoint(folder / "unet" / WEIGHTS, marker)
    with pytest.raises(UnsafeFileError, match=REFUSAL) as info:
        load_denoiser(f"ddpm:{folder}", 0.5)
    assert str(folder / "unet" / WEIGHTS) in str(info.value) and not marker.exists()
    config = json.loads((folder / "unet" / CONFIG).read_text())
    (folder / "unet" / CONFIG).write_text(json.dumps({**config, "architecture": "os.system"}))
    with pytest.raises(ValueError, match="names architecture 'os.system'; a volume DDPM folder must name "
                                         "'monai.DiffusionModelUNet'"):
        load_denoiser(f"ddpm:{folder}", 0.5)


def test_a_saved_3d_ddpm_gives_identical_denoising_single_and_multi_step(tmp_path):
    net = small_net(6)
    folder = save_volume_ddpm(net, linear_scheduler(), tmp_path / "ddpm")
    _, noisy = noisy_volumes(2, 0.25, seed=6)
    for options in ({}, {"steps": 3, "sampler": "ddim"}):
        loaded = load_denoiser(f"ddpm:{folder}", 0.25, **options)
        with torch.no_grad():
            assert torch.equal(loaded(noisy), DiffusionDenoiser(net, linear_scheduler(), 0.25, **options)(noisy))
    with pytest.raises(ValueError, match="leave it None"):
        load_denoiser(f"ddpm:{folder}", 0.25, image_size=16)


# ------------------------------------------------------------------------------------------------ certification


@pytest.mark.parametrize("steps", ["single", 3])
def test_smoothed_segmenter_certifies_a_volume_behind_the_3d_ddpm_at_any_batch_size(steps):
    torch.manual_seed(9)
    segmenter = create_model("unet3d", 1, 2, **UNET3D).eval()
    x = TinyVolumes()[1][0]
    certificates = []
    for batch_size in (1, 5, 44):
        denoiser = DiffusionDenoiser(small_net(7), linear_scheduler(), 0.25, steps=steps)
        smoother = SmoothedSegmenter(segmenter, 2, 0.25, denoiser=denoiser, batch_size=batch_size, device="cpu")
        certificates.append(smoother.certify(x, 4, 40, alpha=0.05, generator=torch.Generator().manual_seed(10)))
    first = certificates[0]
    assert first.labels.shape == SHAPE[1:] and first.pvalues.shape == SHAPE[1:]
    for other in certificates[1:]:
        assert torch.equal(other.labels, first.labels) and torch.equal(other.pvalues, first.pvalues)


# ------------------------------------------------------------------------------------------------ study: ddpm:auto, gate


def test_ddpm_auto_trains_and_caches_a_3d_ddpm_for_a_volume_dataset(tmp_path, small_preset, monkeypatch):
    from medcert_core.study.runs import assets
    from medcert_core.study.settings import DataSpec, TrainingSpec

    data = DataSpec("hippocampus", str(write_task(tmp_path / "task")), (5, 5, 5))
    training = TrainingSpec(ddpm_steps=2, ddpm_ema_decay=0.9, ddpm_focus_sigmas=(0.5,), ddpm_focus_share=0.5)
    asked = []
    real_train = assets.train_ddpm
    monkeypatch.setattr(assets, "train_ddpm", lambda *args, **kwargs: asked.append(kwargs) or real_train(*args, **kwargs))
    cache = tmp_path / "cache"
    spec = assets.resolve_denoiser_spec("ddpm:auto", 0.5, cache, data, training, "cpu")
    folder = Path(spec.partition(":")[2])
    assert folder.name.startswith("ddpm3d_hippocampus_5x5x5_tiny_s2_max1.0_ema0.9_focus0.5-0.5_seed0_data")
    assert assets.marker_path(folder).is_file()
    (kwargs,) = asked
    assert kwargs["image_size"] is None and kwargs["focus_sigmas"] == (0.5,) and kwargs["ema_decay"] == 0.9
    denoiser = assets.denoiser("ddpm:auto", 0.5, cache, data, training, device="cpu")
    assert isinstance(denoiser.unet, VolumeDiffusionUNet) and len(asked) == 1, "cached: trained once"
    with pytest.raises(ValueError, match="ddpm_image_size = 64 resizes images .* hippocampus gives volumes, which "
                                         "the 3D DDPM denoises at their own size .* leave ddpm_image_size null"):
        assets.resolve_denoiser_spec("ddpm:auto", 0.5, cache, data, replace(training, ddpm_image_size=64), "cpu")


def test_psnr_over_real_voxels_leaves_the_padding_out():
    clean = torch.rand(2, 1, 4, 5, 6, generator=torch.Generator().manual_seed(11))
    estimate = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(12))
    valid = torch.zeros(2, 4, 5, 6, dtype=torch.bool)
    valid[0, :3, :4, :5] = True
    valid[1] = True
    estimate[0, :, 3:] = 5.0  # the padding of volume 0, far off
    values = psnr(estimate, clean, valid=valid)
    torch.testing.assert_close(values[0], psnr(estimate[:1, :, :3, :4, :5], clean[:1, :, :3, :4, :5])[0])
    torch.testing.assert_close(values[1], psnr(estimate[1:], clean[1:])[0])
    assert psnr(estimate, clean)[0] < values[0] - 10


def test_the_gate_script_measures_a_volume_dataset_over_real_voxels(tmp_path, small_preset, monkeypatch):
    root = write_task(tmp_path / "task", count=20)  # val: 2 volumes, some padded
    spec = importlib.util.spec_from_file_location("denoiser_gate_under_test", ROOT / "scripts" / "denoiser_gate.py")
    gate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gate)
    output = tmp_path / "gate.json"
    monkeypatch.setattr(sys, "argv", [
        "denoiser_gate.py", "--profile", "smoke", "--dataset", "hippocampus", "--data-root", str(root),
        "--sigmas", "0.5", "--multi-steps", "2", "--training", "{ddpm_steps: 2, unet_denoiser_steps: 1}",
        "--cache", str(tmp_path / "cache"), "--output", str(output)])
    assert gate.main() in (0, 1)  # a 2-step DDPM may fail the gate; the plumbing is what is tested
    result = json.loads(output.read_text())
    assert result["psnr_over"] == "real voxels (padding left out)" and result["images"] == 2
    assert result["ddpm"]["resolution"] == "each volume's own size (3D DDPM)"
    assert Path(result["ddpm"]["folder"]).name.startswith("ddpm3d_hippocampus_5x5x5_")
    names = {row["denoiser"] for row in result["rows"]}
    assert names == {"noisy input", gate.SINGLE, gate.MULTI, gate.UNET}
    noisy_row = next(row for row in result["rows"] if row["denoiser"] == "noisy input")
    assert 5 < noisy_row["psnr_db"] < 7, "noise of std 0.5 over real voxels: about 6 dB"
