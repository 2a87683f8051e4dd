"""MPI work distribution and collectives.

Rules (see DESIGN.md): every collective is reached by every rank; input is validated before
entering collective code.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from collections.abc import Iterator
from typing import NamedTuple

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


FAULT_TIMEOUT_S = float(os.environ.get("NEUROSCALE_FAULT_TIMEOUT_S", "300"))
"""Seconds a rank that failed inside collective work waits for the other ranks to reach the
agreement before it aborts them all (:func:`agree`); environment ``NEUROSCALE_FAULT_TIMEOUT_S``."""


class Failure(NamedTuple):
    """The failure agreed by :func:`agree`: the lowest failing rank, its exception's class name
    and message."""

    rank: int
    kind: str
    message: str

    def error(self, what: str) -> Exception:
        """The exception a rank that did not fail raises: of the failing one's class where that
        is a :class:`~neuroscale_couple.errors.NeuroScaleError` (else the base class), naming
        ``what``, the rank and its message."""
        from neuroscale_couple import errors

        cls = getattr(errors, self.kind, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.NeuroScaleError)):
            cls = errors.NeuroScaleError
        return cls(f"{what} failed on rank {self.rank}: {self.message}")


def agree(comm: MPI.Comm, error: BaseException | None, *, what: str = "the work",
          timeout_s: float | None = None) -> Failure | None:
    """One collective flag: the first rank whose ``error`` is not None, with its message, on
    every rank (None if no rank failed). One non-blocking all-reduce; a broadcast of the message
    only when a rank failed.

    ``timeout_s``: for work that holds collective calls. A rank whose failure made it skip one
    leaves the others waiting there, never at this agreement: a failed rank that waits longer
    than ``timeout_s`` writes its message to stderr and aborts all ranks (``MPI_Abort``), so
    the run ends with a non-zero status instead of hanging. Ranks that did not fail wait
    without limit (the others may still be busy). Give such work a communicator of its own
    (``comm.Dup()``), so that the agreement is never matched with a collective of the work.
    """
    mine = np.array([comm.size if error is None else comm.rank], dtype=np.int64)
    first = np.empty(1, dtype=np.int64)
    request = comm.Iallreduce(mine, first, op=MPI.MIN)
    if error is None or timeout_s is None:
        request.Wait()
    else:
        deadline = time.monotonic() + timeout_s
        while not request.Test():
            if time.monotonic() > deadline:
                sys.stderr.write(f"rank {comm.rank}: {what} failed: {type(error).__name__}: "
                                 f"{error}; the other ranks did not reach the agreement within "
                                 f"{timeout_s:g} s (they wait in a collective call this "
                                 "failure skipped): aborting all ranks\n")
                sys.stderr.flush()
                comm.Abort(1)
            time.sleep(1e-3)
    rank = int(first[0])
    if rank == comm.size:
        return None
    report = (type(error).__name__, str(error)) if comm.rank == rank else None
    return Failure(rank, *comm.bcast(report, root=rank))


@contextlib.contextmanager
def together(comm: MPI.Comm, what: str, *, raise_as: type[Exception] | None = None,
             timeout_s: float | None = None) -> Iterator[None]:
    """Run a block of work on every rank, then agree (:func:`agree`): an exception raised on
    any rank is raised on every rank (collective).

    Without ``raise_as`` the failing rank re-raises its own exception; the others raise
    :meth:`Failure.error` naming the rank and its message. With ``raise_as`` every rank raises
    ``raise_as("<what> failed on rank r: <class>: <message>")``. The block holds local work
    only (no collective call), unless ``timeout_s`` is given (see :func:`agree`), so that no
    rank is left waiting in a later collective.
    """
    error: Exception | None = None
    try:
        yield
    except Exception as err:  # shared with the other ranks below
        error = err
    failure = agree(comm, error, what=what, timeout_s=timeout_s)
    if failure is None:
        return
    if raise_as is not None:
        raise raise_as(f"{what} failed on rank {failure.rank}: {failure.kind}: "
                       f"{failure.message}") from error
    if error is not None:
        raise error
    raise failure.error(what)


def return_free_memory() -> None:
    """Hand the heap memory this process has freed back to the operating system (glibc's
    ``malloc_trim``; nothing where it is missing). glibc keeps freed blocks for reuse, so a
    rank's resident memory otherwise stays at the high-water mark of its transients — the
    images of an encoding, the arrays of an evaluation — which on the FE² plate was several KB
    per point above what the points hold."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


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
    """Sum the gradients of ``model``'s parameters over all ranks (one flat all-reduce; none
    for a module without trainable parameters)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    allreduce_sum(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def allreduce_sum(tensor) -> None:
    """Sum a torch tensor over all ranks, in place (``torch.distributed`` set up by
    :func:`init_torch_distributed`)."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


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


def free_communicators(limit: int = 4096) -> int:
    """How many more communicators this process can create, up to ``limit``: duplicates
    ``MPI.COMM_SELF`` until MPI refuses (MPICH: 2048 context ids a process) and frees them
    again (~10 µs a duplicate, measured). Local: no other rank takes part."""
    held: list[MPI.Comm] = []
    try:
        base = MPI.COMM_SELF.Dup()
    except MPI.Exception:
        return 0
    base.Set_errhandler(MPI.ERRORS_RETURN)  # duplicates inherit it: a refusal raises
    try:
        while len(held) < limit - 1:
            held.append(base.Dup())
    except MPI.Exception:
        pass
    finally:
        for comm in held:
            comm.Free()
        base.Free()
    return len(held) + 1
