"""Few-shot transfer: fine-tuning the shipped operator to a new material against training from
scratch, on the same N fine solves.

A *case* is a material (or cell family) outside the shipped model's training, given by three
generate configs ``examples/configs/transfer_<case>.{pool,calibration,test}.yaml``: a pool of
training solves, a held-out calibration set (split conformal) and a test set. For each seed the
pool is cut into nested subsets of N samples (``neuroscale subset --samples N --seed S``: the
smaller lie inside the larger), and on each subset two models are trained with the commands a
user runs:

    finetune   neuroscale train transfer.finetune.yaml --init fe2_composite.pt --new-material …
    scratch    neuroscale train fe2_composite.train.yaml --data D_N.h5   (the shipped architecture)

then calibrated on the calibration set (``neuroscale calibrate``) and evaluated on the test set
(``neuroscale evaluate --json``): relative L2 error of P̄ and of the tangent, coverage of the
calibrated 95 % bound, ECE. Costs: the fine solves of the N samples (the solver's own time per
sample, meshing excluded; the pool's generate wall time is recorded too) and the training loop.
Both modes take the same optimisation settings, the shipped recipe's first stage
(examples/configs/transfer.finetune.yaml, examples/models/fe2_composite.train.yaml), with the
epochs set so that every run sees about ``--passes`` samples, or with ``--steps`` takes about
that many optimiser steps (at least ``--min-epochs`` epochs).

Resumable: each (case, mode, N, seed) result is written to the record as it finishes, and a
rerun skips the ones the record has. Prints a table; writes ``bench/results/transfer.json`` and
``bench/results/transfer.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "fe2_composite.pt"
CONFIGS = {"finetune": ROOT / "examples" / "configs" / "transfer.finetune.yaml",
           "scratch": ROOT / "examples" / "models" / "fe2_composite.train.yaml"}
"""Training configs of the two modes: the same optimisation settings (the shipped recipe's
first stage), from the shipped model or, with the recipe's architecture, from scratch."""
RESULTS = ROOT / "bench" / "results"
MODES = ("finetune", "scratch")
SETS = ("pool", "calibration", "test")
LEVEL = "0.95"


@dataclass(frozen=True)
class Case:
    """A transfer target: its name and the generate configs of its three data sets."""

    name: str
    configs: dict[str, Path]

    @classmethod
    def named(cls, name: str) -> Case:
        """The case of ``examples/configs/transfer_<name>.{pool,calibration,test}.yaml``."""
        base = ROOT / "examples" / "configs" / f"transfer_{name}"
        return cls(name, {s: Path(f"{base}.{s}.yaml") for s in SETS})


@dataclass(frozen=True)
class Budget:
    """Training settings of both modes: about ``passes`` samples seen per run, or with
    ``steps`` about that many optimiser steps (a fixed count of samples gives a larger N
    fewer steps), at least ``min_epochs`` epochs, batches of ``batch_size`` samples (the
    recipe's 96 would leave a run on 300 samples a few dozen steps)."""

    passes: int = 2000
    min_epochs: int = 10
    batch_size: int = 32
    steps: int | None = None

    def epochs(self, n: int) -> int:
        if self.steps is not None:
            return max(self.min_epochs, math.ceil(self.steps / math.ceil(n / self.batch_size)))
        return max(self.min_epochs, math.ceil(self.passes / n))


def cli(*argv: str) -> str:
    """Run one `neuroscale` command in this process; its standard output (raises on error)."""
    from neuroscale_couple.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    if code:
        raise RuntimeError(f"neuroscale {' '.join(argv)} failed (exit {code})")
    return out.getvalue()


