"""Where the shipped operator's P̄ error comes from (issue 29 asks ≤ 1 % on held-out cells).

Three measures on the same footing, each a relative L2 error of P̄ (overall, per fibre-fraction
band, per calibration group):

- the operator on the cells it was **trained** on and on its **validation** cells (the split its
  training made: the card's ``val_fraction`` and seed), from its own training data set;
- the operator on the held-out **test** cells;
- the **basis floor**: per cell, the weights of the energy basis the head predicts (W̄ = Σ_k w_k
  Ψ_k(C̄), :func:`~neuroscale_couple.operators.heads.basis_energies`) fitted by least squares
  to that cell's own solves (:func:`~neuroscale_couple.cell_fits.fit_weights`): the error no
  encoder can go below with this head.

- **fresh heads on the frozen latents**: the encoder's latents z of the trained cells kept, a
  new network z → w of each size asked (``--probe-heads``, hidden × depth) trained on their
  solves (the training's stress and tangent weights; the loss of a cell is a quadratic form
  in w, so it trains on cells, not samples), then scored on all three sets.

Little gap between trained and test cells says the error is not for want of data of those
kinds; heads that fit the trained cells better without lowering the held-out error say the
latents, not the head, hold it.

Data sets are made with the project's own RVE solver (2 ranks) when missing:
``out/model/data.h5`` (the model's training data, ≈ 20 min) and ``out/model/test.h5``.
Writes ``bench/results/error_budget.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from model_data import ensure_data

RESULTS = Path(__file__).resolve().parent / "results"
FRACTION_BANDS = ((0.0, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.6))
"""Fibre-fraction bands the errors are broken down by."""


def rel_l2(error: np.ndarray, truth: np.ndarray) -> float | None:
    """‖error‖ / ‖truth‖ over the samples given (None for none)."""
    return float(np.linalg.norm(error) / np.linalg.norm(truth)) if len(truth) else None


def basis_floor(data, n_weights: int) -> np.ndarray:
    """P̄ of each cell's own least-squares basis fit at its samples (n, 2, 2)."""
    from neuroscale_couple.cell_fits import basis_responses, fit_weights

    F, P, A = (getattr(data, k).double().numpy() for k in ("F", "P", "A"))
    index = data.micro_index.numpy()
    G, _ = basis_responses(F, n_weights)
    fit = np.empty_like(P)
    for cell in np.unique(index):
        m = np.flatnonzero(index == cell)
        fit[m] = np.einsum("k,nkij->nij", fit_weights(F[m], P[m], A[m], n_weights), G[m])
    return fit


def budget(model, data, fraction: np.ndarray, n_weights: int) -> dict:
    """The measures of one set of cells: operator and basis-floor errors, overall, per
    fraction band and per calibration group (kind × load band)."""
    from neuroscale_couple.evaluation import numpy_predictions, sample_labels

    y, mu, *_ = numpy_predictions(model, data)
    floor = basis_floor(data, n_weights).reshape(len(y), -1)
    vf = fraction[data.micro_index.numpy()]
    labels = sample_labels(data)

    def errors(m: np.ndarray) -> dict:
        return {"n_samples": int(m.sum()), "rel_l2_stress": rel_l2(mu[m] - y[m], y[m]),
                "basis_floor": rel_l2(floor[m] - y[m], y[m])}

    return {"n_cells": len(np.unique(data.micro_index.numpy())),
            **errors(np.ones(len(y), dtype=bool)),
            "by_fraction": [{"fraction": [a, b], **errors((vf >= a) & (vf < b))}
                            for a, b in FRACTION_BANDS],
            "by_group": {g: errors(labels == g) for g in sorted(set(labels.tolist()))}}


def cell_quadratics(model, data, n_weights: int, norms: tuple[float, float], tangent: float
                    ) -> tuple[torch.Tensor, ...]:
    """Per cell of ``data``: its latent z (latent,) and its loss of basis weights w as
    wᵀMw − 2bᵀw + c — Σ over its solves of ‖P̄(w) − P̄‖²/n_P + ``tangent``·‖A(w) − A‖²/n_A
    (``norms`` (n_P, n_A): mean squared norms of the trained solves)."""
    from neuroscale_couple.cell_fits import basis_responses

    G, T = (torch.as_tensor(x).flatten(2) for x in basis_responses(data.F.double().numpy(),
                                                                    n_weights))
    P, A = data.P.double().flatten(1), data.A.double().flatten(1)
    cells, index = torch.unique(data.micro_index, return_inverse=True)
    with torch.no_grad():
        z = torch.cat([model.encode(data.images[cells[i:i + 64]].double())[0]
                       for i in range(0, len(cells), 64)])
    n_p, n_a = norms
    M = torch.zeros(len(cells), n_weights, n_weights, dtype=torch.float64)
    M.index_add_(0, index, torch.einsum("sik,sjk->sij", G, G) / n_p
                 + tangent * torch.einsum("sik,sjk->sij", T, T) / n_a)
    b = torch.zeros(len(cells), n_weights, dtype=torch.float64)
    b.index_add_(0, index, torch.einsum("sik,sk->si", G, P) / n_p
                 + tangent * torch.einsum("sik,sk->si", T, A) / n_a)
    c = torch.zeros(len(cells), dtype=torch.float64)
    c.index_add_(0, index, (P * P).sum(1) / n_p + tangent * (A * A).sum(1) / n_a)
    return z, M, b, c, G, P, index


