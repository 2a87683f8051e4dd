"""The fine-solver contract: what the true solvers, the operator and the Coupler all provide.

Like an ASE calculator, a :class:`FineSolver` declares what it computes in
``implemented_properties`` and answers one call, :meth:`FineSolver.solve`, for a batch of macro
states. A host never branches on which kind of fine solver it holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class MicroResult:
    """Homogenized response of a batch of n micro problems.

    Attributes
    ----------
    stress : (n, 2, 2) first Piola–Kirchhoff stress P̄, float64.
    tangent : (n, 2, 2, 2, 2) consistent tangent ∂P̄/∂F̄, or None when not asked for.
    fields : micro fields sampled on a regular r×r grid of the unit cell, each (n, r, r, ...),
        e.g. ``w`` (n, r, r, 2) fluctuation, ``F`` and ``P`` (n, r, r, 2, 2); None if not asked for.
    info : per-point solver information, each array of length n (``newton_iterations``,
        ``substeps``, ``time_s``, ...).
    """

    stress: np.ndarray
    tangent: np.ndarray | None = None
    fields: dict[str, np.ndarray] | None = None
    info: dict[str, np.ndarray] = field(default_factory=dict)


class FineSolver(ABC):
    """A solver mapping macro deformation gradients F̄ to homogenized stress and tangent."""

    implemented_properties: tuple[str, ...] = ("stress", "tangent")

    @abstractmethod
    def solve(
        self,
        F: np.ndarray,
        *,
        point_ids: Sequence[Hashable] | None = None,
        tangent: bool = True,
        fields_resolution: int | None = None,
    ) -> MicroResult:
        """Solve the micro problem for each F̄ in a batch.

        Parameters
        ----------
        F : (2, 2) or (n, 2, 2) macro deformation gradients.
        point_ids : one key per F̄ (e.g. a quadrature point); a solver may warm-start a point from
            its last converged state under the same key.
        tangent : whether to compute the consistent tangent.
        fields_resolution : if given, sample micro fields on an r×r grid.
        """
