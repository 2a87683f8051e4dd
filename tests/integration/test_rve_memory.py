"""Memory of live RVEs: the solver's estimate against the resident size it adds, and a
fallback-heavy run through the Coupler whose resident size stays within its memory budget.

Resident sizes come from ``/proc/self/status`` (VmRSS); the C heap's free pages are handed back
(:func:`~neuroscale_couple.fine.release_memory`) before each baseline, so growth measures what
is allocated, not what the allocator kept from earlier tests.
"""

from __future__ import annotations

from mpi4py import MPI

import numpy as np
import pytest

pytestmark = [pytest.mark.dolfinx, pytest.mark.skip_in_parallel]

COMPOSITE = {"law": "neo_hookean", "matrix": {"E": 3.0, "nu": 0.35},
             "fibre": {"E": 70.0, "nu": 0.2}, "mesh": {"size": 0.03}}
F_LOAD = np.array([[1.06, 0.02], [0.0, 0.97]])
MB = 2**20


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def baseline() -> int:
    """Resident bytes once garbage is collected and free heap pages are handed back."""
    import gc

    from neuroscale_couple.fine import release_memory

    gc.collect()
    release_memory()
    return resident_bytes()


def cell(i: int):
    from neuroscale_couple.solvers.microstructure import random_fibres

    return random_fibres(0.2 + 0.02 * (i % 10), 1 + i % 6, 1000 + i)


def warm_up() -> None:
    """Compile the forms and load the libraries once, outside any measured growth."""
    from neuroscale_couple.solvers.rve_fenicsx import rve_from_config

    with rve_from_config(COMPOSITE, cell(999)) as rve:
        rve.solve(F_LOAD, point_ids=[0])


def test_rve_memory_estimate_matches_the_resident_size_it_adds():
    """Measured at mesh size 0.03 (~2900 cells): ~6.9 MB a solved RVE, 5 of them MUMPS's
    factors; the estimate is within −10 %/+20 % of the growth, and closing gives it back."""
    from neuroscale_couple.fine import close_solver, release_memory
    from neuroscale_couple.solvers.rve_fenicsx import rve_from_config

    warm_up()
    rss0 = baseline()
    rves = [rve_from_config(COMPOSITE, cell(i)) for i in range(6)]
    unsolved = sum(r.memory_bytes() for r in rves)
    for i, r in enumerate(rves):
        r.solve(F_LOAD, point_ids=[i])
    estimate = sum(r.memory_bytes() for r in rves)
    grown = resident_bytes() - rss0
    assert estimate > 2 * unsolved  # the LU factors count once factorized
    assert 0.9 * grown < estimate < 1.2 * grown, (estimate / MB, grown / MB)
    for r in rves:
        close_solver(r)
    assert all(r.memory_bytes() == 0 for r in rves)
    rves.clear()
    release_memory()
    assert resident_bytes() - rss0 < 0.25 * grown, (resident_bytes() - rss0) / MB


def test_a_rank_keeps_more_rves_live_than_mpi_lets_stay_awake():
    """A classic-FE² sweep over 200 cells (mesh size 0.1) on one rank. Awake, a solved RVE
    holds 14 communicators, and 145–146 of them exhausted MPICH's 2048 (bench/rve_live.py); the
    cache keeps all 200 live — awake within the communicators MPI has left, the others
    hibernated — solves each twice without rebuilding one, leaves the reserve free, and a
    woken RVE solves exactly as a fresh one."""
    import gc

    from neuroscale_couple.fine import RESERVED_COMMUNICATORS, SolverCache
    from neuroscale_couple.parallel import free_communicators
    from neuroscale_couple.solvers.rve_fenicsx import (
        COMMUNICATORS_BUILT,
        COMMUNICATORS_MUMPS,
        rve_from_config,
    )

    coarse = {**COMPOSITE, "mesh": {"size": 0.1}}
    n, loads = 200, (F_LOAD, F_LOAD + 0.01)
    # 200 RVEs of 20 geometries: gmsh meshes 20, the others read the kept .msh files
    cache = SolverCache(lambda i: rve_from_config(coarse, cell(i % 20)), capacity=1024)
    stress = {}
    for step, F in enumerate(loads):
        cache.new_pass()
        for i in range(n):
            stress[step, i] = cache.get(i, i).solve(F, point_ids=[i]).stress
            budget = cache.communicators  # measured when the second RVE is built
            assert budget is None or cache.communicators_held() <= budget
    awake_max = cache.communicators // (COMMUNICATORS_BUILT + COMMUNICATORS_MUMPS)
    assert len(cache) == n and cache.builds == n and cache.evictions == 0
    assert 0 < cache.awake() <= awake_max < n and cache.hibernations >= n - awake_max
    gc.collect()
    assert free_communicators() >= RESERVED_COMMUNICATORS
    cache.close()
    with rve_from_config(coarse, cell(0)) as fresh:  # RVE 0 slept between its solves
        for step, F in enumerate(loads):
            np.testing.assert_array_equal(fresh.solve(F, point_ids=[0]).stress, stress[step, 0])


@pytest.mark.slow
def test_fallback_heavy_run_stays_within_the_rve_memory_budget():
    """Classic FE² (every point on its RVE) on 24 points, each with its own cell, three
    evaluations: 24 awake RVEs would take ~170 MB; with a 40 MB budget the Coupler keeps ~5
    awake, hibernating and waking the others (not rebuilding them), and the resident size grows
    by no more than the budget plus the warm-start states and a 16 MB allowance for the
    allocator and Python objects."""
    from neuroscale_couple.coupler import Coupler, Policy
    from neuroscale_couple.solvers.rve_fenicsx import rve_from_config

    budget, allowance = 40 * MB, 16 * MB
    warm_up()
    rss0 = baseline()
    peak = [0]

    def factory(structure):  # samples the resident size at every build
        peak[0] = max(peak[0], resident_bytes() - rss0)
        return rve_from_config(COMPOSITE, structure)

    coupler = Coupler(None, factory, family=COMPOSITE, policy=Policy(rtol=0),
                      comm=MPI.COMM_SELF, cache_memory="40M")
    ids = np.arange(24)
    coupler.register(ids, [cell(i) for i in ids])
    for t in (0.5, 1.0, 1.0):
        F = np.eye(2) + t * (F_LOAD - np.eye(2))
        result = coupler.evaluate(np.tile(F, (len(ids), 1, 1)), ids)
        assert (result.source == 1).all()  # every point on the fine solver
        peak[0] = max(peak[0], resident_bytes() - rss0)
        assert coupler.cache.memory_bytes() <= budget
    cache = coupler.cache
    states = sum(a.nbytes for s in (*cache._saved.values(),
                                    *(v.states for v in cache._live.values()))
                 for state in s.values() for a in state if a is not None)
    assert cache.hibernations >= 24 and cache.builds == 24  # hibernated and woken
    assert cache.largest * 24 > 3 * budget  # what keeping them all would have taken
    assert peak[0] < budget + states + allowance, (peak[0] / MB, states / MB)
    coupler.close()
