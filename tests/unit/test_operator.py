"""The operator's structure: built-in invariants, tangents, losses, checkpoints (no DOLFINx)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuroscale_couple.errors import CheckpointError, InputError
from neuroscale_couple.materials import Phase
from neuroscale_couple.operators.sano import SANO, SANOConfig
from neuroscale_couple.physics import (
    dihedral,
    hill_mandel_loss,
    micro_stress,
    symmetry_loss,
    transform_image,
)
from neuroscale_couple.solvers.microstructure import random_fibres

SMALL = SANOConfig(resolution=16, width=8, modes=4, levels=2, heads=2, latent=16, hidden=16,
                   members=3)


@pytest.fixture(scope="module")
def model() -> SANO:
    torch.manual_seed(0)
    m = SANO(SMALL).double()
    m.eval()
    with torch.no_grad():  # a non-trivial normalisation, as after training
        m.sigma_ref.fill_(0.4)
        m.e_ref.fill_(0.06)
    return m


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.stack([torch.as_tensor(random_fibres(0.3, 3, seed=s).image(16))[None]
                        for s in range(4)]).double()


def random_F(n: int, seed: int = 0, radius: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(2, dtype=torch.float64) + radius * (torch.rand(n, 2, 2, generator=g,
                                                                     dtype=torch.float64) - 0.5)


def rotation(theta: float) -> torch.Tensor:
    c, s = np.cos(theta), np.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def test_head_is_objective_balanced_and_stress_free(model, images):
    z = model.encode(images)[0]
    F = random_F(4)
    Q = rotation(0.9)
    out, rot = model.predict(z, F), model.predict(z, Q @ F)
    torch.testing.assert_close(rot["mean"], Q @ out["mean"], rtol=0, atol=1e-13)
    PFt = out["mean"] @ F.transpose(-1, -2)
    torch.testing.assert_close(PFt, PFt.transpose(-1, -2), rtol=0, atol=1e-13)
    A = out["tangent"].reshape(-1, 4, 4)
    torch.testing.assert_close(A, A.transpose(-1, -2), rtol=0, atol=1e-12)
    at_identity = model.predict(z, torch.eye(2, dtype=torch.float64).expand(4, 2, 2))
    assert at_identity["mean"].abs().max() < 1e-15
    assert torch.all(torch.linalg.eigvalsh(out["cov"]) > 0)


def test_latents_are_encoded_in_float32_and_returned_in_the_model_dtype(model, images):
    structures = [random_fibres(0.3, 3, seed=s) for s in range(4)]
    z = model.latents(structures, batch=3)
    with torch.no_grad():
        exact = model.encode(images)[0]
    assert z.dtype == torch.float64 and next(model.parameters()).dtype == torch.float64
    assert 0 < float((z - exact).norm() / exact.norm()) < 1e-5  # float32 round-off, no more


def test_tangent_matches_finite_differences(model, images):
    z = model.encode(images)[0]
    F = random_F(4, seed=1)
    A = model.predict(z, F)["tangent"]
    h = 1e-6
    for k in range(2):
        for l in range(2):
            dF = torch.zeros(2, 2, dtype=torch.float64)
            dF[k, l] = h
            fd = (model.predict(z, F + dF, tangent=False)["mean"]
                  - model.predict(z, F - dF, tangent=False)["mean"]) / (2 * h)
            torch.testing.assert_close(A[..., k, l], fd, rtol=0, atol=1e-8)


def test_ensemble_spread_enters_the_covariance(model, images):
    z = model.encode(images)[0]
    F = random_F(4, seed=2)
    members = model.members_response(z, F, tangent=False)
    pred = model.predict(z, F, tangent=False)
    spread = (members["stress"] - pred["mean"]).flatten(-2)
    epistemic = torch.einsum("mbi,mbj->bij", spread, spread) / SMALL.members
    gap = torch.linalg.eigvalsh(pred["cov"] - epistemic)
    assert torch.all(gap > 0)  # aleatoric part is positive definite on top of the spread


def test_fine_graining_conserves_the_mean_deformation(model, images):
    F = random_F(4, seed=3)
    fields = model.sample_fields(images, F, n_samples=3, generator=torch.Generator().manual_seed(0))
    assert fields["w"].shape == (3, 4, 2, 16, 16)
    torch.testing.assert_close(fields["F"].mean(dim=(2, 3)), F.expand(3, 4, 2, 2), rtol=0,
                               atol=1e-13)
    assert (fields["w"][0] - fields["w"][1]).abs().max() > 1e-8  # distinct realizations


def test_micro_stress_matches_the_phase_law():
    phase = Phase(3.0, 0.35)
    lmbda, mu = phase.lame
    F = random_F(5, seed=4)
    P = micro_stress(F, torch.full((5,), lmbda, dtype=torch.float64),
                     torch.full((5,), mu, dtype=torch.float64), "neo_hookean")
    Fi_T = torch.linalg.inv(F).transpose(-1, -2)
    J = torch.linalg.det(F)[:, None, None]
    torch.testing.assert_close(P, mu * (F - Fi_T) + lmbda * torch.log(J) * Fi_T)


def test_micro_stress_of_a_folded_decoded_field_stays_finite():
    """A decoder early in training may fold the cell (det F ≤ 0): the physics losses then see
    the stress at J = MIN_JACOBIAN, finite with a finite gradient (NaN here once turned every
    weight of a training at loads up to |F̄ − I| = 0.3 into NaN)."""
    from neuroscale_couple.physics import MIN_JACOBIAN

    lmbda, mu = (torch.full((3,), v, dtype=torch.float64) for v in Phase(3.0, 0.35).lame)
    F = torch.tensor([[[0.5, 0.0], [0.0, -0.2]], [[0.1, 0.0], [0.0, 0.0]],
                      [[0.2, 0.0], [0.0, 0.5]]], dtype=torch.float64, requires_grad=True)
    P = micro_stress(F, lmbda, mu, "neo_hookean")
    P.sum().backward()
    assert torch.isfinite(P).all() and torch.isfinite(F.grad).all()
    J = MIN_JACOBIAN
    cof = torch.tensor([[-0.2, 0.0], [0.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(P[0], mu[0] * (F[0].detach() - cof / J)
                               + lmbda[0] * math.log(J) * cof / J)
    # det 0.1 ≥ MIN_JACOBIAN: the exact law
    Fi_T = torch.linalg.inv(F[2].detach()).T
    torch.testing.assert_close(P[2], mu[2] * (F[2].detach() - Fi_T)
                               + lmbda[2] * math.log(0.1) * Fi_T)


def test_hill_mandel_loss_vanishes_for_homogeneous_fields():
    F = random_F(2, seed=5)
    F_field = F[:, None, None].expand(2, 8, 8, 2, 2)
    P_field = 2.0 * F_field
    assert float(hill_mandel_loss(P_field, F_field, F, torch.tensor(1.0))) < 1e-28
    bumpy = P_field.clone()
    bumpy[:, :4] *= 1.5
    assert float(hill_mandel_loss(bumpy, F_field + torch.randn_like(F_field) * 0.1, F,
                                  torch.tensor(1.0))) > 1e-6


def test_equivariance_loss_vanishes_only_for_an_equivariant_response(images):
    lmbda, mu = Phase(3.0, 0.35).lame

    def isotropic(imgs, F):  # phase-averaged Neo-Hookean: invariant under any image transform
        scale = 1 + imgs.mean(dim=(1, 2, 3))
        return micro_stress(F, lmbda * scale, mu * scale, "neo_hookean")

    def anisotropic(imgs, F):  # weights the left half of the cell: not rotation invariant
        scale = 1 + 3 * imgs[..., : imgs.shape[-1] // 2].mean(dim=(1, 2, 3))
        return micro_stress(F, lmbda * scale, mu * scale, "neo_hookean")

    F = random_F(4, seed=6)
    sigma = torch.tensor(1.0, dtype=torch.float64)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        assert float(symmetry_loss(isotropic, images, F, isotropic(images, F), sigma, g)) < 1e-26
    defects = [float(symmetry_loss(anisotropic, images, F, anisotropic(images, F), sigma,
                                   torch.Generator().manual_seed(s))) for s in range(6)]
    assert max(defects) > 1e-4


def test_dihedral_matrices_are_orthogonal_and_compose():
    for k in range(4):
        for flip in (False, True):
            Q = dihedral(k, flip)
            torch.testing.assert_close(Q @ Q.T, torch.eye(2, dtype=torch.float64))
    img = torch.arange(16.0).reshape(4, 4)
    torch.testing.assert_close(transform_image(transform_image(img, 1, False), 3, False), img)


def test_checkpoint_round_trip(tmp_path, model, images):
    model.calibration = {"scale": 1.3, "quantiles": {"0.9": 2.0}, "n_calibration": 50}
    model.save(tmp_path / "m.pt")
    back = SANO.from_checkpoint(tmp_path / "m.pt").double()
    z, zb = model.encode(images)[0], back.encode(images)[0]
    F = random_F(4, seed=7)
    torch.testing.assert_close(back.predict(zb, F)["mean"], model.predict(z, F)["mean"])
    assert back.config == model.config
    assert back.calibration["scale"] == 1.3
    assert float(back.sigma_ref) == pytest.approx(0.4)


def test_missing_corrupt_or_foreign_checkpoints_give_clear_errors(tmp_path, model):
    with pytest.raises(CheckpointError, match="does not exist"):
        SANO.from_checkpoint(tmp_path / "nope.pt")
    model.save(tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        SANO.from_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not a NeuroScale model checkpoint"):
        SANO.from_checkpoint(tmp_path / "other.pt")


def test_altered_or_non_finite_weights_are_refused(tmp_path, model):
    """A model file's weights are checked against the digest saved with them, and for NaN."""
    model.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    name = next(k for k, t in payload["state_dict"].items() if t.is_floating_point())
    flipped = dict(payload, state_dict=dict(payload["state_dict"]))
    flipped["state_dict"][name] = payload["state_dict"][name].clone()
    flipped["state_dict"][name].view(-1)[0] += 1e-3  # a flipped low-order bit does as much
    torch.save(flipped, tmp_path / "flipped.pt")
    with pytest.raises(CheckpointError, match="do not match the SHA-256 digest"):
        SANO.from_checkpoint(tmp_path / "flipped.pt")
    model_nan = SANO(model.config).double()
    model_nan.load_state_dict(model.state_dict())
    with torch.no_grad():
        next(p for p in model_nan.parameters()).view(-1)[0] = float("nan")
    model_nan.save(tmp_path / "nan.pt")  # its digest is right, its weights are not
    with pytest.raises(CheckpointError, match="non-finite weights"):
        SANO.from_checkpoint(tmp_path / "nan.pt")


