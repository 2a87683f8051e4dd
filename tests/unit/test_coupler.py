"""Coupler building blocks: policy input, fallback load balancing, solver cache, replay store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroscale_couple.coupler import Policy
from neuroscale_couple.errors import InputError
from neuroscale_couple.fine import FineSolver, MicroResult, SolverCache
from neuroscale_couple.parallel import balance
from neuroscale_couple.store import ReplayStore, load_rve_dataset

pytestmark = pytest.mark.skip_in_parallel


@pytest.mark.parametrize("kwargs, message", [
    ({"rtol": -0.01}, "must be ≥ 0"), ({"rtol": float("nan")}, "must be ≥ 0"),
    ({"atol": -1.0}, "atol=-1.0"), ({"atol": float("nan")}, "atol=nan"),
    ({"outside": "ignore"}, "outside='ignore': one of fallback, refuse, warn"),
    ({"confidence": 1.0}, "probability"),
    ({"max_failed_fraction": 2.0}, "max_failed_fraction"),
    ({"noisy_reuse": -1.0}, "noisy_reuse"), ({"reuse": float("nan")}, "reuse=nan")])
def test_policy_rejects_bad_input(kwargs, message):
    with pytest.raises(InputError, match=message):
        Policy(**kwargs)


def test_policy_extremes():
    assert Policy(rtol=0).classic and Policy(rtol=0, atol=0).classic
    assert not Policy(rtol=0, atol=0.01).classic  # an absolute tolerance alone
    assert not Policy(rtol=float("inf")).classic
    assert Policy(rtol=float("inf")).never and Policy(atol=float("inf")).never
    assert not Policy(rtol=1e6).never


def test_balance_spreads_clustered_work_and_keeps_affinity():
    # 12 equal fallback points all owned by rank 0: spread evenly when moving is cheap ...
    costs, owner = np.ones(12), np.zeros(12, dtype=int)
    assign = balance(costs, owner, 4, move_cost=0.1)
    assert np.bincount(assign, minlength=4).tolist() == [3, 3, 3, 3]
    # ... kept at home when moving costs more than it saves
    assert (balance(costs[:2], owner[:2], 4, move_cost=5.0) == 0).all()
    # the largest load is within one item of the mean (LPT bound)
    rng = np.random.default_rng(1)
    c = rng.uniform(0.05, 0.2, 101)
    a = balance(c, rng.integers(0, 3, 101), 3, move_cost=0.0)
    loads = np.bincount(a, weights=c, minlength=3)
    assert loads.max() - loads.mean() <= c.max()


def test_balance_keeps_warm_points_home_when_a_new_point_arrives():
    # points 0 and 1 hold solvers on ranks 0 and 1; point 2 is new (a build wherever it goes).
    # Moving a warm point would add a build to it: each stays home, the new one joins rank 0
    # (ties by rank) — greedy largest-first put the new point on rank 0 first and then sent
    # point 0 to rank 1, a rebuild seen in the 412-point FE² benchmark
    assign = balance(np.array([0.026, 0.026, 0.026]), np.array([0, 1, -1]), 2, move_cost=0.08)
    assert assign.tolist() == [0, 1, 0]
    # moved when that shortens the step: five warm points on rank 0, cheap move
    assign = balance(np.ones(5), np.zeros(5, dtype=int), 2, move_cost=0.2)
    assert np.bincount(assign, minlength=2).tolist() == [3, 2]


def test_balance_moves_points_freely_to_ranks_that_hold_their_solver():
    # three warm points on rank 0, a build (5 s) costs more than a solve saves ...
    costs, owner = np.ones(3), np.zeros(3, dtype=int)
    assert (balance(costs, owner, 3, move_cost=5.0) == 0).all()
    # ... unless a rank already holds a solver they can use (one microstructure shared by
    # many points, as the crystal of an HMM run): rank 2 has it, rank 1 not
    move = np.tile([5.0, 5.0, 0.0], (3, 1))
    assert np.bincount(balance(costs, owner, 3, move), minlength=3).tolist() == [2, 0, 1]
    # a new point goes where its solver is, not to the least loaded rank
    assign = balance(np.ones(4), np.array([0, 0, 1, -1]), 3, np.tile([0.0, 5.0, 5.0], (4, 1)))
    assert assign[3] == 0


class _Counting(FineSolver):
    closed = 0

    def __init__(self, key):
        self.key, self.states = key, {}

    def solve(self, F, *, point_ids=None, tangent=True, fields_resolution=None):
        self.states[point_ids[0]] = F
        return MicroResult(np.zeros((1, 2, 2)))

    def close(self):
        _Counting.closed += 1


def test_solver_cache_evicts_least_recent_and_keeps_states():
    cache = SolverCache(_Counting, capacity=2)
    cache.get("a", "a").solve(np.eye(2), point_ids=[1])
    cache.get("b", "b")
    cache.new_pass()
    cache.get("a", "a")  # a is now the most recent
    cache.get("c", "c")  # evicts b, not used in this pass
    assert "b" not in cache and "a" in cache and _Counting.closed == 1
    cache.new_pass()
    cache.get("d", "d")  # evicts a, the least recent, whose warm-start state is kept ...
    np.testing.assert_array_equal(cache.get("a", "a").states[1], np.eye(2))  # ... and restored
    assert cache.builds == 5
    cache.close()
    with pytest.raises(InputError, match="capacity"):
        SolverCache(_Counting, capacity=0)


def test_solver_cache_keeps_most_solvers_of_a_sweep_larger_than_itself():
    """Classic FE² on more points than fit: each pass visits the same keys in order. LRU would
    rebuild every solver in every pass; the cache keeps capacity − 1 of them."""
    cache = SolverCache(_Counting, capacity=3)
    keys = [f"k{i}" for i in range(6)]
    for _ in range(3):
        cache.new_pass()
        for k in keys:
            cache.get(k, k)
    assert cache.builds == 6 + 4 + 4  # later passes rebuild 6 − (3 − 1) = 4 (LRU: 6)
    assert "k0" in cache and "k1" in cache
    cache.close()


class _Sized(_Counting):
    """A solver that holds 10 bytes once built and 40 once it has solved (its LU factors)."""

    def solve(self, F, *, point_ids=None, tangent=True, fields_resolution=None):
        self.solved = True
        return super().solve(F, point_ids=point_ids)

    def memory_bytes(self):
        return 40 if getattr(self, "solved", False) else 10


def test_solver_cache_keeps_live_solvers_within_a_memory_budget():
    cache = SolverCache(_Sized, capacity=100, memory=100)
    for k in range(6):  # a pass over six solvers of 40 bytes: two fit in 100 bytes
        cache.get(k, k).solve(np.eye(2), point_ids=[k])
        assert cache.memory_bytes() <= 100
    assert len(cache) == 2 and cache.evictions == 4
    # a new solver counts as the largest seen (40), so the budget holds once it has solved:
    # with 80 bytes live, one is closed first
    cache.new_pass()
    cache.get("new", "new").solve(np.eye(2), point_ids=[0])
    assert len(cache) == 2 and cache.memory_bytes() == 80
    cache.close()
    # a budget below one solver keeps one live; the count still caps it
    tight = SolverCache(_Sized, capacity=100, memory=1)
    for k in range(3):
        tight.get(k, k).solve(np.eye(2), point_ids=[k])
        assert len(tight) == 1
    tight.close()
    with pytest.raises(InputError, match="memory=0"):
        SolverCache(_Sized, memory=0)


class _Sleepy(_Sized):
    """A solver that holds 5 communicators and 40 bytes awake, none and 1 byte hibernated, and
    resumes at its next solve."""

    def hibernate(self):
        self.asleep = True
        return True

    def solve(self, F, *, point_ids=None, tangent=True, fields_resolution=None):
        self.asleep = False
        return super().solve(F, point_ids=point_ids)

    def communicators(self):
        return 0 if getattr(self, "asleep", False) else 5

    def memory_bytes(self):
        return 1 if getattr(self, "asleep", False) else super().memory_bytes()


def test_solver_cache_hibernates_beyond_its_communicators_and_keeps_solvers_live():
    """Awake solvers stay within the communicator budget (a new one counts as the busiest
    seen); the others hibernate — live, not rebuilt, states their own — and one woken makes
    room by hibernating another."""
    cache = SolverCache(_Sleepy, capacity=100, communicators=12)
    for k in range(6):
        cache.get(k, k).solve(np.eye(2), point_ids=[k])
        assert cache.communicators_held() <= 12
    assert len(cache) == 6 and cache.awake() == 2 and cache.hibernations == 4
    assert cache.builds == 6 and cache.evictions == 0
    cache.new_pass()
    woken = cache.get(0, 0)  # asleep: woken, not rebuilt, its state its own
    np.testing.assert_array_equal(woken.states[0], np.eye(2))
    woken.solve(np.eye(2), point_ids=[0])
    assert cache.builds == 6 and cache.awake() == 2 and cache.communicators_held() <= 12
    # the count closes solvers, asleep or not; states are kept for a rebuild
    small = SolverCache(_Sleepy, capacity=3, communicators=100)
    for k in range(4):
        small.get(k, k).solve(np.eye(2), point_ids=[k])
    assert len(small) == 3 and small.evictions == 1 and small.hibernations == 0
    # a memory budget hibernates awake solvers first, then closes hibernated ones
    # (45 bytes: one awake, 40, and five asleep, 1 each)
    tight = SolverCache(_Sleepy, capacity=100, memory=45, communicators=100)
    for k in range(7):
        tight.get(k, k).solve(np.eye(2), point_ids=[k])
        assert tight.memory_bytes() <= 45
    assert tight.awake() == 1 and len(tight) == 6
    assert tight.hibernations == 6 and tight.evictions == 1
    for cache_ in (cache, small, tight):
        cache_.close()
    with pytest.raises(InputError, match="communicators=0"):
        SolverCache(_Sleepy, communicators=0)


def test_solver_cache_measures_the_communicators_mpi_has_left():
    """Without a budget the cache asks MPI, once its first solver reports communicators: what
    its solvers hold (this one claims 5 and holds none) and what is left, less a reserve."""
    from neuroscale_couple.fine import RESERVED_COMMUNICATORS
    from neuroscale_couple.parallel import free_communicators

    left = free_communicators()
    cache = SolverCache(_Sleepy)
    cache.get(0, 0).solve(np.eye(2), point_ids=[0])
    cache.get(1, 1)
    assert cache.communicators == 5 + left - RESERVED_COMMUNICATORS
    cache.close()


@pytest.mark.parametrize("value, size", [("512M", 512 * 2**20), ("2G", 2 * 2**30),
                                         ("1.5GiB", 3 * 2**29), ("800 MB", 800 * 2**20),
                                         ("4096", 4096), (10**9, 10**9), ("none", None),
                                         (None, None)])
def test_memory_sizes_with_units(value, size):
    from neuroscale_couple.config import byte_size

    assert byte_size(value, "cache_memory") == size


@pytest.mark.parametrize("value, message", [
    ("2X", "--rve-memory 2X: give a memory size > 0 such as 512M or 2G"),
    ("-1G", "--rve-memory -1G"), ("nan", "--rve-memory nan"), ("0", "--rve-memory 0"),
    (float("inf"), "--rve-memory inf")])
def test_bad_memory_sizes_are_refused_naming_the_flag(value, message):
    from neuroscale_couple.config import byte_size

    with pytest.raises(InputError, match=message):
        byte_size(value, "--rve-memory")


def test_coupler_checks_its_cache_settings_before_any_collective():
    from neuroscale_couple.coupler import Coupler

    with pytest.raises(InputError, match="cache_memory='lots': give a memory size"):
        Coupler(None, _Sized, policy=Policy(rtol=0), comm=None, cache_memory="lots")
    with pytest.raises(InputError, match="cache_size=0: give a whole number ≥ 1"):
        Coupler(None, _Sized, policy=Policy(rtol=0), comm=None, cache_size=0)
    coupler = Coupler(None, _Sized, policy=Policy(rtol=0), cache_memory="1K")
    assert coupler.cache.memory == 1024
    coupler.close()


def test_closing_solvers_collects_what_they_left_in_reference_cycles():
    """A closed RVE may leave objects in reference cycles that hold MPI communicators; without
    automatic garbage collection, closing COLLECT_EVERY solvers frees such garbage."""
    import gc
    import weakref

    from neuroscale_couple import fine

    class Cycle:
        pass

    garbage = Cycle()
    garbage.me = garbage
    alive = weakref.ref(garbage)
    del garbage
    gc.disable()
    try:
        for k in range(fine.COLLECT_EVERY):
            fine.close_solver(_Counting(k))
    finally:
        gc.enable()
    assert alive() is None


def test_replay_store_segments_are_rve_data_sets(tmp_path):
    from neuroscale_couple.solvers.microstructure import random_fibres

    store = ReplayStore(tmp_path, rank=1, config={"law": "neo_hookean"}, image_resolution=16)
    ms = [random_fibres(0.3, 2, s) for s in (0, 1)]
    for k in range(3):
        store.append(ms[k % 2], 10 + k, np.eye(2) * (1 + 0.01 * k), np.full((2, 2), k),
                     np.zeros((2, 2, 2, 2)), step=4, evaluation=k, model_version=0, time_s=0.1)
    path = store.flush(4)
    assert path.name == "step0004.rank001.h5" and store.flush(5) is None
    d = load_rve_dataset(path)
    assert d["micro/image"].shape == (2, 16, 16)
    assert d["samples/micro_index"].tolist() == [0, 1, 0]
    assert d["samples/point_id"].tolist() == [10, 11, 12]
    np.testing.assert_array_equal(d["samples/P"][2], np.full((2, 2), 2.0))
    assert "samples/stress_stderr" not in d  # no solver measured noise
    store.discard_after(3)
    assert ReplayStore.segments(tmp_path) == []


def test_replayed_solves_keep_each_cells_kind_for_a_group_wise_recalibration(tmp_path):
    """The retrainer merges a cell seen in several segments into one image: each sample still
    carries its own cell's kind (the group a group-wise recalibration puts it in)."""
    from mpi4py import MPI

    from neuroscale_couple.evaluation import sample_labels
    from neuroscale_couple.retraining import RetrainConfig, Retrainer
    from neuroscale_couple.solvers.microstructure import fibre_chain, random_fibres

    replay = tmp_path / "replay"
    store = ReplayStore(replay, rank=0, config={"law": "neo_hookean"}, image_resolution=16)
    cells = [random_fibres(0.3, 2, 0), fibre_chain(0.3, 2, 1)]
    for step, order in enumerate(([1, 0], [0, 1])):  # stored chain first, replayed by point id
        for k in order:
            store.append(cells[k], k, np.eye(2) * (1 + 0.05 * (step + 1)), np.zeros((2, 2)),
                         np.zeros((2, 2, 2, 2)), step=step, evaluation=0, model_version=0,
                         time_s=0.1)
        store.flush(step)
    retrainer = Retrainer(RetrainConfig(), MPI.COMM_SELF, replay_dir=replay, model_path=None)
    data, ids = retrainer.replay_data(16, up_to_step=1)
    assert len(data.images) == 2 and ids.tolist() == [0, 1, 0, 1]
    kinds = {0: "random_fibres", 1: "fibre_chain"}
    assert sample_labels(data, (0.5,)).tolist() == [f"{kinds[i]}|0" for i in ids]


