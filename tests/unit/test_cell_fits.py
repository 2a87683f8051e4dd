"""Cell fits of a cold start: closed-form fits of the basis mixture, their scores and bound."""

from __future__ import annotations

import math
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch

from neuroscale_couple.calibration import conformal_quantile
from neuroscale_couple.cell_fits import CellFits, fit_weights
from neuroscale_couple.cold_start import ColdStart
from neuroscale_couple.coupler import Coupler, Policy
from neuroscale_couple.errors import CheckpointError, InputError
from neuroscale_couple.materials import lame
from neuroscale_couple.operators.base import load_operator

pytestmark = pytest.mark.skip_in_parallel


def neo_hookean(F: np.ndarray, E: float = 70.0, nu: float = 0.33
                ) -> tuple[np.ndarray, np.ndarray]:
    """Plane-strain Neo-Hookean P̄ (n, 2, 2) and A (n, 2, 2, 2, 2) by automatic
    differentiation of W = μ/2 (tr C − 2) − μ ln J + λ/2 (ln J)²."""
    lam, mu = lame(E, nu)

    def energy(f: torch.Tensor) -> torch.Tensor:
        lnJ = torch.log(torch.linalg.det(f))
        return 0.5 * mu * ((f * f).sum() - 2) - mu * lnJ + 0.5 * lam * lnJ**2

    stress = torch.func.grad(energy)
    Ft = torch.as_tensor(F, dtype=torch.float64)
    return (torch.func.vmap(stress)(Ft).numpy(),
            torch.func.vmap(torch.func.jacrev(stress))(Ft).numpy())


def loads(n: int, size: float, seed: int = 0) -> np.ndarray:
    return np.eye(2) + size * np.random.default_rng(seed).uniform(-1, 1, (n, 2, 2))


def test_two_solves_of_a_neo_hookean_cell_give_its_law_everywhere():
    F0 = loads(2, 0.05)
    P0, A0 = neo_hookean(F0)
    w = fit_weights(F0, P0, A0)
    lam, mu = lame(70.0, 0.33)
    np.testing.assert_allclose(w[:2], [mu, lam], rtol=1e-8)
    assert np.abs(w[2:]).max() < 1e-8 * mu
    fits = CellFits(0.95)
    for F, P, A in zip(F0, P0, A0, strict=True):  # two load steps' solves
        fits.observe(7, F, P, A)
        fits.end_step(MPI.COMM_SELF)
    F = loads(5, 0.2, seed=1)
    P, A = neo_hookean(F)
    r = fits.predict(np.full(5, 7), F)
    np.testing.assert_allclose(r["stress"], P, rtol=0, atol=1e-8 * np.abs(P).max())
    np.testing.assert_allclose(r["tangent"], A, rtol=0, atol=1e-8 * np.abs(A).max())
    # the tangent of a fit is major-symmetric, its stress vanishes at F̄ = I
    np.testing.assert_allclose(r["tangent"], r["tangent"].transpose(0, 3, 4, 1, 2), atol=1e-9)
    assert np.abs(fits.predict(np.array([7]), np.eye(2)[None])["stress"]).max() < 1e-9


def test_a_fit_of_the_quartic_basis_recovers_a_mixture_of_it():
    """The 17-term basis of a SANO head with ``quartic_basis`` (bench/error_budget.py's floor)."""
    from neuroscale_couple.cell_fits import basis_responses

    w = np.random.default_rng(3).uniform(0.1, 2.0, 17)
    F = loads(6, 0.15)
    G, T = basis_responses(F, 17)
    P, A = np.einsum("k,nkij->nij", w, G), np.einsum("k,nkijlm->nijlm", w, T)
    np.testing.assert_allclose(fit_weights(F, P, A, 17), w, rtol=1e-6)
    # the 14 terms without the quartic ones leave an error
    assert np.abs(fit_weights(F, P, A) @ basis_responses(F)[0].reshape(6, 14, 4)
                  - P.reshape(6, 4)).max() > 1e-3 * np.abs(P).max()


def test_conformal_quantile_needs_enough_scores():
    scores = np.arange(1.0, 20.0)  # 19 scores: the 95 % quantile is the largest
    assert conformal_quantile(scores, 0.95) == 19.0
    assert conformal_quantile(scores[:-1], 0.95) == math.inf
    assert conformal_quantile(np.arange(100.0), 0.9) == 90.0


