"""Training, calibration and symmetry of the operator on data made by the true RVE solver."""

from __future__ import annotations

from mpi4py import MPI

import numpy as np
import pytest
import torch

from neuroscale_couple.datagen import generate
from neuroscale_couple.evaluation import calibrate_model, evaluate
from neuroscale_couple.operators.sano import SANO, SANOConfig
from neuroscale_couple.physics import dihedral, transform_image
from neuroscale_couple.solvers import microstructure as micro
from neuroscale_couple.training import TrainConfig, TrainingData, relative_errors, train

pytestmark = [pytest.mark.dolfinx, pytest.mark.slow]

SMALL = SANOConfig(resolution=16, width=12, modes=4, levels=2, heads=2, latent=24, hidden=32,
                   members=3)
DATA = {
    "microstructure": {"kind": "random_fibres", "volume_fraction": [0.15, 0.45],
                       "n_fibres": [1, 4], "count": 24, "seed": 11},
    "loads": {"per_microstructure": 8, "radius": 0.12, "seed": 12},
    "law": "neo_hookean", "matrix": {"E": 3.0, "nu": 0.35}, "fibre": {"E": 70.0, "nu": 0.2},
    "mesh": {"size": 0.05}, "image_resolution": 32, "fields_resolution": 16,
}


@pytest.fixture(scope="module")
def rve_data(tmp_path_factory) -> TrainingData:
    path = MPI.COMM_WORLD.bcast(tmp_path_factory.mktemp("rve") if MPI.COMM_WORLD.rank == 0
                                else None)
    generate(DATA, path / "d.h5", MPI.COMM_WORLD, progress=False)
    return TrainingData.from_h5(path / "d.h5", SMALL.resolution, dtype=torch.float64)


@pytest.mark.skip_in_parallel
def test_training_on_rve_data_reduces_the_error(rve_data):
    torch.manual_seed(0)
    model = SANO(SMALL).double()
    fit, held_out = rve_data.split_by_microstructure(0.25, seed=0)
    model.set_normalisation(fit.F, fit.P, fit.A)
    before = relative_errors(model, held_out)["rel_l2_stress"]
    cfg = TrainConfig(epochs=80, batch_size=32, lr=3e-3, patience=80,
                      weights={"stress": 1.0, "tangent": 0.2, "nll": 0.05})
    history = train(model, fit, cfg, comm=MPI.COMM_SELF, validation=held_out, progress=False)
    after = relative_errors(model, held_out)
    print(f"held-out rel. L2 stress {before:.3f} -> {after['rel_l2_stress']:.4f}, tangent "
          f"{after['rel_l2_tangent']:.4f}, {history['time_s']:.1f} s")
    assert after["rel_l2_stress"] < 0.10
    assert after["rel_l2_stress"] < 0.2 * before
    assert after["rel_l2_tangent"] < 0.15


@pytest.mark.skip_in_parallel
def test_physics_losses_train_the_decoder_towards_equilibrium(rve_data):
    torch.manual_seed(1)
    model = SANO(SMALL).double()
    weights = TrainConfig(weights={"stress": 1.0, "equilibrium": 1.0, "consistency": 1.0,
                                   "hill_mandel": 1.0, "fields": 1.0}).weights
    model.set_normalisation(rve_data.F, rve_data.P, rve_data.A)
    from neuroscale_couple.training import batch_loss

    idx = torch.arange(32)
    g = torch.Generator().manual_seed(0)
    start = {k: float(v.detach())
             for k, v in batch_loss(model, rve_data, idx, weights, g).items()}
    train(model, rve_data, TrainConfig(epochs=25, batch_size=32, lr=3e-3, weights=weights,
                                       physics_fraction=1.0,
                                       val_fraction=0.2), comm=MPI.COMM_SELF, progress=False)
    end = {k: float(v.detach()) for k, v in batch_loss(model, rve_data, idx, weights, g).items()}
    print({k: (round(start[k], 4), round(end[k], 4)) for k in start})
    for term in ("equilibrium", "consistency"):  # decoded fields approach equilibrium
        assert end[term] < 0.5 * start[term], (term, start[term], end[term])
    assert end["fields"] < start["fields"]  # and the RVE's fluctuation field