def make_data(case: Case, work: Path, ranks: int) -> dict:
    """The case's data sets under ``work`` (``<case>.<set>.h5``), generated with ``ranks`` MPI
    ranks where missing; per set its path, samples, summed solver seconds and, if made now, the
    generate wall seconds."""
    from neuroscale_couple.store import load_rve_dataset

    out = {}
    for name in SETS:
        path = work / f"{case.name}.{name}.h5"
        wall = None
        if not path.exists():
            cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks),
                   sys.executable, "-m", "neuroscale_couple.cli", "generate",
                   str(case.configs[name]), "--out", str(path), "--quiet"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            wall = time.perf_counter() - t0
        d = load_rve_dataset(path)
        out["material"] = {k: d["config"][k] for k in ("law", "matrix", "fibre")}
        out[name] = {"path": shown(path), "config": shown(case.configs[name]),
                     "samples": len(d["samples/F"]), "solve_s": float(d["samples/time_s"].sum()),
                     "generate_wall_s": wall, "ranks": ranks if wall is not None else None}
    return out


def shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it (as the record shows it)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def nested_subsets(pool: Path, sizes: list[int], seed: int, work: Path) -> dict[int, Path]:
    """``neuroscale subset --samples N --seed seed`` of ``pool`` for each N (nested)."""
    paths = {}
    for n in sizes:
        path = work / f"{pool.stem}.seed{seed}.n{n}.h5"
        if not path.exists():
            cli("subset", str(pool), "--samples", str(n), "--seed", str(seed), "--out", str(path))
        paths[n] = path
    return paths


def train_config(mode: str, epochs: int, batch_size: int, seed: int, path: Path) -> Path:
    """The config of ``mode`` (:data:`CONFIGS`) with ``epochs`` (patience as many),
    ``batch_size`` and ``seed``, written to ``path``."""
    recipe = yaml.safe_load(CONFIGS[mode].read_text())
    recipe["training"].update(epochs=epochs, patience=epochs, batch_size=batch_size, seed=seed)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_one(mode: str, data: Path, seed: int, budget: Budget, sets: dict, work: Path,
            model: Path = MODEL) -> dict:
    """Train (``mode``), calibrate and evaluate one model on the subset ``data``; its metrics
    and costs."""
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.store import load_rve_dataset

    d = load_rve_dataset(data)
    n = len(d["samples/F"])
    epochs = budget.epochs(n)
    out = work / f"{data.stem}.{mode}.pt"
    config = train_config(mode, epochs, budget.batch_size, seed,
                          work / f"{data.stem}.{mode}.yaml")
    init = ["--init", str(model), "--new-material"] if mode == "finetune" else []
    t0 = time.perf_counter()
    cli("train", str(config), "--data", str(data), "--out", str(out), "--quiet", *init)
    wall = time.perf_counter() - t0
    calibration, test = (str(ROOT / sets[k]["path"]) for k in ("calibration", "test"))
    cli("calibrate", "--model", str(out), "--data", calibration)
    metrics = json.loads(cli("evaluate", "--model", str(out), "--data", test, "--json"))
    card = load_operator(out).card
    return {"mode": mode, "n": n, "seed": seed, "epochs": epochs,
            "best_epoch": card["history"]["best_epoch"],
            "rel_l2_stress": metrics["rel_l2_stress"],
            "rel_l2_tangent": metrics["rel_l2_tangent"],
            "coverage_95": metrics["bound_coverage"][LEVEL],
            "ellipsoid_coverage_95": metrics["coverage"][LEVEL], "ece": metrics["ece"],
            "test_samples": metrics["n_samples"],
            "train_s": card["history"]["time_s"], "train_wall_s": wall,
            "solve_s": float(d["samples/time_s"].sum())}


