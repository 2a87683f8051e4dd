"""The operator of a crystal (HMM with a Cauchy–Born fine solver): descriptor + F̄ → N(P̄, Σ), ∂P̄/∂F̄.

    descriptor (B, k) (e.g. temperature / 1000 K) → MLP → z (B, latent)
    z, F̄ → ensemble energy heads W̄_m → autograd → P̄_m, A_m;  covariance heads → Σ_m

A crystal has no microstructure image: what varies between quadrature points of one material is
its thermodynamic state, given by the structure's descriptor (:class:`~neuroscale_couple.solvers.
cauchy_born.Crystal`). The coarse-graining heads are those of every operator
(:class:`~neuroscale_couple.operators.base.CoarseGrainingOperator`), so the energy W̄ is objective
and P̄F̄ᵀ symmetric by construction; at finite temperature the covariance head learns the MD noise
of the training stresses (their aleatoric part).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from neuroscale_couple.config import dataclass_from_dict
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.base import CoarseGrainingOperator
from neuroscale_couple.operators.epistemic import EpistemicConfig

FAMILY_KEYS = ("element", "lattice", "a0", "supercell", "vacancies", "calculator")
A0_RTOL = 1e-6
"""Relative tolerance on the lattice constant a₀ in :meth:`CrystalOperator.check_family`: a₀ comes
from a relaxation (``equilibrium_lattice_constant``), reproducible to ~1e-8 across machines and
BLAS threads (2e-9 seen), while another crystal or calculator moves it by 1e-3 or more."""


@dataclass(frozen=True)
class CrystalConfig(EpistemicConfig):
    """Constructor arguments of :class:`CrystalOperator`; ``family`` is the JSON of the crystal
    config keys in ``FAMILY_KEYS`` the model was trained for; ``residual_stress`` lets the
    stress at F̄ = I depend on the descriptor (finite temperature: the thermal pressure of the
    cell held at its 0 K lattice constant); ``uncertainty``, ``samples``, ``dropout``: the
    heads' epistemic model (:class:`~.epistemic.EpistemicConfig`)."""

    n_features: int = 1
    latent: int = 16
    hidden: int = 64
    members: int = 4
    energy_correction: bool = True
    residual_stress: bool = False
    family: str = "{}"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_features < 1 or self.latent < 1 or self.hidden < 1 or self.members < 1:
            raise InputError(f"crystal operator sizes {self}: all must be ≥ 1")
        json.loads(self.family)

    @classmethod
    def from_dict(cls, d: dict) -> CrystalConfig:
        d = dict(d)
        if isinstance(d.get("family"), dict):
            d["family"] = family_json(d["family"])
        return dataclass_from_dict(cls, d, "the crystal model config")


def _same(key: str, trained, given) -> bool:
    """Whether the fine solver's value of a family key is the model's (a₀ to ``A0_RTOL``)."""
    if key == "a0" and all(isinstance(a, int | float) for a in (trained, given)):
        return abs(given - trained) <= A0_RTOL * abs(trained)
    return given == trained


def family_json(config: dict) -> str:
    """Canonical JSON of the material-defining keys of a crystal config."""
    return json.dumps({k: config[k] for k in FAMILY_KEYS if k in config}, sort_keys=True)


class CrystalOperator(CoarseGrainingOperator):
    """Energy-based probabilistic operator of one crystalline material; stresses in GPa."""

    FORMAT = "neuroscale-crystal/1"
    CONFIG = CrystalConfig

    def __init__(self, config: CrystalConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or CrystalConfig()
        self.to_latent = nn.Sequential(nn.Linear(c.n_features, c.latent), nn.SiLU(),
                                       nn.Linear(c.latent, c.latent))
        self._build_heads(c.members, c.latent, c.hidden, c.energy_correction, c.residual_stress,
                          epistemic=c.epistemic)
        self._build_buffers()

    def encode(self, inputs: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Latent z (B, latent) of descriptors (B, n_features); no feature map."""
        if inputs.ndim != 2 or inputs.shape[1] != self.config.n_features:
            raise InputError(f"crystal descriptors have shape {tuple(inputs.shape)}: expected "
                             f"(B, {self.config.n_features})")
        return self.to_latent(inputs), None

    def check_family(self, family: dict) -> None:
        """Raise :class:`InputError` unless the fine solver's crystal config agrees with the
        training crystal on every key of ``FAMILY_KEYS`` the model records (a₀ to
        :data:`A0_RTOL`)."""
        trained = json.loads(self.config.family)
        given = json.loads(family_json(family))
        bad = {k: (v, given.get(k)) for k, v in trained.items() if not _same(k, v, given.get(k))}
        if bad:
            detail = "; ".join(f"{k}: model {v!r}, solver {g!r}" for k, (v, g) in bad.items())
            raise InputError(f"the model was trained for another crystal ({detail}): use a "
                             "model trained for this crystal and calculator")