@pytest.mark.skip_in_parallel
def test_conformal_calibration_reaches_its_coverage_on_held_out_data(rve_data):
    torch.manual_seed(2)
    model = SANO(SMALL).double()
    fit, rest = rve_data.split_by_microstructure(0.5, seed=1)
    cal_set, test_set = rest.split_by_microstructure(0.5, seed=2)
    train(model, fit, TrainConfig(epochs=40, batch_size=32, lr=3e-3), comm=MPI.COMM_SELF,
          progress=False)
    calibrate_model(model, cal_set)
    metrics = evaluate(model, test_set)
    n = metrics["n_samples"]
    for level in (0.5, 0.9):
        slack = 3 * np.sqrt(level * (1 - level) / n)  # three binomial standard deviations
        assert metrics["coverage"][str(level)] >= level - slack, metrics


@pytest.mark.mpi
def test_one_and_two_ranks_train_the_same_model(rve_data):
    comm = MPI.COMM_WORLD
    cfg = TrainConfig(epochs=2, batch_size=32, lr=3e-3, val_fraction=0.0)
    torch.manual_seed(3)
    init = SANO(SMALL).double().state_dict()

    def trained(c: MPI.Comm) -> dict:
        model = SANO(SMALL).double()
        model.load_state_dict(init)
        train(model, rve_data, cfg, comm=c, validation=rve_data.subset([]), progress=False)
        return model.state_dict()

    every = trained(comm)
    alone = trained(MPI.COMM_SELF)
    for key, value in every.items():
        torch.testing.assert_close(value, alone[key], rtol=1e-7, atol=1e-9, msg=key)
    assert any((every[k] - init[k]).abs().max() > 1e-4 for k in every)


@pytest.mark.mpi
def test_a_training_step_failing_on_one_rank_raises_on_every_rank(rve_data, monkeypatch):
    """Data-parallel training: an error on the last rank alone must not leave the others
    waiting in the gradient all-reduce; every rank raises, naming the rank and the cause."""
    import neuroscale_couple.training as training
    from neuroscale_couple.errors import NeuroScaleError

    comm = MPI.COMM_WORLD
    calls = []

    def fails_on_last_rank(*args, **kwargs):
        calls.append(1)
        if comm.rank == comm.size - 1 and len(calls) == 2:
            raise FloatingPointError("loss is NaN")
        return batch_loss(*args, **kwargs)

    batch_loss = training.batch_loss
    monkeypatch.setattr(training, "batch_loss", fails_on_last_rank)
    model = SANO(SMALL).double()
    with pytest.raises(NeuroScaleError, match=f"rank {comm.size - 1} of {comm.size} in epoch 0: "
                       "FloatingPointError: loss is NaN"):
        train(model, rve_data, TrainConfig(epochs=2, batch_size=32, val_fraction=0.0), comm=comm,
              validation=rve_data.subset([]), progress=False)
    comm.Barrier()


@pytest.mark.skip_in_parallel
def test_a_non_finite_loss_stops_the_training_with_the_terms_named(rve_data):
    """A NaN loss would make every weight NaN and leave the rest of the training idle: the
    step raises instead, naming the loss terms that went non-finite."""
    import dataclasses

    from neuroscale_couple.errors import NeuroScaleError

    P = rve_data.P.clone()
    P[0, 0, 0] = float("nan")
    with pytest.raises(NeuroScaleError, match=r"epoch 0: NeuroScaleError: non-finite loss "
                       r"terms \['nll', 'stress'\]"):
        train(SANO(SMALL).double(), dataclasses.replace(rve_data, P=P),
              TrainConfig(epochs=1, batch_size=256, val_fraction=0.0, augment=False,
                          physics_fraction=1.0),
              comm=MPI.COMM_SELF, validation=rve_data.subset([]), normalise=False,
              progress=False)


@pytest.mark.skip_in_parallel
def test_symmetry_convention_agrees_with_the_rve_solver():
    """The group action used by the symmetry loss is the physical one: rotating the cell content
    as ``transform_image`` does and loading by QF̄Qᵀ gives Q P̄ Qᵀ in the true RVE solver."""
    from neuroscale_couple.solvers.rve_fenicsx import PeriodicRVE

    ms = micro.random_fibres(0.35, 3, seed=21)
    Q = dihedral(1, False).numpy()
    turned = micro.Microstructure(ms.kind, ms.volume_fraction,
                                  np.mod((ms.centres - 0.5) @ Q.T + 0.5, 1.0), ms.radius)
    np.testing.assert_allclose(turned.image(32), transform_image(torch.as_tensor(ms.image(32)),
                                                                 1, False).numpy(), atol=1e-12)
    F = np.array([[1.1, 0.05], [-0.02, 0.93]])
    P = PeriodicRVE(ms, mesh_size=0.04).solve(F).stress[0]
    P_turned = PeriodicRVE(turned, mesh_size=0.04).solve(Q @ F @ Q.T).stress[0]
    np.testing.assert_allclose(P_turned, Q @ P @ Q.T, atol=5e-3 * np.abs(P).max())


