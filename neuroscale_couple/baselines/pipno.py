"""PIPNO-style baseline, after arXiv 2502.19543 ("High-fidelity multiphysics modelling for
rapid predictions using physics-informed parallel neural operator", PIPNO): a neural operator
whose kernel integration runs as parallel branches (an ensemble inside one operator), trained
on the governing equations alone (data-free).

Here (a re-implementation for the periodic cell; what the paper does for other PDEs is assumed
to carry over):

- operator: images (B, 1, n, n) with (F̄ − I)/e_ref as four constant channels → lifting →
  ``branches`` parallel stacks of Fourier layers, averaged → the periodic fluctuation w(y)
  (B, 2, n, n), cell lengths (:class:`ParallelFourierNet`);
- F(y) = F̄ + ∇w (spectral gradient: ⟨F(y)⟩ = F̄ exactly), P(y) by the exact phase law pixel by
  pixel (:class:`~neuroscale_couple.baselines.base.PhaseLaw`), P̄ = ⟨P(y)⟩;
- loss: ``physics_weight`` · the equilibrium residual ‖Div P(y)‖²_{H⁻¹}/σ_ref²
  (:func:`~neuroscale_couple.physics.equilibrium_loss`) + ``data_weight`` · the data terms of
  the other baselines (P̄ and A). ``data_weight=0`` is the paper's data-free training (the data
  then give only the scales e_ref, σ_ref and the validation).
"""

from __future__ import annotations

import torch
from torch import nn

from neuroscale_couple.baselines.base import Baseline, PhaseLaw, image_and_load
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.spectral import FourierBlock
from neuroscale_couple.physics import equilibrium_loss, micro_deformation
from neuroscale_couple.training import TrainingData


class ParallelFourierNet(nn.Module):
    """(B, ``in_channels``, n, n) → (B, ``out_channels``, n, n): 1×1 lifting to ``width``
    channels, ``branches`` parallel stacks of ``layers`` Fourier blocks (``modes`` modes per
    axis) averaged, 1×1 projection (one branch: a plain FNO)."""

    def __init__(self, in_channels: int, out_channels: int, *, width: int, modes: int,
                 layers: int, branches: int) -> None:
        super().__init__()
        if min(width, modes, layers, branches) < 1:
            raise InputError(f"width={width}, modes={modes}, layers={layers}, "
                             f"branches={branches}: give positive integers")
        self.lift = nn.Conv2d(in_channels, width, 1)
        self.branches = nn.ModuleList(
            nn.Sequential(*(FourierBlock(width, modes, activation=i < layers - 1)
                            for i in range(layers)))
            for _ in range(branches))
        self.project = nn.Sequential(nn.Conv2d(width, 2 * width, 1), nn.GELU(),
                                     nn.Conv2d(2 * width, out_channels, 1))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        h = self.lift(v)
        return self.project(torch.stack([branch(h) for branch in self.branches]).mean(0))


class PIPNOStyle(Baseline):
    """Physics-informed parallel Fourier operator of the fluctuation field (see the module
    docstring); phases and law from ``material`` (a generate config)."""

    name = "PIPNO-style"

    def __init__(self, material: dict, *, width: int = 16, modes: int = 8, layers: int = 3,
                 branches: int = 3, physics_weight: float = 1.0,
                 data_weight: float = 1.0) -> None:
        super().__init__(members=1)
        if physics_weight < 0 or data_weight < 0 or physics_weight + data_weight == 0:
            raise InputError(f"physics_weight={physics_weight}, data_weight={data_weight}: "
                             "give weights ≥ 0, not both 0")
        self.physics_weight, self.data_weight = physics_weight, data_weight
        self.phase_law = PhaseLaw(material)
        self.net = ParallelFourierNet(5, 2, width=width, modes=modes, layers=layers,
                                      branches=branches)

    def micro_fields(self, x: torch.Tensor, F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F(y) and P(y) (B, n, n, 2, 2) of images x (B, 1, n, n) at loads F̄ (B, 2, 2)."""
        w = self.net(image_and_load(x, F, self.e_ref)) * self.e_ref
        F_field = micro_deformation(F, w)
        return F_field, self.phase_law(x, F_field)

    def member_stress(self, k: int, x: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        return self.micro_fields(x, F)[1].mean((1, 2))

    def _loss(self, data: TrainingData, idx: torch.Tensor, tangent_weight: float
              ) -> torch.Tensor:
        """``physics_weight`` · equilibrium + ``data_weight`` · data terms, on one forward pass."""
        x = data.images[data.micro_index[idx]]
        if self.data_weight == 0:
            return self.physics_weight * equilibrium_loss(self.micro_fields(x, data.F[idx])[1],
                                                          self.sigma_ref)
        fields: list[torch.Tensor] = []

        def stress(G: torch.Tensor) -> torch.Tensor:  # one member: G (1, B, 2, 2)
            fields.append(self.micro_fields(x, G[0])[1])
            return fields[-1].mean((1, 2))[None]

        data_terms = self._data_loss(stress, data.F[idx], data.P[idx], data.A[idx],
                                     tangent_weight)
        return (self.data_weight * data_terms
                + self.physics_weight * equilibrium_loss(fields[0], self.sigma_ref))
