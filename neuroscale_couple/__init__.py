"""NeuroScale: neural-operator coupling for multiscale (FE², HMM) simulation.

The core package imports numpy, h5py, mpi4py and (where the operator is used) torch, but never
DOLFINx or ASE; the true fine solvers live in :mod:`neuroscale_couple.solvers` and the host-code
glue in :mod:`neuroscale_couple.adapters`.
"""

from neuroscale_couple.errors import CheckpointError, InputError, NeuroScaleError, SolveError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "InputError", "NeuroScaleError", "SolveError", "__version__"]
