"""The small contract of the baseline models, and the one training loop they share.

A baseline maps per-structure inputs x (M, ...) (cell images or descriptors, made by its
:meth:`Baseline.structure_inputs`; a data set for it holds them as its ``images``) and macro
loads F̄ (B, 2, 2) to the homogenised first
Piola–Kirchhoff stress P̄ (members, B, 2, 2), stress units. The tangent A = ∂P̄/∂F̄
(B, 2, 2, 2, 2) is taken by automatic differentiation (:func:`stress_and_tangent`); an ensemble
(members > 1) also gives the member covariance of P̄ as its uncertainty.

Training (:meth:`Baseline.fit`) uses the loss of the operator's training
(:mod:`neuroscale_couple.training`) restricted to its data terms: stress ⟨‖P̄_m − P̄‖²⟩/σ_ref²
plus ``tangent_weight`` · ⟨‖A_m − A‖²⟩/A_ref², every member (models with physics terms add
them in :meth:`Baseline._loss`), Adam with the operator's cosine schedule
(:func:`~neuroscale_couple.training.set_cosine_lr`: annealed over the larger of the epochs' and
the budget's fraction, so a budget that ends the training first ends its cosine too), the
validation error checked each epoch (best weights kept), and a compute budget in seconds of a
clock (CPU seconds of the process by default) checked after every batch and validation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from abc import abstractmethod
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from neuroscale_couple.errors import InputError
from neuroscale_couple.materials import TwoPhaseMaterial, lame
from neuroscale_couple.operators.base import autograd_tangent
from neuroscale_couple.physics import micro_stress
from neuroscale_couple.training import TrainingData, set_cosine_lr

COV_FLOOR = 1e-3
"""Added to an ensemble's member standard deviations, relative to σ_ref."""


