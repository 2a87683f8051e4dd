"""Audit of a coupled run: the operator's answers against the true fine solver at the same F̄.

With ``Coupler(audit=True)`` every load step ends (:meth:`Coupler.end_step`) by solving every
point with the fine solver at the F̄ of the step's last evaluation — the converged state — and
comparing: how often the calibrated bound covered the operator's true error, and how many
points stayed on the operator although their true error exceeded the run's tolerance (false
negatives). It costs a classic FE² solve per point and step, on the rank that owns the point,
with the run's cache of fine solvers (a second cache would double the MPI communicators an RVE
holds, of which MPICH has 2048 per process); the replay store, the retraining data and the
step's timings are not touched, but the solvers' warm starts move to the converged state, so an
audited run's later fine solves start elsewhere (same answers to the fine solver's tolerance).
A benchmark tool (bench/coupled_speedup.py's ``audit`` run), not a production setting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mpi4py import MPI

import numpy as np

from neuroscale_couple.errors import SolveError
from neuroscale_couple.fine import SolverCache

log = logging.getLogger(__name__)


@dataclass
class AuditReport:
    """One load step's audit (global counts over all ranks).

    ``points``; ``operator_points`` (answered by the operator); ``covered`` (operator points
    whose error ‖P̄_op − P̄_true‖ was within their bound); ``false_negatives`` (operator points
    whose error exceeded the run's tolerance atol + rtol·‖P̄_true‖);
    ``false_negatives_relative`` (operator points whose error exceeded rtol·‖P̄_true‖, each
    point's own stress: the tolerance without its absolute part); ``failed`` (points whose
    audit solve failed, left out); ``max_relative_error`` (largest ‖P̄_op − P̄_true‖ /
    ‖P̄_true‖ over the operator points, 0 if none)."""

    points: int
    operator_points: int
    covered: int
    false_negatives: int
    false_negatives_relative: int
    failed: int
    max_relative_error: float

    def as_dict(self) -> dict:
        return asdict(self)


class Auditor:
    """Fine solves of every point at the last evaluated F̄ (see the module docstring), with the
    fine solvers of ``cache`` (the Coupler's)."""

    def __init__(self, cache: SolverCache) -> None:
        self.cache = cache
        self._last: tuple | None = None

    def remember(self, F: np.ndarray, ids: np.ndarray, structures: Sequence,
                 stress: np.ndarray, bound: np.ndarray, on_operator: np.ndarray) -> None:
        """Keep an evaluation of this rank's points: F̄, P̄ (n, 2, 2), bound and which were
        answered by the operator (n,)."""
        self._last = (F.copy(), ids.copy(), list(structures), stress.copy(), bound.copy(),
                      on_operator.copy())

    def check(self, comm: MPI.Comm, atol: float, rtol: float) -> AuditReport:
        """Solve the remembered points and compare (collective)."""
        counts = np.zeros(6, dtype=np.int64)
        worst = 0.0
        if self._last is not None:
            F, ids, structures, stress, bound, on_operator = self._last
            self.cache.new_pass()
            for j in range(len(F)):
                solver = self.cache.get(structures[j].key, structures[j])
                try:
                    true = solver.solve(F[j], point_ids=[int(ids[j])], tangent=False).stress[0]
                except SolveError as err:
                    log.warning("audit: fine solve of point %d failed: %s", ids[j], err)
                    counts[5] += 1
                    continue
                counts[0] += 1
                if not on_operator[j]:
                    continue
                error, size = np.linalg.norm(stress[j] - true), np.linalg.norm(true)
                counts[1:5] += (1, error <= bound[j], error > atol + rtol * size,
                                error > rtol * size)
                worst = max(worst, error / size if size > 0 else np.inf)
        self._last = None
        total = comm.allreduce(counts)
        return AuditReport(int(total[0] + total[5]), *(int(c) for c in total[1:]),
                           comm.allreduce(worst, op=MPI.MAX))


def summarise(reports: Sequence[dict]) -> dict:
    """Totals over load steps of :class:`AuditReport` dicts: ``point_steps``,
    ``operator_point_steps``, ``coverage`` (covered / operator point-steps; NaN if none),
    ``false_negatives``, ``false_negative_rate`` (of all point-steps),
    ``false_negative_rate_relative`` (against rtol·‖P̄_true‖ alone), ``failed``,
    ``max_relative_error``."""
    total = {k: sum(r[k] for r in reports) for k in (
        "points", "operator_points", "covered", "false_negatives", "false_negatives_relative",
        "failed")}
    audited = max(1, total["points"] - total["failed"])
    return {"point_steps": total["points"], "operator_point_steps": total["operator_points"],
            "coverage": (total["covered"] / total["operator_points"]
                         if total["operator_points"] else float("nan")),
            "false_negatives": total["false_negatives"],
            "false_negative_rate": total["false_negatives"] / audited,
            "false_negative_rate_relative": total["false_negatives_relative"] / audited,
            "failed": total["failed"],
            "max_relative_error": max((r["max_relative_error"] for r in reports), default=0.0)}
