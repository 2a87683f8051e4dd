"""Scaling of the FE² example: macro size, ranks, and a model for 64 and 1 024 ranks.

Runs ``examples/fe2_composite.py`` as subprocesses (``mpiexec -n R`` for R > 1):

- size sweep (one rank) at each ``--sizes`` macro element size: ``single`` (``--single-scale``,
  the closed-form Neo-Hookean limit on the same mesh and load steps), ``operator`` (``--rtol
  inf``), ``rerun`` (the operator run once more on its own ``--out``: the latents persisted
  beside the replay store, nothing encoded) and, at ``--fallback-sizes``, ``fallback``
  (``--rtol`` FALLBACK_RTOL: a share of the points on the RVE solver, ~0.15 s a solve here),
  all ``--no-retrain``; ``limit_ratio`` = FE² total time / single-scale total time;
- rank sweep at ``--rank-size``: ``operator`` and ``heavy`` (``--rtol`` HEAVY_RTOL, most points
  on the RVE solver) on each of ``--ranks`` (oversubscribed beyond the machine's cores);
- a model for 64 and 1 024 ranks (``bench/scaling_model.py``) from the measured costs.

Per run: set-up, time per step split into operator, fine work, fallback-stage waiting and
communication (fine-stage wall − own fine work, per rank) and macro (the rest: assembly,
linear solve, checkpoints), peak RSS per rank, fallback counts, fine work max/mean over ranks.

Resumable: each run's ``summary.json`` stays in ``--out``/<case> with the command that made it
and is reused while that command is unchanged. Writes ``bench/results/scaling.json`` and
``scaling.png``. The full sweep (~400 to ~10⁵ points): ``.venv/bin/python bench/scaling.py``;
``--quick``: small sizes only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import scaling_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FALLBACK_RTOL, HEAVY_RTOL = "0.02", "0.002"
OPERATOR_ONLY = ["--rtol", "inf", "--no-retrain"]
MODES = {"single": ["--single-scale"], "operator": OPERATOR_ONLY, "rerun": OPERATOR_ONLY,
         "fallback": ["--rtol", FALLBACK_RTOL, "--no-retrain"],
         "heavy": ["--rtol", HEAVY_RTOL, "--no-retrain"]}
FULL = {"sizes": ["0.1", "0.05", "0.025", "0.0125", "0.00625"], "rank_size": "0.1",
        "fallback_sizes": ["0.1", "0.05", "0.025"]}  # 412 … 95 621 points; fallback ≤ 6 056
QUICK = {"sizes": ["0.2", "0.1"], "rank_size": "0.2", "fallback_sizes": ["0.2", "0.1"]}
MODEL_RANKS, MODEL_POINTS = (64, 1024), 100_000


def run_case(mode: str, size: str, ranks: int, args: argparse.Namespace) -> dict:
    """The summary of one run of the example, reused from ``args.out`` if its command is
    unchanged."""
    out = Path(args.out) / f"{mode}_h{size}_n{ranks}"
    cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), sys.executable,
           str(ROOT / "examples" / "fe2_composite.py"), "--mesh-size", size, "--steps",
           str(args.steps), "--quiet", *MODES[mode], "--out", str(out)]
    if args.model and mode != "single":
        cmd += ["--model", str(Path(args.model).resolve())]
    stamp, summary = out / "bench_command.json", out / "summary.json"
    if summary.exists() and stamp.exists() and json.loads(stamp.read_text()) == cmd[1:]:
        print(f"[{out.name}] reused", flush=True)
        return json.loads(summary.read_text())
    print(f"[{out.name}] {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True)
    if mode == "rerun":  # the first run wrote the latents; the second is the one recorded
        subprocess.run(cmd, check=True)
    stamp.write_text(json.dumps(cmd[1:]))
    return json.loads(summary.read_text())


def figures(mode: str, size: str, s: dict) -> dict:
    """The per-step and per-rank figures of one run's summary (seconds, MiB)."""
    steps, ranks = len(s["steps"]), s["ranks"]
    pr = s["per_rank"]
    zeros = [0.0] * ranks
    micro = np.array(pr.get("micro_time_s", zeros))
    work = np.array(pr.get("fine_solve_time_s", zeros))
    stage = np.array(pr.get("fine_time_s", zeros))
    retrain = sum(h.get("retrain_time_s", 0.0) for h in s["steps"])
    newton = int(sum(s["newton_iterations"]))
    return {
        "mode": mode, "mesh_size": size, "ranks": ranks, "points": s["quadrature_points"],
        "dofs": s["dofs"], "steps": steps, "newton_iterations": newton,
        "evaluations": newton + sum(len(h["residuals"]) for h in s["steps"]),
        "total_s": s["total_time_s"], "setup_s": s["setup_time_s"],
        "step_s": s["steps_time_s"] / steps,
        "operator_s_per_step": max(pr.get("operator_time_s", zeros)) / steps,
        "encode_s": max(pr.get("encode_time_s", zeros)),
        "fine_work_s_per_step": float(work.max()) / steps,
        "fine_wait_comm_s_per_step": float((stage - work).max()) / steps,
        "macro_s_per_step": float((s["steps_time_s"] - retrain - micro).mean()) / steps,
        "fine_balance": float(work.max() / work.mean()) if work.sum() > 0 else None,
        "fine_solves": int(sum(pr.get("fine_solves", zeros))),
        "fallback_rate": s.get("fallback_rate", 0.0),
        "fallback_points": sum(h.get("fallback_points", 0) for h in s["steps"]),
        "rss_mib_per_rank": [round(x, 1) for x in pr["peak_rss_mb"]],
        "per_rank": {"work_s": [round(float(w), 3) for w in
                                work + np.array(pr.get("operator_time_s", zeros))],
                     "fine_wait_comm_s": [round(float(c), 3) for c in stage - work],
                     "fine_solves": pr.get("fine_solves", zeros)},
    }


