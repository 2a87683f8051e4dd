"""Atomic writes, data sets written before they stored their cells' kinds, round-robin work
distribution, rank → device (threads on the CPU), and the agreement of failures over the
ranks."""

import json
import os

from mpi4py import MPI

import h5py
import numpy as np
import pytest

from neuroscale_couple.datagen import plan
from neuroscale_couple.errors import InputError, RetrainError
from neuroscale_couple.parallel import agree, device_for_rank, round_robin, together
from neuroscale_couple.store import atomic_write, load_rve_dataset, subset_dataset, write_dataset
from neuroscale_couple.structures import stored_arrays


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


OLD_CONFIG = {"microstructure": [
    {"kind": "random_fibres", "volume_fraction": [0.2, 0.4], "n_fibres": [2, 4], "count": 3},
    {"kind": "fibre_chain", "volume_fraction": [0.22, 0.36], "n_fibres": 2, "count": 2}],
    "loads": {"per_microstructure": 1, "radius": 0.1, "seed": 3},
    "law": "neo_hookean", "matrix": {"E": 3.0, "nu": 0.35}, "fibre": {"E": 70.0, "nu": 0.2}}


def write_without_kinds(path, config: dict, keep: list[int]) -> None:
    """A data set of the cells ``keep`` of ``config`` as versions before micro/kind wrote it."""
    structures, F = plan({k: v for k, v in config.items() if k != "subset"})
    micro = {k: v[keep] for k, v in stored_arrays(structures, 16).items() if k != "kind"}
    n = len(keep)
    write_dataset(path, config, micro, {"micro_index": np.arange(n), "F": F[keep],
                                        "P": np.zeros((n, 2, 2)), "A": np.zeros((n, 2, 2, 2, 2))})


def test_a_data_set_without_kinds_takes_those_its_config_draws(tmp_path):
    write_without_kinds(tmp_path / "old.h5", OLD_CONFIG, [0, 1, 2, 3, 4])
    old = load_rve_dataset(tmp_path / "old.h5")
    assert old["micro/kind"].tolist() == [b"random_fibres"] * 3 + [b"fibre_chain"] * 2
    # a subset cut from it records the kinds of the cells it keeps (told apart by their fraction)
    subset_dataset(tmp_path / "old.h5", tmp_path / "part.h5", n_micro=3, seed=1)
    part = load_rve_dataset(tmp_path / "part.h5")
    kind_of = dict(zip(old["micro/volume_fraction"].tolist(), old["micro/kind"], strict=True))
    assert [kind_of[v] for v in part["micro/volume_fraction"].tolist()] == part[
        "micro/kind"].tolist()


def test_a_subset_without_kinds_of_a_mixed_data_set_is_refused_and_of_one_kind_read(tmp_path):
    mixed = dict(OLD_CONFIG, subset={"source": "old.h5", "n_micro": 2, "seed": 0})
    write_without_kinds(tmp_path / "mixed.h5", mixed, [1, 3])
    with pytest.raises(InputError, match=r"micro/kind.*neuroscale generate"):
        load_rve_dataset(tmp_path / "mixed.h5")
    single = dict(mixed, microstructure=OLD_CONFIG["microstructure"][:1])
    write_without_kinds(tmp_path / "single.h5", single, [0, 2])
    assert load_rve_dataset(tmp_path / "single.h5")["micro/kind"].tolist() == [
        b"random_fibres"] * 2
    # an older replay segment (a coupler's config, no generate config to draw from) is read
    # as before
    write_without_kinds(tmp_path / "segment.h5", OLD_CONFIG, [0, 3])
    with h5py.File(tmp_path / "segment.h5", "r+") as h5:
        h5.attrs["config"] = json.dumps({"model": "none", "fine": {"kind": "rve"}})
    assert "micro/kind" not in load_rve_dataset(tmp_path / "segment.h5")


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

