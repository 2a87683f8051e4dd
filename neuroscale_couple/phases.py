"""Phase properties drawn over ranges: the data and the inputs of a family operator.

A generate config of two-phase cells may give a phase constant as a range instead of a number;
each cell then draws its own phases, stored with it, and the operator trained on the data takes
them as inputs (a *family* operator, :class:`~neuroscale_couple.operators.sano.SANO` with
``phase_ranges``)::

    matrix: {E: 3.0, nu: [0.2, 0.45]}             # E: a number or [low, high] (log-uniform)
    fibre: {E: {contrast: [1, 100]}, nu: [0.2, 0.45]}  # E_f = contrast · E_m (log-uniform)
    phase_seed: 0                                  # draws keyed on (phase_seed, cell index)

Stresses of a hyperelastic cell scale with its moduli: P̄(F̄; λE_m, λE_f) = λ P̄(F̄; E_m, E_f).
A family operator therefore learns P̄/E_m as a function of the scale-free descriptors
(contrast E_f/E_m, ν_m, ν_f) — :data:`DESCRIPTORS` — and the geometry, and multiplies back by
the run's E_m: any matrix modulus is inside its range, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from neuroscale_couple.config import check_keys
from neuroscale_couple.errors import InputError
from neuroscale_couple.materials import Phase, TwoPhaseMaterial
from neuroscale_couple.sampling import rng_for

PHASE_ARRAYS = ("matrix_E", "matrix_nu", "fibre_E", "fibre_nu")
"""Per-cell arrays (M,) of a data set whose cells draw their phases."""
DESCRIPTORS = ("contrast", "matrix_nu", "fibre_nu")
"""The scale-free phase descriptors a family operator takes (contrast = E_f/E_m)."""
PHASE_KEYS = ("matrix", "fibre", "phase_seed")
"""Generate-config keys of the phases: data sets of one family operator may differ in them
(one material, or ranges inside the operator's)."""
SLACK = 1e-9
"""Relative slack on the ranges (a trained value itself is inside)."""

Range = tuple[float, float]


def _range(spec: object, name: str, positive: bool = False) -> Range:
    """A number (a range of width 0) or ``[low, high]`` as (low, high)."""
    if isinstance(spec, list | tuple) and len(spec) == 2 and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in spec):
        lo, hi = float(spec[0]), float(spec[1])
    elif isinstance(spec, int | float) and not isinstance(spec, bool):
        lo = hi = float(spec)
    else:
        raise InputError(f"{name}={spec!r}: give a number or a range [low, high]")
    if not lo <= hi or (positive and not lo > 0):
        raise InputError(f"{name}={spec!r}: need low ≤ high" + (" and low > 0" if positive
                                                                 else ""))
    return lo, hi


@dataclass(frozen=True)
class PhaseRanges:
    """Ranges of the phase constants of a generate config: ``matrix_E`` (unit of stress),
    ``contrast`` E_f/E_m, ``matrix_nu``, ``fibre_nu``; ``seed`` of the draws."""

    matrix_E: Range
    contrast: Range
    matrix_nu: Range
    fibre_nu: Range
    seed: int = 0

    @classmethod
    def from_config(cls, config: dict) -> PhaseRanges | None:
        """The ranges of a generate config's ``matrix`` and ``fibre``, or None where every
        phase constant is a number (a fixed material: :class:`TwoPhaseMaterial` reads it)."""
        matrix, fibre = config.get("matrix", {}), config.get("fibre", {})
        drawn = any(isinstance(v, list | dict) for p in (matrix, fibre) if isinstance(p, dict)
                    for v in p.values())
        if not drawn:
            return None
        for cfg, name in ((matrix, "matrix"), (fibre, "fibre")):
            check_keys(cfg, ("E", "nu"), name)
            if set(cfg) != {"E", "nu"}:
                raise InputError(f"{name} must give E and nu, got {cfg!r}")
        E_m = _range(matrix["E"], "matrix.E", positive=True)
        if isinstance(fibre["E"], dict):
            check_keys(fibre["E"], ("contrast",), "fibre.E")
            contrast = _range(fibre["E"].get("contrast"), "fibre.E.contrast", positive=True)
        elif E_m[0] == E_m[1]:
            E_f = _range(fibre["E"], "fibre.E", positive=True)
            contrast = (E_f[0] / E_m[0], E_f[1] / E_m[0])
        else:
            raise InputError(f"fibre.E={fibre['E']!r} with a range of matrix.E: give the fibre "
                             "by its contrast, fibre: {E: {contrast: [low, high]}, nu: ...}")
        ranges = cls(E_m, contrast, _range(matrix["nu"], "matrix.nu"),
                     _range(fibre["nu"], "fibre.nu"), int(config.get("phase_seed", 0)))
        for nu, name in ((ranges.matrix_nu, "matrix.nu"), (ranges.fibre_nu, "fibre.nu")):
            for value in nu:
                try:
                    Phase(1.0, value)
                except InputError as err:
                    raise InputError(f"{name}: {err}") from None
        return ranges

    def draw(self, count: int) -> dict[str, np.ndarray]:
        """The phases of ``count`` cells, :data:`PHASE_ARRAYS` → (count,): moduli and contrast
        log-uniform, Poisson ratios uniform; cell m from the stream (``seed``, m)."""
        out = {k: np.empty(count) for k in PHASE_ARRAYS}
        for m in range(count):
            rng = rng_for(self.seed, m)
            E_m, c = (lo if lo == hi else math.exp(rng.uniform(math.log(lo), math.log(hi)))
                      for lo, hi in (self.matrix_E, self.contrast))
            out["matrix_E"][m], out["fibre_E"][m] = E_m, c * E_m
            out["matrix_nu"][m] = rng.uniform(*self.matrix_nu)
            out["fibre_nu"][m] = rng.uniform(*self.fibre_nu)
        return out

    def descriptor_ranges(self) -> dict[str, list[float]]:
        """:data:`DESCRIPTORS` → [low, high]: what a family operator is trained over."""
        return {k: list(getattr(self, k)) for k in DESCRIPTORS}


