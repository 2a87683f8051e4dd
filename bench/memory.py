"""Memory of a rank in a coupled FE² run, and the cost of the operator inside the loop.

Prints a table and writes ``bench/results/memory.json``:

- the resident memory (RSS) of one rank after the imports (torch, DOLFINx, NeuroScale), after
  loading the operator, after building the macro problem and registering its points (their
  latents encoded), and after each load step — a fresh process per macro mesh size, running the
  plate of ``examples/plate_with_hole.py`` with every point on the operator (``rtol = inf``: no
  RVE is built) and its own random microstructure per point, as ``examples/fe2_composite.py``;
  the cost of a point is the slope between sizes (fixed costs cancel), of the RSS after the
  steps and of the peak (target: a few KB, what a point's latent and state need);
- the growth of the RSS over a long run (``--long-steps`` load steps on the coarsest mesh):
  after the last step against after the tenth (target ≤ 5 %);
- a live periodic RVE (mesh size 0.02, built and solved): RSS per RVE;
- the operator stage in the loop: ``Coupler.evaluate`` (stress, tangent, calibrated bound,
  policy) on ``--points`` points, in points per CPU second of one torch thread, next to the bare
  model's ``predict`` (what the Coupler ran before it had
  :class:`~neuroscale_couple.operators.inference.Inference`) in float64 and float32 on the same
  points in the same process (target ≥ 1e6 points/s per core).

CPU seconds, not wall seconds: the figures then hold on a shared machine better, and its other
jobs still slow the caches (compare ratios measured in one run).

Run: ``python bench/memory.py`` (``--sizes 0.1 0.05 0.025 --long-steps 200 --points 65536``).
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
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL = ROOT / "examples" / "models" / "fe2_composite.pt"
MB = 2**20


def rss() -> tuple[int, int]:
    """This process's resident and peak resident memory (bytes)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    return (int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024)


def fe2_child(mesh_size: float, steps: int) -> dict:
    """Stages of one FE² run in this (fresh) process: RSS after each, in bytes."""
    stages = {"python": rss()[0]}
    from mpi4py import MPI

    import dolfinx_solver  # noqa: F401  (before dolfinx)
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    from fe2_composite import COMPOSITE, microstructures_at
    from plate_with_hole import quarter_plate

    from neuroscale_couple.adapters import fenicsx  # noqa: F401
    from neuroscale_couple.coupler import Coupler, Policy
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.solvers.rve_fenicsx import rve_from_config

    stages["imports"] = rss()[0]
    torch.set_num_threads(1)
    model = load_operator(MODEL)
    family = dict(COMPOSITE, mesh={"size": 0.02})
    coupler = Coupler(model, lambda m: rve_from_config(family, m), family=family,
                      policy=Policy(rtol=float("inf")), comm=MPI.COMM_SELF)
    stages["operator"] = rss()[0]
    args = argparse.Namespace(mesh_size=str(mesh_size), stretch=0.08)
    problem, set_load, _ = quarter_plate(args, coupler, microstructures_at, MPI.COMM_SELF)
    stages["registered"] = rss()[0]
    after_step: list[int] = []
    t0 = time.process_time()
    problem.run(np.linspace(0, 1, steps + 1)[1:], set_load,
                on_step=lambda record: after_step.append(rss()[0]))
    return {"mesh_size": mesh_size, "points": problem.micro.n_points, "steps": steps,
            "stages": stages, "after_step": after_step, "peak": rss()[1],
            "steps_cpu_s": time.process_time() - t0}


def rve_child(count: int) -> dict:
    """RSS per live periodic RVE (mesh size 0.02, built and solved once)."""
    import dolfinx_solver  # noqa: F401

    from neuroscale_couple.solvers.microstructure import random_fibres
    from neuroscale_couple.solvers.rve_fenicsx import rve_from_config

    sys.path.insert(0, str(ROOT / "examples"))
    from fe2_composite import COMPOSITE

    family = dict(COMPOSITE, mesh={"size": 0.02})
    F = np.array([[1.02, 0.01], [0.0, 0.99]])
    first = rve_from_config(family, random_fibres(0.3, 3, 1000))  # one-off costs (forms, JIT)
    first.solve(F, point_ids=[0])
    before = rss()[0]
    live = [rve_from_config(family, random_fibres(0.3, 3, s)) for s in range(count)]
    for k, r in enumerate(live):
        r.solve(F, point_ids=[k])
    return {"rves": count, "bytes_per_rve": (rss()[0] - before) / count}


