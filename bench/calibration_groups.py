"""Global against group-wise (Mondrian) calibration of an operator, group by group.

Calibrates the model both ways on one held-out calibration set and evaluates each, and the
model with the calibration it was shipped with (unless it is one of those), on a test
set, per structure kind and load band (``neuroscale evaluate``'s ``groups``): coverage of the
policy's 95 % bound and the ECE of the per-component intervals — the conformal ones, and for
the global calibration also the Gaussian ones (μᵢ ± Φ⁻¹((1 + p)/2) s √Σᵢᵢ) they replace. With
``--shifted``, the same on a second test set in another mix of groups. Needs the calibration
set ``out/model/calibration_groups.h5`` (`neuroscale generate
examples/models/fe2_composite.calibration_groups.yaml`: the shipped calibration set with more
fibre chains and large loads, so that every group has a few hundred points), the test set of
`make model` (``out/model/test.h5``) and, for ``--shifted``, one from
``examples/models/fe2_composite.shifted_test.yaml``.

    python bench/calibration_groups.py [--model M.pt] [--calibration C.h5] [--test T.h5]
                                       [--shifted S.h5]

Writes ``bench/results/calibration_groups.json`` (``--out``), with each set's mix: its share of
samples per structure kind and in the highest load band. A family operator (phases as inputs)
is grouped by its contrast E_f/E_m too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "examples" / "models" / "fe2_composite.pt"))
    p.add_argument("--calibration",
                   default=str(ROOT / "out" / "model" / "calibration_groups.h5"))
    p.add_argument("--test", default=str(ROOT / "out" / "model" / "test.h5"))
    p.add_argument("--shifted", help="a test set in another mix of groups (optional)")
    p.add_argument("--out", default=str(RESULTS / "calibration_groups.json"))
    args = p.parse_args()
    given = [("--calibration", args.calibration), ("--test", args.test)]
    for flag, path in given + ([("--shifted", args.shifted)] if args.shifted else []):
        if not Path(path).is_file():
            sys.exit(f"{flag} {path} does not exist: make it with `neuroscale generate "
                     "examples/models/fe2_composite.<set>.yaml --out <file>`")

    from neuroscale_couple.calibration import CONTRAST_BANDS, LOAD_BANDS
    from neuroscale_couple.evaluation import calibrate_model, evaluate, numpy_predictions
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.training import TrainingData

    model = load_operator(args.model)
    n, phases = model.input_resolution, model.takes_material
    cal = TrainingData.from_h5(args.calibration, n, material_inputs=phases)
    sets = {"test": TrainingData.from_h5(args.test, n, material_inputs=phases)}
    if args.shifted:
        sets["shifted"] = TrainingData.from_h5(args.shifted, n, material_inputs=phases)
    results: dict[str, dict] = {name: {} for name in sets}
    predictions: dict[str, tuple] = {}
    contrast_bands = CONTRAST_BANDS if model.takes_material else ()
    models = {"as shipped": model}  # the model's own calibration, on its calibration set
    for name, bands in (("global, Gaussian intervals", None), ("global", None),
                        ("group-wise", LOAD_BANDS)):
        m = models[name] = copy.deepcopy(model)
        calibrate_model(m, cal, bands=bands, contrast_bands=() if bands is None
                        else contrast_bands)
        if name.endswith("Gaussian intervals"):
            m.calibration = {**m.calibration, "interval_quantiles": {}}
    # shipped with one of these calibrations: its run would repeat that one's
    shipped_as = next((name for name, m in models.items()
                       if m is not model and m.calibration == model.calibration), None)
    if shipped_as is not None:
        del models["as shipped"]
    for name, m in models.items():
        for set_name, data in sets.items():
            r = results[set_name][name] = evaluate(m, data)
            _add_intervals(r, m, data, predictions.setdefault(
                set_name, numpy_predictions(copy.deepcopy(model), data)))
            print(f"{set_name}, {name}: bound coverage {r['bound_coverage']['0.95']:.3f}, "
                  f"ECE {r['ece']:.4f}")
            for group, g in r["groups"].items():
                lo, hi = g["bound_coverage_interval"]
                print(f"{'':>4}{group:<64} n={g['n_samples']:4d} coverage "
                      f"{g['bound_coverage']['0.95']:.3f} [{lo:.3f}, {hi:.3f}] "
                      f"ECE {g['ece']:.4f}")
    record = {"command": shlex.join(["python", "bench/calibration_groups.py", *sys.argv[1:]]),
              "date": date.today().isoformat(),
              "machine": f"{platform.node()} ({os.cpu_count()} cores)",
              "model": os.path.relpath(args.model, ROOT),
              "calibration_data": os.path.relpath(args.calibration, ROOT),
              "test_data": os.path.relpath(args.test, ROOT), "load_bands": list(LOAD_BANDS),
              "contrast_bands": list(contrast_bands),
              "n_calibration": len(cal), "shipped_as": shipped_as, "runs": results["test"]}
    record["mix"] = {name: _mix(data) for name, data in
                     (("calibration", cal), *sets.items())}
    if args.shifted:
        record["shifted_data"] = os.path.relpath(args.shifted, ROOT)
        record["shifted_runs"] = results["shifted"]
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


BOOTSTRAP = 2000
"""Resamplings of the cells behind each group's coverage interval."""