def zero_shot(sets: dict, work: Path, model: Path = MODEL) -> dict | None:
    """The model as shipped, calibrated on the case's calibration set and evaluated on its test
    set, where the case is of the model's own material (a new cell family); None where it is
    not (the model would answer for its own phases)."""
    import shutil

    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.store import load_rve_dataset
    from neuroscale_couple.structures import data_family

    d = load_rve_dataset(ROOT / sets["pool"]["path"])
    if load_operator(model).adopt_material(data_family(d).family_config(d["config"])) is not None:
        return None
    copy = work / f"{Path(sets['pool']['path']).stem}.shipped.pt"
    shutil.copyfile(model, copy)
    calibration, test = (str(ROOT / sets[k]["path"]) for k in ("calibration", "test"))
    cli("calibrate", "--model", str(copy), "--data", calibration)
    metrics = json.loads(cli("evaluate", "--model", str(copy), "--data", test, "--json"))
    return {"rel_l2_stress": metrics["rel_l2_stress"],
            "rel_l2_tangent": metrics["rel_l2_tangent"],
            "coverage_95": metrics["bound_coverage"][LEVEL], "ece": metrics["ece"]}


def summarise(runs: dict) -> dict:
    """Per case, mode and N: mean, min and max over seeds of each metric and cost."""
    keys = ("rel_l2_stress", "rel_l2_tangent", "coverage_95", "ece", "train_s", "solve_s")
    groups: dict = {}
    for key, r in runs.items():
        case = key.split("/", 1)[0]
        groups.setdefault(case, {}).setdefault(r["mode"], {}).setdefault(str(r["n"]), []).append(r)
    return {case: {mode: {n: {"seeds": len(rs), **{k: {"mean": float(np.mean([r[k] for r in rs])),
                                                         "min": float(min(r[k] for r in rs)),
                                                         "max": float(max(r[k] for r in rs))}
                                                     for k in keys}}
                          for n, rs in sorted(by_n.items(), key=lambda kv: int(kv[0]))}
                   for mode, by_n in modes.items()}
            for case, modes in groups.items()}


def run(cases: list[Case], sizes: list[int], seeds: list[int], budget: Budget, work: Path,
        record_path: Path, command: str, ranks: int = 2, model: Path = MODEL) -> dict:
    """Every (case, mode, N, seed) run missing from the record at ``record_path``, saved after
    each one; returns the record (``partial`` until all are done)."""
    work.mkdir(parents=True, exist_ok=True)
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    configs = {mode: shown(path) for mode, path in CONFIGS.items()}
    record.update(command=command, model=shown(model), sizes=sizes, seeds=seeds,
                  budget={"passes": budget.passes, "min_epochs": budget.min_epochs,
                          "batch_size": budget.batch_size, "steps": budget.steps,
                          "configs": configs})
    record.setdefault("runs", {})
    record.setdefault("cases", {})
    todo = [(c, m, n, s) for c in cases for s in seeds for n in sizes for m in MODES
            if f"{c.name}/{m}/N{n}/seed{s}" not in record["runs"]]
    for case in cases:
        earlier, made = record["cases"].get(case.name, {}), make_data(case, work, ranks)
        for name in SETS:  # a set made by an earlier run keeps its generate time
            if made[name]["generate_wall_s"] is None and name in earlier:
                made[name].update({k: earlier[name][k] for k in ("generate_wall_s", "ranks")})
        made["zero_shot"] = (earlier["zero_shot"] if "zero_shot" in earlier
                             else zero_shot(made, work, model))
        record["cases"][case.name] = made
    for case, mode, n, seed in todo:
        sets = record["cases"][case.name]
        subset = nested_subsets(ROOT / sets["pool"]["path"], sizes, seed, work)[n]
        t0 = time.perf_counter()
        result = run_one(mode, subset, seed, budget, sets, work, model)
        record["runs"][f"{case.name}/{mode}/N{n}/seed{seed}"] = result
        print(f"{case.name:<10}{mode:<10}N={n:<5}seed {seed}: error {result['rel_l2_stress']:.4f}, "
              f"coverage {result['coverage_95']:.3f}, ECE {result['ece']:.3f}, train "
              f"{result['train_s']:.0f} s ({time.perf_counter() - t0:.0f} s in all)", flush=True)
        save(record, record_path, cases, sizes, seeds)
    save(record, record_path, cases, sizes, seeds)
    return record


