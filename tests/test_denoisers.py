"""Diffusion denoised smoothing: t*, oracle denoising, multi-step, resizing, loading, training."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import medcert_core.denoisers.training as denoiser_training
from medcert_core.data import load_dataset
from medcert_core.denoisers import (
    DiffusionDenoiser,
    UNetDenoiser,
    linear_scheduler,
    load_denoiser,
    resize_noise_factor,
    timestep_for_sigma,
    train_ddpm,
    train_unet_denoiser,
)
from medcert_core.denoisers.diffusion import resize


def direct_alphas_cumprod() -> list[float]:
    """abar_t of the linear schedule, by a plain running product of (1 - beta_t)."""
    product, values = 1.0, []
    for t in range(1000):
        beta = 1e-4 + (0.02 - 1e-4) * t / 999
        product *= 1 - beta
        values.append(product)
    return values


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_timestep_for_sigma_on_the_linear_schedule(sigma):
    abar = direct_alphas_cumprod()
    distances = [abs(math.sqrt((1 - a) / a) - 2 * sigma) for a in abar]
    expected = min(range(1000), key=distances.__getitem__)
    assert timestep_for_sigma(linear_scheduler().alphas_cumprod, sigma) == expected


def test_timestep_for_sigma_out_of_range():
    with pytest.raises(ValueError, match="outside the schedule"):
        timestep_for_sigma(linear_scheduler().alphas_cumprod, 100.0)
    with pytest.raises(ValueError, match="outside the schedule"):
        timestep_for_sigma(linear_scheduler().alphas_cumprod, 0.001)


class OracleUNet(torch.nn.Module):
    """Knows the clean image (model space, [0, 1]) and returns the exact eps / v / x0 for any x_t."""

    def __init__(self, clean: torch.Tensor, prediction_type: str = "epsilon", learned_sigma: bool = False) -> None:
        super().__init__()
        self.clean = clean
        self.prediction_type = prediction_type
        self.learned_sigma = learned_sigma
        self.alphas_cumprod = linear_scheduler().alphas_cumprod.double()
        channels = clean.shape[1]
        self.config = SimpleNamespace(sample_size=clean.shape[-1], in_channels=channels)
        self.seen_timesteps: list[int] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        self.seen_timesteps.append(int(t[0]))
        abar = self.alphas_cumprod[t].to(x_t.dtype)[:, None, None, None]
        x0 = 2 * self.clean - 1
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        output = {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0, "sample": x0}
        output = output[self.prediction_type]
        if self.learned_sigma:
            output = torch.cat([output, torch.randn_like(output)], 1)
        return SimpleNamespace(sample=output)


def scheduler_with(prediction_type: str):
    scheduler = linear_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    return scheduler


def noisy_copy(clean: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    return clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed), dtype=clean.dtype)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_oracle_single_step_returns_the_clean_image(sigma, size, prediction_type):
    clean = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    unet = OracleUNet(clean, prediction_type, learned_sigma=prediction_type == "epsilon")
    denoiser = DiffusionDenoiser(unet, scheduler_with(prediction_type), sigma, image_size=size).double()
    denoised = denoiser(noisy_copy(clean, sigma))
    torch.testing.assert_close(denoised, clean, rtol=0, atol=1e-5)  # float32 inside the denoiser
    assert unet.seen_timesteps == [timestep_for_sigma(linear_scheduler().alphas_cumprod, sigma)]


@pytest.mark.parametrize("image_channels,model_channels", [(1, 3), (3, 1)])
def test_oracle_with_channel_conversion(image_channels, model_channels):
    gray = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    clean = gray.expand(-1, image_channels, -1, -1)
    unet = OracleUNet(gray.expand(-1, model_channels, -1, -1))
    denoiser = DiffusionDenoiser(unet, linear_scheduler(), 0.5).double()
    denoised = denoiser(noisy_copy(clean, 0.5))
    assert denoised.shape == clean.shape
    torch.testing.assert_close(denoised, clean, rtol=0, atol=1e-5)  # float32 inside the denoiser
    averaged_sigma = 0.5 / math.sqrt(3) if model_channels == 1 else 0.5
    assert unet.seen_timesteps == [timestep_for_sigma(linear_scheduler().alphas_cumprod, averaged_sigma)]


def test_resize_noise_factor_matches_empirical_noise():
    noise = torch.randn(64, 1, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for target in [(32, 32), (16, 24), (128, 128)]:
        empirical = resize(noise, target).std().item()
        assert resize_noise_factor((64, 64), target) == pytest.approx(empirical, rel=0.02)
    assert resize_noise_factor((64, 64), (64, 64)) == pytest.approx(1.0)
    assert resize_noise_factor((64, 64), (32, 32)) == pytest.approx(0.5)  # a 2 x 2 box: std / 2 exactly


def neighbour_correlation(noise: torch.Tensor) -> float:
    """Mean correlation of horizontally adjacent values of (B, 1, H, W) zero-mean noise."""
    left, right = noise[..., :-1].flatten(), noise[..., 1:].flatten()
    return float(torch.corrcoef(torch.stack([left, right]))[0, 1])


def test_integer_shrinking_keeps_the_noise_white_and_other_factors_correlate_it():
    """512 -> 256 (the paper's JSRT through the 256 px model): a box average keeps i.i.d. noise
    i.i.d. with std sigma / 2, what the DDPM was trained on; an antialiased bilinear filter
    (the previous resize, still used for non-integer factors) correlates neighbours by about 0.3."""
    noise = torch.randn(16, 1, 128, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    box = resize(noise, (64, 64))
    assert abs(neighbour_correlation(box)) < 0.02
    assert box.std().item() == pytest.approx(0.5, rel=0.02)
    bilinear = torch.nn.functional.interpolate(noise, size=(64, 64), mode="bilinear", antialias=True)
    assert neighbour_correlation(bilinear) > 0.25
    non_integer = resize(noise, (48, 48))
    assert neighbour_correlation(non_integer) > 0.1
    assert resize_noise_factor((128, 128), (48, 48)) == pytest.approx(non_integer.std().item(), rel=0.02)


def test_resizing_to_the_model_picks_t_star_for_the_resized_noise():
    clean = torch.full((1, 3, 64, 64), 0.4, dtype=torch.float64)  # constant: survives resizing exactly
    unet = OracleUNet(torch.full((1, 3, 32, 32), 0.4, dtype=torch.float64))
    denoiser = DiffusionDenoiser(unet, linear_scheduler(), 0.5).double()
    denoised = denoiser(noisy_copy(clean, 0.5))
    torch.testing.assert_close(denoised, clean, rtol=0, atol=1e-5)  # float32 inside the denoiser
    expected = timestep_for_sigma(linear_scheduler().alphas_cumprod, 0.5 * resize_noise_factor((64, 64), (32, 32)))
    assert unet.seen_timesteps == [expected] and expected < timestep_for_sigma(linear_scheduler().alphas_cumprod, 0.5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_oracle_multi_step_returns_the_clean_image_and_steps_down_to_zero(sampler):
    clean = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    unet = OracleUNet(clean)
    denoiser = DiffusionDenoiser(unet, linear_scheduler(), 0.5, steps=5, sampler=sampler,
                                 generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(denoiser(noisy_copy(clean, 0.5)), clean, rtol=0, atol=1e-5)  # float32 inside the denoiser
    start = timestep_for_sigma(linear_scheduler().alphas_cumprod, 0.5)
    assert unet.seen_timesteps[0] == start and unet.seen_timesteps[-1] == 0 and len(unet.seen_timesteps) == 5
    assert unet.seen_timesteps == sorted(unet.seen_timesteps, reverse=True)


class BlurryUNet(torch.nn.Module):
    """An imperfect epsilon model (predicts half the true noise), so that sampling matters."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(sample_size=16, in_channels=3)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=0.5 * x_t)


def test_multi_step_is_reproducible_from_a_seed():
    noisy = noisy_copy(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)), 0.5)
    run = lambda seed, sampler="ddpm": DiffusionDenoiser(  # noqa: E731
        BlurryUNet(), linear_scheduler(), 0.5, steps=4, sampler=sampler, generator=torch.Generator().manual_seed(seed)
    )(noisy)
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert torch.equal(run(7, "ddim"), run(8, "ddim")), "DDIM is deterministic"