def test_scores_are_taken_once_a_step_against_the_fit_the_step_began_with():
    """A fit learns only at the step's end; the bound is calibrated once 2 / (1 − c) scores
    exist, each the error over the normaliser σ = ‖Aₛ‖ (‖F̄ − F̄ₛ‖ + δ)³."""
    fits = CellFits(0.9, history=2)
    ids = np.arange(20)
    F0 = loads(20, 0.03)
    P0, A0 = neo_hookean(F0, E=3.0)
    P1, A1 = neo_hookean(F0 * 1.01, E=3.0)
    Fh = F0 * 0.99  # a step before, at the same material: two steps pin the law down
    Ph, Ah = neo_hookean(Fh, E=3.0)
    for i in ids:
        fits.observe(int(i), Fh[i], Ph[i], Ah[i])
    fits.end_step(MPI.COMM_SELF)
    for i in ids:
        fits.observe(int(i), Fh[i] * 0.5, Ph[i], Ah[i])  # a Newton iterate's solve …
        fits.observe(int(i), F0[i], P0[i], A0[i])  # … replaced by the step's last one
    assert fits.end_step(MPI.COMM_SELF) == 20 and not fits.calibrated
    assert fits.fitted(np.array([3, 25])).tolist() == [True, False]
    P2, A2 = neo_hookean(F0 * 1.02, E=70.0)  # another material: large errors
    for i in ids:
        fits.observe(int(i), F0[i] * 1.02, P2[i], A2[i])
        fits.score(int(i), F0[i] * 1.02, P2[i])
        fits.observe(int(i), F0[i] * 1.01, P1[i], A1[i])
        fits.score(int(i), F0[i] * 1.01, P1[i])  # a second score of the step: not taken
    assert fits.end_step(MPI.COMM_SELF) == 20 and fits.calibrated
    sigma = np.linalg.norm(A0.reshape(20, -1), axis=1) * (
        np.linalg.norm((0.02 * F0).reshape(20, -1), axis=1) + 1e-3) ** 3
    fitted = neo_hookean(F0 * 1.02, E=3.0)[0]  # a Neo-Hookean cell's fit is its law
    errors = np.linalg.norm((P2 - fitted).reshape(20, -1), axis=1)
    assert fits.quantile == pytest.approx(np.sort(errors / sigma)[18], rel=1e-6)
    assert fits.stress_scale == pytest.approx(float(np.concatenate([Ph, Ph, P0, P2, P1]).std()),
                                              rel=1e-12)
    # the refit learnt each step's last solve (E 3 at F̄ and 1.01 F̄), not the E 70 solve that
    # the step's later one replaced: it is still E 3's law
    np.testing.assert_allclose(fits.predict(ids[:1], F0[:1])["stress"], P0[:1], rtol=1e-6)


def test_a_census_draws_enough_fitted_points_for_a_bound():
    """Before any bound exists a census scores 2 / (1 − c) fitted points in expectation (at
    least the audited share), drawn by point id afresh each step; unfitted points never."""
    fits = CellFits(0.95, audit=0.05)
    F = loads(400, 0.02)
    P, A = neo_hookean(F)
    for i in range(400):
        fits.observe(i, F[i], P[i], A[i])
    fits.end_step(MPI.COMM_SELF)
    ids = np.arange(500)  # 400 fitted, 100 not
    drawn = [fits.census(ids, step, MPI.COMM_SELF) for step in range(1, 40)]
    counts = [int(d.sum()) for d in drawn]
    assert 30 <= np.mean(counts) <= 50 and min(counts) >= 19, counts
    assert not any(d[400:].any() for d in drawn)
    assert (drawn[0] & drawn[1]).sum() < 0.5 * counts[0]  # afresh each step
    few = CellFits(0.95, audit=0.05)
    for i in range(30):  # fewer fitted points than a bound needs: every one is drawn
        few.observe(i, F[i], P[i], A[i])
    few.end_step(MPI.COMM_SELF)
    assert few.census(ids, 1, MPI.COMM_SELF)[:30].all()


def test_the_first_census_calibrates_the_fits_at_the_next_steps_extrapolated_loads():
    """calibrate_ahead scores the fits as they stand against solves at the loads 2F̄ₖ − F̄ₖ₋₁
    of the next step and calibrates on those scores at once: the bound is their conformal
    quantile, and at those loads it covers the fits' true errors at the confidence; fewer
    scores than a finite quantile needs leave the bound infinite."""
    n = 200
    F0 = loads(n, 0.01)
    P0, A0 = neo_hookean(F0, E=3.0)
    F1 = 2 * F0 - loads(n, 0.003, seed=3)  # the first step's loads, extrapolated
    P1 = neo_hookean(F1, E=3.0)[0] * (1 + 0.01 * np.random.default_rng(4).normal(size=(n, 1, 1)))
    fits = CellFits(0.9)
    for i in range(n):  # one solve each: a fit is not the law
        fits.observe(i, F0[i], P0[i], A0[i])
    fits.end_step(MPI.COMM_SELF)
    assert not fits.calibrated
    ids = np.arange(n)
    p = fits.predict(ids, F1)
    scores = np.linalg.norm(P1 - p["stress"], axis=(1, 2)) / p["sigma"]
    census = ids[::5]
    fits.calibrate_ahead(census, F1[census], P1[census], MPI.COMM_SELF)
    assert fits.quantile == pytest.approx(conformal_quantile(scores[census], 0.9), rel=1e-12)
    covered = np.linalg.norm(P1 - p["stress"], axis=(1, 2)) <= fits.quantile * p["sigma"]
    assert 0.8 <= covered[np.setdiff1d(ids, census)].mean() < 1.0
    few = CellFits(0.9)
    for i in range(n):
        few.observe(i, F0[i], P0[i], A0[i])
    few.end_step(MPI.COMM_SELF)
    few.calibrate_ahead(ids[:5], F1[:5], P1[:5], MPI.COMM_SELF)
    assert not few.calibrated


