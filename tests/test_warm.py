"""The grid's warm-up: which models it plans from the chapters' parameters, and that models trained in
parallel processes are the cache entries the chapters then find (nothing trained twice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medcert_core.study.experiment import Experiment
from medcert_core.study.grid.spec import template_parameters
from medcert_core.study.warm import ModelJob, jobs_of_parameters, missing_models, warm_cache
from medcert_core.study.runs import assets
from medcert_core.study.settings import DataSpec, training_spec
from medcert_core.study.workflow import prepare_entries

ROOT = Path(__file__).resolve().parents[1]


def chapter_parameters(grid: str, data_root: str | None = None) -> list[dict]:
    entries = prepare_entries(ROOT / "grids" / grid, data_root=data_root, root=ROOT)
    return [{**(template_parameters(ROOT / "notebooks" / f"{entry.notebook}.ipynb") or {}), **entry.parameters}
            for entry in entries]


def test_the_quick_grid_plans_exactly_the_six_models_its_chapters_train(tmp_path):
    parameters = [{**p, "cache_dir": str(tmp_path)} for p in chapter_parameters("quick.yaml")]
    data, training = DataSpec("phantom", None, 64), Experiment(profile="quick").training  # precision resolved
    expected = [  # longest first: the DDPM, the segmenters, the UNet denoisers
        assets.ddpm_folder(tmp_path, data, training),
        assets.segmenter_path(tmp_path, data, training, "unet", 0.0),
        assets.segmenter_path(tmp_path, data, training, "unet", 0.25),
        *(assets.unet_denoiser_folder(tmp_path, data, training, sigma) for sigma in (0.25, 0.5, 1.0)),
    ]
    assert [job.path for job in missing_models(parameters)] == expected


def test_a_dataset_chapter_plans_baselines_for_every_architecture_only_when_asked(tmp_path):
    base = {"profile": "smoke", "dataset": "phantom", "image_size": 32, "cache_dir": str(tmp_path),
            "archs": ["unet", "resunetpp"], "denoiser": "ffdnet:weights.pth", "segcertify_noise": 0.5}
    first = [(job.kind, job.arch, job.noise_sigma) for job in jobs_of_parameters({**base, "baselines_for": "first"})]
    assert first == [("segmenter", "unet", 0.0), ("segmenter", "resunetpp", 0.0), ("segmenter", "unet", 0.5)]
    every = [(job.arch, job.noise_sigma) for job in jobs_of_parameters({**base, "baselines_for": "all"})]
    assert every[2:] == [("unet", 0.5), ("resunetpp", 0.5)]  # and no denoiser: ffdnet is a file, not trained


@pytest.mark.slow
def test_models_trained_in_parallel_are_the_cache_entries_the_chapters_find(tmp_path, capsys):
    data, training = DataSpec("phantom", None, 32), training_spec("smoke")
    jobs = [ModelJob("segmenter", data, training, tmp_path, arch="unet"),
            ModelJob("unet", data, training, tmp_path, sigma=0.5)]
    trained = warm_cache(jobs, workers=2)
    assert sorted(name for name, _ in trained) == sorted(job.path.name for job in jobs)
    assert all(job.complete for job in jobs) and missing_models([]) == []
    records = [json.loads(assets.marker_path(job.path).read_text())["training"] for job in jobs]
    assert [record["machine"]["torch_threads"] for record in records] == [1, 1], "trained in one-thread processes"
    assert all(0 < record["seconds"] < 600 and len(record["load_average"]) == 3 for record in records)
    capsys.readouterr()
    assets.segmenter(tmp_path, data, training, "unet", 0.0, device="cpu")  # what a chapter calls: from the cache
    assets.resolve_denoiser_spec("unet:auto", 0.5, tmp_path, data, training, "cpu")
    assert "[medcert] training" not in capsys.readouterr().err
    assert warm_cache([job for job in jobs if not job.complete], workers=2) == []  # nothing left to train


def test_a_failed_training_names_the_model(tmp_path):
    data = DataSpec("phantom", None, 32)
    jobs = [ModelJob("segmenter", data, training_spec("smoke"), tmp_path, arch="no-such-arch"),
            ModelJob("segmenter", data, training_spec("smoke"), tmp_path, arch="also-missing")]
    with pytest.raises(RuntimeError, match="training segmenter phantom_32_no-such-arch.* failed"):
        warm_cache(jobs, workers=2)


def test_a_chapter_over_training_seeds_plans_every_seeds_models(tmp_path):
    base = {"profile": "smoke", "dataset": "phantom", "image_size": 32, "cache_dir": str(tmp_path),
            "archs": ["unet"], "denoiser": "ddpm:auto", "segcertify_noise": 0.25, "baselines_for": "first"}
    one = jobs_of_parameters(base)
    three = jobs_of_parameters({**base, "training_seeds": [0, 1, 2]})
    assert len(three) == 3 * len(one) and len({job.path for job in three}) == len(three)
    assert [job.path for job in three[:len(one)]] == [job.path for job in one], "seed 0 is the split's: same models"
    assert all("_seed2" in job.path.name for job in three[2 * len(one):])
