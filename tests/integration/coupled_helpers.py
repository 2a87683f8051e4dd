"""Small macro problems and measurements shared by the coupled-run tests (FE², HMM)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NEWTON = {"snes_type": "newtonls", "snes_linesearch_type": "basic", "snes_rtol": 1e-9,
          "snes_atol": 1e-10, "snes_stol": 0.0, "snes_max_it": 15, "ksp_type": "preonly",
          "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}


def macro_problem(comm, micro, structures, n=2, stretch=0.06, petsc_options=None):
    """Unit square, n×n×2 P1 triangles, clamped at x = 0, u_x = stretch·t at x = 1, its stress
    from ``micro`` through :class:`MicroStress` (``structures`` maps (points, ids) to the
    points' fine structures). Returns the :class:`LoadStepper` and the load function."""
    import ufl
    from dolfinx import fem, mesh
    from dolfinx.fem.petsc import NonlinearProblem

    from neuroscale_couple.adapters.fenicsx import MicroStress
    from neuroscale_couple.adapters.fenicsx_steps import LoadStepper

    msh = mesh.create_rectangle(comm, [[0, 0], [1, 1]], [n, n], mesh.CellType.triangle)
    V = fem.functionspace(msh, ("Lagrange", 1, (2,)))
    u = fem.Function(V)
    msh.topology.create_connectivity(1, 2)
    left = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 0))
    right = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 1))
    delta = fem.Constant(msh, 0.0)
    bcs = [fem.dirichletbc(np.zeros(2), fem.locate_dofs_topological(V, 1, left), V),
           fem.dirichletbc(delta, fem.locate_dofs_topological(V.sub(0), 1, right), V.sub(0))]
    stress = MicroStress(u, micro, structures)
    residual = ufl.inner(stress.stress, ufl.grad(ufl.TestFunction(V))) * stress.dx
    problem = NonlinearProblem(residual, u, bcs=bcs, petsc_options_prefix=f"macro{id(u)}_",
                               petsc_options={**NEWTON, **(petsc_options or {})})
    stress.attach(problem)

    def set_load(t):
        delta.value = stretch * t

    return LoadStepper(problem, stress), set_load


def displacement_by_coordinates(problem):
    """(coordinates, u) of the owned dofs gathered on every rank, sorted by coordinates."""
    V = problem.u.function_space
    n = V.dofmap.index_map.size_local
    parts = problem.comm.allgather((V.tabulate_dof_coordinates()[:n, :2],
                                    problem.u.x.array[: 2 * n].reshape(-1, 2)))
    x = np.concatenate([p[0] for p in parts])
    u = np.concatenate([p[1] for p in parts])
    order = np.lexsort(np.round(x, 9).T[::-1])
    return x[order], u[order]


def reaction(stepper) -> float:
    """The reaction force on the loaded edge x = 1 of :func:`macro_problem` (its x-dofs), over
    all ranks."""
    from dolfinx import fem, mesh

    V = stepper.u.function_space
    msh = V.mesh
    right = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 1))
    return stepper.micro.reaction(fem.locate_dofs_topological(V.sub(0), 1, right))


def convergence_order(residuals):
    """Largest observed order log(r_{k+1}/r_k) / log(r_k/r_{k-1}) of a Newton history."""
    r = np.asarray(residuals)
    r = r[r > 1e-13 * r[0]]
    orders = [np.log(r[k + 1] / r[k]) / np.log(r[k] / r[k - 1]) for k in range(1, len(r) - 1)]
    return max(orders) if orders else np.nan


def on_rank0(comm, check) -> None:
    """Run ``check()`` on rank 0 only and raise its failure on every rank (a rank-0-only
    assertion would otherwise leave the other ranks waiting at the next collective)."""
    error = None
    if comm.rank == 0:
        try:
            check()
        except Exception as err:  # re-raised below on every rank
            error = err
    error = comm.bcast(error, root=0)
    if error is not None:
        raise error


def serial_and_parallel(example: Path, flags: list[str], tmp_path: Path, ranks: int
                        ) -> tuple[dict, dict]:
    """Run ``example`` with ``flags`` serially into ``tmp_path/one``, then on ``ranks`` ranks
    (mpiexec) into ``tmp_path/many`` compared with it (``--compare``); return both summaries."""
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    for cmd in ([sys.executable, str(example), *flags, "--out", str(tmp_path / "one")],
                [mpiexec, "-n", str(ranks), sys.executable, str(example), *flags, "--out",
                 str(tmp_path / "many"), "--compare", str(tmp_path / "one")]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return tuple(json.loads((tmp_path / name / "summary.json").read_text())
                 for name in ("one", "many"))


def kill_after_checkpoint(cmd: list[str], out: Path, step: int, timeout: float = 300) -> dict:
    """Start ``cmd`` (a run writing ``out/checkpoint``), SIGKILL it once the checkpoint of load
    step ``step`` or a later one is written; return the checkpoint's state.json."""
    state = out / "checkpoint" / "state.json"
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "summary.json").exists()
    return json.loads(state.read_text())