def test_replay_store_keeps_measured_noise_for_retraining(tmp_path):
    from neuroscale_couple.solvers.cauchy_born import Crystal
    from neuroscale_couple.training import TrainingData

    store = ReplayStore(tmp_path, rank=0, config={"element": "Cu"}, image_resolution=0)
    hot = Crystal({"element": "Cu", "lattice": "fcc", "temperature": 300.0})
    for k, stderr in enumerate((np.full((2, 2), 0.05), None)):
        store.append(hot, k, np.eye(2), np.zeros((2, 2)), np.zeros((2, 2, 2, 2)), step=0,
                     evaluation=0, model_version=0, time_s=1.0, stderr=stderr)
    data = TrainingData.from_arrays(load_rve_dataset(store.flush(0)), None)
    np.testing.assert_allclose(data.noise[0].numpy(), np.full((2, 2), 0.05), rtol=1e-7)  # float32
    assert torch.isnan(data.noise[1]).all()  # unknown, not zero: the noise term skips it


class _Noisy(FineSolver):
    """P = F − I plus fresh noise at every solve, with its standard error (an MD average)."""

    def __init__(self, structure):
        super().__init__()
        self.calls, self.rng = 0, np.random.default_rng(0)

    def solve(self, F, *, point_ids=None, tangent=True, fields_resolution=None):
        self.calls += 1
        A = np.einsum("ik,jl->ijkl", np.eye(2), np.eye(2))[None]
        return MicroResult(F - np.eye(2) + 0.01 * self.rng.standard_normal((1, 2, 2)), A, None,
                           {"stress_stderr": np.full((1, 2, 2), 0.01),
                            "energy_density": [0.5 * np.sum((F - np.eye(2)) ** 2)]})


