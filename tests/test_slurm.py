"""Grids on SLURM through submitit, against a real single-node cluster on this machine.

The cluster is brought up by ``scripts/slurm_cluster.sh start`` (Debian's slurmctld, slurmd,
slurm-client and munge; installed by the script or by ``.ci/run`` when missing) in a temporary
state folder on free ports, and torn down by ``stop`` (which ends only the daemons it started) when
the module's tests are done. The slow tests:

- the smoke grid with ``--executor slurm`` (its two chapters as two concurrent jobs, each needing
  the same untrained models) gives the tidy results of a ``local`` run, bit for bit but the timing
  column; each model was trained once; a second call submits nothing; ``pytest -s`` prints both
  wall times;
- two jobs that need the same uncached segmenter at the same moment: one trains it, the other
  waits for its lock and loads it;
- ``--no-wait`` returns at once; a failing chapter's job is reported with its log path.

The fast tests check the options (command line and the grid file's ``executor:`` section).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medcert_core.__main__ import main
from medcert_core.study.grid.spec import (
    SlurmOptions,
    check_executor_section,
    parse_grid,
    slurm_options,
)
from medcert_core.study.settings import DataSpec

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
GRID = "grids/smoke.yaml"
TIMEOUT = 600


# --- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("section, message", [
    ({"gpus": 1}, "executor: unknown option 'gpus'; valid: ['partition', 'gpus_per_job', 'cpus_per_job',"),
    ({"cpus_per_job": 0}, "executor: 'cpus_per_job' must be an integer >= 1, got 0"),
    ({"time_min": "2h"}, "executor: 'time_min' must be an integer number of minutes >= 1, got '2h'"),
    ({"mem_gb": -4}, "executor: 'mem_gb' must be a number of GB > 0, got -4"),
    ({"sbatch": {"--account": "x"}}, "sbatch' option names are sbatch's long options without dashes"),
    ("slurm", "'executor:' must be a mapping of SLURM options"),
])
def test_a_bad_executor_section_is_refused_before_anything_runs(section, message):
    with pytest.raises(ValueError) as info:
        parse_grid({"runs": [{"notebook": "phantom"}], "executor": section}, "grid.yaml", REPO / "notebooks")
    assert str(info.value).startswith("grid.yaml: ") and message in str(info.value)


def test_command_line_options_override_the_grid_file():
    options = slurm_options({"partition": "cpu", "cpus_per_job": 4, "sbatch": {"account": "lab"}},
                            {"partition": "gpu", "gpus_per_job": 1, "mem_gb": None, "sbatch": {"qos": "high"}})
    assert options == SlurmOptions(partition="gpu", gpus_per_job=1, cpus_per_job=4,
                                   sbatch={"account": "lab", "qos": "high"})
    assert options.submitit_parameters() == {
        "timeout_min": 1440, "cpus_per_task": 4, "tasks_per_node": 1, "nodes": 1, "slurm_partition": "gpu",
        "gpus_per_node": 1, "slurm_additional_parameters": {"account": "lab", "qos": "high"}}
    check_executor_section(None)  # no section: nothing to refuse


@pytest.mark.parametrize("argv, message", [
    (["--partition", "gpu"], "SLURM options (partition) need --executor slurm"),
    (["--no-wait"], "--no-wait needs --executor slurm"),
    (["--executor", "slurm", "--gpus-per-job", "-1"], "argument --gpus-per-job: must be an integer >= 0, got '-1'"),
    (["--executor", "slurm", "--sbatch=--qos=high"], "argument --sbatch: an sbatch option is KEY=VALUE"),
    (["--executor", "pbs"], "argument --executor: invalid choice: 'pbs'"),
])
def test_bad_executor_options_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as info:
        main(["grid", GRID, *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_grid_and_study_refuse_to_run_under_torchrun(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as info:
        main(["grid", GRID])
    assert info.value.code == 2
    assert "certify-runs" in capsys.readouterr().err


# --- a real cluster --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A single-node cluster for this module's tests: SLURM_CONF set while they run, stopped afterwards."""
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "MEDCERT_SLURM_DIR": str(state), "MEDCERT_SLURMCTLD_PORT": str(free_port()),
           "MEDCERT_SLURMD_PORT": str(free_port())}
    started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900)
    assert started.returncode == 0, f"the cluster did not start:\n{started.stderr[-3000:]}"
    assert f"export SLURM_CONF={state / 'slurm.conf'}" in started.stdout
    pids = {line.split()[0]: int(line.split()[1]) for line in (state / "pids").read_text().splitlines()}
    assert {"slurmctld", "slurmd"} <= set(pids) and all(alive(pid) for pid in pids.values())
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        stopped = subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert not any(alive(pid) for pid in pids.values()), "stop ends every daemon start started"
        assert not (state / "pids").exists()


