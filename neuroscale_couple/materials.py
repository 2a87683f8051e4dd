"""Isotropic phase materials and the names of the micro constitutive laws.

Moduli are in any consistent unit (the stress comes out in the same unit). Laws:

- ``linear``: small-strain isotropic elasticity, P = λ tr(ε) I + 2 μ ε with ε = sym(F − I);
- ``neo_hookean``: compressible Neo-Hookean of the DOLFINx hyperelasticity demo in plane strain,
  ψ = μ/2 (I₁ − 3) − μ ln J + λ/2 (ln J)², I₁ = tr C + 1, J = det F.
"""

from __future__ import annotations

from dataclasses import dataclass

from neuroscale_couple.errors import InputError

LAWS = ("linear", "neo_hookean")
DEFAULT_LAW = "neo_hookean"


@dataclass(frozen=True)
class Phase:
    """Isotropic elastic phase with Young's modulus E > 0 and Poisson ratio −1 < ν < 0.5."""

    E: float
    nu: float

    def __post_init__(self) -> None:
        if not self.E > 0:
            raise InputError(f"Young's modulus E={self.E}: must be positive")
        if not -1.0 < self.nu < 0.5:
            raise InputError(
                f"Poisson ratio nu={self.nu}: must lie in (-1, 0.5); 0.5 (incompressible) needs a "
                "mixed formulation, which the RVE solver does not provide"
            )

    @property
    def lame(self) -> tuple[float, float]:
        """Lamé constants (λ, μ) in the unit of E."""
        return lame(self.E, self.nu)

    @classmethod
    def from_config(cls, cfg: dict, name: str) -> Phase:
        """Build from ``{E: ..., nu: ...}``; ``name`` (``matrix``/``fibre``) is used in errors."""
        from neuroscale_couple.config import check_keys

        if isinstance(cfg, dict):
            check_keys(cfg, ("E", "nu"), name)
        if not isinstance(cfg, dict) or "E" not in cfg or "nu" not in cfg:
            raise InputError(f"{name} must be a mapping with keys E and nu, got {cfg!r}")
        try:
            return cls(float(cfg["E"]), float(cfg["nu"]))
        except InputError as err:
            raise InputError(f"{name}: {err}") from None


def lame(E, nu):
    """Lamé constants (λ, μ) of Young's modulus E and Poisson ratio ν (numbers or arrays of
    one shape; unit of E)."""
    return E * nu / ((1 + nu) * (1 - 2 * nu)), E / (2 * (1 + nu))


#: Phases of the composite family of the FE² example (consistent units).
EPOXY_LIKE_MATRIX = Phase(3.0, 0.35)
GLASS_LIKE_FIBRE = Phase(70.0, 0.2)


def check_law(law: str) -> str:
    """Return ``law`` if it names a known micro law, else raise a clear :class:`InputError`."""
    if law not in LAWS:
        raise InputError(f"law={law!r} is unknown: use one of {', '.join(LAWS)}")
    return law


@dataclass(frozen=True)
class TwoPhaseMaterial:
    """The material of a two-phase cell: one ``law`` for both phases, the ``matrix`` (phase 1)
    and ``fibre`` (phase 2) moduli. The defaults, here and nowhere else, are the composite of
    the FE² example: Neo-Hookean, epoxy-like matrix (E 3.0, ν 0.35), glass-like fibres
    (E 70.0, ν 0.2)."""

    law: str = DEFAULT_LAW
    matrix: Phase = EPOXY_LIKE_MATRIX
    fibre: Phase = GLASS_LIKE_FIBRE

    def __post_init__(self) -> None:
        check_law(self.law)

    @classmethod
    def from_config(cls, cfg: dict) -> TwoPhaseMaterial:
        """From the ``law``, ``matrix: {E, nu}`` and ``fibre: {E, nu}`` keys of a config mapping
        (other keys are ignored; absent ones take the defaults)."""
        given = {name: Phase.from_config(cfg[name], name) for name in ("matrix", "fibre")
                 if name in cfg}
        if "law" in cfg:
            given["law"] = cfg["law"]
        return cls(**given)
