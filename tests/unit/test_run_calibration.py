"""Run calibration (``Policy.run_calibration``): a family operator's bound recalibrated on a
census of the run's own points, solved at the next step's extrapolated loads."""

from __future__ import annotations

from typing import ClassVar

from mpi4py import MPI

import numpy as np
import pytest
import torch

from neuroscale_couple.calibration import Calibration, conformal_quantile
from neuroscale_couple.coupler import OPERATOR, RUN_SEED, Coupler, Policy
from neuroscale_couple.errors import InputError
from neuroscale_couple.fine import FineSolver, MicroResult
from neuroscale_couple.operators.sano import SANO, SANOConfig
from neuroscale_couple.run_scores import RunScores
from neuroscale_couple.solvers.microstructure import random_fibres

FAMILY = {"law": "neo_hookean", "matrix": {"E": 3.0, "nu": 0.3}, "fibre": {"E": 20.0, "nu": 0.25}}
RANGES = {"contrast": [1.0, 100.0], "matrix_nu": [0.2, 0.45], "fibre_nu": [0.2, 0.45]}


class Linear(FineSolver):
    """P̄ = k (F̄ − I) with k from the cell's fibre count, counting its solves."""

    solves = 0
    solved: ClassVar[list[int]] = []

    def __init__(self, cell) -> None:
        super().__init__()
        self.k = 1.0 + 0.1 * len(cell.centres)

    def solve(self, F, *, point_ids=None, tangent=True, fields_resolution=None):
        Linear.solves += 1
        Linear.solved += list(point_ids or [])
        F = np.reshape(F, (-1, 2, 2))
        A = self.k * np.einsum("ik,jl->ijkl", np.eye(2), np.eye(2))[None].repeat(len(F), 0)
        return MicroResult(self.k * (F - np.eye(2)), A, None, {})


def model(family: bool = True) -> SANO:
    torch.manual_seed(0)
    m = SANO(SANOConfig(resolution=16, width=8, modes=4, levels=2, heads=2, latent=16, hidden=16,
                        members=2, energy_correction=False,
                        phase_ranges=RANGES if family else None)).double()
    m.card = {"data_config": {"image_resolution": 32}}
    q = {0.5: 1.0, 0.9: 2.0, 0.95: 3.0}
    m.calibration = Calibration(1.0, q, dict(q), 100).to_dict()
    return m


def coupler(run_calibration: bool | None = True, n: int = 60) -> tuple[Coupler, np.ndarray]:
    c = Coupler(model(), Linear, family=FAMILY, comm=MPI.COMM_SELF,
                policy=Policy(rtol=1e9, atol=1e9, run_calibration=run_calibration))
    ids = np.arange(n)
    c.register(ids, [random_fibres(0.2 + 0.002 * k, 1 + k % 5, seed=k) for k in ids])
    return c, ids


def loads(ids: np.ndarray, t: float) -> np.ndarray:
    """F̄ of each point at load factor t: stretch and shear varying with the id."""
    g = np.stack([np.array([[1.0, 0.3], [0.0, -0.4]]) * (1 + 0.02 * (i % 9)) for i in ids])
    return np.eye(2) + 0.05 * t * g


def test_a_family_runs_bound_is_its_census_quantile_at_the_next_steps_loads():
    c, ids = coupler()
    plain, _ = coupler(run_calibration=False)
    assert c.run_scores is not None and plain.run_scores is None
    c.begin_step(0)
    r = c.evaluate(loads(ids, 1.0), ids)
    assert np.all(r.source == OPERATOR)
    Linear.solves = 0
    report = c.end_step(steps_left=2)
    # exactly 2 / (1 − 0.95) = 40 points, solved at 2F̄₀ − I (the loads of step 1 if it goes on)
    assert report.run_scored == 40 and Linear.solves == 40 and report.fine_solves == 40
    drawn = RunScores(0.95, 0.0, RUN_SEED).census_exact(ids, 0, np.ones(len(ids), bool),
                                                         MPI.COMM_SELF)
    ahead = loads(ids[drawn], 2.0)
    plain.begin_step(0)
    own = plain.evaluate(ahead, ids[drawn])
    truth = np.stack([Linear(random_fibres(0.2 + 0.002 * k, 1 + k % 5, seed=k)).solve(F).stress[0]
                      for k, F in zip(ids[drawn], ahead, strict=True)])
    scores = np.linalg.norm(truth - own.stress, axis=(1, 2)) / own.uncertainty
    q = conformal_quantile(scores, 0.95)
    assert report.run_bound_factor == pytest.approx(q, rel=1e-10)
    # the next step's bound is q times the model's own at every point
    c.begin_step(1)
    plain.begin_step(1)
    F1 = loads(ids, 2.1)
    np.testing.assert_allclose(c.evaluate(F1, ids).uncertainty,
                               q * plain.evaluate(F1, ids).uncertainty, rtol=1e-10)
    # after the last step no census: nothing comes after it
    Linear.solves = 0
    last = c.end_step(steps_left=0)
    assert last.run_scored == 0 and Linear.solves == 0 and last.fine_solves == 0
    for x in (c, plain):
        x.close()


def test_a_restarted_run_calibrates_as_the_uninterrupted_one():
    """The checkpoint keeps the scores and each point's converged F̄ the census extrapolates
    from: the restarted run's next census is the uninterrupted run's."""
    c, ids = coupler()
    c.begin_step(0)
    c.evaluate(loads(ids, 1.0), ids)
    q = c.end_step(steps_left=3).run_bound_factor
    state = c.checkpoint_state()
    back, _ = coupler()
    back.restore_state([state])
    assert back.run_scores.quantile == q and np.isfinite(q)
    factors = []
    for x in (c, back):
        x.begin_step(1)
        x.evaluate(loads(ids, 1.5), ids)
        factors.append(x.end_step(steps_left=2).run_bound_factor)
        x.close()
    assert factors[0] == factors[1] != q


