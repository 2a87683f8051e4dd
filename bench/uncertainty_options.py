"""The operator's uncertainty options and loss weightings, side by side on the same data and the
same training time (issue 29, items 3 and 4).

Variants (model config ``uncertainty``, training config ``weighting``):

    ensemble       4 members, fixed loss weights (what the shipped models are)
    mc_dropout     one set of heads, dropout 0.1 kept at prediction, 16 samples
    variational    Bayes by backprop heads, prior N(0, 1), KL weight ``--kl`` per sample, 16 samples
    uncertainty    the ensemble with learned homoscedastic-uncertainty loss weights

Each trains from the same initial seed on the same training set (``neuroscale generate`` of
bench/configs/uncertainty_options.train.yaml; 10 % held out for early stopping) for the same
training time (``--budget`` s of ``--clock``, default this process's CPU seconds on one torch
thread, which the load of a shared machine does not shrink: ``training.time_limit_s`` and
``time_clock``, the learning rate's cosine over the budget), is calibrated (split conformal) on
the same calibration set and evaluated on the same test set: relative L2 error of P̄ and of the
tangent, Gaussian NLL of P̄ under the calibrated covariance (nats per sample, stress in GPa),
ECE, coverage of the calibrated 95 % ellipsoid and of the policy's 95 % error bound, epochs
done, and the prediction cost of the coupler's per-evaluation path
(:class:`~neuroscale_couple.operators.inference.Inference`, latents fixed), best of
``--repeats``.

Run: ``nice -n 5 .venv/bin/python bench/uncertainty_options.py --budget 180`` (data sets are
generated into ``--data`` first if missing). Writes bench/results/uncertainty_options.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bench" / "configs"
RESULTS = ROOT / "bench" / "results"
SETS = ("train", "calibration", "test")
LEVEL = "0.95"
MODEL = {"resolution": 16, "width": 16, "modes": 4, "fourier_layers": 2, "levels": 2,
         "heads": 2, "attention_blocks": 1, "latent": 32, "hidden": 32, "members": 4,
         "energy_correction": False, "quartic_basis": True}
"""A smaller operator than the shipped one (same architecture, 16² images), so that the
budget buys epochs on two shared cores."""
TRAINING = {"epochs": 2000, "batch_size": 64, "physics_fraction": 0.25, "augment": False,
            "lr": 0.002, "lr_final": 0.0001, "val_fraction": 0.1, "patience": 2000, "seed": 0,
            "weights": {"stress": 1.0, "tangent": 0.2, "nll": 0.05, "equilibrium": 0.01,
                        "consistency": 0.01, "hill_mandel": 0.01}}
"""The shipped recipe's first stage without the terms the data lack (micro fields) or that
cost most (symmetry); the epochs are a cap: the time budget ends each training."""
VARIANTS = {
    "ensemble": ({}, {}),
    "mc_dropout": ({"uncertainty": "mc_dropout", "dropout": 0.1, "samples": 16}, {}),
    "variational": ({"uncertainty": "variational", "samples": 16}, {"kl": None}),
    "uncertainty": ({}, {"weighting": "uncertainty"}),
}
"""Variant → (model config changes, training config changes; kl None: ``--kl``)."""


def generate(data: Path) -> dict[str, float]:
    """The three data sets in ``data`` (made with `neuroscale generate` where missing);
    returns the generate wall time of each made now (s)."""
    data.mkdir(parents=True, exist_ok=True)
    times = {}
    for name in SETS:
        out = data / f"{name}.h5"
        if out.exists():
            continue
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "neuroscale"), "generate",
                        str(CONFIGS / f"uncertainty_options.{name}.yaml"), "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        times[name] = time.perf_counter() - t0
    return times


def gaussian_nll(y: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of y (n, k) under N(mu (n, k), cov (n, k, k))."""
    L = np.linalg.cholesky(cov)
    u = np.linalg.solve(L, (y - mu)[..., None])[..., 0]
    logdet = 2 * np.log(np.diagonal(L, axis1=-2, axis2=-1)).sum(-1)
    return float(np.mean(0.5 * ((u**2).sum(-1) + logdet + y.shape[1] * np.log(2 * np.pi))))


def prediction_cost(model, test, repeats: int) -> float:
    """Seconds per point of the coupler's evaluation at fixed latents (best of ``repeats``)."""
    from neuroscale_couple.operators.inference import Inference

    model = model.double().eval()
    with torch.no_grad():
        z = model.encode(test.images.double())[0]
    rows, F = test.micro_index.numpy(), test.F.double().numpy()
    inference = Inference(model, z)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        inference.response(rows, F)
        best = min(best, time.perf_counter() - t0)
    return best / len(F)


