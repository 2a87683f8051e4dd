"""Run calibration of a family operator's bound (``Policy.run_calibration``), audited.

Runs examples/fe2_composite.py with the shipped family model under ``mpiexec -n NP`` at each
``--material``, twice: with the model's own calibration (per contrast band, over the band's
materials; ``--run-calibration off``) and with the bound recalibrated on a census of the run's
own points each step (``on``, the default for a family operator). Both runs ``--audit``: after
every load step every point is solved by the fine solver too, and the step reports how many of
the operator's points the bound covered. ``--no-retrain --no-cell-fits``: every operator point
is the network's, so the coverage is its bound's (the audit's solves make the runs' times
no measure of the product's).

Prints a table and writes ``bench/results/<name>.json``: per material and run, the coverage of
the bound over all operator point-steps (target: ``confidence``, 95 %) and per step, false
negatives (points whose true error exceeded the tolerance but stayed on the operator),
fallback points, census sizes, factors and fine solves per step, and the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

from coupled_speedup import RESULTS, ROOT, run

MATERIALS = ("3.0,0.35,70.0,0.2", "70.0,0.33,410.0,0.22")
"""E_m, ν_m, E_f, ν_f (GPa) of the default materials: the fixed model's (contrast 23.3), and an
aluminium-like matrix with stiff fibres (contrast 5.9) whose ν_f lies inside the ranges."""


def material_flags(text: str) -> list[str]:
    """``--matrix E NU --fibre E NU`` of ``E_m,ν_m,E_f,ν_f``."""
    values = [float(v) for v in text.split(",")]
    if len(values) != 4:
        raise SystemExit(f"--material {text!r}: give E_m,nu_m,E_f,nu_f, e.g. 3.0,0.35,70.0,0.2")
    return ["--matrix", *map(str, values[:2]), "--fibre", *map(str, values[2:])]


def step_rows(summary: dict) -> list[dict]:
    """Per load step: coverage of the bound over the operator's points, and the census."""
    rows = []
    for s in summary["steps"]:
        a = s["audit"]
        rows.append({"operator_points": a["operator_points"], "covered": a["covered"],
                     "coverage": a["covered"] / a["operator_points"] if a["operator_points"]
                     else None, "false_negatives": a["false_negatives"],
                     "fallback_points": s["fallback_points"], "fine_solves": s["fine_solves"],
                     "census": s.get("run_scored", 0), "factor": s.get("run_bound_factor")})
    return rows


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, default=2, help="MPI ranks")
    p.add_argument("--mesh-size", default="coarse", help="macro mesh (coarse: 412 points)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--stretch", type=float, default=0.08)
    p.add_argument("--rtol", type=float, default=0.05, help="relative stress tolerance")
    p.add_argument("--atol", type=float, default=None, help="absolute stress tolerance (GPa)")
    p.add_argument("--model", default="examples/models/fe2_family.pt")
    p.add_argument("--material", action="append", default=None, metavar="EM,NUM,EF,NUF",
                   help=f"phases (GPa), repeatable (default: {' and '.join(MATERIALS)})")
    p.add_argument("--out", default="out/bench_run_calibration")
    p.add_argument("--name", default="run_calibration", help="record name in bench/results")
    p.add_argument("--reuse", action="store_true",
                   help="take each run from --out where an earlier one ran with its settings")
    args = p.parse_args()
    args.reuse_reference = False
    record = {"name": args.name, "command": " ".join(shlex.quote(a) for a in sys.argv),
              "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {args.np} ranks (2 shared cores)",
              "model": args.model, "ranks": args.np, "mesh_size": args.mesh_size,
              "steps": args.steps, "stretch": args.stretch, "rtol": args.rtol,
              "materials": {}}
    for text in args.material or MATERIALS:
        runs = {}
        for mode in ("off", "on"):
            args.example_flags = ["--model", args.model, *material_flags(text)]
            summary = run(f"{text.replace(',', '_')}_{mode}", args, Path(args.out),
                          "fe2_composite", ["--no-retrain", "--no-cell-fits", "--audit",
                                            "--run-calibration", mode], compare=False,
                          reuse=args.reuse)
            steps = step_rows(summary)
            runs[mode] = {"coverage": summary["audit"]["coverage"],
                          "operator_point_steps": summary["audit"]["operator_point_steps"],
                          "false_negatives": summary["audit"]["false_negatives"],
                          "fine_solves": sum(s["fine_solves"] for s in steps), "steps": steps,
                          "reused": bool(summary.get("reused"))}
        record["materials"][text] = {"quadrature_points": summary["quadrature_points"],
                                     "confidence": summary["confidence"], "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    print(f"\n{'material':>22}{'run':>5}{'coverage':>10}{'per step':>40}{'census q':>30}")
    for text, m in record["materials"].items():
        for mode, r in m["runs"].items():
            per = " ".join(f"{100 * s['coverage']:.0f}" for s in r["steps"] if s["coverage"])
            qs = " ".join(f"{s['factor']:.2f}" for s in r["steps"] if s["factor"])
            print(f"{text:>22}{mode:>5}{100 * r['coverage']:9.1f}%{per:>40}{qs:>30}")
    print(f"→ {(RESULTS / f'{args.name}.json').relative_to(ROOT)}")
    return record


if __name__ == "__main__":
    main()