def measured_costs(sweep: list[dict], ranks: list[dict]) -> dict:
    """Per-point costs for the rank model, from the one-rank runs of the largest size."""
    op = max((r for r in sweep if r["mode"] == "operator"), key=lambda r: r["points"])
    fb = max((r for r in sweep if r["mode"] == "fallback"), key=lambda r: r["points"])
    ops = sorted((r for r in sweep if r["mode"] == "operator"), key=lambda r: r["points"])
    macro = [r["macro_s_per_step"] * r["steps"] / max(r["newton_iterations"], 1) for r in ops]
    rss = np.polyfit([r["points"] for r in ops], [r["rss_mib_per_rank"][0] for r in ops],
                     1) if len(ops) > 1 else (ops[0]["rss_mib_per_rank"][0], 0.0)
    balances = [r["fine_balance"] for r in ranks + sweep if r["fine_balance"] is not None]
    # RVE memory: the fallback run's peak over the operator run's, per point it solved
    same = next(r for r in ops if r["points"] == fb["points"])
    rve = max(0.0, (fb["rss_mib_per_rank"][0] - same["rss_mib_per_rank"][0])
              / max(fb["fallback_points"] / fb["steps"], 1))
    return {
        "from_points": op["points"],
        "operator_s_per_point_eval": op["operator_s_per_step"] * op["steps"]
        / (op["points"] * op["evaluations"]),
        "fine_s_per_solve": fb["fine_work_s_per_step"] * fb["steps"] / max(fb["fine_solves"], 1),
        "solves_per_fallback_point_step": fb["fine_solves"] / max(fb["fallback_points"], 1),
        "fallback_rate": fb["fallback_rate"],
        "evaluations_per_step": op["evaluations"] / op["steps"],
        "newton_per_step": op["newton_iterations"] / op["steps"],
        "dofs_per_point": op["dofs"] / op["points"],
        "macro_fit": scaling_model.power_fit([r["dofs"] for r in ops], macro),
        "imbalance": max(balances) if balances else 1.0,
        "rss_fit": (float(rss[1]), float(rss[0])), "rve_mib": rve, "rve_budget_mib": 2048.0,
    }


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for mode, style in (("single", "k.-"), ("operator", "o-"), ("rerun", "^-"),
                        ("fallback", "s-")):
        rows = [r for r in record["sweep"] if r["mode"] == mode]
        axes[0].loglog([r["points"] for r in rows], [r["step_s"] for r in rows], style,
                       label=mode)
    axes[0].set(xlabel="quadrature points (1 rank)", ylabel="s per load step",
                title="size sweep")
    axes[0].legend()
    for mode in ("operator", "rerun", "fallback"):
        rows = record["limit_ratio"].get(mode, [])
        axes[1].loglog([r["points"] for r in rows], [r["limit_ratio"] for r in rows], "o-",
                         label=mode)
    axes[1].axhline(2.0, color="k", ls="--", lw=0.8, label="target 2×")
    axes[1].set(xlabel="quadrature points", ylabel="FE² total / single-scale total",
                title="limit_ratio")
    axes[1].legend()
    rows = record["ranks"]
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for key, label in (("operator_s_per_step", "operator"), ("fine_work_s_per_step",
                                                            "fine work (max rank)"),
                       ("fine_wait_comm_s_per_step", "fine wait + comm."),
                       ("macro_s_per_step", "macro")):
        vals = np.array([r[key] for r in rows])
        axes[2].bar(x, vals, bottom=bottom, label=label)
        bottom += vals
    axes[2].set_xticks(x, [f"{r['mode']}\n{r['ranks']} ranks" for r in rows], fontsize=7)
    axes[2].set(ylabel="s per load step", title=f"ranks (oversubscribed beyond "
                f"{record['cores']} cores)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes only (minutes)")
    p.add_argument("--sizes", nargs="+", help="macro element sizes of the size sweep")
    p.add_argument("--rank-size", help="macro element size of the rank sweep")
    p.add_argument("--fallback-sizes", nargs="*", help="the sizes of --sizes that also run "
                   "with fallback (default: the full sweep's ≤ 6 056 points: beyond, its ~10 "
                   "%% of the points on the RVE solver take hours on this machine)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--model", help="the operator file (default: the example's; e.g. "
                   "examples/models/fe2_composite_fast.pt, the distilled encoder)")
    p.add_argument("--out", default="out/bench_scaling")
    p.add_argument("--note", default="", help="recorded with the figures (e.g. machine load)")
    args = p.parse_args()
    preset = QUICK if args.quick else FULL
    sizes, rank_size = args.sizes or preset["sizes"], args.rank_size or preset["rank_size"]
    with_fallback = set(preset["fallback_sizes"] if args.fallback_sizes is None
                        else args.fallback_sizes)
    sweep = [figures(m, h, run_case(m, h, 1, args)) for h in sizes
             for m in ("single", "operator", "rerun", "fallback")
             if m != "fallback" or h in with_fallback]
    ranks = [figures(m, rank_size, run_case(m, rank_size, n, args)) for m in ("operator", "heavy")
             for n in args.ranks]
    single = {r["mesh_size"]: r for r in sweep if r["mode"] == "single"}
    limit = {mode: [{"points": r["points"], "limit_ratio": r["total_s"]
                     / single[r["mesh_size"]]["total_s"],
                     "steps_ratio": r["step_s"] / single[r["mesh_size"]]["step_s"]}
                    for r in sweep if r["mode"] == mode]
             for mode in ("operator", "rerun", "fallback")}
    costs = measured_costs(sweep, ranks)
    sizes_b = scaling_model.collective_sizes(_structures(200))
    points = sorted({max(r["points"] for r in sweep), MODEL_POINTS})
    model = [scaling_model.predict(costs, sizes_b, n, P) for n in points for P in MODEL_RANKS]
    record = {
        "name": "scaling", "command": shlex.join(["python", "bench/scaling.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "cores": os.cpu_count(),
        "note": args.note, "operator": args.model or "the example's default",
        "steps": args.steps, "fallback_rtol": float(FALLBACK_RTOL),
        "heavy_rtol": float(HEAVY_RTOL), "target_limit_ratio": 2.0, "target_balance": 1.1,
        "fallback_sizes": [h for h in sizes if h in with_fallback],
        "sweep": sweep, "limit_ratio": limit, "ranks": ranks, "costs": costs,
        "collectives": sizes_b, "model": model, "assumptions": scaling_model.ASSUMPTIONS,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(record, indent=1))
    plot(record, RESULTS / "scaling.png")
    report(record)
    return record


def _structures(n: int) -> list:
    sys.path.insert(0, str(ROOT / "examples"))
    from fe2_composite import microstructures_at

    x = np.random.default_rng(2).uniform(0.3, 1.0, (n, 2))
    return microstructures_at(x, np.arange(n))


def report(record: dict) -> None:
    """Print the record's tables."""
    head = (f"{'mode':<9}{'h':>8}{'ranks':>6}{'points':>8}{'setup s':>9}{'s/step':>8}"
            f"{'op s':>7}{'fine s':>8}{'wait s':>8}{'macro s':>8}{'fallback':>9}{'bal':>6}"
            f"{'RSS MiB max':>12}")
    print(f"\n{record['note']}\n{head}")
    for r in record["sweep"] + record["ranks"]:
        bal = "" if r["fine_balance"] is None else f"{r['fine_balance']:.2f}"
        print(f"{r['mode']:<9}{r['mesh_size']:>8}{r['ranks']:>6}{r['points']:>8}"
              f"{r['setup_s']:9.2f}{r['step_s']:8.2f}{r['operator_s_per_step']:7.2f}"
              f"{r['fine_work_s_per_step']:8.2f}{r['fine_wait_comm_s_per_step']:8.2f}"
              f"{r['macro_s_per_step']:8.2f}{r['fallback_rate']:9.3f}{bal:>6}"
              f"{max(r['rss_mib_per_rank']):12.0f}")
    for mode, rows in record["limit_ratio"].items():
        print(f"limit_ratio {mode}: " + ", ".join(f"{r['points']} points {r['limit_ratio']:.1f}×"
                                                 for r in rows) + " (target ≤ 2×)")
    print("\nmodel (assumptions:)\n  " + "\n  ".join(record["assumptions"]))
    for m in record["model"]:
        print(f"  {m['points']} points on {m['ranks']} ranks: {m['step_s']:.3g} s/step "
              f"(operator {m['operator_s']:.2g}, fine {m['fine_s']:.2g}, macro "
              f"{m['macro_s']:.2g}, comm. {m['communication_s']:.2g}); "
              f"{m['rss_mib_per_rank']:.0f} MiB per rank, {m['rss_gib_all_ranks']:.1f} GiB in all")


if __name__ == "__main__":
    main()
