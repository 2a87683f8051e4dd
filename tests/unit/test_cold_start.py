"""Cold start without DOLFINx: the held-out draw, the probes, the initial model, bad input."""

from __future__ import annotations

from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch

from neuroscale_couple.cold_start import ColdStart
from neuroscale_couple.coupler import Coupler, Policy
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.base import HEAD_PREFIXES, load_operator
from neuroscale_couple.retraining import RetrainConfig, _on_latents
from neuroscale_couple.training import TrainConfig

pytestmark = pytest.mark.skip_in_parallel

MODEL = Path(__file__).resolve().parents[2] / "examples" / "models" / "fe2_composite.pt"
ALUMINIUM_SIC = {"law": "neo_hookean", "matrix": {"E": 70.0, "nu": 0.33},
                 "fibre": {"E": 410.0, "nu": 0.14}}


@pytest.mark.parametrize("kwargs, message", [
    ({"encoder": "no/such.pt"}, "no such model file"),
    ({"held_out": 0.0}, "held_out=0.0"), ({"held_out": 1.0}, "held_out=1.0"),
    ({"probe": -0.1}, "probe=-0.1"), ({"epochs": 0}, "epochs=0"),
    ({"batch_size": 2.5}, "batch_size=2.5"), ({"lr": 0.0}, "lr=0.0"),
    ({"history": 0}, "history=0")])
def test_cold_start_rejects_bad_input(kwargs, message):
    with pytest.raises(InputError, match=message):
        ColdStart(**{"encoder": MODEL, **kwargs})


def test_held_out_points_do_not_depend_on_the_partition():
    cold = ColdStart(MODEL, held_out=0.1)
    ids = np.arange(20000)
    held = cold.is_held_out(ids)
    assert 0.09 < held.mean() < 0.11
    # any split of the ids over ranks, in any order, draws the same points
    part = np.random.default_rng(0).permutation(ids)[:777]
    np.testing.assert_array_equal(cold.is_held_out(part), held[part])
    assert (ColdStart(MODEL, seed=1).is_held_out(ids) != cold.is_held_out(ids)).any()


def test_probes_take_the_largest_bounds_one_per_microstructure():
    cold = ColdStart(MODEL, probe=0.3)
    ratio = np.array([0.1, 0.9, 0.8, 0.7, 0.2, 0.6])
    keys = ["a", "b", "b", "c", "d", "e"]
    # budget 0.3 × 10 points = 3: b (0.9), then c (0.7) — the second b is skipped — and e
    assert cold.probes(ratio, keys, 10).tolist() == [1, 3, 5]
    assert len(ColdStart(MODEL, probe=0.0).probes(ratio, keys, 10)) == 0
    # only points within a factor 2 of falling back are probed
    assert ColdStart(MODEL, probe=0.5).probes(ratio, keys, 10).tolist() == [1, 3, 5]


def test_a_3d_encoder_is_refused():
    with pytest.raises(InputError, match="a cold start is built for 2D"):
        ColdStart(MODEL.with_name("fe2_composite_3d.pt")).initial_model(ALUMINIUM_SIC)


def test_initial_model_keeps_the_encoder_and_starts_fresh_heads():
    pretrained = load_operator(MODEL)
    model = ColdStart(MODEL).initial_model(ALUMINIUM_SIC)
    assert model.config.matrix == (70.0, 0.33) and model.config.fibre == (410.0, 0.14)
    assert not model.calibration and model.card["cold_start"]["encoder"] == str(MODEL)
    model.check_family(ALUMINIUM_SIC)  # the run's own material: no refusal
    new, old = model.state_dict(), pretrained.state_dict()
    for name, t in new.items():
        if name.startswith(HEAD_PREFIXES):
            assert not torch.equal(t.to(old[name].dtype), old[name]), name
        elif name not in ("sigma_ref", "e_ref", "tangent_ref"):
            torch.testing.assert_close(t, old[name].to(t.dtype), rtol=0, atol=0)
    # the same seed draws the same heads on every rank
    again = ColdStart(MODEL).initial_model(ALUMINIUM_SIC)
    assert again.weights_digest() == model.weights_digest()


def test_heads_train_on_latents_as_on_images():
    """The frozen-encoder shortcut gives the loss the images give (the encoder runs once)."""
    from neuroscale_couple.training import TrainingData, batch_loss

    model = ColdStart(MODEL).initial_model(ALUMINIUM_SIC).float()
    n_micro, n = 3, model.input_resolution
    images = (torch.rand(n_micro, 1, n, n, generator=torch.Generator().manual_seed(0)) > 0.7)
    F = torch.eye(2).repeat(6, 1, 1) + 0.02 * torch.randn(6, 2, 2)
    data = TrainingData(images.float(), torch.tensor([0, 0, 1, 1, 2, 2]), F,
                        torch.randn(6, 2, 2), torch.randn(6, 2, 2, 2, 2))
    cfg = TrainConfig(weights={"stress": 1.0, "tangent": 0.2, "nll": 0.05})
    learner, on_latents = _on_latents(model, data, cfg)
    assert on_latents.images.shape == (n_micro, model.config.latent)
    idx = torch.arange(6)
    terms = batch_loss(model, data, idx, cfg.weights, torch.Generator())
    shortcut = batch_loss(learner, on_latents, idx, cfg.weights, torch.Generator())
    for k, v in terms.items():
        torch.testing.assert_close(shortcut[k], v, rtol=1e-5, atol=1e-6)
    # an image term keeps the images
    assert _on_latents(model, data, TrainConfig(weights={"symmetry": 0.1}))[0] is model


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "given"}, "give model=None"),
    ({"policy": Policy(rtol=0.0)}, "classic FE² and trains nothing"),
    ({"retrain": RetrainConfig(enabled=False)}, "drop --no-retrain"),
    ({"replay_dir": None}, "give replay_dir"),
    ({"family": None}, "needs the fine solver's material")])
def test_coupler_refuses_a_cold_start_it_cannot_run(tmp_path, kwargs, message):
    args = {"model": None, "family": ALUMINIUM_SIC, "policy": Policy(rtol=0.02),
            "retrain": RetrainConfig(background=True), "replay_dir": tmp_path, **kwargs}
    if args["model"] == "given":
        args["model"] = load_operator(MODEL)
    model = args.pop("model")
    with pytest.raises(InputError, match=message):
        Coupler(model, lambda m: None, comm=MPI.COMM_SELF, cold_start=ColdStart(MODEL), **args)


def test_coupler_config_with_model_none_and_cold_start(tmp_path):
    config = {"model": "none", "fine": {"kind": "rve", **ALUMINIUM_SIC},
              "cold_start": {"encoder": str(MODEL), "held_out": 0.2},
              "policy": {"rtol": 0.02}, "retrain": {"background": True},
              "replay_dir": str(tmp_path / "replay")}
    c = Coupler.from_config(config, comm=MPI.COMM_SELF)
    try:
        assert c.cold_start.held_out == 0.2 and not c.serving
        assert c.model.config.matrix == (70.0, 0.33)
    finally:
        c.close()
    with pytest.raises(InputError, match="needs a mapping with the encoder"):
        Coupler.from_config({**config, "cold_start": {"held_out": 0.2}}, comm=MPI.COMM_SELF)
    with pytest.raises(InputError, match="set model: none"):
        Coupler.from_config({**config, "model": str(MODEL)}, comm=MPI.COMM_SELF)
