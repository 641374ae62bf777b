"""Results and cached models are keyed by what produced them: the data read (case ids and file bytes)
and the weight files loaded by path, besides the parameters and the source digest.

Fixture data replaced by other data under the same root, or a checkpoint replaced at the same path,
must never be served from the store or the model cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medcert_core.data import base, load_dataset
from medcert_core import io as medcert_io
from medcert_core.io import file_digest
from medcert_core.study.runs import assets
from medcert_core.study.runs import run as runs
from medcert_core.study.runs import store
from medcert_core.study.settings import DataSpec, TrainingSpec
from medcert_core.study.runs.run import CertificationRun, RunOutput, ours, plain

TRAINING = TrainingSpec(epochs=1, unet_denoiser_steps=2, ddpm_steps=2)
OLD = 1_000_000_000  # an mtime (2001) far enough in the past for a file's digest to be cached


def write_folder_data(root: Path, seed: int, cases: int = 10, size: int = 16) -> Path:
    """A "folder" dataset of random 8-bit images and binary masks; the same ids for every seed."""
    rng = np.random.default_rng(seed)
    for kind in ("images", "masks"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    for case in range(cases):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / "images" / f"c{case:02d}.png")
        mask = (rng.random((size, size)) > 0.5).astype(np.uint8) * 255
        Image.fromarray(mask).save(root / "masks" / f"c{case:02d}.png")
    return root


def folder_spec(root: Path) -> DataSpec:
    return DataSpec("folder", str(root), 16, 0)


# --- the data digest -----------------------------------------------------------------------------

def test_each_case_is_read_from_its_image_and_mask_files(tmp_path):
    root = write_folder_data(tmp_path / "data", seed=0)
    dataset = load_dataset("folder", root, "all")
    assert dataset.files["c03"] == [root / "images" / "c03.png", root / "masks" / "c03.png"]
    assert set(dataset.files) == set(dataset.ids)
    assert load_dataset("phantom", None, "test", image_size=16).files == {}, "generated: no files"


@pytest.mark.filterwarnings("ignore:shenzhen. skipped")  # its fixture has one image without a mask, as the real set
@pytest.mark.parametrize(("name", "writer", "files_per_case"), [
    ("montgomery", "write_montgomery", 3), ("shenzhen", "write_shenzhen", 2), ("isic2018", "write_isic2018", 2)])
def test_every_loader_names_the_files_of_every_case(tmp_path, name, writer, files_per_case):
    from medcert_core.testing import fixtures

    getattr(fixtures, writer)(tmp_path, 4, 0, 0)  # no image at its native size: small files
    dataset = load_dataset(name, tmp_path, "all", image_size=16)
    assert set(dataset.files) == set(dataset.ids)
    assert all(len(paths) == files_per_case and all(path.is_file() for path in paths)
               for paths in dataset.files.values())


def test_dataset_digest_sees_ids_and_bytes_but_not_where_the_root_lies(tmp_path):
    root = write_folder_data(tmp_path / "data", seed=0)
    digest = base.dataset_digest(load_dataset("folder", root, "all"))
    assert base.dataset_digest(load_dataset("folder", root, "all")) == digest
    moved = shutil.copytree(root, tmp_path / "elsewhere")
    assert base.dataset_digest(load_dataset("folder", moved, "all")) == digest, "a moved root keeps the digest"

    mask = np.array(Image.open(moved / "masks" / "c05.png"))
    Image.fromarray(255 - mask).save(moved / "masks" / "c05.png")  # one mask changed
    assert base.dataset_digest(load_dataset("folder", moved, "all")) != digest
    for kind in ("images", "masks"):
        (root / kind / "c09.png").unlink()  # one case fewer
    assert base.dataset_digest(load_dataset("folder", root, "all")) != digest
    assert base.dataset_digest(load_dataset("folder", root, "test")) != base.dataset_digest(
        load_dataset("folder", root, "train")), "each split its own ids"


def test_file_digests_are_cached_per_file_state_and_a_replaced_file_is_read_again(tmp_path, monkeypatch):
    import time

    later = time.time_ns() + 10_000_000_000
    monkeypatch.setattr(time, "time_ns", lambda: later)  # every file here changed more than 2 s ago
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 64)
    os.utime(path, ns=(OLD, OLD))
    first = file_digest(path)
    assert any(key[0] == str(path) for key in medcert_io._FILE_DIGESTS), "an old file's digest is cached"
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"b" * 64)  # same size, other bytes
    os.utime(replacement, ns=(OLD, OLD))  # even with the same mtime
    os.replace(replacement, path)
    assert file_digest(path) != first


def test_a_file_changed_within_two_seconds_is_not_cached(tmp_path):
    """Its timestamps may not move when it changes again within the file system's clock tick."""
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 64)
    os.utime(path, ns=(OLD, OLD))
    assert file_digest(path) == hashlib.sha256(b"a" * 64).hexdigest()
    with open(path, "r+b") as handle:  # rewritten in place at once: same size, same mtime
        handle.write(b"c" * 64)
    os.utime(path, ns=(OLD, OLD))
    assert file_digest(path) == hashlib.sha256(b"c" * 64).hexdigest()


