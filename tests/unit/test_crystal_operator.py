"""The crystal operator and its structures: invariants, energy, family checks, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroscale_couple.errors import CheckpointError, InputError
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.operators.crystal import CrystalConfig, CrystalOperator
from neuroscale_couple.operators.sano import SANO
from neuroscale_couple.solvers.cauchy_born import Crystal
from neuroscale_couple.training import TrainingData

FAMILY = {"element": "Cu", "lattice": "fcc", "a0": 3.59, "supercell": [2, 2, 2], "vacancies": 1,
          "calculator": "emt"}


@pytest.fixture(scope="module")
def model() -> CrystalOperator:
    torch.manual_seed(0)
    m = CrystalOperator(CrystalConfig.from_dict({"latent": 8, "hidden": 16, "members": 3,
                                                 "family": FAMILY})).double().eval()
    with torch.no_grad():
        m.sigma_ref.fill_(2.0)
        m.e_ref.fill_(0.03)
    return m


def crystals(*temperatures: float) -> list[Crystal]:
    return [Crystal(dict(FAMILY, temperature=t)) for t in temperatures]


def F_batch(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(2, dtype=torch.float64) + 0.1 * (torch.rand(n, 2, 2, generator=g,
                                                                 dtype=torch.float64) - 0.5)


def test_objective_balanced_energy_consistent(model):
    z = model.encode(model.structure_inputs(crystals(0.0, 300.0, 600.0)))[0]
    assert z.shape == (3, 8)
    F = F_batch(3)
    out = model.predict(z, F)
    c, s = np.cos(0.7), np.sin(0.7)
    Q = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    rot = model.predict(z, Q @ F)
    torch.testing.assert_close(rot["mean"], Q @ out["mean"], rtol=0, atol=1e-12)
    torch.testing.assert_close(rot["energy"], out["energy"], rtol=0, atol=1e-12)
    PFt = out["mean"] @ F.transpose(-1, -2)
    torch.testing.assert_close(PFt, PFt.transpose(-1, -2), rtol=0, atol=1e-12)
    # P̄ = ∂W̄/∂F̄ by central differences of the reported energy
    h = 1e-6
    dF = torch.tensor([[0.3, -0.2], [0.5, 0.1]], dtype=torch.float64)
    dW = (model.predict(z, F + h * dF)["energy"] - model.predict(z, F - h * dF)["energy"]) / (2 * h)
    torch.testing.assert_close(dW, (out["mean"] * dF).sum((-1, -2)), rtol=1e-7, atol=1e-9)
    zero = model.predict(z, torch.eye(2, dtype=torch.float64).expand(3, 2, 2))
    assert zero["energy"].abs().max() < 1e-12 and zero["mean"].abs().max() < 1e-12


def test_family_mismatch_and_bad_descriptors_are_refused(model):
    model.check_family(dict(FAMILY, temperature=300.0))  # temperature is a descriptor, not family
    with pytest.raises(InputError, match="vacancies: model 1, solver 0"):
        model.check_family(dict(FAMILY, vacancies=0))
    with pytest.raises(InputError, match="calculator"):
        model.check_family(dict(FAMILY, calculator={"name": "lammps", "pair_style": "eam",
                                                    "pair_coeff": "* * Cu_u3.eam"}))
    with pytest.raises(InputError, match=r"expected \(B, 1\)"):
        model.encode(torch.zeros(2, 3, dtype=torch.float64))


def test_checkpoint_round_trip_and_format_dispatch(model, tmp_path):
    model.calibration = {"scale": 1.5}
    model.save(tmp_path / "c.pt")
    back = load_operator(tmp_path / "c.pt").double()
    assert isinstance(back, CrystalOperator) and back.calibration == {"scale": 1.5}
    z = model.encode(model.structure_inputs(crystals(0.0, 300.0)))[0]
    torch.testing.assert_close(back.predict(z, F_batch(2))["mean"],
                               model.predict(z, F_batch(2))["mean"], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="is not a neuroscale-sano/1 checkpoint"):
        SANO.from_checkpoint(tmp_path / "c.pt")


def test_crystal_structures_key_and_data_arrays():
    a, b, c = crystals(0.0, 0.0, 300.0)
    assert a.key == b.key != c.key
    arrays = Crystal.arrays([a, c])
    np.testing.assert_array_equal(arrays["descriptor"], [[0.0], [0.3]])
    d = {"micro/descriptor": arrays["descriptor"], "samples/micro_index": np.array([0, 1, 1]),
         "samples/F": np.tile(np.eye(2), (3, 1, 1)), "samples/P": np.zeros((3, 2, 2)),
         "samples/A": np.zeros((3, 2, 2, 2, 2)), "config": {"crystal": FAMILY}}
    data = TrainingData.from_arrays(d, None)
    assert data.images.shape == (2, 1) and len(data) == 3
    fit, held = data.split(1 / 3, seed=0)  # crystal data are split by samples
    assert (len(fit), len(held)) == (2, 1)


def test_residual_stress_head_gives_objective_stress_at_identity():
    """With ``residual_stress`` (thermal pressure) P̄(I) = S̄₀(z) is symmetric and depends on the
    descriptor; the response stays objective."""
    torch.manual_seed(1)
    m = CrystalOperator(CrystalConfig(latent=8, hidden=16, members=2,
                                      residual_stress=True)).double().eval()
    z = m.encode(torch.tensor([[0.0], [0.3]], dtype=torch.float64))[0]
    eye = torch.eye(2, dtype=torch.float64).expand(2, 2, 2)
    P0 = m.predict(z, eye)["mean"]
    assert P0.abs().min() > 1e-6 and not torch.allclose(P0[0], P0[1])
    torch.testing.assert_close(P0, P0.transpose(-1, -2), rtol=0, atol=1e-13)
    c, s = np.cos(0.4), np.sin(0.4)
    Q = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    F = F_batch(2)
    torch.testing.assert_close(m.predict(z, Q @ F)["mean"], Q @ m.predict(z, F)["mean"],
                               rtol=0, atol=1e-12)
