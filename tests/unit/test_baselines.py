"""The baseline models of bench/baselines.py: they fit a tiny set and predict the right shapes,
the descriptor features are those of the cell, the objectivity and symmetry measures tell an
objective hyperelastic law from others, the EquiNO-style model is objective by construction,
the PIPNO- and PPI-NO-style models lower their losses (physics, pseudo-physics) and refuse bad
input, budgets stop the training and end its cosine schedule, and a missing optional package
says how to install it."""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch

from neuroscale_couple.baselines import (
    DescriptorMLP,
    EquiNOStyle,
    FNOBaseline,
    PIPNOStyle,
    PPINOStyle,
    descriptors,
    major_symmetry_error,
    objectivity_error,
    stress_and_tangent,
)
from neuroscale_couple.baselines import base as baselines_base
from neuroscale_couple.baselines.equino import polar
from neuroscale_couple.baselines.pipno import ParallelFourierNet
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.sano import SANO, SANOConfig
from neuroscale_couple.physics import micro_stress
from neuroscale_couple.store import load_rve_dataset
from neuroscale_couple.training import TrainConfig, TrainingData, train

CELLS = Path(__file__).resolve().parents[2] / "examples" / "models" / "fe2_composite.anchor.h5"
RES = 16


@pytest.fixture(scope="module")
def arrays() -> dict:
    return load_rve_dataset(CELLS)


@pytest.fixture(scope="module")
def cells(arrays) -> TrainingData:
    """6 cells of the shipped anchor set, 12 loads each, images of 16² pixels."""
    data = TrainingData.from_arrays(arrays, RES)
    return data.subset(np.flatnonzero(data.micro_index.numpy() < 6))


@pytest.fixture(scope="module")
def cells_with_fields(cells) -> TrainingData:
    """The cells with synthetic periodic fluctuation fields w (S, 2, 16, 16), cell lengths:
    one smooth mode whose amplitude grows with the load."""
    y = torch.arange(RES, dtype=cells.F.dtype) / RES
    mode = torch.sin(2 * math.pi * (y[:, None] + y[None, :]))
    amplitude = 0.05 * (cells.F - torch.eye(2, dtype=cells.F.dtype)).flatten(1)[:, :2]
    return dataclasses.replace(cells, w=amplitude[:, :, None, None] * mode)


def micro(arrays: dict) -> dict:
    return {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("micro/")}


def neo_hookean(F: torch.Tensor) -> torch.Tensor:
    """An objective hyperelastic law (λ = 2, μ = 1)."""
    return micro_stress(F, torch.full(F.shape[:-2], 2.0, dtype=F.dtype),
                        torch.full(F.shape[:-2], 1.0, dtype=F.dtype), "neo_hookean")


def small_strain(F: torch.Tensor) -> torch.Tensor:
    """Hooke's law on the displacement gradient: hyperelastic in F − I, not objective."""
    return micro_stress(F, torch.full(F.shape[:-2], 2.0, dtype=F.dtype),
                        torch.full(F.shape[:-2], 1.0, dtype=F.dtype), "linear")