# --- runs ----------------------------------------------------------------------------------------

def fake_compute(calls: list):
    def compute(run, cache, **kwargs):
        calls.append(run.hash)
        rows = pd.DataFrame({"image_id": ["c00"], "class_id": [1], "dice": [float(len(calls))]})
        return RunOutput(rows, {"labels": np.zeros((1, 2, 2))}, pd.DataFrame())

    return compute


def test_a_run_over_other_data_under_the_same_root_is_recomputed(tmp_path, monkeypatch):
    root = write_folder_data(tmp_path / "data", seed=0)  # e.g. the fixtures first
    run = CertificationRun(folder_spec(root), TRAINING, "unet", plain(), 0.0)
    calls = []
    monkeypatch.setattr(runs, "compute", fake_compute(calls))
    options = {"results_dir": tmp_path / "results", "cache": tmp_path / "cache", "device": "cpu"}
    first_hash = run.hash
    assert runs.run_certification(run, **options)["dice"].tolist() == [1.0]
    assert runs.run_certification(run, **options)["dice"].tolist() == [1.0], "served from the store"
    assert calls == [first_hash]
    recorded = store.load_metadata(tmp_path / "results", first_hash)
    assert recorded["data_digest"] == run.data_digests() and set(recorded["data_digest"]) == {"train", "val", "test"}

    write_folder_data(root, seed=1)  # then the real data, under the same root and with the same ids
    assert run.hash != first_hash
    assert runs.run_certification(run, **options)["dice"].tolist() == [2.0], "computed again, not served"
    assert calls == [first_hash, run.hash]
    assert store.is_complete(tmp_path / "results", first_hash), "the other data's run stays in the store"


def test_a_run_changes_key_with_its_test_images_alone(tmp_path):
    root = write_folder_data(tmp_path / "data", seed=0)
    run = CertificationRun(folder_spec(root), TRAINING, "unet", plain(), 0.0)
    before = run.data_digests()
    test_case = load_dataset("folder", root, "test").ids[0]
    image = np.array(Image.open(root / "images" / f"{test_case}.png"))
    Image.fromarray(255 - image).save(root / "images" / f"{test_case}.png")
    after = run.data_digests()
    assert after["test"] != before["test"] and after["train"] == before["train"] and after["val"] == before["val"]


# --- cached models -------------------------------------------------------------------------------

