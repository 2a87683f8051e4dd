"""Atomic writes and round-robin work distribution."""

from mpi4py import MPI

import pytest

from neuroscale_couple.parallel import round_robin
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
