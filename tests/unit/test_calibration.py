"""Split conformal calibration of the operator's Gaussian predictions, and its metrics."""

import json
import math

import numpy as np
import pytest

from neuroscale_couple.calibration import (
    CONTRAST_BANDS,
    LEVELS,
    MIN_GROUP_POINTS,
    Calibration,
    auroc,
    band_name,
    coverage,
    expected_calibration_error,
    fit_conformal,
    group_labels,
    interval_coverage,
    mahalanobis,
    normal_quantile,
    reliability_diagram,
    uncertainty_score,
)
from neuroscale_couple.errors import InputError

N_CAL, N_TEST = 4000, 20000


def _tolerance(p: float) -> float:
    """Three standard deviations of held-out coverage: calibration plus test binomial noise."""
    return 3 * math.sqrt(p * (1 - p) * (1 / N_CAL + 1 / N_TEST))


def _synthetic(n: int, seed: int, noise: str = "gaussian", m: int = 4):
    """Truth y = μ + L z with Σ_true = L Lᵀ random SPD; returns y, μ, Σ_true."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, m, m))
    Sigma_true = A @ A.swapaxes(1, 2) + 0.5 * np.eye(m)
    L = np.linalg.cholesky(Sigma_true)
    z = rng.normal(size=(n, m))
    if noise == "student":
        # Multivariate Student t with 3 degrees of freedom: heavy tails, finite variance.
        z = z / np.sqrt(rng.chisquare(3, size=(n, 1)) / 3)
    mu = rng.normal(scale=10.0, size=(n, m))
    return mu + (L @ z[..., None])[..., 0], mu, Sigma_true


def _raw_ece(factor: float) -> float:
    """ECE of Gaussian intervals whose standard deviations are ``factor`` times the truth."""
    levels = np.arange(1, 20) / 20
    covered = [math.erf(normal_quantile((1 + p) / 2) * factor / math.sqrt(2)) for p in levels]
    return float(np.mean(np.abs(np.array(covered) - levels)))


def test_mahalanobis_matches_explicit_inverse():
    y, mu, Sigma = _synthetic(50, 0)
    r = y - mu
    expected = np.sqrt(np.einsum("ni,nij,nj->n", r, np.linalg.inv(Sigma), r))
    np.testing.assert_allclose(mahalanobis(y, mu, Sigma), expected, rtol=1e-10)


def test_underconfident_model_is_rescaled_and_covers_held_out_data():
    y, mu, Sigma_true = _synthetic(N_CAL, 1)
    cal = fit_conformal(y, mu, 4 * Sigma_true)
    # s² = mean(d²)/4 with d² ~ χ²₄/4: relative std of s is √(8/N_CAL)/8 ≈ 0.6 %.
    assert cal.scale == pytest.approx(0.5, rel=0.03)
    assert cal.n_calibration == N_CAL
    assert set(cal.quantiles) == set(LEVELS)

    y, mu, Sigma_true = _synthetic(N_TEST, 2)
    Sigma = 4 * Sigma_true
    for p, c in coverage(y, mu, Sigma, cal).items():
        assert c == pytest.approx(p, abs=_tolerance(p)), (p, c)
    for p, c in interval_coverage(y, mu, Sigma, cal).items():
        assert c == pytest.approx(p, abs=0.02), (p, c)

    raw = Calibration(scale=1.0)
    # Intervals twice too wide: coverage 2Φ(2 z_p) − 1 instead of p, e.g. 0.82 at p = 0.5.
    assert interval_coverage(y, mu, Sigma, raw, [0.5])[0.5] == pytest.approx(0.823, abs=0.02)
    assert expected_calibration_error(y, mu, Sigma, cal) < 0.02
    raw_ece = expected_calibration_error(y, mu, Sigma, raw)
    assert raw_ece > 0.1
    assert raw_ece == pytest.approx(_raw_ece(2.0), abs=0.01)


def test_overconfident_model_is_widened():
    y, mu, Sigma_true = _synthetic(N_CAL, 3)
    cal = fit_conformal(y, mu, Sigma_true / 9)
    assert cal.scale == pytest.approx(3.0, rel=0.03)
    y, mu, Sigma_true = _synthetic(N_TEST, 4)
    assert expected_calibration_error(y, mu, Sigma_true / 9, cal) < 0.02
    raw_ece = expected_calibration_error(y, mu, Sigma_true / 9, Calibration(scale=1.0))
    assert raw_ece > 0.25
    assert raw_ece == pytest.approx(_raw_ece(1 / 3), abs=0.01)


def test_conformal_guarantee_holds_for_heavy_tailed_errors():
    y, mu, Sigma = _synthetic(N_CAL, 5, noise="student")
    cal = fit_conformal(y, mu, Sigma)
    y, mu, Sigma = _synthetic(N_TEST, 6, noise="student")
    observed = coverage(y, mu, Sigma, cal)
    for p, c in observed.items():
        assert c == pytest.approx(p, abs=_tolerance(p)), (p, c)
    # The Gaussian radius, the χ₄ median √3.3567, is far from calibrated on these tails.
    d = mahalanobis(y, mu, Sigma) / cal.scale
    assert np.mean(d <= math.sqrt(3.356694)) > 0.5 + 0.1


def test_component_intervals_are_calibrated_at_every_level_for_heavy_tailed_errors():
    """Student-t₃ errors with the right covariance: scaled to unit variance they are peaked,
    so the Gaussian intervals μᵢ ± z_p s √Σᵢᵢ over-cover (ECE several %); the conformal
    factors t_p bring every level 0.05…0.95 to within sampling noise (ECE < 0.5 %)."""
    y, mu, Sigma = _synthetic(N_CAL, 7, noise="student")
    cal = fit_conformal(y, mu, Sigma)
    gaussian = Calibration(cal.scale, cal.quantiles, cal.norm_quantiles, cal.n_calibration)
    assert set(cal.interval_quantiles) == {k / 20 for k in range(1, 20)}
    assert cal.interval_factor(0.5) < 0.8 * normal_quantile(0.75)  # t₃/√3: median 0.44
    assert gaussian.interval_factor(0.95) == normal_quantile(0.975)
    y, mu, Sigma = _synthetic(N_TEST, 8, noise="student")
    assert expected_calibration_error(y, mu, Sigma, gaussian) > 0.02
    assert expected_calibration_error(y, mu, Sigma, cal) < 0.005
    for p, c in interval_coverage(y, mu, Sigma, cal, [0.5, 0.9, 0.95]).items():
        assert c == pytest.approx(p, abs=0.01), (p, c)
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.interval_quantiles == cal.interval_quantiles
    old = cal.to_dict()
    del old["interval_quantiles"]  # written before the factors existed: Gaussian intervals
    assert Calibration.from_dict(old).interval_factor(0.5) == normal_quantile(0.75)


def test_error_bound_holds_with_stated_frequency():
    y, mu, Sigma = _synthetic(N_CAL, 7, noise="student")
    cal = fit_conformal(y, mu, Sigma)
    y, mu, Sigma = _synthetic(N_TEST, 8, noise="student")
    err = np.linalg.norm(y - mu, axis=1)
    observed = coverage(y, mu, Sigma, cal, bound=True)
    for p in LEVELS:
        bound = cal.error_bound(Sigma, p)
        assert bound.shape == (N_TEST,)
        # calibrated on the Euclidean score itself: neither too narrow nor wastefully wide
        assert observed[p] == pytest.approx(p, abs=_tolerance(p))
        # the ellipsoid's circumscribed ball, q_p s √λ_max, is valid too but wider
        ball = cal.radius(p) * cal.scale * np.sqrt(np.linalg.eigvalsh(Sigma)[:, -1])
        assert np.mean(err <= ball) > p + _tolerance(p)
        assert np.median(ball / bound) > 1.2


def test_finite_sample_quantile_on_a_hand_computed_example():
    # Ten points at distances 1, 2, …, 10 from μ with Σ = I: s² = mean(k²)/4 = 38.5/4.
    k = np.arange(1.0, 11.0)
    y = np.zeros((10, 4))
    y[:, 0] = k
    cal = fit_conformal(y, np.zeros((10, 4)), np.tile(np.eye(4), (10, 1, 1)))
    s = math.sqrt(38.5 / 4)
    assert cal.scale == pytest.approx(s)
    assert cal.radius(0.5) == pytest.approx(6 / s)  # ⌈11 · 0.5⌉ = 6th smallest
    assert cal.radius(0.9) == pytest.approx(10 / s)  # ⌈11 · 0.9⌉ = 10th smallest
    assert cal.radius(0.95) == math.inf  # ⌈11 · 0.95⌉ = 11 > 10
    assert np.all(cal.error_bound(np.tile(np.eye(4), (3, 1, 1)), 0.95) == math.inf)
    # Euclidean score k / (s √tr I) = k / 2s: the 50 % bound is the 6th smallest error itself.
    assert cal.norm_radius(0.9) == pytest.approx(10 / (2 * s))
    np.testing.assert_allclose(cal.error_bound(np.tile(np.eye(4), (3, 1, 1)), 0.5), 6.0)
    np.testing.assert_allclose(cal.covariance(np.eye(4)[None]), (s**2 * np.eye(4))[None])


def test_round_trip_through_json_and_uncalibrated_level():
    y, mu, Sigma = _synthetic(20, 9)
    cal = fit_conformal(y, mu, Sigma, levels=(0.5, 0.9, 0.99))
    assert cal.radius(0.99) == math.inf
    text = json.dumps(cal.to_dict(), allow_nan=False)
    back = Calibration.from_dict(json.loads(text))
    assert back == cal
    assert set(json.loads(text)["quantiles"]) == {"0.5", "0.9", "0.99"}
    assert set(json.loads(text)["norm_quantiles"]) == {"0.5", "0.9", "0.99"}
    old = {k: v for k, v in cal.to_dict().items() if k != "norm_quantiles"}
    with pytest.raises(InputError, match="rerun `neuroscale calibrate"):
        Calibration.from_dict(old).error_bound(Sigma, 0.9)
    with pytest.raises(InputError, match=r"level=0\.8 .*\[0\.5, 0\.9, 0\.99\]"):
        back.radius(0.8)
    with pytest.raises(InputError, match="level=0.95"):
        coverage(y, mu, Sigma, back)


def test_normal_quantile_known_values():
    assert normal_quantile(0.975) == pytest.approx(1.959963984540054, rel=1e-12)
    assert normal_quantile(0.95) == pytest.approx(1.6448536269514722, rel=1e-12)
    assert normal_quantile(0.75) == pytest.approx(0.6744897501960817, rel=1e-12)
    assert normal_quantile(0.5) == pytest.approx(0.0, abs=1e-15)
    assert normal_quantile(0.025) == pytest.approx(-1.959963984540054, rel=1e-12)
    assert normal_quantile(1e-10) == pytest.approx(-6.361340902404056, rel=1e-10)
    for p in (1e-12, 0.01, 0.02425, 0.3, 0.7, 0.999):
        x = normal_quantile(p)
        assert 0.5 * math.erfc(-x / math.sqrt(2)) == pytest.approx(p, rel=1e-12)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(InputError, match="normal_quantile"):
            normal_quantile(bad)


def test_auroc():
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=5000), rng.normal(size=5000)
    assert auroc(a, b + 100) == 1.0
    assert auroc(a + 100, b) == 0.0
    assert auroc(a, b) == pytest.approx(0.5, abs=0.02)
    # Unit shift between unit normals: AUROC = Φ(1/√2) ≈ 0.7602.
    assert auroc(a, b + 1) == pytest.approx(0.7602, abs=0.02)
    # Pairs (in, out): (1,2) 1, (1,3) 1, (2,2) ½, (2,3) 1, (4,2) 0, (4,3) 0 → 3.5/6.
    assert auroc([1.0, 2.0, 4.0], [2.0, 3.0]) == pytest.approx(3.5 / 6)
    assert auroc([1.0, 1.0], [1.0, 1.0]) == 0.5
    with pytest.raises(InputError, match="scores_out"):
        auroc([1.0], [])


def test_uncertainty_score_separates_inflated_covariances():
    _, _, Sigma = _synthetic(500, 11)
    np.testing.assert_allclose(
        uncertainty_score(Sigma), np.sqrt(np.trace(Sigma, axis1=1, axis2=2)), rtol=1e-14
    )
    assert auroc(uncertainty_score(Sigma), uncertainty_score(25 * Sigma[::-1])) > 0.95


def test_bad_shapes_raise_input_error():
    y, mu, Sigma = _synthetic(20, 12)
    with pytest.raises(InputError, match=r"y has shape \(20, 3\): expected \(20, 4\)"):
        fit_conformal(y[:, :3], mu, Sigma)
    with pytest.raises(InputError, match="mu has shape"):
        fit_conformal(y, mu[:, 0], Sigma)
    with pytest.raises(InputError, match=r"Sigma has shape \(20, 4, 3\)"):
        fit_conformal(y, mu, Sigma[:, :, :3])
    with pytest.raises(InputError, match=r"Sigma has shape \(19, 4, 4\).*\(20, 4, 4\)"):
        mahalanobis(y, mu, Sigma[1:])
    with pytest.raises(InputError, match="at least 10"):
        fit_conformal(y[:9], mu[:9], Sigma[:9])
    bad = Sigma.copy()
    bad[3] = -np.eye(4)
    with pytest.raises(InputError, match=r"Sigma\[3\] is not positive definite"):
        mahalanobis(y, mu, bad)
    bad[3] = np.triu(np.ones((4, 4)))
    with pytest.raises(InputError, match=r"Sigma\[3\] is not symmetric"):
        mahalanobis(y, mu, bad)
    with pytest.raises(InputError, match="levels"):
        fit_conformal(y, mu, Sigma, levels=(0.9, 1.0))


def test_reliability_diagram_writes_png(tmp_path):
    y, mu, Sigma = _synthetic(2000, 13)
    cal = fit_conformal(y, mu, 4 * Sigma)
    path = tmp_path / "plots" / "reliability.png"
    reliability_diagram(y, mu, 4 * Sigma, cal, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000


def _two_groups(n: int, share_a: float, seed: int):
    """Points of two groups whose predicted Σ = I is wrong in opposite ways: the true error
    is 2× too large in group a and 2× too small in group b (band 0 of each kind)."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(n) < share_a, "a|0", "b|0")
    true_sd = np.where(labels == "a|0", 2.0, 0.5)
    y = rng.standard_normal((n, 4)) * true_sd[:, None]
    return y, np.zeros((n, 4)), np.broadcast_to(np.eye(4), (n, 4, 4)).copy(), labels