def test_a_cached_segmenter_is_not_reused_for_other_data_under_the_same_root(tmp_path, monkeypatch):
    root = write_folder_data(tmp_path / "data", seed=0)
    trained, loaded = [], []

    def fake_train(train_set, val_set, *, checkpoint, **kwargs):
        trained.append((checkpoint, base.dataset_digest(train_set)))
        torch.save({"config": {"epochs": 1}, "epoch": 1}, checkpoint)
        return "model", "config", None

    def fake_load(path, device=None):
        loaded.append(path)
        return "loaded", "config"

    monkeypatch.setattr(assets, "train_segmenter", fake_train)
    monkeypatch.setattr(assets, "load_segmenter", fake_load)
    data = folder_spec(root)
    assert assets.segmenter(tmp_path, data, TRAINING, "unet") == ("model", "config")
    assert assets.segmenter(tmp_path, data, TRAINING, "unet") == ("loaded", "config"), "the cached one"
    first = assets.segmenter_path(tmp_path, data, TRAINING, "unet", 0.0)
    assert first.name.endswith(f"{data.data_tag('train', 'val')}.pt")

    write_folder_data(root, seed=1)
    second = assets.segmenter_path(tmp_path, data, TRAINING, "unet", 0.0)
    assert second != first
    assert assets.segmenter(tmp_path, data, TRAINING, "unet") == ("model", "config"), "trained on the new data"
    assert [path for path, _ in trained] == [first, second] and trained[0][1] != trained[1][1]
    assert loaded == [first] and first.is_file(), "the first data's model is kept, not overwritten"


@pytest.mark.parametrize("kind", ["ddpm", "unet"])
def test_a_cached_denoiser_is_not_reused_for_other_data_under_the_same_root(tmp_path, monkeypatch, kind):
    root = write_folder_data(tmp_path / "data", seed=0)
    trained = []

    def fake_train(train_set, *args, **kwargs):
        folder = Path(args[-1] if kind == "unet" else args[0])
        trained.append(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / assets.FINISHED[kind]).write_text("{}")
        return folder

    monkeypatch.setattr(assets, "train_ddpm" if kind == "ddpm" else "train_unet_denoiser", fake_train)
    data = folder_spec(root)
    first = assets.resolve_denoiser_spec(f"{kind}:auto", 0.5, tmp_path, data, TRAINING, "cpu")
    assert assets.resolve_denoiser_spec(f"{kind}:auto", 0.5, tmp_path, data, TRAINING, "cpu") == first
    assert len(trained) == 1 and assets.marker_path(trained[0]).is_file()
    write_folder_data(root, seed=1)
    second = assets.resolve_denoiser_spec(f"{kind}:auto", 0.5, tmp_path, data, TRAINING, "cpu")
    assert second != first and len(trained) == 2, "trained again for the new data"


# --- weight files loaded by path -----------------------------------------------------------------

def test_a_checkpoint_replaced_at_the_same_path_recomputes_the_run(tmp_path, monkeypatch):
    checkpoint = tmp_path / "256x256_diffusion_uncond.pt"
    torch.save({"weight": torch.zeros(4)}, checkpoint)
    data = DataSpec("phantom", None, 16, 0)
    run = CertificationRun(data, TRAINING, "unet", ours(f"guided-diffusion:{checkpoint}"), 0.5)
    calls = []
    monkeypatch.setattr(runs, "compute", fake_compute(calls))
    options = {"results_dir": tmp_path / "results", "cache": tmp_path / "cache", "device": "cpu"}
    first_hash = run.hash
    runs.run_certification(run, **options)
    runs.run_certification(run, **options)
    assert calls == [first_hash]
    assert store.load_metadata(tmp_path / "results", first_hash)["weight_digests"] == {
        "denoiser": store.weights_digest(checkpoint)}

    torch.save({"weight": torch.ones(4)}, checkpoint)  # replaced: same path, same size, other weights
    assert run.hash != first_hash
    runs.run_certification(run, **options)
    assert calls == [first_hash, run.hash], "computed again with the new weights"


def write_ddpm_folder(folder: Path, weights: bytes) -> Path:
    for name, text in (("unet/config.json", b"{}"), ("unet/diffusion_pytorch_model.safetensors", weights),
                       ("scheduler/scheduler_config.json", b"{}"), ("README.md", b"notes")):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(text)
    return folder