class _Structure:
    key = "s"


def test_noisy_fine_solve_is_linearised_within_a_load_step_not_repeated():
    from mpi4py import MPI

    from neuroscale_couple.coupler import Coupler

    c = Coupler(None, _Noisy, policy=Policy(rtol=0, noisy_reuse=1e-3), comm=MPI.COMM_SELF)
    c.register([0], [_Structure()])
    solver = c.cache.get("s", _Structure())
    F0 = np.array([[[1.01, 0.0], [0.0, 1.0]]])
    c.begin_step(0)
    first = c.evaluate(F0, [0])
    P0 = first.stress
    dF = np.array([[[5e-4, -2e-4], [1e-4, 3e-4]]])
    near = c.evaluate(F0 + dF, [0])
    assert solver.calls == 1  # within noisy_reuse: P0 + A:dF, no new MD run
    np.testing.assert_allclose(near.stress, P0 + dF, rtol=0, atol=1e-15)
    # energy of the same quadratic model (A = identity): W0 + P0:dF + |dF|²/2
    np.testing.assert_allclose(near.energy, first.energy + np.sum(P0 * dF) + 0.5 * np.sum(dF**2),
                               rtol=0, atol=1e-15)
    c.evaluate(F0 + 3 * dF, [0])  # 1.5e-3 away: solved again
    assert solver.calls == 2
    c.begin_step(1)  # a new load step: the old solve is not reused
    c.evaluate(F0 + 3 * dF, [0])
    assert solver.calls == 3
    c.close()