def test_group_wise_calibration_holds_in_every_group_of_a_shifted_mix():
    """Calibrated on a 50/50 mix, tested on 90/10: one global s and q under-cover group a
    (its errors are 2× the predicted ones) and over-cover b; fitted per group (Mondrian), the
    95 % bound covers 95 ± 2 % of each group and each group's ECE is ≤ 1 %."""
    y, mu, S, labels = _two_groups(2000, 0.5, seed=1)
    global_cal = fit_conformal(y, mu, S)
    grouped = fit_conformal(y, mu, S, labels=labels, bands=())
    assert grouped.grouped and set(grouped.groups) == {"a|0", "b|0"}
    yt, mut, St, lt = _two_groups(20000, 0.9, seed=2)
    for group in ("a|0", "b|0"):
        m = lt == group
        naive = coverage(yt[m], mut[m], St[m], global_cal, bound=True)[0.95]
        fitted = coverage(yt[m], mut[m], St[m], grouped, bound=True, labels=lt[m])[0.95]
        assert abs(naive - 0.95) > 0.04, (group, naive)
        assert abs(fitted - 0.95) <= 0.02, (group, fitted)
        assert expected_calibration_error(yt[m], mut[m], St[m], grouped, labels=lt[m]) <= 0.01
    mixed = coverage(yt, mut, St, grouped, bound=True, labels=lt)[0.95]
    assert abs(mixed - 0.95) <= 0.02
    assert expected_calibration_error(yt, mut, St, grouped, labels=lt) <= 0.01


