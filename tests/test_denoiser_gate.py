"""The MMSE gate: its decision, and the script end to end on a small configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medcert_core.denoisers.gate import mmse_gate_failures

ROOT = Path(__file__).resolve().parent.parent


def test_the_gate_fails_exactly_where_single_step_loses():
    table = {(0.5, "single"): 25.0, (0.5, "multi"): 24.0, (0.5, "unet"): 25.0,
             (1.0, "single"): 20.2, (1.0, "multi"): 23.7, (1.0, "unet"): 23.9}
    failures = mmse_gate_failures(table, [0.5, 1.0], single="single", rivals=("multi", "unet"))
    assert failures == ["sigma 1: single 20.20 dB < multi 23.70 dB", "sigma 1: single 20.20 dB < unet 23.90 dB"]
    assert mmse_gate_failures(table, [0.5], single="single", rivals=("multi", "unet")) == []  # a tie passes
    with pytest.raises(KeyError):
        mmse_gate_failures(table, [0.25], single="single", rivals=("multi",))


def test_the_best_denoiser_per_sigma_is_the_candidate_of_highest_psnr():
    from medcert_core.denoisers.gate import best_per_sigma

    rows = [{"sigma": sigma, "denoiser": name, "psnr_db": value} for sigma, name, value in (
        (0.5, "noisy input", 40.0), (0.5, "single", 27.0), (0.5, "ffdnet", 27.5), (0.5, "other", 26.0),
        (1.0, "single", 24.0), (1.0, "ffdnet", 21.0), (1.0, "multi", 30.0))]
    assert best_per_sigma(rows, ["single", "ffdnet", "other"]) == {0.5: "ffdnet", 1.0: "single"}, \
        "rows that are not candidates (the noisy input, the gate's rivals) are never chosen"
    assert best_per_sigma(rows, ["other"]) == {0.5: "other"}


def test_paired_psnr_differences_are_image_by_image():
    from medcert_core.denoisers.gate import paired_psnr_differences

    rows = [{"sigma": 0.5, "denoiser": name, "psnr_db_per_image": values}
            for name, values in (("noisy input", [6.0, 6.0, 6.0]), ("ref", [30.0, 31.0, 29.0]),
                                 ("other", [29.0, 31.5, 28.0]))]
    (row,) = paired_psnr_differences(rows, "ref")
    assert (row["denoiser"], row["minus"], row["images"]) == ("other", "ref", 3)
    assert abs(row["mean_db"] - (-1.0 + 0.5 - 1.0) / 3) < 1e-12 and row["low_db"] <= row["mean_db"] <= row["high_db"]
    assert -1.0 <= row["low_db"] and row["high_db"] <= 0.5, "a mean of resampled differences lies within their range"


@pytest.mark.slow
def test_the_gate_script_measures_the_profiles_own_models(tmp_path):
    """Phantoms at 32 px with a few training steps: the numbers mean nothing, the plumbing does."""
    output = tmp_path / "gate.json"
    command = [sys.executable, str(ROOT / "scripts" / "denoiser_gate.py"), "--profile", "smoke", "--dataset", "phantom",
               "--image-size", "32", "--sigmas", "0.5", "--multi-steps", "2", "--images", "3",
               "--training", "{ddpm_steps: 3, unet_denoiser_steps: 2, ddpm_ema_decay: 0.9}",
               "--cache", str(tmp_path / "cache"), "--output", str(output)]
    ffdnet = ROOT.parent / "shared" / "weights" / "ffdnet" / "ffdnet_color.pth"
    reported = {"ffdnet (box shrink above 75/255)", "ffdnet (no shrink)"} if ffdnet.is_file() else set()
    command += ["--ffdnet", str(ffdnet)] if reported else []
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode in (0, 1), completed.stderr
    result = json.loads(output.read_text())
    table = {(row["sigma"], row["denoiser"]): row["psnr_db"] for row in result["rows"]}
    assert {name for _, name in table} == {"noisy input", "ddpm single-step", "ddpm multi-step", "unet denoiser",
                                           *reported}
    if reported:  # at sigma 0.5 > 75/255 the shrink changes what FFDNet sees; reported rows are never gated
        assert table[(0.5, "ffdnet (box shrink above 75/255)")] != table[(0.5, "ffdnet (no shrink)")]
    assert all(row["images"] == 3 for row in result["rows"])
    assert result["split"] == "val", "the gate chooses, so it is measured on the validation split by default"
    assert result["passed"] == (completed.returncode == 0) == (not result["failures"])
    assert result["failures"] == mmse_gate_failures(table, [0.5], single="ddpm single-step",
                                                    rivals=("ddpm multi-step", "unet denoiser"))
    assert "_ema0.9" in result["ddpm"]["folder"]
    assert {row["denoiser"] for row in result["paired_against_single_step"]} == \
        {"ddpm multi-step", "unet denoiser", *reported}
    candidates = {"ddpm single-step", *reported}
    assert result["best_per_sigma"]["0.5"] == max(candidates, key=lambda name: table[(0.5, name)])

    without_unet = subprocess.run(command + ["--no-unet-rival", "--output", str(tmp_path / "no_unet.json")],
                                  capture_output=True, text=True, timeout=600)
    assert without_unet.returncode in (0, 1), without_unet.stderr
    rows = json.loads((tmp_path / "no_unet.json").read_text())["rows"]
    assert "unet denoiser" not in {row["denoiser"] for row in rows} and "ddpm multi-step" in {row["denoiser"] for row in rows}