def test_load_denoiser_specs_and_errors(tmp_path):
    assert load_denoiser("none", 0.25) is None and load_denoiser(None, 0.25) is None
    with pytest.raises(ValueError, match="ddpm:<folder>"):
        load_denoiser("diffusion:/x", 0.25)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_denoiser(f"ddpm:{tmp_path / 'nowhere'}", 0.25)
    with pytest.raises(FileNotFoundError, match="unet/"):
        load_denoiser(f"ddpm:{tmp_path}", 0.25)
    with pytest.raises(FileNotFoundError, match="unet_denoiser.pt"):
        load_denoiser(f"unet:{tmp_path}", 0.25)


@pytest.fixture(scope="module")
def small_phantoms():
    return load_dataset("phantom", None, "train", image_size=32, num_images=20)


def test_unet_denoiser_trains_saves_and_loads(small_phantoms, tmp_path):
    folder = train_unet_denoiser(small_phantoms, 0.5, tmp_path / "unet", steps=3, batch_size=4, progress=False,
                                 device="cpu", model_kwargs={"encoder_name": "resnet18", "decoder_channels": (16, 8, 8, 8, 8)})
    loaded = load_denoiser(f"unet:{folder}", 0.5)
    assert isinstance(loaded, UNetDenoiser)
    noisy = noisy_copy(small_phantoms[0][0][None], 0.5)
    output = loaded(noisy)
    assert output.shape == noisy.shape and 0 <= output.min() and output.max() <= 1
    with pytest.raises(ValueError, match="trained for sigma = 0.5, not 0.25"):
        load_denoiser(f"unet:{folder}", 0.25)