def run_child(*argv: str) -> dict:
    """Run this script as a child with ``argv``; its JSON answer."""
    out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_loop(n: int, repeat: int = 3, own: int = 8192, model_path: Path = MODEL) -> dict:
    """Points per CPU second (one torch thread) of Coupler.evaluate of the model in
    ``model_path`` on n points sharing 64 structures, on ``own`` points with a structure each
    (as in FE²: latents read in place), and of the bare model's predict on the n points."""
    from mpi4py import MPI

    import torch

    from neuroscale_couple.coupler import Coupler, Policy
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.sampling import loads_in_ball, rng_for
    from neuroscale_couple.solvers.microstructure import random_fibres

    torch.set_num_threads(1)
    model = load_operator(model_path)
    # a finite tolerance no point exceeds: the bound is computed, nothing falls back
    coupler = Coupler(model, lambda m: None, policy=Policy(rtol=1e9, atol=1e9),
                      comm=MPI.COMM_SELF)
    cells = [random_fibres(0.15 + 0.3 * s / 64, 1 + s % 8, s) for s in range(64)]
    ids = np.arange(n)
    coupler.register(ids, [cells[i % len(cells)] for i in ids])
    F = loads_in_ball(n, 0.2, rng_for(11, 0)).reshape(n, 2, 2)
    coupler.begin_step(0)

    def rate(fn, count: int = n) -> float:
        fn()  # warm-up (the Coupler's per-version set-up included)
        t0 = time.process_time()
        for _ in range(repeat):
            fn()
        return count * repeat / (time.process_time() - t0)

    z = coupler.latent_store.latents([cells[i % len(cells)] for i in ids])
    Ft = torch.as_tensor(F)
    out = {"points": n, "coupler_evaluate": rate(lambda: coupler.evaluate(F, ids))}
    each = Coupler(model, lambda m: None, policy=Policy(rtol=1e9, atol=1e9), comm=MPI.COMM_SELF)
    each.register(ids[:own], [random_fibres(0.15 + 0.3 * (s % 64) / 64, 1 + s % 8, s)
                              for s in range(own)])
    each.begin_step(0)
    out["own_structures"] = own
    out["coupler_evaluate_own_structures"] = rate(lambda: each.evaluate(F[:own], ids[:own]), own)
    for dtype in (torch.float64, torch.float32):
        m = load_operator(model_path).to(dtype)
        with torch.no_grad():
            out[f"model_predict_{str(dtype)[6:]}"] = rate(
                lambda m=m, dtype=dtype: m.predict(z.to(dtype), Ft.to(dtype)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.05, 0.025],
                        help="macro mesh sizes of the per-point runs (coarsest first)")
    parser.add_argument("--steps", type=int, default=3, help="load steps of those runs")
    parser.add_argument("--long-steps", type=int, default=200,
                        help="load steps of the growth run (coarsest mesh)")
    parser.add_argument("--points", type=int, default=65536, help="points of the in-loop test")
    parser.add_argument("--rves", type=int, default=8)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "memory.json"))
    parser.add_argument("--baseline", nargs=2, metavar=("RECORD", "LABEL"),
                        help="a record of this benchmark on another checkout (e.g. before a "
                        "change) to keep in the record under `baseline`, labelled; with "
                        "--attach, added to the record --out without running anything")
    parser.add_argument("--attach", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--in-loop-only", action="store_true",
                        help="rerun only the in-loop rates and update them in the record --out")
    parser.add_argument("--models", nargs="*", default=[],
                        help="with --in-loop-only: also these model files' in-loop rates "
                        "(recorded under in_loop_by_model), e.g. the distilled model and a "
                        "variant of it")
    parser.add_argument("--note", help="with --in-loop-only: what the --models files are "
                        "(e.g. where a file outside the repository came from), recorded")
    args = parser.parse_args()
    if args.in_loop_only:
        record = json.loads(Path(args.out).read_text())
        record["in_loop_points_per_cpu_s"] = in_loop(args.points)
        record["in_loop_by_model"] = {
            str(Path(m).resolve().relative_to(ROOT)) if Path(m).resolve().is_relative_to(ROOT)
            else str(m): in_loop(args.points, model_path=Path(m)) for m in args.models}
        if args.note:
            record["in_loop_note"] = args.note
        record["in_loop_command"] = shlex.join(["python", "bench/memory.py", *sys.argv[1:]])
        record["in_loop_date"] = date.today().isoformat()
        write(record, args)
        print(json.dumps({"in_loop_points_per_cpu_s": record["in_loop_points_per_cpu_s"],
                          "in_loop_by_model": record["in_loop_by_model"]}, indent=1))
        return
    if args.attach:
        if not args.baseline:
            parser.error("--attach adds a --baseline RECORD LABEL to the record: give one")
        record = json.loads(Path(args.out).read_text())
        write(record, args)
        return
    if args.child:
        kind, *rest = args.child
        answer = (fe2_child(float(rest[0]), int(rest[1])) if kind == "fe2"
                  else rve_child(int(rest[0])))
        print(json.dumps(answer))
        return

    runs = [run_child("--child", "fe2", str(h), str(args.steps)) for h in args.sizes]
    long = run_child("--child", "fe2", str(args.sizes[0]), str(args.long_steps))
    rve = run_child("--child", "rve", str(args.rves))
    speed = in_loop(args.points)
    small, large = runs[0], runs[-1]
    points = large["points"] - small["points"]
    tenth = long["after_step"][min(9, len(long["after_step"]) - 1)]
    record = {
        "command": shlex.join(["python", "bench/memory.py", *sys.argv[1:]]),
        "date": date.today().isoformat(), "machine": f"{platform.node()} ({os.cpu_count()} "
        "cores, shared with other jobs)",
        "runs": runs,
        "imports_mb": small["stages"]["imports"] / MB,
        "operator_mb": (small["stages"]["operator"] - small["stages"]["imports"]) / MB,
        "kb_per_point_registered": (large["stages"]["registered"]
                                    - small["stages"]["registered"]) / points / 1024,
        "kb_per_point_after_steps": (large["after_step"][-1] - small["after_step"][-1])
        / points / 1024,
        "kb_per_point_peak": (large["peak"] - small["peak"]) / points / 1024,
        "long_run": {"mesh_size": long["mesh_size"], "points": long["points"],
                     "steps": long["steps"], "rss_step10_mb": tenth / MB,
                     "rss_last_mb": long["after_step"][-1] / MB,
                     "growth": long["after_step"][-1] / tenth - 1,
                     "after_step_mb": [v / MB for v in long["after_step"]]},
        "rve_mb": rve["bytes_per_rve"] / MB,
        "in_loop_points_per_cpu_s": speed,
        "targets": {"kb_per_point": "a few", "growth": 0.05, "points_per_s_per_core": 1e6},
    }
    write(record, args)
    print(f"{'points':>8} {'imports MB':>10} {'operator MB':>11} {'registered MB':>13} "
          f"{'after steps MB':>14} {'peak MB':>8}")
    for r in runs:
        s = r["stages"]
        print(f"{r['points']:8d} {s['imports'] / MB:10.0f} {s['operator'] / MB:11.0f} "
              f"{s['registered'] / MB:13.0f} {r['after_step'][-1] / MB:14.0f} "
              f"{r['peak'] / MB:8.0f}")
    print(f"per point: {record['kb_per_point_registered']:.2f} KB registered, "
          f"{record['kb_per_point_after_steps']:.2f} KB after the steps, "
          f"{record['kb_per_point_peak']:.2f} KB peak   (target: a few KB)")
    print(f"{long['steps']} steps, {long['points']} points: RSS {tenth / MB:.0f} MB after "
          f"step 10 → {long['after_step'][-1] / MB:.0f} MB, growth "
          f"{100 * record['long_run']['growth']:.2f} %   (target ≤ 5 %)")
    print(f"live RVE (mesh 0.02): {record['rve_mb']:.1f} MB each")
    for name, value in speed.items():
        if name not in ("points", "own_structures"):
            print(f"{name:>22}: {value:10.3g} points per CPU second, one thread "
                  f"({speed['points']} points)")


def write(record: dict, args: argparse.Namespace) -> None:
    """Write ``record`` to ``args.out``, with ``args.baseline``'s record (its own baseline
    dropped) under ``baseline``."""
    if args.baseline:
        path, label = args.baseline
        base = json.loads(Path(path).read_text())
        base.pop("baseline", None)
        record["baseline"] = {"label": label, **base}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