def test_bad_model_inputs(model):
    with pytest.raises(InputError, match="expected"):
        model.encode(torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(InputError, match="divisible"):
        SANOConfig(resolution=20, levels=3)
    with pytest.raises(InputError, match="nu=0.5"):
        SANOConfig(fibre=(70.0, 0.5))


@pytest.mark.parametrize("quartic", [False, True])
def test_basis_energies_are_stress_free_at_identity_and_contain_neo_hooke(quartic):
    from neuroscale_couple.operators.heads import basis_energies

    eye = torch.eye(2, dtype=torch.float64).requires_grad_(True)
    psi = basis_energies(eye.T @ eye, quartic=quartic)
    assert psi.shape == (17 if quartic else 14,)
    grad = torch.autograd.grad(psi.sum(), eye)[0]
    assert psi.abs().max() < 1e-15 and grad.abs().max() < 1e-15
    # the plane-strain Neo-Hookean law is exactly μ Ψ₁ + λ Ψ₂
    lmbda, mu = Phase(3.0, 0.35).lame
    F = random_F(6, seed=8).requires_grad_(True)
    W = (mu * basis_energies(F.transpose(-1, -2) @ F)[..., 0]
         + lmbda * basis_energies(F.transpose(-1, -2) @ F)[..., 1])
    P = torch.autograd.grad(W.sum(), F)[0]
    ones = torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(P, micro_stress(F.detach(), lmbda * ones, mu * ones,
                                               "neo_hookean"))


def test_augmented_samples_carry_the_exact_transformed_response(images):
    """transform_sample maps (m, F̄, P̄, A, w) to (g·m, QF̄Qᵀ, QP̄Qᵀ, Q⊗Q⊗Q⊗Q:A, Q w∘g⁻¹), the true
    response for an isotropic law; and the micro deformation it implies is the moved one."""
    from neuroscale_couple.physics import micro_deformation, transform_sample

    lmbda, mu = Phase(3.0, 0.35).lame
    ones = torch.ones(4, dtype=torch.float64)

    def law(F):
        return micro_stress(F, lmbda * ones, mu * ones, "neo_hookean")

    F = random_F(4, seed=9).requires_grad_(True)
    P = law(F)
    A = torch.stack([torch.autograd.grad(P[:, i, j].sum(), F, retain_graph=True)[0]
                     for i in range(2) for j in range(2)], 1).reshape(4, 2, 2, 2, 2)
    g = torch.Generator().manual_seed(3)
    w = 0.01 * torch.randn(4, 2, 16, 16, generator=g, dtype=torch.float64)
    for turns, flip, shift in [(1, False, (0, 0)), (2, True, (3, 5)), (3, True, (7, 1))]:
        imgs, Ft, Pt, At, wt = transform_sample(turns, flip, shift, images, F.detach(),
                                                P.detach(), A, w)
        Ft = Ft.clone().requires_grad_(True)
        Pn = law(Ft)
        An = torch.stack([torch.autograd.grad(Pn[:, i, j].sum(), Ft, retain_graph=True)[0]
                          for i in range(2) for j in range(2)], 1).reshape(4, 2, 2, 2, 2)
        torch.testing.assert_close(Pt, Pn.detach())
        torch.testing.assert_close(At, An)
        Q = dihedral(turns, flip)
        moved = transform_image(micro_deformation(F.detach(), w).permute(0, 3, 4, 1, 2), turns,
                                flip, shift).permute(0, 3, 4, 1, 2)
        torch.testing.assert_close(micro_deformation(Ft.detach(), wt), Q @ moved @ Q.T)
        assert imgs.shape == images.shape


def test_basis_only_head_keeps_the_invariants(images):
    import dataclasses

    torch.manual_seed(4)
    basis = SANO(dataclasses.replace(SMALL, energy_correction=False)).double()
    assert basis.energy.higher is None
    z = basis.encode(images)[0]
    F, Q = random_F(4, seed=10), rotation(-0.4)
    out, rot = basis.predict(z, F), basis.predict(z, Q @ F)
    torch.testing.assert_close(rot["mean"], Q @ out["mean"], rtol=0, atol=1e-13)
    A = out["tangent"].reshape(-1, 4, 4)
    torch.testing.assert_close(A, A.transpose(-1, -2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("quartic", [False, True])
def test_closed_form_response_equals_automatic_differentiation(images, quartic):
    """A basis-only head answers predictions in closed form (mixture_response): the same
    per-member energies, stresses, tangents and covariance factors as autograd through the
    energy (the training path, create_graph=True), at loads up to |F̄ − I| ≈ 0.4, with and
    without the quartic isotropic terms."""
    import dataclasses

    torch.manual_seed(5)
    basis = SANO(dataclasses.replace(SMALL, energy_correction=False,
                                     quartic_basis=quartic)).double().eval()
    if quartic:  # weights of the quartic terms as large as the others
        with torch.no_grad():
            basis.energy.weights[-1].bias[..., -3:] += 1.0
    with torch.no_grad():
        basis.sigma_ref.fill_(0.4)
        basis.e_ref.fill_(0.06)
    z = basis.encode(images)[0]
    F = random_F(4, seed=11, radius=0.8)
    fast = basis.members_response(z, F)
    graph = basis.members_response(z, F, create_graph=True)
    for key in ("energy", "stress", "tangent", "chol"):
        torch.testing.assert_close(fast[key], graph[key].detach(), rtol=1e-12, atol=1e-13,
                                   msg=key)
    pred = basis.predict(z, F)
    torch.testing.assert_close(pred["mean"], fast["stress"].mean(0), rtol=0, atol=1e-15)
    # the mean tangent comes from the mean weights (the mixture is linear in them)
    torch.testing.assert_close(pred["tangent"], graph["tangent"].detach().mean(0), rtol=1e-12,
                               atol=1e-13)


def test_the_float32_encoder_copy_is_kept_until_the_encoder_changes():
    model = SANO(SMALL).double()
    structures = [random_fibres(0.3, 3, seed=s) for s in range(2)]
    z = model.latents(structures)
    copy32 = model._float32_encoder()
    assert model._float32_encoder() is copy32  # no copy per call
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("energy.")).add_(1.0)
    assert model._float32_encoder() is copy32  # heads are not the encoder
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("lift")).mul_(1.5)
    assert model._float32_encoder() is not copy32
    assert not torch.allclose(model.latents(structures), z)
