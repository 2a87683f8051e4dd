"""Constraints of the RVE fluctuation field as a prolongation matrix (no dolfinx_mpc needed).

A constraint is a PETSc matrix P (rows: all displacement dofs, columns: the reduced dofs) with
w = P w_r. The reduced system is Pᵀ K P w_r = −Pᵀ R, formed with ``K.ptap(P)``.

- ``periodic``: nodes on x = 1 (y = 1, z = 1) copy their images on x = 0 (y = 0, z = 0); the
  corners collapse onto the node at the origin, which is then dropped (w = 0 there removes rigid
  translations).
- ``affine``: w = 0 on the whole cell boundary (kinematic, Voigt-type boundary conditions).

The cell is the unit square or cube of the mesh's geometric dimension. Works on any communicator:
a slave whose master node lives on another rank finds it through one allgather of the masters on
the x = 0, y = 0 (and z = 0) faces.
"""

from __future__ import annotations

import numpy as np
from petsc4py import PETSc

from neuroscale_couple.errors import InputError

BOUNDARY_CONDITIONS = ("periodic", "affine")
_TOL = 1e-8


def prolongation(V, bc: str) -> PETSc.Mat:
    """Build the prolongation P for a blocked (vector) Lagrange space V on the unit cell
    [0, 1]^d, d the mesh's geometric dimension (2 or 3).

    Returns a PETSc AIJ matrix of global size (n_dofs, n_reduced_dofs) with one unit entry per
    unconstrained row and empty rows for the dofs fixed to zero.
    """
    comm = V.mesh.comm
    imap, bs = V.dofmap.index_map, V.dofmap.index_map_bs
    n_own = imap.size_local
    x = V.tabulate_dof_coordinates()[:n_own, : V.mesh.geometry.dim]
    on_far = (np.abs(x - 1.0) < _TOL).any(axis=1)
    on_near = (np.abs(x) < _TOL).any(axis=1)
    at_origin = (np.abs(x) < _TOL).all(axis=1)
    if bc == "periodic":
        is_master = ~on_far & ~at_origin
    elif bc == "affine":
        is_master = ~on_far & ~on_near
    else:
        raise InputError(f"bc={bc!r} is unknown: use one of {', '.join(BOUNDARY_CONDITIONS)}")

    n_master = int(is_master.sum())
    offset = comm.exscan(n_master) or 0
    reduced = np.full(n_own, -1, dtype=np.int64)
    reduced[is_master] = offset + np.arange(n_master)

    if bc == "periodic":
        _map_slaves(comm, x, on_far & ~at_origin, is_master & on_near, reduced)

    n_total = comm.allreduce(n_master)
    P = PETSc.Mat().createAIJ(
        ((bs * n_own, PETSc.DETERMINE), (bs * n_master, bs * n_total)), comm=comm
    )
    P.setPreallocationNNZ((1, 1))
    P.setOption(PETSc.Mat.Option.NEW_NONZERO_ALLOCATION_ERR, False)
    row0 = bs * imap.local_range[0]
    for node in np.flatnonzero(reduced >= 0):
        for c in range(bs):
            P.setValue(row0 + bs * node + c, bs * reduced[node] + c, 1.0)
    P.assemble()
    return P


def _map_slaves(comm, x, is_slave, is_edge_master, reduced) -> None:
    """Give each slave node the reduced index of its image on the near faces x_i = 0 (in
    place)."""
    images = np.where(np.abs(x[is_slave] - 1.0) < _TOL, 0.0, x[is_slave])
    masters_x = np.concatenate(comm.allgather(x[is_edge_master]))
    masters_r = np.concatenate(comm.allgather(reduced[is_edge_master]))
    slave_r = np.full(len(images), -1, dtype=np.int64)  # image at the origin: stays fixed (−1)
    away = ~(np.abs(images) < _TOL).all(axis=1)
    for start in range(0, len(images), 512):
        chunk = np.flatnonzero(away[start:start + 512]) + start
        if len(chunk) == 0:
            continue
        d = np.linalg.norm(images[chunk, None, :] - masters_x[None, :, :], axis=2)
        k = np.argmin(d, axis=1)
        if np.any(d[np.arange(len(chunk)), k] > 1e-6):
            raise RuntimeError("RVE mesh is not periodic: a boundary node has no image node")
        slave_r[chunk] = masters_r[k]
    reduced[is_slave] = slave_r
