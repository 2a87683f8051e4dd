"""Calibrate and evaluate a trained operator on RVE data sets (`neuroscale calibrate|evaluate`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neuroscale_couple.calibration import (
    LEVELS,
    Calibration,
    auroc,
    coverage,
    expected_calibration_error,
    fit_conformal,
    reliability_diagram,
    uncertainty_score,
)
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.base import CoarseGrainingOperator
from neuroscale_couple.training import TrainingData, predict_dataset


def _numpy_predictions(model: CoarseGrainingOperator, data: TrainingData) -> tuple[np.ndarray, ...]:
    """(y, mu, Sigma, A_true, A_pred) as float64 arrays (n, 4), (n, 4), (n, 4, 4), ..."""
    model = model.double()
    pred = {k: v.cpu().numpy() for k, v in predict_dataset(model, data).items()}
    return (data.P.double().reshape(-1, 4).numpy(), pred["mean"].reshape(-1, 4),
            pred["cov"], data.A.double().numpy(), pred["tangent"])


def calibrate_model(model: CoarseGrainingOperator, data: TrainingData, levels=LEVELS
                    ) -> Calibration:
    """Split-conformal calibration on held-out ``data``; stored in ``model.calibration``."""
    y, mu, Sigma, _, _ = _numpy_predictions(model, data)
    cal = fit_conformal(y, mu, Sigma, levels)
    model.calibration = cal.to_dict()
    return cal


def evaluate(model: CoarseGrainingOperator, data: TrainingData, *, ood: TrainingData | None = None,
             plot: str | Path | None = None) -> dict:
    """Accuracy and calibration metrics of ``model`` on ``data`` (JSON-ready dict).

    Keys: ``rel_l2_stress``, ``rel_l2_tangent``, ``coverage`` (level → observed fraction in the
    calibrated ellipsoid), ``bound_coverage`` (level → fraction within the fallback policy's
    error bound), ``ece``, ``n_samples``, and ``ood_auroc`` when ``ood`` is given.
    """
    if not model.calibration:
        raise InputError("the model is not calibrated: run `neuroscale calibrate` first")
    cal = Calibration.from_dict(model.calibration)
    y, mu, Sigma, A, A_pred = _numpy_predictions(model, data)
    out = {
        "n_samples": len(y),
        "rel_l2_stress": float(np.linalg.norm(mu - y) / np.linalg.norm(y)),
        "rel_l2_tangent": float(np.linalg.norm(A_pred - A) / np.linalg.norm(A)),
        "coverage": {str(k): v for k, v in coverage(y, mu, Sigma, cal, cal.quantiles).items()},
        "bound_coverage": {str(k): v for k, v in
                           coverage(y, mu, Sigma, cal, cal.norm_quantiles, bound=True).items()},
        "ece": expected_calibration_error(y, mu, Sigma, cal),
    }
    if ood is not None:
        _, _, Sigma_ood, _, _ = _numpy_predictions(model, ood)
        out["ood_auroc"] = auroc(uncertainty_score(Sigma), uncertainty_score(Sigma_ood))
    if plot is not None:
        reliability_diagram(y, mu, Sigma, cal, plot,
                            title=f"Operator error bars on {len(y)} held-out RVE samples")
    return out
