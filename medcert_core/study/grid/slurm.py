"""Where a grid's notebooks run: here, one after another (``local``, the default), or on a SLURM
cluster (``slurm``), one job per grid entry, submitted through ``submitit``.

    medcert grid grids/paper.yaml --executor slurm --partition gpu --gpus-per-job 1 --cpus-per-job 8 \\
        --mem-gb 64 --time-min 720 --sbatch account=mylab

The same options may sit in the grid file (the command line wins)::

    executor:
      partition: gpu
      gpus_per_job: 1
      cpus_per_job: 8
      mem_gb: 64
      time_min: 720
      sbatch: {account: mylab, qos: normal}   # any further sbatch option: --account=mylab ...
      log_dir: runs/slurm                    # one folder per job: <log_dir>/<job id>/
      kernel_start_timeout: 600              # seconds papermill waits for a notebook's kernel

Entries already executed with the same hash are skipped, as locally. The others are submitted,
each job executing its notebook with papermill on a node; the command then waits with a progress
bar over the jobs (or, with ``--no-wait``, returns at once: a later call skips what finished,
waits for jobs still queued or running instead of submitting them again, and submits again what
failed). The submitted jobs are recorded in ``<results>/slurm_jobs.json``.

Designed against papermill's pitfalls on cluster nodes:

- the kernel: the project's interpreter is registered as the Jupyter kernel ``medcert`` inside
  its own environment (``<venv>/share/jupyter/kernels/medcert``; in ``<log_dir>/jupyter`` when the
  environment is read-only), put first on the job's ``JUPYTER_PATH`` and named to papermill, so a
  node never starts another Python's ``python3``;
- slow kernel starts on busy nodes: papermill waits ``kernel_start_timeout`` (600 s) for it;
- several kernels on one node: each job has its own runtime folder on node-local disk
  (``$TMPDIR/medcert-jupyter-<job id>``, ``JUPYTER_RUNTIME_DIR``) and its kernel talks over IPC
  sockets in that folder instead of TCP ports, so neither ports nor connection files can collide;
- threads: a job's kernel uses the CPUs SLURM gave it (``OMP_NUM_THREADS`` from
  ``SLURM_CPUS_PER_TASK`` unless set);
- success: an output notebook that exists proves nothing; an entry counts as done only when
  papermill returned without an error, the job returned its result, and the grid state records
  the entry's hash (written after the chapter, see ``grid.execute``). A job that vanishes from
  the queue without a result (killed, out of memory, past its time limit) is reported as failed.

Each failed job is reported with the path of its log. The jobs' Python is the one running this
command; the project, its environment and the results store must be on a file system the nodes
share (as usual with submitit).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medcert_core.devices import local_timestamp
from medcert_core.errors import NotebookFailed
from medcert_core.io import file_lock, write_json_atomically
from medcert_core.study.grid.local import execute, is_done
from medcert_core.study.grid.spec import OPTION_NAMES, GridEntry, SlurmOptions, check_executor_section, check_one_line

KERNEL_NAME = "medcert"
JOBS = "slurm_jobs.json"  # in the results store: the job of each submitted entry
JOBS_LOCK = "locks/slurm_jobs.lock"
VANISHED_GRACE_S = 30.0  # a job gone from the queue this long without a result file has failed


def check_submission(entries: list[GridEntry], options: SlurmOptions, log_dir: Path) -> None:
    """ValueError unless these jobs can be submitted safely (an option, a job name, an output name or the
    log folder holding a control character). Checked before anything is submitted."""
    check_executor_section({name: getattr(options, name) for name in OPTION_NAMES})
    check_one_line(f"the log folder {log_dir}", str(log_dir))
    for entry in entries:
        check_one_line(f"the output name of grid entry {entry.notebook!r}", entry.output)
        check_one_line(f"the job name of grid entry {entry.notebook!r}", job_name(entry))


def job_name(entry: GridEntry) -> str:
    """The SLURM job name of a grid entry."""
    return f"medcert-{entry.output}"[:120]


def kernels_root() -> Path:
    """Where this environment's kernel specs live (``<sys.prefix>/share/jupyter``)."""
    return Path(sys.prefix) / "share" / "jupyter"


