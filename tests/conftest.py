"""Shared fixtures, MPI-safe: the files run serially and under ``mpiexec -n 2 pytest -m mpi``."""

from __future__ import annotations

import gc
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

from mpi4py import MPI

import pytest

HAS_DOLFINX = importlib.util.find_spec("dolfinx") is not None
BENCH = Path(__file__).resolve().parents[1] / "bench"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "dolfinx" in item.keywords and not HAS_DOLFINX:
            item.add_marker(pytest.mark.skip(reason="DOLFINx is not installed"))
        if "skip_in_parallel" in item.keywords and MPI.COMM_WORLD.size > 1:
            item.add_marker(pytest.mark.skip(reason="serial-only test"))
        if "parallel_only" in item.keywords and MPI.COMM_WORLD.size == 1:
            item.add_marker(pytest.mark.skip(
                reason="compares a run on all ranks with a serial one: run under mpiexec -n 2"))


@pytest.fixture(scope="module")
def bench_scripts():
    """bench/ on ``sys.path`` for a test module's tests: its scripts import as modules (and
    their sibling helpers, e.g. ``model_data``, with them)."""
    sys.path.insert(0, str(BENCH))
    yield BENCH
    sys.path.remove(str(BENCH))


@pytest.fixture
def mpi_tmp_path():
    """A temporary directory made by rank 0 and shared by every rank of COMM_WORLD."""
    comm = MPI.COMM_WORLD
    path = Path(tempfile.mkdtemp(prefix="neuroscale-")) if comm.rank == 0 else None
    path = comm.bcast(path, root=0)
    yield path
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _collect_and_sync():
    """Free PETSc objects on every rank together and keep ranks in step between tests."""
    yield
    gc.collect()
    MPI.COMM_WORLD.barrier()
