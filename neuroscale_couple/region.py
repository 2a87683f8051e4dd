"""The training region of an operator: where its calibrated bound was earned.

Split conformal calibration makes the bound hold over the distribution of the training data;
outside it the bound is a guess (measured: at |F̄ − I| = 0.8 in compression, against 0.3
trained, the bound stayed at 4 % where the true error was 10 %). A model card therefore records
its :class:`TrainingRegion`, computed from its training data:

- loads: the largest right-stretch distance ‖U − I‖ (Frobenius; F̄ = RU, so rigid rotations,
  which the objective operators handle exactly, do not count) and the smallest det F̄;
- structures: the kinds trained and, per kind, the range of each descriptor the family names in
  its ``descriptor_keys`` (a fibre cell's ``volume_fraction`` and ``n_fibres``, a crystal's
  ``temperature``).

- phases: for cells that drew their phases, the range of each scale-free phase descriptor
  (contrast E_f/E_m, ν_m, ν_f; :mod:`neuroscale_couple.phases`). A run has one material, which
  the operator's ``check_family`` checks against the ranges its config states; a fixed-material
  model refuses any other phases.
The Coupler asks :meth:`TrainingRegion.outside` at every evaluation and applies the policy's
``outside`` rule (:class:`~neuroscale_couple.coupler.Policy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from neuroscale_couple.errors import InputError
from neuroscale_couple.phases import PHASE_ARRAYS, descriptors, in_range
from neuroscale_couple.structures import family
from neuroscale_couple.tensors import determinant

SLACK = 1e-9
"""Relative slack on the region's bounds (a training sample itself is inside)."""


def stretch_distance(F: np.ndarray) -> np.ndarray:
    """‖U − I‖_F of each F̄ (n, d, d), U = √(F̄ᵀF̄) the right stretch: (n,)."""
    F = np.asarray(F, dtype=float)
    if F.shape[1] == 2:  # closed form, ~10× faster than a batched eigvalsh
        F00, F01, F10, F11 = F[:, 0, 0], F[:, 0, 1], F[:, 1, 0], F[:, 1, 1]
        C00, C11, C01 = F00 * F00 + F10 * F10, F01 * F01 + F11 * F11, F00 * F01 + F10 * F11
        mean = 0.5 * (C00 + C11)
        radius = np.hypot(0.5 * (C00 - C11), C01)
        eigenvalues = np.stack([mean - radius, mean + radius], axis=1)
    else:
        eigenvalues = np.linalg.eigvalsh(np.einsum("nki,nkj->nij", F, F))
    stretches = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return np.linalg.norm(stretches - 1.0, axis=1)


def _widen(ranges: dict[str, tuple[float, float]], other: dict[str, tuple[float, float]]
           ) -> dict[str, tuple[float, float]]:
    """Key → (low, high) covering both ``ranges`` and ``other``."""
    out = dict(ranges)
    for key, (lo, hi) in other.items():
        a, b = out.get(key, (lo, hi))
        out[key] = (min(a, lo), max(b, hi))
    return out


def descriptor_keys(cls: type) -> tuple[str, ...]:
    """The descriptors a structure family names (none if it names none)."""
    return tuple(getattr(cls, "descriptor_keys", ()))