def stress_and_tangent(stress: Callable[[torch.Tensor], torch.Tensor], F: torch.Tensor, *,
                       create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """P = stress(F) and A_iJkL = ∂P_iJ/∂F_kL (..., 2, 2, 2, 2) by autograd, for F (..., 2, 2)
    and a ``stress`` that maps each load of F on its own (P of F's shape); ``create_graph``
    keeps A differentiable (for a tangent loss)."""
    with torch.enable_grad():
        F = F.detach().requires_grad_(True)
        P = stress(F)
        A = autograd_tangent(P, F, create_graph=create_graph)
    return (P, A) if create_graph else (P.detach(), A.detach())


def image_and_load(x: torch.Tensor, F: torch.Tensor, e_ref: torch.Tensor) -> torch.Tensor:
    """Input (B, C + 4, n, n) of a field network: images x (B, C, n, n) and the four components
    of (F̄ − I)/e_ref (F̄ (B, 2, 2), e_ref in strain units) as channels constant over the cell."""
    eye = torch.eye(2, dtype=F.dtype, device=F.device)
    load = ((F - eye) / e_ref).flatten(1)[:, :, None, None]
    return torch.cat([x, load.expand(-1, -1, *x.shape[-2:])], 1)


class PhaseLaw(nn.Module):
    """The exact law of the two phases of ``material`` (a generate config) pixel by pixel
    (:func:`~neuroscale_couple.physics.micro_stress`), fibre where the image is > ½ (as the
    fine solver samples its fields)."""

    def __init__(self, material: dict) -> None:
        super().__init__()
        m = TwoPhaseMaterial.from_config(material)
        self.law = m.law
        for key, phase in (("lame_matrix", m.matrix), ("lame_fibre", m.fibre)):
            self.register_buffer(key, torch.tensor(lame(phase.E, phase.nu)))

    def forward(self, x: torch.Tensor, F_field: torch.Tensor) -> torch.Tensor:
        """P(y) (B, n, n, 2, 2), stress units, of images x (B, 1, n, n) and micro deformation
        gradients F(y) (B, n, n, 2, 2)."""
        fibre = (x[:, 0] > 0.5).to(F_field.dtype)
        lm, mm = self.lame_matrix.to(F_field.dtype)
        lf, mf = self.lame_fibre.to(F_field.dtype)
        return micro_stress(F_field, fibre * lf + (1 - fibre) * lm,
                            fibre * mf + (1 - fibre) * mm, self.law)


class Baseline(nn.Module):
    """A baseline surrogate of the homogenised response (see the module docstring).

    Subclasses set ``name`` (how the bench reports it), implement :meth:`member_stress`, and
    override :meth:`structure_inputs` if they do not take the cell images.
    """

    name: ClassVar[str] = "baseline"

    def __init__(self, members: int = 1) -> None:
        super().__init__()
        if members < 1:
            raise InputError(f"members={members}: give at least 1")
        self.members = members
        for key in ("e_ref", "sigma_ref", "tangent_ref"):
            self.register_buffer(key, torch.ones(()))

    @staticmethod
    def structure_inputs(data: TrainingData, micro: dict[str, np.ndarray]) -> torch.Tensor:
        """Per-structure inputs (M, ...) of a data set: its cell images (M, 1, n, n);
        ``micro``: the stored ``micro/...`` arrays of :func:`~neuroscale_couple.store.
        load_rve_dataset` without the prefix (for models that take descriptors)."""
        return data.images

    def with_inputs(self, data: TrainingData, micro: dict[str, np.ndarray]) -> TrainingData:
        """``data`` with its ``images`` replaced by this model's structure inputs (see
        :meth:`structure_inputs`), in the dtype of the model's weights."""
        dtype = next(self.parameters()).dtype
        return dataclasses.replace(data.to(dtype),
                                   images=self.structure_inputs(data, micro).to(dtype))

    @abstractmethod
    def member_stress(self, k: int, x: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """Member ``k``'s P̄ (B, 2, 2), stress units, of inputs x (B, ...) and F̄ (B, 2, 2)."""

    def forward(self, x: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """P̄ of every member (members, B, 2, 2) for inputs x (B, ...) and F̄ (B, 2, 2), or
        (members, B, 2, 2): each member its own loads (for its own tangent)."""
        if F.dim() == 3:
            F = F.expand(self.members, *F.shape)
        return torch.stack([self.member_stress(k, x, F[k]) for k in range(self.members)])

    def members_stress_and_tangent(self, x: torch.Tensor, F: torch.Tensor, *,
                                   create_graph: bool = False
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's P̄ (members, B, 2, 2) and A (members, B, 2, 2, 2, 2) at F̄ (B, 2, 2)."""
        return stress_and_tangent(lambda G: self(x, G), F.expand(self.members, *F.shape).clone(),
                                  create_graph=create_graph)

    def set_normalisation(self, F: torch.Tensor, P: torch.Tensor, A: torch.Tensor) -> None:
        """Scales from training data: e_ref = rms |F̄ − I|, σ_ref = rms |P̄|, A_ref = rms |A|."""
        eye = torch.eye(2, dtype=F.dtype)
        for key, t in (("e_ref", F - eye), ("sigma_ref", P), ("tangent_ref", A)):
            rms = t.flatten(1).pow(2).sum(1).mean().sqrt()
            getattr(self, key).copy_(torch.clamp(rms, min=1e-12))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, F: torch.Tensor, batch: int = 64
                ) -> dict[str, torch.Tensor | None]:
        """``mean`` (B, 2, 2), ``cov`` (B, 4, 4) (member covariance + (``COV_FLOOR`` σ_ref)² I,
        positive definite with fewer than 5 members; None for one member) and
        ``tangent`` (B, 2, 2, 2, 2) of the member mean, for x (B, ...), F̄ (B, 2, 2)."""
        self.eval()
        means, covs, tangents = [], [], []
        for i in range(0, len(F), batch):
            xb, Fb = x[i:i + batch], F[i:i + batch]
            Pm, A = self.members_stress_and_tangent(xb, Fb)
            means.append(Pm.mean(0))
            tangents.append(A.mean(0))
            if self.members > 1:
                d = (Pm - Pm.mean(0)).flatten(-2)
                floor = (COV_FLOOR * self.sigma_ref.to(d.dtype)) ** 2 * torch.eye(4, dtype=d.dtype)
                covs.append(torch.einsum("mbi,mbj->bij", d, d) / (self.members - 1) + floor)
        return {"mean": torch.cat(means), "tangent": torch.cat(tangents),
                "cov": torch.cat(covs) if covs else None}

    def relative_errors(self, data: TrainingData) -> dict[str, float]:
        """Relative L2 errors of the member-mean P̄ and A over ``data`` (its ``images``: the
        structures' inputs)."""
        pred = self.predict(data.images[data.micro_index], data.F)
        return {"rel_l2_stress": float(torch.linalg.norm(pred["mean"] - data.P)
                                       / torch.linalg.norm(data.P)),
                "rel_l2_tangent": float(torch.linalg.norm(pred["tangent"] - data.A)
                                        / torch.linalg.norm(data.A))}

    def fit(self, data: TrainingData, validation: TrainingData, *,
            budget_s: float, epochs: int = 200, batch_size: int = 32, lr: float = 2e-3,
            lr_final: float = 1e-4, tangent_weight: float = 0.2, seed: int = 0,
            clock: Callable[[], float] = time.process_time) -> dict:
        """Train on ``data`` (its ``images``: the structures' inputs) for at most ``epochs``
        epochs or ``budget_s`` seconds of ``clock``
        (validation included); the weights of the best validated epoch are kept. Returns the
        history: ``val`` (per epoch), ``epochs``, ``best_epoch``, ``budget_spent``, ``steps``."""
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        self.set_normalisation(data.F, data.P, data.A)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        start = clock()
        history: dict = {"val": [], "epochs": 0, "best_epoch": -1, "budget_spent": False,
                         "steps": 0}
        best, best_state = math.inf, self._weights()

        def spent() -> bool:
            history["budget_spent"] = clock() - start >= budget_s
            return history["budget_spent"]

        for epoch in range(epochs):
            set_cosine_lr(opt, lr, lr_final,
                          max(epoch / epochs, (clock() - start) / budget_s if budget_s > 0 else 1))
            self.train()
            for idx in torch.randperm(len(data), generator=gen).split(batch_size):
                opt.zero_grad()
                self._loss(data, idx, tangent_weight).backward()
                opt.step()
                history["steps"] += 1
                if spent():
                    break
            if history["budget_spent"]:
                if not history["val"]:  # nothing validated yet: keep what was trained
                    best_state = self._weights()
                break
            val = self.relative_errors(validation)["rel_l2_stress"]
            history["val"].append(val)
            history["epochs"] = epoch + 1
            if val < best:
                best, best_state = val, self._weights()
                history["best_epoch"] = epoch
            if spent():
                break
        self.load_state_dict(best_state)
        return history

    def _weights(self) -> dict[str, torch.Tensor]:
        """A copy of the weights and buffers (without the ``_metadata`` entry some packages'
        modules add to their state dict, which ``load_state_dict`` would reject)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if isinstance(v, torch.Tensor)}

    def _loss(self, data: TrainingData, idx: torch.Tensor, tangent_weight: float
              ) -> torch.Tensor:
        """Loss of the batch ``idx`` (B,) of ``data``: here the data terms of
        :meth:`_data_loss`."""
        x = data.images[data.micro_index[idx]]
        return self._data_loss(lambda G: self(x, G), data.F[idx], data.P[idx], data.A[idx],
                               tangent_weight)

    def _data_loss(self, stress: Callable[[torch.Tensor], torch.Tensor], F: torch.Tensor,
                   P: torch.Tensor, A: torch.Tensor, tangent_weight: float) -> torch.Tensor:
        """Stress (+ tangent) loss, mean over members and samples, of ``stress``: the members'
        P̄ (members, B, 2, 2) at loads (members, B, 2, 2) (:meth:`forward` of the batch)."""
        Fm = F.expand(self.members, *F.shape)
        if tangent_weight > 0:
            Pm, Am = stress_and_tangent(stress, Fm.clone(), create_graph=True)
            tangent = ((Am - A) ** 2).sum((-1, -2, -3, -4)).mean() / self.tangent_ref**2
        else:
            Pm, tangent = stress(Fm), 0.0
        stress_term = ((Pm - P) ** 2).sum((-1, -2)).mean() / self.sigma_ref**2
        return stress_term + tangent_weight * tangent
