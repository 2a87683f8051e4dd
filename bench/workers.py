"""Run bench jobs each in its own process, a few at a time, each writing its JSON record.

Shared by the benches whose models train at a CPU-second budget (bench/baselines.py,
bench/ablations.py): one process per model keeps each one's ``time.process_time`` its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def run_jobs(jobs: dict[str, list[str]], work: Path, parallel: int,
             reuse: bool) -> tuple[dict[str, dict], list[str]]:
    """Run each job's command (``name → argv``; it must write ``work/<name>.json``), at most
    ``parallel`` at a time, its output in ``work/<name>.log``. With ``reuse``, a job whose
    record is already in ``work`` is not rerun. Returns the records by name (a failed job's:
    ``{"error": …}``) and the names run."""
    work.mkdir(parents=True, exist_ok=True)
    pending = [n for n in jobs if not (reuse and (work / f"{n}.json").exists())]
    records = {n: json.loads((work / f"{n}.json").read_text()) for n in jobs if n not in pending}
    ran, running = list(pending), []
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            (work / f"{name}.json").unlink(missing_ok=True)
            log = open(work / f"{name}.log", "w")
            running.append((name, subprocess.Popen(jobs[name], stdout=log,
                                                   stderr=subprocess.STDOUT), log))
        for item in list(running):
            name, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            path = work / f"{name}.json"
            records[name] = (json.loads(path.read_text())
                             if proc.returncode == 0 and path.exists() else
                             {"error": f"worker exited with {proc.returncode}"
                                       + " without its record" * (proc.returncode == 0)
                                       + f": see {work}/{name}.log"})
            print(f"{name}: done ({proc.returncode})", flush=True)
        time.sleep(2)
    return records, ran


def budget_arguments(ap: argparse.ArgumentParser, bench: str, unit: str) -> None:
    """The arguments of a bench that trains at a CPU budget: its data sets, the budget,
    where the per-``unit`` records go (``out/<bench>_bench``), ``--reuse``, and the record and
    plot (``bench/results/<bench>.json``/``.png``)."""
    ap.add_argument("--train", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--budget-cpu-s", type=float, default=300.0)
    ap.add_argument("--work", default=f"out/{bench}_bench", help=f"per-{unit} records and logs")
    ap.add_argument("--reuse", action="store_true",
                    help=f"keep the per-{unit} records already in --work (run the others)")
    ap.add_argument("--json", default=str(RESULTS / f"{bench}.json"))
    ap.add_argument("--plot", default=str(RESULTS / f"{bench}.png"))


def budget_record(args: argparse.Namespace, unit: str, started: float) -> dict:
    """The provenance of a budgeted bench's record: command, date, machine, budget, wall
    time since ``started`` (``time.perf_counter``) and data sets."""
    env = os.environ.get("PYTHONPATH", "").replace(str(ROOT), "$PWD")
    exe = os.path.relpath(sys.executable, ROOT)
    return {"command": " ".join([f"PYTHONPATH={env}"] * bool(env) + [exe, *sys.argv]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores (shared), one thread per "
                       f"{unit}",
            "budget": f"CPU seconds of each {unit}'s process (time.process_time), validation "
                      "included",
            "budget_cpu_s": args.budget_cpu_s, "wall_s": time.perf_counter() - started,
            "data": {"train": args.train, "calibration": args.calibration, "test": args.test}}