class _FailsAtPoint1(FineSolver):
    """P = F − I, but point 1 does not converge."""

    def __init__(self, structure):
        super().__init__()

    def solve(self, F, *, point_ids=None, tangent=True, fields_resolution=None):
        from neuroscale_couple.errors import SolveError

        if point_ids[0] == 1:
            raise SolveError("the RVE did not converge")
        return MicroResult(F - np.eye(2), np.einsum("ik,jl->ijkl", np.eye(2), np.eye(2))[None],
                           None, {})


def test_failed_fine_solves_are_counted_over_the_ranks_and_stop_classic_fe2():
    from mpi4py import MPI

    from neuroscale_couple.coupler import Coupler
    from neuroscale_couple.errors import SolveError

    c = Coupler(None, _FailsAtPoint1, policy=Policy(rtol=0), comm=MPI.COMM_SELF)
    c.register([0, 1, 2], [_Structure()] * 3)
    c.begin_step(0)
    F = np.tile(np.eye(2), (3, 1, 1))
    with pytest.raises(SolveError, match=r"^1 of 3 fine solves failed in load step 0 .*classic"):
        c.evaluate(F, [0, 1, 2])
    assert c.evaluate(F[[0, 2]], [0, 2]).source.tolist() == [1, 1]  # no failure: no error
    c.close()


