"""Ablations of the operator (SANO) that can decide: each variant over seeds, with intervals.

Every run trains the shipped model's architecture and settings
(``examples/models/fe2_composite.train.yaml``) from scratch, in its own process, on one thread,
for ``--budget-cpu-s`` CPU seconds of that process (as bench/baselines.py, on its data), with one
change:

- ``full``: none (the reference);
- ``one_scale``: no wavelet decomposition (``levels: 0``): one scale, the feature map's pixels
  as tokens, where ``full`` has three detail scales and the approximation;
- ``pooling``: no cross-scale attention (``attention_blocks: 0``): each scale's tokens
  mean-pooled and mixed by the learned scale weights;
- ``no_physics``: the physics losses off (equilibrium, consistency, Hill–Mandel, symmetry
  weights 0); the data terms (stress, tangent, likelihood, fine fields) as in ``full``;
- ``uncertainty_weights`` / ``gradnorm``: the loss terms balanced by learned weights
  (``weighting: uncertainty`` or ``gradnorm``) instead of the fixed ones.

Seed s sets the initial weights, the batch order and the augmentation; the train / validation /
calibration / test split is the same for all. Scored on the test set as bench/baselines.py
(relative L2 of P̄ and A, 95 % coverage and ECE after split-conformal calibration), and the
decoded micro field P(y) by its H⁻¹ equilibrium residual and its gap to the coarse P̄. Per variant:
mean and the 95 % t-interval over seeds, and the difference to ``full`` paired by seed with its
interval — a variant is decided better or worse only where that interval excludes zero.

Run (data as for bench/baselines.py: ``make bench-baselines`` generates it)::

    PYTHONPATH=$PWD nice -n 5 .venv/bin/python bench/ablations.py \\
        --train out/baselines.train.h5 --calibration out/baselines.calibration.h5 \\
        --test out/baselines.test.h5 --budget-cpu-s 300 --seeds 0 1 2

writes ``bench/results/ablations.json`` and ``ablations.png``; finished runs are kept in
``--work`` and reused with ``--reuse``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from baselines import SHIPPED_TRAIN, load, sano_predict, scores, train_sano
from scipy import stats
from workers import budget_arguments, budget_record, run_jobs

PHYSICS_OFF = {"equilibrium": 0.0, "consistency": 0.0, "hill_mandel": 0.0, "symmetry": 0.0}
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    # name: (label, model config change, training config change)
    "full": ("full (3 wavelet levels, cross-scale attention, physics losses)", {}, {}),
    "one_scale": ("one scale (no wavelet decomposition)", {"levels": 0}, {}),
    "pooling": ("plain pooling (no cross-scale attention)", {"attention_blocks": 0}, {}),
    "no_physics": ("no physics losses", {}, {"weights": PHYSICS_OFF}),
    "uncertainty_weights": ("learned uncertainty weights", {}, {"weighting": "uncertainty"}),
    "gradnorm": ("GradNorm weights", {}, {"weighting": "gradnorm"}),
}
METRICS = ("rel_l2_stress", "rel_l2_tangent", "coverage_95", "ece", "equilibrium_h-1",
           "coarse_fine_rel_gap")


def training_change(variant: str, seed: int) -> dict:
    """The training config keys of a variant's run with ``seed`` (weights merged into the
    shipped model's)."""
    from neuroscale_couple.cli import load_yaml

    change = dict(VARIANTS[variant][2])
    if "weights" in change:
        change["weights"] = {**load_yaml(SHIPPED_TRAIN)["training"]["weights"],
                             **change["weights"]}
    return {**change, "seed": seed}


def field_measures(model, test, n: int = 256) -> dict:
    """How well the decoded micro field P(y) of the first ``n`` test samples obeys the physics:
    its H⁻¹ equilibrium residual, and the gap ‖⟨P(y)⟩ − P̄‖/‖P̄‖ to the coarse prediction."""
    from neuroscale_couple.physics import equilibrium_loss
    from neuroscale_couple.training import predict_dataset

    model = model.double()
    sample = test.subset(np.arange(min(n, len(test))))
    uniq, inv = torch.unique(sample.micro_index, return_inverse=True)
    with torch.no_grad():
        images = sample.images[uniq].double()
        z, h = model.encode(images)
        fields = model.decode(images[inv], z[inv], h[inv], sample.F.double())
        mean = predict_dataset(model, sample)["mean"].double()
        return {"equilibrium_h-1": float(equilibrium_loss(fields["P"], model.sigma_ref)),
                "coarse_fine_rel_gap": float((fields["P"].mean(dim=(1, 2)) - mean).norm()
                                             / mean.norm())}


