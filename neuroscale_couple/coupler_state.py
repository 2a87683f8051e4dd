"""What a :class:`~neuroscale_couple.coupler.Coupler` keeps per point between evaluations and
load steps, and its restart state.

A fallback point's last fine solve (:class:`SolvedPoint`) serves later Newton iterates
linearised, the next load step's first iterate among them (``Policy.reuse``); its solve time and
the rank holding its warm-start state steer the load balancing; the fine solvers keep a
warm-start state per point. A restart that lost any of these would solve other points, retrain
on other data and end elsewhere, so :class:`CouplerState` carries all of them, as NumPy arrays
that an npz file stores bit for bit.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from neuroscale_couple.errors import CheckpointError
from neuroscale_couple.fine import pack_states, unpack_states


class FineAnswer(NamedTuple):
    """One point's fine solve: stress P (d, d) and tangent A (d, d, d, d) (None if it failed),
    energy density W (NaN if not reported), ``noise`` ‖stress standard error‖ (None for a
    solver that reports none), the solve's seconds without the solver's build, and the rank
    that solved it."""

    P: np.ndarray | None
    A: np.ndarray | None
    W: float
    noise: float | None
    time_s: float
    rank: int


@dataclass
class SolvedPoint:
    """A point's fine solve of this load step, served linearised to later iterates
    (:class:`~neuroscale_couple.coupler.Policy` ``reuse``): at F (d, d), its answer, and the
    operator's stress at F (d, d; zeros without a model)."""

    F: np.ndarray
    answer: FineAnswer
    op_stress: np.ndarray


@dataclass
class CouplerState:
    """One rank's restart state of a Coupler, taken between load steps.

    rank, ranks : the rank that took it and the number of ranks of the run.
    step, evaluations : the last load step ended; the evaluations so far (replay records).
    version : the model's online version.
    new_since_retrain : fine solves since the last retraining (retraining at the same steps).
    retrain_rate : seconds per sample-epoch of the last retraining (None: none yet).
    background_step : the step whose background retraining is still running (None: none).
    solved : this rank's points' last fine solves (successful ones), by point id.
    cost_s, last_rank : per point id of this rank, its last solve's seconds and the rank
        holding its warm-start state.
    warm : the warm-start states this rank's fine solvers hold: (structure key, point id,
        state) (see :func:`~neuroscale_couple.fine.pack_states`).
    """

    rank: int
    ranks: int
    step: int
    evaluations: int
    version: int
    new_since_retrain: int = 0
    retrain_rate: float | None = None
    background_step: int | None = None
    solved: dict[int, SolvedPoint] = field(default_factory=dict)
    cost_s: dict[int, float] = field(default_factory=dict)
    last_rank: dict[int, int] = field(default_factory=dict)
    warm: list[tuple[Hashable, int, object]] = field(default_factory=list)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays, bit-exact through ``np.savez`` (None is stored as NaN or −1)."""
        ids = sorted(self.solved)
        points = [self.solved[i] for i in ids]
        answers = [p.answer for p in points]
        cost_ids = sorted(self.cost_s)
        d = len(points[0].F) if points else 2  # no points: empty arrays of any d read back

        def stack(values, shape):
            return np.array(values, dtype=float).reshape(len(values), *shape)

        return {
            "rank": np.array(self.rank), "ranks": np.array(self.ranks),
            "step": np.array(self.step), "evaluations": np.array(self.evaluations),
            "version": np.array(self.version),
            "new_since_retrain": np.array(self.new_since_retrain),
            "retrain_rate": np.array(np.nan if self.retrain_rate is None else self.retrain_rate),
            "background_step": np.array(-1 if self.background_step is None
                                        else self.background_step),
            "solved/id": np.array(ids, dtype=np.int64),
            "solved/F": stack([p.F for p in points], (d, d)),
            "solved/op_stress": stack([p.op_stress for p in points], (d, d)),
            "solved/P": stack([a.P for a in answers], (d, d)),
            "solved/A": stack([a.A for a in answers], (d, d, d, d)),
            "solved/W": stack([a.W for a in answers], ()),
            "solved/noise": stack([np.nan if a.noise is None else a.noise for a in answers], ()),
            "solved/time_s": stack([a.time_s for a in answers], ()),
            "solved/rank": np.array([a.rank for a in answers], dtype=np.int64),
            "points/id": np.array(cost_ids, dtype=np.int64),
            "points/cost_s": stack([self.cost_s[i] for i in cost_ids], ()),
            "points/last_rank": np.array([self.last_rank.get(i, -1) for i in cost_ids],
                                         dtype=np.int64),
            **pack_states(self.warm, "warm"),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> CouplerState:
        """The state that :meth:`to_arrays` wrote; a missing array raises
        :class:`CheckpointError`."""
        try:
            a = {k: np.asarray(v) for k, v in arrays.items()}
            ids = a["solved/id"].tolist()
            answers = [FineAnswer(P, A, float(W), None if np.isnan(noise) else float(noise),
                                  float(t), int(r))
                       for P, A, W, noise, t, r in zip(
                           a["solved/P"], a["solved/A"], a["solved/W"], a["solved/noise"],
                           a["solved/time_s"], a["solved/rank"], strict=True)]
            solved = {i: SolvedPoint(F, answer, op)
                      for i, F, answer, op in zip(ids, a["solved/F"], answers,
                                                  a["solved/op_stress"], strict=True)}
            cost_ids = a["points/id"].tolist()
            rate, background = float(a["retrain_rate"]), int(a["background_step"])
            return cls(rank=int(a["rank"]), ranks=int(a["ranks"]), step=int(a["step"]),
                       evaluations=int(a["evaluations"]), version=int(a["version"]),
                       new_since_retrain=int(a["new_since_retrain"]),
                       retrain_rate=None if np.isnan(rate) else rate,
                       background_step=None if background < 0 else background,
                       solved=solved,
                       cost_s=dict(zip(cost_ids, a["points/cost_s"].tolist(), strict=True)),
                       last_rank={i: r for i, r in zip(cost_ids, a["points/last_rank"].tolist(),
                                                       strict=True) if r >= 0},
                       warm=unpack_states(a, "warm"))
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"a Coupler checkpoint state without the arrays it needs "
                                  f"({err!r}): it was written by another NeuroScale version or "
                                  "damaged; delete the checkpoint and start the run afresh"
                                  ) from None

    @classmethod
    def merge(cls, states: Sequence[CouplerState], point_ids: Collection[int], rank: int,
              ranks: int) -> CouplerState:
        """The state of rank ``rank`` of ``ranks`` owning ``point_ids``, from the states of all
        ranks of a run on another number of ranks: its points' records, with their warm starts
        held here."""
        first, mine = states[0], set(point_ids)
        return cls(
            rank=rank, ranks=ranks, step=first.step, evaluations=first.evaluations,
            version=first.version, new_since_retrain=first.new_since_retrain,
            retrain_rate=first.retrain_rate, background_step=first.background_step,
            solved={i: p for s in states for i, p in s.solved.items() if i in mine},
            cost_s={i: t for s in states for i, t in s.cost_s.items() if i in mine},
            last_rank={i: rank for s in states for i in s.cost_s if i in mine},
            warm=[w for s in states for w in s.warm if w[1] in mine])
