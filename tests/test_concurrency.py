"""Several writers at once: the results store, aggregate.csv, the grid state and the model cache.

Real processes write one store at the same moment (each saving runs and rewriting aggregate.csv
after every run, as a chapter does); the aggregate must then hold every run's rows exactly once.
Threads stand in for processes where a fake is needed (a lock is an flock on its own descriptor,
so two threads contend exactly as two processes do). A process SIGKILLed while holding a lock
leaves none behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

from medcert_core.io import file_lock
from medcert_core.study.grid import local as grid_local
from medcert_core.study.grid.spec import GridEntry
from medcert_core.study.runs import assets
from medcert_core.study.runs import run as runs
from medcert_core.study.runs import store
from medcert_core.study.settings import DataSpec, TrainingSpec

WRITER = r"""
import sys, time
from pathlib import Path
import numpy as np, pandas as pd
from medcert_core.study.runs import store

results, writer, count, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
while not go.exists():
    time.sleep(0.01)
mine, missed = set(), 0
for number in range(count):
    run_hash = f"w{writer:02d}r{number:02d}".ljust(16, "0")
    rows = pd.DataFrame({"image_id": ["a", "a", "b", "b"], "class_id": [0, 1, 0, 1],
                         "dice": np.full(4, writer + number / 100)})
    store.save_run(results, run_hash, rows, {"labels": np.zeros((1, 2, 2))}, {"writer": writer, "number": number})
    store.aggregate(results)
    mine.add(run_hash)
    # once its aggregate returned, a writer's runs stay in aggregate.csv: every later rewrite saw them
    missed += len(mine - set(pd.read_csv(results / "aggregate.csv")["run"]))
print(missed)
"""


@pytest.mark.slow
def test_concurrent_writers_leave_a_consistent_aggregate(tmp_path):
    writers, count = 4, 12
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "results"), str(writer), str(count),
                                   str(go)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for writer in range(writers)]
    time.sleep(2.0)  # every writer has imported and waits for the start
    go.touch()
    missed = 0
    for process in processes:
        stdout, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, stderr
        missed += int(stdout.split()[-1])
    assert missed == 0, "a rewrite of aggregate.csv dropped runs another writer had already aggregated"
    aggregate = pd.read_csv(tmp_path / "results" / "aggregate.csv")
    expected = {f"w{writer:02d}r{number:02d}".ljust(16, "0") for writer in range(writers) for number in range(count)}
    assert set(aggregate["run"]) == expected, "no run lost"
    assert len(aggregate) == 4 * writers * count, "no row lost or duplicated"
    assert not aggregate.duplicated(["run", "image_id", "class_id"]).any()
    assert sorted(path.name for path in (tmp_path / "results" / "runs").iterdir()) == sorted(expected)
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file left"


def test_two_processes_needing_one_run_compute_it_once(tmp_path, monkeypatch):
    run = runs.CertificationRun(DataSpec("phantom", None, 32, 0), TrainingSpec(epochs=1), "unet", runs.plain(), 0.0)
    calls = []

    def slow_compute(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(1.0)
        return runs.RunOutput(pd.DataFrame({"image_id": ["a"], "class_id": [1], "dice": [0.5]}),
                              {"labels": np.zeros((1, 2, 2))}, pd.DataFrame())

    monkeypatch.setattr(runs, "compute", slow_compute)
    results: dict[int, pd.DataFrame] = {}

    def certify(number: int) -> None:
        results[number] = runs.run_certification(run, results_dir=tmp_path, cache=tmp_path / "cache", device="cpu")

    threads = [threading.Thread(target=certify, args=(number,)) for number in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(calls) == 1, "the second waited for the first, then read its run"
    assert [frame["dice"].tolist() for frame in results.values()] == [[0.5], [0.5]]
    assert store.is_complete(tmp_path, run.hash)


def test_two_processes_needing_one_model_train_it_once(tmp_path, monkeypatch, capfd):
    import torch

    data, training = DataSpec("phantom", None, 32, 0), TrainingSpec(epochs=1)
    trained, loaded = [], []

    def slow_train(*args, checkpoint, **kwargs):
        trained.append(checkpoint)
        time.sleep(1.0)
        torch.save({"config": {"epochs": 1}, "epoch": 1}, checkpoint)
        return "model", "config", None

    def load(path, device=None):
        loaded.append(path)
        return "model", "config"

    monkeypatch.setattr(assets, "train_segmenter", slow_train)
    monkeypatch.setattr(assets, "load_segmenter", load)
    threads = [threading.Thread(target=assets.segmenter, args=(tmp_path, data, training, "unet")) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(trained) == 1 and len(loaded) == 1, "trained once; the second caller loaded it"
    stderr = capfd.readouterr().err
    assert stderr.count("[medcert] training segmenter") == 1
    assert stderr.count("[medcert] waiting for segmenter") == 1
    assert (tmp_path / "locks" / "segmenters" / f"{trained[0].name}.lock").is_file()


def test_concurrent_grid_entries_all_recorded(tmp_path):
    entries = [GridEntry("phantom", f"chapter{number}", {"n": number}) for number in range(16)]
    threads = [threading.Thread(target=grid_local.record_done, args=(entry, tmp_path)) for entry in entries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    state = json.loads((tmp_path / grid_local.STATE).read_text())
    assert state == {entry.output: entry.hash for entry in entries}


HOLDER = r"""
import sys, time
from medcert_core.io import file_lock
with file_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / "locks" / "model.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from filelock import FileLock, Timeout

    with pytest.raises(Timeout):
        FileLock(str(lock)).acquire(timeout=0.2)  # held while the holder lives
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    start = time.monotonic()
    with file_lock(lock):
        waited = time.monotonic() - start
    assert waited < 1.0, "the lock died with its process"
