"""Baselines against the operator (SANO) on the same data, at the same compute budget.

Every model trains in its own process, on one thread (``torch.set_num_threads(1)``), for at most
``--budget-cpu-s`` CPU seconds of that process (``time.process_time``, checked after every batch;
SANO validates the epoch the limit cuts short): a budget that the load of a shared machine does not
shrink. The models, on one train / validation / calibration / test split:

- ``sano``: the operator, from scratch through the project's training code
  (:func:`neuroscale_couple.training.train`, ``time_limit_s`` on the CPU clock), with the
  shipped model's architecture and optimisation settings
  (``examples/models/fe2_composite.train.yaml``);
- ``fno``: the ``neuraloperator`` FNO (:class:`~neuroscale_couple.baselines.FNOBaseline`);
- ``equino``: EquiNO-style reduced basis (:class:`~neuroscale_couple.baselines.EquiNOStyle`);
- ``mlp``: a deep ensemble of MLPs on descriptors
  (:class:`~neuroscale_couple.baselines.DescriptorMLP`);
- ``pipno``: PIPNO-style physics-informed parallel Fourier operator of the micro field
  (:class:`~neuroscale_couple.baselines.PIPNOStyle`): equilibrium residual + data terms;
- ``ppino``: PPI-NO-style FNO with a pseudo-physics learnt from the training part's micro fields
  (:class:`~neuroscale_couple.baselines.PPINOStyle`; needs ``samples/fields/w`` at 32²);
- ``shipped``: the shipped operator (``examples/models/fe2_composite.pt``, trained on the full
  data, 180 epochs), evaluated only: a separate row, not at the budget.

Scored on the test set: relative L2 error of P̄ and of the tangent A; objectivity (largest
‖P̄(QF̄) − QP̄(F̄)‖/‖P̄‖ over random rotations, any angle and within ±0.1 rad) and the major
symmetry of A (:mod:`neuroscale_couple.baselines.measures`); inference throughput (stress +
tangent from images and loads, test samples per CPU second, one thread); for models with an
uncertainty, split-conformal calibration on the calibration set
(:func:`~neuroscale_couple.calibration.fit_conformal`, global) and the test set's 95 %
coverage and ECE.

Run (data from ``bench/configs/baselines.*.yaml`` with ``neuroscale generate``)::

    PYTHONPATH=$PWD:out/pydeps nice -n 5 .venv/bin/python bench/baselines.py \\
        --train out/baselines.train.h5 --calibration out/baselines.calibration.h5 \\
        --test out/baselines.test.h5 --budget-cpu-s 300

writes ``bench/results/baselines.json`` and ``baselines.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from workers import ROOT, budget_arguments, budget_record, run_jobs

SHIPPED = ROOT / "examples" / "models" / "fe2_composite.pt"
SHIPPED_TRAIN = ROOT / "examples" / "models" / "fe2_composite.train.yaml"
MODELS = ("sano", "fno", "equino", "mlp", "pipno", "ppino", "shipped")
LABELS = {"sano": "SANO (this budget)", "fno": "FNO (neuraloperator)", "equino": "EquiNO-style",
          "mlp": "MLP on descriptors (ensemble of 4)", "pipno": "PIPNO-style",
          "ppino": "PPI-NO-style",
          "shipped": "SANO shipped (full data; not at the budget)"}
RESOLUTION = 32
OBJECTIVITY_SAMPLES = 96
Predict = Callable[..., dict]  # (data set, F̄ or None: its own loads) → predictions


def load(path: str, resolution: int = RESOLUTION):
    """(TrainingData, stored arrays) of a generated data set."""
    from neuroscale_couple.store import load_rve_dataset
    from neuroscale_couple.training import TrainingData

    arrays = load_rve_dataset(path)
    return TrainingData.from_arrays(arrays, resolution, source=path), arrays


def micro_arrays(arrays: dict) -> dict[str, np.ndarray]:
    """The ``micro/...`` arrays of a data set, without the prefix."""
    return {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("micro/")}


def scores(predict: Predict, test, calibration) -> dict:
    """Accuracy, objectivity, symmetry, throughput and (with a covariance) calibration of a
    model's ``predict`` on the test and calibration sets."""
    from neuroscale_couple.baselines import major_symmetry_error, objectivity_error
    from neuroscale_couple.calibration import coverage, expected_calibration_error, fit_conformal

    t0, w0 = time.process_time(), time.perf_counter()
    pred = predict(test, None)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    P, A = test.P.double(), test.A.double()
    mean, tangent = pred["mean"].double(), pred["tangent"].double()
    sub = test.subset(np.arange(min(OBJECTIVITY_SAMPLES, len(test))))

    def stress(F: torch.Tensor) -> torch.Tensor:
        return predict(sub, F.to(sub.F.dtype))["mean"].double()

    out = {"rel_l2_stress": float(torch.linalg.norm(mean - P) / torch.linalg.norm(P)),
           "rel_l2_tangent": float(torch.linalg.norm(tangent - A) / torch.linalg.norm(A)),
           "objectivity_any_angle": objectivity_error(stress, sub.F.double()),
           "objectivity_0.1rad": objectivity_error(stress, sub.F.double(), max_angle=0.1),
           "major_symmetry": major_symmetry_error(tangent),
           "throughput_per_cpu_s": len(test) / cpu, "throughput_per_wall_s": len(test) / wall,
           "n_test": len(test)}
    if pred.get("cov") is not None:
        cal_pred = predict(calibration, None)
        n_c, n_t = len(calibration), len(test)
        cal = fit_conformal(calibration.P.double().reshape(n_c, -1).numpy(),
                            cal_pred["mean"].double().reshape(n_c, -1).numpy(),
                            cal_pred["cov"].double().numpy())
        y, mu, cov = (P.reshape(n_t, -1).numpy(), mean.reshape(n_t, -1).numpy(),
                      pred["cov"].double().numpy())
        out.update(coverage_95=coverage(y, mu, cov, cal, (0.95,))[0.95],
                   ece=expected_calibration_error(y, mu, cov, cal), n_calibration=n_c)
    return out


