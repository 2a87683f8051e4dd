"""Speed-up of a coupled example: the same macro problem with the true fine solver at every point
(``--reference``) and with the operator.

Runs ``examples/<example>.py`` under ``mpiexec -n NP`` on one mesh, seven times (an entry point
may pick fewer runs; ``reference`` and ``operator`` always run):

- ``reference``: the true fine solver at every quadrature point, every Newton iteration
  (``--reuse-reference``: taken from an earlier run of the same settings in ``--out``);
- ``operator``: the Coupler at --rtol/--atol with online retraining (the product: the
  example's defaults, which for the FE² composite example include cell fits for the fallback
  points, :mod:`neuroscale_couple.cell_fits`);
- ``background``: the same with the retraining in a background thread;
- ``cost_aware``: the same, retraining only when it is estimated to pay
  (``--cost-aware-retrain``);
- ``no_retrain``: the same without retraining (fallback-rate curve for comparison);
- ``operator_only``: rtol = inf, never falling back (the operator's own cost and error);
- ``audit``: the ``operator`` run again with ``--audit``: after every load step every point is
  solved by the fine solver at its own F̄ as well, giving the bound's coverage and the false
  negatives at the run's tolerances (points whose true error exceeded atol + rtol·‖P̄‖, and
  rtol·‖P̄‖ alone, but stayed on the operator) — timings of this run are not used.

The record carries ``reference_config_hash``, the SHA-256 of the reference's settings (ranks,
example, flags): a reused reference is one whose hash matched, and its ``total_time_s`` in
``runs`` says how long it took when it ran.

Prints a table and writes ``bench/results/<name>.json`` (``speedup_total`` and ``speedup_micro``
of the ``operator`` run against the reference, ``rel_l2_displacement``, ``rel_l2_stress``,
``fallback_rate``, ``newton_iterations``, ``ranks``, and every run's figures) plus
``bench/results/<name>_fallback.png`` (fallback rate per step with and without retraining).
The entry points are fe2_speedup.py and hmm_speedup.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUNS = {"reference": ["--reference"], "operator": [], "background": ["--background-retrain"],
        "cost_aware": ["--cost-aware-retrain"], "no_retrain": ["--no-retrain"],
        "operator_only": ["--rtol", "inf"], "audit": ["--audit"]}


def run(name: str, args: argparse.Namespace, out: Path, example: str,
        flags: list[str] | None = None, compare: bool = True, reuse: bool = False) -> dict:
    """Run ``examples/<example>.py`` as run ``name`` (its flags: ``flags``, default
    ``RUNS[name]``) into ``out/name`` and return its summary, with ``config_hash`` (the
    SHA-256 of the run's settings) and, for a reference taken from an earlier run, ``reused``.
    ``compare``: against the reference run in ``out/reference`` (a run other than it);
    ``reuse``: take any run (not only a reference with ``--reuse-reference``) from an earlier
    run of the same settings in ``out/name``.
    """
    mpiexec = Path(sys.executable).parent / "mpiexec"
    # tolerances mean nothing to the reference: its run serves every tolerance (--reuse-reference)
    tolerances = [] if name == "reference" else [
        "--rtol", str(args.rtol), *([] if args.atol is None else ["--atol", str(args.atol)])]
    cmd = [str(mpiexec), "-n", str(args.np), sys.executable,
           str(ROOT / "examples" / f"{example}.py"), "--mesh-size", str(args.mesh_size),
           "--steps", str(args.steps), "--stretch", str(args.stretch), *tolerances,
           "--out", str(out / name), "--quiet", *args.example_flags,
           *(RUNS[name] if flags is None else flags)]
    if name != "reference" and compare:
        cmd += ["--compare", str(out / "reference")]
    stamp, summary = out / name / "bench_command.json", out / name / "summary.json"
    settings = [c for c in cmd[1:] if c != str(out / name)]  # ranks, example, flags
    digest = hashlib.sha256(json.dumps(settings).encode()).hexdigest()
    if ((reuse or (name == "reference" and args.reuse_reference)) and summary.exists()
            and stamp.exists() and json.loads(stamp.read_text()) == settings):
        print(f"[{name}] reused {summary} (settings {digest[:12]})", flush=True)
        return dict(json.loads(summary.read_text()), reused=True, config_hash=digest)
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True)
    stamp.write_text(json.dumps(settings))
    return dict(json.loads(summary.read_text()), config_hash=digest)


def plate_arguments(description: str, *, rtol: float) -> argparse.ArgumentParser:
    """The command line of a 20-step composite-plate benchmark (bench/cold_start.py,
    bench/cell_fits.py): ranks, mesh, steps, stretch and tolerances."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--np", type=int, default=2, help="MPI ranks")
    p.add_argument("--mesh-size", default="0.25")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--stretch", type=float, default=0.08)
    p.add_argument("--rtol", type=float, default=rtol, help="relative stress tolerance")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute stress tolerance (GPa; default: the example's)")
    return p


def main(example: str, name: str, title: str, description: str, *, mesh_size: str,
         stretch: float, rtol: float = 0.05, options: dict[str, type] | None = None,
         runs: tuple[str, ...] = tuple(RUNS), steps: int = 5) -> dict:
    """Run ``examples/<example>.py`` as described in the module docstring; returns the record
    (also written to bench/results/<name>.json). ``options``: flags of the example the
    benchmark passes on when given (e.g. ``{"--temperature": float}``); ``runs``: which of
    :data:`RUNS` to run; ``steps``: the default number of load steps."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--np", type=int, default=2, help="MPI ranks")
    p.add_argument("--mesh-size", default=mesh_size)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--stretch", type=float, default=stretch)
    p.add_argument("--rtol", type=float, default=rtol, help="relative stress tolerance")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute stress tolerance (default: the example's, 1 %% of the model's "
                   "stress scale)")
    p.add_argument("--out", default=f"out/bench_{example}")
    p.add_argument("--name", default=name, help="record name in bench/results")
    p.add_argument("--reuse-reference", action="store_true",
                   help="take the reference run from --out if it ran with the same settings")
    for flag, kind in (options or {}).items():
        p.add_argument(flag, type=kind, help=f"passed to examples/{example}.py")
    args = p.parse_args()
    given = {flag: getattr(args, flag.lstrip("-").replace("-", "_")) for flag in options or {}}
    args.example_flags = [str(v) for flag, value in given.items() if value is not None
                          for v in (flag, value)]
    out = Path(args.out)
    s = {name: run(name, args, out, example) for name in RUNS if name in runs}
    ref, op = s["reference"], s["operator"]
    newton_ref = ref["newton_iterations"]
    record = {
        "name": args.name, "command": shlex.join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {args.np} ranks ({os.cpu_count()} shared cores)",
        "example_flags": args.example_flags,
        "ranks": args.np, "mesh_size": args.mesh_size, "steps": args.steps,
        "stretch": args.stretch, "rtol": args.rtol, "atol": op["atol"],
        "atol_given": args.atol is not None,
        "stress_unit": op["stress_unit"], "dofs": ref["dofs"],
        "quadrature_points": ref["quadrature_points"],
        "speedup_total": ref["total_time_s"] / op["total_time_s"],
        "speedup_micro": ref["micro_time_s"] / op["micro_time_s"],
        "rel_l2_displacement": op["rel_l2_displacement"],
        "rel_l2_stress": op["rel_l2_stress"],
        "fallback_rate": op["fallback_rate"],
        "newton_iterations": {"reference": newton_ref, "operator": op["newton_iterations"]},
        "newton_within_one": all(abs(a - b) <= 1 for a, b in
                                 zip(op["newton_iterations"], newton_ref, strict=True)),
        "fallback_per_step": {name: [h["fallback_points"] / s[name]["quadrature_points"]
                                     for h in s[name]["steps"]] for name in s},
        "runs": {name: {k: s[name][k] for k in ("total_time_s", "micro_time_s", "fallback_rate",
                                                "newton_iterations", "reaction_force",
                                                "displacement_norm")}
                 | {k: s[name].get(k) for k in ("rel_l2_displacement", "rel_l2_stress")}
                 | {"retrain_time_s": sum(h["retrain_time_s"] for h in s[name]["steps"]),
                    "fine_time_s": sum(h["fine_time_s"] for h in s[name]["steps"]),
                    "operator_time_s": sum(h["operator_time_s"] for h in s[name]["steps"]),
                    "encode_time_s": sum(h.get("encode_time_s", 0.0) for h in s[name]["steps"])}
                 for name in s},
    }
    record["reference_reused"] = bool(ref.get("reused"))
    record["reference_config_hash"] = ref["config_hash"]
    record["audit"] = s["audit"]["audit"] if "audit" in s else None
    for name in ("background", "cost_aware", "operator_only"):
        if name in s:
            record[f"speedup_total_{name}"] = ref["total_time_s"] / s[name]["total_time_s"]
    if "operator_only" in s:
        record["speedup_micro_operator_only"] = (ref["micro_time_s"]
                                                 / s["operator_only"]["micro_time_s"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    plot(record, RESULTS / f"{args.name}_fallback.png", title)

    print(f"\n{title} on {args.np} ranks: {ref['dofs']} macro dofs, {ref['quadrature_points']} "
          f"quadrature points, {args.steps} steps to stretch {args.stretch}")
    print(f"{'run':<15}{'total s':>9}{'micro s':>9}{'encode s':>9}{'fine s':>8}{'retrain s':>10}"
          f"{'fallback':>9}{'err u':>9}{'err P':>9}  Newton/step")
    for name, r in record["runs"].items():
        eu, es = r["rel_l2_displacement"], r["rel_l2_stress"]
        print(f"{name:<15}{r['total_time_s']:9.1f}{r['micro_time_s']:9.2f}"
              f"{r['encode_time_s']:9.2f}{r['fine_time_s']:8.2f}{r['retrain_time_s']:10.1f}{r['fallback_rate']:9.3f}"
              f"{'' if eu is None else f'{eu:9.2e}':>9}{'' if es is None else f'{es:9.2e}':>9}"
              f"  {r['newton_iterations']}")
    print(f"speed-up total {record['speedup_total']:.1f}× (operator only "
          f"{record.get('speedup_total_operator_only', float('nan')):.1f}×), micro part "
          f"{record['speedup_micro']:.1f}× (operator only "
          f"{record.get('speedup_micro_operator_only', float('nan')):.0f}×) → "
          f"bench/results/{args.name}.json")
    a = record["audit"]
    if a is None:
        return record
    print(f"audit at rtol {args.rtol}, atol {op['atol']:.3g} {op['stress_unit']}: bound covered "
          f"{a['coverage']:.1%} of {a['operator_point_steps']} operator point-steps; false "
          f"negatives {a['false_negative_rate']:.2%} of {a['point_steps']} point-steps "
          f"({a['false_negative_rate_relative']:.2%} against rtol·|P̄| alone)")
    return record


def plot(record: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"operator": "online retraining", "background": "background retraining",
              "cost_aware": "retraining when it pays", "no_retrain": "frozen operator"}
    for name, label in labels.items():
        if name not in record["fallback_per_step"]:
            continue
        rates = record["fallback_per_step"][name]
        ax.plot(range(1, len(rates) + 1), rates, "o-", label=label)
    ax.set_xlabel("load step")
    ax.set_ylabel("fraction of points on the fine solver")
    ax.set_title(f"{title} fallback rate (rtol {record['rtol']}, {record['ranks']} ranks)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

