"""MPI work distribution and collectives.

Rules (see DESIGN.md): every collective is reached by every rank; input is validated before
entering collective code.
"""

from __future__ import annotations

from mpi4py import MPI


def round_robin(items: list, comm: MPI.Comm) -> list[list]:
    """Split ``items`` into rounds of one item per rank.

    Returns ``rounds[k]`` = the item this rank handles in round k, or None; every rank gets the
    same number of rounds, so a collective at the end of each round is reached by all.
    """
    n_rounds = -(-len(items) // comm.size)
    return [
        items[k * comm.size + comm.rank] if k * comm.size + comm.rank < len(items) else None
        for k in range(n_rounds)
    ]


def any_rank(flag: bool, comm: MPI.Comm) -> bool:
    """True on every rank if ``flag`` is true on at least one."""
    return bool(comm.allreduce(bool(flag), op=MPI.LOR))