def run_variant(name: str, data: dict, budget: float, clock: str, kl: float,
                repeats: int) -> dict:
    """Train, calibrate and evaluate one variant; its record."""
    from neuroscale_couple.calibration import Calibration
    from neuroscale_couple.evaluation import calibrate_model, evaluate
    from neuroscale_couple.operators.sano import SANO, SANOConfig
    from neuroscale_couple.training import TrainConfig, predict_dataset, train

    model_changes, train_changes = VARIANTS[name]
    weights = dict(TRAINING["weights"])
    if "kl" in train_changes:
        weights["kl"] = kl
    tcfg = TrainConfig.from_dict({**TRAINING, "weights": weights, "time_limit_s": budget,
                                  "time_clock": clock,
                                  **{k: v for k, v in train_changes.items() if k != "kl"}})
    torch.manual_seed(tcfg.seed)
    model = SANO(SANOConfig.from_dict({**MODEL, **model_changes}))
    history = train(model, data["train"], tcfg, comm=MPI.COMM_SELF, progress=False)
    calibrate_model(model, data["calibration"])
    metrics = evaluate(model, data["test"])
    test = data["test"]
    pred = predict_dataset(model.double(), test)
    y = test.P.double().reshape(len(test), -1).numpy()
    mu, Sigma = pred["mean"].reshape(len(test), -1).numpy(), pred["cov"].numpy()
    cal = Calibration.from_dict(model.calibration)
    return {"model": {**MODEL, **model_changes}, "weighting": tcfg.weighting,
            "kl_weight": weights.get("kl", 0.0),
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": len(history["train"]), "best_epoch": history["best_epoch"],
            "train_time_s": history["time_s"], "log_variances": history["log_variances"],
            "rel_l2_stress": metrics["rel_l2_stress"],
            "rel_l2_tangent": metrics["rel_l2_tangent"],
            "nll": gaussian_nll(y, mu, cal.covariance(Sigma)),
            "nll_uncalibrated": gaussian_nll(y, mu, Sigma),
            "ece": metrics["ece"], "coverage_95": metrics["coverage"][LEVEL],
            "bound_coverage_95": metrics["bound_coverage"][LEVEL],
            "calibration_scale": cal.scale,
            "predict_s_per_point": prediction_cost(model, test, repeats)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=180.0, help="training time per variant "
                   "(s of --clock; default 180)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu (default): this process's CPU seconds, on one torch thread; wall")
    p.add_argument("--kl", type=float, default=2e-3, help="KL weight of the variational "
                   "variant (training.weights.kl; default 2e-3)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--data", type=Path, default=ROOT / "out" / "uncertainty_options",
                   help="folder of the data sets (made if missing)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of the cost measurement")
    p.add_argument("--out", type=Path, default=RESULTS / "uncertainty_options.json")
    args = p.parse_args()
    if args.clock == "cpu":
        torch.set_num_threads(1)
    from neuroscale_couple.training import TrainConfig, TrainingData

    generate_s = generate(args.data)
    data = {s: TrainingData.from_h5(args.data / f"{s}.h5", MODEL["resolution"]) for s in SETS}
    runs: dict[str, dict] = {}
    record = {"command": " ".join(["bench/uncertainty_options.py", *sys.argv[1:]]),
              "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                         f"{platform.node()}",
              "budget_s": args.budget, "clock": args.clock,
              "training": dataclasses.asdict(TrainConfig.from_dict(TRAINING)),
              "data": {s: {"samples": len(d), "structures": len(d.images),
                           "config": f"bench/configs/uncertainty_options.{s}.yaml"}
                       for s, d in data.items()},
              "generate_s": generate_s, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.variants:  # the record is written after each variant
        runs[name] = run_variant(name, data, args.budget, args.clock, args.kl, args.repeats)
        print(json.dumps({name: runs[name]}, indent=1), flush=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    rows = [f"{'variant':<12} {'P̄ err':>8} {'A err':>8} {'NLL':>8} {'ECE':>7} {'cov95':>6} "
            f"{'epochs':>6} {'train s':>7} {'µs/pt':>7}"]
    rows += [f"{n:<12} {r['rel_l2_stress']:8.4f} {r['rel_l2_tangent']:8.4f} {r['nll']:8.3f} "
             f"{r['ece']:7.4f} {r['coverage_95']:6.3f} {r['epochs']:6d} "
             f"{r['train_time_s']:7.1f} {1e6 * r['predict_s_per_point']:7.2f}"
             for n, r in runs.items()]
    print("\n".join(rows))


if __name__ == "__main__":
    main()