def test_a_group_without_its_own_calibration_gets_the_widest_bound():
    """A group too small to fit (or absent from the calibration set) gets, per level, the
    largest radius q·s of the global fit and every fitted group; the form survives JSON."""
    y, mu, S, labels = _two_groups(400, 0.5, seed=3)
    labels[:MIN_GROUP_POINTS - 1] = "c|1"  # too few to fit a group of its own
    cal = Calibration.from_dict(json.loads(json.dumps(
        fit_conformal(y, mu, S, labels=labels, bands=(0.1,)).to_dict())))
    assert cal.bands == (0.1,) and "c|1" not in cal.groups and len(cal.groups) == 2
    widest = max(c.norm_radius(0.95) * c.scale for c in (cal, *cal.groups.values()))
    for label in ("c|1", "never seen|0"):
        g = cal.group(label)
        assert math.isclose(g.norm_radius(0.95) * g.scale, widest, rel_tol=1e-12)
    trace = np.full(3, 4.0)
    bound = cal.trace_bound(trace, 0.95, np.array(["a|0", "b|0", "c|1"]))
    assert np.allclose(bound, 2.0 * cal.bound_factors(0.95, ["a|0", "b|0", "c|1"]))
    assert bound[0] > bound[1]  # a's errors are 4× b's


