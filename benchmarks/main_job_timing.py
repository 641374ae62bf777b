"""The main job as a new user meets it: clone the repository, run the README's command (``./run.sh``),
and write how long each phase took to ``benchmarks/results/main_job_timing.json``.

Phases: the install (until run.sh's install stamp is written), the models trained before the chapters
(``study.warm``: its "models trained in" line, part of the grid), each model trained (from the job's
"[medcert] training" line to the model's completion marker in the model cache, an empty folder given
as $MEDCERT_CACHE), each chapter of the
quick grid (papermill's own start time and duration in the executed notebook), the grid as a whole and
the website (the job's own lines). The load average before the start is recorded: timings taken while other work runs say little.

    python benchmarks/main_job_timing.py                 # clones HEAD of this checkout into a temporary folder
    python benchmarks/main_job_timing.py --keep DIR      # ... into DIR, kept afterwards
    python benchmarks/main_job_timing.py --out benchmarks/results/main_job_timing_without_bf16.json  # another CPU

The machine (CPU model, its native bf16 flags, cores) is recorded by the package's own
``devices.machine_record``, run in the clone's environment once the job has installed it: what
``precision: auto`` resolves to depends on those flags, so a time is only compared with one of the same CPU.

The package cache of pip is whatever this machine has (a warm cache: about 2 minutes of install).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "main_job_timing.json"
TRAINED = re.compile(r"\[medcert\] training (\w[\w ]*?) (\S+) \(host")
GRID_DONE = re.compile(r"\[medcert\] grid (\S+) done in (\d+) s")
WEBSITE = re.compile(r"\[medcert\] website built in (\d+) s")
WARM_UP = re.compile(r"\[medcert\] (\d+) models trained in (\d+) s")


def run_logged(command: list[str], cwd: Path, log: Path, env: dict[str, str]) -> tuple[float, list[tuple[float, str]]]:
    """Run ``command`` with ``env`` added to the environment; every output line with the seconds since the
    start. Returns (seconds, lines)."""
    start = time.perf_counter()
    lines = []
    with subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env}) as process, open(log, "w") as handle:
        for line in process.stdout:
            elapsed = time.perf_counter() - start
            handle.write(f"{elapsed:8.1f} {line}")
            lines.append((elapsed, line.rstrip()))
        process.wait()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}; see {log}")
    return time.perf_counter() - start, lines


def chapter_phases(book: Path, since: float) -> list[dict]:
    """Per chapter executed after ``since`` (epoch seconds; the clone also holds chapters executed
    elsewhere, committed): papermill's start time and duration, in the order they ran."""
    chapters = []
    for path in sorted(book.glob("*.ipynb")):
        papermill = json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
        start = papermill.get("start_time")
        if papermill.get("duration") and start and datetime.datetime.fromisoformat(start).timestamp() >= since:
            chapters.append({"chapter": path.stem, "seconds": round(papermill["duration"], 1),
                             "start": papermill.get("start_time")})
    return sorted(chapters, key=lambda chapter: chapter["start"] or "")


def model_phases(lines: list[tuple[float, str]], cache: Path, start_wall: float) -> list[dict]:
    """Per model trained (its "[medcert] training" line): from that line to its ``.complete`` marker."""
    models = []
    for elapsed, line in lines:
        for kind, name in TRAINED.findall(line):
            markers = list(cache.glob(f"*/{name}.complete"))
            end = markers[0].stat().st_mtime - start_wall if markers else None
            models.append({"model": f"{kind} {name}", "seconds": None if end is None else round(end - elapsed, 1)})
    return models


def machine_of(clone: Path) -> dict:
    """``medcert_core.devices.machine_record()`` as the clone's own environment reports it."""
    code = "import json; from medcert_core.devices import machine_record; print(json.dumps(machine_record()))"
    output = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c", code], cwd=clone, capture_output=True,
                            text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=None, help="clone into this folder and keep it")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the JSON to write (default {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args()
    load_before = os.getloadavg()
    work = args.keep or Path(tempfile.mkdtemp(prefix="medcert_main_job_"))
    clone = work / "medcert"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    start_wall = time.time()
    cache = work / "model_cache"  # empty, as on a fresh machine (the user's own cache is left alone)
    seconds, lines = run_logged(["./run.sh"], clone, work / "main_job.log", {"MEDCERT_CACHE": str(cache)})
    stamps = sorted((clone / ".venv").glob(".installed-*"))
    install = stamps[0].stat().st_mtime - start_wall if stamps else None
    grid = next((float(match.group(2)) for _, line in lines if (match := GRID_DONE.search(line))), None)
    website = next((float(match.group(1)) for _, line in lines if (match := WEBSITE.search(line))), None)
    warm_up = next((float(match.group(2)) for _, line in lines if (match := WARM_UP.search(line))), None)
    result = {
        "what": "./run.sh (the README's main job: the quick study on the embedded phantoms, ending in the website) "
                "from a fresh clone, install included",
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit.strip(),
        "machine": machine_of(clone), "python": sys.version.split()[0],
        "load_average_before": [round(value, 2) for value in load_before],
        "seconds": {"total": round(seconds, 1), "install": None if install is None else round(install, 1),
                    "grid": grid, "of_which_models_trained_before_the_chapters": warm_up, "website": website},
        "models_trained": model_phases(lines, cache, start_wall),
        "chapters": chapter_phases(clone / "book", start_wall),
        "log": "each output line with its time is in main_job.log next to the clone (not committed)",
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["seconds"]), f"-> {args.out}")


if __name__ == "__main__":
    main()
