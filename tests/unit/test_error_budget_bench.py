"""bench/error_budget.py: a cell's quadratic form in the basis weights is its solves' loss, and
the basis floor of a cell whose response lies in the basis is nil."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroscale_couple.cell_fits import basis_responses
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.training import TrainingData

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skip_in_parallel


@pytest.fixture(scope="module")
def bench(bench_scripts):
    import error_budget

    return error_budget


def cells(weights: np.ndarray, per_cell: int = 5) -> TrainingData:
    """Cells (one per row of ``weights`` (M, 17)) whose solves are the basis mixture's."""
    rng = np.random.default_rng(0)
    m = len(weights)
    F = np.eye(2) + 0.1 * rng.uniform(-1, 1, (m * per_cell, 2, 2))
    G, T = basis_responses(F, 17)
    w = np.repeat(weights, per_cell, axis=0)
    P, A = np.einsum("sk,skij->sij", w, G), np.einsum("sk,skijlm->sijlm", w, T)
    return TrainingData(torch.rand(m, 1, 32, 32), torch.arange(m).repeat_interleave(per_cell),
                        *(torch.as_tensor(x) for x in (F, P, A)))


def test_a_cells_quadratic_form_is_the_loss_of_its_solves(bench):
    model = load_operator(ROOT / "examples" / "models" / "fe2_composite.pt").double()
    truth = np.random.default_rng(1).uniform(0.5, 2.0, (3, 17))
    data = cells(truth)
    z, M, b, c, _, P, index = bench.cell_quadratics(model, data, 17, (2.0, 3.0), 0.2)
    assert z.shape == (3, model.config.latent)
    w = torch.as_tensor(np.random.default_rng(2).uniform(0, 2, (3, 17)))
    Gt, Tt = (torch.as_tensor(x).flatten(2) for x in basis_responses(data.F.numpy(), 17))
    wi = w[index]
    direct = torch.zeros(3, dtype=torch.float64).index_add_(
        0, index, ((torch.einsum("sk,skj->sj", wi, Gt) - P) ** 2).sum(1) / 2.0
        + 0.2 * ((torch.einsum("sk,skj->sj", wi, Tt) - data.A.flatten(1)) ** 2).sum(1) / 3.0)
    quadratic = torch.einsum("bi,bij,bj->b", w, M, w) - 2 * (b * w).sum(1) + c
    np.testing.assert_allclose(quadratic.numpy(), direct.numpy(), rtol=1e-9)
    # the cell's own weights make its loss, and its basis floor, vanish
    own = torch.as_tensor(truth)
    at_own = torch.einsum("bi,bij,bj->b", own, M, own) - 2 * (b * own).sum(1) + c
    assert (at_own.abs() < 1e-9 * c).all()
    np.testing.assert_allclose(bench.basis_floor(data, 17), data.P.numpy(),
                               atol=1e-9 * float(data.P.abs().max()))


def test_probe_heads_are_read_as_hidden_by_depth(bench):
    assert bench.head_shape("256x2") == (256, 2)
    for bad in ("256", "0x2", "wide"):
        with pytest.raises(argparse.ArgumentTypeError, match="hidden"):
            bench.head_shape(bad)