def test_run_calibration_is_on_outside_a_familys_ranges_and_refused_where_it_cannot_run():
    fixed = Coupler(model(family=False), Linear, policy=Policy(rtol=0.05), comm=MPI.COMM_SELF)
    assert fixed.run_scores is None  # a fixed-material model is calibrated at its material
    assert coupler(run_calibration=None)[0].run_scores is None  # inside: the band calibration
    outside = dict(FAMILY, fibre={"E": 600.0, "nu": 0.25})  # contrast 200, with consent
    assert Coupler(model(), Linear, family=outside, comm=MPI.COMM_SELF,
                   policy=Policy(rtol=0.05, outside_material="fallback")).run_scores is not None
    assert Coupler(model(family=False), Linear, policy=Policy(rtol=0.05, run_calibration=True),
                   comm=MPI.COMM_SELF).run_scores is not None
    with pytest.raises(InputError, match="run_calibration recalibrates"):
        Coupler(None, Linear, policy=Policy(rtol=0, run_calibration=True), comm=MPI.COMM_SELF)
    with pytest.raises(InputError, match="run_calibration='yes'"):
        Policy(run_calibration="yes")


@pytest.mark.mpi
def test_the_census_draws_the_same_points_on_any_partition():
    comm = MPI.COMM_WORLD
    ids = np.arange(500)
    eligible = ids % 3 != 0
    scores = RunScores(0.95, 0.0, seed=4)
    whole = ids[scores.census_exact(ids, 7, eligible, MPI.COMM_SELF)]
    assert len(whole) == 40 and np.all(whole % 3 != 0)
    mine = ids % comm.size == comm.rank
    part = ids[mine][scores.census_exact(ids[mine], 7, eligible[mine], comm)]
    np.testing.assert_array_equal(np.sort(np.concatenate(comm.allgather(part))), whole)
    # fewer eligible points than a census needs: all of them
    few = ids < 30
    assert scores.census_exact(ids, 7, few, MPI.COMM_SELF).sum() == 30


@pytest.mark.mpi
def test_a_run_calibrates_the_same_bound_on_any_number_of_ranks():
    comm = MPI.COMM_WORLD
    ids = np.arange(48)
    cells = [random_fibres(0.2 + 0.002 * k, 1 + k % 5, seed=k) for k in ids]
    factors = []
    for group in (MPI.COMM_SELF, comm):
        mine = ids[ids % group.size == group.rank]
        c = Coupler(model(), Linear, family=FAMILY, comm=group,
                    policy=Policy(rtol=1e9, atol=1e9, run_calibration=True))
        c.register(mine, [cells[k] for k in mine])
        c.begin_step(0)
        c.evaluate(loads(mine, 1.0), mine)
        report = c.end_step(steps_left=1)
        assert report.run_scored == 40
        factors.append(report.run_bound_factor)
        c.close()
    assert factors[1] == pytest.approx(factors[0], rel=1e-9)


def test_a_run_outside_the_ranges_hands_points_over_once_its_census_calibrates():
    """Phases outside the family's ranges, run with consent: every point falls back until the
    first census calibrates the bound at the run's material; then the bound decides (without
    run calibration, and without a retraining, every point stays on the fine solver)."""
    outside = dict(FAMILY, fibre={"E": 600.0, "nu": 0.25})  # contrast 200
    sources = {}
    for on in (True, False):
        c = Coupler(model(), Linear, family=outside, comm=MPI.COMM_SELF,
                    policy=Policy(rtol=1e9, atol=1e9, outside_material="fallback",
                                  run_calibration=on))
        ids = np.arange(50)
        c.register(ids, [random_fibres(0.2 + 0.002 * k, 1 + k % 5, seed=k) for k in ids])
        c.begin_step(0)
        assert np.all(c.evaluate(loads(ids, 1.0), ids).source != OPERATOR)
        report = c.end_step(steps_left=1)
        assert report.run_scored == (40 if on else 0)
        c.begin_step(1)
        sources[on] = c.evaluate(loads(ids, 2.0), ids).source
        c.close()
    assert np.all(sources[True] == OPERATOR) and np.all(sources[False] != OPERATOR)


def test_the_census_scores_the_points_the_bound_kept_on_the_operator():
    """The bound's guarantee is wanted where it is used: with a tolerance that sends the
    points of the widest bounds to the fine solver, the census draws among the others."""
    plain, ids = coupler(run_calibration=False)
    plain.begin_step(0)
    F = loads(ids, 1.0)
    cut = float(np.median(plain.evaluate(F, ids).uncertainty))
    plain.close()
    c = Coupler(model(), Linear, family=FAMILY, comm=MPI.COMM_SELF,
                policy=Policy(rtol=0.0, atol=cut, reuse=0.0, run_calibration=True))
    c.register(ids, [random_fibres(0.2 + 0.002 * k, 1 + k % 5, seed=k) for k in ids])
    c.begin_step(0)
    kept = ids[c.evaluate(F, ids).source == OPERATOR]
    assert 0 < len(kept) < 40
    Linear.solved = []
    report = c.end_step(steps_left=1)
    assert report.run_scored == len(kept) and sorted(Linear.solved) == kept.tolist()
    c.close()