def sano_predict(model) -> Predict:
    """Ensemble predictions of an operator on a data set (at its loads, or at ``F``)."""
    from neuroscale_couple.training import predict_dataset

    def predict(data, F):
        return predict_dataset(model, data if F is None else dataclasses.replace(data, F=F))

    return predict


def baseline_predict(model) -> Predict:
    """Predictions of a baseline on a data set holding its inputs as ``images``."""
    def predict(data, F):
        return model.predict(data.images[data.micro_index], data.F if F is None else F)

    return predict


def new_baseline(name: str, config: dict):
    """A fresh baseline with the bench's settings; ``config``: the data's generate config."""
    from neuroscale_couple.baselines import (
        DescriptorMLP,
        EquiNOStyle,
        FNOBaseline,
        PIPNOStyle,
        PPINOStyle,
    )

    if name == "fno":
        return FNOBaseline(modes=8, width=32, layers=4)
    if name == "equino":
        return EquiNOStyle(config, resolution=RESOLUTION, modes=256)
    if name == "pipno":
        return PIPNOStyle(config, width=16, modes=8, layers=3, branches=3)
    if name == "ppino":
        return PPINOStyle(width=32, modes=8, layers=4)
    return DescriptorMLP(members=4)


def train_sano(train_all, fit, validation, budget_s: float, model_change: dict | None = None,
               training_change: dict | None = None):
    """A SANO of the shipped architecture and settings, trained from scratch at the budget;
    ``model_change``/``training_change``: config keys that differ from the shipped model's (an
    ablation's variant, its ``seed``)."""
    from neuroscale_couple.cli import load_yaml
    from neuroscale_couple.training import TrainConfig, train

    cfg = load_yaml(SHIPPED_TRAIN)
    tcfg = TrainConfig.from_dict({**cfg["training"], **(training_change or {}),
                                  "time_limit_s": budget_s, "time_clock": "cpu"})
    torch.manual_seed(tcfg.seed)
    model, _ = train_all.structure.new_operator({**cfg["model"], **(model_change or {})},
                                                train_all)
    history = train(model, fit, tcfg, validation=validation, progress=False)
    return model, history


def equino_floor(model, train_all, train_arrays: dict, fit, test, test_arrays: dict) -> dict:
    """Set the EquiNO-style basis from the training part's micro fields; its floor on the test
    set: P̄ from the true fields projected on the basis, and from the true fields themselves
    (pixel sampling)."""
    in_fit = torch.isin(train_all.micro_index, torch.unique(fit.micro_index))
    model.set_basis(train_all.F[in_fit], torch.as_tensor(train_arrays["samples/fields/F"])[in_fit])
    fields = torch.as_tensor(test_arrays["samples/fields/F"])
    images = test.images[test.micro_index]
    return {"modes": model.modes,
            "projected_fields": model.projection_error(images, test.F, fields, test.P),
            "true_fields_on_pixels": model.projection_error(images, test.F, fields, test.P, 0)}