def project_copy(root: Path, executor_section: dict | None = None) -> Path:
    """notebooks/, the smoke grid (with an ``executor:`` section), the book's config: a project of its own."""
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    (root / "grids").mkdir()
    spec = yaml.safe_load((REPO / GRID).read_text())
    if executor_section:
        spec["executor"] = executor_section
    (root / GRID).write_text(yaml.safe_dump(spec, sort_keys=False))
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, root / name)
    (root / "book").mkdir()
    return root


def medcert(root: Path, *argv: str, timeout: float = TIMEOUT) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m medcert_core ARGV`` in ``root`` with one thread per process (as each 1-CPU job has) and a
    model cache of its own (``root/runs/cache``, passed on to its SLURM jobs): two project copies share nothing."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "MEDCERT_CACHE": str(root / "runs" / "cache")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medcert_core", *argv], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done, time.perf_counter() - start


def tidy(root: Path) -> pd.DataFrame:
    frame = pd.read_csv(root / "runs" / "results" / "aggregate.csv").drop(columns=["seconds"])
    return frame.sort_values(["run", "image_id", "class_id"], ignore_index=True)


def trainings(text: str) -> list[str]:
    """The models a log says were trained: '[medcert] training <kind> <name> (host, pid)'."""
    return re.findall(r"\[medcert\] training (.+?) \(host", text)


@pytest.mark.slow
def test_the_smoke_grid_on_slurm_equals_a_local_run(slurm_cluster, tmp_path):
    local = project_copy(tmp_path / "local")
    on_slurm = project_copy(tmp_path / "slurm", {"cpus_per_job": 1, "time_min": 30, "poll_s": 1})

    local_done, local_seconds = medcert(local, "grid", GRID)
    assert local_done.returncode == 0, local_done.stderr[-3000:]
    done, slurm_seconds = medcert(on_slurm, "grid", GRID, "--executor", "slurm")
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"\nsmoke grid wall time: local {local_seconds:.1f} s, slurm (2 jobs of 1 CPU) {slurm_seconds:.1f} s")

    # the same numbers: every run, every image x class, every column but the timing
    pd.testing.assert_frame_equal(tidy(on_slurm), tidy(local))
    assert len(tidy(local)) == 24 and tidy(local)["run"].nunique() == 6
    for name in ("phantom", "segcertify_vs_ours"):
        hashes = [json.loads((root / "book" / f"{name}.ipynb").read_text())["metadata"]["medcert"]["parameters_hash"]
                  for root in (local, on_slurm)]
        assert hashes[0] == hashes[1]
    assert (json.loads((on_slurm / "runs/results/grid_state.json").read_text())
            == json.loads((local / "runs/results/grid_state.json").read_text()))

    # two jobs, one log each; the chapters' shared models were trained once, by one job or the other
    record = json.loads((on_slurm / "runs/results/slurm_jobs.json").read_text())
    assert sorted(record) == ["phantom", "segcertify_vs_ours"]
    logs = [Path(job["log"]).read_text() for job in record.values()]
    assert all(f"job {job['job_id']} on " in log for job, log in zip(record.values(), logs))
    trained = [model for log in logs for model in trainings(log)]
    assert len(trained) == len(set(trained)) == 3, f"two segmenters and the DDPM, each once: {trained}"
    assert sorted(trained) == sorted(trainings(local_done.stderr)), "the models a local run trains"
    assert not list(Path("/tmp").glob(f"medcert-jupyter-{next(iter(record.values()))['job_id']}")), \
        "the job's Jupyter runtime folder is removed"
    kernel = json.loads((Path(sys.prefix) / "share/jupyter/kernels/medcert/kernel.json").read_text())
    assert kernel["argv"][0] == sys.executable

    # done is done: a second call submits nothing
    again, _ = medcert(on_slurm, "grid", GRID, "--executor", "slurm")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already executed with these parameters") == 2 and "submitted job" not in again.stdout
    assert "slurm jobs" not in again.stderr, "no progress bar when there is nothing to wait for"
    assert json.loads((on_slurm / "runs/results/slurm_jobs.json").read_text()) == record


