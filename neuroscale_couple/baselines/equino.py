"""EquiNO-style baseline, after Eivazi et al., arXiv 2504.07976: the micro field is a
combination of a reduced basis of fluctuation fields, and the stress follows from the phase law
and cell averaging, so that part of the physics is exact instead of learnt.

Here (a re-implementation for cells that vary, where EquiNO trains for one fixed RVE):

- basis: the first ``modes`` POD modes H_k(y) (n, n, 2, 2) of the fluctuation gradients
  ∇w = F(y) − F̄ of the training data's stored micro fields, in the frame of the load's right
  stretch U (F̄ = R U): each mode is periodic, compatible and of zero mean, so every
  combination keeps ⟨F(y)⟩ = F̄;
- a network (CNN on the image, MLP with U) gives the coefficients c_k;
- P̄(F̄) = R ⟨P(U + Σ_k c_k H_k(y); phase(y))⟩ with the exact Neo-Hookean (or linear) phase law
  pixel by pixel (:func:`~neuroscale_couple.physics.micro_stress`): objective by construction.

Not built in, unlike EquiNO: the equilibrium of the combined field (trained here on P̄ and A
like the other models, with no weak-form residual loss). :meth:`EquiNOStyle.projection_error`
measures the floor of the basis: P̄ from the true micro fields projected on it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from neuroscale_couple.baselines.base import Baseline, PhaseLaw
from neuroscale_couple.errors import InputError


def polar(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Polar decomposition F = R U of F (..., 2, 2) with det F > 0: R (..., 2, 2), U (..., 2, 2)."""
    theta = torch.atan2(F[..., 1, 0] - F[..., 0, 1], F[..., 0, 0] + F[..., 1, 1])
    c, s = torch.cos(theta), torch.sin(theta)
    R = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    return R, R.transpose(-1, -2) @ F


class EquiNOStyle(Baseline):
    """Reduced-basis operator: coefficients of ``modes`` fluctuation modes from a CNN (images
    (B, 1, n, n)) and the stretch U; phases and law from ``material`` (a generate config)."""

    name = "EquiNO-style"

    def __init__(self, material: dict, *, resolution: int = 32, modes: int = 64,
                 hidden: int = 128) -> None:
        super().__init__(members=1)
        self.phase_law = PhaseLaw(material)
        self.register_buffer("basis", torch.zeros(modes, resolution, resolution, 2, 2))
        self.register_buffer("mode_scale", torch.ones(modes))
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1, padding_mode="circular"), nn.SiLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, padding_mode="circular"), nn.SiLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1, padding_mode="circular"), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(32 + 3, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, modes))
        nn.init.zeros_(self.head[-1].weight)  # start from the uniform-strain (Voigt) field
        nn.init.zeros_(self.head[-1].bias)

    @property
    def modes(self) -> int:
        return len(self.basis)

    def set_basis(self, F: torch.Tensor, F_fields: torch.Tensor) -> torch.Tensor:
        """POD basis of the fluctuation gradients of training samples: loads F̄ (S, 2, 2),
        micro deformation gradients F(y) (S, n, n, 2, 2). Returns the singular values (≤ S)."""
        n = self.basis.shape[1]
        if F_fields.shape[1:] != (n, n, 2, 2):
            raise InputError(f"micro fields of shape {tuple(F_fields.shape[1:])}: the "
                             f"EquiNO-style model takes ({n}, {n}, 2, 2) (fields_resolution: {n})")
        if len(F) < self.modes:
            raise InputError(f"{len(F)} field snapshots for {self.modes} modes: give more "
                             "samples with micro fields or fewer modes")
        H = self._reference_fluctuations(F.double(), F_fields.double()).flatten(1)
        _, S, V = torch.linalg.svd(H, full_matrices=False)
        self.basis.copy_(V[:self.modes].reshape(self.basis.shape))
        self.mode_scale.copy_(S[:self.modes] / np.sqrt(len(H)))
        return S

    @staticmethod
    def _reference_fluctuations(F: torch.Tensor, F_fields: torch.Tensor) -> torch.Tensor:
        """Rᵀ (F(y) − F̄), mean-free, (S, n, n, 2, 2): the fluctuation in the stretch frame."""
        R, _ = polar(F)
        H = F_fields - F[:, None, None]
        H = H - H.mean((1, 2), keepdim=True)
        return R.transpose(-1, -2)[:, None, None] @ H

    def cell_stress(self, x: torch.Tensor, U: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        """⟨P(U + H(y))⟩ (B, 2, 2) of images x (B, 1, n, n) (fibre where > ½, as the fine solver
        samples its fields), stretches U (B, 2, 2), fluctuations H (B, n, n, 2, 2)."""
        return self.phase_law(x, U[:, None, None] + H).mean((1, 2))

    def member_stress(self, k: int, x: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        R, U = polar(F)
        stretch = (U - torch.eye(2, dtype=F.dtype, device=F.device)) / self.e_ref
        features = torch.cat([self.encoder(x), stretch[:, 0, 0:1], stretch[:, 1, 1:2],
                              stretch[:, 0, 1:2]], 1)
        c = self.head(features) * self.mode_scale.to(F.dtype)
        return R @ self.cell_stress(x, U, torch.einsum("bk,kyxij->byxij", c,
                                                        self.basis.to(F.dtype)))

    def projection_error(self, x: torch.Tensor, F: torch.Tensor, F_fields: torch.Tensor,
                         P: torch.Tensor, modes: int | None = None) -> float:
        """Relative L2 error of P̄ (S, 2, 2) from the true micro fields (S, n, n, 2, 2) projected
        on the first ``modes`` modes (all: None; 0: the true fields themselves, the floor of
        the pixel sampling), x (S, 1, n, n) the samples' images, F (S, 2, 2) their loads."""
        H = self._reference_fluctuations(F.double(), F_fields.double())
        if modes != 0:
            B = self.basis[:modes].double().flatten(1)
            H = ((H.flatten(1) @ B.T) @ B).reshape(H.shape)
        R, U = polar(F.double())
        P = P.double()
        return float(torch.linalg.norm(R @ self.cell_stress(x.double(), U, H) - P)
                     / torch.linalg.norm(P))