def worker(args: argparse.Namespace) -> dict:
    """Train (at the budget) and score one model in this process (one thread)."""
    torch.set_num_threads(1)
    (train_all, train_arrays), (test, test_arrays), (calibration, cal_arrays) = (
        load(p) for p in (args.train, args.test, args.calibration))
    fit, validation = train_all.split(0.1, 0)  # as `neuroscale train` splits (val_fraction 0.1)
    record: dict = {"model": args.worker, "label": LABELS[args.worker], "n_train": len(fit),
                    "n_validation": len(validation), "budget_cpu_s": args.budget_cpu_s}
    if args.worker == "shipped":
        from neuroscale_couple.operators.base import load_operator

        model = load_operator(SHIPPED)
        stages = [model.card.get("init", {}), model.card]  # first stage, fine-tuning
        record.update(budget_cpu_s=None, n_train=None, n_validation=None)
        record["history"] = {  # wall seconds as its card records them (another machine load)
            "train_wall_s": sum(st.get("history", {}).get("time_s", 0.0) for st in stages),
            "epochs": sum(st.get("training", {}).get("epochs", 0) for st in stages),
            "data": model.card.get("data")}
        predict = sano_predict(model)
    elif args.worker == "sano":
        t0 = time.process_time()
        model, history = train_sano(train_all, fit, validation, args.budget_cpu_s)
        record["train_cpu_s"] = time.process_time() - t0
        record["history"] = {"epochs": len(history["val"]), "best_epoch": history["best_epoch"],
                             "budget_spent": history["time_limited"]}
        predict = sano_predict(model)
    else:
        model = new_baseline(args.worker, train_all.config).float()
        if args.worker == "equino":
            record["floor"] = equino_floor(model, train_all, train_arrays, fit, test, test_arrays)
        micro = micro_arrays(train_arrays)
        fit, validation = model.with_inputs(fit, micro), model.with_inputs(validation, micro)
        test = model.with_inputs(test, micro_arrays(test_arrays))
        calibration = model.with_inputs(calibration, micro_arrays(cal_arrays))
        t0 = time.process_time()
        history = model.fit(fit, validation, budget_s=args.budget_cpu_s)
        record["train_cpu_s"] = time.process_time() - t0
        record["history"] = {k: history[k] for k in ("epochs", "best_epoch", "budget_spent",
                                                     "steps")}
        predict = baseline_predict(model)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    record["scores"] = scores(predict, test, calibration)
    return record


def run_workers(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Each model in its own process (``--parallel`` at a time); their records in order, and
    the models run (not reused)."""
    jobs = {m: [sys.executable, __file__, "--worker", m, "--train", args.train, "--test",
                args.test, "--calibration", args.calibration, "--budget-cpu-s",
                str(args.budget_cpu_s), "--json", str(Path(args.work) / f"{m}.json")]
            for m in args.models}
    records, ran = run_jobs(jobs, Path(args.work), args.parallel, args.reuse)
    return [{"model": m, "label": LABELS[m], **records[m]} for m in args.models], ran


def print_table(records: list[dict]) -> None:
    """The comparison as a text table."""
    print(f"{'model':52s} {'P rel':>8s} {'A rel':>8s} {'obj':>8s} {'sym':>8s} {'cov95':>6s} "
          f"{'ECE':>6s} {'cpu s':>7s} {'pts/cpu s':>9s}")
    for r in records:
        s = r.get("scores")
        if s is None:
            print(f"{r['label']:52s} {r.get('error')}")
            continue
        print(f"{r['label']:52s} {s['rel_l2_stress']:8.4f} {s['rel_l2_tangent']:8.4f} "
              f"{s['objectivity_any_angle']:8.2e} {s['major_symmetry']:8.2e} "
              f"{s.get('coverage_95', float('nan')):6.3f} {s.get('ece', float('nan')):6.3f} "
              f"{r.get('train_cpu_s') or float('nan'):7.0f} {s['throughput_per_cpu_s']:9.0f}")


def plot(records: list[dict], path: Path) -> None:
    """Bars of the test errors of P̄ and A, and the 95 % coverage of the models with an
    uncertainty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if "scores" in r]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(done))
    for shift, key, label in ((-0.2, "rel_l2_stress", "P̄"), (0.2, "rel_l2_tangent", "A")):
        ax.bar(x + shift, [r["scores"][key] for r in done], 0.4, label=f"rel. L2 of {label}")
    ax.set_xticks(x, [r["label"].split(" (")[0] for r in done], rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("test error")
    ax.legend()
    ax.set_title(f"Same data, {done[0].get('budget_cpu_s') or '-'} CPU s each (shipped: full "
                 "data, not at the budget)")
    unc = [r for r in done if "coverage_95" in r["scores"]]
    bx.bar(np.arange(len(unc)), [r["scores"]["coverage_95"] for r in unc], 0.5)
    bx.axhline(0.95, color="k", ls="--", lw=1)
    bx.set_xticks(np.arange(len(unc)), [r["model"] for r in unc], rotation=20, ha="right")
    bx.set_ylim(0.5, 1.0)
    bx.set_title("95 % coverage (conformal)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    budget_arguments(ap, "baselines", "model")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--parallel", type=int, default=len(MODELS))
    ap.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        Path(args.json).write_text(json.dumps(worker(args), indent=1))
        return
    started = time.perf_counter()
    records, ran = run_workers(args)
    print_table(records)
    record = {**budget_record(args, "model", started),
              "reused": [m for m in args.models if args.reuse and m not in ran],
              "models": records}
    Path(args.json).write_text(json.dumps(record, indent=1))
    plot(records, Path(args.plot))
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