def test_folder_denoisers_are_keyed_by_the_files_they_load(tmp_path):
    data = DataSpec("phantom", None, 16, 0)
    folder = write_ddpm_folder(tmp_path / "ddpm", b"weights-1")
    run = CertificationRun(data, TRAINING, "unet", ours(f"ddpm:{folder}"), 0.5)
    before = run.hash
    (folder / "README.md").write_text("other notes")  # not loaded: the same key
    assert run.hash == before
    (folder / ".diffusion_pytorch_model.safetensors.x1.tmp").write_bytes(b"half")  # a temporary file: ignored
    assert run.hash == before
    write_ddpm_folder(folder, b"weights-2")
    assert run.hash != before

    for sigma in (0.25, 0.5):  # a UNet denoiser per sigma, its path filled in
        (tmp_path / f"unet_{sigma:g}").mkdir()
        (tmp_path / f"unet_{sigma:g}" / "unet_denoiser.pt").write_bytes(f"sigma {sigma}".encode())
    spec = f"unet:{tmp_path}/unet_{{sigma}}"
    digests = {sigma: CertificationRun(data, TRAINING, "unet", ours(spec), sigma).weight_digests()["denoiser"]
               for sigma in (0.25, 0.5)}
    assert digests[0.25] != digests[0.5]
    assert CertificationRun(data, TRAINING, "unet", ours("ddpm:auto"), 0.5).weight_digests() == {}
    assert CertificationRun(data, TRAINING, "unet", plain(), 0.0).weight_digests() == {}


def test_a_missing_weight_file_is_named(tmp_path):
    run = CertificationRun(DataSpec("phantom", None, 16, 0), TRAINING, "unet",
                           ours(f"guided-diffusion:{tmp_path / 'missing.pt'}"), 0.5)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        run.hash


def test_a_segmenter_recipe_names_its_model_and_keys_its_runs_and_the_default_recipe_keeps_both():
    data = DataSpec("phantom", None, 32)
    default = TrainingSpec(preset="tiny", epochs=3)
    recipes = {"patience": TrainingSpec(preset="tiny", epochs=3, patience=5),
               "flips": TrainingSpec(preset="tiny", epochs=3, flips=True)}
    default_name = assets.segmenter_path(Path("c"), data, default, "unet", 0.0).name
    default_run = CertificationRun(data, default, "unet", plain(), 0.0)
    assert "_p" not in default_name.split("_seed")[0] and "flips" not in default_name
    assert {"patience", "flips"}.isdisjoint(default_run.parameters()["training"]), "existing keys stay valid"
    for tag, spec in (("_p5_seed", recipes["patience"]), ("_flips_seed", recipes["flips"])):
        name = assets.segmenter_path(Path("c"), data, spec, "unet", 0.0).name
        assert tag in name and name.replace(tag, "_seed") == default_name
        assert CertificationRun(data, spec, "unet", plain(), 0.0).hash != default_run.hash


def test_a_training_seed_names_every_model_it_trains_and_none_keeps_the_split_seed(tmp_path):
    data = DataSpec("phantom", None, 32, seed=0)
    default, second = TrainingSpec(preset="tiny", epochs=3), TrainingSpec(preset="tiny", epochs=3, training_seed=1)
    names = {
        "segmenter": lambda t: assets.segmenter_path(tmp_path, data, t, "unet", 0.0).name,
        "ddpm": lambda t: assets.ddpm_folder(tmp_path, data, t).name,
        "unet denoiser": lambda t: assets.unet_denoiser_folder(tmp_path, data, t, 0.25).name,
    }
    for kind, name in names.items():
        assert "_seed0" in name(default) and name(second) == name(default).replace("_seed0", "_seed1"), kind
    assert assets.training_seed(data, default) == 0 and assets.training_seed(data, second) == 1
    explicit_split_seed = TrainingSpec(preset="tiny", epochs=3, training_seed=0)
    runs_of = [CertificationRun(data, spec, "unet", plain(), 0.0) for spec in (default, second, explicit_split_seed)]
    assert "training_seed" not in runs_of[0].parameters()["training"] and runs_of[0].hash != runs_of[1].hash
    assert runs_of[2].hash == runs_of[0].hash, "the split's seed given explicitly trains the same models: one run"
