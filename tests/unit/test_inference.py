"""The operator in the loop (Inference): the same response as the model's own predict, the
bound's float32 round-off far below the bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neuroscale_couple.calibration import Calibration
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.operators.heads import lower_triangular, lower_triangular_norm2
from neuroscale_couple.operators.inference import Inference
from neuroscale_couple.sampling import loads_in_ball, rng_for
from neuroscale_couple.solvers.microstructure import random_fibres

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"

pytestmark = pytest.mark.skip_in_parallel


def _points(n: int, distinct: int) -> tuple[np.ndarray, np.ndarray]:
    """Each of n points' row into ``distinct`` latents and its F̄ (n, 2, 2), loads up to
    |F̄ − I| = 0.3 (the training range)."""
    return np.arange(n) % distinct, loads_in_ball(n, 0.3, rng_for(7, 0)).reshape(n, 2, 2)


def test_closed_form_response_equals_predict_and_its_float32_bound_is_far_below_the_bound():
    model = load_operator(MODELS / "fe2_composite.pt").double()
    z = model.latents([random_fibres(0.3, 1 + s % 8, seed=s) for s in range(40)])
    rows, F = _points(3000, 40)
    # chunks smaller than the points: the chunking must not show
    r = Inference(model, z, chunk=1000).response(rows, F)
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
    torch.testing.assert_close(lower_triangular_norm2(raw, 4, diag_offset=-3.0),
                               L.square().sum((-1, -2)), rtol=1e-14, atol=0)