@dataclass(frozen=True)
class TrainingRegion:
    """Loads and structures a model was trained on (see the module docstring).

    ``stretch``: largest ‖U − I‖ of the training loads; ``min_det``: smallest det F̄;
    ``structures``: kind → descriptor → (low, high); ``phases``: phase descriptor → (low, high)
    (empty for one material)."""

    stretch: float
    min_det: float
    structures: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def from_data(cls, F: np.ndarray, kinds: Sequence[str], micro: dict[str, np.ndarray]
                  ) -> TrainingRegion:
        """The region of training loads ``F`` (S, d, d) and of M structures of the kinds
        ``kinds`` (M,) with stored arrays ``micro`` (M, ...)."""
        if not len(F):
            raise InputError("no training loads: the region of an empty data set is undefined")
        kinds = np.array([k.decode() if isinstance(k, bytes) else str(k) for k in kinds])
        structures = {}
        for kind in dict.fromkeys(kinds.tolist()):
            mine = kinds == kind
            structures[kind] = {key: (float(np.min(micro[key][mine])),
                                      float(np.max(micro[key][mine])))
                                for key in descriptor_keys(family(kind)) if key in micro}
        phases = ({k: (float(v.min()), float(v.max())) for k, v in descriptors(micro).items()}
                  if all(k in micro for k in PHASE_ARRAYS) else {})
        F = np.asarray(F, dtype=float)
        return cls(float(stretch_distance(F).max()), float(determinant(F).min()), structures,
                   phases)

    @classmethod
    def from_config(cls, config: dict) -> TrainingRegion:
        """The region of the data set a generate config makes (drawn as `neuroscale generate`
        draws it, without solving): for models whose data sets are not at hand."""
        from neuroscale_couple.datagen import plan, structure_materials

        structures, F = plan(config)
        keys = {key for s in structures for key in descriptor_keys(type(s))}
        micro = {key: np.array([getattr(s, key, np.nan) for s in structures]) for key in keys}
        micro.update(structure_materials(config, structures)[0])  # drawn phases, if any
        return cls.from_data(F, [s.kind for s in structures], micro)

    def union(self, other: TrainingRegion) -> TrainingRegion:
        """The region of two data sets trained together."""
        structures = {k: dict(v) for k, v in self.structures.items()}
        for kind, ranges in other.structures.items():
            structures[kind] = _widen(structures.get(kind, {}), ranges)
        return TrainingRegion(max(self.stretch, other.stretch), min(self.min_det, other.min_det),
                              structures, _widen(self.phases, other.phases))

    def to_dict(self) -> dict:
        out = {"stretch": self.stretch, "min_det": self.min_det,
               "structures": {k: {d: list(r) for d, r in v.items()}
                              for k, v in self.structures.items()}}
        if self.phases:  # a fixed-material card keeps its earlier form (and digest)
            out["phases"] = {k: list(r) for k, r in self.phases.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> TrainingRegion:
        try:
            return cls(float(d["stretch"]), float(d["min_det"]),
                       {k: {key: (float(r[0]), float(r[1])) for key, r in v.items()}
                        for k, v in d.get("structures", {}).items()},
                       {k: (float(r[0]), float(r[1])) for k, r in d.get("phases", {}).items()})
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise InputError(f"the model card's region {d!r} is malformed ({err}): re-save the "
                             "model with scripts/model_region.py") from None

    def structure_reason(self, structure) -> str | None:
        """Why ``structure`` is outside the region (None: inside)."""
        ranges = self.structures.get(structure.kind)
        if ranges is None:
            return (f"kind {structure.kind!r} was not trained (trained: "
                    f"{', '.join(sorted(self.structures))})")
        for key, (lo, hi) in ranges.items():
            value = float(getattr(structure, key))
            if not in_range(value, (lo, hi)):
                return f"{key} {value:.4g} outside the trained [{lo:.4g}, {hi:.4g}]"
        return None

    def load_outside(self, F: np.ndarray) -> np.ndarray:
        """Which of the loads F̄ (n, d, d) lie outside the trained loads: (n,) bool."""
        F = np.asarray(F, dtype=float)
        if not len(F):
            return np.zeros(0, dtype=bool)
        return ((stretch_distance(F) > self.stretch * (1 + SLACK))
                | (determinant(F) < self.min_det * (1 - SLACK)))

    def load_reason(self, F: np.ndarray) -> str:
        """Why the load F̄ (d, d) is outside (for messages)."""
        d, J = float(stretch_distance(F[None])[0]), float(np.linalg.det(F))
        return (f"‖U − I‖ = {d:.3g} (trained ≤ {self.stretch:.3g}), det F̄ = {J:.3g} "
                f"(trained ≥ {self.min_det:.3g})")
