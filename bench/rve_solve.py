"""Benchmark of the periodic RVE solver and of `neuroscale generate`.

Prints a table and writes ``bench/results/rve_solve.json``:

- time per Neo-Hookean RVE solve against dofs for P1 and P2: cold (w = 0, stress only), cold with
  tangent, and warm (the same point after a load increment of 0.01, with tangent); medians of
  ``--repeat`` runs, one core;
- samples per second of ``neuroscale generate`` on 1 and 2 MPI ranks (whole command, imports
  included, on a config of 16 microstructures × 8 loads).

Target (issue): a Neo-Hookean RVE of ~10k dofs solved with tangent in under 0.25 s on one core.
Timings on these 2-core machines vary by ±40 % between runs: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
F_LOAD = np.array([[1.10, 0.04], [0.02, 0.94]])
GENERATE = {
    "microstructure": {"kind": "random_fibres", "volume_fraction": [0.1, 0.5],
                       "n_fibres": [1, 6], "count": 16, "seed": 0},
    "loads": {"per_microstructure": 8, "radius": 0.15, "seed": 1},
    "law": "neo_hookean", "matrix": {"E": 3.0, "nu": 0.35}, "fibre": {"E": 70.0, "nu": 0.2},
    "image_resolution": 64,
}


def time_solves(degree: int, size: float, repeat: int) -> dict:
    from mpi4py import MPI

    from neuroscale_couple.solvers.microstructure import random_fibres
    from neuroscale_couple.solvers.rve_fenicsx import PeriodicRVE

    t0 = time.perf_counter()
    rve = PeriodicRVE(random_fibres(0.4, 6, seed=1), degree=degree, mesh_size=size,
                      comm=MPI.COMM_SELF)
    setup = time.perf_counter() - t0
    cold, tangent, warm, its_cold, its_warm = [], [], [], [], []
    for _ in range(repeat):
        res = rve.solve(F_LOAD, tangent=False)
        cold.append(res.info["time_s"][0])
        its_cold.append(res.info["iterations"][0])
        tangent.append(rve.solve(F_LOAD).info["time_s"][0])
        rve.forget()
        rve.solve(F_LOAD - 0.01, point_ids=[0])
        res = rve.solve(F_LOAD, point_ids=[0])
        warm.append(res.info["time_s"][0])
        its_warm.append(res.info["iterations"][0])
    return {"degree": degree, "mesh_size": size, "dofs": rve.dofs, "setup_s": setup,
            "cold_s": float(np.median(cold)), "cold_tangent_s": float(np.median(tangent)),
            "warm_tangent_s": float(np.median(warm)),
            "newton_cold": int(np.median(its_cold)), "newton_warm": int(np.median(its_warm))}


def time_generate(ranks: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "gen.yaml"
        cfg.write_text(yaml.safe_dump(GENERATE))
        mpiexec = Path(sys.executable).parent / "mpiexec"
        cmd = [str(mpiexec), "-n", str(ranks), sys.executable, "-m", "neuroscale_couple.cli",
               "generate", str(cfg), "--out", str(Path(tmp) / "d.h5"), "--quiet"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
    n = GENERATE["microstructure"]["count"] * GENERATE["loads"]["per_microstructure"]
    return {"ranks": ranks, "samples": n, "wall_s": wall, "samples_per_s": n / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results" / "rve_solve.json"))
    args = parser.parse_args()

    cases = [(1, h) for h in (0.04, 0.02, 0.016, 0.01)] + [(2, h) for h in (0.1, 0.05, 0.035)]
    rows = []
    print(f"{'P':>2} {'h':>6} {'dofs':>7} {'setup s':>8} {'cold s':>8} {'+tangent s':>10} "
          f"{'warm+tan s':>10} {'its cold/warm':>13}")
    for degree, size in cases:
        r = time_solves(degree, size, args.repeat)
        rows.append(r)
        print(f"{degree:>2} {size:>6.3f} {r['dofs']:>7d} {r['setup_s']:>8.3f} {r['cold_s']:>8.4f} "
              f"{r['cold_tangent_s']:>10.4f} {r['warm_tangent_s']:>10.4f} "
              f"{r['newton_cold']:>6d}/{r['newton_warm']:<6d}", flush=True)
    near_10k = min(rows, key=lambda r: abs(r["dofs"] - 10_000))
    target = {"dofs": near_10k["dofs"], "cold_tangent_s": near_10k["cold_tangent_s"],
              "target_s": 0.25, "met": near_10k["cold_tangent_s"] < 0.25}
    print(f"\ntarget: ~10k-dof Neo-Hookean RVE with tangent < 0.25 s: {near_10k['dofs']} dofs in "
          f"{near_10k['cold_tangent_s']:.3f} s (cold) -> {'met' if target['met'] else 'NOT met'}")

    gen = [time_generate(n) for n in (1, 2)]
    for g in gen:
        print(f"generate on {g['ranks']} rank(s): {g['samples']} samples in {g['wall_s']:.1f} s "
              f"= {g['samples_per_s']:.1f} samples/s")
    record = {"solves": rows, "target_10k": target, "generate": gen,
              "generate_speedup_2_ranks": gen[1]["samples_per_s"] / gen[0]["samples_per_s"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
