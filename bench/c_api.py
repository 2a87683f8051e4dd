"""Benchmark of the C ABI: the cost of an evaluation called from C (libneuroscale.so, which runs
the Python Coupler in an embedded interpreter) against the same call from Python.

For batches of N points (operator only: the policy never falls back, so the fine solver does
not blur the call's cost) it measures the best of REPEATS

- ``ns_evaluate`` from a C host (bench/c_api_host.c, one MPI rank) and the Coupler's
  ``evaluate`` from Python (in this process), each as one call of N points and as N calls of
  one point (what a UMAT-style host calling point by point pays);

prints a table and writes ``bench/results/c_api.json``. ``python bench/c_api.py [--points 1 16
256 1024] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG = {"model": str(ROOT / "examples" / "models" / "fe2_composite.pt"),
          "fine": {"kind": "rve", "law": "neo_hookean", "matrix": {"E": 3.0, "nu": 0.35},
                   "fibre": {"E": 70.0, "nu": 0.2}},
          "policy": {"rtol": float("inf")},
          "microstructures": {"kind": "random_fibres", "volume_fraction": 0.3, "n_fibres": 3}}


def loads(n: int) -> np.ndarray:
    """The F̄ (n, 2, 2) of c_api_host.c."""
    F = np.zeros((n, 2, 2))
    F[:, 0, 0] = 1.0 + 0.01 * (np.arange(n) % 5)
    F[:, 0, 1], F[:, 1, 1] = 0.005, 0.99
    return F


def python_calls_s(config: Path, n: int, repeats: int) -> tuple[float, float]:
    """Best seconds of one ``evaluate`` of n points and of one one-point ``evaluate`` through
    the Python API, measured as c_api_host.c measures them (each repeat: the batch, then the n
    points one by one)."""
    from neuroscale_couple.capi.session import Session

    s = Session(config, MPI.COMM_SELF)
    ids = np.arange(n)
    s.register(ids, ids % 3)
    s.begin_step(0)
    F, batch, single = loads(n), np.inf, np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.evaluate(ids, F)
        t1 = time.perf_counter()
        for k in range(n):
            s.evaluate(ids[k:k + 1], F[k:k + 1])
        t2 = time.perf_counter()
        batch, single = min(batch, t1 - t0), min(single, (t2 - t1) / n)
    s.close()
    return batch, single


def main(argv: list[str] | None = None) -> None:
    from neuroscale_couple.capi.build import compile_host, ensure_library

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[1, 16, 256, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench_c_api")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = args.out / "coupler.yaml"
    config.write_text(json.dumps(CONFIG).replace("Infinity", ".inf"))  # JSON is YAML
    library = ensure_library()
    exe = compile_host([ROOT / "bench" / "c_api_host.c"], args.out / "c_api_host", library)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rows = []
    for n in args.points:
        c = json.loads(subprocess.run(
            [str(Path(sys.executable).parent / "mpiexec"), "-n", "1", str(exe), str(config),
             str(n), str(args.repeats)], check=True, capture_output=True, text=True,
            env=env).stdout.splitlines()[-1])
        py, py_point = python_calls_s(config, n, args.repeats)
        rows.append({"points": n, "python_call_s": py, "c_call_s": c["batch_call_s"],
                     "c_over_python": c["batch_call_s"] / py,
                     "python_point_call_s": py_point, "c_point_call_s": c["point_call_s"],
                     "c_over_python_point": c["point_call_s"] / py_point,
                     "c_point_by_point_over_batch": c["point_call_s"] * n / c["batch_call_s"]})
    print(f"{'points':>7} {'Python call':>12} {'C call':>10} {'C/Python':>9} "
          f"{'Python 1-point':>15} {'C 1-point':>10} {'C/Python':>9} {'1-point calls/batch':>20}")
    for r in rows:
        print(f"{r['points']:7d} {r['python_call_s'] * 1e3:10.3f}ms {r['c_call_s'] * 1e3:8.3f}ms "
              f"{r['c_over_python']:9.2f} {r['python_point_call_s'] * 1e3:13.3f}ms "
              f"{r['c_point_call_s'] * 1e3:8.3f}ms {r['c_over_python_point']:9.2f} "
              f"{r['c_point_by_point_over_batch']:20.1f}")
    record = {"command": shlex.join([sys.executable, *sys.argv]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": platform.node(), "cpu_count": os.cpu_count(),
              "threads": os.environ.get("OMP_NUM_THREADS"), "repeats": args.repeats,
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "c_api.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