def test_fits_restored_from_a_checkpoint_state_are_the_fits_on_any_partition(tmp_path):
    """state() through an npz file, restored on the same partition or gathered from two
    ranks' states: the same fits (to the bit), bound, stress scale and audits; a state
    without fits is refused."""
    ids = np.arange(30)
    parts = [CellFits(0.9, history=2, audit=0.3) for _ in range(2)]
    for step, scale in enumerate((0.02, 0.03, 0.04)):
        F = loads(30, scale, seed=step)
        P, A = neo_hookean(F, E=3.0 + step)  # a law that changes: fits with errors
        for i in ids:
            if parts[i % 2].fitted(np.array([i]))[0]:
                parts[i % 2].score(int(i), F[i], P[i])
            parts[i % 2].observe(int(i), F[i], P[i], A[i])
        for fits in parts:  # the two "ranks" calibrate on each one's scores (COMM_SELF)
            fits.end_step(MPI.COMM_SELF)
    states = []
    for k, fits in enumerate(parts):
        np.savez(tmp_path / f"{k}.npz", **fits.state())
        with np.load(tmp_path / f"{k}.npz") as f:
            states.append(dict(f))
    F = loads(30, 0.05, seed=9)
    for k, fits in enumerate(parts):  # on the same partition
        mine = ids[ids % 2 == k]
        back = CellFits(0.9, history=2, audit=0.3)
        back.restore(states[k:k + 1], mine.tolist())
        assert back.quantile == fits.quantile and math.isfinite(back.quantile)
        assert back.stress_scale == fits.stress_scale
        for key, value in fits.predict(mine, F[mine]).items():
            np.testing.assert_array_equal(back.predict(mine, F[mine])[key], value)
        np.testing.assert_array_equal(back.audited(ids, 3), fits.audited(ids, 3))
    whole = CellFits(0.9, history=2, audit=0.3)  # one rank takes both ranks' points
    whole.restore(states, ids.tolist())
    assert whole.fitted(ids).all() and whole.quantile == parts[0].quantile
    for k, fits in enumerate(parts):
        mine = ids[ids % 2 == k]
        np.testing.assert_array_equal(whole.predict(mine, F[mine])["stress"],
                                      fits.predict(mine, F[mine])["stress"])
    with pytest.raises(CheckpointError, match="no cell fits"):
        CellFits(0.9).restore([{"solved/id": np.zeros(0)}], ids.tolist())


def test_audits_are_drawn_afresh_each_step_and_step_zero_keeps_the_held_out_draw(tmp_path):
    model = tmp_path / "m.pt"
    model.write_bytes(b"")
    cold = ColdStart(model, held_out=0.1)
    ids = np.arange(20000)
    first, later = cold.is_held_out(ids), cold.is_held_out(ids, step=1)
    assert abs(first.mean() - 0.1) < 0.01 and abs(later.mean() - 0.1) < 0.01
    assert (first & later).mean() < 0.02  # independent draws: ~1 % in both
    np.testing.assert_array_equal(cold.is_held_out(ids, step=0), first)


MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"


@pytest.mark.parametrize("policy, model, message", [
    ({"rtol": 0.02, "cell_audit": 0.0}, None, "cell_audit=0.0"),
    ({"rtol": 0.02, "cell_fits": True}, None, "give a 2D model and a tolerance"),
    ({"rtol": 0.02, "cell_fits": True}, "fe2_composite_3d.pt", "give a 2D model"),
    ({"rtol": 0.0, "cell_fits": True}, "fe2_composite.pt", "give a 2D model and a tolerance")])
def test_cell_fits_are_refused_where_they_cannot_serve(policy, model, message):
    with pytest.raises(InputError, match=message):
        Coupler(None if model is None else load_operator(MODELS / model), lambda m: None,
                policy=Policy(**policy))
