"""Benchmark of live periodic RVEs on one rank: MPI communicators and memory per RVE, the times
to build, hibernate, resume and solve one, and how many RVEs a rank keeps live.

Prints tables and writes ``bench/results/rve_live.json``:

- communicators an RVE holds at each stage (built, solved, with micro fields, hibernated before
  and after a garbage collection, resumed and solved, closed), counted with MPI — the context
  ids left (:func:`~neuroscale_couple.parallel.free_communicators`) before and after, over
  ``--count`` RVEs — and by component (the gmsh mesh with its tags, its two function spaces,
  PETSc's duplicates, MUMPS), against ``PeriodicRVE.communicators()``;
- resident memory (VmRSS growth over ``--count`` RVEs, free heap pages handed back first)
  per RVE built, solved, hibernated, against ``memory_bytes()``;
- seconds per RVE to build (meshing with gmsh; again from the kept .msh file), hibernate,
  resume, and solve (cold; warm after a load increment of 0.01; stress and tangent);
- each LU package this PETSc has for a serial RVE (MUMPS, the default; SuperLU_dist; PETSc's
  own): communicators held, seconds per solve, and the difference of P̄ and ∂P̄/∂F̄ from MUMPS's;
- how many awake RVEs a rank holds before MPI refuses a communicator (a subprocess building
  and solving RVEs of mesh size 0.1 until it fails: the bound today without hibernation);
- a :class:`~neuroscale_couple.fine.SolverCache` with ``--live`` RVEs of distinct cells live
  at once, each solved twice (the second pass warm, waking hibernated ones), within the
  default 2 GiB memory budget; results checked bit for bit against fresh RVEs.

Timings on these shared 2-core machines vary by ±40 % between runs: compare ratios within one
run; counts and bytes do not vary.

Run: ``.venv/bin/python bench/rve_live.py`` (``--live 1000 --count 8 --mesh-size 0.02``).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from mpi4py import MPI

import numpy as np

HERE = Path(__file__).resolve().parent
F_LOAD = np.array([[1.06, 0.02], [0.0, 0.97]])
MB = 1e6


def resident() -> int:
    """Resident bytes of this process once garbage is collected and free heap pages are handed
    back."""
    from neuroscale_couple.fine import release_memory

    gc.collect()
    release_memory()
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def cell(i: int):
    from neuroscale_couple.solvers.microstructure import random_fibres

    return random_fibres(0.2 + 0.02 * (i % 10), 1 + i % 6, 5000 + i)


def stages(count: int, size: float) -> dict:
    """Communicators, memory and times per RVE through its life, over ``count`` RVEs."""
    from neuroscale_couple.parallel import free_communicators
    from neuroscale_couple.solvers.rve_fenicsx import PeriodicRVE

    def per_rve(before: int) -> float:
        return (before - free_communicators()) / count

    gc.collect()
    free0, rss0 = free_communicators(), resident()
    t0 = time.perf_counter()
    rves = [PeriodicRVE(cell(i), mesh_size=size) for i in range(count)]
    times = {"build_meshing_s": (time.perf_counter() - t0) / count}
    held = {"built": per_rve(free0)}
    memory = {"built": (resident() - rss0) / count}
    estimate = {"built": sum(r.memory_bytes() for r in rves) / count}
    reported = {"built": sum(r.communicators() for r in rves) / count}

    t0 = time.perf_counter()
    for r in rves:
        r.solve(F_LOAD, point_ids=[0])
    times["solve_cold_s"] = (time.perf_counter() - t0) / count
    t0 = time.perf_counter()
    for r in rves:
        r.solve(F_LOAD + 0.01, point_ids=[0])
    times["solve_warm_s"] = (time.perf_counter() - t0) / count
    held["solved"] = per_rve(free0)
    memory["solved"] = (resident() - rss0) / count
    estimate["solved"] = sum(r.memory_bytes() for r in rves) / count
    reported["solved"] = sum(r.communicators() for r in rves) / count
    for r in rves:
        r.solve(F_LOAD, point_ids=[1], fields_resolution=8)
    held["with_fields"] = per_rve(free0)
    reported["with_fields"] = sum(r.communicators() for r in rves) / count

    t0 = time.perf_counter()
    for r in rves:
        r.hibernate()
    times["hibernate_s"] = (time.perf_counter() - t0) / count
    held["hibernated_before_gc"] = per_rve(free0)
    memory["hibernated"] = (resident() - rss0) / count  # collects garbage
    held["hibernated"] = per_rve(free0)
    estimate["hibernated"] = sum(r.memory_bytes() for r in rves) / count
    reported["hibernated"] = sum(r.communicators() for r in rves) / count
    states = sum(a.nbytes for r in rves for s in r.states.values() for a in s if a is not None)

    t0 = time.perf_counter()
    for r in rves:
        r.resume()
    times["resume_s"] = (time.perf_counter() - t0) / count
    held["resumed"] = per_rve(free0)
    t0 = time.perf_counter()
    for r in rves:
        r.solve(F_LOAD + 0.02, point_ids=[0])
    times["solve_warm_after_resume_s"] = (time.perf_counter() - t0) / count
    held["resumed_solved"] = per_rve(free0)
    dofs = rves[0].dofs
    for r in rves:
        r.close()
    held["closed"] = per_rve(free0)
    gc.collect()
    held["closed_after_gc"] = per_rve(free0)

    t0 = time.perf_counter()
    again = [PeriodicRVE(cell(i), mesh_size=size) for i in range(count)]
    times["build_from_msh_file_s"] = (time.perf_counter() - t0) / count
    for r in again:
        r.close()
    return {"count": count, "mesh_size": size, "dofs": dofs,
            "communicators_measured": held, "communicators_reported": reported,
            "resident_bytes": memory, "memory_bytes_estimate": estimate,
            "warm_states_bytes_per_rve": states / count, "seconds_per_rve": times}


def components(size: float) -> dict:
    """Communicators of the pieces of one RVE, created one by one."""
    from dolfinx import fem

    from neuroscale_couple.parallel import free_communicators
    from neuroscale_couple.solvers.rve_fenicsx import PeriodicRVE

    gc.collect()
    free0 = free_communicators()
    data = cell(0).mesh(MPI.COMM_SELF, size)
    mesh = free0 - free_communicators()
    spaces = [fem.functionspace(data.mesh, ("DG", 0)),
              fem.functionspace(data.mesh, ("Lagrange", 1, (2,)))]
    with_spaces = free0 - free_communicators()
    del spaces, data
    gc.collect()
    free0 = free_communicators()
    rve = PeriodicRVE(cell(0), mesh_size=size)
    built = free0 - free_communicators()
    rve.solve(F_LOAD)
    solved = free0 - free_communicators()
    rve.close()
    return {"mesh_and_tags": mesh, "function_spaces": with_spaces - mesh,
            "petsc": built - with_spaces, "mumps": solved - built, "total_solved": solved}


def lu_packages(size: float) -> dict:
    """Each sequential-capable LU package of this PETSc: communicators an RVE then holds, seconds
    per solve (cold; warm after a load increment of 0.01; stress and tangent) and the largest
    difference of P̄ and ∂P̄/∂F̄ from MUMPS's, relative to MUMPS's largest entry."""
    from petsc4py import PETSc

    from neuroscale_couple.parallel import free_communicators
    from neuroscale_couple.solvers.rve_fenicsx import PeriodicRVE

    out, reference = {}, None
    for package in ("mumps", "superlu_dist", "petsc", "superlu", "umfpack", "klu"):
        if package != "petsc" and not PETSc.Sys.hasExternalPackage(package):
            out[package] = {"available": False}
            continue
        options = {"pc_factor_mat_solver_type": package}
        if package == "petsc":
            options["pc_factor_mat_ordering_type"] = "nd"
        gc.collect()
        free0 = free_communicators()
        with PeriodicRVE(cell(3), mesh_size=size, petsc_options=options) as rve:
            t0 = time.perf_counter()
            first = rve.solve(F_LOAD, point_ids=[0])
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            rve.solve(F_LOAD + 0.01, point_ids=[0])
            warm = time.perf_counter() - t0
            held = free0 - free_communicators()
        reference = reference or first
        out[package] = {
            "available": True, "communicators": held, "solve_cold_s": cold,
            "solve_warm_s": warm,
            "stress_difference": float(np.abs(first.stress - reference.stress).max()
                                       / np.abs(reference.stress).max()),
            "tangent_difference": float(np.abs(first.tangent - reference.tangent).max()
                                        / np.abs(reference.tangent).max())}
    return out


def until_refused() -> None:
    """Build and solve awake RVEs (mesh size 0.1) until something fails; print the count."""
    from neuroscale_couple.solvers.rve_fenicsx import PeriodicRVE

    rves = []
    try:
        while True:
            rves.append(PeriodicRVE(cell(len(rves)), mesh_size=0.1))
            rves[-1].solve(F_LOAD)
            print(f"solved {len(rves)}", flush=True)
    except Exception as err:  # what stops it is the figure
        print(json.dumps({"error": type(err).__name__, "message": str(err)}))


def max_awake() -> dict:
    """:func:`until_refused` in a fresh process (which MPI may abort: then its output is all
    there is)."""
    out = subprocess.run([sys.executable, __file__, "--until-refused"], capture_output=True,
                         text=True, timeout=1800)
    lines = out.stdout.strip().splitlines()
    solved = sum(line.startswith("solved ") for line in lines)
    failure = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {
        "error": f"process ended with code {out.returncode}", "message": out.stderr}
    reason = next((line.strip() for line in failure["message"].splitlines()
                   if "communicators" in line.lower()), failure["message"].strip()[:300])
    return {"awake_rves_solved": solved, "error": failure["error"], "reason": reason}


def cache_run(live: int, size: float) -> dict:
    """A SolverCache with ``live`` distinct RVEs live at once, each solved twice."""
    from neuroscale_couple.fine import LIVE_MEMORY, SolverCache
    from neuroscale_couple.parallel import free_communicators
    from neuroscale_couple.solvers.rve_fenicsx import PeriodicRVE

    rss0 = resident()
    cache = SolverCache(lambda i: PeriodicRVE(cell(i), mesh_size=size), capacity=live,
                        memory=LIVE_MEMORY)
    passes, stress = [], {}
    for n, F in enumerate((F_LOAD, F_LOAD + 0.01)):
        cache.new_pass()
        t0 = time.perf_counter()
        for i in range(live):
            stress[n, i] = cache.get(i, i).solve(F, point_ids=[i]).stress[0]
        passes.append({"seconds_per_rve": (time.perf_counter() - t0) / live,
                       "live": len(cache), "awake": cache.awake(), "builds": cache.builds,
                       "hibernations": cache.hibernations, "closed": cache.evictions})
        print(f"  pass {n + 1}: {passes[-1]}", flush=True)
    record = {"live_rves": len(cache), "awake": cache.awake(), "capacity": live,
              "memory_budget_bytes": LIVE_MEMORY, "communicator_budget": cache.communicators,
              "communicators_held": cache.communicators_held(),
              "communicators_left": free_communicators(),
              "memory_bytes_estimate": cache.memory_bytes(),
              "resident_growth_bytes": resident() - rss0, "passes": passes}
    cache.close()
    identical = True  # a few points against fresh RVEs solving the same sequence
    for i in (0, live // 2, live - 1):
        with PeriodicRVE(cell(i), mesh_size=size) as fresh:
            for n, F in enumerate((F_LOAD, F_LOAD + 0.01)):
                identical &= bool(np.array_equal(fresh.solve(F, point_ids=[i]).stress[0],
                                                 stress[n, i]))
    record["identical_to_fresh_rves"] = identical
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=1000, help="RVEs live at once in the cache")
    parser.add_argument("--count", type=int, default=8, help="RVEs per stage measurement")
    parser.add_argument("--mesh-size", type=float, default=0.02)
    parser.add_argument("--until-refused", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "rve_live.json"))
    args = parser.parse_args()
    if args.until_refused:
        until_refused()
        return
    from neuroscale_couple.solvers.rve_fenicsx import PeriodicRVE

    with PeriodicRVE(cell(999), mesh_size=args.mesh_size) as warm:  # compile the forms once
        warm.solve(F_LOAD, fields_resolution=8)
    record = {"command": " ".join(["python", "bench/rve_live.py", *sys.argv[1:]]),
              "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.node()}, {platform.processor() or platform.machine()}, "
                         "shared 2-core machine (timings contaminated by other jobs)"}
    record["components"] = components(args.mesh_size)
    print("communicators by component:", record["components"], flush=True)
    record["lu_packages"] = lu_packages(args.mesh_size)
    print("LU packages:", record["lu_packages"], flush=True)
    record["stages"] = stages(args.count, args.mesh_size)
    st = record["stages"]
    print(f"{'stage':>22} {'comms measured':>15} {'reported':>9} {'RSS MB':>8} {'estimate MB':>12}")
    for stage, held in st["communicators_measured"].items():
        rss = st["resident_bytes"].get(stage)
        est = st["memory_bytes_estimate"].get(stage)
        print(f"{stage:>22} {held:>15.2f} {st['communicators_reported'].get(stage, ''):>9} "
              f"{'' if rss is None else f'{rss / MB:.2f}':>8} "
              f"{'' if est is None else f'{est / MB:.2f}':>12}")
    print("seconds per RVE:", {k: round(v, 4) for k, v in st["seconds_per_rve"].items()})
    record["max_awake_without_hibernation"] = max_awake()
    print("awake RVEs until refused:", record["max_awake_without_hibernation"], flush=True)
    print(f"cache with {args.live} live RVEs:", flush=True)
    record["cache"] = cache_run(args.live, args.mesh_size)
    print({k: v for k, v in record["cache"].items() if k != "passes"})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
