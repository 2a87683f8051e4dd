"""Descriptor MLP baseline: a deep ensemble of MLPs on a few numbers per cell and the load.

Descriptors of a fibre cell (:func:`descriptors`): fibre fraction, fibre count, and the phase
properties E_m, ν_m, E_f, ν_f; the MLP sees them standardised with the four components of
(F̄ − I)/e_ref and returns P̄/σ_ref; the members' spread is its uncertainty.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from neuroscale_couple.baselines.base import Baseline
from neuroscale_couple.materials import TwoPhaseMaterial
from neuroscale_couple.training import TrainingData

DESCRIPTORS = ("fibre_fraction", "fibre_count", "E_matrix", "nu_matrix", "E_fibre", "nu_fibre")


def descriptors(micro: dict[str, np.ndarray], config: dict) -> np.ndarray:
    """The :data:`DESCRIPTORS` (M, 6) of M fibre cells: ``micro`` the stored arrays
    (``volume_fraction`` (M,), ``n_fibres`` (M,)), ``config`` the generate config (its phases;
    defaults of :class:`~neuroscale_couple.materials.TwoPhaseMaterial` where absent)."""
    m = TwoPhaseMaterial.from_config(config)
    phases = np.array([m.matrix.E, m.matrix.nu, m.fibre.E, m.fibre.nu], dtype=float)
    count = len(micro["volume_fraction"])
    return np.column_stack([np.asarray(micro["volume_fraction"], dtype=float),
                            np.asarray(micro["n_fibres"], dtype=float),
                            np.broadcast_to(phases, (count, 4))])


class DescriptorMLP(Baseline):
    """Ensemble of ``members`` MLPs (``depth`` hidden layers of ``hidden`` SiLU units) on
    (descriptors, F̄) → P̄."""

    name = "MLP on descriptors"

    def __init__(self, *, members: int = 4, hidden: int = 128, depth: int = 3) -> None:
        super().__init__(members=members)
        n_in = len(DESCRIPTORS) + 4
        self.register_buffer("x_mean", torch.zeros(len(DESCRIPTORS)))
        self.register_buffer("x_std", torch.ones(len(DESCRIPTORS)))

        def mlp() -> nn.Sequential:
            layers: list[nn.Module] = []
            for i in range(depth):
                layers += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.SiLU()]
            return nn.Sequential(*layers, nn.Linear(hidden, 4))

        self.nets = nn.ModuleList(mlp() for _ in range(members))

    @staticmethod
    def structure_inputs(data: TrainingData, micro: dict[str, np.ndarray]) -> torch.Tensor:
        return torch.as_tensor(descriptors(micro, data.config), dtype=data.F.dtype)

    def set_descriptor_scales(self, x: torch.Tensor) -> None:
        """Standardise descriptors by their mean and spread over ``x`` (M, 6) (constant ones,
        such as the phases of a one-material data set, by 1)."""
        self.x_mean.copy_(x.mean(0))
        std = x.std(0) if len(x) > 1 else torch.ones_like(self.x_std)
        self.x_std.copy_(torch.where(std > 1e-12, std, torch.ones_like(std)))

    def fit(self, data: TrainingData, validation: TrainingData, **kw) -> dict:
        self.set_descriptor_scales(data.images[torch.unique(data.micro_index)])
        return super().fit(data, validation, **kw)

    def member_stress(self, k: int, x: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(2, dtype=F.dtype, device=F.device)
        features = torch.cat([(x - self.x_mean) / self.x_std,
                              ((F - eye) / self.e_ref).flatten(1)], 1)
        return self.nets[k](features).unflatten(-1, (2, 2)) * self.sigma_ref
