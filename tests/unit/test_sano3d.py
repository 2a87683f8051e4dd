"""The 3D operator: SANO on voxel images of 3D cells, F̄ 3×3 (3D Haar scales, 3D Fourier layers,
an energy of 3D invariants), and the refusal of inputs of the other dimension."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import yaml

from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.operators.heads import CUBIC_DIRECTIONS, basis_energies_3d
from neuroscale_couple.operators.sano import SANO, SANOConfig
from neuroscale_couple.operators.spectral import SpectralConv
from neuroscale_couple.operators.wavelet import WaveletDecomposition, haar_dwt, haar_idwt
from neuroscale_couple.training import TrainConfig, TrainingData, batch_loss, train

TINY = {"dim": 3, "resolution": 8, "width": 8, "modes": 2, "levels": 2, "heads": 2,
        "latent": 16, "hidden": 16, "members": 3}


def rotation(gen: torch.Generator) -> torch.Tensor:
    """A random rotation Q ∈ SO(3) (3, 3), float64."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def sphere_images(fractions: list[float], n: int = 8) -> torch.Tensor:
    """Voxel images (M, 1, n, n, n) of one centred sphere each, of volume fractions v."""
    from neuroscale_couple.solvers.cells3d import single_sphere

    return torch.as_tensor(np.stack([single_sphere(v).image(n) for v in fractions]),
                           dtype=torch.float64)[:, None]


@pytest.fixture(scope="module")
def model() -> SANO:
    torch.manual_seed(0)
    m = SANO(SANOConfig(**TINY)).double()
    m.eval()
    return m


@pytest.fixture(scope="module")
def loads() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.eye(3, dtype=torch.float64) + 0.08 * torch.randn(5, 3, 3, generator=gen,
                                                                  dtype=torch.float64)


# --- 3D Haar scales and Fourier layers ------------------------------------------------------------


