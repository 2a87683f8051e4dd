"""The calibrated bound inside and beyond the training region, per direction of loading.

For held-out fibre cells (other seeds than the training data, same fibre fractions) the shipped
operator and the true periodic RVE are evaluated along three loading paths — uniaxial tension
F̄ = diag(1 + s, 1), compression diag(1 − s, 1) and simple shear [[1, s], [0, 1]] — for s up to
twice the trained stretch. At each point: the operator's relative stress error, its calibrated
95 % bound, whether the bound covered the error, and whether the model's training region
(``neuroscale_couple.region``) holds the point (the Coupler sends those outside to the fine
solver). Each path is solved by one RVE per cell with warm starts along it; an RVE solve that
fails (large compression) is recorded as such.

Prints a table and writes ``bench/results/region.json`` and ``bench/results/region.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "fe2_composite.pt"
RESULTS = ROOT / "bench" / "results"
PATHS = {"tension": lambda s: np.diag([1 + s, 1.0]),
         "compression": lambda s: np.diag([1 - s, 1.0]),
         "shear": lambda s: np.array([[1.0, s], [0.0, 1.0]])}
CONFIDENCE = 0.95


def cells(n: int) -> list:
    from neuroscale_couple.solvers.microstructure import random_fibres

    rng = np.random.default_rng(900)
    return [random_fibres(float(rng.uniform(0.15, 0.45)), int(rng.integers(1, 7)),
                          seed=900_000 + i) for i in range(n)]


def true_responses(cell, F: np.ndarray, material: dict) -> tuple[np.ndarray, np.ndarray]:
    """RVE stresses (n, 2, 2) along a path F (n, 2, 2) with warm starts, one load at a time;
    NaN from the first failed solve on (a path does not resume past a failure)."""
    from neuroscale_couple.errors import SolveError
    from neuroscale_couple.fine import close_solver
    from neuroscale_couple.solvers.rve_fenicsx import rve_from_config

    P = np.full((len(F), 2, 2), np.nan)
    solver = rve_from_config(material, cell)
    try:
        for k, Fk in enumerate(F):
            try:
                P[k] = solver.solve(Fk, point_ids=[0], tangent=False).stress[0]
            except SolveError:
                break
    finally:
        close_solver(solver)
    return P, np.isfinite(P).all(axis=(1, 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=6)
    p.add_argument("--points", type=int, default=12, help="magnitudes s per path")
    args = p.parse_args()

    from neuroscale_couple.calibration import Calibration
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.region import stretch_distance

    model = load_operator(MODEL).double().eval()
    region, cal = model.region, Calibration.from_dict(model.calibration)
    material = {k: model.card["data_config"][k] for k in ("law", "matrix", "fibre", "mesh")}
    magnitudes = np.linspace(0.05, 2 * region.stretch, args.points)
    structures = cells(args.cells)
    z = model.latents(structures)
    t0 = time.perf_counter()
    rows = []
    for direction, make in PATHS.items():
        F = np.stack([make(s) for s in magnitudes])
        for c, cell in enumerate(structures):
            P_true, solved = true_responses(cell, F, material)
            with torch.no_grad():
                pred = model.predict(z[[c] * len(F)], torch.as_tensor(F))
            mean = pred["mean"].numpy()
            bound = cal.error_bound(pred["cov"].numpy(), CONFIDENCE)
            outside = region.load_outside(F)
            for k in range(len(F)):
                error = float(np.linalg.norm(mean[k] - P_true[k])) if solved[k] else None
                size = float(np.linalg.norm(P_true[k])) if solved[k] else None
                rows.append({"direction": direction, "cell": c, "s": float(magnitudes[k]),
                             "stretch": float(stretch_distance(F[k][None])[0]),
                             "outside": bool(outside[k]), "solved": bool(solved[k]),
                             "bound": float(bound[k]), "error": error, "stress": size,
                             "covered": None if error is None else bool(error <= bound[k])})
        print(f"{direction}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = {}
    for direction in PATHS:
        mine = [r for r in rows if r["direction"] == direction]
        summary[direction] = {}
        for where, inside in (("inside", False), ("outside", True)):
            part = [r for r in mine if r["outside"] == inside]
            solved = [r for r in part if r["solved"]]
            summary[direction][where] = {
                "points": len(part), "solved": len(solved),
                "coverage": (sum(r["covered"] for r in solved) / len(solved)) if solved else None,
                "max_relative_error": max((r["error"] / r["stress"] for r in solved),
                                          default=None)}
    record = {"model": MODEL.name, "confidence": CONFIDENCE, "trained_stretch": region.stretch,
              "cells": args.cells, "magnitudes": magnitudes.tolist(), "summary": summary,
              "points": rows, "time_s": time.perf_counter() - t0,
              "command": f"python bench/region.py --cells {args.cells} --points {args.points}",
              "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "region.json").write_text(json.dumps(record, indent=1))
    plot(record, RESULTS / "region.png")
    print(f"\n{'direction':<13}{'where':<9}{'points':>7}{'solved':>7}{'coverage':>10}"
          f"{'max rel err':>12}")
    for direction, parts in summary.items():
        for where, s in parts.items():
            cov = "–" if s["coverage"] is None else f"{s['coverage']:.1%}"
            err = "–" if s["max_relative_error"] is None else f"{s['max_relative_error']:.1%}"
            print(f"{direction:<13}{where:<9}{s['points']:>7}{s['solved']:>7}{cov:>10}{err:>12}")
    print(f"→ {RESULTS / 'region.json'}")


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, direction in zip(axes, PATHS, strict=True):
        mine = [r for r in record["points"] if r["direction"] == direction and r["solved"]]
        for c in sorted({r["cell"] for r in mine}):
            pts = [r for r in mine if r["cell"] == c]
            s = [r["stretch"] for r in pts]
            line, = ax.plot(s, [r["error"] / r["stress"] for r in pts], "o-", ms=3)
            ax.plot(s, [r["bound"] / r["stress"] for r in pts], "--", color=line.get_color())
        ax.axvline(record["trained_stretch"], color="k", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("‖U − I‖ (vertical line: trained)")
        ax.set_title(f"{direction}: error (solid) and 95 % bound (dashed)")
    axes[0].set_ylabel("relative to ‖P̄_RVE‖")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
