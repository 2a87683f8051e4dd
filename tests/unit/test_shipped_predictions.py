"""The shipped models load in eval mode and predict what they predicted before the Bayesian
heads and loss weightings existed: the expectation file was written by this module's
``__main__`` with the code of main at 2c92407 (``python tests/unit/test_shipped_predictions.py``).

Predictions run in float64 on fixed synthetic inputs, so the comparison (to 1e-12) is not at
the mercy of float32 round-off of another BLAS; on one machine they agree bit for bit. The
coupler's epistemic trace is the exception: :class:`Inference` keeps the members' weight
differences in float32 (their round-off is far below the bound's calibration error), so it is
compared to float32 round-off of the members' spread, a small difference of large basis terms
(to 1e-4 of itself, as in test_inference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.operators.inference import Inference

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"
EXPECTED = Path(__file__).with_suffix(".json")
SHIPPED = ("fe2_composite", "fe2_composite_fast", "fe2_composite_3d", "hmm_cu", "hmm_cu_thermal")


def inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed structure inputs (3 structures) and loads F̄ (3, d, d) for ``model``, float64."""
    n, d = model.input_resolution, model.dim
    if n is None:  # a crystal: its descriptors
        x = torch.linspace(0.0, 1.0, 3 * model.config.n_features, dtype=torch.float64)
        images = x.reshape(3, -1)
    else:
        grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * d,
                                          indexing="ij")).sum(0)
        images = torch.stack([(torch.sin(grid * k / n) > 0.3).double() for k in (1, 2, 3)])
        images = images.unsqueeze(1)
    F = torch.eye(d, dtype=torch.float64) + 0.04 * torch.sin(
        torch.arange(3 * d * d, dtype=torch.float64)).reshape(3, d, d)
    return images, F


def predictions(name: str) -> dict[str, list]:
    """The float64 predictions of shipped model ``name`` on :func:`inputs`: ``predict``'s
    mean, covariance and tangent, and for a 2D model the coupler's :class:`Inference`."""
    model = load_operator(MODELS / f"{name}.pt").double()
    images, F = inputs(model)
    with torch.no_grad():
        z = model.encode(images)[0]
        pred = model.predict(z, F)
    out = {k: pred[k].numpy().tolist() for k in ("mean", "cov", "tangent")}
    if model.dim == 2:
        r = Inference(model, z).response(np.arange(3), F.numpy())
        out.update(inference_stress=r.stress.tolist(),
                   inference_trace_epistemic=r.trace_epistemic.tolist())
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_model_predicts_as_before(name: str) -> None:
    expected = json.loads(EXPECTED.read_text())[name]
    got = predictions(name)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        rtol = 1e-4 if key == "inference_trace_epistemic" else 1e-12
        np.testing.assert_allclose(got[key], value, rtol=rtol, atol=1e-14, err_msg=key)


@pytest.mark.parametrize("name", SHIPPED)
def test_load_operator_returns_a_model_in_eval_mode(name: str) -> None:
    model = load_operator(MODELS / f"{name}.pt")
    assert not any(m.training for m in model.modules())
    assert not model.epistemic.bayesian  # the shipped models are ensembles


if __name__ == "__main__":
    EXPECTED.write_text(json.dumps({name: predictions(name) for name in SHIPPED}) + "\n")
