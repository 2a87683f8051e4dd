"""MPI work distribution and collectives.

Rules (see DESIGN.md): every collective is reached by every rank; input is validated before
entering collective code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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


@contextlib.contextmanager
def together(comm: MPI.Comm, what: str) -> Iterator[None]:
    """Run a block of local work (no collective call inside) on every rank, then agree: an
    exception raised on any rank is raised on every rank (collective).

    The failing rank re-raises its own exception; the others raise one of the same
    :class:`~neuroscale_couple.errors.NeuroScaleError` class (other exceptions: the base
    class) naming the rank and its message, so no rank is left waiting in a later collective.
    """
    from neuroscale_couple import errors

    error: Exception | None = None
    try:
        yield
    except Exception as err:  # shared with the other ranks below
        error = err
    reports = comm.allgather(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
    if failed:
        rank, (name, message) = failed[0]
        cls = getattr(errors, name, None)
        cls = cls if isinstance(cls, type) and issubclass(cls, errors.NeuroScaleError) else (
            errors.NeuroScaleError)
        raise cls(f"{what} failed on rank {rank}: {message}")


def device_for_rank(comm: MPI.Comm) -> str:
    """``cuda:(local rank mod n_gpus)`` where CUDA devices exist, else ``cpu``.

    On the CPU the ranks sharing a node split its cores: each gets
    max(1, cores // local ranks) torch threads (torch's default, all cores per rank, would run
    ranks × cores threads). ``OMP_NUM_THREADS`` set by the user takes precedence. Collective.
    """
    import torch

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = local.rank, local.size
    local.Free()
    if torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    if local_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_size))
    return "cpu"


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
            move_cost: float | np.ndarray) -> np.ndarray:
    """Assign work items to ranks so that the largest rank load is small.

    Items with a ``preferred`` rank (the one holding their solver and warm-start state) start
    there; the others go, largest first, to the rank where they end least loaded. Then, while
    it lowers the busiest rank's load without making another rank busier than that, one item at
    a time moves off the busiest rank — where an item costs its ``move_cost`` more (the set-up
    of a solver there; the warm-start state travels along). So a point leaves its solver only
    where that shortens the step, and a new point never displaces a warm one. Deterministic
    (ties by item cost, index and rank): every rank computes the same assignment from the same
    gathered inputs. At the end the busiest rank's load exceeds the least busy one's by at most
    the cost an item on it would have there.

    Parameters
    ----------
    costs : (n,) estimated seconds per item on its preferred rank (or anywhere, if none).
    preferred : (n,) rank holding the item's solver state (-1: none).
    move_cost : seconds added when item i runs on rank r other than its preferred one: a
        scalar, or (n, n_ranks) (e.g. zero where rank r holds a solver the item can use).

    Returns
    -------
    (n,) rank of each item.
    """
    costs, preferred = np.asarray(costs, dtype=float), np.asarray(preferred, dtype=np.int64)
    n = len(costs)
    extra = np.array(np.broadcast_to(np.asarray(move_cost, dtype=float), (n, n_ranks)))
    home = preferred >= 0
    extra[np.flatnonzero(home), preferred[home]] = 0.0
    cost = costs[:, None] + extra  # (n, n_ranks): seconds of item i on rank r
    load = np.zeros(n_ranks)
    out = np.where(home, preferred, -1)
    np.add.at(load, out[home], costs[home])
    for i in sorted(np.flatnonzero(~home), key=lambda i: (-costs[i], i)):
        out[i] = int(np.argmin(load + cost[i]))
        load[out[i]] += cost[i, out[i]]
    for _ in range(n * n_ranks):
        hi = int(np.argmax(load))
        mine = np.flatnonzero(out == hi)
        if not len(mine):
            break
        mine = mine[np.lexsort((mine, -costs[mine]))]
        # busiest of the two ranks after moving item mine[a] from hi to r
        worst = np.maximum(load[hi] - cost[mine, hi][:, None], load[None, :] + cost[mine])
        worst[:, hi] = np.inf
        a, r = divmod(int(np.argmin(worst)), n_ranks)
        if not worst[a, r] < load[hi] - 1e-12:
            break
        i = mine[a]
        load[hi] -= cost[i, hi]
        load[r] += cost[i, r]
        out[i] = r
    return out