def head_probe(model, sets: dict, n_weights: int, heads: list[tuple[int, int]],
               epochs: int = 2000) -> list[dict]:
    """Fresh heads z → w (hidden × depth each, ``heads``) trained on the frozen latents of the
    ``trained`` cells (AdamW, lr 2e-3 to 0 on a cosine, batches of 128 cells, seeded), and
    their relative L2 error of P̄ on every set."""
    training = model.card.get("training") or {}
    weights = training.get("weights") or {}
    tangent = weights.get("tangent", 0.2) / weights.get("stress", 1.0)
    trained = sets["trained"]
    norms = (float(trained.P.double().flatten(1).pow(2).sum(1).mean()),
             float(trained.A.double().flatten(1).pow(2).sum(1).mean()))
    quads = {k: cell_quadratics(model, d, n_weights, norms, tangent) for k, d in sets.items()}
    z, M, b, c = quads["trained"][:4]
    mean, std = z.mean(0), z.std(0) + 1e-8
    out = []
    for hidden, depth in heads:
        torch.manual_seed(0)
        layers, width = [], z.shape[1]
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.GELU()]
            width = hidden
        net = torch.nn.Sequential(*layers, torch.nn.Linear(width, n_weights)).double()
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        t0 = time.perf_counter()
        for _ in range(epochs):
            for k in torch.randperm(len(z)).split(128):
                w = net((z[k] - mean) / std)
                loss = (torch.einsum("bi,bij,bj->b", w, M[k], w) - 2 * (b[k] * w).sum(1)
                        + c[k]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            schedule.step()
        row = {"hidden": hidden, "depth": depth, "epochs": epochs,
               "time_s": time.perf_counter() - t0}
        with torch.no_grad():
            for name, (zs, *_, G, P, index) in quads.items():
                w = net((zs - mean) / std)[index]
                row[name] = rel_l2(torch.einsum("sk,skj->sj", w, G).numpy() - P.numpy(),
                                   P.numpy())
        out.append(row)
    return out


def head_shape(text: str) -> tuple[int, int]:
    """``HxD`` → (hidden, depth), for ``--probe-heads``."""
    try:
        hidden, depth = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give hidden x depth, e.g. 256x2") from None
    if hidden < 1 or depth < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: hidden and depth must be ≥ 1")
    return hidden, depth


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="examples/models/fe2_composite.pt")
    p.add_argument("--data-dir", default="out/model",
                   help="folder of data.h5 (the model's training data) and test.h5")
    p.add_argument("--name", default="error_budget", help="record name in bench/results")
    p.add_argument("--probe-heads", nargs="*", type=head_shape, default=[(64, 1), (256, 2)],
                   metavar="HxD",
                   help="fresh heads on the frozen latents, hidden x depth each (none: skip)")
    args = p.parse_args()

    from neuroscale_couple.errors import InputError
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.operators.heads import EnergyHead
    from neuroscale_couple.store import load_rve_dataset
    from neuroscale_couple.training import TrainingData

    model = load_operator(args.model).double().eval()
    out_dir = Path(args.data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_weights = (5 if model.config.quartic_basis else 2) + 2 * EnergyHead.n_directions
    training = model.card.get("training") or {}
    record = {"name": args.name, "command": " ".join(shlex.quote(a) for a in sys.argv),
              "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
              "model": args.model, "basis_weights": n_weights, "sets": {}}
    probed = {}  # the sets the fresh heads are scored on
    for name in ("data", "test"):
        path = ensure_data(name, out_dir)
        arrays = load_rve_dataset(path)
        if name == "data" and arrays["config"] != model.card.get("data_config"):
            raise InputError(f"{path} is not the training data of {args.model} (its config "
                             "differs from the card's data_config): remove it to make it again")
        data = TrainingData.from_arrays(arrays, model.config.resolution, source=str(path))
        fraction = arrays["micro/volume_fraction"]
        if name == "test":
            record["sets"]["test"] = budget(model, data, fraction, n_weights)
            probed["test"] = data
            continue
        trained, validation = data.split(training.get("val_fraction", 0.15),
                                         training.get("seed", 0))
        record["sets"]["trained"] = budget(model, trained, fraction, n_weights)
        record["sets"]["validation"] = budget(model, validation, fraction, n_weights)
        probed |= {"trained": trained, "validation": validation}
    record["head_probe"] = head_probe(model, probed, n_weights, args.probe_heads)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    bands = [f"v {a:.1f}–{b:.1f}" for a, b in FRACTION_BANDS]
    print(f"\nP̄ error of {args.model} (relative L2); basis floor: each cell's own fit of the "
          f"{n_weights}-term energy basis")
    print(f"{'cells':>12}{'n':>7}{'operator':>10}" + "".join(f"{b:>11}" for b in bands)
          + f"{'floor':>8}")
    for name, s in record["sets"].items():
        print(f"{name:>12}{s['n_cells']:7d}{s['rel_l2_stress']:10.2%}"
              + "".join(f"{b['rel_l2_stress']:11.2%}" for b in s["by_fraction"])
              + f"{s['basis_floor']:8.2%}")
    for h in record["head_probe"]:
        print(f"fresh head {h['hidden']}×{h['depth']} on the frozen latents: " + ", ".join(
            f"{k} {h[k]:.2%}" for k in record["sets"]))
    print(f"→ bench/results/{args.name}.json")
    return record


if __name__ == "__main__":
    main()