def test_group_labels_and_their_names():
    labels = group_labels(["random_fibres", "fibre_chain", "random_fibres"],
                          np.array([0.05, 0.1, 0.35]), (0.1, 0.2))
    assert labels.tolist() == ["random_fibres|0", "fibre_chain|1", "random_fibres|2"]
    assert band_name("fibre_chain|1", (0.1, 0.2)) == "fibre_chain, 0.1 ≤ ‖U − I‖ < 0.2"
    assert band_name("random_fibres|2", (0.1, 0.2)) == "random_fibres, 0.2 ≤ ‖U − I‖"
    with pytest.raises(InputError, match="one group label per point"):
        fit_conformal(np.zeros((20, 4)) + 1, np.zeros((20, 4)),
                      np.broadcast_to(np.eye(4), (20, 4, 4)), labels=np.array(["a|0"] * 3))


def test_contrast_bands_split_a_family_operators_groups():
    """A family operator's groups add the band of the contrast E_f/E_m: ``kind|b|c``."""
    labels = group_labels(["random_fibres", "fibre_chain"], np.array([0.05, 0.25]), (0.1, 0.2),
                          np.array([2.0, 50.0]), CONTRAST_BANDS)
    assert labels.tolist() == ["random_fibres|0|0", "fibre_chain|2|3"]
    assert (band_name("fibre_chain|2|2", (0.1, 0.2), CONTRAST_BANDS)
            == "fibre_chain, 0.2 ≤ ‖U − I‖, 10 ≤ E_f/E_m < 30")
    with pytest.raises(InputError, match="contrast"):
        group_labels(["random_fibres"], np.array([0.05]), (0.1,), None, CONTRAST_BANDS)
    y, mu, S, _ = _two_groups(400, 0.5, seed=4)
    contrast = np.where(np.arange(400) % 2, 50.0, 2.0)
    cal = fit_conformal(y, mu, S, labels=group_labels(["a"] * 400, np.zeros(400), (0.1,),
                                                      contrast, CONTRAST_BANDS),
                        bands=(0.1,), contrast_bands=CONTRAST_BANDS)
    assert set(cal.groups) == {"a|0|0", "a|0|3"} and cal.contrast_bands == CONTRAST_BANDS
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    assert cal.labels(["a"], np.array([0.3]), np.array([20.0])).tolist() == ["a|1|2"]