def cell_material(config: dict, phases: dict[str, np.ndarray], m: int) -> dict:
    """``config`` with cell ``m``'s drawn phases as ``matrix`` and ``fibre`` numbers (the
    material its fine solver is built with)."""
    return dict(config, matrix={"E": float(phases["matrix_E"][m]),
                                "nu": float(phases["matrix_nu"][m])},
                fibre={"E": float(phases["fibre_E"][m]), "nu": float(phases["fibre_nu"][m])})


def descriptors(phases: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:data:`DESCRIPTORS` → (M,) of stored phases :data:`PHASE_ARRAYS` (M,)."""
    E_m = np.asarray(phases["matrix_E"], dtype=float)
    return {"contrast": np.asarray(phases["fibre_E"], dtype=float) / E_m,
            "matrix_nu": np.asarray(phases["matrix_nu"], dtype=float),
            "fibre_nu": np.asarray(phases["fibre_nu"], dtype=float)}


def input_contrast(images) -> np.ndarray | None:
    """Each structure's contrast E_f/E_m (M,) from a family operator's inputs (M, C, n, …):
    channel 1 of the :data:`DESCRIPTORS` channels that
    :meth:`~neuroscale_couple.solvers.phase_cell.PhaseCell.operator_inputs` appends; None for
    inputs of one material (C = 1) or without images."""
    shape = tuple(images.shape)
    if len(shape) < 3 or shape[1] != 1 + len(DESCRIPTORS):
        return None
    return np.asarray(images[(slice(None), 1 + DESCRIPTORS.index("contrast"))
                             + (0,) * (len(shape) - 2)], dtype=float)


def material_arrays(material: TwoPhaseMaterial, count: int) -> dict[str, np.ndarray]:
    """:data:`PHASE_ARRAYS` of ``count`` cells that all have ``material``'s phases."""
    values = (material.matrix.E, material.matrix.nu, material.fibre.E, material.fibre.nu)
    return {k: np.full(count, v) for k, v in zip(PHASE_ARRAYS, values, strict=True)}


def in_range(value: float, bounds) -> bool:
    """Whether ``value`` lies in ``bounds`` [low, high], with a relative :data:`SLACK`."""
    lo, hi = bounds
    return lo - SLACK * abs(lo) <= value <= hi + SLACK * abs(hi)


def outside_reason(material: TwoPhaseMaterial, ranges: dict[str, list[float]]) -> str | None:
    """Why ``material``'s descriptors lie outside ``ranges`` (descriptor → [low, high]), or
    None where they are inside."""
    values = {k: float(v[0]) for k, v in descriptors(material_arrays(material, 1)).items()}
    for key, (lo, hi) in ranges.items():
        if not in_range(values[key], (lo, hi)):
            return f"{key} {values[key]:.4g} outside the trained [{lo:.4g}, {hi:.4g}]"
    return None
