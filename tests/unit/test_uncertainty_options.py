"""The Bayesian heads (``uncertainty: mc_dropout | variational``) and the learned loss weights
(``training.weighting: uncertainty | gradnorm``): each trains a few epochs on a tiny data set and
predicts a finite mean with a positive-definite covariance; bad values are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch
import yaml

from neuroscale_couple.cli import main
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.operators.crystal import CrystalConfig, CrystalOperator
from neuroscale_couple.operators.epistemic import UNCERTAINTIES, kl_divergence
from neuroscale_couple.operators.inference import Inference
from neuroscale_couple.operators.sano import SANO, SANOConfig
from neuroscale_couple.store import subset_dataset
from neuroscale_couple.training import TrainConfig, TrainingData, batch_loss, train
from neuroscale_couple.weighting import CARD_KEY, CARD_KEYS, GRADNORM_CARD_KEY, LossWeighting

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"
CELLS = MODELS / "fe2_composite.anchor.h5"
SMALL = dict(resolution=16, width=8, modes=4, levels=2, heads=2, latent=12, hidden=16,
             members=2, samples=8)
CFG = TrainConfig(epochs=2, batch_size=24, patience=100, weights={"stress": 1.0, "nll": 0.05})


@pytest.fixture(scope="module")
def cells() -> TrainingData:
    """4 cells of the shipped anchor set, 12 loads each."""
    data = TrainingData.from_h5(CELLS, SMALL["resolution"])
    return data.subset(np.flatnonzero(data.micro_index.numpy() < 4))


def fit(data: TrainingData, cfg: TrainConfig = CFG, **model) -> tuple[SANO, dict]:
    torch.manual_seed(0)
    sano = SANO(SANOConfig(**{**SMALL, **model}))
    history = train(sano, data, cfg, comm=MPI.COMM_SELF, progress=False)
    return sano, history


def predict(model, data: TrainingData) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        z = model.encode(data.images)[0][data.micro_index]
        return model.predict(z, data.F)


def assert_sound(pred: dict[str, torch.Tensor]) -> None:
    """Finite mean and tangent, symmetric positive-definite covariance."""
    assert torch.isfinite(pred["mean"]).all() and torch.isfinite(pred["tangent"]).all()
    cov = pred["cov"].double()
    torch.testing.assert_close(cov, cov.transpose(-1, -2))
    assert (torch.linalg.eigvalsh(cov) > 0).all()


@pytest.mark.parametrize("uncertainty", UNCERTAINTIES)
def test_each_uncertainty_trains_predicts_and_reloads(uncertainty, cells, tmp_path):
    weights = {**CFG.weights, "kl": 1e-3 if uncertainty == "variational" else 0.0}
    model, history = fit(cells, dataclasses.replace(CFG, weights=weights),
                         uncertainty=uncertainty, energy_correction=uncertainty == "variational")
    assert np.isfinite(history["train"]).all() and len(history["train"]) == CFG.epochs
    pred = predict(model, cells)
    assert_sound(pred)
    assert (pred["cov"] - pred["aleatoric"]).diagonal(dim1=-2, dim2=-1).sum(-1).gt(0).all()
    model.save(tmp_path / "m.pt")
    loaded = load_operator(tmp_path / "m.pt")
    assert loaded.epistemic == model.epistemic and not loaded.training
    torch.testing.assert_close(predict(loaded, cells)["mean"], pred["mean"], rtol=0, atol=0)
    # the coupler's inference answers as predict (a Bayesian model through predict itself)
    z = loaded.encode(cells.images)[0].detach()
    rows = cells.micro_index.numpy()
    r = Inference(loaded, z).response(rows, cells.F.double().numpy())
    np.testing.assert_allclose(r.stress, pred["mean"].numpy(), rtol=1e-4, atol=1e-6)


def test_mc_dropout_draws_depend_on_the_seed_only(cells):
    model, _ = fit(cells, uncertainty="mc_dropout", dropout=0.2)
    first, again = predict(model, cells), predict(model, cells)
    assert torch.equal(first["mean"], again["mean"]) and torch.equal(first["cov"], again["cov"])
    # a point's answer does not depend on the batch it comes in
    part = cells.subset(np.arange(5))
    torch.testing.assert_close(predict(model, part)["mean"], first["mean"][:5])
    model.epistemic = dataclasses.replace(model.epistemic, seed=1)
    other = predict(model, cells)
    assert not torch.allclose(other["mean"], first["mean"])
    assert_sound(other)
    # training draws masks: the heads are not the same function twice in train mode
    model.train()
    z = model.encode(cells.images)[0][cells.micro_index].detach()
    a, b = (model.members_response(z, cells.F, tangent=False)["stress"] for _ in range(2))
    assert a.shape[0] == SMALL["members"] and not torch.equal(a, b)


def test_the_variational_kl_term_is_the_divergence_per_sample_and_training_lowers_it(cells):
    torch.manual_seed(0)
    model = SANO(SANOConfig(**SMALL, uncertainty="variational"))
    kl0 = kl_divergence(model).item()
    assert kl0 > 0 and kl_divergence(SANO(SANOConfig(**SMALL))).item() == 0
    weights = {**CFG.weights, "kl": 1.0}
    terms = batch_loss(model, cells, torch.arange(12), weights, torch.Generator())
    assert terms["kl"].item() == pytest.approx(kl0 / len(cells), rel=1e-6)
    assert "kl" not in batch_loss(model, cells, torch.arange(12), CFG.weights,
                                  torch.Generator())
    cfg = dataclasses.replace(CFG, weights=weights)
    train(model, cells, cfg, comm=MPI.COMM_SELF, progress=False, validation=cells)
    regularised = kl_divergence(model).item()
    plain, _ = fit(cells, dataclasses.replace(CFG, weights={**weights, "kl": 0.0}),
                   uncertainty="variational")
    # the KL pulls the posterior towards the prior: far below the unregularised training's
    assert regularised < kl0 and regularised < kl_divergence(plain).item()


def test_uncertainty_weighting_learns_log_variances_saved_with_the_model(cells, tmp_path):
    cfg = dataclasses.replace(CFG, weighting="uncertainty",
                              weights={**CFG.weights, "tangent": 0.2})
    model, history = fit(cells, cfg)
    learned = history["log_variances"]
    assert set(learned) == {"stress", "tangent"}  # nll keeps its fixed weight
    assert all(v != 0.0 for v in learned.values()) and model.card[CARD_KEY] == learned
    model.save(tmp_path / "m.pt")
    assert load_operator(tmp_path / "m.pt").card[CARD_KEY] == learned
    # a later training starts from the model's log-variances
    weighting = LossWeighting("uncertainty", cfg.weights, model.card[CARD_KEY])
    assert weighting.values() == pytest.approx(learned)
    terms = {"stress": torch.tensor(0.5), "tangent": torch.tensor(2.0), "nll": torch.tensor(-1.0)}
    s = learned
    expected = sum(np.exp(-s[k]) * cfg.weights[k] * float(terms[k]) + s[k] for k in s) - 0.05
    assert weighting(terms).item() == pytest.approx(expected, rel=1e-6)
    # fixed: the weighted sum, no parameters, the default
    fixed = LossWeighting("fixed", cfg.weights)
    assert not list(fixed.parameters()) and TrainConfig().weighting == "fixed"
    assert float(fixed(terms)) == pytest.approx(0.5 + 0.4 - 0.05)


def test_gradnorm_weighting_trains_and_its_weights_are_saved_with_the_model(cells, tmp_path):
    cfg = dataclasses.replace(CFG, weighting="gradnorm", weights={**CFG.weights, "tangent": 0.2})
    # at the start the loss is the fixed one
    terms = {"stress": torch.tensor(0.5), "tangent": torch.tensor(2.0), "nll": torch.tensor(-1.0)}
    fresh = LossWeighting("gradnorm", cfg.weights)
    assert fresh.values() == pytest.approx({"stress": 1.0, "tangent": 0.2})
    assert float(fresh(terms)) == pytest.approx(0.5 + 0.4 - 0.05)
    model, history = fit(cells, cfg)
    assert np.isfinite(history["train"]).all() and history["log_variances"] == {}
    learned = history["loss_weights"]
    assert set(learned) == {"stress", "tangent"}  # nll keeps its fixed weight
    assert sum(learned.values()) == pytest.approx(1.2, rel=1e-6)  # the configured sum
    assert learned != pytest.approx({"stress": 1.0, "tangent": 0.2}, rel=1e-6)
    assert model.card[GRADNORM_CARD_KEY] == learned and CARD_KEY not in model.card
    assert_sound(predict(model, cells))
    model.save(tmp_path / "m.pt")
    assert load_operator(tmp_path / "m.pt").card[GRADNORM_CARD_KEY] == learned
    # a later training starts from the model's weights, renormalised to its configured sum
    weighting = LossWeighting("gradnorm", cfg.weights, model.card[GRADNORM_CARD_KEY])
    assert weighting.values() == pytest.approx(learned)
    expected = learned["stress"] * 0.5 + learned["tangent"] * 2.0 - 0.05
    assert float(weighting(terms)) == pytest.approx(expected, rel=1e-6)
    doubled = LossWeighting("gradnorm", {**cfg.weights, "stress": 2.0, "tangent": 0.4}, learned)
    assert doubled.values() == pytest.approx({k: 2 * v for k, v in learned.items()})


def test_online_retraining_balances_over_the_heads_and_starts_from_the_card(cells):
    """With the encoder frozen the shared layer is the energy head's output layer; the
    retraining starts from the card's weights (not the configured ones) and records its own."""
    from neuroscale_couple.retraining import Retrainer

    torch.manual_seed(0)
    model = SANO(SANOConfig(**SMALL))
    model.card[GRADNORM_CARD_KEY] = {"stress": 0.9, "tangent": 0.3}
    encoder = model.encoder_digest()
    cfg = dataclasses.replace(CFG, epochs=1, weighting="gradnorm",
                              weights={**CFG.weights, "tangent": 0.2})
    Retrainer._fit(model, cells, None, cfg, MPI.COMM_SELF)
    assert model.encoder_digest() == encoder
    for p in model.to_latent.parameters():
        p.requires_grad_(False)
    assert model.shared_parameters() == list(model.energy.weights[-1].parameters())
    learned = model.card[GRADNORM_CARD_KEY]
    assert learned != {"stress": 0.9, "tangent": 0.3} and sum(learned.values()) == \
        pytest.approx(1.2)
    assert learned == pytest.approx({"stress": 0.9, "tangent": 0.3}, abs=0.02)