def test_3d_haar_round_trip_parseval_and_band_order():
    x = torch.randn(2, 3, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dec = WaveletDecomposition(2, dim=3)
    scales = dec(x)
    assert [tuple(s.shape) for s in scales] == [(2, 21, 4, 4, 4), (2, 21, 2, 2, 2), (2, 3, 2, 2, 2)]
    assert (dec.inverse(scales) - x).abs().max() < 1e-12
    assert sum(s.square().sum() for s in scales).item() == pytest.approx(x.square().sum().item(),
                                                                        rel=1e-13)
    # band k holds the differences along the spatial axes a whose bit a of k is set
    alternating = (-1.0) ** torch.arange(4, dtype=torch.float64)
    for k in range(1, 8):
        field = torch.ones(4, 4, 4, dtype=torch.float64)
        for a in range(3):
            if (k >> a) & 1:
                field = field * alternating.reshape([4 if b == a else 1 for b in range(3)])
        approx, details = haar_dwt(field, 3)
        expected = torch.zeros(7, 2, 2, 2, dtype=torch.float64)
        expected[k - 1] = 2.0**1.5
        torch.testing.assert_close(details, expected, atol=1e-15, rtol=0)
        torch.testing.assert_close(haar_idwt(approx, details, 3), field)


def test_a_3d_fourier_layer_acts_on_a_band_limited_field_independently_of_the_grid():
    layer = SpectralConv(2, 3, modes=2, dim=3).double()

    def field(n: int) -> torch.Tensor:  # modes |k| ≤ 1 along each axis
        t = torch.arange(n, dtype=torch.float64) / n
        z, y, x = torch.meshgrid(t, t, t, indexing="ij")
        return torch.stack([torch.cos(2 * torch.pi * (x + y)) + torch.sin(2 * torch.pi * z),
                            torch.sin(2 * torch.pi * (x - z))])[None]

    coarse, fine = layer(field(8)), layer(field(16))
    assert coarse.shape == (1, 3, 8, 8, 8)
    torch.testing.assert_close(fine[..., ::2, ::2, ::2], coarse, atol=1e-12, rtol=0)
    assert coarse.abs().max() > 1e-3


# --- the energy head: objectivity, stress-free reference, tangent ---------------------------------


def test_3d_basis_energies_are_objective_and_stress_free_at_the_identity():
    gen = torch.Generator().manual_seed(3)
    F = (torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(4, 3, 3, generator=gen,
                                                               dtype=torch.float64))
    F.requires_grad_(True)
    psi = basis_energies_3d(F.transpose(-1, -2) @ F, quartic=True)
    assert psi.shape == (4, 3 + 2 * len(CUBIC_DIRECTIONS) + 3)
    Q = rotation(gen)
    QF = Q @ F
    torch.testing.assert_close(basis_energies_3d(QF.transpose(-1, -2) @ QF, quartic=True), psi)
    eye = torch.eye(3, dtype=torch.float64, requires_grad=True)
    psi0 = basis_energies_3d(eye.T @ eye, quartic=True)
    assert psi0.abs().max() < 1e-15
    for k in range(psi0.shape[-1]):
        grad = torch.autograd.grad(psi0[k], eye, retain_graph=True)[0]
        assert grad.abs().max() < 1e-14, k


def test_3d_operator_is_objective_and_stress_free_at_the_identity(model, loads):
    images = sphere_images([0.1, 0.3, 0.2, 0.05, 0.25])
    z, h = model.encode(images)
    assert z.shape == (5, TINY["latent"]) and h.shape == (5, TINY["width"], 8, 8, 8)
    pred = model.predict(z, loads)
    assert pred["mean"].shape == (5, 3, 3) and pred["cov"].shape == (5, 9, 9)
    assert pred["tangent"].shape == (5, 3, 3, 3, 3) and pred["energy"].shape == (5,)
    assert torch.linalg.eigvalsh(pred["cov"]).min() > 0
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        Q = rotation(gen)
        rotated = model.predict(z, Q @ loads)
        torch.testing.assert_close(rotated["mean"], Q @ pred["mean"], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(rotated["energy"], pred["energy"], atol=1e-12, rtol=1e-10)
    PFt = pred["mean"] @ loads.transpose(-1, -2)  # balance of angular momentum
    torch.testing.assert_close(PFt, PFt.transpose(-1, -2), atol=1e-12, rtol=0)
    at_rest = model.predict(z, torch.eye(3, dtype=torch.float64).expand(5, 3, 3))
    assert at_rest["mean"].abs().max() < 1e-12 * pred["mean"].abs().max()


def test_3d_tangent_is_the_derivative_of_the_stress_and_major_symmetric(model, loads):
    z, _ = model.encode(sphere_images([0.15, 0.3]))
    F = loads[:2]
    A = model.predict(z, F)["tangent"]
    torch.testing.assert_close(A, A.permute(0, 3, 4, 1, 2), atol=1e-12, rtol=0)
    eps = 1e-6
    for k, m in itertools.product(range(3), range(3)):
        dF = torch.zeros(3, 3, dtype=torch.float64)
        dF[k, m] = eps
        fd = (model.predict(z, F + dF, tangent=False)["mean"]
              - model.predict(z, F - dF, tangent=False)["mean"]) / (2 * eps)
        torch.testing.assert_close(A[..., k, m], fd, atol=1e-7 * A.abs().max(), rtol=1e-6)


# --- checkpoints and inputs of the other dimension -----------------------------------------------


def test_a_3d_model_saves_and_loads_with_its_dimension(model, loads, tmp_path):
    model.save(tmp_path / "m3.pt")
    again = load_operator(tmp_path / "m3.pt")
    assert again.config.dim == 3 and again.dim == 3
    z = model.encode(sphere_images([0.2]))[0]
    torch.testing.assert_close(again.predict(z, loads[:1])["mean"],
                               model.predict(z, loads[:1])["mean"], atol=0, rtol=0)


def test_inputs_of_the_other_dimension_are_refused(model):
    flat = SANO(SANOConfig(resolution=8, width=8, modes=2, levels=2, heads=2, latent=16,
                           hidden=16, members=2))
    with pytest.raises(InputError, match=r"3D \(voxel\) images: this operator learnt 2D cells"):
        flat.encode(torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(InputError, match=r"2D \(pixel\) images: this operator learnt 3D cells"):
        model.encode(torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    z = model.encode(sphere_images([0.2]))[0]
    with pytest.raises(InputError, match=r"this 3D operator takes F̄ batches \(B, 3, 3\)"):
        model.predict(z, torch.eye(2, dtype=torch.float64)[None])
    with pytest.raises(InputError, match=r"plane-strain \(2D\) operator takes F̄ batches"):
        flat.predict(torch.zeros(1, 16), torch.eye(3)[None])
    with pytest.raises(InputError, match="no fine-graining decoder"):
        model.decode(sphere_images([0.2]), z, None, torch.eye(3, dtype=torch.float64)[None])
    with pytest.raises(InputError, match="dim=4"):
        SANOConfig(dim=4)


# --- training on 3D cells ------------------------------------------------------------------------


def neo_hookean_3d(F: torch.Tensor, lmbda: torch.Tensor, mu: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """P = μ(F − F⁻ᵀ) + λ ln J F⁻ᵀ (S, 3, 3) and A = ∂P/∂F (S, 3, 3, 3, 3) by autograd."""
    def stress(f: torch.Tensor, la: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        f_inv_t = torch.linalg.inv(f).T
        return m * (f - f_inv_t) + la * torch.log(torch.det(f)) * f_inv_t

    P = torch.stack([stress(f, la, m) for f, la, m in zip(F, lmbda, mu, strict=True)])
    A = torch.stack([torch.autograd.functional.jacobian(lambda f, la=la, m=m: stress(f, la, m), f)
                     for f, la, m in zip(F, lmbda, mu, strict=True)])
    return P, A


def sphere_data_set(path, count: int = 6, per: int = 6, seed: int = 0) -> None:
    """A tiny 3D data set written as `neuroscale generate` writes one: random sphere cells
    (voxel images 8³) and, in place of RVE solves, a Neo-Hookean response whose moduli grow
    with the sphere fraction (E = 3 (1 + 4v), ν = 0.3)."""
    from neuroscale_couple.datagen import plan
    from neuroscale_couple.store import write_dataset
    from neuroscale_couple.structures import stored_arrays

    config = {"microstructure": {"kind": "random_spheres", "volume_fraction": [0.05, 0.3],
                                 "n_spheres": [1, 3], "count": count, "seed": seed},
              "loads": {"per_microstructure": per, "radius": 0.1, "seed": seed + 1},
              "law": "neo_hookean", "image_resolution": 8}
    structures, F = plan(config)
    v = torch.tensor([s.volume_fraction for s in structures]).repeat_interleave(per)
    E, nu = 3.0 * (1 + 4 * v), 0.3
    P, A = neo_hookean_3d(torch.as_tensor(F), E * nu / ((1 + nu) * (1 - 2 * nu)),
                          E / (2 * (1 + nu)))
    samples = {"micro_index": np.arange(count * per) // per, "F": F, "P": P.numpy(),
               "A": A.numpy()}
    write_dataset(path, config, stored_arrays(structures, 8), samples)


def test_a_few_training_steps_on_3d_cells_lower_the_loss(tmp_path):
    sphere_data_set(tmp_path / "s.h5")
    data = TrainingData.from_h5(tmp_path / "s.h5", 8)
    assert data.images.shape == (6, 1, 8, 8, 8) and data.F.shape == (36, 3, 3)
    torch.manual_seed(0)
    model, mcfg = data.structure.new_operator({k: v for k, v in TINY.items() if k != "dim"},
                                              data)
    assert model.config.dim == 3 and mcfg["dim"] == 3
    model.set_normalisation(data.F, data.P, data.A)
    weights = dict.fromkeys(("stress", "tangent", "nll", "noise", "equilibrium", "consistency",
                             "hill_mandel", "symmetry", "fields"), 0.0)
    weights.update(stress=1.0, tangent=0.2)
    gen, idx = torch.Generator().manual_seed(0), torch.arange(len(data))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        terms = batch_loss(model, data, idx, weights, gen)
        return sum(weights[k] * v for k, v in terms.items())

    first = float(loss().detach())
    for _ in range(15):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert float(loss().detach()) < 0.5 * first
    with pytest.raises(InputError, match="augment: false"):
        train(model, data, TrainConfig(epochs=1, augment=True), progress=False)


def test_neuroscale_train_makes_a_calibrated_3d_model(tmp_path, capsys):
    from neuroscale_couple.cli import main

    sphere_data_set(tmp_path / "s.h5", count=16, per=4)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "model": {k: v for k, v in TINY.items() if k != "dim"},
        "training": {"epochs": 2, "batch_size": 32, "val_fraction": 0.5,
                     "weights": {"stress": 1.0, "tangent": 0.2, "nll": 0.05}}}))
    assert main(["train", str(tmp_path / "t.yaml"), "--data", str(tmp_path / "s.h5"), "--out",
                 str(tmp_path / "m.pt"), "--quiet"]) == 0
    m = load_operator(tmp_path / "m.pt")
    assert m.config.dim == 3 and m.calibration and m.card["model_config"]["dim"] == 3
    assert np.isfinite(m.card["validation"]["rel_l2_stress"])
    from neuroscale_couple.solvers.cells3d import random_spheres

    z = m.latents([random_spheres(0.2, 2, seed=5)])
    assert m.predict(z, torch.eye(3)[None] * 1.02)["mean"].shape == (1, 3, 3)
    # a 2D model's training config with 3D data: the dimension comes from the data
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"model": {**TINY, "dim": 2}}))
    assert main(["train", str(tmp_path / "bad.yaml"), "--data", str(tmp_path / "s.h5"),
                 "--out", str(tmp_path / "b.pt"), "--quiet"]) != 0
    assert "model.dim=2 but the data hold 3D cells" in capsys.readouterr().err


def test_explain_pictures_of_a_3d_model_are_refused(model, tmp_path):
    from neuroscale_couple.explain import explain_cells
    from neuroscale_couple.solvers.cells3d import single_sphere

    seen = model.explain(sphere_images([0.2]))
    assert [tuple(e.shape) for e in seen["scale_energy"]] == [(1, 4, 4, 4), (1, 2, 2, 2),
                                                              (1, 2, 2, 2)]
    assert seen["attention"][0][0].shape == (1, 4, 4, 4, 3)
    with pytest.raises(InputError, match="draws 2D cells"):
        explain_cells(model, [single_sphere(0.2)], ["a"], tmp_path)
