"""The fast path of SmoothedSegmenter (precision, channels_last, batch "auto", out-of-memory retry,
torch.compile with a padded last batch) changes how f(D(.)) is computed, never the noise: these
tests run it on the CPU against the default path."""

from __future__ import annotations

import pytest
import torch

from medcert_core.denoisers import DiffusionDenoiser, linear_scheduler
from medcert_core.denoisers import training as denoiser_training
from medcert_core.models import create_model
from medcert_core.smoothing import CPU_AUTO_BATCH, SmoothedSegmenter

SIGMA = 0.5
N0, N = 10, 100


def diffusion_denoiser(steps: str | int = "single") -> DiffusionDenoiser:
    """The tiny in-project DDPM architecture at 16 px with random weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, **denoiser_training.DDPM_PRESETS["tiny"]["unet"])
    return DiffusionDenoiser(unet, linear_scheduler(), SIGMA, steps=steps)


def segmenter() -> torch.nn.Module:
    torch.manual_seed(1)
    return create_model("unet", 1, 3)


def image() -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    return ((x**2 + y**2) < 0.5).float()[None] * 0.8 + 0.1


def certify(seed: int = 3, steps: str | int = "single", wrap=None, **options):
    model = segmenter() if wrap is None else wrap(segmenter())
    smoothed = SmoothedSegmenter(model, 3, SIGMA, denoiser=diffusion_denoiser(steps), device="cpu", **options)
    return smoothed, smoothed.certify(image(), N0, N, alpha=0.01, generator=torch.Generator().manual_seed(seed))


def differing_pixels(a, b) -> int:
    return int((a.pvalues != b.pvalues).sum())


@pytest.fixture(scope="module")
def default_certificate():
    return certify(batch_size=16)[1]


def test_auto_batch_on_cpu_gives_the_same_certificate(default_certificate):
    smoothed, certificate = certify(batch_size="auto")
    assert smoothed._working_batch == CPU_AUTO_BATCH
    assert torch.equal(certificate.labels, default_certificate.labels)
    assert torch.equal(certificate.pvalues, default_certificate.pvalues)


def test_channels_last_gives_the_same_certificate_up_to_summation_order(default_certificate):
    """channels_last reorders the convolutions' sums: a logit may move by ~1e-6 and, rarely, a pixel's
    argmax with it. Bound: at most 1 % of the 256 pixels change a count (observed: 0)."""
    smoothed, certificate = certify(batch_size=16, channels_last=True)
    assert next(smoothed.segmenter.parameters()).is_contiguous(memory_format=torch.channels_last)
    assert differing_pixels(certificate, default_certificate) <= 0.01 * 256
    assert (certificate.labels != default_certificate.labels).float().mean() <= 0.01


class OutOfMemoryOnce(torch.nn.Module):
    """Raises torch.OutOfMemoryError the first time it sees a batch larger than ``limit``."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.raised, self.sizes = model, limit, 0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit and not self.raised:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        self.sizes.append(x.shape[0])
        return self.model(x)


@pytest.mark.parametrize("steps", ["single", 3])
def test_an_out_of_memory_error_halves_the_batch_and_redoes_it_with_the_same_noise(steps):
    """Also for a multi-step DDPM, whose own per-draw noise must be replayed for the redone batch."""
    _, reference = certify(batch_size=32, steps=steps)
    with pytest.warns(UserWarning, match="batch size lowered to 16"):
        smoothed, certificate = certify(batch_size=32, steps=steps, wrap=lambda model: OutOfMemoryOnce(model, 16))
    assert smoothed.segmenter.raised == 1 and smoothed._working_batch == 16
    assert sum(smoothed.segmenter.sizes) == N0 + N, "every draw counted once"
    assert torch.equal(certificate.labels, reference.labels)
    assert torch.equal(certificate.pvalues, reference.pvalues)


def test_out_of_memory_at_batch_one_is_raised():
    with pytest.raises(torch.OutOfMemoryError):
        certify(batch_size=1, wrap=lambda model: OutOfMemoryOnce(model, 0))


class DtypeRecorder(torch.nn.Module):
    """Records the dtype of its input and of its first convolution's output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return self.model(x)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_lower_precision_casts_only_inside_the_networks(precision, default_certificate):
    recorder = {}

    def wrap(model):
        recorder["segmenter"] = DtypeRecorder(model)
        return recorder["segmenter"]

    smoothed, certificate = certify(batch_size=16, precision=precision, wrap=wrap)
    assert set(recorder["segmenter"].seen) == {torch.float32}, "the denoised batch reaches the segmenter in fp32"
    with torch.autocast("cpu", dtype=smoothed_dtype(precision)):
        inner = torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))
    assert inner.dtype == smoothed_dtype(precision), "autocast lowers the convolutions"
    assert certificate.pvalues.dtype == torch.float64 and certificate.labels.dtype == torch.int64
    # the base model changed, so the certificate may differ, but not by much on this clear image
    assert (certificate.labels == default_certificate.labels).float().mean() > 0.9


def smoothed_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def test_the_logits_leave_autocast_in_fp32():
    smoothed = SmoothedSegmenter(segmenter(), 3, SIGMA, denoiser=diffusion_denoiser(), device="cpu", precision="bf16")
    logits = smoothed._logits(image()[None].expand(2, -1, -1, -1))
    assert logits.dtype == torch.float32


@pytest.mark.parametrize(("options", "message"), [
    ({"precision": "fp8"}, "precision must be one of"),
    ({"batch_size": "max"}, 'batch_size must be an int >= 1 or "auto"'),
    ({"batch_size": 0}, 'batch_size must be an int >= 1 or "auto"'),
    ({"compile": "fastest"}, "compile must be True, False or one of"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        SmoothedSegmenter(segmenter(), 3, SIGMA, device="cpu", **options)


def conv_segmenter() -> torch.nn.Module:
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 3, 3, padding=1))


@pytest.mark.slow
def test_compile_pads_the_last_batch_and_never_recompiles():
    """n0 + n = 110 draws in batches of 16: six full batches and a last one of 14, padded to 16;
    a second image reuses the compiled graph. Any recompilation is an error here. (A two-layer
    segmenter without a denoiser: the padding is the same for any model, inductor's compile time is not.)"""
    import torch._dynamo

    def run(**options):
        smoothed = SmoothedSegmenter(conv_segmenter(), 3, SIGMA, batch_size=16, device="cpu", **options)
        return [smoothed.certify(picture, N0, N, alpha=0.01, generator=torch.Generator().manual_seed(seed))
                for seed, picture in ((3, image()), (4, image().flip(-1)))]

    eager = run()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(compile=True)
    for reference, certificate in zip(eager, compiled):
        assert differing_pixels(certificate, reference) <= 0.01 * 256


def test_the_converted_adm_runs_its_attention_on_fused_sdpa():
    """Every attention block of the converted guided-diffusion layout uses diffusers' SDPA processor
    (torch.nn.functional.scaled_dot_product_attention: flash / memory-efficient kernels on a GPU)."""
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from medcert_core.denoisers.guided_diffusion import unet_config_from_flags

    config = unet_config_from_flags(image_size=64, num_channels=32, num_res_blocks=1, attention_resolutions="16,8",
                                    num_head_channels=16)
    processors = [module.processor for module in UNet2DModel(**config).modules() if isinstance(module, Attention)]
    assert len(processors) >= 3, "the layout has attention blocks"
    assert all(isinstance(processor, AttnProcessor2_0) for processor in processors)
