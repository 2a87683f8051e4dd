"""Physics of the micro problem in torch, and the physics-informed losses of the operator.

Fields live on the periodic n×n pixel grid of the unit cell (row index = y, column = x):
w (B, 2, n, n) fluctuation in cell lengths, F(y) and P(y) (B, n, n, 2, 2).

Losses (each dimensionless, weighted in the training config):

- ``equilibrium``: ‖Div P(y)‖²_{H⁻¹} of the decoded micro stress (Fourier), / σ_ref²;
- ``consistency``: ‖⟨P(y)⟩ − μ‖² (the coarse head agrees with the decoded field), / σ_ref²;
- ``hill_mandel``: ⟨P : ∇w⟩² = (⟨P : F⟩ − ⟨P⟩ : F̄)², zero for an equilibrated periodic field;
- ``symmetry``: ‖P̄(g·m, Q F̄ Qᵀ) − Q P̄(m, F̄) Qᵀ‖² / σ_ref² over the dihedral group of the square
  cell (90° rotations, reflections) and periodic translations g of the microstructure image.

⟨F(y)⟩ = F̄ holds exactly for a periodic w with the spectral gradient (conservation across scales).
"""

from __future__ import annotations

import torch

from neuroscale_couple.operators.spectral import spectral_gradient

MIN_JACOBIAN = 1e-2


def micro_stress(F: torch.Tensor, lmbda: torch.Tensor, mu: torch.Tensor, law: str) -> torch.Tensor:
    """First Piola–Kirchhoff stress of the phase laws of :mod:`neuroscale_couple.materials`.

    F (..., 2, 2); lmbda, mu broadcastable to F's batch shape (...). Returns P (..., 2, 2).
    A decoded micro field may fold (det F ≤ 0) where the decoder is still poor, early in
    training at large loads; the Neo-Hookean stress is then taken at J = max(det F,
    ``MIN_JACOBIAN``) (F⁻ᵀ = cof F / J), finite with a finite gradient, so that the physics
    losses push the field back instead of turning the weights into NaN. Admissible fields
    (J ≥ ``MIN_JACOBIAN``) get the exact law.
    """
    eye = torch.eye(2, dtype=F.dtype, device=F.device)
    lmbda, mu = lmbda[..., None, None], mu[..., None, None]
    if law == "linear":
        eps = 0.5 * (F + F.transpose(-1, -2)) - eye
        tr = torch.diagonal(eps, dim1=-2, dim2=-1).sum(-1)[..., None, None]
        return lmbda * tr * eye + 2 * mu * eps
    J = torch.clamp(F[..., 0, 0] * F[..., 1, 1] - F[..., 0, 1] * F[..., 1, 0],
                    min=MIN_JACOBIAN)[..., None, None]
    cof = torch.stack([torch.stack([F[..., 1, 1], -F[..., 1, 0]], -1),
                       torch.stack([-F[..., 0, 1], F[..., 0, 0]], -1)], -2)
    F_inv_T = cof / J
    return mu * (F - F_inv_T) + lmbda * torch.log(J) * F_inv_T


