"""The aleatoric head quadratic in the strain (model config ``covariance: quadratic``): its
covariance is a positive-definite quadratic form of the strain features, it trains (the
ensemble shares it), saves and reloads, and `neuroscale distill-covariance` fits it to a
model's network head and calibrates the result."""

from __future__ import annotations

import json
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch

from neuroscale_couple.calibration import Calibration
from neuroscale_couple.cli import main
from neuroscale_couple.covariance_distillation import (
    CovarianceDistillation,
    CovarianceDistillConfig,
)
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.operators.heads import QuadraticCovarianceHead
from neuroscale_couple.operators.sano import SANO, SANOConfig
from neuroscale_couple.training import TrainConfig, TrainingData, train

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"
SMALL = dict(resolution=16, width=8, modes=4, levels=2, heads=2, latent=12, hidden=16,
             members=2)


def test_the_raw_entries_are_the_coefficients_times_the_strain_features():
    torch.manual_seed(0)
    head = QuadraticCovarianceHead(latent=5, hidden=8).double()
    z, e = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    phi = QuadraticCovarianceHead.strain_features(e)
    assert phi.shape == (7, 10)  # 1, ê (3), êᵢêⱼ i ≤ j (6)
    torch.testing.assert_close(phi[:, 4], e[:, 0] ** 2)
    torch.testing.assert_close(phi[:, 5], e[:, 0] * e[:, 1])
    c = head.coefficients(z)
    assert c.shape == (7, 10, 10)
    # each raw entry is a quadratic polynomial of ê: its second difference along a direction
    # is constant, 2 h² dᵀ Q d
    d = torch.randn(3, dtype=torch.float64)
    r = [head.raw(z, e + t * d) for t in (0.0, 0.5, 1.0, 1.5)]
    torch.testing.assert_close(r[2] - 2 * r[1] + r[0], r[3] - 2 * r[2] + r[1])
    L = head(z[None], e[None])
    assert L.shape == (1, 7, 4, 4)
    assert (torch.linalg.eigvalsh(L[0] @ L[0].transpose(-1, -2)) > 0).all()


def test_a_quadratic_model_trains_saves_and_predicts_with_one_shared_head(tmp_path):
    data = TrainingData.from_h5(MODELS / "fe2_composite.anchor.h5", SMALL["resolution"])
    data = data.subset(np.flatnonzero(data.micro_index.numpy() < 4))
    torch.manual_seed(0)
    model = SANO(SANOConfig(**SMALL, covariance="quadratic"))
    before = {k: v.clone() for k, v in model.covariance.state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=24, patience=100,
                      weights={"stress": 1.0, "nll": 0.05})
    history = train(model, data, cfg, comm=MPI.COMM_SELF, progress=False)
    assert np.isfinite(history["train"]).all()
    # the NLL trained the shared head (one member's weights for the ensemble)
    assert model.covariance.net[0].weight.shape[0] == 1
    assert any(not torch.equal(v, model.covariance.state_dict()[k]) for k, v in before.items())
    model.save(tmp_path / "q.pt")
    loaded = load_operator(tmp_path / "q.pt").eval()
    assert loaded.config.covariance == "quadratic"
    assert loaded.weights_digest() == model.weights_digest()
    with torch.no_grad():
        z = loaded.encode(data.images)[0][data.micro_index]
        pred = loaded.predict(z, data.F)
    assert (torch.linalg.eigvalsh(pred["aleatoric"].double()) > 0).all()


def test_an_unknown_covariance_form_is_refused_naming_the_choices():
    with pytest.raises(InputError, match="network, quadratic"):
        SANOConfig(**SMALL, covariance="cubic")


def test_a_model_whose_head_is_already_quadratic_is_refused(tmp_path):
    model = SANO(SANOConfig(**SMALL, covariance="quadratic"))
    with pytest.raises(InputError, match="already quadratic"):
        CovarianceDistillation(model, CovarianceDistillConfig(cells=40, epochs=1), tmp_path)


@pytest.mark.slow
def test_distill_covariance_fits_the_network_head_calibrates_and_resumes(tmp_path, capsys):
    """A short fit to the shipped composite model's network head: the bound's scale √tr Σ
    follows the network's, the model is calibrated afresh on fine solves, the rest is
    unchanged, and a rerun resumes from the finished checkpoint without training."""
    source = load_operator(MODELS / "fe2_composite.pt")
    cfg = CovarianceDistillConfig(cells=1000, epochs=60, seed=1)
    fitted, history = CovarianceDistillation(source, cfg, tmp_path / "w").run(progress=False)
    errors = [h["val_rel_trace"] for h in history["history"]]
    assert errors[-1] < 0.5 * errors[0]
    assert history["best_val_rel_trace"] < 0.4
    assert fitted.config.covariance == "quadratic"
    for name, value in source.state_dict().items():
        if not name.startswith("covariance."):
            torch.testing.assert_close(fitted.state_dict()[name], value)
    again, _ = CovarianceDistillation(source, cfg, tmp_path / "w").run(progress=False)
    for name, value in fitted.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value)
    # the command: fit, calibrate on fine solves, write the model with both heads' test figures
    out = tmp_path / "fast_q.pt"
    calibration = MODELS / "fe2_composite.anchor_calibration.h5"
    main(["distill-covariance", "--model", str(MODELS / "fe2_composite.pt"), "--out",
          str(out), "--calibration", str(calibration), "--test", str(calibration),
          "--cells", "1000", "--epochs", "60", "--seed", "1", "--work", str(tmp_path / "w"),
          "--quiet"])
    printed = json.loads(capsys.readouterr().out)
    model = load_operator(out)
    assert model.config.covariance == "quadratic"
    cal = Calibration.from_dict(model.calibration)
    assert cal.n_calibration == model.card["calibration_points"] > 0
    assert set(printed["bound_width"]) == {"network", "quadratic"}
    # on its own calibration set, split conformal covers at least its level
    assert printed["bound_coverage"]["quadratic"]["0.95"] >= 0.95
