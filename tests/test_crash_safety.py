"""Crash safety, shown: the smoke grid killed (SIGKILL) twice and rerun, in a temporary project copy.

The grid runs as ``python -m medcert_core grid grids/smoke.yaml`` in a copy of the project tree under
tmp_path (notebooks/, grids/smoke.yaml, _config.yml, _toc.yml, book/*.md), so ``project_root()`` is
that copy and book/ and runs/results land in it; its model cache is runs/cache in it too
(``MEDCERT_CACHE``). It is killed

1. in the middle of a certification run: at least one run is complete and a later run's image loop
   has started (its per-image progress bar, labelled with the run, is on stderr) but not finished;
2. in the middle of a notebook execution: the first chapter is in the book and the second one's
   temporary ``.segcertify_vs_ours.running.ipynb`` shows executed cells;

and each time the whole process group and the papermill kernel (its own session) get SIGKILL.
Then the grid is run again to the end, and the test checks that no completed run or model was
computed again, that aggregate.csv holds each expected run's rows exactly once, and that every
stored file parses (a temporary file is never taken for a result).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from medcert_core.study.experiment import Experiment, clean_baselines
from medcert_core.study.grid.spec import load_grid
from medcert_core.study.runs.run import ours, segcertify
from medcert_core.study.settings import DataSpec, TrainingSpec

REPO = Path(__file__).resolve().parents[1]
GRID = "grids/smoke.yaml"
TIMEOUT = 300  # seconds for each phase; the whole smoke grid takes about a minute on 2 cores
IMAGE_LOOP = re.compile(r"([^\n\x1b:]*sigma=[\d.]+):\s+0%")  # a run's per-image bar starting: "<label> sigma=1:   0%|"


def project_copy(root: Path) -> Path:
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    (root / "grids").mkdir()
    shutil.copy(REPO / GRID, root / GRID)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, root / name)
    (root / "book").mkdir()
    for page in (REPO / "book").glob("*.md"):
        shutil.copy(page, root / "book" / page.name)
    (root / "results").mkdir()
    shutil.copy(REPO / "results" / "README.md", root / "results" / "README.md")  # book/results.md includes it
    return root


class Grid:
    """The grid command running in ``root``, its stderr in a file (the kernel's progress bars reach it)."""

    def __init__(self, root: Path, name: str):
        self.root = root
        self.log = root / f"{name}.stderr.txt"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "MEDCERT_CACHE": str(root / "runs" / "cache")}  # the copy's own model cache, checked below
        with open(self.log, "wb") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "medcert_core", "grid", GRID], cwd=root,
                                            stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                                            start_new_session=True)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace").replace("\r", "\n")

    def tail(self) -> str:
        lines = [line for line in self.stderr().splitlines() if line.strip()]
        return "\n".join(lines[-25:])

    def wait_until(self, condition, what: str) -> float:
        """Poll ``condition()`` until true; fail clearly if the grid ends first or TIMEOUT passes."""
        start = time.monotonic()
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the grid exited (rc {self.process.returncode}) before {what}; stderr:\n{self.tail()}")
            if time.monotonic() - start > TIMEOUT:
                self.kill()
                pytest.fail(f"no {what} within {TIMEOUT} s; stderr:\n{self.tail()}")
            time.sleep(0.05)
        return time.monotonic() - start

    def kill(self) -> int:
        """SIGKILL the grid's process group and every descendant (the kernel runs in its own session).

        Returns how many processes were killed (the grid and its descendants)."""
        try:
            descendants = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for child in descendants:
            try:
                os.killpg(os.getpgid(child.pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait(timeout=30)
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, f"processes survived SIGKILL: {alive}"
        return 1 + len(descendants)

    def finish(self) -> None:
        try:
            returncode = self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the rerun did not finish within {TIMEOUT} s; stderr:\n{self.tail()}")
        assert returncode == 0, f"the rerun failed (rc {returncode}); stderr:\n{self.tail()}"


def complete_runs(results: Path) -> dict[str, tuple[int, bytes]]:
    """{hash: (mtime_ns, bytes) of metadata.json} of every complete run."""
    return {path.parent.name: (path.stat().st_mtime_ns, path.read_bytes())
            for path in (results / "runs").glob("*/metadata.json")}


def finished_models(cache: Path) -> dict[str, int]:
    """{path: mtime_ns} of every finished model: segmenter checkpoints of their last epoch, DDPM folders."""
    import torch

    finished = {}
    for path in cache.glob("segmenters/*.pt"):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["epoch"] == saved["config"]["epochs"]:
            finished[str(path)] = path.stat().st_mtime_ns
    for path in cache.glob("denoisers/*/model_index.json"):
        finished[str(path.parent)] = path.stat().st_mtime_ns
    return finished


def executed_cells(notebook: Path) -> int:
    """Cells papermill marked completed in a (possibly half-written) running notebook; 0 if unreadable."""
    try:
        cells = json.loads(notebook.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(cell.get("metadata", {}).get("papermill", {}).get("status") == "completed" for cell in cells)


def recomputed(before: dict[str, tuple[int, bytes]], after: dict[str, tuple[int, bytes]]) -> list[str]:
    assert set(before) <= set(after), f"completed runs disappeared: {sorted(set(before) - set(after))}"
    return sorted(run for run in before if after[run] != before[run])


def expected_runs(root: Path) -> set[str]:
    """The runs the smoke chapters ask for (both run ours(ddpm:auto), SegCertify 0.25 and the clean rows)."""
    methods = [ours("ddpm:auto"), segcertify(0.25), *clean_baselines(0.25)]
    return {run.hash for entry in load_grid(root / GRID, root / "notebooks")
            for run in Experiment.from_parameters(entry.parameters).runs(["unet"], methods)}


@pytest.mark.slow
def test_the_smoke_grid_survives_sigkill_mid_run_and_mid_notebook(tmp_path):
    import nbformat

    started = time.monotonic()
    root = project_copy(tmp_path / "project")
    book, results, cache = root / "book", root / "runs" / "results", root / "runs" / "cache"
    expected = expected_runs(root)

    # 1. kill in the middle of a certification run
    grid = Grid(root, "first")
    try:
        def mid_certification() -> bool:
            done = len(complete_runs(results)) if results.is_dir() else 0
            return done >= 1 and len(IMAGE_LOOP.findall(grid.stderr())) > done

        waited = grid.wait_until(mid_certification, "certification run in progress after a completed one")
        killed_run = IMAGE_LOOP.findall(grid.stderr())[-1].strip()
    finally:
        killed = grid.kill()
    before_first = complete_runs(results)
    models_first = finished_models(cache)
    assert 1 <= len(before_first) < len(expected), "the first kill must land between runs, not after all of them"
    assert not (book / "phantom.ipynb").exists(), "a chapter killed mid-run must not reach the book"
    print(f"\n[crash safety] kill 1 after {waited:.0f} s ({killed} processes), mid certification run "
          f"'{killed_run}': {len(before_first)} of {len(expected)} runs complete, {len(models_first)} models finished")

    # 2. rerun, kill in the middle of the second notebook's execution
    running = book / ".segcertify_vs_ours.running.ipynb"
    grid = Grid(root, "second")
    try:
        waited = grid.wait_until(lambda: (book / "phantom.ipynb").is_file() and executed_cells(running) >= 2,
                                 "execution of the second chapter")
        cells = executed_cells(running)
    finally:
        killed = grid.kill()
    before_second = complete_runs(results)
    models_second = finished_models(cache)
    assert models_second, f"the chapters' models are in the copy's own cache {cache}"
    phantom_mtime = (book / "phantom.ipynb").stat().st_mtime_ns
    recomputed_first = recomputed(before_first, before_second)
    retrained_first = sorted(path for path, mtime in models_first.items() if models_second.get(path) != mtime)
    assert not (book / "segcertify_vs_ours.ipynb").exists(), "a chapter killed mid-execution must not reach the book"
    print(f"[crash safety] kill 2 after {waited:.0f} s ({killed} processes), mid notebook segcertify_vs_ours "
          f"({cells} cells executed): "
          f"{len(before_second)} of {len(expected)} runs complete; recomputed since kill 1: {len(recomputed_first)}")

    # 3. rerun to the end
    grid = Grid(root, "third")
    try:
        grid.finish()
    finally:
        if grid.process.poll() is None:
            grid.kill()
    final = complete_runs(results)
    recomputed_second = recomputed(before_second, final)
    retrained_second = sorted(path for path, mtime in models_second.items() if finished_models(cache).get(path) != mtime)

    assert recomputed_first == [] and recomputed_second == [], "a completed run was computed again"
    assert retrained_first == [] and retrained_second == [], "a finished model was trained again"
    assert (book / "phantom.ipynb").stat().st_mtime_ns == phantom_mtime, "a finished chapter was executed again"

    # every run the chapters need is complete, and no folder is left half-written
    assert set(final) == expected, f"lost: {sorted(expected - set(final))}, unexpected: {sorted(set(final) - expected)}"
    assert sorted(path.name for path in (results / "runs").iterdir()) == sorted(expected)

    # every stored file parses; aggregate.csv holds each run's rows exactly once
    aggregate = pd.read_csv(results / "aggregate.csv")
    expected_rows = 0
    for run in sorted(final):
        folder = results / "runs" / run
        metadata = json.loads((folder / "metadata.json").read_text())
        assert metadata["hash"] == run
        rows = pd.read_csv(folder / "results.csv")
        assert len(rows) > 0
        with np.load(folder / "maps.npz") as maps:
            assert {"image", "noisy", "target", "labels", "class_names"} <= set(maps.files)
            assert all(maps[key].size for key in maps.files)
        assert (aggregate["run"] == run).sum() == len(rows), f"run {run}: rows lost or duplicated in aggregate.csv"
        expected_rows += len(rows)
    assert set(aggregate["run"]) == set(final)
    assert len(aggregate) == expected_rows
    assert not aggregate.duplicated(["run", "image_id", "class_id"]).any()

    for chapter in ("phantom", "segcertify_vs_ours"):
        notebook = nbformat.read(book / f"{chapter}.ipynb", as_version=4)
        assert notebook.metadata["medcert"]["parameters_hash"]
    assert set(json.loads((results / "grid_state.json").read_text())) == {"phantom", "segcertify_vs_ours"}
    assert not list(book.glob(".*.running.ipynb")), "a stale running notebook was left in the book"
    leftovers = sorted(str(path.relative_to(root)) for path in root.joinpath("runs").rglob(".*.tmp"))
    leftovers += sorted(str(path.relative_to(root)) for path in root.joinpath("runs").rglob(".*.saving"))

    print(f"[crash safety] rerun completed the grid: {len(final)} of {len(expected)} runs complete; "
          f"recomputed after kill 1: {len(recomputed_first)}, after kill 2: {len(recomputed_second)}; "
          f"models retrained: {len(retrained_first) + len(retrained_second)}; chapters re-executed after kill 2: 0")
    print(f"[crash safety] aggregate.csv: {len(aggregate)} rows, expected {expected_rows} "
          f"({len(final)} runs, each once); temporary files left behind (ignored): {len(leftovers)} {leftovers}")
    print(f"[crash safety] test took {time.monotonic() - started:.0f} s")


# --- the pieces, one crash each (fast) -----------------------------------------------------------

def test_aggregate_reads_only_complete_runs_never_a_temporary_file(tmp_path):
    from medcert_core.study.runs import store

    rows = pd.DataFrame({"image_id": ["a"], "class_id": [1], "dice": [0.5]})
    store.save_run(tmp_path, "done", rows, {"labels": np.zeros((1, 2, 2))}, {"x": 1})
    killed = store.run_folder(tmp_path, "killed")  # results written, killed before its metadata
    killed.mkdir(parents=True)
    rows.assign(dice=0.9).to_csv(killed / store.RESULTS, index=False)
    (killed / ".metadata.json.k2j3.tmp").write_text('{"hash": "kil')  # a write cut short
    (store.run_folder(tmp_path, "done") / ".results.csv.x8a1.tmp").write_text("image_id,cla")
    aggregated = store.aggregate(tmp_path)
    assert aggregated["run"].tolist() == ["done"] and aggregated["dice"].tolist() == [0.5]
    assert not store.is_complete(tmp_path, "killed")


def test_a_stale_running_notebook_is_replaced_not_read(tmp_path, monkeypatch):
    import nbformat
    import papermill

    from medcert_core.study.grid.local import execute, is_done
    from medcert_core.study.grid.spec import GridEntry

    entry = GridEntry("phantom", "phantom", {"n": 100})
    notebooks, book, results = tmp_path / "notebooks", tmp_path / "book", tmp_path / "results"
    notebooks.mkdir()
    (notebooks / "phantom.ipynb").write_text("{}")
    book.mkdir()
    stale = book / ".phantom.running.ipynb"
    stale.write_text('{"cells": [{"cell_type": "code", "sou')  # killed while papermill saved it

    def fake_papermill(source, target, **kwargs):
        assert not Path(target).exists(), "the stale copy must be gone before the notebook runs"
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("fresh")])
        notebook.metadata["papermill"] = {}
        nbformat.write(notebook, target)

    monkeypatch.setattr(papermill, "execute_notebook", fake_papermill)
    output = execute(entry, notebooks_dir=notebooks, book_dir=book, results_dir=results, cwd=tmp_path)
    assert nbformat.read(output, as_version=4).cells[0].source == "fresh"
    assert not stale.exists() and is_done(entry, book, results)


def test_a_segmenter_without_its_marker_is_resumed_or_retrained_never_read_as_finished(tmp_path, monkeypatch):
    import torch

    from medcert_core.study.runs import assets

    data, training = DataSpec("phantom", None, 32, 0), TrainingSpec(epochs=3)
    path = assets.segmenter_path(tmp_path, data, training, "unet", 0.0)
    path.parent.mkdir(parents=True)
    calls = []

    def fake_train(*args, checkpoint, **kwargs):
        calls.append(torch.load(checkpoint, weights_only=True)["epoch"] if Path(checkpoint).exists() else None)
        torch.save({"config": {"epochs": 3}, "epoch": 3}, checkpoint)
        return "model", "config", None

    monkeypatch.setattr(assets, "train_segmenter", fake_train)
    torch.save({"config": {"epochs": 3}, "epoch": 1}, path)  # killed after epoch 1 of 3: no marker
    assert assets.segmenter(tmp_path, data, training, "unet") == ("model", "config")
    assert assets.marker_path(path).is_file(), "marked complete once trained"
    assets.marker_path(path).unlink()  # killed before its marker, and the file emptied by a power loss
    path.write_bytes(b"PK\x03\x04")
    with pytest.warns(UserWarning, match="unreadable segmenter checkpoint"):
        assets.segmenter(tmp_path, data, training, "unet")
    assert calls == [1, None], "resumed from epoch 1, then (unreadable, no marker) trained from scratch"
    assert assets.marker_path(path).is_file()


def test_a_segmenter_with_its_marker_is_never_deleted_nor_retrained(tmp_path, monkeypatch):
    import torch

    from medcert_core.study.runs import assets

    data, training = DataSpec("phantom", None, 32, 0), TrainingSpec(epochs=1)
    path = assets.segmenter_path(tmp_path, data, training, "unet", 0.0)
    trained = []

    def fake_train(*args, checkpoint, **kwargs):
        trained.append(checkpoint)
        torch.save({"config": {"epochs": 1}, "epoch": 1}, checkpoint)
        return "model", "config", None

    monkeypatch.setattr(assets, "train_segmenter", fake_train)
    assets.segmenter(tmp_path, data, training, "unet")
    body = path.read_bytes()
    corrupt = body[: len(body) // 2] + bytes(len(body) - len(body) // 2)  # same size, second half zeroed
    path.write_bytes(corrupt)
    with pytest.raises(ValueError, match=f"{path.name}.*does not match its completion marker"):
        assets.segmenter(tmp_path, data, training, "unet")
    assert path.read_bytes() == corrupt and assets.marker_path(path).is_file(), "kept, for a person to look at"

    path.write_bytes(b"not a checkpoint")  # a body its marker describes that does not load
    assets.mark_complete(path)
    with pytest.raises(ValueError, match=f"cached segmenter {path}.*does not load"):
        assets.segmenter(tmp_path, data, training, "unet")
    assert path.read_bytes() == b"not a checkpoint"
    assert trained == [path], "a model with its marker is never trained again"


def test_a_denoiser_folder_is_complete_only_with_its_marker(tmp_path, monkeypatch):
    from medcert_core.study.runs import assets

    data, training = DataSpec("phantom", None, 32, 0), TrainingSpec(ddpm_steps=2)
    trained = []

    def fake_train_ddpm(train_set, folder, **kwargs):
        trained.append(folder)
        (folder / "unet").mkdir(parents=True, exist_ok=True)
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
        (folder / "model_index.json").write_text("{}")
        return folder

    monkeypatch.setattr(assets, "train_ddpm", fake_train_ddpm)
    folder = assets.ddpm_folder(tmp_path, data, training)
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")  # looks finished, no marker, does not load
    with pytest.warns(UserWarning, match="unloadable denoiser"):
        assert assets.resolve_denoiser_spec("ddpm:auto", 0.5, tmp_path, data, training, "cpu") == f"ddpm:{folder}"
    assert trained == [folder] and assets.marker_path(folder).is_file()

    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"changed")
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors does not match its completion marker"):
        assets.resolve_denoiser_spec("ddpm:auto", 0.5, tmp_path, data, training, "cpu")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == b"changed"
    assert trained == [folder], "kept and not trained again"


def test_a_run_completed_meanwhile_by_another_process_keeps_its_record(tmp_path, monkeypatch):
    from medcert_core.study.runs import run as runs
    from medcert_core.study.runs import store
    from medcert_core.study.settings import DataSpec, TrainingSpec

    run = runs.CertificationRun(DataSpec("phantom", None, 32, 0), TrainingSpec(epochs=1), "unet", runs.plain(), 0.0)
    first = pd.DataFrame({"image_id": ["a"], "class_id": [1], "dice": [0.5]})
    metadata = store.run_folder(tmp_path, run.hash) / store.METADATA
    recorded = []

    def compute_while_another_finishes(*args, **kwargs):
        store.save_run(tmp_path, run.hash, first, {"labels": np.zeros((1, 2, 2))}, run.parameters())
        recorded.append((metadata.stat().st_mtime_ns, metadata.read_bytes()))
        return first.assign(dice=0.7), {"labels": np.ones((1, 2, 2))}

    monkeypatch.setattr(runs, "compute", compute_while_another_finishes)
    rows = runs.run_certification(run, results_dir=tmp_path, cache=tmp_path / "cache", device="cpu")
    assert rows["dice"].tolist() == [0.5], "the stored rows are returned"
    assert store.load_maps(tmp_path, run.hash)["labels"].sum() == 0, "the first record was not overwritten"
    assert [(metadata.stat().st_mtime_ns, metadata.read_bytes())] == recorded
