"""The DOLFINx plug-in: a user's own NonlinearProblem made FE² by MicroStress."""

from __future__ import annotations

import difflib
import logging
import runpy
import subprocess
import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
from coupled_helpers import displacement_by_coordinates, macro_problem

from neuroscale_couple.fine import FineSolver

pytestmark = pytest.mark.dolfinx

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "examples" / "plugin"
MODEL = ROOT / "examples" / "models" / "fe2_composite.pt"


def changed_lines(before: Path, after: Path) -> int:
    """Lines added or removed by ``diff -u before after`` (as ``grep -c '^[+-][^+-]'``)."""
    diff = difflib.unified_diff(before.read_text().splitlines(), after.read_text().splitlines(),
                                lineterm="")
    return sum(1 for line in diff if line[:1] in "+-" and line[1:2] not in ("+", "-"))


def test_a_dolfinx_script_becomes_fe2_in_at_most_ten_lines():
    assert changed_lines(PLUGIN / "hyperelasticity.py", PLUGIN / "hyperelasticity_fe2.py") <= 10


@pytest.mark.mpi
def test_fe2_twin_with_fibres_of_the_matrix_material_is_the_single_scale_answer(capsys):
    single = runpy.run_path(str(PLUGIN / "hyperelasticity.py"))["u"]
    twin = runpy.run_path(str(PLUGIN / "hyperelasticity_fe2.py"))
    u, micro = twin["u"], twin["micro"]
    scale = MPI.COMM_WORLD.allreduce(float(np.abs(single.x.array).max()), op=MPI.MAX)
    assert scale > 0.1  # the strip was loaded
    np.testing.assert_allclose(u.x.array, single.x.array, rtol=0, atol=1e-10 * scale)
    assert len(micro.reports) == 4  # one Coupler load step per solve()
    assert all(r["fallback_points"] == micro.n_points for r in micro.reports)  # classic FE²
    micro.micro.close()


@pytest.mark.skip_in_parallel
def test_a_script_may_import_dolfinx_first():
    proc = subprocess.run([sys.executable, "-c", "import dolfinx; print(dolfinx.__version__)"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("0.")


def operator_coupler(comm, tol=np.inf):
    from neuroscale_couple.coupler import Coupler

    return Coupler.from_config({"model": str(MODEL), "policy": {"rtol": tol},
                                "retrain": {"enabled": False},
                                "fine": {"kind": "rve", "matrix": {"E": 3.0, "nu": 0.35},
                                         "fibre": {"E": 70.0, "nu": 0.2},
                                         "mesh": {"size": 0.05}}}, comm=comm)


def fibres(x, ids):
    from neuroscale_couple.solvers.microstructure import random_fibres

    return [random_fibres(0.2 + 0.2 * xi[0], 3, int(i)) for xi, i in zip(x, ids, strict=True)]


@pytest.mark.mpi
def test_unloading_and_compression_end_where_the_monotone_path_ends():
    """A hyperelastic macro law has no memory: loading to 1, unloading through compression
    (−0.5) and reloading to 0.6 ends where loading straight to 0.6 does."""
    comm = MPI.COMM_WORLD
    ends = []
    for loads in ([0.3, 0.6], [0.5, 1.0, 0.0, -0.5, 0.6]):
        c = operator_coupler(comm)
        stepper, set_load = macro_problem(comm, c, fibres, stretch=0.1)
        history = stepper.run(loads, set_load)
        assert [h["load"] for h in history] == loads
        ends.append(displacement_by_coordinates(stepper)[1])
        c.close()
    assert np.abs(ends[0]).max() > 0.01
    np.testing.assert_allclose(ends[1], ends[0], rtol=0, atol=1e-9 * np.abs(ends[0]).max())


class FailsOnce(FineSolver):
    """A fine solver that raises at its first call, then answers as ``inner`` does."""

    def __init__(self, inner, error: Exception) -> None:
        super().__init__()
        self.inner, self.error, self.calls = inner, error, 0

    def register(self, ids, structures) -> None:
        self.inner.register(ids, structures)

    def begin_step(self, step: int) -> None:
        self.inner.begin_step(step)

    def end_step(self, steps_left=None) -> dict:
        return self.inner.end_step(steps_left)

    def solve(self, F, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return self.inner.solve(F, **kwargs)


@pytest.mark.mpi
@pytest.mark.parametrize("error", [ValueError("injected"), RuntimeError("injected")])
def test_an_error_inside_the_residual_cuts_the_step_back_on_every_rank(error):
    comm = MPI.COMM_WORLD
    c = operator_coupler(comm)
    stepper, set_load = macro_problem(comm, FailsOnce(c, error), fibres, stretch=0.1)
    history = stepper.run([1.0], set_load)
    assert history[0]["cutbacks"] == 1
    assert stepper.problem.solver.getConvergedReason() > 0
    c.close()


@pytest.mark.skip_in_parallel
def test_under_integration_and_wrong_counts_are_refused_before_any_work():
    from dolfinx import fem, mesh

    from neuroscale_couple.adapters.fenicsx import MicroStress
    from neuroscale_couple.errors import InputError

    msh = mesh.create_unit_square(MPI.COMM_SELF, 2, 2)
    u = fem.Function(fem.functionspace(msh, ("Lagrange", 2, (2,))))

    class NeverCalled(FineSolver):
        def solve(self, F, **kwargs):
            raise AssertionError("solved despite bad input")

        def register(self, *args):
            raise AssertionError("registered despite bad input")

    with pytest.raises(InputError, match=r"quadrature_degree ≥ 2"):
        MicroStress(u, NeverCalled(), object(), quadrature_degree=1)
    with pytest.raises(InputError, match="returned 1 microstructures"):
        MicroStress(u, NeverCalled(), lambda x, ids: [object()])
    scalar = fem.Function(fem.functionspace(msh, ("Lagrange", 1)))
    with pytest.raises(InputError, match="vector field"):
        MicroStress(scalar, NeverCalled(), object())


@pytest.mark.skip_in_parallel
def test_a_problem_nothing_loads_is_reported(caplog):
    c = operator_coupler(MPI.COMM_SELF)
    stepper, set_load = macro_problem(MPI.COMM_SELF, c, fibres, stretch=0.0)
    with caplog.at_level(logging.WARNING, logger="neuroscale_couple.adapters.fenicsx"):
        history = stepper.run([0.5, 1.0], set_load)
    c.close()
    assert [h["newton_iterations"] for h in history] == [0, 0]
    assert "nothing loads the problem" in caplog.text



@pytest.mark.skip_in_parallel
def test_a_typo_in_an_rve_config_is_refused_before_the_solve(tmp_path):
    config = (ROOT / "examples" / "configs" / "rve.yaml").read_text()
    (tmp_path / "typo.yaml").write_text(config.replace("matrix:", "matrx:"))
    proc = subprocess.run([str(Path(sys.executable).parent / "neuroscale"), "rve",
                           str(tmp_path / "typo.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key 'matrx'" in proc.stderr and "did you mean 'matrix'" in proc.stderr