def _add_intervals(result: dict, model, data, predicted: tuple) -> None:
    """Add to each group of an :func:`evaluate` ``result`` the 95 % interval of the coverage
    of the 95 % bound, by resampling the group's cells (a cell's loads are not independent
    trials); checks that the resampled coverage is the reported one."""
    import numpy as np

    from neuroscale_couple.calibration import Calibration, band_name
    from neuroscale_couple.evaluation import reported_bands, sample_labels

    cal = Calibration.from_dict(model.calibration)
    bands, contrast = reported_bands(model, cal)
    labels = sample_labels(data, bands, contrast)
    y, mu, Sigma = predicted[:3]
    bound = cal.error_bound(Sigma, 0.95, labels if cal.grouped else None)
    covered = np.linalg.norm(y - mu, axis=1) <= bound
    cells = data.micro_index.numpy()
    rng = np.random.default_rng(0)
    names = {band_name(str(g), bands, contrast): g for g in np.unique(labels)}
    for name, g in result["groups"].items():
        mine = labels == names[name]
        if not np.isclose(covered[mine].mean(), g["bound_coverage"]["0.95"]):
            raise RuntimeError(f"{name}: resampled coverage differs from evaluate's")
        ids, per_cell = np.unique(cells[mine], return_inverse=True)
        hits = np.bincount(per_cell, covered[mine].astype(float), len(ids))
        counts = np.bincount(per_cell, minlength=len(ids)).astype(float)
        draws = rng.integers(0, len(ids), (BOOTSTRAP, len(ids)))
        share = hits[draws].sum(1) / counts[draws].sum(1)
        g["bound_coverage_interval"] = [float(q) for q in np.quantile(share, [0.025, 0.975])]
        g["cells"] = len(ids)


def _mix(data) -> dict[str, float]:
    """Shares of a data set's samples: per structure kind, in the highest load band and, for
    a family operator's data, per contrast band."""
    import numpy as np

    from neuroscale_couple.calibration import CONTRAST_BANDS, LOAD_BANDS, band_name
    from neuroscale_couple.phases import input_contrast
    from neuroscale_couple.region import stretch_distance

    micro = data.micro_index.numpy()
    kinds = data.kinds[micro]
    shares = {str(k): float(np.mean(kinds == k)) for k in np.unique(kinds)}
    high = stretch_distance(data.F.double().numpy()) >= LOAD_BANDS[-1]
    shares["highest_load_band"] = float(np.mean(high))
    contrast = input_contrast(data.images)
    if contrast is not None:
        band = np.searchsorted(CONTRAST_BANDS, contrast[micro], side="right")
        for b in range(len(CONTRAST_BANDS) + 1):
            name = band_name(f"x|0|{b}", LOAD_BANDS, CONTRAST_BANDS).split(", ")[-1]
            shares[name] = float(np.mean(band == b))
    return shares


if __name__ == "__main__":
    main()
