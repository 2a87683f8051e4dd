"""Calibrated error bars for the operator's Gaussian predictions, and metrics that judge them.

For each of n points the neural operator predicts a Gaussian N(μ, Σ) of an m-component quantity
(m = 4 for the flattened 2×2 homogenized stress): ``mu`` has shape (n, m), ``Sigma`` (n, m, m),
symmetric positive definite, in stress units and stress units squared.

Split conformal calibration (as in neuraloperator's UQNO) turns that raw uncertainty into error
bars with a finite-sample guarantee. On a held-out calibration set of n points with known truth y:

1. The Mahalanobis distance d = √((y − μ)ᵀ Σ⁻¹ (y − μ)) measures each error in units of Σ.
2. A global factor s rescales Σ to s²Σ with s² = mean(d²)/m, so that the calibrated covariance
   is right on average (for Gaussian errors, E[d²] = m).
3. The nonconformity score is r = d/s. For a coverage level p, q_p is the k-th smallest score,
   k = ⌈(n + 1)p⌉ (q_p = +∞ when k > n). For a new point exchangeable with the calibration set,
   P(r ≤ q_p) ≥ p whatever the error distribution: the ellipsoid {y : r ≤ q_p} is a p-level
   prediction region.
4. The fallback policy needs a bound on the Euclidean error |y − μ|, so that score is
   calibrated too: e = |y − μ| / (s √tr Σ) (the error in units of its predicted RMS value)
   with its conformal quantiles q^e_p, and |y − μ| ≤ q^e_p · s · √tr Σ holds with probability
   ≥ p in the same finite-sample sense. Bounding the ellipsoid by its circumscribed ball
   (q_p · s · √λ_max) would also be valid, but ~1.2–1.4× wider on the shipped operators.
5. The per-component error bars μᵢ ± t_p s √Σᵢᵢ are calibrated the same way: t_p is the
   conformal quantile of the component score |yᵢ − μᵢ| / (s √Σᵢᵢ), pooled over the m
   components of the calibration points, at each level 0.05, 0.10, …, 0.95
   (:data:`INTERVAL_LEVELS`). The Gaussian z_p = Φ⁻¹((1 + p)/2) would assume the errors'
   shape; t_p does not (a calibration written before these quantiles existed uses z_p).

Group-wise (Mondrian) calibration. A macro problem draws cells and loads in other proportions
than the calibration set; one global s and q then over-cover some groups and under-cover
others. With groups — each point's cell family and load band (:func:`group_labels`) — the
scale and the quantiles are fitted per group on that group's calibration points alone, so the
guarantee P(error ≤ bound) ≥ p holds within every group, whatever the mix. A family operator
(phases as inputs) is grouped by its stiffness contrast E_f/E_m too (:data:`CONTRAST_BANDS`):
its errors grow with the contrast, and a run has one material. A group with fewer than
:data:`MIN_GROUP_POINTS` calibration points (or none) gets the largest bound of the fitted
groups and the global one.

Metrics:

- :func:`coverage`: observed fraction of points inside the conformal ellipsoid, per level; it
  should match the level.
  With ``bound=True`` it scores the Euclidean error bound of step 4 instead.
- :func:`interval_coverage`: observed fraction of components inside the calibrated interval
  μᵢ ± t_p s √Σᵢᵢ, averaged over components and points.
- :func:`expected_calibration_error`: mean |observed − nominal| of those intervals over the
  levels 0.05, 0.10, …, 0.95 (0 is perfect); :func:`reliability_diagram` plots the same curve.
- :func:`auroc` with :func:`uncertainty_score`: how well the predicted uncertainty separates
  out-of-distribution inputs (positives, expected to score higher) from in-distribution ones
  (1 is perfect separation, 0.5 is chance).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neuroscale_couple.errors import InputError

LEVELS: tuple[float, ...] = (0.5, 0.9, 0.95)
"""Default coverage levels."""
INTERVAL_LEVELS: tuple[float, ...] = tuple(k / 20 for k in range(1, 20))
"""Levels 0.05, 0.10, …, 0.95 at which the per-component intervals are calibrated (those the
expected calibration error scores)."""

MIN_CALIBRATION_POINTS = 10
"""Fewest calibration points :func:`fit_conformal` accepts."""

LOAD_BANDS: tuple[float, ...] = (0.1, 0.2)
"""Default edges of the load bands of a group-wise calibration, in ‖U − I‖ (Frobenius, U the
right stretch of F̄): the bands [0, 0.1), [0.1, 0.2) and [0.2, ∞)."""

CONTRAST_BANDS: tuple[float, ...] = (3.0, 10.0, 30.0)
"""Default edges of the contrast bands of a family operator's group-wise calibration, in
E_f/E_m: over the trained contrasts 1–100, the bands [1, 3), [3, 10), [10, 30) and [30, 100]."""

def points_for_level(level: float) -> int:
    """Fewest calibration points whose conformal quantile at ``level`` is finite: the k-th
    smallest score with k = ⌈(n + 1)p⌉ exists once n ≥ p / (1 − p) (19 at 0.95), and at least
    :data:`MIN_CALIBRATION_POINTS`."""
    return max(MIN_CALIBRATION_POINTS, math.ceil(level / (1 - level) - 1e-9))


MIN_GROUP_POINTS = 40
"""Fewest calibration points of a group that gets a calibration of its own (with 40, the 95 %
quantile is the 39th smallest score); a group with fewer, or none, gets the conservative
calibration of :meth:`Calibration.group`."""

# Coefficients of Acklam's rational approximation of the inverse normal CDF.
_A = (
    -3.969683028665376e01,
    2.209460984245205e02,
    -2.759285104469687e02,
    1.383577518672690e02,
    -3.066479806614716e01,
    2.506628277459239e00,
)
_B = (
    -5.447609879822406e01,
    1.615858368580409e02,
    -1.556989798598866e02,
    6.680131188771972e01,
    -1.328068155288572e01,
)
_C = (
    -7.784894002430293e-03,
    -3.223964580411365e-01,
    -2.400758277161838e00,
    -2.549732539343734e00,
    4.374664141464968e00,
    2.938163982698783e00,
)
_D = (
    7.784695709041462e-03,
    3.224671290700398e-01,
    2.445134137142996e00,
    3.754408661907416e00,
)
_P_LOW = 0.02425


def _polyval(coefficients: tuple[float, ...], x: float) -> float:
    """Horner evaluation, highest power first."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