class _Warm(FineSolver):
    """P = F − I, keeping (F, None) per point as its warm-start state."""

    def __init__(self, structure):
        super().__init__()

    def solve(self, F, *, point_ids=None, tangent=True, fields_resolution=None):
        F = np.reshape(F, (-1, 2, 2))
        self.states[point_ids[0]] = (F[0].copy(), None)
        A = np.einsum("ik,jl->ijkl", np.eye(2), np.eye(2))[None]
        return MicroResult(F - np.eye(2), A, None, {})


def test_coupler_state_round_trips_bit_exactly_through_npz(tmp_path):
    """What a restart needs: the points' last solves, solve times and warm starts, the
    counters; stored through np.savez and restored, the state is the same to the bit."""
    from mpi4py import MPI

    from neuroscale_couple.coupler import Coupler
    from neuroscale_couple.coupler_state import CouplerState
    from neuroscale_couple.errors import CheckpointError

    def coupler():
        c = Coupler(None, _Warm, policy=Policy(rtol=0), comm=MPI.COMM_SELF)
        c.register([3, 5], [_Structure(), _Structure()])
        return c

    c = coupler()
    c.begin_step(0)
    c.evaluate(np.eye(2) + np.random.default_rng(0).normal(0, 0.01, (2, 2, 2)), [3, 5])
    c.end_step()
    state = c.checkpoint_state()
    np.savez(tmp_path / "state.npz", **state)
    with np.load(tmp_path / "state.npz", allow_pickle=False) as data:
        again = coupler()
        again.restore_state([{k: data[k] for k in data.files}])
    restored = again.checkpoint_state()
    assert sorted(restored) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
    assert restored["solved/id"].tolist() == [3, 5] and restored["evaluations"] == 1
    assert np.isnan(restored["solved/W"]).all()  # the solver reports no energy: NaN kept
    warm = CouplerState.from_arrays(restored).warm
    assert [(k, i, s[1]) for k, i, s in warm] == [("s", 3, None), ("s", 5, None)]
    # a restart on another number of ranks keeps each rank's own points, warm starts here
    merged = CouplerState.merge([CouplerState.from_arrays(state)], [5], rank=1, ranks=2)
    assert list(merged.solved) == [5] and merged.last_rank == {5: 1}
    assert [i for _, i, _ in merged.warm] == [5]
    del state["solved/P"]
    with pytest.raises(CheckpointError, match="solved/P"):
        CouplerState.from_arrays(state)
    for solver in (c, again):
        solver.close()


