"""The Coupler: operator + uncertainty policy + fallback to the true fine solver + retraining.

At every call (one per macro residual evaluation, collective over the communicator) the Coupler

1. predicts P̄, Σ and ∂P̄/∂F̄ for all of this rank's points with the operator (latents cached per
   point, computed once at :meth:`Coupler.register`);
2. bounds each point's relative stress error at the policy's confidence with the calibrated Σ
   and sends the points over the tolerance — and every point that already fell back in this load
   step (sticky, so Newton keeps its quadratic rate) — to the true fine solver;
3. spreads that fallback work over all ranks by measured solve time (each rank keeps serial RVEs
   per microstructure in an LRU cache and warm-starts each point from its last state), returns
   the results to the owners and appends every fine solve to the replay store;
4. between load steps (:meth:`Coupler.end_step`, never inside a Newton solve) fine-tunes the
   operator on the fallback data plus a sample of its original training data, data-parallel over
   the ranks (encoder frozen, heads trained), recalibrates it, bumps its version and checks that
   all ranks hold the same weights — or, with ``RetrainConfig.background``, trains a copy in a
   thread while the next load step runs and swaps it in at the boundary after that step.

``policy.tol = 0`` is classic FE² (every point on the fine solver; no model needed),
``policy.tol = inf`` never falls back.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch

from neuroscale_couple.calibration import Calibration
from neuroscale_couple.errors import InputError, NeuroScaleError, SolveError
from neuroscale_couple.fine import FineSolver, MicroResult, SolverCache
from neuroscale_couple.parallel import balance, device_for_rank
from neuroscale_couple.store import ReplayStore, load_rve_dataset
from neuroscale_couple.tensors import as_deformation_batch

log = logging.getLogger(__name__)

OPERATOR, FINE, FAILED = 0, 1, 2
SOURCE_NAMES = {OPERATOR: "operator", FINE: "fine", FAILED: "failed"}


@dataclass(frozen=True)
class Policy:
    """When a point falls back to the fine solver.

    A point falls back when the calibrated bound on its stress error at ``confidence`` exceeds
    ``tol`` · max(‖P̄‖, ``stress_floor``) (Frobenius norms, stress units). The floor keeps nearly
    unloaded points from falling back over a tiny absolute error; None means the operator's
    stress scale (the standard deviation of its training stresses).

    ``max_failed_fraction``: a fine solve that fails even with load substeps keeps the operator's
    value and is flagged; the run aborts when more than this fraction of all points failed.

    ``reuse``: with a surrogate in the loop (0 < tol), a fine solve is not repeated while the
    point's F̄ stays within this distance (max component) of where it was taken: P̄ₖ + Aₖ:ΔF̄
    is used, with tangent Aₖ and energy W̄ₖ + P̄ₖ:ΔF̄ + ½ΔF̄:Aₖ:ΔF̄ (ΔF̄ = F̄ − F̄ₖ; a consistent
    quadratic model, so Newton keeps its rate).
    The error is second order, ½|∂²P̄| |F̄ − F̄ₖ|² (the FE² test's displacement moves by 4e-6
    relative, far below a tol one would give a surrogate); the late Newton iterates of a step
    then cost no fine solve, nor does the first iterate of the next step, which starts from
    the converged state where the point's last solve lies (half the solves of a point that
    stays on the fine solver). Classic FE² (tol = 0) always re-solves.

    A noisy fine solve (one that reports ``stress_stderr``, e.g. an MD average) is linearised
    the same way at any tol: a noisy stress is not a smooth function of F̄, so re-solving at
    every Newton iterate would leave Newton chasing the noise. With the operator in the loop
    (0 < tol) it is solved again only where the linearisation's error, estimated with the
    operator's (smooth) stress as ‖P_op(F̄) − P_op(F̄ₖ) − Aₖ:ΔF̄‖, exceeds the solve's own
    standard error ‖s_P‖: closer than that a new MD average would only draw new noise (seen
    in the 300 K HMM benchmark: re-solves 2.1e-3 away differed from the linearisation by
    4–5 % of ‖P̄‖, the noise, and cost Newton an iteration). The estimate holds the
    first-order error too: a finite-temperature solve's Aₖ is the static (0 K) tangent, while
    the operator learnt the thermal average's slope. ``noisy_reuse``: the fixed radius used
    instead in classic runs (tol = 0), which have no operator.

    ``exclude_noise``: for a noisy fine solver whose noise the model's covariance head was
    trained to reproduce (the ``noise`` loss term): the bound is taken on the epistemic part of
    Σ only (ensemble spread, same calibration scale), the error a fallback can remove; the noise
    is in the fine solve as well. And a point falls back only where that bound also exceeds the
    bound of the noise (the aleatoric part, same scale and confidence): elsewhere the fine solve
    would be no closer to the true mean than the operator. Points whose noise bound exceeds
    ``tol`` — a tolerance no fine solve there meets — are counted per step
    (``noise_limited_points``; longer MD averages would lower it). Heuristic: the conformal
    guarantee holds for the full Σ.
    """

    tol: float = 0.02
    confidence: float = 0.95
    stress_floor: float | None = None
    max_failed_fraction: float = 0.01
    reuse: float = 2e-3
    noisy_reuse: float = 2e-3
    exclude_noise: bool = False

    def __post_init__(self) -> None:
        if not self.tol >= 0:  # also catches NaN
            raise InputError(f"tol={self.tol}: the relative stress tolerance must be ≥ 0 (0 = "
                             "classic FE², every point on the fine solver; inf = never fall back)")
        if not 0 < self.confidence < 1:
            raise InputError(f"confidence={self.confidence}: give a probability such as 0.95")
        if self.stress_floor is not None and not self.stress_floor > 0:
            raise InputError(f"stress_floor={self.stress_floor}: must be > 0 (or None)")
        if not 0 <= self.max_failed_fraction <= 1:
            raise InputError(f"max_failed_fraction={self.max_failed_fraction}: must be in [0, 1]")
        for name, what in (("reuse", "0: always re-solve"),
                           ("noisy_reuse", "the classic (tol = 0) radius of noisy solves; "
                                           "0: always re-solve")):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name}={getattr(self, name)}: must be ≥ 0 ({what})")

    @property
    def classic(self) -> bool:
        """True when every point goes to the fine solver (``tol = 0``)."""
        return self.tol == 0


@dataclass
class RetrainConfig:
    """Online fine-tuning between load steps.

    ``anchor`` / ``anchor_calibration``: RVE data sets sampled from the operator's original
    training and calibration data (default: ``<model>.anchor.h5`` and
    ``<model>.anchor_calibration.h5`` next to the model file); up to ``anchor_micro``
    microstructures of each are mixed in so the operator does not forget its training range.
    Retraining runs after a step in which at least ``min_fallback_fraction`` of all points fell
    back (evidence that the loading left the operator's range; scattered in-range fallbacks do
    not pay for a retraining) and at least ``min_new`` fine solves arrived since the last one;
    it trains in float32 (the run evaluates in float64);
    ``calibration_fraction`` of the new samples are held out for recalibration.
    ``replay_from``: replay directories of earlier runs whose fine solves join the training data
    (and :meth:`Coupler.warm_start` fine-tunes on them for ``warm_start_epochs`` before the first
    step).
    ``background``: a retraining due after step k trains a copy of the operator in a thread
    (collectives on a duplicate communicator; needs MPI_THREAD_MULTIPLE) while step k + 1 runs
    on the old one, and is swapped in after step k + 1 (waiting for it if it is not done). The
    swap step does not depend on timing, so runs stay reproducible and rank-count independent.
    ``cost_aware``: a due retraining runs only if its estimated wall time is below the fine-solve
    time it could save — this step's fallback time × the steps it would serve (``steps_left``,
    one when unknown; one less in background mode), i.e. assuming it removed every fallback.
    The estimate is seconds per sample-epoch × samples × epochs, measured by the last
    retraining, or before the first one by two epochs on a copy of the operator. Skipped data
    stay counted for the next step's decision. The retraining steps then depend on measured
    times: off by default, so runs are reproducible.
    """

    enabled: bool = True
    background: bool = False
    cost_aware: bool = False
    min_new: int = 8
    min_fallback_fraction: float = 0.05
    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    lr_final: float = 5e-5
    anchor: str | Path | None = None
    anchor_calibration: str | Path | None = None
    anchor_micro: int = 32
    calibration_fraction: float = 0.25
    replay_from: tuple[str | Path, ...] = ()
    warm_start_epochs: int = 150
    weights: dict[str, float] = field(default_factory=lambda: {"stress": 1.0, "tangent": 0.2,
                                                               "nll": 0.05, "noise": 1.0})


@dataclass
class CouplerResult:
    """Response of n points: ``stress`` (n, 2, 2), ``tangent`` (n, 2, 2, 2, 2), ``uncertainty``
    (n,) calibrated relative error bound at the policy's confidence (NaN where no operator ran),
    ``source`` (n,) OPERATOR / FINE / FAILED, ``energy`` (n,) strain energy density W̄ with
    P̄ = ∂W̄/∂F̄ (stress units; NaN where the fine solver reports no ``energy_density``)."""

    stress: np.ndarray
    tangent: np.ndarray
    uncertainty: np.ndarray
    source: np.ndarray
    energy: np.ndarray


class Coupler(FineSolver):
    """Operator with uncertainty-triggered fallback; see the module docstring.

    Parameters
    ----------
    model : the trained, calibrated operator (a :class:`~neuroscale_couple.operators.sano.SANO`,
        a :class:`~neuroscale_couple.operators.crystal.CrystalOperator`, ...);
        None only for classic FE² (``policy.tol = 0``).
    fine_factory : builds the fine solver of one structure on ``MPI.COMM_SELF`` (e.g.
        ``lambda m: rve_from_config(cfg, m)``, ``Crystal.solver``).
    family : the fine solver's material config, checked against the model.
    policy : fallback policy.
    comm : the communicator of the macro problem; every method but :meth:`solve_local` and
        :meth:`register` is collective.
    replay_dir : where fine solves are stored (None: not stored, no retraining).
    retrain : online fine-tuning settings (None or ``enabled=False``: none).
    model_path : the model file (to find the anchor data sets next to it).
    cache_size : live fine solvers per rank.
    """

    implemented_properties = ("stress", "tangent", "uncertainty")

    def __init__(self, model, fine_factory: Callable[[object], FineSolver], *,
                 family: dict | None = None, policy: Policy | None = None,
                 comm: MPI.Comm = MPI.COMM_WORLD, replay_dir: str | Path | None = None,
                 retrain: RetrainConfig | None = None, model_path: str | Path | None = None,
                 cache_size: int = 128, dtype: torch.dtype = torch.float64) -> None:
        self.policy = policy or Policy()
        self.comm = comm
        if model is None and not self.policy.classic:
            raise InputError(f"tol={self.policy.tol} needs a trained model: give --model, or "
                             "use tol=0 (classic FE²)")
        if model is not None:  # all checks before the first collective call
            if not self.policy.classic and not math.isinf(self.policy.tol):
                if not model.calibration:
                    raise InputError("the model is not calibrated: run `neuroscale calibrate` "
                                     "before using it with a finite tol")
                Calibration.from_dict(model.calibration).norm_radius(self.policy.confidence)
            if family is not None:
                model.check_family(family)
            weights = (model.card.get("training") or {}).get("weights") or {}
            if self.policy.exclude_noise and not weights.get("noise", 0) > 0:
                raise InputError("exclude_noise needs a model whose covariance head learned the "
                                 "fine solver's noise (trained with the `noise` loss term); "
                                 "this one was not: drop exclude_noise")
        self.model = model
        self.version = 0
        self.device = device_for_rank(comm)
        if model is not None:
            self.model = model.to(self.device, dtype).eval()
            self.version = int(model.card.get("online_version", 0))
            log.info("rank %d: operator on %s", comm.rank, self.device)
        self.retrain = retrain if (retrain is not None and retrain.enabled and replay_dir
                                   and model is not None) else None
        self._pending: _Background | None = None
        self._bg_comm: MPI.Comm | None = None
        if self.retrain is not None and self.retrain.background:
            if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
                raise InputError("background retraining needs MPI initialised with "
                                 "MPI_THREAD_MULTIPLE (mpi4py's default): drop "
                                 "mpi4py.rc.thread_level, or retrain in the foreground")
            self._bg_comm = comm.Dup()
        self._anchor = self._anchor_paths(model_path) if self.retrain else None
        for d in self.retrain.replay_from if self.retrain else ():
            if not ReplayStore.segments(d):
                raise InputError(f"replay directory {d} holds no segments (step*.rank*.h5) of "
                                 "an earlier run")
            if replay_dir is not None and Path(d).resolve() == Path(replay_dir).resolve():
                raise InputError(f"replay_from {d} is this run's own replay directory: copy it "
                                 "elsewhere first")
        # replay segments render microstructure images as the model's training data did
        self.image_resolution = getattr(model, "data_resolution", 32)
        self.family = dict(family or {})
        self.cache = SolverCache(fine_factory, cache_size)
        self.replay = None if replay_dir is None else ReplayStore(
            replay_dir, comm.rank, self.family, self.image_resolution)
        self.replay_dir = None if replay_dir is None else Path(replay_dir)
        self._ids = np.zeros(0, dtype=np.int64)
        self._micro: list = []
        self._z = None
        self._cost: dict[int, float] = {}
        self._last_rank: dict[int, int] = {}
        self._sticky: set[int] = set()
        self._fell_back: set[int] = set()
        self._noise_limited: set[int] = set()
        # this step's fine solve per id: F, P, A, W, ‖stress stderr‖ (None: not noisy) and the
        # operator's stress at F
        self._solved: dict[int, tuple] = {}
        self.step, self.evaluations = 0, 0
        self._new_since_retrain = 0
        self._train_rate: float | None = None  # seconds per sample-epoch (this rank)
        self._cal: Calibration | None = None
        self._cal_version = -1
        self.stats = self._empty_stats()

    # ------------------------------------------------------------------ set-up
    def _anchor_paths(self, model_path) -> tuple[Path | None, Path | None]:
        stem = None if model_path is None else Path(model_path).with_suffix("")
        paths = []
        for given, suffix in ((self.retrain.anchor, ".anchor.h5"),
                              (self.retrain.anchor_calibration, ".anchor_calibration.h5")):
            path = Path(given) if given else (None if stem is None else
                                              stem.with_name(stem.name + suffix))
            if given and not path.is_file():
                raise InputError(f"anchor data set {path} does not exist")
            paths.append(path if path is not None and path.is_file() else None)
        if paths[0] is None and self.comm.rank == 0:
            log.warning("no anchor data next to the model: online retraining uses only the "
                        "run's fallback data and may forget the training range")
        return paths[0], paths[1]

    def register(self, point_ids: Sequence[int], microstructures: Sequence) -> None:
        """Attach a microstructure to each of this rank's points (ids unique over all ranks and
        independent of the partition, e.g. from original cell indices) and encode them."""
        ids = np.asarray(point_ids, dtype=np.int64)
        if len(ids) != len(microstructures):
            raise InputError(f"{len(ids)} point ids for {len(microstructures)} microstructures")
        if len(np.unique(ids)) != len(ids):
            raise InputError("point ids must be unique")
        order = np.argsort(ids)
        self._ids = ids[order]
        self._micro = [microstructures[i] for i in order]
        self._encode()

    def _encode(self) -> None:
        if self.model is None or not len(self._ids):
            return
        keys = [m.key for m in self._micro]
        uniq = list(dict.fromkeys(keys))
        first = {m.key: m for m in reversed(self._micro)}
        with torch.no_grad():
            inputs = self.model.structure_inputs([first[k] for k in uniq])
            z = torch.cat([self.model.encode(inputs[i:i + 64])[0]
                           for i in range(0, len(uniq), 64)])
        pos = {k: i for i, k in enumerate(uniq)}
        self._z = z[torch.as_tensor([pos[k] for k in keys])]

    def _rows(self, point_ids) -> np.ndarray:
        ids = np.asarray(point_ids, dtype=np.int64)
        rows = np.searchsorted(self._ids, ids)
        bad = (rows >= len(self._ids)) | (self._ids[np.minimum(rows, len(self._ids) - 1)] != ids
                                           if len(self._ids) else np.ones(len(ids), bool))
        if bad.any():
            raise InputError(f"point ids {ids[bad][:5].tolist()} are not registered on rank "
                             f"{self.comm.rank}: call Coupler.register first")
        return rows

    # ------------------------------------------------------------------ evaluation
    def solve(self, F: np.ndarray, *, point_ids: Sequence[int] | None = None,
              tangent: bool = True, fields_resolution: int | None = None) -> MicroResult:
        """The :class:`FineSolver` contract (collective); uncertainty, source and energy density
        go to ``info``."""
        if point_ids is None:
            raise InputError("the Coupler needs point_ids (registered with Coupler.register)")
        if fields_resolution:
            raise InputError("the Coupler returns homogenized responses only: sample micro "
                             "fields with SANO.sample_fields or the RVE solver")
        r = self.evaluate(F, point_ids)
        return MicroResult(r.stress, r.tangent if tangent else None, None,
                           {"uncertainty": r.uncertainty, "source": r.source,
                            "energy_density": r.energy})

    def evaluate(self, F: np.ndarray, point_ids: Sequence[int]) -> CouplerResult:
        """Stress, tangent, uncertainty, source and energy of this rank's points (collective)."""
        Fb = as_deformation_batch(F)
        ids = np.asarray(point_ids, dtype=np.int64)
        if len(ids) != len(Fb):
            raise InputError(f"{len(ids)} point ids for {len(Fb)} deformation gradients")
        rows = self._rows(ids)
        n = len(Fb)
        self.evaluations += 1
        t0 = time.perf_counter()
        stress, tangent = np.zeros((n, 2, 2)), np.zeros((n, 2, 2, 2, 2))
        unc, energy, noise = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n)
        if self.model is not None and n:
            stress, tangent, unc, noise, energy = self._predict(rows, Fb)
        if self.policy.classic or self.model is None:
            fallback = np.ones(n, dtype=bool)
        else:
            fallback = unc > np.maximum(self.policy.tol, noise)
            fallback |= np.array([i in self._sticky for i in ids.tolist()], dtype=bool)
            self._noise_limited.update(ids[noise > self.policy.tol].tolist())
        self._sticky.update(ids[fallback].tolist())
        self._fell_back.update(ids[fallback].tolist())
        self.stats["operator_time_s"] += time.perf_counter() - t0
        source = np.where(fallback, FINE, OPERATOR)
        op_stress = stress.copy()
        reuse = self._near_solve(Fb, ids, fallback, op_stress)
        for j in np.flatnonzero(reuse):
            F0, P0, A0, W0, _, _ = self._solved[int(ids[j])]
            dF = Fb[j] - F0
            stress[j], tangent[j] = P0 + np.einsum("ijkl,kl->ij", A0, dF), A0
            # the quadratic model whose gradient that stress is (NaN if the solve had no W)
            energy[j] = W0 + np.sum((P0 + 0.5 * (stress[j] - P0)) * dF)
        solve = fallback & ~reuse
        self.cache.new_pass()
        t1 = time.perf_counter()
        done = self._solve_fallback(Fb[solve], ids[solve], rows[solve])
        self.stats["fine_time_s"] += time.perf_counter() - t1
        for j, (P, A, W, stderr) in zip(np.flatnonzero(solve), done, strict=True):
            if P is None:
                source[j] = FAILED
                continue
            stress[j], tangent[j], energy[j] = P, A, W
            self._solved[int(ids[j])] = (Fb[j].copy(), P, A, W, stderr, op_stress[j].copy())
        self._check_failures(source)
        return CouplerResult(stress, tangent, unc, source, energy)

    def _near_solve(self, F: np.ndarray, ids: np.ndarray, fallback: np.ndarray,
                    op_stress: np.ndarray) -> np.ndarray:
        """Fallback points whose fine solve of this load step serves ``F`` linearised (see
        :class:`Policy`; ``op_stress`` (n, 2, 2): the operator's stresses at ``F``, or zeros
        without a model). Only fallback points are looked at: this runs every evaluation.
        """
        near = np.zeros(len(F), dtype=bool)
        classic = self.policy.classic
        for j in np.flatnonzero(fallback) if self._solved else ():
            solved = self._solved.get(int(ids[j]))
            if solved is None:
                continue
            F0, A0, noise, op_stress0 = solved[0], solved[2], solved[4], solved[5]
            dF = F[j] - F0
            if noise is not None and not classic:
                error = np.linalg.norm(op_stress[j] - op_stress0
                                       - np.einsum("ijkl,kl->ij", A0, dF))
                near[j] = error <= noise
                continue
            radius = self.policy.noisy_reuse if noise is not None else (
                0.0 if classic else self.policy.reuse)
            near[j] = radius > 0 and np.abs(dF).max() <= radius
        return near

    def _predict(self, rows: np.ndarray, F: np.ndarray) -> tuple[np.ndarray, ...]:
        """Stress, tangent, relative error bound, relative noise bound (0 unless
        ``exclude_noise``) and energy of the operator at ``F``."""
        p = next(self.model.parameters())
        Ft = torch.as_tensor(F, dtype=p.dtype, device=p.device)
        pred = {k: v.cpu().double().numpy()
                for k, v in self.model.predict(self._z[torch.as_tensor(rows)], Ft).items()}
        unc, noise = np.zeros(len(F)), np.zeros(len(F))
        if not math.isinf(self.policy.tol):
            cal, level = self._calibration(), self.policy.confidence
            floor = self.policy.stress_floor or float(self.model.sigma_ref)
            scale = np.maximum(np.linalg.norm(pred["mean"], axis=(1, 2)), floor)
            if self.policy.exclude_noise:
                unc = cal.error_bound(pred["cov"] - pred["aleatoric"], level) / scale
                noise = cal.error_bound(pred["aleatoric"], level) / scale
            else:
                unc = cal.error_bound(pred["cov"], level) / scale
        return pred["mean"], pred["tangent"], unc, noise, pred["energy"]

    def _calibration(self) -> Calibration:
        """The model's calibration, parsed once per model version."""
        if self._cal is None or self._cal_version != self.version:
            self._cal, self._cal_version = (Calibration.from_dict(self.model.calibration),
                                            self.version)
        return self._cal

    def _solve_fallback(self, F: np.ndarray, ids: np.ndarray,
                        rows: np.ndarray) -> list[tuple]:
        """Solve the given points somewhere on the communicator; (P, A, W, noise) in the given
        order, noise the Frobenius norm of the stress's standard error (None for a solver that
        reports none; None, None, NaN, None for a failed solve)."""
        comm = self.comm
        mine = [(int(i), F[k], self._micro[r], self._cost.get(int(i), np.nan),
                 self._last_rank.get(int(i), -1))
                for k, (i, r) in enumerate(zip(ids, rows, strict=True))]
        every = comm.allgather(mine)
        flat = [(owner, e) for owner, part in enumerate(every) for e in part]
        if not flat:
            return []
        known = [e[3] for _, e in flat if np.isfinite(e[3])]
        default = float(np.median(known)) if known else 1.0
        build = self.cache.setup_time / self.cache.builds if self.cache.builds else default
        build = comm.allreduce(build, op=MPI.MAX)
        # a solved point costs its last solve (build excluded), a new one the median solve; on
        # a rank that holds no solver of its microstructure a build comes on top (a new point
        # has no preferred rank; a solved one prefers the rank holding its warm-start state)
        held = np.array(comm.allgather([e[2].key in self.cache for _, e in flat])).T
        costs = np.array([e[3] if np.isfinite(e[3]) else default for _, e in flat])
        preferred = np.array([e[4] for _, e in flat])
        assign = balance(costs, preferred, comm.size, np.where(held, 0.0, build))
        # a point leaving the rank that holds its warm-start state takes the state along: only
        # the solver's build is lost, and results do not depend on where a point is solved
        moving: list[list] = [[] for _ in range(comm.size)]
        for (_, (pid, _, micro, _, last)), r in zip(flat, assign, strict=True):
            if last == comm.rank != r:
                moving[r].append((pid, micro.key, self.cache.pop_state(micro.key, pid)))
        for pid, key, state in (e for part in comm.alltoall(moving) for e in part):
            if state is not None:
                self.cache.put_state(key, pid, state)
        outgoing: list[list] = [[] for _ in range(comm.size)]
        for (owner, (pid, Fi, micro, _, _)), r in zip(flat, assign, strict=True):
            if r == comm.rank:
                outgoing[owner].append((pid, *self._fine_solve(pid, Fi, micro)))
        back = {e[0]: e[1:] for part in comm.alltoall(outgoing) for e in part}
        out = []
        for pid in ids.tolist():
            P, A, W, noise, t, ok_rank = back[pid]
            self._cost[pid], self._last_rank[pid] = t, ok_rank
            out.append((P, A, W, noise))
        return out

    def _fine_solve(self, pid: int, F: np.ndarray, micro) -> tuple:
        """(P, A, W, noise, seconds without the solver's build, rank) of one point."""
        t0 = time.perf_counter()
        solver = self.cache.get(micro.key, micro)
        t_solve = time.perf_counter()
        try:
            res = solver.solve(F, point_ids=[pid], tangent=True)
        except SolveError as err:
            log.warning("rank %d: fine solve of point %d failed: %s", self.comm.rank, pid, err)
            self.stats["fine_failed"] += 1
            return None, None, np.nan, None, time.perf_counter() - t_solve, self.comm.rank
        t = time.perf_counter() - t0
        self.stats["fine_solves"] += 1
        self.stats["fine_solve_time_s"] += t
        stderr = res.info.get("stress_stderr")
        if self.replay is not None:
            self.replay.append(micro, pid, F, res.stress[0], res.tangent[0], step=self.step,
                               evaluation=self.evaluations, model_version=self.version,
                               time_s=t, stderr=None if stderr is None else stderr[0])
        W = float(res.info.get("energy_density", [np.nan])[0])
        noise = None if stderr is None else float(np.linalg.norm(stderr[0]))
        return (res.stress[0], res.tangent[0], W, noise, time.perf_counter() - t_solve,
                self.comm.rank)

    def _check_failures(self, source: np.ndarray) -> None:
        failed = self.comm.allreduce(int((source == FAILED).sum()))
        total = self.comm.allreduce(len(source))
        if not failed:
            return
        if self.model is None or failed > self.policy.max_failed_fraction * total:
            if self.replay is not None:
                self.replay.flush(self.step)
            raise SolveError(
                f"{failed} of {total} fine solves failed in load step {self.step} (limit "
                f"{self.policy.max_failed_fraction:.1%}"
                + (", and classic FE² has no operator value to keep" if self.model is None
                   else "") + "): reduce the load increment; the last checkpoint is intact")

    # ------------------------------------------------------------------ load steps
    def _empty_stats(self) -> dict:
        return {"operator_time_s": 0.0, "fine_time_s": 0.0, "fine_solve_time_s": 0.0,
                "fine_solves": 0, "fine_failed": 0}

    def begin_step(self, step: int) -> None:
        """Start load step ``step``, or a cut-back part or retry of it: sources may change
        again (never call it inside a Newton solve)."""
        self.step = step
        self._sticky.clear()
        # a deterministic solve stays valid (Policy.reuse); a noisy one is linearised per step,
        # judged with the operator's stresses, which may change between steps
        self._solved = {pid: s for pid, s in self._solved.items() if s[4] is None}

    def end_step(self, steps_left: int | None = None) -> dict:
        """Finish the current load step (collective): store its fine solves, retrain if due.

        ``steps_left``: load steps still to come (None: unknown). A retraining starts only if
        its model will serve one: not after the last step, and in background mode (the model
        arrives a step later) not after the last but one either; a later run can fine-tune on
        the replay store with ``retrain.replay_from``. A background retraining already running
        is still swapped in.

        Returns global figures of the step: ``fallback_points`` (points that used the fine
        solver), ``noise_limited_points`` (see ``Policy.exclude_noise``), ``fine_solves``,
        ``fine_failed``, ``fine_time_s`` (max over ranks, wall), ``operator_time_s`` (max over
        ranks), ``retrain_time_s`` (wall time the step spent retraining or waiting for a
        background retraining), ``retrain_background_s`` (training time of the background
        retraining swapped in at this step, max over ranks),
        ``retrain_skipped`` (a due retraining that would not pay, ``RetrainConfig.cost_aware``),
        ``retrain_estimate_s`` and ``retrain_saving_s`` (that decision's estimated training
        time and the fine-solve time it could save; None without a decision),
        ``model_version``.
        """
        comm = self.comm
        out = {"fallback_points": comm.allreduce(len(self._fell_back)),
               "noise_limited_points": comm.allreduce(len(self._noise_limited)),
               "fine_solves": comm.allreduce(self.stats["fine_solves"]),
               "fine_failed": comm.allreduce(self.stats["fine_failed"]),
               "fine_time_s": comm.allreduce(self.stats["fine_time_s"], op=MPI.MAX),
               "operator_time_s": comm.allreduce(self.stats["operator_time_s"], op=MPI.MAX),
               "retrain_time_s": 0.0, "retrain_background_s": 0.0, "retrain_skipped": False,
               "retrain_estimate_s": None, "retrain_saving_s": None}
        if self.replay is not None:
            self.replay.flush(self.step)
        if out["noise_limited_points"] and comm.rank == 0:
            log.warning("%d points: the fine solver's noise bound exceeds tol=%g, so no fallback "
                        "meets it there (longer fine-solve averages would)",
                        out["noise_limited_points"], self.policy.tol)
        comm.Barrier()
        t0 = time.perf_counter()
        if self._pending is not None:
            out["retrain_background_s"] = self._swap_in()
        self._new_since_retrain += out["fine_solves"]
        n_points = comm.allreduce(len(self._ids))
        needed = 2 if self.retrain is not None and self.retrain.background else 1
        if (self.retrain is not None and (steps_left is None or steps_left >= needed)
                and self._new_since_retrain >= self.retrain.min_new
                and out["fallback_points"] >= self.retrain.min_fallback_fraction * n_points):
            job = self._retrain_job()
            if job is not None and self.retrain.cost_aware:
                self._weigh(job, out, 1 if steps_left is None else steps_left - (needed - 1))
            if not out["retrain_skipped"]:
                self._run_job(job)
                self._new_since_retrain = 0
        out["retrain_time_s"] = time.perf_counter() - t0
        out["model_version"] = self.version
        self.stats = self._empty_stats()
        self._fell_back.clear()
        self._noise_limited.clear()
        return out

    def checkpoint_state(self) -> dict:
        """What a restart needs besides the model file: the model version, the count of fine
        solves since the last retraining (so retraining happens at the same steps) and the step
        whose background retraining is still running (None if none)."""
        return {"version": self.version, "new_since_retrain": self._new_since_retrain,
                "background_step": None if self._pending is None else self._pending.step}

    def restore_state(self, state: dict) -> None:
        """Resume from :meth:`checkpoint_state` (the model itself is loaded by the caller;
        collective: a background retraining that was running is started again)."""
        self.version = int(state.get("version", self.version))
        self._new_since_retrain = int(state.get("new_since_retrain", 0))
        step = state.get("background_step")
        if step is not None and self.retrain is not None:
            current, self.step = self.step, int(step)
            try:
                self._run_job(self._retrain_job())
            finally:
                self.step = current

    # ------------------------------------------------------------------ retraining
    def replay_data(self, up_to_step: int | None = None):
        """The fine solves of earlier runs (``retrain.replay_from``) and of this run up to
        ``up_to_step`` as :class:`~neuroscale_couple.training.TrainingData`, in a rank-count
        independent order (run, step, evaluation, point id); None if there are none."""
        from neuroscale_couple.training import TrainingData

        sources = [(i, p) for i, d in enumerate(self.retrain.replay_from)
                   for p in ReplayStore.segments(d)]
        if self.step >= 0 and self.replay_dir is not None:
            run = len(self.retrain.replay_from)
            sources += [(run, p) for p in ReplayStore.segments(self.replay_dir, up_to_step)]
        parts, keys = [], []
        for run, path in sources:
            d = load_rve_dataset(path)
            parts.append(TrainingData.from_arrays(d, self.model.input_resolution, torch.float64,
                                                  str(path)))
            keys.append(np.stack([np.full(len(d["samples/step"]), run), d["samples/step"],
                                  d["samples/evaluation"], d["samples/point_id"]], axis=1))
        if not parts:
            return None
        data = TrainingData.concat(parts)
        k = np.concatenate(keys)
        data = data.subset(np.lexsort(k.T[::-1]))
        # one image per microstructure, numbered by first appearance: the grouping into training
        # batches must not depend on which rank happened to solve a point
        digests = [hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in data.images]
        first: dict[str, tuple[int, int]] = {}
        index = [first.setdefault(digests[m], (len(first), m))[0]
                 for m in data.micro_index.tolist()]
        return dataclasses.replace(data, images=data.images[[m for _, m in first.values()]],
                                   micro_index=torch.as_tensor(index, dtype=torch.long))

    def warm_start(self) -> bool:
        """Fine-tune on the replay stores of earlier runs (``retrain.replay_from``) before the
        first load step (collective); False if there is nothing to learn from."""
        if self.retrain is None or not self.retrain.replay_from:
            return False
        step, self.step = self.step, -1  # only the earlier runs' data
        try:
            job = self._retrain_job(self.retrain.warm_start_epochs)
        finally:
            self.step = step
        if job is not None:
            self._retrain(job)
        return True

    def _anchor_data(self, path: Path | None, seed: int):
        from neuroscale_couple.training import TrainingData

        if path is None:
            return None
        data = TrainingData.from_h5(path, self.model.input_resolution, torch.float64)
        n_micro = len(data.images)
        if n_micro > self.retrain.anchor_micro:
            keep = np.random.default_rng(seed).choice(n_micro, self.retrain.anchor_micro,
                                                      replace=False)
            data = data.subset(np.flatnonzero(np.isin(data.micro_index.numpy(), keep)))
        return data

    def _retrain_job(self, epochs: int | None = None) -> tuple | None:
        """Training data, calibration data and settings of a retraining on the fine solves up to
        this step (None if there are none); reads the replay and anchor files."""
        from neuroscale_couple.training import TrainConfig, TrainingData

        cfg = self.retrain
        seed = 1000 + self.version
        online = self.replay_data(self.step)
        if online is None:
            return None
        # hold out samples, not microstructures: the coupler predicts new loads of microstructures
        # it has seen, which is what the recalibration must measure
        order = np.random.default_rng(seed).permutation(len(online))
        n_held = round(cfg.calibration_fraction * len(online))
        fit, held = online.subset(np.sort(order[n_held:])), online.subset(np.sort(order[:n_held]))
        anchor = self._anchor_data(self._anchor[0], seed)
        anchor_cal = self._anchor_data(self._anchor[1], seed)
        data = TrainingData.concat([p for p in (fit, anchor) if p is not None])
        cal_parts = [p for p in (held, anchor_cal) if p is not None and len(p)]
        calibration = TrainingData.concat(cal_parts) if cal_parts else None
        tcfg = TrainConfig(epochs=epochs or cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                           lr_final=cfg.lr_final, val_fraction=0.0, patience=epochs or cfg.epochs,
                           seed=seed, weights=dict(cfg.weights))
        return data, calibration, tcfg, len(online)

    @staticmethod
    def _fit(model, data, calibration, tcfg, comm: MPI.Comm) -> dict:
        """Fine-tune ``model``'s coarse-graining heads in place and recalibrate it (collective
        over ``comm``); returns the training history."""
        from neuroscale_couple.evaluation import calibrate_model
        from neuroscale_couple.training import train

        # only the coarse-graining heads learn: the latents of the run's microstructures stay
        # put (no re-encoding drift) and the encoder cannot forget the training range
        frozen = [p for name, p in model.named_parameters()
                  if not name.startswith(("energy.", "covariance."))]
        for p in frozen:
            p.requires_grad_(False)
        dtype = next(model.parameters()).dtype
        model.float().train()
        try:
            history = train(model, data, tcfg, comm=comm,
                            validation=data.subset(np.zeros(0, np.int64)), normalise=False,
                            progress=False)
        finally:
            model.to(dtype).eval()
            for p in frozen:
                p.requires_grad_(True)
        if calibration is not None:
            calibrate_model(model, calibration)
        return history

    def _adopt(self, model, n_online: int) -> None:
        """Make ``model`` the run's operator: bump the version, check all ranks agree."""
        self.model = model
        self.version += 1
        self.model.card["online_version"] = self.version
        self.check_same_weights()
        if self.comm.rank == 0:
            log.info("operator retrained on %d fine solves: version %d, calibration scale %.3g",
                     n_online, self.version, self.model.calibration.get("scale", np.nan))

    def _run_job(self, job: tuple | None) -> None:
        """Run a :meth:`_retrain_job` (if any) in the foreground or the background."""
        if job is not None and self.retrain.background:
            self._start_background(job)
        elif job is not None:
            self._retrain(job)

    def _retrain(self, job: tuple) -> None:
        """Fine-tune on a :meth:`_retrain_job`'s data, recalibrate, bump the version
        (collective)."""
        data, calibration, tcfg, n_online = job
        t0 = time.perf_counter()
        self._fit(self.model, data, calibration, tcfg, self.comm)
        self._train_rate = (time.perf_counter() - t0) / (len(data) * tcfg.epochs)
        self._adopt(self.model, n_online)

    def _start_background(self, job: tuple) -> None:
        """Start a :meth:`_retrain_job` on a copy of the operator in a thread (collective)."""
        data, calibration, tcfg, n_online = job
        model = copy.deepcopy(self.model)
        self._pending = _Background(
            lambda: self._fit(model, data, calibration, tcfg, self._bg_comm), model,
            self.step, n_online, len(data) * tcfg.epochs)

    def _weigh(self, job: tuple, out: dict, serves: int) -> None:
        """Set ``out``'s ``retrain_estimate_s``, ``retrain_saving_s`` (its fine-solve time ×
        the ``serves`` steps the new model would serve) and ``retrain_skipped`` (collective)."""
        out["retrain_saving_s"] = out["fine_time_s"] * serves
        out["retrain_estimate_s"] = self._estimate(job)
        out["retrain_skipped"] = out["retrain_estimate_s"] >= out["retrain_saving_s"]
        if self.comm.rank == 0:
            log.info("retraining estimated at %.1f s, would save at most %.1f s of fine solves: "
                     "%s", out["retrain_estimate_s"], out["retrain_saving_s"],
                     "skipped" if out["retrain_skipped"] else "retraining")

    def _estimate(self, job: tuple) -> float:
        """Estimated wall time (s) of the retraining ``job``: the slowest rank's (collective,
        so the ranks decide alike)."""
        data, _, tcfg, _ = job
        if self._train_rate is None:  # two epochs on a copy: the second one's time (the first
            # pays one-time costs that the rate would multiply by the epochs)
            probe = dataclasses.replace(tcfg, epochs=2, patience=2)
            history = self._fit(copy.deepcopy(self.model), data, None, probe, self.comm)
            self._train_rate = history["epoch_time_s"][-1] / len(data)
        return self.comm.allreduce(self._train_rate * len(data) * tcfg.epochs, op=MPI.MAX)

    def _swap_in(self) -> float:
        """Wait for the background retraining and adopt its model (collective); returns its
        training time, max over ranks."""
        job, self._pending = self._pending, None
        job.thread.join()
        errors = [e for e in self.comm.allgather(None if job.error is None else repr(job.error))
                  if e is not None]
        if errors:
            raise NeuroScaleError(f"background retraining after step {job.step} failed: "
                                  f"{errors[0]}") from job.error
        self._adopt(job.model, job.n_online)
        self._train_rate = job.time_s / job.sample_epochs
        return self.comm.allreduce(job.time_s, op=MPI.MAX)

    def weights_digest(self) -> str:
        """SHA-256 of the model's weights and calibration (identical on every rank)."""
        h = hashlib.sha256()
        for name, t in self.model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(repr(sorted(self.model.calibration.items())).encode())
        return h.hexdigest()

    def check_same_weights(self) -> None:
        """Raise on every rank if the ranks' models differ (collective)."""
        digests = self.comm.allgather(self.weights_digest())
        if len(set(digests)) != 1:
            raise NeuroScaleError(f"model version {self.version} differs between ranks "
                                  f"({len(set(digests))} distinct weight digests): the "
                                  "data-parallel update went out of step")

    def close(self) -> None:
        """Close the cached fine solvers; a background retraining still running is waited for
        and dropped (its data are in the replay store)."""
        if self._pending is not None:
            self._pending.thread.join()
            self._pending = None
        if self._bg_comm is not None:
            self._bg_comm.Free()
            self._bg_comm = None
        self.cache.close()


class _Background:
    """A retraining running in a daemon thread; ``error`` holds what it raised."""

    def __init__(self, fit: Callable[[], None], model, step: int, n_online: int,
                 sample_epochs: int) -> None:
        self.model, self.step, self.n_online = model, step, n_online
        self.sample_epochs = sample_epochs
        self.error: BaseException | None = None
        self.time_s = 0.0
        # a new thread starts with the OpenMP default thread count, not the caller's: the same
        # count keeps the reduction order, so the result equals a foreground retraining
        self.thread = threading.Thread(target=self._run, args=(fit, torch.get_num_threads()),
                                       daemon=True, name=f"neuroscale-retrain-{step}")
        self.thread.start()

    def _run(self, fit: Callable[[], None], threads: int) -> None:
        t0 = time.perf_counter()
        try:
            torch.set_num_threads(threads)
            fit()
        except BaseException as err:  # re-raised on every rank at the swap
            self.error = err
        self.time_s = time.perf_counter() - t0
