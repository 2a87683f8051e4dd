"""MPI work distribution and collectives.

Rules (see DESIGN.md): every collective is reached by every rank; input is validated before
entering collective code.
"""

from __future__ import annotations

from mpi4py import MPI

import numpy as np


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


def device_for_rank(comm: MPI.Comm) -> str:
    """``cuda:(local rank mod n_gpus)`` where CUDA devices exist, else ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    device = f"cuda:{local.rank % torch.cuda.device_count()}"
    local.Free()
    return device


def init_torch_distributed(comm: MPI.Comm) -> bool:
    """Set up ``torch.distributed`` from MPI (gloo on CPU, nccl on GPU); False on one rank.

    Rank 0 picks a free TCP port and its host address and broadcasts them; ranks on one host use
    the loopback address.
    """
    if comm.size == 1:
        return False
    import socket

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    hosts = comm.allgather(socket.gethostname())
    addr, port = None, None
    if comm.rank == 0:
        addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(hosts[0])
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    addr, port = comm.bcast((addr, port), root=0)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=comm.rank,
                            world_size=comm.size)
    return True


def allreduce_gradients(model) -> None:
    """Sum the gradients of ``model``'s parameters over all ranks (one flat all-reduce)."""
    import torch
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def balance(costs: np.ndarray, preferred: np.ndarray, n_ranks: int,
            move_cost: float) -> np.ndarray:
    """Assign work items to ranks so that the largest rank load is small.

    Items with a ``preferred`` rank (the one holding their solver and warm-start state) start
    there; the others go, largest first, to the least loaded rank. Then, while it lowers the
    busiest rank's load without making another rank busier than that, one item at a time moves
    off the busiest rank — an item costs ``move_cost`` more on any rank but its preferred one
    (set-up of a solver there, lost warm start). So a point leaves its solver only where that
    shortens the step, and a new point never displaces a warm one. Deterministic (ties by
    rank and item index): every rank computes the same assignment from the same gathered inputs.
    At the end the busiest rank's load exceeds the least busy one's by at most the cost an item
    on it would have there.

    Parameters
    ----------
    costs : (n,) estimated seconds per item on its preferred rank (or anywhere, if none).
    preferred : (n,) rank holding the item's solver state (-1: none).
    move_cost : seconds added when an item runs away from its preferred rank.

    Returns
    -------
    (n,) rank of each item.
    """
    costs, preferred = np.asarray(costs, dtype=float), np.asarray(preferred)

    def cost_on(i: int, r: int) -> float:
        return costs[i] + (move_cost if 0 <= preferred[i] != r else 0.0)

    load = np.zeros(n_ranks)
    out = np.where(preferred >= 0, preferred, -1).astype(np.int64)
    np.add.at(load, out[out >= 0], costs[out >= 0])
    for i in sorted(np.flatnonzero(out < 0), key=lambda i: (-costs[i], i)):
        out[i] = int(np.argmin(load))
        load[out[i]] += costs[i]
    for _ in range(len(costs) * n_ranks):
        hi = int(np.argmax(load))
        best = None  # (new busiest of the two, item, destination)
        for i in sorted(np.flatnonzero(out == hi), key=lambda i: (-costs[i], i)):
            for r in range(n_ranks):
                if r != hi:
                    worst = max(load[hi] - cost_on(i, hi), load[r] + cost_on(i, r))
                    if worst < load[hi] - 1e-12 and (best is None or worst < best[0]):
                        best = (worst, i, r)
        if best is None:
            break
        _, i, r = best
        load[hi] -= cost_on(i, hi)
        load[r] += cost_on(i, r)
        out[i] = r
    return out