def test_warm_start_states_pack_into_arrays_and_back():
    """A Cauchy–Born state is an array, an RVE's a tuple with None in it; others are refused."""
    from neuroscale_couple.fine import pack_states, unpack_states

    cell = np.arange(6.0).reshape(3, 2)
    rve = (np.eye(2), np.ones(4), None)
    arrays = pack_states([("crystal", 7, cell), ("fibres", 8, rve)], "warm")
    (k0, i0, s0), (k1, i1, s1) = unpack_states(arrays, "warm")
    assert (k0, i0, k1, i1) == ("crystal", 7, "fibres", 8)
    np.testing.assert_array_equal(s0, cell)
    assert isinstance(s1, tuple) and s1[2] is None
    np.testing.assert_array_equal(s1[1], rve[1])
    with pytest.raises(InputError, match="point 9"):
        pack_states([("x", 9, {"w": cell})], "warm")


def test_a_group_wise_calibration_bounds_each_point_by_its_kind_and_load_band():
    """With a group-wise calibration the Coupler's bound of a point is its group's q^e·s
    times √tr Σ: the same points under a global calibration give the same √tr Σ, so the ratio
    of the two bounds is each point's group factor over the global one."""
    from mpi4py import MPI

    from neuroscale_couple.calibration import Calibration
    from neuroscale_couple.coupler import Coupler
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.region import stretch_distance
    from neuroscale_couple.solvers.microstructure import fibre_chain, random_fibres

    model = load_operator("examples/models/fe2_composite.pt")
    shipped = Calibration.from_dict(model.calibration)
    base = Calibration(shipped.scale, shipped.quantiles, shipped.norm_quantiles, 100)
    factors = {"fibre_chain|0": 1.0, "fibre_chain|1": 2.0, "random_fibres|0": 3.0}
    groups = {label: Calibration(base.scale * f, dict(base.quantiles),
                                 dict(base.norm_quantiles), 100)
              for label, f in factors.items()}
    cells = [random_fibres(0.3, 3, 1), fibre_chain(0.3, 2, 2)]
    F = np.eye(2) + np.array([[[0.05, 0], [0, 0]], [[0.15, 0], [0, 0]]])[[0, 1, 0, 1]]
    assert np.allclose(stretch_distance(F), [0.05, 0.15, 0.05, 0.15])
    ids = np.arange(4)
    bounds = []
    for cal in (base, Calibration(base.scale, base.quantiles, base.norm_quantiles, 100,
                                  bands=(0.1,), groups=groups)):
        model.calibration = cal.to_dict()
        c = Coupler(model, lambda m: None, policy=Policy(rtol=1e9, atol=1e9),
                    comm=MPI.COMM_SELF)
        c.register(ids, [cells[0], cells[0], cells[1], cells[1]])
        c.begin_step(0)
        bounds.append(c.evaluate(F, ids).uncertainty)
    widest = max(factors.values())  # random_fibres|1 was not fitted: the widest group
    np.testing.assert_allclose(bounds[1] / bounds[0], [3.0, widest, 1.0, 2.0], rtol=1e-12)