def test_train_ddpm_resumes_bit_for_bit(small_phantoms, tmp_path, crash_on_second_save):
    settings = dict(steps=4, batch_size=4, image_size=32, max_sigma=0.5, progress=False, device="cpu", checkpoint_every=1)
    straight = train_ddpm(small_phantoms, tmp_path / "straight", **settings)
    arm, disarm = crash_on_second_save
    arm(denoiser_training)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm(small_phantoms, tmp_path / "resumed", **settings)
    assert torch.load(tmp_path / "resumed" / "training_state.pt", weights_only=True)["step"] == 1
    disarm(denoiser_training)
    resumed = train_ddpm(small_phantoms, tmp_path / "resumed", **settings)
    assert not (resumed / "training_state.pt").exists()
    a, b = load_denoiser(f"ddpm:{straight}", 0.5), load_denoiser(f"ddpm:{resumed}", 0.5)
    for (name, x), y in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(x, y), name
    assert a.image_size == (32, 32) and a.alphas_cumprod.shape == (1000,)


def test_an_ema_ddpm_with_focused_timesteps_resumes_bit_for_bit_and_publishes_the_average(
        small_phantoms, tmp_path, crash_on_second_save):
    settings = dict(steps=4, batch_size=4, image_size=32, max_sigma=1.0, progress=False, device="cpu",
                    checkpoint_every=1, ema_decay=0.9, focus_sigmas=(0.25, 0.5), focus_share=0.5)
    straight = train_ddpm(small_phantoms, tmp_path / "straight", **settings)
    arm, disarm = crash_on_second_save
    arm(denoiser_training)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm(small_phantoms, tmp_path / "resumed", **settings)
    disarm(denoiser_training)
    resumed = train_ddpm(small_phantoms, tmp_path / "resumed", **settings)
    raw = train_ddpm(small_phantoms, tmp_path / "raw", **{**settings, "ema_decay": None})
    a, b, c = (load_denoiser(f"ddpm:{folder}", 0.5).unet.state_dict() for folder in (straight, resumed, raw))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], c[name]) for name in a), "the published weights are the moving average"