def train_segmenter_job(cache: str, barrier: str, number: int) -> dict:
    """A SLURM job needing the smoke profile's UNet: waits until both jobs have started, then asks for it."""
    import torch

    from medcert_core.study.runs import assets
    from medcert_core.study.settings import training_spec

    Path(barrier, f"started-{number}").touch()
    deadline = time.monotonic() + 120
    while len(list(Path(barrier).glob("started-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    torch.set_num_threads(1)
    model, _ = assets.segmenter(Path(cache), DataSpec("phantom", None, 32, 0), training_spec("smoke"), "unet",
                                0.0, device="cpu")
    weights = b"".join(tensor.numpy().tobytes() for tensor in model.state_dict().values())
    return {"pid": os.getpid(), "weights": hashlib.sha256(weights).hexdigest()}


@pytest.mark.slow
def test_two_jobs_needing_one_uncached_model_train_it_once(slurm_cluster, tmp_path):
    import cloudpickle
    import submitit

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the nodes cannot import this test module
    logger = logging.getLogger("submitit")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "Bypassing sacct error": this cluster keeps no accounting
    try:
        executor = submitit.AutoExecutor(folder=tmp_path / "logs" / "%j", cluster="slurm")
        executor.update_parameters(name="medcert-test-lock", cpus_per_task=1, timeout_min=10)
        (tmp_path / "barrier").mkdir()
        jobs = [executor.submit(train_segmenter_job, str(tmp_path / "cache"), str(tmp_path / "barrier"), number)
                for number in range(2)]
        results = [job.result() for job in jobs]
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        logger.setLevel(level)
    logs = [Path(job.paths.stderr).read_text() for job in jobs]
    assert sum(len(trainings(log)) for log in logs) == 1, "trained once"
    assert sum(log.count("[medcert] waiting for segmenter") for log in logs) == 1, "the other job waited"
    assert results[0]["pid"] != results[1]["pid"] and results[0]["weights"] == results[1]["weights"]
    assert len(list((tmp_path / "cache" / "segmenters").glob("*.pt"))) == 1


@pytest.mark.slow
def test_no_wait_returns_at_once_and_a_failed_job_is_reported_with_its_log(slurm_cluster, tmp_path):
    root = project_copy(tmp_path / "project")
    (root / "grids" / "broken.yaml").write_text(yaml.safe_dump({
        "parameters": {"profile": "smoke", "image_size": 32, "test_images": 1},
        "runs": [{"notebook": "jsrt", "parameters": {"data_root": "nowhere/jsrt"}}],
        "executor": {"poll_s": 1, "time_min": 10},
    }))
    submitted, seconds = medcert(root, "grid", "grids/broken.yaml", "--executor", "slurm", "--no-wait")
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert seconds < 30 and "pending (SLURM):\n  jsrt" in submitted.stdout
    job = json.loads((root / "runs/results/slurm_jobs.json").read_text())["jsrt"]

    collected, _ = medcert(root, "grid", "grids/broken.yaml", "--executor", "slurm")
    assert collected.returncode == 2
    error = collected.stderr.split("medcert: error: ", 1)[1]
    assert error.startswith("1 of 1 SLURM jobs failed:\n  jsrt (job ")
    assert "FileNotFoundError" in error and "jsrt: folder not found" in error
    log = Path(re.search(r"log: (\S+)", error).group(1))
    assert log.is_file() and "FileNotFoundError" in log.read_text()
    assert log.parent.parent == root / "runs" / "slurm"
    assert not (root / "book" / "jsrt.ipynb").exists(), "a failed chapter never reaches the book"
    # the job submitted without waiting was collected (still queued) or found ended without the chapter
    assert (f"job {job['job_id']} is still" in collected.stdout
            or f"earlier job {job['job_id']} did not finish it" in collected.stdout)