def save(record: dict, path: Path, cases: list[Case], sizes: list[int], seeds: list[int]) -> None:
    """Write the record with its summary, date, machine and completeness."""
    want = {f"{c.name}/{m}/N{n}/seed{s}" for c in cases for m in MODES for n in sizes
            for s in seeds}
    record.update(summary=summarise(record["runs"]), partial=not want <= set(record["runs"]),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores (shared), "
                          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def print_table(record: dict) -> None:
    print(f"\n{'case':<10}{'mode':<10}{'N':>5}{'seeds':>6}{'P̄ error':>10}{'A error':>9}"
          f"{'cov 95%':>9}{'ECE':>7}{'solve s':>9}{'train s':>9}")
    for case, modes in record["summary"].items():
        for mode, by_n in modes.items():
            for n, s in by_n.items():
                print(f"{case:<10}{mode:<10}{n:>5}{s['seeds']:>6}"
                      f"{s['rel_l2_stress']['mean']:>10.4f}{s['rel_l2_tangent']['mean']:>9.4f}"
                      f"{s['coverage_95']['mean']:>9.3f}{s['ece']['mean']:>7.3f}"
                      f"{s['solve_s']['mean']:>9.1f}{s['train_s']['mean']:>9.0f}")


def plot(record: dict, path: Path) -> None:
    """Test error and coverage of the 95 % bound against N, both modes (bars: min–max over
    seeds), one row per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(record["summary"])
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 4 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases, strict=True):
        for mode, by_n in record["summary"][case].items():
            n = [int(k) for k in by_n]
            for ax, key in zip(row, ("rel_l2_stress", "coverage_95"), strict=True):
                mean = np.array([s[key]["mean"] for s in by_n.values()])
                lo = mean - [s[key]["min"] for s in by_n.values()]
                hi = [s[key]["max"] for s in by_n.values()] - mean
                ax.errorbar(n, mean, yerr=[lo, hi], marker="o", capsize=3, label=mode)
        row[0].set(xscale="log", yscale="log", xlabel="N fine solves",
                   ylabel="relative L2 error of P̄ (test)", title=f"{case}: test error")
        row[1].axhline(0.95, color="k", lw=1, ls="--")
        row[1].set(xscale="log", xlabel="N fine solves", ylabel="coverage of the 95 % bound",
                   title=f"{case}: calibration (conformal, held-out set)")
        for ax in row:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["stiff"], help="names of transfer_<case> "
                   "configs in examples/configs")
    p.add_argument("--sizes", nargs="+", type=int, default=[10, 30, 100, 300])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--passes", type=int, default=Budget.passes)
    p.add_argument("--min-epochs", type=int, default=Budget.min_epochs)
    p.add_argument("--batch", type=int, default=Budget.batch_size)
    p.add_argument("--steps", type=int, help="budget optimiser steps instead of --passes")
    p.add_argument("--np", type=int, default=2, help="MPI ranks that generate the data sets")
    p.add_argument("--work", default=str(ROOT / "out" / "transfer"))
    p.add_argument("--out", default=str(RESULTS / "transfer.json"))
    p.add_argument("--report", action="store_true", help="only print the table and draw the "
                   "plot of the record as it is (e.g. a partial one while a run goes on)")
    args = p.parse_args(argv)
    if args.report:
        record = json.loads(Path(args.out).read_text())
    else:
        command = "python bench/transfer.py " + " ".join(shlex.quote(a) for a in (
            sys.argv[1:] if argv is None else argv))
        record = run([Case.named(c) for c in args.cases], args.sizes, args.seeds,
                     Budget(args.passes, args.min_epochs, args.batch, args.steps), Path(args.work),
                     Path(args.out), command.strip(), args.np)
    print_table(record)
    plot(record, Path(args.out).with_suffix(".png"))
    print(f"→ {args.out}{' (partial)' if record['partial'] else ''}")


if __name__ == "__main__":
    main()
