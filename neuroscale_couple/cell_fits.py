"""Cell fits: the operator at the points the fine solver has solved, learnt in closed form —
a cold start's (:mod:`~neuroscale_couple.cold_start`), and with ``Policy.cell_fits`` a trained
model's at the points it sent to the fine solver.

At such a point the operator is the energy head's basis mixture W̄ = Σ_k w_k Ψ_k(C̄)
(:func:`~neuroscale_couple.operators.heads.basis_energies`: objective, P̄(I) = 0, a
major-symmetric tangent) with the weights w (K,) of **that cell**, fitted by least squares to
the point's fine solves of its last ``history`` solved load steps (each step's last) — their
stresses and consistent tangents (4 + 16 equations a solve in 2D for K = 14 weights).
Fitting is a K × K solve, so every load step's solves are learnt at its end, in
milliseconds, with no background training.

The bound is split conformal on normalised scores. A fit's error grows with the distance of F̄
from its latest solve F̄ₛ, faster than linearly, so the score of a fine solve at F̄ is

    s = ‖P̄_fine − P̄_fit(F̄)‖ / σ,   σ = ‖Aₛ‖ (‖F̄ − F̄ₛ‖ + δ)³    (δ = 1e-3)

taken with the fit as it stood when the step began (the fit is fixed within a step, so Newton
sees one operator) and at the step's converged loads, where the fits are used from one step to
the next. Scores come only from points no bound chose, drawn at random by point id afresh each
step: the fitted points audited that step (:meth:`CellFits.audited`) and, before any bound
exists, a census of enough fitted points for one, at the end of the step that made the first
fits, scored at the next step's extrapolated loads (:meth:`CellFits.calibrate_ahead`; where
too few points are fitted for a bound, the fitted points fall back in the next steps, and
enough of them are scored at the converged loads, until there is one: :meth:`CellFits.census`).
The bound at the confidence c is q·σ with q the ⌈(n + 1)c⌉-th smallest of the n most recent
scores (whole steps, newest first, until at least ``2 / (1 − c)``), gathered over all ranks,
so every rank holds the same q.

The scores are not quite exchangeable across steps: a fit that no solve refreshed ages, and
the audits that calibrate the next step's bound were drawn among younger fits. The cube keeps
the scores of aged fits from outgrowing those of young ones. Replayed on the 20-step classic
run below (each fit refreshed by audits only), the 95th percentile of the scores over fits
aged 1 to 8 steps grew 30× with σ = ‖Aₛ‖(‖F̄ − F̄ₛ‖ + δ), 2.4–4.5× with the square, and
stayed within 0.4–1× with the cube. In runs with every point audited (``--audit``) the cube's
bound covered 97.1 % of the 1 801 fitted point-steps of a 20-step cold start (88–100 % a
step; 94.1 % at step 1, calibrated by the census at its extrapolated loads), and 98.0 / 100 /
100 / 99.0 % in the four fitted steps of a 5-step run with 4× larger load steps. An earlier
design (scores at Newton iterates, σ the distance alone) had covered 60 / 41 / 65 % there.

Measured on the cold-start benchmark's classic run (102 points, 20 steps): fitted to a point's
last three converged solves, P̄ five load steps ahead is off by 0.01–0.07 % of ‖P̄‖ (95th
percentile), against 0.9–2.8 % for the linearisation P̄ₛ + Aₛ:ΔF̄ of the latest solve.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Mapping, Sequence

from mpi4py import MPI

import numpy as np
import torch

from neuroscale_couple.errors import CheckpointError
from neuroscale_couple.operators.heads import EnergyHead, mixture_response
from neuroscale_couple.run_scores import RunScores

N_WEIGHTS = 2 + 2 * EnergyHead.n_directions
"""Weights K of a cell's energy: the plane-strain basis without the quartic terms (14)."""

TANGENT_WEIGHT = 0.01
"""Weight of a solve's tangent equations against its stress equations (a strain: A·0.01 is a
stress of the size P̄ takes at 1 % strain)."""

