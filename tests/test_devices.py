"""Device and precision resolution: ``auto`` becomes bf16 only where the hardware runs it natively,
and what it resolved to is what a certificate, a run's key and a chapter record."""

from __future__ import annotations

import datetime
import subprocess

import numpy as np
import pytest
import torch

from medcert_core import devices
from medcert_core.devices import cpu_flags, resolve_precision
from medcert_core.smoothing import SmoothedSegmenter
from medcert_core.study.experiment import Experiment
from medcert_core.study.runs.run import CertificationRun, Method

XEON_AMX = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
OLD_XEON = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"


@pytest.mark.parametrize("cpuinfo, native", [(XEON_AMX, True), (OLD_XEON, False), ("", False)])
def test_the_cpu_flags_say_whether_bf16_is_native(tmp_path, cpuinfo, native):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    flags = cpu_flags(path)
    assert any(flag in flags for flag in devices.BF16_CPU_FLAGS) is native
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_a_record_names_the_cpu_model_and_only_its_native_bf16_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(XEON_AMX)
    assert devices.cpu_model_name(path) == "Intel(R) Xeon(R) Processor"
    assert devices.cpu_model_name(tmp_path / "absent")  # platform's name where there is no cpuinfo, never empty
    record = devices.machine_record()
    assert set(record) == {"cpu", "bf16_flags", "cpus", "torch_threads", "torch", "host"}
    assert set(record["bf16_flags"]) == set(devices.BF16_CPU_FLAGS) & cpu_flags()
    assert record["torch_threads"] == torch.get_num_threads() and record["torch"] == torch.__version__


def test_a_timestamp_is_now_to_the_second_with_its_utc_offset():
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    stamp = datetime.datetime.strptime(devices.local_timestamp(), "%Y-%m-%dT%H:%M:%S%z")
    after = datetime.datetime.now(datetime.timezone.utc)
    assert stamp.utcoffset() is not None and before <= stamp <= after


def test_git_commit_names_the_checked_out_commit_and_marks_local_changes(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("one")
    subprocess.run([*git, "-C", str(tmp_path), "add", "a.txt"], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-qm", "one"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert devices.git_commit(tmp_path) == head and len(head) == 40
    (tmp_path / "a.txt").write_text("two")
    assert devices.git_commit(tmp_path) == f"{head}-dirty"
    (tmp_path / "untracked.txt").write_text("not part of the code")
    (tmp_path / "a.txt").write_text("one")
    assert devices.git_commit(tmp_path) == head
    assert devices.git_commit(tmp_path / "missing") is None


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_resolves_on_the_cpu_by_its_flags_and_explicit_precisions_stay(monkeypatch, native, expected):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") == expected
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, "cpu") == explicit
    with pytest.raises(ValueError, match=r"precision must be one of \['fp32', 'bf16', 'fp16', 'auto'\], got 'fp64'"):
        resolve_precision("fp64", "cpu")


def tied_segmenter() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        noisy = 0.5 + 0.5 * torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(1))
        model[2].bias -= model(noisy).mean((0, 2, 3))
    return model.eval()


