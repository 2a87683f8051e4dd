"""ASE adapters: the trained operator as an ASE calculator, and any ASE calculator as a fine solver.

:class:`OperatorCalculator` makes the Coupler a bulk constitutive model for ASE workflows: an
``Atoms`` object stands for a homogeneously deformed piece of crystal; its cell, compared with the
reference cell, gives F̄ (cell = reference cell · F̄ᵀ, ASE's row-vector cells), and the calculator
returns the energy V₀ W̄(F̄), the Cauchy stress σ = P̄ F̄ᵀ / J, zero forces (a homogeneous
deformation has none), and in ``calc.results`` the calibrated ``uncertainty`` and the ``source``
(operator or fine) of the answer. The operators are plane strain: F̄ must keep the z axis
(F₁₃ = F₂₃ = F₃₁ = F₃₂ = 0, F₃₃ = 1), and the out-of-plane stresses σ_zz, σ_yz, σ_xz, which a
plane-strain model does not know, are NaN.

    calc = OperatorCalculator(coupler, reference=bulk("Cu", cubic=True).repeat(2), structure=c)
    atoms.calc = calc;  atoms.get_stress();  calc.results["uncertainty"]

:func:`as_fine_solver` wraps any ASE calculator (with its reference cell) as a NeuroScale
fine solver, the Cauchy–Born crystal of :mod:`neuroscale_couple.solvers.cauchy_born`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes

from neuroscale_couple.errors import InputError


class OperatorCalculator(Calculator):
    """An ASE calculator answered by a :class:`~neuroscale_couple.coupler.Coupler`.

    Parameters
    ----------
    coupler : the Coupler (its communicator should be ``MPI.COMM_SELF`` unless every rank
        calls the calculator together: :meth:`Coupler.evaluate` is collective).
    reference : the undeformed cell (only its cell and volume are used).
    structure : the fine-scale structure of the material (e.g. a
        :class:`~neuroscale_couple.solvers.cauchy_born.Crystal`).
    point_id : the id under which the Coupler registers this material point.
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, coupler, reference: Atoms, structure, point_id: int = 0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if reference.cell.rank != 3:
            raise InputError("reference must have a full 3D cell (three cell vectors)")
        self.coupler, self.point_id = coupler, int(point_id)
        self.reference_cell = reference.cell.array.copy()
        self.reference_volume = float(reference.get_volume())
        coupler.register([self.point_id], [structure])

    def deformation_gradient(self, atoms: Atoms) -> np.ndarray:
        """F̄ (3, 3) of ``atoms``' cell relative to the reference cell."""
        return np.linalg.solve(self.reference_cell, atoms.cell.array).T

    def calculate(self, atoms: Atoms | None = None, properties=("energy",),
                  system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        F = self.deformation_gradient(self.atoms)
        if not (np.allclose(F[:2, 2], 0, atol=1e-12) and np.allclose(F[2, :2], 0, atol=1e-12)
                and abs(F[2, 2] - 1) < 1e-12):
            raise InputError(f"the cell's deformation F = {np.round(F, 6).tolist()} is not plane "
                             "strain: the operator is a plane-strain model; keep the cell's z "
                             "vector as in the reference")
        r = self.coupler.evaluate(F[None, :2, :2], [self.point_id])
        sigma = np.full((3, 3), np.nan)  # plane strain: σ = P̄F̄ᵀ/J in the plane only
        sigma[:2, :2] = r.stress[0] @ F[:2, :2].T / np.linalg.det(F)
        energy = float(r.energy[0]) * self.reference_volume * units.GPa
        self.results = {"energy": energy, "free_energy": energy,
                        "forces": np.zeros((len(self.atoms), 3)),
                        "stress": sigma.flat[[0, 4, 8, 5, 2, 1]] * units.GPa,
                        "uncertainty": float(r.uncertainty[0]), "source": int(r.source[0]),
                        "deformation_gradient": F}


def as_fine_solver(atoms: Atoms, calculator=None, **options):
    """A NeuroScale fine solver (:class:`~neuroscale_couple.solvers.cauchy_born.CauchyBorn`) of
    the reference cell ``atoms`` with ``calculator`` (default: the one attached to ``atoms``);
    ``options`` as for CauchyBorn (relax, temperature, ...)."""
    from neuroscale_couple.solvers.cauchy_born import CauchyBorn

    cell = atoms.copy()
    cell.calc = calculator if calculator is not None else atoms.calc
    return CauchyBorn(cell, **options)