def test_a_family_operators_group_wise_bound_takes_its_runs_contrast_band():
    """A family operator calibrated per contrast band too (E_f/E_m; a run has one material):
    the Coupler bounds each point with the factor of its kind, load band and the run's
    contrast band — the ratio to the global bound of the same points and material."""
    from mpi4py import MPI

    from neuroscale_couple.calibration import Calibration
    from neuroscale_couple.coupler import Coupler
    from neuroscale_couple.operators.sano import SANO, SANOConfig
    from neuroscale_couple.solvers.microstructure import random_fibres

    torch.manual_seed(0)
    ranges = {"contrast": [1.0, 100.0], "matrix_nu": [0.2, 0.45], "fibre_nu": [0.2, 0.45]}
    model = SANO(SANOConfig(resolution=16, width=8, modes=4, levels=2, heads=2, latent=16,
                            hidden=16, members=2, energy_correction=False,
                            phase_ranges=ranges)).double()
    model.card = {"data_config": {"image_resolution": 32}}
    base = Calibration(1.0, {0.5: 1.0, 0.9: 2.0, 0.95: 3.0}, {0.5: 1.0, 0.9: 2.0, 0.95: 3.0},
                       100)
    factors = {"random_fibres|0|0": 1.0, "random_fibres|0|2": 5.0, "random_fibres|1|2": 2.0}
    groups = {label: Calibration(f, dict(base.quantiles), dict(base.norm_quantiles), 100)
              for label, f in factors.items()}
    grouped = Calibration(1.0, base.quantiles, base.norm_quantiles, 100, bands=(0.1,),
                          groups=groups, contrast_bands=(3.0, 10.0, 30.0))
    assert Calibration.from_dict(grouped.to_dict()) == grouped
    F = np.eye(2) + np.array([[[0.05, 0], [0, 0]], [[0.15, 0], [0, 0]]])
    ids = np.arange(2)
    for E_f, expected in ((6.0, [1.0, 5.0]), (60.0, [5.0, 2.0])):  # contrast 2 and 20
        bounds = []
        for cal in (base, grouped):
            model.calibration = cal.to_dict()
            family = {"law": "neo_hookean", "matrix": {"E": 3.0, "nu": 0.3},
                      "fibre": {"E": E_f, "nu": 0.25}}
            c = Coupler(model, lambda m: None, family=family,
                        policy=Policy(rtol=1e9, atol=1e9), comm=MPI.COMM_SELF)
            c.register(ids, [random_fibres(0.3, 3, 1)] * 2)
            c.begin_step(0)
            bounds.append(c.evaluate(F, ids).uncertainty)
        # contrast 2: band 0 fitted at small loads, band 1 not (the widest group, 5);
        # contrast 20: band 2, both load bands fitted
        np.testing.assert_allclose(bounds[1] / bounds[0], expected,
                                   rtol=1e-12)