def test_an_auto_smoother_certifies_exactly_as_the_precision_it_resolves_to(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    image = torch.rand(1, 12, 12, generator=torch.Generator().manual_seed(2))
    certificates = {}
    for precision in ("auto", "bf16", "fp32"):
        smoother = SmoothedSegmenter(tied_segmenter(), 2, 0.5, device="cpu", precision=precision)
        certificates[precision] = smoother.certify(image, 10, 200, alpha=0.05,
                                                   generator=torch.Generator().manual_seed(3))
        assert smoother.precision == ("bf16" if precision == "auto" else precision)
    np.testing.assert_array_equal(certificates["auto"].pvalues.numpy(), certificates["bf16"].pvalues.numpy())
    assert not np.array_equal(certificates["bf16"].pvalues.numpy(), certificates["fp32"].pvalues.numpy()), \
        "bf16 is another base model: some draw's class differs"


def test_a_run_is_keyed_by_the_resolved_precision(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    experiment = Experiment.from_parameters({"precision": "auto", "device": "cpu", "sigmas": [0.25]})
    explicit = Experiment.from_parameters({"precision": "bf16", "device": "cpu", "sigmas": [0.25]})
    method = Method("SegCertify", train_noise=0.25)
    auto_run = experiment.certification_run("unet", method, 0.25)
    bf16_run = explicit.certification_run("unet", method, 0.25)
    assert auto_run.precision == "bf16" and auto_run.parameters() == bf16_run.parameters()
    assert experiment.settings_table().loc["precision", "value"] == "bf16 (auto)"
    with pytest.raises(ValueError, match="resolve 'auto' for the device first"):
        CertificationRun(auto_run.data, auto_run.training, "unet", method, 0.25, precision="auto")


def test_the_model_cache_lives_outside_the_checkout_where_the_environment_says(monkeypatch, tmp_path):
    from medcert_core.io import user_cache_dir

    monkeypatch.setenv("MEDCERT_CACHE", str(tmp_path / "mine"))
    assert user_cache_dir() == tmp_path / "mine"
    assert Experiment().cache_path == tmp_path / "mine", "the default cache_dir is the user's cache"
    monkeypatch.delenv("MEDCERT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "medcert"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "medcert"
    assert Experiment(cache_dir="runs/cache").cache_path.name == "cache", "a folder, as before"


def test_a_cache_placeholder_in_a_denoiser_spec_is_filled_with_the_cache_in_use(tmp_path):
    from medcert_core.study.runs.run import ours

    keys = []
    for where in ("a", "b"):
        experiment = Experiment(cache_dir=str(tmp_path / where), sigmas=[0.25])
        run = experiment.certification_run("unet", ours("ddpm:{cache}/denoisers/other_ddpm"), 0.25)
        assert run.method.denoiser == f"ddpm:{tmp_path / where}/denoisers/other_ddpm"
        keys.append(run.method.label)
    assert keys[0] == keys[1], "the chapter's label does not depend on where the cache lies"


@pytest.mark.parametrize("native", [True, False])
def test_a_training_precision_placeholder_names_the_model_trained_at_this_chapters_precision(monkeypatch, native):
    from medcert_core.study.runs.run import ours

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    experiment = Experiment(profile="jsrt", device="cpu", cache_dir="/models", sigmas=[0.25])
    run = experiment.certification_run("unet", ours("ddpm:{cache}/denoisers/ddpm_x_at64{training_precision}_seed0"), 0.25)
    assert run.method.denoiser == ("ddpm:/models/denoisers/ddpm_x_at64_bf16_seed0" if native
                                   else "ddpm:/models/denoisers/ddpm_x_at64_seed0")


def test_models_trained_under_bf16_are_named_and_keyed_apart_and_fp32_names_and_keys_stay(tmp_path):
    from medcert_core.study.runs import assets
    from medcert_core.study.runs.run import ours
    from medcert_core.study.settings import training_spec

    experiment = Experiment(sigmas=[0.25], training_overrides={"training_precision": "bf16"})
    plain_fp32 = Experiment(sigmas=[0.25], training_overrides={"training_precision": "fp32"})
    for name in (lambda e: assets.segmenter_path(tmp_path, e.data, e.training, "unet", 0.0).name,
                 lambda e: assets.ddpm_folder(tmp_path, e.data, e.training).name,
                 lambda e: assets.unet_denoiser_folder(tmp_path, e.data, e.training, 0.25).name):
        bf16, fp32 = name(experiment), name(plain_fp32)
        assert "_bf16_seed0" in bf16 and "bf16" not in fp32 and bf16.replace("_bf16", "") == fp32
    runs = [e.certification_run("unet", ours("ddpm:auto"), 0.25) for e in (experiment, plain_fp32)]
    assert runs[0].hash != runs[1].hash
    assert "training_precision" not in runs[1].parameters()["training"], "fp32 runs keep the keys they had"
    with pytest.raises(ValueError, match=r"training setting 'training_precision' must be one of \['fp32', 'bf16', "
                                         r"'fp16', 'auto'\], got 'fp64'"):
        training_spec("quick").with_overrides({"training_precision": "fp64"})


@pytest.mark.parametrize("native", [True, False])
def test_the_cpu_profiles_train_at_auto_resolved_for_the_device_and_runs_refuse_it_unresolved(monkeypatch, native):
    from medcert_core.study.settings import training_spec

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    for profile in ("quick", "jsrt"):
        assert training_spec(profile).training_precision == "auto"
        experiment = Experiment(profile=profile, device="cpu", sigmas=[0.25])
        assert experiment.training.training_precision == ("bf16" if native else "fp32")
        run = experiment.certification_run("unet", Method("SegCertify", train_noise=0.25), 0.25)
        assert ("training_precision" in run.parameters()["training"]) == native, "fp32 keeps the keys it had"
    assert Experiment(profile="paper", device="cpu").training.training_precision == "fp32", "the paper's stays"
    with pytest.raises(ValueError, match="resolve 'auto' for the device first"):
        CertificationRun(run.data, training_spec("quick"), "unet", run.method, 0.25, precision="fp32")


def test_training_under_bf16_autocast_keeps_fp32_weights_and_records_its_precision(monkeypatch):
    from medcert_core.data import load_dataset
    from medcert_core.training import train_segmenter

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    train, val = (load_dataset("phantom", None, split, image_size=32) for split in ("train", "val"))
    model, config, history = train_segmenter(train, val, arch="resunetpp", epochs=1, model_kwargs={"base_channels": 4},
                                             device="cpu", precision="auto", progress=False)
    assert config.precision == "bf16" and config.record()["precision"] == "bf16"
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert np.isfinite(history["loss"]).all()


@pytest.mark.parametrize("kind", ["ddpm", "unet"])
def test_denoisers_train_under_bf16_autocast_with_fp32_weights(tmp_path, monkeypatch, kind):
    from medcert_core.data import load_dataset
    from medcert_core.denoisers import load_denoiser
    from medcert_core.denoisers.training import train_ddpm, train_unet_denoiser

    train = load_dataset("phantom", None, "train", image_size=32)
    calls = []
    original = devices.autocast
    monkeypatch.setattr("medcert_core.denoisers.training.autocast",
                        lambda device, precision: calls.append(precision) or original(device, precision))
    if kind == "ddpm":
        folder = train_ddpm(train, tmp_path / kind, steps=2, batch_size=2, image_size=32, device="cpu",
                            precision="bf16", progress=False)
    else:
        folder = train_unet_denoiser(train, 0.5, tmp_path / kind, steps=2, batch_size=2, device="cpu",
                                     precision="bf16", progress=False)
    assert calls == ["bf16", "bf16"], "each training step's forward pass runs under bf16 autocast"
    denoiser = load_denoiser(f"{kind}:{folder}", 0.5)
    assert all(parameter.dtype == torch.float32 for parameter in denoiser.parameters())
