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
    # a0 from another relaxation of the same crystal (2e-9 apart seen) is the same crystal
    model.check_family(dict(FAMILY, a0=FAMILY["a0"] * (1 + 2e-8)))
    with pytest.raises(InputError, match="a0: model 3.59, solver 3.5935"):
        model.check_family(dict(FAMILY, a0=3.5935))
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


def noisy_crystal_data(n: int, stderr: dict[float, np.ndarray], seed: int) -> TrainingData:
    """St. Venant–Kirchhoff responses (λ = μ = 1) of two temperatures with Gaussian noise of the
    given standard errors (2, 2) per temperature (K → descriptor T/1000), stored as measured."""
    rng = np.random.default_rng(seed)
    temps = list(stderr)
    F = np.eye(2) + 0.05 * rng.uniform(-1, 1, (n * len(temps), 2, 2))
    E = 0.5 * (F.transpose(0, 2, 1) @ F - np.eye(2))
    S = np.trace(E, axis1=1, axis2=2)[:, None, None] * np.eye(2) + 2 * E
    P = F @ S
    A = np.zeros((len(F), 2, 2, 2, 2))  # tangent not trained here
    index = np.repeat(np.arange(len(temps)), n)
    s = np.stack([stderr[temps[k]] for k in index])
    return TrainingData(torch.tensor([[t / 1000] for t in temps], dtype=torch.float64),
                        torch.as_tensor(index),
                        torch.as_tensor(F), torch.as_tensor(P + s * rng.standard_normal(P.shape)),
                        torch.as_tensor(A), noise=torch.as_tensor(s), structure=Crystal)


def test_noise_term_teaches_the_head_the_measured_noise():
    """Σ of a head trained with the noise term matches the stored standard errors at 300 K and
    falls to the floor at 0 K (the KL term's minimum is Σ = S)."""
    from neuroscale_couple.training import NOISE_FLOOR, TrainConfig, train

    hot = np.array([[0.004, 0.002], [0.002, 0.003]])
    stderr = {0.0: np.zeros((2, 2)), 300.0: hot}
    data = noisy_crystal_data(96, stderr, seed=0)
    torch.manual_seed(0)
    m = CrystalOperator(CrystalConfig.from_dict({"latent": 8, "hidden": 32, "members": 2,
                                                 "family": FAMILY})).double()
    train(m, data, TrainConfig(epochs=150, batch_size=32, lr=3e-3, lr_final=1e-4,
                               val_fraction=0.0, weights={"stress": 1.0, "noise": 1.0}),
          validation=data.subset(np.zeros(0, np.int64)), progress=False)
    m.eval()
    test = noisy_crystal_data(16, stderr, seed=1)
    with torch.no_grad():
        z = m.encode(test.images)[0][test.micro_index]
        L = m.members_response(z, test.F, tangent=False)["chol"]
        var = m.sigma_ref**2 * (L @ L.transpose(-1, -2)).mean(0)
    std = np.sqrt(np.diagonal(var.numpy(), axis1=-2, axis2=-1)).reshape(-1, 2, 2)
    is_hot = test.micro_index.numpy() == 1
    ratio = std[is_hot] / hot
    assert np.all(np.abs(np.median(ratio, axis=0) - 1) < 0.25), np.median(ratio, axis=0)
    floor = NOISE_FLOOR * float(m.sigma_ref)
    assert np.median(std[~is_hot]) < 3 * floor < 0.5 * hot.min(), (std[~is_hot].mean(), floor)