def loads(n: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.eye(2, dtype=torch.float64) + 0.1 * torch.randn(n, 2, 2, generator=gen,
                                                                 dtype=torch.float64)


def models(cells: TrainingData) -> list:
    fno = FNOBaseline(modes=4, width=8, layers=2) if _has_neuralop() else None
    equino = EquiNOStyle(cells.config, resolution=RES, modes=4, hidden=16)
    pipno = PIPNOStyle(cells.config, width=8, modes=4, layers=2, branches=2)
    ppino = PPINOStyle(width=8, modes=4, layers=2, law_width=8, law_epochs=2)
    return [m for m in (DescriptorMLP(members=2, hidden=16, depth=2), fno, equino, pipno,
                        ppino) if m]


def _has_neuralop() -> bool:
    try:
        import neuralop.models  # noqa: F401
    except ImportError:
        return False
    return True


def test_each_baseline_fits_a_tiny_set_and_predicts_stress_tangent_and_shapes(cells_with_fields,
                                                                              arrays):
    cells = cells_with_fields
    train_part, validation = cells.split(0.34, 0)
    for model in models(cells):
        if isinstance(model, EquiNOStyle):  # a basis of random compatible-free fields will do
            fields = cells.F[:, None, None] + 0.01 * torch.randn(len(cells), RES, RES, 2, 2)
            model.set_basis(cells.F, fields)
        fit, val = (model.with_inputs(d, micro(arrays)) for d in (train_part, validation))
        history = model.fit(fit, val, budget_s=1e9, epochs=2, batch_size=24)
        assert history["epochs"] == 2 and not history["budget_spent"]
        pred = model.predict(val.images[val.micro_index], val.F)
        n = len(val)
        assert pred["mean"].shape == (n, 2, 2) and pred["tangent"].shape == (n, 2, 2, 2, 2)
        assert torch.isfinite(pred["mean"]).all() and torch.isfinite(pred["tangent"]).all()
        if model.members > 1:
            assert pred["cov"].shape == (n, 4, 4)
            assert (torch.linalg.eigvalsh(pred["cov"].double()) > 0).all()
        else:
            assert pred["cov"] is None


def test_the_autograd_tangent_is_the_finite_difference_of_the_stress():
    F = loads(4)
    _, A = stress_and_tangent(neo_hookean, F)
    h = 1e-6
    for k, l in itertools.product(range(2), range(2)):
        dF = torch.zeros(2, 2, dtype=F.dtype)
        dF[k, l] = h
        fd = (neo_hookean(F + dF) - neo_hookean(F - dF)) / (2 * h)
        assert torch.allclose(A[..., k, l], fd, atol=1e-6)


def test_descriptors_of_a_known_cell_are_its_fibre_fraction_count_and_phases(arrays):
    m = micro(arrays)
    x = descriptors(m, arrays["config"])
    assert x.shape == (len(m["n_fibres"]), 6)
    cell = x[0]
    assert cell[0] == pytest.approx(float(m["volume_fraction"][0]))
    assert cell[0] == pytest.approx(float(m["image"][0].mean()), abs=0.02)  # the image's too
    assert cell[1] == m["n_fibres"][0] == 8
    assert cell[2:].tolist() == [3.0, 0.35, 70.0, 0.2]  # matrix E, ν; fibre E, ν of the config
    other = descriptors({"volume_fraction": np.array([0.25]), "n_fibres": np.array([3])},
                        {"matrix": {"E": 5.0, "nu": 0.3}})
    assert other[0].tolist() == [0.25, 3.0, 5.0, 0.3, 70.0, 0.2]  # absent fibre: the default


def test_objectivity_measure_is_zero_for_an_objective_law_only():
    F = loads()
    assert objectivity_error(neo_hookean, F) < 1e-12
    assert objectivity_error(small_strain, F) > 0.1
    assert 0 < objectivity_error(small_strain, F, max_angle=0.1) < objectivity_error(
        small_strain, F)


def test_major_symmetry_measure_is_zero_for_a_hyperelastic_tangent_only():
    F = loads()
    _, A = stress_and_tangent(neo_hookean, F)
    assert major_symmetry_error(A) < 1e-12
    perturbed = A + 0.1 * torch.einsum("bijkl->bijlk", A)  # breaks A_iJkL = A_kLiJ
    assert major_symmetry_error(perturbed) > 1e-3


def test_equino_style_is_objective_by_construction_and_its_basis_spans_its_snapshots(cells):
    F = loads(6)
    R, U = polar(F)
    assert torch.allclose(R @ U, F) and torch.allclose(U, U.transpose(-1, -2))
    model = EquiNOStyle(cells.config, resolution=RES, modes=6, hidden=16).double()
    fields = F[:, None, None] + 0.01 * torch.randn(6, RES, RES, 2, 2, dtype=F.dtype)
    model.set_basis(F, fields)
    torch.nn.init.normal_(model.head[-1].weight)  # a non-trivial field
    x = cells.images[:6].double()
    assert objectivity_error(lambda G: model(x, G)[0], F) < 1e-10
    P = R @ model.cell_stress(x, U, model._reference_fluctuations(F, fields))
    # the six snapshots lie in the span of their six modes: no projection error
    assert model.projection_error(x, F, fields, P) < 1e-10
    assert model.projection_error(x, F, fields, P, modes=2) > 1e-6


def test_a_budget_stops_baseline_and_operator_training_at_the_first_check_past_it(cells, arrays):
    ticks = itertools.count()

    def clock() -> float:  # one "second" per call: deterministic, unlike a real clock
        return float(next(ticks))

    model = DescriptorMLP(members=1, hidden=8, depth=1)
    fit, val = (model.with_inputs(d, micro(arrays)) for d in cells.split(0.34, 0))
    history = model.fit(fit, val, budget_s=3, epochs=50, batch_size=8, clock=clock)
    # start 0, the first epoch's learning rate 1, then a check after each batch: 2, 3
    assert history["budget_spent"] and history["steps"] == 2 and history["epochs"] == 0

    small = SANO(SANOConfig(resolution=RES, width=8, modes=4, levels=2, heads=2, latent=8,
                            hidden=8, members=2))
    cfg = TrainConfig(epochs=20, batch_size=24, weights={"stress": 1.0}, time_limit_s=3,
                      time_clock="cpu")
    ticks = itertools.count()  # start 0, epoch check 1, its learning rate 2, first batch 3
    history = train(small, cells, cfg, comm=MPI.COMM_SELF, progress=False, clock=clock)
    assert history["time_limited"] and len(history["train"]) == 1 and not history["cancelled"]
    history = train(small, cells, dataclasses.replace(cfg, epochs=2, time_limit_s=1e9),
                    comm=MPI.COMM_SELF, progress=False)
    assert not history["time_limited"] and len(history["train"]) == 2


def test_a_missing_neuraloperator_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "neuralop", None)
    monkeypatch.setitem(sys.modules, "neuralop.models", None)
    with pytest.raises(InputError, match="pip install .*neuraloperator"):
        FNOBaseline()


