"""Small macro problems and measurements shared by the coupled-run tests (FE², HMM)."""

from __future__ import annotations

import numpy as np


def macro_problem(comm, micro, structures, n=2, stretch=0.06, petsc_options=None):
    """Unit square, n×n×2 triangles, clamped at x = 0, u_x = stretch·t at x = 1; ``structures``
    maps (points, ids) to the points' fine structures."""
    from dolfinx import fem, mesh

    from neuroscale_couple.adapters.fenicsx import FE2Problem

    msh = mesh.create_rectangle(comm, [[0, 0], [1, 1]], [n, n], mesh.CellType.triangle)
    V = fem.functionspace(msh, ("Lagrange", 1, (2,)))
    u = fem.Function(V)
    msh.topology.create_connectivity(1, 2)
    left = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 0))
    right = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 1))
    delta = fem.Constant(msh, 0.0)
    bcs = [fem.dirichletbc(np.zeros(2), fem.locate_dofs_topological(V, 1, left), V),
           fem.dirichletbc(delta, fem.locate_dofs_topological(V.sub(0), 1, right), V.sub(0))]
    problem = FE2Problem(u, bcs, micro, structures, quadrature_degree=1,
                         petsc_options=petsc_options)

    def set_load(t):
        delta.value = stretch * t

    return problem, set_load


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