OFFSET = 1e-3
"""δ of the score's normaliser σ = ‖Aₛ‖ (‖F̄ − F̄ₛ‖ + δ)³: a strain below which the fit's own
residual at its solves, not the distance, sets the error."""


def basis_responses(F: np.ndarray, n_weights: int = N_WEIGHTS) -> tuple[np.ndarray, np.ndarray]:
    """Stress and tangent of each basis energy Ψ_k at F̄ (n, 2, 2): (n, K, 2, 2) and
    (n, K, 2, 2, 2, 2) — P̄ and A of weights w are Σ_k w_k times them. ``n_weights``: K, that
    of the plane-strain basis with (17) or without (14) the quartic terms."""
    eye = torch.eye(n_weights, dtype=torch.float64)[None]
    r = mixture_response(eye, torch.as_tensor(F, dtype=torch.float64)[:, None])
    return r["stress"].numpy(), r["tangent"].numpy()


def fit_weights(F: np.ndarray, P: np.ndarray, A: np.ndarray, n_weights: int = N_WEIGHTS
                ) -> np.ndarray:
    """Weights w (K,) of the basis mixture closest to the solves at F̄ (m, 2, 2) with stresses
    P̄ (m, 2, 2) and tangents A (m, 2, 2, 2, 2), in least squares (tangent rows weighted by
    :data:`TANGENT_WEIGHT`; columns equilibrated; the least-norm weights where the solves do
    not determine them all, as one solve does not: its 20 equations have rank < K).
    ``n_weights``: K (:func:`basis_responses`)."""
    G, T = basis_responses(F, n_weights)
    m, K = len(F), n_weights
    M = np.concatenate([G.reshape(m, K, -1), TANGENT_WEIGHT * T.reshape(m, K, -1)],
                       axis=2).transpose(0, 2, 1).reshape(-1, K)
    b = np.concatenate([P.reshape(m, -1), TANGENT_WEIGHT * A.reshape(m, -1)], axis=1).ravel()
    s = np.linalg.norm(M, axis=0) + 1e-300
    return np.linalg.lstsq(M / s, b, rcond=1e-12)[0] / s


