"""One run's images over several processes: ``torchrun --nproc-per-node 2`` on CPU (gloo) gives the table
of one process.

``medcert certify-runs --profile smoke`` certifies the runs of the smoke grid's phantom chapter
(5 test images here, so the two ranks certify 3 and 2) first in one process, then under torchrun
with two, into two results stores sharing one model cache (the models are trained once, by the
first). Every run's tidy rows (all columns but the timing), its label maps and the ``--output``
tables must be equal; the two-process runs record ``processes: 2``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def certify_runs(tmp_path: Path, name: str, launcher: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [*launcher, "-m", "medcert_core", "certify-runs", "--profile", "smoke", "--device", "cpu",
               "--set", "test_images=5", "--set", f"cache_dir={tmp_path / 'cache'}",
               "--set", f"results_dir={tmp_path / name}", "--output", str(tmp_path / f"{name}.csv")]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return done, time.perf_counter() - start


@pytest.mark.slow
def test_two_processes_give_the_table_of_one(tmp_path):
    one, one_seconds = certify_runs(tmp_path, "one", [sys.executable])
    assert one.returncode == 0, one.stderr[-3000:]
    two, two_seconds = certify_runs(tmp_path, "two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc-per-node", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    print(f"\ncertify-runs, smoke, 5 test images: 1 process {one_seconds:.1f} s (training included), "
          f"2 processes {two_seconds:.1f} s")

    tables = {name: pd.read_csv(tmp_path / f"{name}.csv").drop(columns=["seconds"]) for name in ("one", "two")}
    pd.testing.assert_frame_equal(tables["two"], tables["one"])
    assert tables["one"]["run"].nunique() == 6 and tables["one"]["image_id"].nunique() == 5
    for run in tables["one"]["run"].unique():
        folders = {name: tmp_path / name / "runs" / run for name in ("one", "two")}
        rows = {name: pd.read_csv(folder / "results.csv").drop(columns=["seconds"]) for name, folder in folders.items()}
        pd.testing.assert_frame_equal(rows["two"], rows["one"])
        with np.load(folders["one"] / "maps.npz") as first, np.load(folders["two"] / "maps.npz") as second:
            assert first.files == second.files
            for key in first.files:
                np.testing.assert_array_equal(second[key], first[key])
        metadata = {name: json.loads((folder / "metadata.json").read_text()) for name, folder in folders.items()}
        assert metadata["two"]["processes"] == 2 and "processes" not in metadata["one"]
        assert metadata["two"]["parameters"] == metadata["one"]["parameters"]
    aggregates = {name: pd.read_csv(tmp_path / name / "aggregate.csv").drop(columns=["seconds"]) for name in ("one", "two")}
    pd.testing.assert_frame_equal(aggregates["two"], aggregates["one"])
    assert "[medcert] training" not in two.stderr, "the second store reused the cached models"
