"""Cell fits for a trained model's fallback points: examples/fe2_composite.py with the shipped
operator, without (``--no-cell-fits``) and with them (the example's default), against classic
FE² (``--reference``).

Runs the example under ``mpiexec -n NP`` three times on one mesh, at a tight tolerance where the
shipped model sends many points to the fine solver (default ``--rtol 0.01``):

- ``reference``: the true fine solver at every quadrature point, every Newton iteration
  (``--reuse-reference``: taken from an earlier run of the same settings in ``--out``);
- ``operator``: the operator with its fallback and online retraining, ``--no-cell-fits``
  (``--no-retrain``: without retraining, in both runs);
- ``cell_fits``: the example's default: a point that fell back is served by its own cell fit
  in the later steps where the fit's calibrated bound allows (the fallback solves teach the
  fits; the network is not retrained).

Prints a table per step and writes ``bench/results/<name>.json``: per run the total time,
fine solves, fallback points per step and the relative L2 errors of displacement and stress
against the reference, with the command.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path

from coupled_speedup import RESULTS, plate_arguments, run

RUN_KEYS = ("total_time_s", "rel_l2_displacement", "rel_l2_stress", "training_time_s")


def main() -> dict:
    p = plate_arguments(__doc__.splitlines()[0], rtol=0.01)
    p.add_argument("--out", default="out/bench_cell_fits")
    p.add_argument("--name", default="cell_fits", help="record name in bench/results")
    p.add_argument("--no-retrain", action="store_true",
                   help="both runs without online retraining (the cell fits' effect alone)")
    p.add_argument("--reuse-reference", action="store_true",
                   help="take the reference run from --out if it ran with the same settings")
    args = p.parse_args()
    args.example_flags = []
    out = Path(args.out)
    ref = run("reference", args, out, "fe2_composite")
    retrain = ["--no-retrain"] if args.no_retrain else []
    runs = {name: run(name, args, out, "fe2_composite", [*retrain, *flags])
            for name, flags in (("operator", ["--no-cell-fits"]), ("cell_fits", []))}
    record = {
        "name": args.name, "command": " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {args.np} ranks (2 shared cores)",
        "ranks": args.np, "mesh_size": args.mesh_size, "steps": args.steps,
        "retrain": not args.no_retrain,
        "stretch": args.stretch, "rtol": args.rtol, "atol": runs["operator"]["atol"],
        "dofs": ref["dofs"], "quadrature_points": ref["quadrature_points"],
        "reference_total_time_s": ref["total_time_s"],
        "reference_fine_solves": sum(h["fine_solves"] for h in ref["steps"]),
        "runs": {name: {k: s.get(k) for k in RUN_KEYS}
                 | {"speedup_total": ref["total_time_s"] / s["total_time_s"],
                    "fine_solves": sum(h["fine_solves"] for h in s["steps"]),
                    "fallback_points": [h["fallback_points"] for h in s["steps"]],
                    "fine_solves_per_step": [h["fine_solves"] for h in s["steps"]],
                    "model_version": s["model_version"]}
                 for name, s in runs.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=1))

    r = record["runs"]
    print(f"\n{ref['quadrature_points']} points, {args.steps} steps to stretch {args.stretch}, "
          f"rtol {args.rtol}, {args.np} ranks; classic FE² {ref['total_time_s']:.1f} s")
    print(f"{'step':>4}{'fallback':>10}{'with cell fits':>16}")
    for i, (a, b) in enumerate(zip(r["operator"]["fallback_points"],
                                   r["cell_fits"]["fallback_points"], strict=True)):
        print(f"{i:4d}{a:10d}{b:16d}")
    for name, s in r.items():
        print(f"{name}: {s['total_time_s']:.1f} s ({s['speedup_total']:.1f}× classic), "
              f"{s['fine_solves']} fine solves, displacement {s['rel_l2_displacement']:.2e}, "
              f"stress {s['rel_l2_stress']:.2e}")
    print(f"→ bench/results/{args.name}.json")
    return record


if __name__ == "__main__":
    main()