def micro_deformation(F_bar: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F(y) = F̄ + ∇w: F_bar (B, 2, 2), w (B, 2, n, n) → (B, n, n, 2, 2), F_ij = F̄_ij + ∂w_i/∂y_j."""
    grad = spectral_gradient(w)  # (B, 2, n, n, 2): [b, i, row, col, j]
    return F_bar[:, None, None] + grad.permute(0, 2, 3, 1, 4)


def equilibrium_loss(P_field: torch.Tensor, sigma_ref: torch.Tensor) -> torch.Tensor:
    """Equilibrium residual of P (B, n, n, 2, 2) in the H⁻¹ norm, / σ_ref², batch mean.

    Σ_{k≠0} |P̂(k) k|² / |k|² with P̂ the cell-mean-normalised Fourier coefficients: the criterion
    of FFT-based homogenization (Moulinec–Suquet). Unlike the pointwise ‖Div P‖², it stays finite
    for the stress jumps at phase interfaces, so an equilibrated field scores near zero.
    """
    n = P_field.shape[1]
    P_hat = torch.fft.fft2(P_field, dim=(1, 2)) / n**2
    k = torch.fft.fftfreq(n, d=1.0 / n, dtype=P_field.dtype, device=P_field.device)
    ky, kx = torch.meshgrid(k, k, indexing="ij")  # rows = y, columns = x
    kvec = torch.stack([kx, ky], dim=-1)
    knorm = torch.linalg.norm(kvec, dim=-1)
    knorm[0, 0] = float("inf")
    traction = torch.einsum("bxyij,xyj->bxyi", P_hat, kvec.to(P_hat.dtype)) / knorm[..., None]
    return (traction.abs() ** 2).sum((1, 2, 3)).mean() / sigma_ref**2


def consistency_loss(P_field: torch.Tensor, mean: torch.Tensor,
                     sigma_ref: torch.Tensor) -> torch.Tensor:
    """‖⟨P(y)⟩ − μ‖² / σ_ref², averaged over the batch; μ (B, 2, 2)."""
    return ((P_field.mean(dim=(1, 2)) - mean) ** 2).sum((-1, -2)).mean() / sigma_ref**2


def hill_mandel_loss(P_field: torch.Tensor, F_field: torch.Tensor, F_bar: torch.Tensor,
                     sigma_ref: torch.Tensor) -> torch.Tensor:
    """(⟨P : F⟩ − ⟨P⟩ : F̄)² / σ_ref², averaged over the batch."""
    work = (P_field * F_field).sum((-1, -2)).mean(dim=(1, 2))
    macro = (P_field.mean(dim=(1, 2)) * F_bar).sum((-1, -2))
    return ((work - macro) ** 2).mean() / sigma_ref**2


def dihedral(k: int, flip: bool, dtype=torch.float64) -> torch.Tensor:
    """The 2×2 matrix Q of the image transform ``transform_image(·, k, flip)``.

    ``torch.rot90(image, k, dims=(-2, -1))`` with rows = y turns the cell content by −90° per k;
    ``flip`` first mirrors x ↦ 1 − x.
    """
    rot = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=dtype)
    Q = torch.linalg.matrix_power(rot, k % 4)
    if flip:
        Q = Q @ torch.diag(torch.tensor([-1.0, 1.0], dtype=dtype))
    return Q


def transform_image(image: torch.Tensor, k: int, flip: bool,
                    shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Apply a periodic translation, a mirror x ↦ 1 − x and k quarter turns to images (…, n, n)."""
    out = torch.roll(image, shifts=shift, dims=(-2, -1))
    if flip:
        out = torch.flip(out, dims=(-1,))
    return torch.rot90(out, k, dims=(-2, -1))


def transform_sample(k: int, flip: bool, shift: tuple[int, int], images: torch.Tensor,
                     F: torch.Tensor, P: torch.Tensor, A: torch.Tensor, w: torch.Tensor | None
                     ) -> tuple[torch.Tensor, ...]:
    """Exact response of a transformed cell: images (U, 1, n, n) moved by the group element,
    F̄ → QF̄Qᵀ, P̄ → QP̄Qᵀ, A → Q⊗Q⊗Q⊗Q : A, and the fluctuation w (B, 2, n, n) → Q w(g⁻¹ y)."""
    Q = dihedral(k, flip, F.dtype).to(F.device)
    moved_w = None
    if w is not None:
        moved_w = torch.einsum("ij,bjxy->bixy", Q, transform_image(w, k, flip, shift))
    return (transform_image(images, k, flip, shift), Q @ F @ Q.T, Q @ P @ Q.T,
            torch.einsum("ip,jq,kr,ls,bpqrs->bijkl", Q, Q, Q, Q, A), moved_w)


def symmetry_loss(response, images: torch.Tensor, F_bar: torch.Tensor, mean: torch.Tensor,
                  sigma_ref: torch.Tensor, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Equivariance defect of ``response(images, F) -> P̄`` under a random group element.

    images (B, 1, n, n), F_bar and mean (B, 2, 2) with mean = response(images, F_bar).
    """
    n = images.shape[-1]
    k = int(torch.randint(0, 4, (1,), generator=generator))
    flip = bool(torch.randint(0, 2, (1,), generator=generator))
    shift = tuple(int(s) for s in torch.randint(0, n, (2,), generator=generator))
    Q = dihedral(k, flip, F_bar.dtype).to(F_bar.device)
    moved = response(transform_image(images, k, flip, shift), Q @ F_bar @ Q.T)
    return ((moved - Q @ mean @ Q.T) ** 2).sum((-1, -2)).mean() / sigma_ref**2
