"""The study's profiles: how much training a run may spend, and where its grid lives.

quick: embedded phantoms, tiny models and a tiny DDPM; minutes on 2 CPU cores (the main job).
jsrt:  the real JSRT data at a CPU-feasible 128 px with tiny models and an in-project DDPM.
paper: the paper's sizes and models, for a GPU (its denoiser is OpenAI's 256x256 checkpoint).
smoke: one epoch, a couple of DDPM steps: checks that the pipeline runs, numbers mean nothing.
"""

from __future__ import annotations

from medcert_core.study.assets import TrainingSpec

PROFILES: dict[str, TrainingSpec] = {
    "quick": TrainingSpec(preset="tiny", epochs=40, ddpm_preset="tiny", ddpm_steps=300, unet_denoiser_steps=200),
    # the DDPM earns its place (scripts/denoiser_gate.py): EMA weights, timesteps focused on the study's
    # t*, at 64 px (the 128 px input box-averaged by 2, the paper's 512 -> 256 in small), 3000 steps
    "jsrt": TrainingSpec(preset="tiny", epochs=20, ddpm_preset="tiny", ddpm_steps=3000, ddpm_image_size=64,
                         ddpm_ema_decay=0.999, ddpm_focus_sigmas=(0.25, 0.5, 1.0), ddpm_focus_share=0.5,
                         unet_denoiser_steps=800),
    "smoke": TrainingSpec(preset="tiny", epochs=1, ddpm_preset="tiny", ddpm_steps=2, unet_denoiser_steps=2),
    "paper": TrainingSpec(preset="paper", epochs=None, ddpm_preset="paper", ddpm_steps=None, unet_denoiser_steps=5000),
}


def training_spec(profile: str) -> TrainingSpec:
    """The TrainingSpec of ``profile``; the error lists the valid names."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    return PROFILES[profile]