def normal_quantile(p: float) -> float:
    """Inverse CDF Φ⁻¹(p) of the standard normal distribution, without scipy.

    Acklam's rational approximation (relative error < 1.2e-9) followed by one Halley step on
    Φ(x) − p computed with :func:`math.erfc`, which brings the error to about machine precision.

    Parameters
    ----------
    p : float
        Probability, 0 < p < 1.

    Returns
    -------
    float
        The x with Φ(x) = p (dimensionless, in standard deviations).
    """
    p = float(p)
    if not 0.0 < p < 1.0:
        raise InputError(f"normal_quantile: p={p} must lie strictly between 0 and 1")
    if p > 0.5:
        return -normal_quantile(1.0 - p)
    if p < _P_LOW:
        q = math.sqrt(-2.0 * math.log(p))
        x = _polyval(_C, q) / (_polyval(_D, q) * q + 1.0)
    else:
        q = p - 0.5
        r = q * q
        x = _polyval(_A, r) * q / (_polyval(_B, r) * r + 1.0)
    # Halley refinement; x ≤ 0 here, so Φ(x) = erfc(−x/√2)/2 carries no cancellation.
    e = 0.5 * math.erfc(-x / math.sqrt(2.0)) - p
    u = e * math.sqrt(2.0 * math.pi) * math.exp(0.5 * x * x)
    return x - u / (1.0 + 0.5 * x * u)


def _as_covariances(Sigma: np.ndarray, n: int | None = None, m: int | None = None) -> np.ndarray:
    """Validate a batch of symmetric covariance matrices and return it as float64 (n, m, m)."""
    S = np.asarray(Sigma, dtype=np.float64)
    if S.ndim != 3 or S.shape[1] != S.shape[2] or S.shape[1] == 0:
        raise InputError(
            f"Sigma has shape {S.shape}: give a batch of square covariance matrices (n, m, m)"
        )
    expected = (S.shape[0] if n is None else n, S.shape[1] if m is None else m)
    if S.shape[:2] != expected:
        raise InputError(
            f"Sigma has shape {S.shape}: expected ({expected[0]}, {expected[1]}, {expected[1]}) "
            "to match y and mu"
        )
    if not np.all(np.isfinite(S)):
        bad = int(np.argwhere(~np.isfinite(S).all(axis=(1, 2)))[0, 0])
        raise InputError(f"Sigma[{bad}] has non-finite entries")
    asym = np.abs(S - S.swapaxes(1, 2)).max(axis=(1, 2))
    size = np.abs(S).max(axis=(1, 2))
    if np.any(asym > 1e-8 * size):
        bad = int(np.argmax(asym > 1e-8 * size))
        raise InputError(f"Sigma[{bad}] is not symmetric: give symmetric covariance matrices")
    return S