def ensure_kernel(fallback: Path | None = None) -> Path:
    """Register this interpreter as the Jupyter kernel ``medcert`` (once; again when it names another
    interpreter) in its environment's ``share/jupyter``, or in ``fallback`` when the environment is
    read-only; returns that Jupyter data folder (for the jobs' ``JUPYTER_PATH``)."""
    for root in (kernels_root(), fallback):
        if root is None:
            continue
        spec = root / "kernels" / KERNEL_NAME / "kernel.json"
        if _names_this_python(spec):
            return root
        try:
            with file_lock(root / "kernels" / f".{KERNEL_NAME}.lock", "the kernel registration"):
                if not _names_this_python(spec):
                    _install_kernel(root)
            return root
        except OSError:  # a read-only environment: try the fallback
            continue
    raise OSError(f"cannot register the Jupyter kernel {KERNEL_NAME!r} in {kernels_root()} or {fallback}")


def _names_this_python(spec: Path) -> bool:
    try:
        return json.loads(spec.read_text())["argv"][0] == sys.executable
    except (OSError, ValueError, KeyError, IndexError):
        return False


def _install_kernel(root: Path) -> None:
    """ipykernel's own kernel spec for this interpreter, written to ``root/kernels/medcert``."""
    from ipykernel.kernelspec import install

    if root == kernels_root():
        install(kernel_name=KERNEL_NAME, display_name="Python (medcert)", prefix=sys.prefix)
        return
    from ipykernel.kernelspec import write_kernel_spec

    target = root / "kernels" / KERNEL_NAME
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_kernel_spec(str(target), overrides={"display_name": "Python (medcert)"})


def _ipc_kernel_manager() -> type:
    """A kernel manager whose kernel talks over IPC sockets in ``JUPYTER_RUNTIME_DIR`` (no TCP ports)."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", str(Path(jupyter_runtime_dir()) / f"kernel-{uuid.uuid4().hex[:12]}"))
            super().__init__(**kwargs)

    return IPCKernelManager


def run_entry_job(entry: GridEntry, *, notebooks_dir: Path, book_dir: Path, results_dir: Path, cwd: Path,
                  jupyter_path: Path | None = None, start_timeout: float = 600.0) -> dict[str, Any]:
    """What a SLURM job runs: execute one grid entry with papermill, in a node-local Jupyter runtime
    folder, on the kernel ``medcert`` registered in ``jupyter_path`` (:func:`ensure_kernel`); raises
    unless the entry is then recorded as done."""
    job = os.environ.get("SLURM_JOB_ID") or f"pid{os.getpid()}"
    runtime = Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / f"medcert-jupyter-{job}"
    runtime.mkdir(parents=True, exist_ok=True)
    os.environ["JUPYTER_RUNTIME_DIR"] = str(runtime)
    jupyter_path = jupyter_path or kernels_root()
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(jupyter_path), os.environ.get("JUPYTER_PATH")]))
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(variable, cpus)
    start = time.perf_counter()
    print(f"[medcert] job {job} on {socket.gethostname()}: executing {entry.output} ({entry.notebook}.ipynb)",
          file=sys.stderr, flush=True)
    try:
        output = execute(entry, notebooks_dir=notebooks_dir, book_dir=book_dir, results_dir=results_dir, cwd=cwd,
                         progress=False, kernel_name=KERNEL_NAME, start_timeout=start_timeout,
                         kernel_manager_class=_ipc_kernel_manager())
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    if not is_done(entry, book_dir, results_dir):
        raise RuntimeError(f"{entry.output}: papermill finished, but the book and the grid state do not record "
                           f"the entry as executed with hash {entry.hash}")
    seconds = time.perf_counter() - start
    print(f"[medcert] job {job}: {entry.output} done in {seconds:.0f} s -> {output}", file=sys.stderr, flush=True)
    return {"output": str(output), "hash": entry.hash, "host": socket.gethostname(), "job": job, "seconds": seconds}


@dataclass
class JobOutcome:
    entry: GridEntry
    job_id: str
    log: Path
    error: str | None = None  # None: succeeded


@dataclass
class SlurmReport:
    """What a SLURM grid call saw: entries skipped (already done), succeeded, failed, still pending."""

    skipped: list[GridEntry] = field(default_factory=list)
    succeeded: list[JobOutcome] = field(default_factory=list)
    failed: list[JobOutcome] = field(default_factory=list)
    pending: list[JobOutcome] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failed and not self.pending


def queued_jobs() -> dict[str, str] | None:
    """{job id: state} of this user's jobs in the SLURM queue; None when squeue does not answer."""
    try:
        listing = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T"], capture_output=True,
                                 text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listing.returncode != 0:
        return None
    return dict(line.split("|", 1) for line in listing.stdout.split() if "|" in line)


