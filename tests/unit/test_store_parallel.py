"""Atomic writes, round-robin work distribution, rank → device (threads on the CPU), and the
agreement of failures over the ranks."""

import os

from mpi4py import MPI

import pytest

from neuroscale_couple.errors import InputError, RetrainError
from neuroscale_couple.parallel import agree, device_for_rank, round_robin, together
from neuroscale_couple.store import atomic_write


def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path):
    target = tmp_path / "ckpt.txt"
    atomic_write(target, lambda p: p.write_text("first"))
    assert target.read_text() == "first"

    def broken(p):
        p.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_text() == "first"
    assert [f.name for f in tmp_path.iterdir()] == ["ckpt.txt"]


class FakeComm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def test_round_robin_covers_every_item_once_with_equal_rounds():
    items = list(range(7))
    per_rank = [round_robin(items, FakeComm(r, 3)) for r in range(3)]
    assert {len(rounds) for rounds in per_rank} == {3}
    seen = sorted(i for rounds in per_rank for i in rounds if i is not None)
    assert seen == items
    assert round_robin(items, MPI.COMM_SELF) == items


@pytest.mark.mpi
@pytest.mark.parametrize("omp", [None, "1"])
def test_ranks_on_a_node_split_its_cores_unless_the_user_set_threads(monkeypatch, omp):
    """On the CPU each of the k ranks on a node runs cores // k torch threads (at least one);
    OMP_NUM_THREADS, where set, is left to rule."""
    import torch

    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    k = local.size
    local.Free()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)) + 1)  # oversubscribed, as by default
        device = device_for_rank(MPI.COMM_WORLD)
        if device != "cpu":
            pytest.skip("ranks run on GPUs here")
        split = omp is None and k > 1
        assert torch.get_num_threads() == (max(1, len(os.sched_getaffinity(0)) // k) if split
                                           else len(os.sched_getaffinity(0)) + 1)
    finally:
        torch.set_num_threads(before)


def test_an_error_on_rank_0_is_raised_on_every_rank_with_its_message():
    comm = MPI.COMM_WORLD
    assert agree(comm, None) is None
    with pytest.raises(InputError) as info:  # the failing class where it is NeuroScale's
        with together(comm, "the work"):
            if comm.rank == 0:
                raise InputError("bad input on rank 0")
    expected = "bad input on rank 0" if comm.rank == 0 else (
        "the work failed on rank 0: bad input on rank 0")
    assert str(info.value) == expected
    with pytest.raises(RetrainError, match=r"^the work failed on rank 0: KeyError: 'x'$"):
        with together(comm, "the work", raise_as=RetrainError):
            if comm.rank == 0:
                raise KeyError("x")
    with together(comm, "the work"):  # nothing failed: nothing raised
        pass