def test_the_cosine_learning_rate_anneals_over_the_budget_not_the_epochs(cells, arrays,
                                                                         monkeypatch):
    ticks = itertools.count()
    progress: list[float] = []
    monkeypatch.setattr(baselines_base, "set_cosine_lr",
                        lambda opt, lr, lr_final, p: progress.append(p))
    model = DescriptorMLP(members=1, hidden=8, depth=1)
    fit, val = (model.with_inputs(d, micro(arrays)) for d in cells.split(0.34, 0))
    history = model.fit(fit, val, budget_s=30, epochs=1000, batch_size=24,
                        clock=lambda: float(next(ticks)))
    assert history["budget_spent"] and history["epochs"] < 10  # few of the 1000 epochs run
    assert progress[0] < 0.05 and 0.7 < progress[-1] < 1  # ...yet the cosine is nearly done
    assert progress == sorted(progress)


def training_loss(model, data: TrainingData, tangent_weight: float = 0.2) -> float:
    torch.manual_seed(0)  # the PPI-NO-style model draws its unlabelled loads
    return float(model._loss(data, torch.arange(len(data)), tangent_weight).detach())


@pytest.mark.parametrize("data_weight", [1.0, 0.0])
def test_pipno_style_lowers_its_physics_informed_loss(cells, data_weight):
    torch.manual_seed(0)
    model = PIPNOStyle(cells.config, width=8, modes=4, layers=2, branches=2,
                       data_weight=data_weight).double()
    data = cells.to(torch.float64)
    train_part, validation = data.split(0.34, 0)
    model.set_normalisation(train_part.F, train_part.P, train_part.A)
    before = training_loss(model, train_part)
    model.fit(train_part, validation, budget_s=1e9, epochs=4, batch_size=12, lr=1e-2)
    assert training_loss(model, train_part) < 0.98 * before  # Div P(y) is slow to bring down
    _, P_field = model.micro_fields(data.images[data.micro_index[:3]], data.F[:3])
    assert P_field.shape == (3, RES, RES, 2, 2)


def test_ppino_style_learns_its_pseudo_physics_then_lowers_the_operator_loss(cells_with_fields):
    torch.manual_seed(0)
    model = PPINOStyle(width=8, modes=4, layers=2, law_width=8, law_epochs=6).double()
    data = cells_with_fields.to(torch.float64)
    train_part, validation = data.split(0.34, 0)
    model.set_normalisation(train_part.F, train_part.P, train_part.A)
    before = training_loss(model, train_part)
    history = model.fit(train_part, validation, budget_s=1e9, epochs=4, batch_size=12)
    assert len(history["law_loss"]) == 6 and history["law_loss"][-1] < history["law_loss"][0]
    assert not any(p.requires_grad for p in model.pseudo_law.parameters())  # frozen for G
    assert training_loss(model, train_part) < 0.95 * before
    x = data.images[data.micro_index[:3]]
    w, P = model.fields(x, data.F[:3])
    assert w.shape == (3, 2, RES, RES) and P.shape == (3, 2, 2)
    assert model.pseudo_stress(x, data.F[:3], w).shape == (3, RES, RES, 2, 2)


def test_pipno_and_ppino_style_refuse_bad_input(cells):
    with pytest.raises(InputError, match="micro fields"):  # the anchor set stores none
        PPINOStyle(width=8, modes=4, layers=1).fit(*cells.split(0.34, 0), budget_s=1)
    with pytest.raises(InputError, match="not both 0"):
        PIPNOStyle(cells.config, physics_weight=0, data_weight=0)
    with pytest.raises(InputError, match="law_fraction"):
        PPINOStyle(law_fraction=1.0)
    with pytest.raises(InputError, match="branches=0"):
        ParallelFourierNet(5, 2, width=8, modes=4, layers=2, branches=0)
