"""Fallback points across ranks: solved within groups of ``balance_ranks`` consecutive ranks,
balanced there, with the same answers whatever the grouping (run under mpiexec too)."""

from __future__ import annotations

from dataclasses import dataclass

from mpi4py import MPI

import numpy as np
import pytest

from neuroscale_couple.coupler import FINE, Coupler, Policy
from neuroscale_couple.errors import InputError
from neuroscale_couple.fine import FineSolver, MicroResult


@dataclass(frozen=True)
class Cell:
    key: str


class Shifted(FineSolver):
    """P̄ = F̄ − I + the rank-independent offset of its cell's key, tangent the identity."""

    def __init__(self, cell: Cell) -> None:
        super().__init__()
        self.offset = int(cell.key[1:])

    def solve(self, F, *, point_ids=None, tangent=True, fields_resolution=None):
        F = np.reshape(F, (-1, 2, 2))
        A = np.einsum("ik,jl->ijkl", np.eye(2), np.eye(2))[None].repeat(len(F), 0)
        return MicroResult(F - np.eye(2) + self.offset, A, None, {})


@pytest.mark.mpi
@pytest.mark.parametrize("balance_ranks", [1, 2, 64])
def test_fallback_points_are_solved_within_their_rank_group(balance_ranks):
    comm = MPI.COMM_WORLD
    n = 6 if comm.rank == 0 else 1  # rank 0 holds most points: the others should help
    ids = np.arange(n) + 100 * comm.rank
    cells = [Cell(f"c{i}") for i in ids]
    c = Coupler(None, Shifted, policy=Policy(rtol=0), comm=comm, balance_ranks=balance_ranks)
    c.register(ids, cells)
    c.begin_step(0)
    F = np.eye(2) + 0.01 * (ids[:, None, None] % 7) * np.array([[1.0, 0.5], [0.0, -0.3]])
    r = c.evaluate(F, ids)
    expected = F - np.eye(2) + ids[:, None, None]
    np.testing.assert_array_equal(r.stress, expected)  # the same answer wherever solved
    assert (r.source == FINE).all()
    solvers = {int(i): c._last_rank[int(i)] for i in ids}
    group = comm.rank // balance_ranks
    assert all(rank // balance_ranks == group for rank in solvers.values()), solvers
    helped = comm.allreduce(sum(rank != comm.rank for rank in solvers.values()))
    assert (helped > 0) == (min(balance_ranks, comm.size) > 1)  # a group of one solves alone
    c.end_step()
    c.close()


def test_balance_ranks_is_checked_before_any_collective():
    with pytest.raises(InputError, match="balance_ranks"):
        Coupler(None, Shifted, policy=Policy(rtol=0), comm=MPI.COMM_SELF, balance_ranks=0)
