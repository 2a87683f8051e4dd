"""Benchmark of the trained operator on held-out RVE data.

Prints a table and writes ``bench/results/operator.json`` (+ a reliability diagram and a plot of
the learned scale weights):

- accuracy on held-out microstructures and loads (other seeds, same ranges): relative L2 error of
  P̄ (target ≤ 2 %) and of the tangent (≤ 5 %); calibration: coverage at 50/90/95 %, ECE (≤ 0.02);
  OOD AUROC for loads beyond the training range, 0.3 ≤ |F̄ − I| ≤ 0.4 (≥ 0.9);
- throughput of stress + tangent + covariance with cached latents (target ≥ 1e5 points/s here),
  and the encoder's cost per microstructure;

Ablations of the architecture and losses over seeds: bench/ablations.py.

Data sets are made with the project's own RVE solver from ``examples/models/*.yaml`` when missing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from model_data import MODELS, ROOT, ensure_data

RESULTS = ROOT / "bench" / "results"


def best_time(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def throughput(model, data, n_points: int) -> dict:
    """Points per second of predict() (stress, tangent, covariance) with cached latents."""
    from neuroscale_couple.sampling import loads_in_ball, rng_for

    out = {}
    images = data.images[torch.unique(data.micro_index)][:64]
    for dtype in (torch.float64, torch.float32):
        m = model.to(dtype)
        with torch.no_grad():
            z = m.encode(images.to(dtype))[0]
        idx = torch.arange(n_points) % len(z)
        F = torch.as_tensor(loads_in_ball(n_points, 0.15, rng_for(5, 0)), dtype=dtype)
        t = best_time(lambda m=m, z=z, F=F, idx=idx: m.predict(z[idx], F))
        out[str(dtype).removeprefix("torch.")] = n_points / t
        t_enc = best_time(lambda m=m, dtype=dtype: m.encode(images.to(dtype)))
        out[f"encoder_ms_per_microstructure_{str(dtype).removeprefix('torch.')}"] = (
            1e3 * t_enc / len(images))
    model.double()
    return out


def plot_scale_weights(model, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = model.scale_weights.double().numpy()
    n = model.config.resolution
    labels = [f"details {n >> (j + 1)}²" for j in range(len(w) - 1)]
    labels.append(f"approx {n >> (len(w) - 1)}²")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(labels, w, color="tab:blue")
    ax.set(ylabel="learned weight", title="SANO scale weights (finest → coarsest)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODELS / "fe2_composite.pt"))
    parser.add_argument("--data-dir", default=str(ROOT / "out" / "model"))
    parser.add_argument("--points", type=int, default=100_000)
    args = parser.parse_args()

    from neuroscale_couple.evaluation import evaluate
    from neuroscale_couple.operators.sano import SANO
    from neuroscale_couple.training import TrainingData

    RESULTS.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    model = SANO.from_checkpoint(args.model)
    n = model.config.resolution
    test = TrainingData.from_h5(ensure_data("test", data_dir), n, dtype=torch.float64)
    ood = TrainingData.from_h5(ensure_data("ood", data_dir), n, dtype=torch.float64)
    metrics = evaluate(model, test, ood=ood, plot=RESULTS / "operator_reliability.png")
    plot_scale_weights(model, RESULTS / "operator_scale_weights.png")
    speed = throughput(model, test, args.points)
    record = {"model": str(args.model), "test_samples": len(test), "ood_samples": len(ood),
              **metrics, "throughput_points_per_s": speed,
              "scale_weights": model.scale_weights.double().tolist(),
              "targets": {"rel_l2_stress": 0.02, "rel_l2_tangent": 0.05, "ece": 0.02,
                          "ood_auroc": 0.9, "points_per_s": 1e5}}
    print(f"held-out: {len(test)} samples, OOD: {len(ood)} samples")
    rows = [("rel. L2 error P̄", metrics["rel_l2_stress"], "≤ 0.02"),
            ("rel. L2 error tangent", metrics["rel_l2_tangent"], "≤ 0.05"),
            ("ECE", metrics["ece"], "≤ 0.02"),
            ("OOD AUROC", metrics["ood_auroc"], "≥ 0.9"),
            *((f"coverage {k}", v, f"≈ {k}") for k, v in metrics["coverage"].items()),
            ("points/s float64 (P̄, A, Σ)", speed["float64"], "≥ 1e5"),
            ("points/s float32 (P̄, A, Σ)", speed["float32"], "≥ 1e5"),
            ("encoder ms / microstructure", speed["encoder_ms_per_microstructure_float32"], "")]
    for name, value, target in rows:
        print(f"{name:>30}: {value:12.4g}   {target}")
    (RESULTS / "operator.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {RESULTS / 'operator.json'}")


if __name__ == "__main__":
    main()
