"""PPI-NO-style baseline, after Chen et al., arXiv 2502.02682 (pseudo-physics-informed neural
operators): where the physics is unknown, learn a local surrogate φ of the PDE from the few data
there are, then use it as a physics loss that trains the main operator also on inputs without
labels.

Here (a re-implementation for the periodic cell). The paper's φ maps the solution and its
derivatives to the input function (a source term); in the cell problem Div P(F̄ + ∇w; m) = 0
the input m is a coefficient and the source is zero, so φ here is the unknown local law:

- pseudo-physics φ (:attr:`PPINOStyle.pseudo_law`): a 3×3 circular convolution (the paper's
  neighbourhood-aware convolution) of the image m(y) and (F(y) − I)/e_ref → P(y)/σ_ref, learnt
  first from the data's micro fields w (``data.w``): ⟨φ(m, F̄ + ∇w)⟩ = P̄ and Div φ = 0;
- main operator G: a plain FNO (:class:`~neuroscale_couple.baselines.pipno.ParallelFourierNet`
  with one branch) of the image and (F̄ − I)/e_ref → w(y) (B, 2, n, n) and a stress field s(y),
  P̄ = σ_ref ⟨s(y)⟩; trained with φ frozen on the data terms of the other baselines, the field
  error ⟨|w − w_data|²⟩/e_ref², and ``pseudo_weight`` · the pseudo-physics of G's own fields at
  unlabelled loads (the batch's loads + ``unlabelled_strain`` · e_ref · N(0, 1)): the
  equilibrium residual of φ(m, F̄ + ∇w) and ‖⟨φ⟩ − P̄‖²/σ_ref².

One round of the paper's alternation (φ, then G), the first ``law_fraction`` of the budget
for φ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from neuroscale_couple.baselines.base import Baseline, image_and_load
from neuroscale_couple.baselines.pipno import ParallelFourierNet
from neuroscale_couple.errors import InputError
from neuroscale_couple.physics import equilibrium_loss, micro_deformation
from neuroscale_couple.training import TrainingData, set_cosine_lr


class PPINOStyle(Baseline):
    """FNO of w(y) and P̄ trained with a learnt pseudo-physics (see the module docstring)."""

    name = "PPI-NO-style"

    def __init__(self, *, width: int = 16, modes: int = 8, layers: int = 3,
                 law_width: int = 32, pseudo_weight: float = 1.0, law_fraction: float = 0.2,
                 law_epochs: int = 50, unlabelled_strain: float = 0.5) -> None:
        super().__init__(members=1)
        if not 0 < law_fraction < 1 or pseudo_weight < 0 or law_epochs < 1:
            raise InputError(f"law_fraction={law_fraction}, pseudo_weight={pseudo_weight}, "
                             f"law_epochs={law_epochs}: give 0 < law_fraction < 1, "
                             "pseudo_weight ≥ 0, law_epochs ≥ 1")
        self.pseudo_weight, self.law_fraction = pseudo_weight, law_fraction
        self.law_epochs, self.unlabelled_strain = law_epochs, unlabelled_strain
        self.net = ParallelFourierNet(5, 6, width=width, modes=modes, layers=layers, branches=1)
        self.pseudo_law = nn.Sequential(
            nn.Conv2d(5, law_width, 3, padding=1, padding_mode="circular"), nn.SiLU(),
            nn.Conv2d(law_width, law_width, 1), nn.SiLU(), nn.Conv2d(law_width, 4, 1))

    def fields(self, x: torch.Tensor, F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G's fluctuation w (B, 2, n, n), cell lengths, and P̄ (B, 2, 2), stress units, of
        images x (B, 1, n, n) at loads F̄ (B, 2, 2)."""
        out = self.net(image_and_load(x, F, self.e_ref))
        return (out[:, :2] * self.e_ref,
                out[:, 2:].mean((-1, -2)).unflatten(-1, (2, 2)) * self.sigma_ref)

    def member_stress(self, k: int, x: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        return self.fields(x, F)[1]

    def pseudo_stress(self, x: torch.Tensor, F: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """φ's P(y) (B, n, n, 2, 2), stress units, of images x (B, 1, n, n) and the field
        F(y) = F̄ + ∇w of loads F̄ (B, 2, 2) and fluctuations w (B, 2, n, n)."""
        F_field = micro_deformation(F, w)
        eye = torch.eye(2, dtype=F.dtype, device=F.device)
        strain = ((F_field - eye) / self.e_ref).flatten(-2).permute(0, 3, 1, 2)
        out = self.pseudo_law(torch.cat([x, strain], 1))
        return out.permute(0, 2, 3, 1).unflatten(-1, (2, 2)) * self.sigma_ref

    def pseudo_physics(self, x: torch.Tensor, F: torch.Tensor, w: torch.Tensor,
                       P: torch.Tensor) -> torch.Tensor:
        """Equilibrium residual of φ's field + ‖⟨φ⟩ − P̄‖²/σ_ref² (dimensionless) for fields w
        (B, 2, n, n) and P̄ (B, 2, 2) at loads F̄ (B, 2, 2)."""
        P_field = self.pseudo_stress(x, F, w)
        mismatch = ((P_field.mean((1, 2)) - P) ** 2).sum((-1, -2)).mean() / self.sigma_ref**2
        return equilibrium_loss(P_field, self.sigma_ref) + mismatch

    def fit(self, data: TrainingData, validation: TrainingData, *, budget_s: float,
            batch_size: int = 32, lr: float = 2e-3, lr_final: float = 1e-4, seed: int = 0,
            clock: Callable[[], float] = time.process_time, **kw) -> dict:
        """φ from ``data``'s micro fields for ``law_epochs`` epochs or the first
        ``law_fraction`` of ``budget_s``, then G (:meth:`Baseline.fit`, the rest of the
        budget); the history adds ``law_loss`` (φ's loss per epoch)."""
        if data.w is None or data.w.shape[-2:] != data.images.shape[-2:]:
            raise InputError("the PPI-NO-style model learns its pseudo-physics from micro "
                             "fields: give a data set with samples/fields/w at the images' "
                             f"resolution {tuple(data.images.shape[-2:])} (generate with "
                             "fields on, fields_resolution equal to the model's)")
        start = clock()
        self.set_normalisation(data.F, data.P, data.A)
        self.pseudo_law.requires_grad_(True)
        law_loss = self._fit_pseudo_law(data, self.law_fraction * budget_s, batch_size, lr,
                                        lr_final, seed, clock)
        self.pseudo_law.requires_grad_(False)
        history = super().fit(data, validation, budget_s=budget_s - (clock() - start),
                              batch_size=batch_size, lr=lr, lr_final=lr_final, seed=seed,
                              clock=clock, **kw)
        return {**history, "law_loss": law_loss}

    def _fit_pseudo_law(self, data: TrainingData, budget_s: float, batch_size: int, lr: float,
                        lr_final: float, seed: int, clock: Callable[[], float]) -> list[float]:
        """Train φ on the data's true fields; its mean loss per epoch."""
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.pseudo_law.parameters(), lr=lr)
        start, losses = clock(), []
        for epoch in range(self.law_epochs):
            elapsed = clock() - start
            if elapsed >= budget_s:
                break
            set_cosine_lr(opt, lr, lr_final, max(epoch / self.law_epochs, elapsed / budget_s))
            total = 0.0
            for idx in torch.randperm(len(data), generator=gen).split(batch_size):
                opt.zero_grad()
                x = data.images[data.micro_index[idx]]
                loss = self.pseudo_physics(x, data.F[idx], data.w[idx], data.P[idx])
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / len(data))
            if not math.isfinite(losses[-1]):
                raise InputError(f"the pseudo-physics loss is {losses[-1]} in epoch {epoch}: "
                                 "lower lr or check the data's fields for NaN")
        return losses

    def _loss(self, data: TrainingData, idx: torch.Tensor, tangent_weight: float
              ) -> torch.Tensor:
        """Data terms + field error + ``pseudo_weight`` · pseudo-physics at unlabelled loads."""
        x, F = data.images[data.micro_index[idx]], data.F[idx]
        fields: list[torch.Tensor] = []

        def stress(G: torch.Tensor) -> torch.Tensor:  # one member: G (1, B, 2, 2)
            w, P = self.fields(x, G[0])
            fields.append(w)
            return P[None]

        loss = self._data_loss(stress, F, data.P[idx], data.A[idx], tangent_weight)
        w = fields[0]
        error = w - data.w[idx]
        error = error - error.mean((-1, -2), keepdim=True)  # w is defined up to a constant
        loss = loss + error.pow(2).sum(1).mean() / self.e_ref**2
        if self.pseudo_weight > 0:
            F_u = F + self.unlabelled_strain * self.e_ref * torch.randn_like(F)
            w_u, P_u = self.fields(x, F_u)
            loss = loss + self.pseudo_weight * self.pseudo_physics(x, F_u, w_u, P_u)
        return loss