def test_focused_training_timesteps_land_near_the_study_t_stars():
    alphas = linear_scheduler().alphas_cumprod
    focus = [timestep_for_sigma(alphas, sigma) for sigma in (0.25, 0.5)]
    max_timestep = timestep_for_sigma(alphas, 1.0) + 1
    steps = denoiser_training.training_timesteps(20_000, max_timestep, focus, 0.5, torch.Generator().manual_seed(0))
    assert steps.min() >= 0 and steps.max() < max_timestep
    near = torch.zeros_like(steps, dtype=torch.bool)
    for t in focus:
        near |= (steps - t).abs() <= round(0.1 * t)
    uniform_share = sum(2 * round(0.1 * t) + 1 for t in focus) / max_timestep  # what uniform draws put there
    assert near.float().mean().item() == pytest.approx(0.5 + 0.5 * uniform_share, abs=0.02)
    plain = denoiser_training.training_timesteps(1000, max_timestep, focus, 0.0, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randint(0, max_timestep, (1000,), generator=torch.Generator().manual_seed(3)))


def test_unet_denoiser_resumes_bit_for_bit(small_phantoms, tmp_path, crash_on_second_save):
    settings = dict(steps=4, batch_size=4, progress=False, device="cpu", checkpoint_every=1,
                    model_kwargs={"encoder_name": "resnet18", "decoder_channels": (16, 8, 8, 8, 8)})
    straight = train_unet_denoiser(small_phantoms, 0.5, tmp_path / "straight", **settings)
    arm, disarm = crash_on_second_save
    arm(denoiser_training)
    with pytest.raises(KeyboardInterrupt):
        train_unet_denoiser(small_phantoms, 0.5, tmp_path / "resumed", **settings)
    assert torch.load(tmp_path / "resumed" / "training_state.pt", weights_only=True)["step"] == 1
    disarm(denoiser_training)
    resumed = train_unet_denoiser(small_phantoms, 0.5, tmp_path / "resumed", **settings)
    assert not (resumed / "training_state.pt").exists()
    a, b = (UNetDenoiser.load(folder).network.state_dict() for folder in (straight, resumed))
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_tiny_ddpm_on_phantoms_denoises_five_times_better_than_the_noisy_input(tmp_path):
    train = load_dataset("phantom", None, "train", image_size=32)
    test = load_dataset("phantom", None, "test", image_size=32)
    folder = train_ddpm(train, tmp_path / "ddpm", steps=150, image_size=32, max_sigma=1.0, progress=False, device="cpu")
    clean = torch.stack([test[i][0] for i in range(len(test))])
    noisy = noisy_copy(clean, 0.5, seed=5)
    denoised = load_denoiser(f"ddpm:{folder}", 0.5)(noisy)
    noisy_mse = (noisy - clean).pow(2).mean().item()
    denoised_mse = (denoised - clean).pow(2).mean().item()
    assert denoised_mse * 5 <= noisy_mse, f"MSE {denoised_mse:.4f} vs noisy {noisy_mse:.4f}"


def test_a_ddpm_trained_at_a_non_square_size_keeps_it_and_denoises_a_twice_larger_input(tmp_path):
    """Colonoscopy frames are 4:3: the DDPM trains at (H, W), saves it and box-averages a 2x input to it."""
    train = load_dataset("phantom", None, "train", image_size=(16, 24), num_images=4)
    folder = train_ddpm(train, tmp_path / "ddpm", steps=2, batch_size=2, image_size=(16, 24), progress=False,
                        device="cpu")
    denoiser = load_denoiser(f"ddpm:{folder}", 0.5)
    assert denoiser.image_size == (16, 24)
    channels = train[0][0].shape[0]
    noisy = torch.rand(2, channels, 32, 48)
    assert denoiser(noisy).shape == noisy.shape
    assert denoiser.effective_sigma(channels, (32, 48)) == pytest.approx(0.25)  # 2 x 2 box average: sigma / 2