class CellFits:
    """The cell fits of one rank's points and their calibration (collective at
    :meth:`end_step`).

    ``confidence``: the bound's; ``history``: solves a fit is made of (the latest ones);
    ``audit``: the share of the fitted points audited each step, drawn by (``seed``, step,
    point id)."""

    def __init__(self, confidence: float, history: int = 3, audit: float = 0.1,
                 seed: int = 0) -> None:
        self.history = history
        self.scores = RunScores(confidence, audit, seed, name="fits")  # the fits' bound
        self._solves: dict[int, deque] = {}  # point id → its latest (F, P, A)
        self._changed: set[int] = set()
        self._weights = np.zeros((0, N_WEIGHTS))
        self._anchor = np.zeros((0, 2, 2))  # each fitted point's latest solve F̄ₛ
        self._scale = np.zeros(0)  # … and ‖Aₛ‖
        self._row: dict[int, int] = {}  # point id → row of the arrays above
        self._sorted_ids = np.zeros(0, dtype=np.int64)  # … as arrays, for vectorised lookups
        self._sorted_rows = np.zeros(0, dtype=np.int64)
        self._scored: set[int] = set()  # points scored this step
        self._moments = np.zeros(3)  # this step's solves: stress entries, their sum, squares
        self._total = np.zeros(3)  # … of all steps and ranks so far

    @property
    def stress_scale(self) -> float:
        """The standard deviation of the stress components of all solves so far, all ranks
        (σ_ref of a model trained on them)."""
        n, total, squares = self._total
        return math.sqrt(max(squares / n - (total / n) ** 2, 0.0)) if n else 0.0

    @property
    def quantile(self) -> float:
        """q of the fits' bound q·σ (inf while there are too few scores)."""
        return self.scores.quantile

    @property
    def calibrated(self) -> bool:
        """Whether the fits have a finite bound (enough scores)."""
        return self.scores.calibrated

    def audited(self, ids: np.ndarray, step: int) -> np.ndarray:
        """Whether each point (ids (n,)) is audited in load step ``step``: fitted and drawn
        (a uniform draw by point id below ``audit``, the same on any partition), (n,) bool."""
        return self.scores.audited(ids, step) & self.fitted(ids)

    def fitted(self, ids: np.ndarray) -> np.ndarray:
        """Whether each point (ids (n,)) has a fit, (n,) bool."""
        return self._lookup(ids)[1]

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the points ``ids`` (n,) in the fit arrays (n,) and whether each has a fit
        (n,) bool, without a Python loop over the points (this runs every evaluation)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self._sorted_ids):
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self._sorted_ids) - 1)
        return self._sorted_rows[pos], self._sorted_ids[pos] == ids

    def predict(self, ids: np.ndarray, F: np.ndarray) -> dict[str, np.ndarray]:
        """``stress`` (n, 2, 2), ``tangent`` (n, 2, 2, 2, 2), ``energy`` (n,) of the fits of
        the points ``ids`` (n,) (each must have one) at F̄ (n, 2, 2), and ``sigma`` (n,), the
        score's normaliser: the bound is ``quantile · sigma`` (stress units)."""
        rows = self._lookup(ids)[0]
        r = mixture_response(torch.from_numpy(self._weights[rows]), torch.as_tensor(F))
        dist = np.linalg.norm((F - self._anchor[rows]).reshape(len(rows), -1), axis=1)
        return {"stress": r["stress"].numpy(), "tangent": r["tangent"].numpy(),
                "energy": r["energy"].numpy(), "sigma": self._scale[rows] * (dist + OFFSET) ** 3}

    def census(self, ids: np.ndarray, step: int, comm: MPI.Comm) -> np.ndarray:
        """Whether each point (ids (n,)) is scored in the census of load step ``step``, the
        step before any bound exists (collective): fitted points drawn by point id as audits
        are, as many as a bound is pooled from (``2 / (1 − c)``) over all ranks, at least the
        audited share; (n,) bool."""
        return self.scores.census(ids, step, self.fitted(ids), comm)

    def score(self, pid: int, F: np.ndarray, P: np.ndarray) -> None:
        """Score the fit of point ``pid`` (it must have one) against a fine solve at F̄ (2, 2)
        with stress P̄ (2, 2), once a step: at the step's converged loads, by a point no bound
        chose."""
        if pid in self._scored:
            return
        p = self.predict(np.array([pid]), F[None])
        self.scores.add(float(np.linalg.norm(P - p["stress"][0]) / p["sigma"][0]))
        self._scored.add(pid)

    def calibrate_ahead(self, ids: np.ndarray, F: np.ndarray, P: np.ndarray, comm: MPI.Comm
                        ) -> None:
        """Score the fits of the points ``ids`` (m,) against fine solves at the next step's
        extrapolated loads F̄ (m, 2, 2), stresses P̄ (m, 2, 2), and recalibrate on them
        (collective): the census that gives the first bound, the fits being those that serve
        the next step."""
        if len(ids):
            p = self.predict(ids, F)
            for s in np.linalg.norm(P - p["stress"], axis=(1, 2)) / p["sigma"]:
                self.scores.add(float(s))
        self.scores.end_step(comm)

    def observe(self, pid: int, F: np.ndarray, P: np.ndarray, A: np.ndarray) -> None:
        """Take a fine solve of point ``pid`` at F̄ (2, 2): stress P̄ (2, 2), tangent A
        (2, 2, 2, 2); learnt at :meth:`end_step`. A fit is made of the last solve of each of
        the point's latest ``history`` solved steps (the one closest to the converged loads),
        so its solves lie a load step apart wherever it is fitted."""
        self._moments += (P.size, P.sum(), np.sum(P * P))
        solves = self._solves.setdefault(pid, deque(maxlen=self.history))
        if pid in self._changed:  # solved before in this step: the later solve replaces it
            solves.pop()
        solves.append((F.copy(), P.copy(), A.copy()))
        self._changed.add(pid)

    def end_step(self, comm: MPI.Comm) -> int:
        """Refit the points solved this step and recalibrate on the step's scores of all
        ranks (collective); returns the number of points refitted over all ranks."""
        self._fit_changed()
        refitted = comm.allreduce(len(self._changed))
        self._total += comm.allreduce(self._moments)
        self._moments[:] = 0
        self.scores.end_step(comm)
        self._changed.clear()
        self._scored.clear()
        return refitted

    def _fit_changed(self) -> None:
        """Fit the points solved since the last fit (their rows added where new)."""
        new = [pid for pid in self._changed if pid not in self._row]
        if new:  # the arrays grow once a step, the lookup is sorted anew
            for pid in new:
                self._row[pid] = len(self._row)
            self._weights = np.concatenate([self._weights, np.zeros((len(new), N_WEIGHTS))])
            self._anchor = np.concatenate([self._anchor, np.zeros((len(new), 2, 2))])
            self._scale = np.concatenate([self._scale, np.zeros(len(new))])
            ids = np.fromiter(self._row, dtype=np.int64, count=len(self._row))
            order = np.argsort(ids)
            self._sorted_ids = ids[order]
            self._sorted_rows = np.fromiter(self._row.values(), dtype=np.int64,
                                            count=len(self._row))[order]
        for pid in self._changed:
            F, P, A = (np.stack(x) for x in zip(*self._solves[pid], strict=True))
            r = self._row[pid]
            self._weights[r] = fit_weights(F, P, A)
            self._anchor[r], self._scale[r] = F[-1], np.linalg.norm(A[-1])

    def state(self) -> dict[str, np.ndarray]:
        """This rank's fits as named arrays (``fits/…``, bit-exact through ``np.savez``; taken
        between load steps): each point's latest solves — its fit is made of them again on
        restore — and the calibration's scores and solve moments (all ranks', the same on
        every rank)."""
        ids = np.array(sorted(self._solves), dtype=np.int64)
        count = np.array([len(self._solves[pid]) for pid in ids], dtype=np.int64)
        h = max(count, default=0)
        solves = [np.full((len(ids), h, *shape), np.nan) for shape in ((2, 2), (2, 2), (2,) * 4)]
        for k, pid in enumerate(ids.tolist()):
            for j, record in enumerate(self._solves[pid]):
                for array, value in zip(solves, record, strict=True):
                    array[k, j] = value
        return {"fits/id": ids, "fits/count": count, "fits/F": solves[0], "fits/P": solves[1],
                "fits/A": solves[2], "fits/total": self._total.copy(), **self.scores.state()}

    def restore(self, states: Sequence[Mapping[str, np.ndarray]], point_ids: Collection[int]
                ) -> None:
        """Take the fits of ``point_ids`` (this rank's points) from :meth:`state` arrays: this
        rank's own, or every rank's of a run on another number of ranks (not collective: the
        calibration is in every rank's state). A state without fits raises
        :class:`~neuroscale_couple.errors.CheckpointError`."""
        if any("fits/id" not in s for s in states):
            raise CheckpointError("the checkpoint has no cell fits (it is of a run without "
                                  "them): restart with the settings it was written with")
        mine = set(map(int, point_ids))
        for s in states:
            for pid, n, F, P, A in zip(s["fits/id"].tolist(), s["fits/count"].tolist(),
                                       s["fits/F"], s["fits/P"], s["fits/A"], strict=True):
                if pid in mine:
                    self._solves[pid] = deque(zip(F[:n], P[:n], A[:n], strict=True),
                                              maxlen=self.history)
                    self._changed.add(pid)
        self._fit_changed()
        self._changed.clear()
        self._total = np.array(states[0]["fits/total"], dtype=float)
        self.scores.restore(states[0])
