"""A slim encoder distilled from SANO: the same coarse-graining heads on a cheaper latent.

    image (B,1,n,n) → [3×3 conv, stride 2, circular padding → SiLU] × stages → mean over the cell
    → [features, fibre fraction] → MLP → z (B, latent)
    z, F̄ → the teacher's ensemble energy heads and covariance heads (copied, frozen in distillation)

SANO's encoder (Fourier layers, wavelets, cross-scale attention) is what its accuracy was trained
with; once trained, a few strided convolutions reproduce its latent closely at a fraction of the
cost (:mod:`neuroscale_couple.distillation` trains them against the teacher's outputs through the
same heads). The student predicts with the teacher's heads, normalisation and training region, so
everything downstream of the latent — prediction, calibration, online retraining of the heads —
is that of any operator. It has no fine-graining decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from neuroscale_couple.config import dataclass_from_dict
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.base import HEAD_PREFIXES, CoarseGrainingOperator
from neuroscale_couple.operators.sano import SANO, CellHeadsConfig


@dataclass(frozen=True)
class DistilledConfig(CellHeadsConfig):
    """Constructor arguments of :class:`DistilledSANO`: input ``resolution`` (pixels per side)
    and ``channels`` of its strided convolutions (one stage each, halving the resolution), and
    the teacher's :class:`~.sano.CellHeadsConfig`."""

    resolution: int = 32
    channels: tuple[int, ...] = (32, 64, 64, 64)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.channels or min(self.channels) < 1:
            raise InputError(f"channels={self.channels}: give one positive width per stage, "
                             "e.g. (32, 64, 64, 64)")
        if self.resolution % 2 ** len(self.channels):
            raise InputError(f"resolution={self.resolution} must be divisible by "
                             f"2**len(channels)={2 ** len(self.channels)}")

    @classmethod
    def from_dict(cls, d: dict) -> DistilledConfig:
        return dataclass_from_dict(cls, d, "the distilled model config")

    @classmethod
    def of_teacher(cls, teacher: SANO, channels: tuple[int, ...]) -> DistilledConfig:
        """The config of a student of ``teacher``: its resolution, heads and material (a 2D
        teacher: the student's convolutions are 2D)."""
        if teacher.config.dim != 2:
            raise InputError(f"the teacher is a {teacher.config.dim}D operator: distillation "
                             "makes 2D students only; use the 3D SANO itself")
        shared = {f.name: getattr(teacher.config, f.name) for f in fields(CellHeadsConfig)}
        return cls(resolution=teacher.config.resolution, channels=tuple(channels), **shared)


class DistilledSANO(CoarseGrainingOperator):
    """The distilled operator of fibre microstructures (see the module docstring); stresses in
    the unit of the phase moduli, F̄ dimensionless."""

    FORMAT = "neuroscale-distilled-sano/1"
    CONFIG = DistilledConfig

    def __init__(self, config: DistilledConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or DistilledConfig()
        stages: list[nn.Module] = []
        width = 1
        for out in c.channels:
            stages += [nn.Conv2d(width, out, 3, stride=2, padding=1, padding_mode="circular"),
                       nn.SiLU()]
            width = out
        self.convolutions = nn.Sequential(*stages)
        self.to_latent = nn.Sequential(nn.Linear(width + 1, c.latent), nn.SiLU(),
                                       nn.Linear(c.latent, c.latent))
        self._build_heads(c.members, c.latent, c.hidden, c.energy_correction,
                          quartic=c.quartic_basis, epistemic=c.epistemic,
                          covariance=c.covariance)
        self._build_buffers()

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Latent z (B, latent) of fibre-fraction images (B, 1, n, n); no feature map."""
        n = self.config.resolution
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[-1] != n:
            raise InputError(f"microstructure images have shape {tuple(images.shape)}: expected "
                             f"(B, 1, {n}, {n})")
        features = self.convolutions(images).mean(dim=(-2, -1))
        return self.to_latent(torch.cat([features, images.mean(dim=(-2, -1))], dim=-1)), None

    # the image inputs and the material check are those of the teacher's family
    input_resolution = SANO.input_resolution
    data_resolution = SANO.data_resolution
    check_family = SANO.check_family

    @classmethod
    def student_of(cls, teacher: SANO, channels: tuple[int, ...]) -> DistilledSANO:
        """A fresh student of ``teacher``: new convolutions, the teacher's heads, normalisation,
        data config (its images) and training region; the heads frozen."""
        student = cls(DistilledConfig.of_teacher(teacher, channels)).to(
            next(teacher.parameters()).dtype)
        heads = {k: v for k, v in teacher.state_dict().items()
                 if k.startswith(HEAD_PREFIXES) or k.endswith("_ref")}
        student.load_state_dict(heads, strict=False)
        student.card = {k: teacher.card[k] for k in ("data_config", "region")
                        if k in teacher.card}
        for name, p in student.named_parameters():
            p.requires_grad_(not name.startswith(HEAD_PREFIXES))
        return student