def test_an_oracle_denoiser_lets_smoothing_certify_everything_at_sigma_one():
    """The paper's point in miniature: plain smoothing abstains at sigma = 1, denoised smoothing does not."""
    from medcert_core import ABSTAIN
    from medcert_core.smoothing import SmoothedSegmenter

    class Threshold(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x[:, :1] - 0.5) * 10  # one binary logit

    clean = torch.linspace(0.1, 0.9, 16 * 16).reshape(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    expected = (clean[0, 0] > 0.5).long()
    denoiser = DiffusionDenoiser(OracleUNet(clean), linear_scheduler(), 1.0)
    settings = dict(n0=10, n=100, alpha=0.001)
    plain = SmoothedSegmenter(Threshold(), 2, sigma=1.0, device="cpu").certify(
        clean[0], generator=torch.Generator().manual_seed(0), **settings)
    denoised = SmoothedSegmenter(Threshold(), 2, sigma=1.0, denoiser=denoiser, device="cpu").certify(
        clean[0], generator=torch.Generator().manual_seed(0), **settings)
    assert (plain.labels == ABSTAIN).float().mean() > 0.9
    assert torch.equal(denoised.labels, expected)


def test_denoiser_runs_under_autocast():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, **denoiser_training.DDPM_PRESETS["tiny"]["unet"])
    denoiser = DiffusionDenoiser(unet, linear_scheduler(), 0.5)
    noisy = noisy_copy(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), 0.5)
    reference = denoiser(noisy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = denoiser(noisy)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    assert (mixed - reference).abs().max() < 0.05


class RecordingUNet(torch.nn.Module):
    """Records what the network receives; predicts zero noise."""

    def __init__(self, size: int, channels: int = 3) -> None:
        super().__init__()
        self.config = SimpleNamespace(sample_size=size, in_channels=channels)
        self.inputs: list[torch.Tensor] = []
        self.timesteps: list[int] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        self.inputs.append(x_t.detach().clone())
        self.timesteps.append(int(t[0]))
        return SimpleNamespace(sample=torch.zeros_like(x_t))


def test_the_network_receives_x_t_with_the_noise_and_signal_of_step_t_star():
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: noise std sqrt(1 - abar_t*), signal scale sqrt(abar_t*).

    sigma is chosen so that 2 sigma equals sqrt((1 - abar_t) / abar_t) exactly at t = 400, so the
    diffusers schedule (not ours) gives both expected numbers.
    """
    abar = float(linear_scheduler().alphas_cumprod[400])
    sigma = math.sqrt((1 - abar) / abar) / 2
    unet = RecordingUNet(64)
    denoiser = DiffusionDenoiser(unet, linear_scheduler(), sigma)
    clean = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    denoiser(clean + sigma * noise)
    (x_t,) = unet.inputs
    assert unet.timesteps == [400]
    signal = 2 * clean - 1
    scale = float((x_t * signal).sum() / (signal * signal).sum())  # least squares, noise independent of x0
    standard_error = math.sqrt(1 - abar) / float(signal.norm())
    assert scale == pytest.approx(math.sqrt(abar), abs=4 * standard_error)
    residual = x_t - math.sqrt(abar) * signal
    assert float(residual.std()) == pytest.approx(math.sqrt(1 - abar), rel=5e-3)
    torch.testing.assert_close(residual, math.sqrt(1 - abar) * noise, rtol=0, atol=1e-5)


def diffusers_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    kwargs = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  clip_sample=True, clip_sample_range=1.0, prediction_type="epsilon")
    return DDPMScheduler(variance_type="fixed_small", **kwargs), DDIMScheduler(set_alpha_to_one=False, **kwargs)


@pytest.mark.parametrize("t,inference_steps", [(500, 10), (300, 20), (120, 1000), (40, 25)])
def test_ddpm_and_ddim_steps_match_diffusers_schedulers(t, inference_steps):
    from medcert_core.denoisers.diffusion import ddim_step, ddpm_posterior_step, x0_from_output

    ddpm, ddim = diffusers_schedulers()
    for scheduler in (ddpm, ddim):
        scheduler.set_timesteps(inference_steps)
    s = t - 1000 // inference_steps
    generator = torch.Generator().manual_seed(t)
    x_t = 1.5 * torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    eps = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    abar = ddpm.alphas_cumprod.double()
    abar_t, abar_s = float(abar[t]), float(abar[s])
    x0 = x0_from_output(x_t, eps, abar_t, "epsilon")

    expected = ddpm.step(eps, t, x_t, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(x0, expected.pred_original_sample, rtol=1e-6, atol=1e-6)
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ours = ddpm_posterior_step(x_t, x0, abar_t, abar_s, noise)
    torch.testing.assert_close(ours, expected.prev_sample, rtol=1e-6, atol=1e-6)

    expected = ddim.step(eps, t, x_t, eta=0.0, use_clipped_model_output=True)  # eps re-derived from clipped x0
    torch.testing.assert_close(ddim_step(x_t, x0, abar_t, abar_s), expected.prev_sample, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_x0_from_other_predictions_matches_diffusers(prediction_type):
    from medcert_core.denoisers.diffusion import x0_from_output

    ddpm, _ = diffusers_schedulers()
    ddpm.register_to_config(prediction_type=prediction_type)
    ddpm.set_timesteps(10)
    generator = torch.Generator().manual_seed(1)
    x_t, output = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    expected = ddpm.step(output, 500, x_t, generator=torch.Generator().manual_seed(0)).pred_original_sample
    ours = x0_from_output(x_t, output, float(ddpm.alphas_cumprod[500]), prediction_type)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_noise_outside_the_schedule_fails_at_construction_for_the_input_size():
    unet = RecordingUNet(16)
    # sigma 0.01 is inside the schedule at the model's size, but 256 -> 16 averaging divides it by about 16
    DiffusionDenoiser(unet, linear_scheduler(), 0.01)
    with pytest.raises(ValueError, match=r"3 x 256 x 256 inputs .* outside the schedule"):
        DiffusionDenoiser(unet, linear_scheduler(), 0.01, input_shape=(3, 256, 256))
    assert unet.inputs == []


def test_a_denoiser_for_another_sigma_is_refused():
    from medcert_core.smoothing import SmoothedSegmenter

    denoiser = DiffusionDenoiser(RecordingUNet(16), linear_scheduler(), 0.5)
    with pytest.raises(ValueError, match="built for sigma = 0.5 but the smoother adds sigma = 0.25"):
        SmoothedSegmenter(torch.nn.Conv2d(3, 2, 1), 2, sigma=0.25, denoiser=denoiser, device="cpu")


def test_seeded_multi_step_certificate_is_identical_at_any_batch_size():
    from medcert_core.smoothing import SmoothedSegmenter

    class Threshold(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x[:, :1] - 0.5) * 10

    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2))
    certificates = []
    for batch_size in (1, 3, 16):
        denoiser = DiffusionDenoiser(BlurryUNet(), linear_scheduler(), 0.5, steps=3)
        assert denoiser.stochastic
        smoothed = SmoothedSegmenter(Threshold(), 2, sigma=0.5, denoiser=denoiser, batch_size=batch_size, device="cpu")
        certificates.append(smoothed.certify(image, 4, 30, alpha=0.1, generator=torch.Generator().manual_seed(5)))
    for other in certificates[1:]:
        assert torch.equal(other.pvalues, certificates[0].pvalues)
    other_seed = SmoothedSegmenter(Threshold(), 2, sigma=0.5, device="cpu", batch_size=16,
                                   denoiser=DiffusionDenoiser(BlurryUNet(), linear_scheduler(), 0.5, steps=3))
    different = other_seed.certify(image, 4, 30, alpha=0.1, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(different.pvalues, certificates[0].pvalues)


# --------------------------------------------------------------------------- how the input is shrunk


def patched_bilinear_denoise(model_size: int, noisy: torch.Tensor, sigma: float) -> tuple[torch.Tensor, RecordingUNet]:
    """The old way to force bilinear resizing (scripts/resize_ablation.py patched ``is_box_factor``):
    the reference that ``shrink="bilinear"`` must reproduce."""
    from unittest import mock

    from medcert_core.denoisers import diffusion

    diffusion.resize_noise_factor.cache_clear()
    try:
        with mock.patch.object(diffusion, "is_box_factor", lambda source, target: False):
            unet = RecordingUNet(model_size)
            return DiffusionDenoiser(unet, linear_scheduler(), sigma)(noisy), unet
    finally:
        diffusion.resize_noise_factor.cache_clear()


@pytest.mark.parametrize("input_size,model_size", [(64, 32), (32, 64), (48, 32)],
                         ids=["box-factor shrink", "shrink back", "non-integer"])
def test_bilinear_shrink_is_the_patched_resize(input_size, model_size):
    noisy = noisy_copy(torch.rand(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(5)), 0.5)
    expected, reference_unet = patched_bilinear_denoise(model_size, noisy, 0.5)
    unet = RecordingUNet(model_size)
    denoiser = DiffusionDenoiser(unet, linear_scheduler(), 0.5, shrink="bilinear")
    assert torch.equal(denoiser(noisy), expected)
    assert unet.timesteps == reference_unet.timesteps and torch.equal(unet.inputs[0], reference_unet.inputs[0])
    box = DiffusionDenoiser(RecordingUNet(model_size), linear_scheduler(), 0.5)(noisy)
    assert torch.equal(box, expected) == (input_size == 48), "box and bilinear differ exactly for integer factors"


def test_box_shrink_is_the_default_and_averages_integer_factors():
    noisy = noisy_copy(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6)), 0.5)
    default_unet, box_unet = RecordingUNet(32), RecordingUNet(32)
    default = DiffusionDenoiser(default_unet, linear_scheduler(), 0.5)
    box = DiffusionDenoiser(box_unet, linear_scheduler(), 0.5, shrink="box")
    assert default.shrink == "box" and torch.equal(default(noisy), box(noisy))
    start = timestep_for_sigma(linear_scheduler().alphas_cumprod, 0.5 * resize_noise_factor((64, 64), (32, 32)))
    abar = float(linear_scheduler().alphas_cumprod[start])
    assert box_unet.timesteps == [start]
    torch.testing.assert_close(box_unet.inputs[0],
                               math.sqrt(abar) * (2 * torch.nn.functional.avg_pool2d(noisy, 2) - 1))
    assert resize_noise_factor((64, 64), (32, 32), "box") == pytest.approx(0.5)
    assert resize_noise_factor((64, 64), (32, 32), "bilinear") < 0.5


@pytest.mark.parametrize("call", [
    lambda: DiffusionDenoiser(RecordingUNet(32), linear_scheduler(), 0.5, shrink="area"),
    lambda: resize(torch.zeros(1, 1, 8, 8), (4, 4), "area"),
    lambda: resize_noise_factor((8, 8), (4, 4), "area"),
], ids=["denoiser", "resize", "noise factor"])
def test_an_unknown_shrink_is_refused_with_the_valid_ones(call):
    with pytest.raises(ValueError, match=r"shrink must be one of \['box', 'bilinear'\], got 'area'"):
        call()
