"""Split conformal on the run's own fine solves: scores of an operator against fine solves at
points drawn at random by point id, pooled over the newest load steps and all ranks.

A bound ``q · u`` (``u`` the operator's uncertainty measure at a point, ``q`` the conformal
quantile of the scores ``s = ‖P̄_fine − P̄_op‖ / u``) then holds at confidence c over the run's
points, the way a bound calibrated on a held-out data set holds over that set's mix. The
points are drawn by (seed, load step, point id), the same on any partition, and a bound is
pooled from ``2 / (1 − c)`` scores (40 at 0.95) of the newest steps. Two operators use it:
the cell fits (:mod:`~neuroscale_couple.cell_fits`: a census of that many points before the
first bound, then an audited share a step, at the step's converged loads) and a network
operator's bound at the run's material (:class:`~neuroscale_couple.coupler.Policy`
``run_calibration``: a census of exactly that many points every step, at the next step's
extrapolated loads).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

from mpi4py import MPI

import numpy as np

from neuroscale_couple.calibration import conformal_quantile
from neuroscale_couple.sampling import uniform_by_id


class RunScores:
    """Scores of one operator over a run, and its conformal quantile (collective at
    :meth:`end_step`; every rank holds the same quantile).

    ``confidence``: the bound's; ``audit``: the share of the eligible points drawn each step
    once a bound exists; ``seed``: of the draws; ``name``: the prefix of the checkpoint
    arrays (:meth:`state`)."""

    def __init__(self, confidence: float, audit: float, seed: int = 0,
                 name: str = "scores") -> None:
        self.confidence, self.audit, self.seed, self.name = confidence, audit, seed, name
        self._step_scores: list[float] = []
        self._history: deque = deque()  # per step with scores (sorted), newest last
        self.quantile = math.inf

    @property
    def need(self) -> int:
        """Scores a bound is pooled from: ``2 / (1 − c)`` (40 at 0.95), twice the fewest that
        give a finite quantile."""
        return math.ceil(2 / (1 - self.confidence))

    @property
    def calibrated(self) -> bool:
        """Whether there is a finite bound (enough scores)."""
        return math.isfinite(self.quantile)

    def audited(self, ids: np.ndarray, step: int) -> np.ndarray:
        """Whether each point (ids (n,)) is drawn for the audit of load step ``step``: a
        uniform draw by point id below ``audit`` (the same on any partition), (n,) bool."""
        return uniform_by_id(ids, self.seed, step) < self.audit

    def census(self, ids: np.ndarray, step: int, eligible: np.ndarray, comm: MPI.Comm
               ) -> np.ndarray:
        """Whether each point (ids (n,)) is scored in the census of load step ``step`` (the
        step before any bound exists; collective): ``eligible`` (n,) points drawn as audits
        are, as many as a bound is pooled from over all ranks (at least the audited share);
        (n,) bool."""
        share = max(self.audit, self.need / max(comm.allreduce(int(eligible.sum())), 1))
        return (uniform_by_id(ids, self.seed, step) < share) & eligible

    def census_exact(self, ids: np.ndarray, step: int, eligible: np.ndarray, comm: MPI.Comm
                     ) -> np.ndarray:
        """Exactly :attr:`need` of the ``eligible`` (n,) points over all ranks (all of them
        where there are fewer): those of the smallest draws by point id, the same on any
        partition (collective; each rank sends at most :attr:`need` candidates); (n,) bool."""
        ids = np.asarray(ids, dtype=np.int64)
        u = uniform_by_id(ids, self.seed, step)
        mine = sorted(zip(u[eligible].tolist(), ids[eligible].tolist(), strict=True))[:self.need]
        chosen = sorted(e for part in comm.allgather(mine) for e in part)[:self.need]
        return np.isin(ids, [pid for _, pid in chosen]) & eligible

    def add(self, score: float) -> None:
        """One score of this step (this rank's)."""
        self._step_scores.append(score)

    def end_step(self, comm: MPI.Comm) -> None:
        """Pool the step's scores of all ranks and recalibrate (collective)."""
        scores = np.concatenate(comm.allgather(np.array(self._step_scores)))
        if len(scores):
            self._history.append(np.sort(scores))
        self._step_scores.clear()
        self._calibrate()

    def reset(self) -> None:
        """Forget every score (the operator changed): no bound until the next census."""
        self._step_scores.clear()
        self._history.clear()
        self.quantile = math.inf

    def state(self) -> dict[str, np.ndarray]:
        """The pooled scores as named arrays (``<name>/scores``, ``<name>/score_steps``;
        taken between load steps, the same on every rank)."""
        steps = list(self._history)
        return {f"{self.name}/scores": np.concatenate(steps) if steps else np.zeros(0),
                f"{self.name}/score_steps": np.array([len(s) for s in steps], dtype=np.int64)}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Take the scores of a :meth:`state` (any rank's)."""
        counts = np.asarray(state[f"{self.name}/score_steps"])
        bounds = np.cumsum(counts)[:-1]
        self._history = deque(np.split(np.asarray(state[f"{self.name}/scores"]), bounds)
                              if len(counts) else [])
        self._step_scores.clear()
        self._calibrate()

    def _calibrate(self) -> None:
        """q from the newest steps' scores, at least :attr:`need` of them where there are."""
        pooled: list[np.ndarray] = []
        for scores in reversed(self._history):
            if sum(map(len, pooled)) >= self.need:
                break
            pooled.append(scores)
        while len(self._history) > len(pooled):  # older steps are never needed again
            self._history.popleft()
        self.quantile = conformal_quantile(np.concatenate(pooled) if pooled else np.zeros(0),
                                           self.confidence)