@pytest.mark.skip_in_parallel
def test_cli_train_calibrate_evaluate(tmp_path, capsys):
    import json

    import yaml

    from neuroscale_couple.cli import main

    data = dict(DATA, microstructure=dict(DATA["microstructure"], count=10), fields_resolution=0)
    generate(data, tmp_path / "d.h5", MPI.COMM_SELF, progress=False)
    model_cfg = {k: v for k, v in SMALL.__dict__.items() if k not in ("law", "matrix", "fibre")}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "model": model_cfg, "training": {"epochs": 3, "batch_size": 32, "val_fraction": 0.3}}))
    assert main(["train", str(tmp_path / "t.yaml"), "--data", str(tmp_path / "d.h5"), "--out",
                 str(tmp_path / "m.pt"), "--quiet"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert {"rel_l2_stress", "rel_l2_tangent", "best_epoch"} <= set(trained)
    assert main(["calibrate", "--model", str(tmp_path / "m.pt"), "--data",
                 str(tmp_path / "d.h5")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "m.pt"), "--data", str(tmp_path / "d.h5"),
                 "--json", "--plot", str(tmp_path / "r.png"), "--card",
                 str(tmp_path / "card.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics["coverage"]) == {"0.5", "0.9", "0.95"}
    assert 0 <= metrics["ece"] <= 1 and (tmp_path / "r.png").exists()
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["data_config"]["law"] == "neo_hookean" and card["seed"] == 0
    model = SANO.from_checkpoint(tmp_path / "m.pt")
    assert model.config.fibre == (70.0, 0.2) and model.calibration["n_calibration"] > 0
    # a fine-tuning stage goes on from the checkpoint: its architecture and scales stay
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({
        "training": {"epochs": 2, "batch_size": 32, "val_fraction": 0.3, "lr": 1e-4}}))
    assert main(["train", str(tmp_path / "f.yaml"), "--init", str(tmp_path / "m.pt"), "--data",
                 str(tmp_path / "d.h5"), "--out", str(tmp_path / "f.pt"), "--quiet"]) == 0
    capsys.readouterr()
    tuned = SANO.from_checkpoint(tmp_path / "f.pt")
    assert tuned.config == model.config and float(tuned.sigma_ref) == float(model.sigma_ref)
    assert tuned.card["init"]["checkpoint"] == str(tmp_path / "m.pt")
    assert tuned.card["init"]["training"]["epochs"] == 3 and tuned.card["training"]["epochs"] == 2
    moved = [k for k, v in tuned.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert "sigma_ref" not in moved and any(k.startswith("energy") for k in moved), moved
    # several data sets of one material family train together; one of another family is refused
    more = dict(data, microstructure=dict(data["microstructure"], count=4, seed=21))
    generate(more, tmp_path / "d2.h5", MPI.COMM_SELF, progress=False)
    both = [str(tmp_path / "d.h5"), str(tmp_path / "d2.h5")]
    assert main(["train", str(tmp_path / "f.yaml"), "--init", str(tmp_path / "m.pt"), "--data",
                 *both, "--out", str(tmp_path / "f2.pt"), "--quiet"]) == 0
    capsys.readouterr()
    card2 = SANO.from_checkpoint(tmp_path / "f2.pt").card
    assert card2["data"] == ", ".join(both)
    assert card2["calibration_points"] > tuned.card["calibration_points"]
    other = dict(more, matrix={"E": 4.0, "nu": 0.35},
                 microstructure=dict(data["microstructure"], count=1))
    generate(other, tmp_path / "d3.h5", MPI.COMM_SELF, progress=False)
    assert main(["train", str(tmp_path / "f.yaml"), "--init", str(tmp_path / "m.pt"), "--data",
                 both[0], str(tmp_path / "d3.h5"), "--out", str(tmp_path / "f3.pt"),
                 "--quiet"]) == 2
    assert "they differ in matrix" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "t.yaml"), "--init", str(tmp_path / "m.pt"), "--data",
                 str(tmp_path / "d.h5"), "--out", str(tmp_path / "g.pt"), "--quiet"]) == 2
    assert "checkpoint fixes the architecture" in capsys.readouterr().err
    # a model file that is not one gives a clear error and exit code 2
    (tmp_path / "bad.pt").write_text("not a model")
    assert main(["evaluate", "--model", str(tmp_path / "bad.pt"), "--data",
                 str(tmp_path / "d.h5")]) == 2
    assert "not a readable NeuroScale model" in capsys.readouterr().err
