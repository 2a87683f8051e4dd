"""Run bench jobs each in its own process, a few at a time, each writing its JSON record.

Shared by the benches whose models train at a CPU-second budget (bench/baselines.py,
bench/ablations.py): one process per model keeps each one's ``time.process_time`` its own.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path


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
