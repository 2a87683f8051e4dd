"""The operator in the loop (Inference): the same response as the model's own predict, on
the compiled CPU kernel and on the torch path that serves other devices; the torch path's
float32 bound's round-off far below the bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neuroscale_couple import native
from neuroscale_couple.calibration import Calibration
from neuroscale_couple.operators import heads, kernels
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.operators.heads import (
    DIAG_OFFSET,
    MIN_DIAG,
    QuadraticCovarianceHead,
    green_lagrange_mandel,
    lower_triangular,
    lower_triangular_norm2,
    mixture_response,
    mixture_stress_norm2,
)
from neuroscale_couple.operators.inference import Inference
from neuroscale_couple.sampling import loads_in_ball, rng_for
from neuroscale_couple.solvers.microstructure import random_fibres

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"

pytestmark = pytest.mark.skip_in_parallel


def _points(n: int, distinct: int) -> tuple[np.ndarray, np.ndarray]:
    """Each of n points' row into ``distinct`` latents and its F̄ (n, 2, 2), loads up to
    |F̄ − I| = 0.3 (the training range)."""
    return np.arange(n) % distinct, loads_in_ball(n, 0.3, rng_for(7, 0)).reshape(n, 2, 2)


@pytest.mark.parametrize("compiled", [True, False])
def test_closed_form_response_equals_predict_and_its_float32_bound_is_far_below_the_bound(
        compiled):
    model = load_operator(MODELS / "fe2_composite.pt").double()
    z = model.latents([random_fibres(0.3, 1 + s % 8, seed=s) for s in range(40)])
    rows, F = _points(3000, 40)
    # chunks smaller than the points: the chunking must not show
    r = Inference(model, z, chunk=1000, compiled=compiled).response(rows, F)
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model.predict(z[rows], torch.as_tensor(F)).items()}
    # stress, tangent, energy: float64 closed form of the mean weights (the mean of the members'
    # responses, by linearity in the weights): round-off only
    for got, want in ((r.stress, ref["mean"]), (r.tangent, ref["tangent"]),
                      (r.energy, ref["energy"])):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.abs(want).max())
    # the bound from the float32 covariance head agrees with float64 to 1e-5 of the bound
    cal = Calibration.from_dict(model.calibration)
    bound = cal.error_bound(ref["cov"], 0.95)
    fast = cal.trace_bound(r.trace_aleatoric + r.trace_epistemic, 0.95)
    assert (np.abs(fast - bound) <= 1e-5 * bound).all()
    # its epistemic part alone (exclude_noise) to 1e-4 of itself: the members' spread is a small
    # difference of large basis terms, which float32 resolves to ~3e-5 of it
    epistemic = cal.error_bound(ref["cov"] - ref["aleatoric"], 0.95)
    np.testing.assert_allclose(cal.trace_bound(r.trace_epistemic, 0.95), epistemic, rtol=1e-4)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("covariance", ["network", "quadratic"])
@pytest.mark.parametrize("consecutive", [False, True])
def test_the_bound_computed_in_float64_equals_predict_to_round_off(consecutive, covariance,
                                                                   compiled):
    # the in-loop path (latents' part cached, members batched, covariance network by columns,
    # or a quadratic head's coefficients, its factor's norm and the members' spread without
    # forming Σ) in float64: predict's traces
    model = load_operator(MODELS / "fe2_composite.pt").double()
    z = model.latents([random_fibres(0.3, 1 + s % 8, seed=s) for s in range(40)])
    if covariance == "quadratic":  # its aleatoric head replaced by a seeded quadratic one
        torch.manual_seed(3)
        model.covariance = heads.QuadraticCovarianceHead(model.config.latent,
                                                         model.config.hidden).double()
    rows, F = _points(1500, 40)
    if consecutive:  # one structure per point, in order: latents read in place
        z, rows = z[rows], np.arange(len(rows))
    r = Inference(model, z, chunk=1000, bound_dtype=torch.float64,
                  compiled=compiled).response(rows, F)
    with torch.no_grad():
        ref = model.predict(z[rows], torch.as_tensor(F))
    np.testing.assert_allclose(r.tangent, ref["tangent"].numpy(), rtol=0,
                               atol=1e-13 * ref["tangent"].abs().max().item())
    alea = torch.diagonal(ref["aleatoric"], dim1=-2, dim2=-1).sum(-1).numpy()
    total = torch.diagonal(ref["cov"], dim1=-2, dim2=-1).sum(-1).numpy()
    np.testing.assert_allclose(r.trace_aleatoric, alea, rtol=1e-10, atol=0)
    np.testing.assert_allclose(r.trace_epistemic, total - alea, rtol=1e-10, atol=0)


@pytest.mark.parametrize("quartic", [False, True])
def test_the_compiled_kernel_is_the_torch_closed_form(quartic):
    # weights of either basis (14 or 17 of 6 directions), any sign; members' differences kept
    # in float32 as Inference keeps them; latents gathered in a shuffled order
    rng = np.random.default_rng(5)
    n, u, members, nd = 400, 50, 3, heads.EnergyHead.n_directions
    K = 2 + 2 * nd + 3 * quartic
    w_mean, coef = rng.uniform(-1, 2, (u, K)), rng.normal(0, 0.5, (u, 10, 10)).astype(np.float32)
    w_dev = rng.normal(0, 0.1, (u, members, K)).astype(np.float32)
    rows, F = rng.integers(0, u, n), _points(n, 1)[1]
    c, s = np.cos(np.arange(nd) * np.pi / nd), np.sin(np.arange(nd) * np.pi / nd)
    out = [np.empty((n, 2, 2)), np.empty((n, 2, 2, 2, 2)), np.empty(n), np.empty(n), np.empty(n)]
    e_ref = 0.07
    kernels.closed_form_2d(F, rows, w_mean, w_dev, coef, (c * c, s * s, c * s), quartic, e_ref,
                           DIAG_OFFSET, MIN_DIAG, out)
    stress, tangent, energy, alea, epi = out
    Ft = torch.as_tensor(F)
    ref = mixture_response(torch.as_tensor(w_mean[rows]), Ft, nd)
    for got, key in ((stress, "stress"), (tangent, "tangent"), (energy, "energy")):
        np.testing.assert_allclose(got, ref[key].numpy(), rtol=0,
                                   atol=1e-13 * ref[key].abs().max().item())
    np.testing.assert_allclose(tangent, tangent.transpose(0, 3, 4, 1, 2), rtol=0,
                               atol=1e-13 * np.abs(tangent).max())  # major symmetry
    spread = mixture_stress_norm2(torch.as_tensor(w_dev[rows]).double(), Ft.unsqueeze(1), nd)
    np.testing.assert_allclose(epi, spread.mean(1).numpy(), rtol=1e-12)
    phi = QuadraticCovarianceHead.strain_features(green_lagrange_mandel(Ft) / e_ref)
    raw = (torch.as_tensor(coef[rows]).double() @ phi.unsqueeze(-1))[..., 0]
    np.testing.assert_allclose(alea, lower_triangular_norm2(raw, 4, DIAG_OFFSET).numpy(),
                               rtol=1e-12)


def test_the_kernel_compiles_where_told_and_else_the_operator_runs_in_torch(
        tmp_path, monkeypatch, caplog):
    model = load_operator(MODELS / "fe2_composite_fast.pt")
    z = model.latents([random_fibres(0.3, 2, seed=1)])
    rows, F = _points(20, 1)
    ref = Inference(model, z, compiled=False).response(rows, F)
    monkeypatch.setenv("NEUROSCALE_KERNEL_DIR", str(tmp_path / "kernels"))
    native.library.cache_clear()
    try:
        assert kernels.library() is not None
        assert [p.suffix for p in (tmp_path / "kernels").iterdir()] == [".so"]
        assert Inference(model, z).compiled
        native.library.cache_clear()
        (tmp_path / "a-file").write_text("")  # no folder can be made under it
        monkeypatch.setenv("NEUROSCALE_KERNEL_DIR", str(tmp_path / "a-file" / "kernels"))
        assert not Inference(model, z).compiled and "set NEUROSCALE_KERNEL_DIR" in caplog.text
        native.library.cache_clear()
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("NEUROSCALE_KERNEL_DIR", str(tmp_path / "empty"))
        inference = Inference(model, z)
        assert not inference.compiled and "no C compiler" in caplog.text
        r = inference.response(rows, F)
        np.testing.assert_allclose(r.stress, ref.stress, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="a C compiler is needed"):
            kernels.closed_form_2d(F, rows, *[None] * 9)
    finally:
        native.library.cache_clear()


def test_the_kernel_refuses_arrays_that_do_not_fit_its_points():
    n, u, K = 5, 3, 17
    F, rows = np.tile(np.eye(2), (n, 1, 1)), np.zeros(n, dtype=np.int64)
    dev, coef = np.zeros((u, 4, K), np.float32), np.zeros((u, 10, 10), np.float32)
    out = [np.empty((n, 2, 2)), np.empty((n, 2, 2, 2, 2)), np.empty(n), np.empty(n),
           np.empty(n - 1)]
    args = (np.zeros((u, K)), dev, coef, (np.ones(6),) * 3, True, 0.1, DIAG_OFFSET, MIN_DIAG)
    with pytest.raises(ValueError, match="do not fit 5 points of 3 latents"):
        kernels.closed_form_2d(F, rows, *args, out)
    out[-1] = np.empty(n)
    with pytest.raises(IndexError, match=r"rows must lie in \[0, 3\)"):
        kernels.closed_form_2d(F, rows + 3, *args, out)
    with pytest.raises(TypeError, match="both be float32 or float64"):
        kernels.closed_form_2d(F, rows, args[0], dev, coef.astype(np.float64), *args[3:], out)


def test_an_operator_without_closed_form_answers_through_its_predict():
    model = load_operator(MODELS / "hmm_cu_thermal.pt").double()
    assert not model.energy.closed_form
    z = torch.randn(3, model.config.latent, dtype=torch.float64)  # any latents will do
    rows, F = _points(50, 3)
    r = Inference(model, z, chunk=16).response(rows, F)
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model.predict(z[rows], torch.as_tensor(F)).items()}
    np.testing.assert_allclose(r.stress, ref["mean"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(r.trace_aleatoric + r.trace_epistemic,
                               np.trace(ref["cov"], axis1=1, axis2=2), rtol=1e-12)


def test_the_norm_of_the_covariance_factor_needs_no_factor():
    raw = torch.randn(3, 5, 10, dtype=torch.float64)
    L = lower_triangular(raw, 4, diag_offset=-3.0)
    norm2 = L.square().sum((-1, -2))
    torch.testing.assert_close(lower_triangular_norm2(raw, 4, diag_offset=-3.0), norm2,
                               rtol=1e-14, atol=0)
    # the entries along the rows, points along the columns
    torch.testing.assert_close(lower_triangular_norm2(raw.mT.contiguous(), 4, diag_offset=-3.0,
                                                      dim=-2), norm2, rtol=1e-14, atol=0)


def test_the_cached_triangle_indices_serve_autograd_after_a_first_call_in_inference_mode():
    heads._triangle.cache_clear()  # the first call of this process may be the one below
    with torch.inference_mode():
        lower_triangular_norm2(torch.randn(5, 10), 4)
    raw = torch.randn(5, 10, requires_grad=True)
    lower_triangular_norm2(raw, 4).sum().backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all()
    with pytest.raises(ValueError, match="dim=0"):
        lower_triangular_norm2(raw, 4, dim=0)


def test_coupler_answers_each_point_with_its_own_structure_and_holds_one_latent_per_structure():
    from mpi4py import MPI

    from neuroscale_couple.coupler import Coupler, Policy

    model = load_operator(MODELS / "fe2_composite.pt")
    cells = [random_fibres(0.2 + 0.05 * s, 1 + s, seed=s) for s in range(3)]
    ids = np.random.default_rng(0).permutation(60) * 7  # not in order: rows are sorted by id
    structures = [cells[i % 3] for i in range(60)]
    coupler = Coupler(model, lambda m: None, policy=Policy(rtol=1e9, atol=1e9),
                      comm=MPI.COMM_SELF)
    coupler.register(ids, structures)
    assert len(coupler.latent_store) == 3  # 60 points, 3 latents
    _, F = _points(60, 1)
    coupler.begin_step(0)
    r = coupler.evaluate(F, ids)
    z = coupler.latent_store.latents(structures)  # each point's latent, in the model's dtype
    with torch.no_grad():
        ref = model.predict(z, torch.as_tensor(F))
    np.testing.assert_allclose(r.stress, ref["mean"].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.tangent, ref["tangent"].numpy(), rtol=0, atol=1e-10)
    assert (r.uncertainty > 0).all() and (r.source == 0).all()