def _as_batch(
    y: np.ndarray, mu: np.ndarray, Sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate y (n, m), mu (n, m), Sigma (n, m, m) and return them as float64 arrays."""
    mu_arr = np.asarray(mu, dtype=np.float64)
    if mu_arr.ndim != 2 or mu_arr.shape[1] == 0:
        raise InputError(f"mu has shape {mu_arr.shape}: expected (n, m), e.g. (n, 4) for stress")
    n, m = mu_arr.shape
    y_arr = np.asarray(y, dtype=np.float64)
    if y_arr.shape != (n, m):
        raise InputError(f"y has shape {y_arr.shape}: expected ({n}, {m}) to match mu")
    for name, arr in (("y", y_arr), ("mu", mu_arr)):
        if not np.all(np.isfinite(arr)):
            bad = int(np.argwhere(~np.isfinite(arr).all(axis=1))[0, 0])
            raise InputError(f"{name}[{bad}] has non-finite entries: {arr[bad].tolist()}")
    return y_arr, mu_arr, _as_covariances(Sigma, n, m)


def _cholesky(S: np.ndarray) -> np.ndarray:
    """Lower Cholesky factors of a batch (n, m, m), or InputError naming the first bad matrix."""
    try:
        return np.linalg.cholesky(S)
    except np.linalg.LinAlgError:
        for i, Si in enumerate(S):
            try:
                np.linalg.cholesky(Si)
            except np.linalg.LinAlgError:
                raise InputError(
                    f"Sigma[{i}] is not positive definite (eigenvalues "
                    f"{np.linalg.eigvalsh(Si).tolist()})"
                ) from None
        raise


def _levels(levels: Iterable[float]) -> tuple[float, ...]:
    """Validate coverage levels and return them as a tuple of floats in (0, 1)."""
    out = tuple(float(p) for p in levels)
    if not out or not all(0.0 < p < 1.0 for p in out):
        raise InputError(f"levels={list(out)}: give one or more coverage levels in (0, 1)")
    return out


def mahalanobis(y: np.ndarray, mu: np.ndarray, Sigma: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each truth from its predicted Gaussian.

    Computed as |L⁻¹(y − μ)| with Σ = L Lᵀ the Cholesky factorization, without inverting Σ.

    Parameters
    ----------
    y : ndarray, shape (n, m)
        Truth, e.g. the flattened 2×2 stress (m = 4), in stress units.
    mu : ndarray, shape (n, m)
        Predicted mean, same units.
    Sigma : ndarray, shape (n, m, m)
        Predicted covariance, symmetric positive definite, in stress units squared.

    Returns
    -------
    ndarray, shape (n,)
        d = √((y − μ)ᵀ Σ⁻¹ (y − μ)), dimensionless.
    """
    y, mu, Sigma = _as_batch(y, mu, Sigma)
    L = _cholesky(Sigma)
    w = np.linalg.solve(L, (y - mu)[..., None])[..., 0]
    return np.linalg.norm(w, axis=1)


@dataclass
class Calibration:
    """A fitted split-conformal calibration.

    Attributes
    ----------
    scale : float
        Global factor s: the calibrated covariance is s²Σ (dimensionless).
    quantiles : dict[float, float]
        For each coverage level p, the conformal quantile q_p of the score d/s (dimensionless;
        +∞ when the calibration set was too small for that level).
    norm_quantiles : dict[float, float]
        For each level p, the conformal quantile q^e_p of the Euclidean score
        |y − μ| / (s √tr Σ) (dimensionless, +∞ likewise); used by :meth:`error_bound`.
    interval_quantiles : dict[float, float]
        For each level p of :data:`INTERVAL_LEVELS`, the conformal quantile t_p of the
        component score |yᵢ − μᵢ| / (s √Σᵢᵢ) (dimensionless); used by
        :meth:`interval_factor`. Empty in a calibration written before it existed.
    n_calibration : int
        Number of calibration points the fit used.
    bands : tuple of float or None
        Load band edges in ‖U − I‖ of a group-wise calibration (:func:`group_labels`); None
        for a global one.
    contrast_bands : tuple of float
        Contrast band edges in E_f/E_m of a family operator's group-wise calibration; empty
        where the groups are structure kind and load band alone.
    groups : dict[str, Calibration]
        Group label → the calibration fitted on that group's points alone (groups with at
        least :data:`MIN_GROUP_POINTS` points).
    """

    scale: float
    quantiles: dict[float, float] = field(default_factory=dict)
    norm_quantiles: dict[float, float] = field(default_factory=dict)
    n_calibration: int = 0
    interval_quantiles: dict[float, float] = field(default_factory=dict)
    bands: tuple[float, ...] | None = None
    groups: dict[str, Calibration] = field(default_factory=dict)
    contrast_bands: tuple[float, ...] = ()
    _conservative: Calibration | None = field(default=None, init=False, repr=False,
                                              compare=False)

    def to_dict(self) -> dict:
        """JSON-safe form: plain floats, level keys as strings ("0.9"), +∞ as the string "inf";
        a group-wise calibration adds ``bands``, ``groups`` (label → the group's form) and,
        for a family operator, ``contrast_bands``."""
        out = {
            "scale": float(self.scale),
            **{key: {repr(float(p)): float(q) if math.isfinite(q) else "inf"
                     for p, q in getattr(self, key).items()}
               for key in ("quantiles", "norm_quantiles", "interval_quantiles")},
            "n_calibration": int(self.n_calibration),
        }
        if self.grouped:
            out["bands"] = [float(b) for b in self.bands]
            out["groups"] = {label: cal.to_dict() for label, cal in self.groups.items()}
            if self.contrast_bands:
                out["contrast_bands"] = [float(c) for c in self.contrast_bands]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """Inverse of :meth:`to_dict` (a calibration written before the Euclidean score existed
        has no ``norm_quantiles``; :meth:`error_bound` then asks for a recalibration)."""
        return cls(
            scale=float(d["scale"]),
            quantiles={float(p): float(q) for p, q in d["quantiles"].items()},
            norm_quantiles={float(p): float(q)
                            for p, q in (d.get("norm_quantiles") or {}).items()},
            n_calibration=int(d["n_calibration"]),
            interval_quantiles={float(p): float(q)
                                for p, q in (d.get("interval_quantiles") or {}).items()},
            bands=None if d.get("bands") is None else tuple(float(b) for b in d["bands"]),
            groups={label: cls.from_dict(g) for label, g in (d.get("groups") or {}).items()},
            contrast_bands=tuple(float(c) for c in d.get("contrast_bands") or ()),
        )

    @property
    def grouped(self) -> bool:
        """Whether this is a group-wise calibration (even one whose groups were all too small)."""
        return self.bands is not None

    def labels(self, kinds: Iterable[str], stretch: np.ndarray,
               contrast: np.ndarray | None = None) -> np.ndarray:
        """The group label (n,) of each point of structure kind ``kinds`` (n,), ‖U − I‖
        ``stretch`` (n,) and, for a calibration with contrast bands, contrast E_f/E_m
        ``contrast`` (n,): :func:`group_labels` with this calibration's bands."""
        return group_labels(kinds, stretch, self.bands or (), contrast, self.contrast_bands)

    def group(self, label: str) -> Calibration:
        """The calibration of the group ``label`` (see :func:`group_labels`): its own where it
        was fitted, else a conservative one — the global scale with, per level, the largest
        radius q·s of the global calibration and of every fitted group."""
        if label in self.groups:
            return self.groups[label]
        if self._conservative is None:
            cals = [self, *self.groups.values()]

            def widest(key: str) -> dict[float, float]:
                return {p: max(_lookup(getattr(c, key), p, math.inf) * c.scale
                               for c in cals) / self.scale for p in getattr(self, key)}

            self._conservative = Calibration(self.scale, widest("quantiles"),
                                             widest("norm_quantiles"), 0,
                                             widest("interval_quantiles"))
        return self._conservative

    def per_point(self, labels: np.ndarray | None) -> list[tuple[np.ndarray, Calibration]]:
        """(indices, calibration) pairs covering the n points with group ``labels`` (n,):
        one pair with this calibration where it is global or no labels are given."""
        if not self.grouped or labels is None:
            n = 0 if labels is None else len(labels)
            return [(np.arange(n) if labels is not None else slice(None), self)]
        uniq, inverse = np.unique(np.asarray(labels), return_inverse=True)
        return [(np.flatnonzero(inverse == k), self.group(str(label)))
                for k, label in enumerate(uniq)]

    def covariance(self, Sigma: np.ndarray) -> np.ndarray:
        """Calibrated covariance s²Σ, same shape as ``Sigma`` (stress units squared)."""
        return self.scale**2 * np.asarray(Sigma, dtype=np.float64)

    def radius(self, level: float) -> float:
        """Conformal quantile q of the score d/s at ``level`` (dimensionless).

        Raises :class:`InputError` when the calibration was not fitted for ``level``.
        """
        q = _lookup(self.quantiles, level, math.nan)
        if not math.isnan(q):
            return q
        raise InputError(
            f"level={level} is not calibrated: available levels are {sorted(self.quantiles)}; "
            "refit with fit_conformal(..., levels=...) including it"
        )

    def error_bound(self, Sigma: np.ndarray, level: float,
                    labels: np.ndarray | None = None) -> np.ndarray:
        """Upper bound q^e · s · √tr Σ on the Euclidean error |y − μ| holding with
        probability ≥ ``level`` (split conformal on the Euclidean score).

        Parameters
        ----------
        Sigma : ndarray, shape (n, m, m)
            Predicted (uncalibrated) covariance, stress units squared.
        level : float
            A calibrated coverage level.
        labels : ndarray of str, shape (n,), optional
            The points' groups (:func:`group_labels`), for a group-wise calibration.

        Returns
        -------
        ndarray, shape (n,)
            The bound, in stress units (+∞ if q_level is +∞).
        """
        return self.trace_bound(np.trace(_as_covariances(Sigma), axis1=1, axis2=2), level,
                                labels)

    def trace_bound(self, trace: np.ndarray, level: float,
                    labels: np.ndarray | None = None) -> np.ndarray:
        """:meth:`error_bound` from the traces tr Σ (n,) (stress units squared) alone."""
        root = np.sqrt(np.maximum(np.asarray(trace, dtype=np.float64), 0.0))
        if not self.grouped or labels is None:
            return self.norm_radius(level) * self.scale * root
        out = np.empty_like(root)
        for idx, cal in self.per_point(labels):
            out[idx] = cal.norm_radius(level) * cal.scale * root[idx]
        return out

    def bound_factors(self, level: float, labels: Iterable[str]) -> np.ndarray:
        """q^e · s (dimensionless) of each group label at ``level``: the factor of √tr Σ in
        :meth:`trace_bound` (a table for callers that group points by integer codes)."""
        return np.array([self.group(label).norm_radius(level) * self.group(label).scale
                         for label in labels])

    def interval_factor(self, level: float) -> float:
        """t_p of the per-component interval μᵢ ± t_p s √Σᵢᵢ at ``level``: its conformal
        quantile where fitted, else the Gaussian Φ⁻¹((1 + p)/2) (a calibration without
        ``interval_quantiles``, or a level outside :data:`INTERVAL_LEVELS`)."""
        q = _lookup(self.interval_quantiles, level, math.nan)
        return q if not math.isnan(q) else normal_quantile(0.5 * (1.0 + level))

    def norm_radius(self, level: float) -> float:
        """Conformal quantile q^e of the Euclidean score |y − μ| / (s √tr Σ) at ``level``.

        Raises :class:`InputError` when it was not fitted for ``level``.
        """
        q = _lookup(self.norm_quantiles, level, math.nan)
        if not math.isnan(q):
            return q
        raise InputError(
            f"level={level}: the calibration has no Euclidean error quantile for it (levels "
            f"{sorted(self.norm_quantiles)}; an empty list means it was written by an older "
            "NeuroScale): rerun `neuroscale calibrate --model MODEL --data CALIBRATION.h5`"
        )


def _lookup(table: dict[float, float], level: float, default: float) -> float:
    """The value of ``table`` at ``level`` (to 1e-12), else ``default``."""
    for p, q in table.items():
        if math.isclose(p, level, rel_tol=0.0, abs_tol=1e-12):
            return q
    return default


def group_labels(kinds: Iterable[str], stretch: np.ndarray,
                 bands: Iterable[float] = LOAD_BANDS, contrast: np.ndarray | None = None,
                 contrast_bands: Iterable[float] = ()) -> np.ndarray:
    """Group label per point, ``"kind|b"`` (n,) str: the point's structure kind (n,) and the
    index b of its load band, from its ‖U − I‖ ``stretch`` (n,) and the band edges ``bands``;
    with ``contrast_bands`` (edges in E_f/E_m) ``"kind|b|c"``, c the band of the point's
    ``contrast`` (n,) (:func:`band_name` spells a label out)."""
    labels = np.char.add(np.char.add(np.asarray(list(kinds), dtype=str), "|"),
                         _band_index(stretch, bands))
    contrast_bands = tuple(contrast_bands)
    if not contrast_bands:
        return labels
    if contrast is None:
        raise InputError("group_labels: contrast bands need each point's contrast E_f/E_m "
                         "(a family operator's phases)")
    return np.char.add(np.char.add(labels, "|"), _band_index(contrast, contrast_bands))


def _band_index(values: np.ndarray, edges: Iterable[float]) -> np.ndarray:
    """The band index (n,) str of ``values`` (n,) between the sorted ``edges``."""
    return np.searchsorted(np.asarray(tuple(edges), dtype=float), np.asarray(values),
                           side="right").astype(str)


def band_name(label: str, bands: Iterable[float], contrast_bands: Iterable[float] = ()) -> str:
    """A group label of :func:`group_labels` in words: ``"random_fibres, 0.1 ≤ ‖U − I‖ < 0.2"``,
    and for one with a contrast band ``"…, 10 ≤ E_f/E_m < 30"``."""
    kind, b, *c = label.split("|")
    words = [kind, _interval(int(b), "‖U − I‖", (0.0, *bands, math.inf))]
    if c:
        words.append(_interval(int(c[0]), "E_f/E_m", (0.0, *contrast_bands, math.inf)))
    return ", ".join(words)


def _interval(k: int, name: str, edges: tuple[float, ...]) -> str:
    """Band k between ``edges`` in words: ``"0.1 ≤ name < 0.2"``, open above the last edge."""
    lo, hi = edges[k], edges[k + 1]
    return f"{lo:g} ≤ {name}" + (f" < {hi:g}" if math.isfinite(hi) else "")


def fit_conformal(
    y: np.ndarray, mu: np.ndarray, Sigma: np.ndarray, levels: Iterable[float] = LEVELS,
    labels: np.ndarray | None = None, bands: Iterable[float] = LOAD_BANDS,
    contrast_bands: Iterable[float] = (),
) -> Calibration:
    """Fit the scale and the split-conformal quantiles on a calibration set.

    Parameters
    ----------
    y : ndarray, shape (n, m)
        Truth on the calibration set, stress units; n ≥ 10.
    mu : ndarray, shape (n, m)
        Predicted means, stress units.
    Sigma : ndarray, shape (n, m, m)
        Predicted covariances, stress units squared.
    levels : iterable of float
        Coverage levels p in (0, 1).
    labels : ndarray of str, shape (n,), optional
        Each point's group (:func:`group_labels` with ``bands``): also fit every group with
        at least :data:`MIN_GROUP_POINTS` points on its own points (group-wise calibration).
    bands, contrast_bands : iterable of float
        The load (and contrast) band edges the labels were made with (recorded).

    Returns
    -------
    Calibration
        s² = mean(d²)/m, q_p = the ⌈(n + 1)p⌉-th smallest score d/s (+∞ if that exceeds n),
        q^e_p likewise for |y − μ| / (s √tr Σ), and t_p at :data:`INTERVAL_LEVELS` for the
        n·m component scores |yᵢ − μᵢ| / (s √Σᵢᵢ); per group the same on its points.
    """
    if labels is not None:
        labels = np.asarray(labels, dtype=str)
        if labels.shape != (len(y),):
            raise InputError(f"fit_conformal: labels has shape {labels.shape}, give one group "
                             f"label per point ({len(y)},)")
        cal = fit_conformal(y, mu, Sigma, levels)
        cal.bands = tuple(float(b) for b in bands)
        cal.contrast_bands = tuple(float(c) for c in contrast_bands)
        for label in np.unique(labels):
            mine = labels == label
            if mine.sum() >= MIN_GROUP_POINTS:
                cal.groups[str(label)] = fit_conformal(y[mine], mu[mine], Sigma[mine], levels)
        return cal
    levels = _levels(levels)
    d = mahalanobis(y, mu, Sigma)
    n, m = np.shape(mu)
    if n < MIN_CALIBRATION_POINTS:
        raise InputError(
            f"fit_conformal got {n} calibration points: give at least {MIN_CALIBRATION_POINTS}"
        )
    mean_sq = float(np.mean(d**2))
    if mean_sq <= 0.0:
        raise InputError("fit_conformal: y equals mu at every point, so no scale can be fitted")
    scale = math.sqrt(mean_sq / m)
    y, mu, Sigma = _as_batch(y, mu, Sigma)
    rms = scale * np.sqrt(np.trace(Sigma, axis1=1, axis2=2))
    return Calibration(scale=scale, quantiles=_conformal_quantiles(d / scale, levels),
                       norm_quantiles=_conformal_quantiles(
                           np.linalg.norm(y - mu, axis=1) / rms, levels),
                       n_calibration=int(n),
                       interval_quantiles=_conformal_quantiles(
                           (np.abs(y - mu) / _component_sd(Sigma, scale)).ravel(),
                           INTERVAL_LEVELS))


def _component_sd(Sigma: np.ndarray, scale: float | np.ndarray) -> np.ndarray:
    """s √Σᵢᵢ (n, m) of covariances Sigma (n, m, m): each component's calibrated standard
    deviation (stress units)."""
    return scale * np.sqrt(np.maximum(np.diagonal(Sigma, axis1=1, axis2=2), 0.0))


def conformal_quantile(scores: np.ndarray, confidence: float) -> float:
    """The ⌈(n + 1)c⌉-th smallest of n scores (split conformal at confidence c); +∞ when
    n < c / (1 − c), too few for any finite bound."""
    n = len(scores)
    # The small offset keeps (n + 1)c that is an integer in exact arithmetic from rounding up.
    k = math.ceil((n + 1) * confidence - 1e-9)
    return float(np.sort(scores)[k - 1]) if k <= n else math.inf


def _conformal_quantiles(scores: np.ndarray, levels: tuple[float, ...]) -> dict[float, float]:
    """Level p → :func:`conformal_quantile` of the scores at p."""
    return {p: conformal_quantile(scores, p) for p in levels}


def coverage(
    y: np.ndarray,
    mu: np.ndarray,
    Sigma: np.ndarray,
    calibration: Calibration,
    levels: Iterable[float] = LEVELS,
    bound: bool = False,
    labels: np.ndarray | None = None,
) -> dict[float, float]:
    """Observed coverage of the conformal ellipsoids {d/s ≤ q_p}, or with ``bound`` of the
    Euclidean error bounds the fallback policy uses (:meth:`Calibration.error_bound`).

    Parameters
    ----------
    y, mu : ndarray, shape (n, m)
        Truth and predicted mean, stress units.
    Sigma : ndarray, shape (n, m, m)
        Predicted (uncalibrated) covariance, stress units squared.
    calibration : Calibration
        Fitted for every level in ``levels``.
    levels : iterable of float
        Coverage levels.
    bound : bool
        Score the Euclidean bound instead of the ellipsoid.
    labels : ndarray of str, shape (n,), optional
        The points' groups, for a group-wise calibration (each scored by its group's).

    Returns
    -------
    dict[float, float]
        Level p → fraction of points with d/s ≤ q_p (with ``bound``: |y − μ| ≤ the bound).
    """
    if bound:
        y, mu, Sigma = _as_batch(y, mu, Sigma)
        err = np.linalg.norm(y - mu, axis=1)
        return {p: float(np.mean(err <= calibration.error_bound(Sigma, p, labels)))
                for p in _levels(levels)}
    d = mahalanobis(y, mu, Sigma)
    inside = {p: np.zeros(len(d), dtype=bool) for p in _levels(levels)}
    for idx, cal in calibration.per_point(labels):
        for p in inside:
            inside[p][idx] = d[idx] / cal.scale <= cal.radius(p)
    return {p: float(np.mean(v)) for p, v in inside.items()}


def interval_coverage(
    y: np.ndarray,
    mu: np.ndarray,
    Sigma: np.ndarray,
    calibration: Calibration,
    levels: Iterable[float] = LEVELS,
    labels: np.ndarray | None = None,
) -> dict[float, float]:
    """Observed coverage of the per-component central intervals μᵢ ± t_p s √Σᵢᵢ
    (:meth:`Calibration.interval_factor`).

    Parameters
    ----------
    y, mu : ndarray, shape (n, m)
        Truth and predicted mean, stress units.
    Sigma : ndarray, shape (n, m, m)
        Predicted (uncalibrated) covariance, stress units squared.
    calibration : Calibration
        Supplies the scale s and the factors t_p.
    levels : iterable of float
        Nominal levels p in (0, 1).
    labels : ndarray of str, shape (n,), optional
        The points' groups, for a group-wise calibration (each its group's s and t_p).

    Returns
    -------
    dict[float, float]
        Level p → fraction of the n·m components inside their interval.
    """
    y, mu, Sigma = _as_batch(y, mu, Sigma)
    err = np.abs(y - mu)
    levels = _levels(levels)
    inside = {p: np.zeros(err.shape, dtype=bool) for p in levels}
    for idx, cal in calibration.per_point(labels if len(y) else None):
        sd = _component_sd(Sigma[idx], cal.scale)
        for p in levels:
            inside[p][idx] = err[idx] <= cal.interval_factor(p) * sd
    return {p: float(np.mean(v)) for p, v in inside.items()}


def _ece_levels(n_levels: int) -> tuple[float, ...]:
    """The levels k/(n_levels + 1), k = 1..n_levels: 0.05, 0.10, …, 0.95 for 19."""
    if n_levels < 1:
        raise InputError(f"n_levels={n_levels}: give at least 1")
    return tuple(k / (n_levels + 1) for k in range(1, n_levels + 1))


def expected_calibration_error(
    y: np.ndarray,
    mu: np.ndarray,
    Sigma: np.ndarray,
    calibration: Calibration,
    n_levels: int = 19,
    labels: np.ndarray | None = None,
) -> float:
    """Expected calibration error of the scaled per-component Gaussian intervals.

    Parameters
    ----------
    y, mu : ndarray, shape (n, m)
        Truth and predicted mean, stress units.
    Sigma : ndarray, shape (n, m, m)
        Predicted (uncalibrated) covariance, stress units squared.
    calibration : Calibration
        Supplies the scale s (use ``Calibration(scale=1.0)`` for the raw model).
    n_levels : int
        Number of evenly spaced levels k/(n_levels + 1); 19 gives 0.05, 0.10, …, 0.95.
    labels : ndarray of str, shape (n,), optional
        The points' groups, for a group-wise calibration.

    Returns
    -------
    float
        mean over levels p of |observed interval coverage(p) − p|, in [0, 1].
    """
    observed = interval_coverage(y, mu, Sigma, calibration, _ece_levels(n_levels), labels)
    return float(np.mean([abs(c - p) for p, c in observed.items()]))


def reliability_diagram(
    y: np.ndarray,
    mu: np.ndarray,
    Sigma: np.ndarray,
    calibration: Calibration,
    path: str | Path,
    title: str = "Reliability of per-component error bars",
) -> None:
    """Write a PNG of observed against nominal coverage of the per-component intervals.

    Shows the raw model (s = 1) and the calibrated one (the calibration's s), the diagonal of
    perfect calibration, and each curve's ECE in the legend.

    Parameters
    ----------
    y, mu : ndarray, shape (n, m)
        Truth and predicted mean, stress units.
    Sigma : ndarray, shape (n, m, m)
        Predicted (uncalibrated) covariance, stress units squared.
    calibration : Calibration
        Supplies the scale s.
    path : str or Path
        Output PNG file; missing parent folders are created.
    title : str
        Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = _ece_levels(19)
    curves = {
        "raw (s = 1)": Calibration(scale=1.0),
        f"calibrated (s = {calibration.scale:.3g})": calibration,
    }
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", label="ideal")
    for (label, cal), marker in zip(curves.items(), ("s", "o"), strict=True):
        observed = interval_coverage(y, mu, Sigma, cal, levels)
        ece = float(np.mean([abs(c - p) for p, c in observed.items()]))
        ax.plot(levels, list(observed.values()), marker=marker, label=f"{label}, ECE = {ece:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("expected coverage")
    ax.set_ylabel("observed coverage")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Area under the ROC curve for detecting out-of-distribution points by a score.

    Computed exactly as the Mann–Whitney statistic: the probability that an out-of-distribution
    score exceeds an in-distribution one, ties counting 1/2 (through average ranks).

    Parameters
    ----------
    scores_in : ndarray, shape (n_in,)
        Scores of in-distribution points (negatives).
    scores_out : ndarray, shape (n_out,)
        Scores of out-of-distribution points (positives, expected higher).

    Returns
    -------
    float
        AUROC in [0, 1]: 1 for perfect separation, 0.5 for chance, 0 for reversed scores.
    """
    a = np.asarray(scores_in, dtype=np.float64)
    b = np.asarray(scores_out, dtype=np.float64)
    for name, arr in (("scores_in", a), ("scores_out", b)):
        if arr.ndim != 1 or arr.size == 0:
            raise InputError(f"{name} has shape {arr.shape}: expected a non-empty 1D array")
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name} has non-finite entries")
    x = np.concatenate([a, b])
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(0.5 * (starts + 1 + ends), ends - starts)
    n_out = b.size
    u = ranks[a.size :].sum() - n_out * (n_out + 1) / 2
    return float(u / (a.size * n_out))


def uncertainty_score(Sigma: np.ndarray) -> np.ndarray:
    """Scalar predicted uncertainty √tr(Σ) of each point, used for out-of-distribution detection.

    Parameters
    ----------
    Sigma : ndarray, shape (n, m, m)
        Predicted covariance, stress units squared.

    Returns
    -------
    ndarray, shape (n,)
        √tr(Σ), stress units.
    """
    S = _as_covariances(Sigma)
    return np.sqrt(np.maximum(np.trace(S, axis1=1, axis2=2), 0.0))