def _jobs_record(results_dir: Path) -> dict[str, dict[str, Any]]:
    path = results_dir / JOBS
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _record_jobs(results_dir: Path, submitted: dict[str, dict[str, Any]]) -> None:
    with file_lock(results_dir / JOBS_LOCK, "the SLURM job record"):
        record = _jobs_record(results_dir)
        record.update(submitted)
        write_json_atomically(record, results_dir / JOBS)


def _state_of(job: Any) -> str:
    """The job's state as sacct knows it ("UNKNOWN" without accounting), without submitit's warnings."""
    import logging

    logger = logging.getLogger("submitit")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return str(job.get_info(mode="force").get("State") or "UNKNOWN")
    except Exception:  # sacct missing or failing
        return "UNKNOWN"
    finally:
        logger.setLevel(level)


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*: ")  # "medcert_core.errors.NotebookFailed: notebook jsrt failed ..."


def _outcome(job: Any) -> str | None:
    """None when the job returned its result; else why it failed: the job's last exception and its message
    (submitit's FailedJobError carries the job's traceback)."""
    try:
        job.result()
    except Exception as error:  # submitit.core.utils.FailedJobError (the job raised) and the like
        text = str(error).rsplit("\n----------------------\n", 1)[0]  # submitit's "check the logs" footer
        lines = [line for line in text.strip().splitlines() if line.strip()]
        starts = [number for number, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
        message = lines[starts[-1]:][:12] if starts else lines[-6:]
        return "\n    ".join(message) or type(error).__name__
    return None


def run_on_slurm(entries: list[GridEntry], *, notebooks_dir: Path, book_dir: Path, results_dir: Path, cwd: Path,
                 options: SlurmOptions, wait: bool = True, force: bool = False) -> SlurmReport:
    """Submit each entry not done as one SLURM job (reusing a job of the same entry and hash still in the
    queue), then wait for them (``wait``) with a progress bar; returns what happened to each."""
    import submitit

    log_dir = Path(options.log_dir) if Path(options.log_dir).is_absolute() else cwd / options.log_dir
    try:
        check_submission(entries, options, log_dir)
    except ValueError as problem:
        raise ValueError(f"nothing submitted: {problem}") from None
    jupyter_path = ensure_kernel(fallback=log_dir / "jupyter")
    report = SlurmReport()
    record = _jobs_record(results_dir)
    queue = queued_jobs() or {}
    executor = submitit.AutoExecutor(folder=log_dir / "%j", cluster="slurm")
    jobs: dict[str, tuple[GridEntry, Any]] = {}
    submitted: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if not force and is_done(entry, book_dir, results_dir):
            tqdm.write(f"skip {entry.output}: already executed with these parameters")
            report.skipped.append(entry)
            continue
        previous = record.get(entry.output)
        if previous and previous["hash"] == entry.hash and previous["job_id"] in queue and not force:
            job = submitit.SlurmJob(folder=previous["folder"], job_id=previous["job_id"])
            tqdm.write(f"{entry.output}: job {job.job_id} is still {queue[previous['job_id']].lower()}; waiting for it")
        else:
            if previous and previous["job_id"] not in queue:
                tqdm.write(f"{entry.output}: earlier job {previous['job_id']} did not finish it "
                           f"(log: {previous.get('log')}); submitting it again")
            executor.update_parameters(name=job_name(entry), **options.submitit_parameters())
            job = executor.submit(run_entry_job, entry, notebooks_dir=notebooks_dir, book_dir=book_dir,
                                  results_dir=results_dir, cwd=cwd, jupyter_path=jupyter_path,
                                  start_timeout=options.kernel_start_timeout)
            tqdm.write(f"{entry.output}: submitted job {job.job_id} (log: {job.paths.stderr})")
        jobs[entry.output] = (entry, job)
        submitted[entry.output] = {"job_id": str(job.job_id), "hash": entry.hash, "folder": str(job.paths.folder),
                                   "log": str(job.paths.stderr),
                                   "submitted": local_timestamp()}
    if submitted:
        _record_jobs(results_dir, submitted)
    if not wait:
        report.pending = [JobOutcome(entry, str(job.job_id), job.paths.stderr)
                          for entry, job in jobs.values()]
        return report
    if jobs:
        _wait(jobs, report, book_dir, results_dir, options.poll_s)
    return report


def _wait(jobs: dict[str, tuple[GridEntry, Any]], report: SlurmReport, book_dir: Path, results_dir: Path,
          poll_s: float) -> None:
    pending = dict(jobs)
    missing_since: dict[str, float] = {}
    bar = tqdm(total=len(jobs), desc="slurm jobs", unit="job")
    while pending:
        queue = queued_jobs()
        ended = 0
        for output, (entry, job) in list(pending.items()):
            job_id = str(job.job_id)
            log = job.paths.stderr
            if job.paths.result_pickle.exists():
                error = _outcome(job)
                if error is None and not is_done(entry, book_dir, results_dir):
                    error = "the job returned, but the grid state does not record the entry as executed"
            elif queue is not None and job_id not in queue:
                first = missing_since.setdefault(job_id, time.monotonic())
                if time.monotonic() - first < VANISHED_GRACE_S:  # the result file may still be on its way
                    continue
                error = f"the job left the queue without a result (SLURM state: {_state_of(job)})"
            else:
                continue
            outcome = JobOutcome(entry, job_id, log, error)
            (report.succeeded if error is None else report.failed).append(outcome)
            if error is not None:
                tqdm.write(f"FAILED {entry.output}: job {job_id}: {error}\n  log: {log}")
            del pending[output]
            ended += 1
        states = [queue.get(str(job.job_id), "?") for _, job in pending.values()] if queue is not None else []
        bar.set_postfix_str(", ".join(f"{states.count(state)} {state.lower()}" for state in sorted(set(states))),
                            refresh=False)
        bar.update(ended)
        if pending:
            time.sleep(poll_s)
    bar.close()


def failure_message(report: SlurmReport) -> str:
    """The error of a SLURM grid with failed jobs: each failed entry, its job and log."""
    lines = [f"{len(report.failed)} of {len(report.failed) + len(report.succeeded)} SLURM jobs failed:"]
    for outcome in report.failed:
        lines.append(f"  {outcome.entry.output} (job {outcome.job_id}): {outcome.error}\n    log: {outcome.log}")
    return "\n".join(lines)


def raise_on_failures(report: SlurmReport) -> None:
    if report.failed:
        raise NotebookFailed(failure_message(report))