def worker(args: argparse.Namespace) -> dict:
    """Train (at the budget) and score one variant with one seed in this process."""
    torch.set_num_threads(1)
    (train_all, _), (test, _), (calibration, _) = (
        load(p) for p in (args.train, args.test, args.calibration))
    fit, validation = train_all.split(0.1, 0)
    t0 = time.process_time()
    model, history = train_sano(train_all, fit, validation, args.budget_cpu_s,
                                VARIANTS[args.worker][1],
                                training_change(args.worker, args.seed))
    return {"variant": args.worker, "seed": args.seed, "train_cpu_s": time.process_time() - t0,
            "parameters": sum(p.numel() for p in model.parameters()),
            "history": {"epochs": len(history["val"]), "best_epoch": history["best_epoch"],
                        "budget_spent": history["time_limited"]},
            "scores": {**scores(sano_predict(model), test, calibration),
                       **field_measures(model, test)}}


def interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the ``level`` t-interval of the mean of samples ``x`` (n ≥ 2)."""
    m, n = float(np.mean(x)), len(x)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * np.std(x, ddof=1) / np.sqrt(n))
    return m, m - half, m + half


def summarise(runs: dict[tuple[str, int], dict], variants: list[str],
              seeds: list[int]) -> list[dict]:
    """Per variant: each metric's mean and 95 % interval over the seeds, and its difference
    to ``full`` paired by seed (where both ran)."""
    rows = []
    for v in variants:
        ok = [s for s in seeds if "scores" in runs[v, s]]
        row: dict = {"variant": v, "label": VARIANTS[v][0], "seeds": ok,
                     "failed": {s: runs[v, s]["error"] for s in seeds if s not in ok},
                     "epochs": [runs[v, s]["history"]["epochs"] for s in ok]}
        for key in METRICS:
            x = np.array([runs[v, s]["scores"].get(key, np.nan) for s in ok])
            row[key] = {"per_seed": x.tolist()}
            if len(x) >= 2:
                row[key].update(zip(("mean", "low", "high"), interval(x), strict=True))
            paired = [s for s in ok if v != "full" and "scores" in runs.get(("full", s), {})]
            if len(paired) >= 2:
                d = x[[ok.index(s) for s in paired]] - np.array(
                    [runs["full", s]["scores"].get(key, np.nan) for s in paired])
                m, lo, hi = interval(d)
                row[key]["vs_full"] = {"mean": m, "low": lo, "high": hi,
                                       "decided": bool(lo > 0 or hi < 0)}
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    """Means with intervals, and the paired differences to ``full``."""
    print(f"{'variant':58s} {'P̄ rel. L2 (95 % CI)':>24s} {'vs full':>22s} {'ECE':>18s}")
    for r in rows:
        p, e = r["rel_l2_stress"], r["ece"]
        if "mean" not in p:
            print(f"{r['label']:58s} {p['per_seed']} {r['failed']}")
            continue
        d = p.get("vs_full")
        vs = f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else ""
        print(f"{r['label']:58s} {p['mean']:.4f} [{p['low']:.4f}, {p['high']:.4f}] {vs:>22s} "
              f"{e.get('mean', np.nan):.3f} [{e.get('low', np.nan):.3f}, "
              f"{e.get('high', np.nan):.3f}]")


def plot(rows: list[dict], path: Path, budget: float) -> None:
    """Per variant and metric (P̄ error, ECE): each seed's value and the mean with its
    interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("rel_l2_stress", "ece"),
                              ("relative L2 error of P̄ (test)", "ECE (test)"), strict=True):
        for i, r in enumerate(rows):
            m = r[key]
            ax.plot([i] * len(m["per_seed"]), m["per_seed"], "o", color="tab:gray", ms=4)
            if "mean" in m:
                ax.errorbar(i, m["mean"], yerr=[[m["mean"] - m["low"]], [m["high"] - m["mean"]]],
                            fmt="s", color="tab:blue", capsize=4)
        ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=20, ha="right")
        ax.set_title(title)
    fig.suptitle(f"Ablations: {budget:.0f} CPU s per run, seeds as dots, mean and 95 % "
                 "t-interval")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    budget_arguments(ap, "ablations", "run")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        Path(args.json).write_text(json.dumps(worker(args), indent=1))
        return
    if len(args.seeds) < 2:
        ap.error("--seeds: give at least two seeds (an interval needs them)")
    started, work = time.perf_counter(), Path(args.work)
    jobs = {f"{v}-seed{s}": [sys.executable, __file__, "--worker", v, "--seed", str(s),
                             "--train", args.train, "--test", args.test, "--calibration",
                             args.calibration, "--budget-cpu-s", str(args.budget_cpu_s),
                             "--json", str(work / f"{v}-seed{s}.json")]
            for s in args.seeds for v in args.variants}
    records, ran = run_jobs(jobs, work, args.parallel, args.reuse)
    runs = {(v, s): records[f"{v}-seed{s}"] for v in args.variants for s in args.seeds}
    rows = summarise(runs, args.variants, args.seeds)
    print_table(rows)
    record = {**budget_record(args, "run", started), "seeds": args.seeds,
              "reused": sorted(set(jobs) - set(ran)), "variants": rows,
              "runs": [runs[k] for k in sorted(runs)]}
    Path(args.json).write_text(json.dumps(record, indent=1))
    plot(rows, Path(args.plot), args.budget_cpu_s)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