def gradnorm_step(weighting: LossWeighting, opt: torch.optim.Optimizer,
                  stats: torch.Tensor) -> None:
    """One update of the GradNorm weights from a batch's statistics."""
    opt.zero_grad()
    weighting.balance(stats)
    opt.step()
    weighting.renormalise()


def test_gradnorm_moves_the_weights_towards_equal_gradient_norms():
    """Two terms over a shared layer whose gradients differ 20-fold: the steep term is weighted
    down, the flat one up, the sum stays, and the weighted gradient norms meet."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    residual = ((layer(x) - y) ** 2).mean()
    terms = {"stress": 20.0 * residual, "tangent": ((layer(x) + y) ** 2).mean()}
    shared = list(layer.parameters())
    weighting = LossWeighting("gradnorm", {"stress": 1.0, "tangent": 1.0}, alpha=1.5)
    opt = torch.optim.Adam(weighting.parameters(), lr=0.01)

    def norms() -> np.ndarray:  # G_k = ‖∇_W w_k L_k‖
        w = weighting.values()
        return np.array([w[k] * float(torch.linalg.vector_norm(torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(terms[k], shared,
                                                        retain_graph=True)])))
            for k in ("stress", "tangent")])

    before = norms()
    assert before[0] / before[1] > 5
    gradnorm_step(weighting, opt, weighting.statistics(terms, shared))
    w = weighting.values()
    assert w["stress"] < 1.0 < w["tangent"] and sum(w.values()) == pytest.approx(2.0)
    for _ in range(300):  # the losses stand still (r_k = 1): the target is equal norms
        gradnorm_step(weighting, opt, weighting.statistics(terms, shared))
    after = norms()
    assert 0.8 < after[0] / after[1] < 1.25 and sum(weighting.values().values()) == \
        pytest.approx(2.0)


def test_gradnorm_weights_up_the_term_that_trains_slower():
    """Equal gradient norms; one term has fallen to a tenth of its start, the other not: with
    α > 0 the slow term gains weight, with α = 0 nothing moves."""
    for alpha, moves in ((1.5, True), (0.0, False)):
        weighting = LossWeighting("gradnorm", {"stress": 1.0, "tangent": 1.0}, alpha=alpha)
        opt = torch.optim.Adam(weighting.parameters(), lr=0.01)
        grads = [1.0, 0.0, 0.0, 1.0]  # per term: ∇_W L_k over a 2-parameter W, norms 1
        gradnorm_step(weighting, opt, torch.tensor([1.0, 1.0, *grads]))  # L_k(0) = 1
        gradnorm_step(weighting, opt, torch.tensor([0.1, 1.0, *grads]))
        w = weighting.values()
        if moves:
            assert w["tangent"] > 1.0 > w["stress"]
        else:  # the gradient norms already equal their target mean(G)
            assert w == pytest.approx({"stress": 1.0, "tangent": 1.0}, abs=1e-9)
        assert sum(w.values()) == pytest.approx(2.0)


@pytest.mark.parametrize("weighting", CARD_KEYS)
def test_the_train_command_selects_the_options_by_config(weighting, cells, tmp_path):
    data, cfg = tmp_path / "d.h5", tmp_path / "t.yaml"
    subset_dataset(CELLS, data, 6, 0)
    cfg.write_text(yaml.safe_dump({
        "model": {**SMALL, "uncertainty": "variational"},
        "training": {"epochs": 1, "batch_size": 24, "val_fraction": 0.3,
                     "weighting": weighting, "gradnorm_alpha": 1.0,
                     "weights": {"stress": 1.0, "tangent": 0.2, "nll": 0.05, "kl": 1e-3}}}))
    out = tmp_path / "m.pt"
    assert main(["train", str(cfg), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    model = load_operator(out)
    assert model.epistemic.kind == "variational" and set(model.card[CARD_KEYS[weighting]]) == {
        "stress", "tangent"}
    assert_sound(predict(model, cells))


def test_bad_options_are_refused_naming_the_key_and_the_choices(cells):
    with pytest.raises(InputError, match="uncertainty='laplace'.*ensemble, mc_dropout, "
                                         "variational"):
        SANOConfig.from_dict({"uncertainty": "laplace"})
    with pytest.raises(InputError, match="uncertainty='mc-dropout'"):
        CrystalConfig(uncertainty="mc-dropout")
    with pytest.raises(InputError, match="dropout=1.5"):
        SANOConfig.from_dict({"uncertainty": "mc_dropout", "dropout": 1.5})
    with pytest.raises(InputError, match="samples=1"):
        SANOConfig.from_dict({"samples": 1})
    with pytest.raises(InputError, match="weighting='dwa'.*fixed, uncertainty, gradnorm"):
        TrainConfig.from_dict({"weighting": "dwa"})
    for alpha in (-0.5, float("nan"), float("inf"), "1.5", True):
        with pytest.raises(InputError, match=r"gradnorm_alpha=.*number ≥ 0"):
            TrainConfig.from_dict({"weighting": "gradnorm", "gradnorm_alpha": alpha})
    assert TrainConfig(weighting="gradnorm", gradnorm_alpha=0).gradnorm_alpha == 0
    with pytest.raises(InputError, match="time_limit_s=0"):
        TrainConfig.from_dict({"time_limit_s": 0})
    kl = dataclasses.replace(CFG, weights={**CFG.weights, "kl": 1e-3})
    with pytest.raises(InputError, match="uncertainty: variational"):
        train(SANO(SANOConfig(**SMALL)), cells, kl, comm=MPI.COMM_SELF, progress=False)


def test_a_time_limit_ends_the_training_and_a_crystal_takes_the_options_too():
    torch.manual_seed(0)
    crystal = CrystalOperator(CrystalConfig(latent=4, hidden=8, members=2,
                                            uncertainty="mc_dropout"))
    data = TrainingData.from_h5(MODELS / "hmm_cu.anchor.h5", None)
    history = train(crystal, data, TrainConfig(epochs=1000, batch_size=64, time_limit_s=0.5),
                    comm=MPI.COMM_SELF, progress=False)
    assert history["time_limited"] and 0 < len(history["train"]) < 1000
    assert_sound(predict(crystal, data))


@pytest.mark.mpi
@pytest.mark.parametrize("weighting, key", [("uncertainty", "log_variances"),
                                            ("gradnorm", "loss_weights")])
def test_learned_loss_weights_are_one_set_on_every_rank(weighting, key, cells):
    """A data-parallel training sums the log-variances' gradients (GradNorm: the terms and their
    gradients over the shared layer) over the ranks as the model's: every rank ends with the
    same learned weights (and the same model)."""
    comm = MPI.COMM_WORLD
    cfg = dataclasses.replace(CFG, weighting=weighting, val_fraction=0.0,
                              weights={**CFG.weights, "tangent": 0.2})
    torch.manual_seed(0)
    sano = SANO(SANOConfig(**SMALL))
    history = train(sano, cells, cfg, comm=comm, progress=False)
    learned = comm.allgather(history[key])
    if weighting == "gradnorm":
        assert learned[0] != pytest.approx({"stress": 1.0, "tangent": 0.2}, rel=1e-6)
    assert all(v != 0.0 for v in learned[0].values())
    assert all(other == learned[0] for other in learned)
    first = torch.cat([p.detach().reshape(-1) for p in sano.parameters()]).numpy()
    assert all(np.array_equal(first, other) for other in comm.allgather(first))
