"""bench/ablations.py's summary: t-intervals over seeds, and a variant decided against ``full``
only where its difference paired by seed keeps one sign beyond the noise."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(bench_scripts):
    import ablations

    return ablations


def runs_of(errors: dict[str, list[float]]) -> dict:
    """Fake per-run records with the given P̄ errors per seed (other metrics fixed)."""
    return {(v, s): {"history": {"epochs": 10},
                     "scores": {"rel_l2_stress": e, "rel_l2_tangent": e, "coverage_95": 0.95,
                                "ece": 0.05}}
            for v, per_seed in errors.items() for s, e in enumerate(per_seed)}


def test_interval_matches_t_distribution(bench):
    x = np.array([1.0, 2.0, 3.0])
    m, lo, hi = bench.interval(x)
    assert m == pytest.approx(2.0)
    assert hi - m == pytest.approx(4.302652729911275 * 1.0 / np.sqrt(3))
    assert m - lo == pytest.approx(hi - m)


def test_paired_difference_decides_only_beyond_noise(bench):
    # seed-to-seed spread 0.01, but one_scale is worse by 0.005 with every seed: decided
    # (paired); pooling differs by +-0.004 around 0: not decided
    full = [0.050, 0.060, 0.070]
    worse = np.add(full, [0.005, 0.0052, 0.0048])
    runs = runs_of({"full": full, "one_scale": worse.tolist(),
                    "pooling": np.add(full, [0.004, -0.004, 0.001]).tolist()})
    rows = {r["variant"]: r for r in bench.summarise(runs, ["full", "one_scale", "pooling"],
                                                      [0, 1, 2])}
    worse = rows["one_scale"]["rel_l2_stress"]
    assert worse["vs_full"]["decided"] and worse["vs_full"]["low"] > 0
    assert worse["low"] < rows["full"]["rel_l2_stress"]["mean"]  # unpaired: overlapping
    assert not rows["pooling"]["rel_l2_stress"]["vs_full"]["decided"]
    assert "vs_full" not in rows["full"]["rel_l2_stress"]


def test_failed_run_is_reported_not_averaged(bench):
    runs = runs_of({"full": [0.05, 0.06, 0.07], "pooling": [0.05, 0.06, 0.07]})
    runs["pooling", 2] = {"error": "worker exited with 1"}
    row = bench.summarise(runs, ["full", "pooling"], [0, 1, 2])[1]
    assert row["seeds"] == [0, 1] and row["failed"] == {2: "worker exited with 1"}
    assert row["rel_l2_stress"]["mean"] == pytest.approx(0.055)
