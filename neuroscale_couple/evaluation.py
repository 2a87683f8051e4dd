"""Calibrate and evaluate a trained operator on RVE data sets (`neuroscale calibrate|evaluate`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neuroscale_couple.calibration import (
    CONTRAST_BANDS,
    LEVELS,
    LOAD_BANDS,
    Calibration,
    auroc,
    band_name,
    coverage,
    expected_calibration_error,
    fit_conformal,
    group_labels,
    reliability_diagram,
    uncertainty_score,
)
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.base import CoarseGrainingOperator
from neuroscale_couple.phases import input_contrast
from neuroscale_couple.region import stretch_distance
from neuroscale_couple.training import TrainingData, predict_dataset


def numpy_predictions(model: CoarseGrainingOperator, data: TrainingData) -> tuple[np.ndarray, ...]:
    """(y, mu, Sigma, A_true, A_pred) as float64 arrays (n, d²), (n, d²), (n, d², d²), ...
    (d²: 4 in 2D, 9 in 3D)."""
    model = model.double()
    pred = {k: v.cpu().numpy() for k, v in predict_dataset(model, data).items()}
    n = len(data.P)
    return (data.P.double().reshape(n, -1).numpy(), pred["mean"].reshape(n, -1),
            pred["cov"], data.A.double().numpy(), pred["tangent"])


def sample_labels(data: TrainingData, bands=LOAD_BANDS, contrast_bands=()) -> np.ndarray:
    """Each sample's calibration group (n,) str: its structure's kind, its load band and, with
    ``contrast_bands``, its contrast band (:func:`~neuroscale_couple.calibration.group_labels`;
    the contrast is a family operator's input, :func:`~neuroscale_couple.phases.input_contrast`)."""
    kinds = data.kinds if data.kinds is not None else np.array(["unknown"] * len(data.images))
    micro = data.micro_index.numpy()
    contrast = None
    if contrast_bands:
        contrast = input_contrast(data.images)
        if contrast is None:
            raise InputError("contrast bands group a family operator's data by E_f/E_m: this "
                             "data set's inputs carry no phases (calibrate a model of one "
                             "material without contrast bands)")
        contrast = contrast[micro]
    return group_labels(kinds[micro], stretch_distance(data.F.double().numpy()), bands,
                        contrast, contrast_bands)


BOUND_WIDTH_LEVEL = 0.95
"""The confidence of :func:`evaluate`'s ``bound_width`` (the fallback policy's default)."""


def calibrate_model(model: CoarseGrainingOperator, data: TrainingData, levels=LEVELS,
                    bands: tuple[float, ...] | str | None = "as before",
                    contrast_bands: tuple[float, ...] = ()) -> Calibration:
    """Split-conformal calibration on held-out ``data``; stored in ``model.calibration``.
    ``bands``: load band edges of a group-wise calibration (per structure kind and band; with
    ``contrast_bands``, edges in E_f/E_m, per contrast band of a family operator too), None for
    a global one, "as before" to keep the model's current choice, contrast bands included
    (global if it has none: what a family operator's retraining does)."""
    if isinstance(bands, str):
        old = Calibration.from_dict(model.calibration) if model.calibration else None
        bands = old.bands if old is not None else None
        contrast_bands = old.contrast_bands if old is not None else ()
    if contrast_bands and bands is None:
        raise InputError("contrast bands are groups of a group-wise calibration: give load "
                         "bands too (neuroscale calibrate --groups)")
    y, mu, Sigma, _, _ = numpy_predictions(model, data)
    labels = None if bands is None else sample_labels(data, bands, contrast_bands)
    cal = fit_conformal(y, mu, Sigma, levels, labels=labels, bands=bands or (),
                        contrast_bands=contrast_bands)
    model.calibration = cal.to_dict()
    return cal


def reported_bands(model: CoarseGrainingOperator, cal: Calibration
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The load and contrast band edges :func:`evaluate` reports groups by: a group-wise
    calibration's own; else the default load bands, and for a family operator the default
    contrast bands."""
    if cal.grouped:
        return cal.bands, cal.contrast_bands
    return LOAD_BANDS, CONTRAST_BANDS if model.takes_material else ()


def evaluate(model: CoarseGrainingOperator, data: TrainingData, *, ood: TrainingData | None = None,
             plot: str | Path | None = None) -> dict:
    """Accuracy and calibration metrics of ``model`` on ``data`` (JSON-ready dict).

    Keys: ``rel_l2_stress``, ``rel_l2_tangent``, ``coverage`` (level → observed fraction in the
    calibrated ellipsoid), ``bound_coverage`` (level → fraction within the fallback policy's
    error bound), ``ece``, ``n_samples``, ``groups`` (per structure kind and load band, the
    model's bands or the default ones, and for a family operator per contrast band too:
    ``n_samples``, ``rel_l2_stress``, ``bound_coverage``, ``ece``), ``bound_width`` (the mean
    error bound at :data:`BOUND_WIDTH_LEVEL` over the mean ‖P̄‖: how sharp the bound is, a
    fallback at rtol r comes where it exceeds r‖P̄‖) and ``ood_auroc`` when ``ood`` is given.
    """
    if not model.calibration:
        raise InputError("the model is not calibrated: run `neuroscale calibrate` first")
    cal = Calibration.from_dict(model.calibration)
    y, mu, Sigma, A, A_pred = numpy_predictions(model, data)
    bands, contrast_bands = reported_bands(model, cal)
    labels = sample_labels(data, bands, contrast_bands)

    def metrics(m: np.ndarray) -> dict:
        return {"rel_l2_stress": float(np.linalg.norm(mu[m] - y[m]) / np.linalg.norm(y[m])),
                "coverage": {str(k): v for k, v in coverage(
                    y[m], mu[m], Sigma[m], cal, cal.quantiles, labels=labels[m]).items()},
                "bound_coverage": {str(k): v for k, v in coverage(
                    y[m], mu[m], Sigma[m], cal, cal.norm_quantiles, bound=True,
                    labels=labels[m]).items()},
                "ece": expected_calibration_error(y[m], mu[m], Sigma[m], cal,
                                                  labels=labels[m])}

    everything = metrics(np.ones(len(y), dtype=bool))
    out = {
        "n_samples": len(y),
        "rel_l2_stress": everything["rel_l2_stress"],
        "rel_l2_tangent": float(np.linalg.norm(A_pred - A) / np.linalg.norm(A)),
        "coverage": everything["coverage"], "bound_coverage": everything["bound_coverage"],
        "ece": everything["ece"],
        "bound_width": float(np.mean(cal.error_bound(Sigma, BOUND_WIDTH_LEVEL, labels))
                             / np.mean(np.linalg.norm(y, axis=1))),
        "calibration": "group-wise" if cal.grouped else "global",
        "groups": {band_name(str(g), bands, contrast_bands): {
            "n_samples": int((labels == g).sum()), **metrics(labels == g)}
                   for g in np.unique(labels)},
    }
    if ood is not None:
        _, _, Sigma_ood, _, _ = numpy_predictions(model, ood)
        out["ood_auroc"] = auroc(uncertainty_score(Sigma), uncertainty_score(Sigma_ood))
    if plot is not None:
        reliability_diagram(y, mu, Sigma, cal, plot,
                            title=f"Operator error bars on {len(y)} held-out RVE samples")
    return out
