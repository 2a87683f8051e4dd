"""The Coupler: operator + uncertainty policy + fallback to the true fine solver + retraining.

At every call (one per macro residual evaluation, collective over the communicator) the Coupler

1. predicts P̄, Σ and ∂P̄/∂F̄ for all of this rank's points with the operator (latents cached per
   point, computed once at :meth:`Coupler.register`);
2. bounds each point's stress error at the policy's confidence with the calibrated Σ
   and sends the points over the tolerance (``atol + rtol · ‖P̄‖``), those outside the model's
   training region — and every point that already fell back in this load
   step (sticky, so Newton keeps its quadratic rate) — to the true fine solver;
3. spreads that fallback work over all ranks by measured solve time (each rank keeps serial RVEs
   per microstructure in an LRU cache and warm-starts each point from its last state), returns
   the results to the owners and appends every fine solve to the replay store;
4. between load steps (:meth:`Coupler.end_step`, never inside a Newton solve) fine-tunes the
   operator on the fallback data plus a sample of its original training data, data-parallel over
   the ranks (encoder frozen, heads trained), recalibrates it, bumps its version and checks that
   all ranks hold the same weights — or, with ``RetrainConfig.background``, trains a copy in a
   thread while the next load step runs and swaps it in at the boundary after that step
   (the data, the decision and the fine-tuning: :mod:`neuroscale_couple.retraining`).
   A retraining that fails on any rank keeps the current model on every rank and is flagged
   in the step's report (``StepReport.retrain_failed``): the run goes on.

With ``cold_start`` (:class:`~neuroscale_couple.cold_start.ColdStart`) and no model the Coupler
learns its operator during the run: every point on the fine solver until a first operator is
calibrated — each solved point's own cell fit (:mod:`neuroscale_couple.cell_fits`), or the
network heads — then each point on it wherever its bound allows, and a share of the points
solved every step for the calibration (:mod:`neuroscale_couple.cold_start`).

``Policy(rtol=0)`` is classic FE² (every point on the fine solver; no model needed),
``Policy(rtol=inf)`` never falls back.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from mpi4py import MPI

import numpy as np
import torch

from neuroscale_couple.audit import Auditor
from neuroscale_couple.calibration import Calibration, points_for_level
from neuroscale_couple.cell_fits import CellFits
from neuroscale_couple.cold_start import ColdStart
from neuroscale_couple.config import byte_size, whole_number
from neuroscale_couple.coupler_state import CouplerState, FineAnswer, SolvedPoint
from neuroscale_couple.errors import (
    CheckpointError,
    InputError,
    MaterialOutsideError,
    NeuroScaleError,
    RetrainError,
    SolveError,
)
from neuroscale_couple.fine import (
    LIVE_MEMORY,
    LIVE_SOLVERS,
    FineSolver,
    MicroResult,
    SolverCache,
)
from neuroscale_couple.latents import LatentStore
from neuroscale_couple.operators.inference import Inference
from neuroscale_couple.parallel import balance, device_for_rank, return_free_memory, together
from neuroscale_couple.phases import descriptors
from neuroscale_couple.region import stretch_distance
from neuroscale_couple.retraining import RetrainConfig, Retrainer, RetrainJob
from neuroscale_couple.run_scores import RunScores
from neuroscale_couple.store import ReplayStore
from neuroscale_couple.tensors import acoustic_minimum, as_deformation_batch

log = logging.getLogger(__name__)

OPERATOR, FINE, FAILED = 0, 1, 2
SOURCE_NAMES = {OPERATOR: "operator", FINE: "fine", FAILED: "failed"}
RUN_SEED = 1
"""Seed of the run calibration's draws (the cell fits' audit draws with seed 0)."""
BALANCE_RANKS = 64
"""Default size of the rank groups within which fallback points are balanced (a node or two:
the requests gathered and the (requests × ranks) balancing stay bounded at any rank count)."""


@dataclass(frozen=True)
class Policy:
    """When a point falls back to the fine solver.

    A point falls back when the calibrated bound on its stress error at ``confidence`` (the
    Frobenius norm of P̄_operator − P̄_true, stress units) exceeds ``atol + rtol · ‖P̄‖`` —
    numpy's ``isclose`` rule, with ‖P̄‖ the operator's stress. ``rtol`` is the relative
    tolerance; ``atol`` the absolute one, in the stress units of the fine solver, which keeps
    nearly unloaded points (‖P̄‖ → 0) from falling back over an error no one would notice.
    ``atol`` None: 1 % of the operator's stress scale (the standard deviation of its training
    stresses; 0.006 GPa for the shipped composite model), resolved by the Coupler and stated
    in its log and the examples' summary.

    ``rtol = 0`` with no ``atol`` (None or 0) is classic FE²: every point on the fine solver
    (no model needed). ``rtol = inf`` or ``atol = inf`` never falls back.

    ``outside``: what happens at a point outside the model's training region (its card's
    ``region``: load stretch, det F̄ and structure descriptors; :mod:`neuroscale_couple.region`),
    where the calibrated bound has no guarantee: ``fallback`` (the default: to the fine solver,
    whatever the bound), ``refuse`` (stop the run naming the point) or ``warn`` (keep the
    bound's decision and count such points per step).

    ``outside_material``: a family operator (phases as inputs, :mod:`neuroscale_couple.phases`)
    given a fine solver whose phases lie outside its phase ranges: ``refuse`` (the default:
    the Coupler is not built, the error names the ranges) or ``fallback``, the user's consent
    to run anyway with every point on the fine solver (counted as outside points) until the
    bound is calibrated at the run's material: by the run calibration's first census
    (``run_calibration``, the default for a family operator), or by an online retraining
    whose heads learnt the run's fine solves and whose bound is calibrated on held-out ones
    (at least enough for a finite quantile at ``confidence``). From then on that bound
    decides point by point.

    ``max_failed_fraction``: a fine solve that fails even with load substeps keeps the operator's
    value and is flagged; the run aborts when more than this fraction of all points failed.

    ``reuse``: with a surrogate in the loop, a fine solve is not repeated while the
    point's F̄ stays within this distance (max component) of where it was taken: P̄ₖ + Aₖ:ΔF̄
    is used, with tangent Aₖ and energy W̄ₖ + P̄ₖ:ΔF̄ + ½ΔF̄:Aₖ:ΔF̄ (ΔF̄ = F̄ − F̄ₖ; a consistent
    quadratic model, so Newton keeps its rate).
    The error is second order, ½|∂²P̄| |F̄ − F̄ₖ|² (the FE² test's displacement moves by 4e-6
    relative, far below a tolerance one would give a surrogate); the late Newton iterates of a
    step then cost no fine solve, nor does the first iterate of the next step, which starts from
    the converged state where the point's last solve lies (half the solves of a point that
    stays on the fine solver). Classic FE² always re-solves.

    A noisy fine solve (one that reports ``stress_stderr``, e.g. an MD average) is linearised
    the same way in every run: a noisy stress is not a smooth function of F̄, so re-solving at
    every Newton iterate would leave Newton chasing the noise. With the operator in the loop
    it is solved again only where the linearisation's error, estimated with the
    operator's (smooth) stress as ‖P_op(F̄) − P_op(F̄ₖ) − Aₖ:ΔF̄‖, exceeds the solve's own
    standard error ‖s_P‖: closer than that a new MD average would only draw new noise (seen
    in the 300 K HMM benchmark: re-solves 2.1e-3 away differed from the linearisation by
    4–5 % of ‖P̄‖, the noise, and cost Newton an iteration). The estimate holds the
    first-order error too: a finite-temperature solve's Aₖ is the static (0 K) tangent, while
    the operator learnt the thermal average's slope. ``noisy_reuse``: the fixed radius used
    instead in classic runs, which have no operator.

    ``exclude_noise``: for a noisy fine solver whose noise the model's covariance head was
    trained to reproduce (the ``noise`` loss term): the bound is taken on the epistemic part of
    Σ only (ensemble spread, same calibration scale), the error a fallback can remove; the noise
    is in the fine solve as well. And a point falls back only where that bound also exceeds the
    bound of the noise (the aleatoric part, same scale and confidence): elsewhere the fine solve
    would be no closer to the true mean than the operator. Points whose noise bound exceeds
    the tolerance — one no fine solve there meets — are counted per step
    (``noise_limited_points``; longer MD averages would lower it). Heuristic: the conformal
    guarantee holds for the full Σ.

    ``cell_fits`` (2D cells): a point that fell back is served in the later steps by its own
    cell fit (:mod:`neuroscale_couple.cell_fits`: the energy basis fitted to its latest fine
    solves) wherever that fit's calibrated bound allows, instead of falling back every step.
    The fits' bound is calibrated first on a census: at the end of the step that made the
    first fits, 2 / (1 − c) of them (40 at 0.95), drawn at random by id, are solved besides at
    the next step's loads as extrapolated from their last two converged ones (2F̄ₖ − F̄ₖ₋₁,
    as the run calibration's census below) and scored there, so the fits serve from the next
    step on (where fewer points are fitted than that census takes, the bound may still be
    infinite: every fitted point then falls back and a random 2 / (1 − c) of them are scored
    at the step's converged loads, until the scores give a finite conformal quantile, 19 at
    0.95); then on ``cell_audit`` of the fitted points a step, drawn at random and solved
    besides at the step's converged loads.
    The fallback solves then teach the fits, and online retraining of the network is never
    due (the network serves only points that never fell back). Off by default:
    the fits are for deterministic 2D fine solvers (the RVE; a noisy solve's scores would be
    its noise), as in the FE² composite example, which turns them on. (A cold start sets its
    own: :class:`~neuroscale_couple.cold_start.ColdStart` ``cell_fits``.)

    ``run_calibration``: the network operator's bound recalibrated for the run's material and
    load path on the run's own fine solves (:mod:`neuroscale_couple.run_scores`). A family
    operator's calibration holds over the materials of a contrast band, not for each
    material: at one material its bound may cover less or more than ``confidence``, and the
    share drifts as the loads grow. With run calibration, every load step but the last ends
    with a census: 2 / (1 − c) points (40 at 0.95), drawn at random by id among those the
    bound kept on the operator in the step (inside the region, no cell fit), are solved
    besides at the next step's loads as extrapolated from their last two converged ones
    (2F̄ₖ − F̄ₖ₋₁), and scored s = ‖P̄_fine − P̄_op‖ / b, b the model's calibrated bound there;
    the next step's bound is q·b, q the conformal quantile of those scores, so it holds at
    ``confidence`` over the points it keeps on the operator as far as the next loads follow
    the extrapolation and the kept points stay those of the step. Before the first census
    the model's own bound decides. The census scores the model that serves the next step (a
    retrained one too) and costs its solves every step, whatever the run's size. The scores
    need no training at the material, so a run outside a family operator's ranges
    (``outside_material: fallback``) hands points to the operator from the first census on,
    where the bound allows. The factor of 40 scores scatters from step to step (a step's
    coverage by a few points around ``confidence``), and the points it keeps move with it;
    over a run the coverage averages out. True/False; None: on for a family operator run
    outside its ranges (no other calibration holds there), off otherwise (a family
    operator's band calibration holds over its band; a fixed-material model is calibrated
    at its own material).
    """

    rtol: float = 0.05
    atol: float | None = None
    confidence: float = 0.95
    outside: str = "fallback"
    outside_material: str = "refuse"
    max_failed_fraction: float = 0.01
    reuse: float = 2e-3
    noisy_reuse: float = 2e-3
    exclude_noise: bool = False
    cell_fits: bool = False
    cell_audit: float = 0.1
    run_calibration: bool | None = None

    def __post_init__(self) -> None:
        if not self.rtol >= 0:  # also catches NaN
            raise InputError(f"rtol={self.rtol}: the relative stress tolerance must be ≥ 0 (0 "
                             "without atol = classic FE², every point on the fine solver; inf = "
                             "never fall back)")
        if self.atol is not None and not self.atol >= 0:
            raise InputError(f"atol={self.atol}: the absolute stress tolerance (stress units) "
                             "must be ≥ 0, or None for 1 % of the model's stress scale")
        if not 0 < self.confidence < 1:
            raise InputError(f"confidence={self.confidence}: give a probability such as 0.95")
        if self.outside not in OUTSIDE:
            raise InputError(f"outside={self.outside!r}: one of {', '.join(OUTSIDE)}")
        if self.outside_material not in OUTSIDE_MATERIAL:
            raise InputError(f"outside_material={self.outside_material!r}: one of "
                             f"{', '.join(OUTSIDE_MATERIAL)}")
        if not 0 < self.cell_audit < 1:
            raise InputError(f"cell_audit={self.cell_audit}: give the share of the fitted "
                             "points audited each step in (0, 1), e.g. 0.1")
        if self.run_calibration not in (None, True, False):
            raise InputError(f"run_calibration={self.run_calibration!r}: True, False or None "
                             "(the default: on for a family operator outside its ranges)")
        if not 0 <= self.max_failed_fraction <= 1:
            raise InputError(f"max_failed_fraction={self.max_failed_fraction}: must be in [0, 1]")
        for name, what in (("reuse", "0: always re-solve"),
                           ("noisy_reuse", "the classic (rtol = 0) radius of noisy solves; "
                                           "0: always re-solve")):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name}={getattr(self, name)}: must be ≥ 0 ({what})")

    @property
    def classic(self) -> bool:
        """True when every point goes to the fine solver (``rtol = 0``, no ``atol``)."""
        return self.rtol == 0 and not self.atol

    @property
    def never(self) -> bool:
        """True when no point falls back on its bound (an infinite tolerance)."""
        return math.isinf(self.rtol) or (self.atol is not None and math.isinf(self.atol))


OUTSIDE = ("fallback", "refuse", "warn")
"""What :class:`Policy` ``outside`` may say."""
OUTSIDE_MATERIAL = ("refuse", "fallback")
"""What :class:`Policy` ``outside_material`` may say."""


class FallbackRequest(NamedTuple):
    """A point sent to the fine solver: its id, F̄ (d, d), structure, last solve's seconds (NaN
    if never solved) and the rank holding its warm-start state (−1: none)."""

    point_id: int
    F: np.ndarray
    structure: object
    cost_s: float
    last_rank: int


@dataclass
class StepStats:
    """What this rank measured in the current load step (seconds and counts)."""

    operator_time_s: float = 0.0
    encode_time_s: float = 0.0
    fine_time_s: float = 0.0
    fine_solve_time_s: float = 0.0
    fine_solves: int = 0
    fine_failed: int = 0


@dataclass
class StepReport:
    """Global figures of a load step (:meth:`Coupler.end_step`).

    ``fallback_points``: points that used the fine solver; ``noise_limited_points``: see
    ``Policy.exclude_noise``; ``fine_solves``, ``fine_failed``; ``fine_time_s`` (max over
    ranks, wall), ``operator_time_s`` (max over ranks), ``encode_time_s`` (max over ranks: the
    latents of the microstructures, encoded when they were registered, so in the first step of
    a run); ``retrain_time_s`` (wall time the step spent retraining or waiting for a background
    retraining), ``retrain_background_s`` (training time of the background retraining swapped
    in at this step, max over ranks), ``retrain_skipped`` (a due retraining that would not pay,
    ``RetrainConfig.cost_aware``), ``retrain_estimate_s`` and ``retrain_saving_s`` (that
    decision's estimated training time and the fine-solve time it could save; None without a
    decision), ``retrain_failed`` (the message of a retraining that failed in this step, or of
    a background one that was to be swapped in at it: the model was kept; None if none failed),
    ``model_version``; ``operator_share`` (fraction of the points that stayed on the operator
    all step), ``training_s`` (training time of the model adopted at this step: the
    background training's, or the foreground retraining's; 0 if none), ``probe_points`` and
    ``held_out_points`` (a cold start's extra solves: the points solved for training data and
    for calibration); ``outside_points``: points outside the model's training region
    (:class:`Policy` ``outside``), ``non_elliptic_points``: points on the operator whose tangent
    lost strong ellipticity at the step's converged state
    (:func:`~neuroscale_couple.tensors.acoustic_minimum`);
    ``audit``: the step's :class:`~neuroscale_couple.audit.AuditReport` as a dict (None unless
    the Coupler audits); ``run_scored``: points of the run calibration's census at this
    step's end (:class:`Policy` ``run_calibration``; their solves are counted in
    ``fine_solves`` and ``fine_time_s``), ``run_bound_factor``: the factor q on the model's
    bound in the next step (None: no run calibration, or too few scores); ``fits_scored``:
    points of the cell fits' first census at this step's end (:class:`Policy` ``cell_fits``;
    counted in ``fine_solves`` and ``fine_time_s`` likewise).
    """

    fallback_points: int
    noise_limited_points: int
    fine_solves: int
    fine_failed: int
    fine_time_s: float
    operator_time_s: float
    encode_time_s: float
    retrain_time_s: float = 0.0
    retrain_background_s: float = 0.0
    retrain_skipped: bool = False
    retrain_estimate_s: float | None = None
    retrain_saving_s: float | None = None
    retrain_failed: str | None = None
    model_version: int = 0
    operator_share: float = 0.0
    training_s: float = 0.0
    probe_points: int = 0
    held_out_points: int = 0
    outside_points: int = 0
    non_elliptic_points: int = 0
    audit: dict | None = None
    run_scored: int = 0
    run_bound_factor: float | None = None
    fits_scored: int = 0


@dataclass
class CouplerResult:
    """Response of n points: ``stress`` (n, d, d), ``tangent`` (n, d, d, d, d), ``uncertainty``
    (n,) calibrated bound on ‖P̄_operator − P̄_true‖ at the policy's confidence (stress units;
    NaN where no operator ran, 0 where the policy never falls back),
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
        None for classic FE² (``policy.rtol = 0``) or a cold start.
    fine_factory : builds the fine solver of one structure on ``MPI.COMM_SELF`` (e.g.
        ``lambda m: rve_from_config(cfg, m)``, ``Crystal.solver``).
    family : the fine solver's material config, checked against the model.
    policy : fallback policy.
    comm : the communicator of the macro problem; every method is collective (:meth:`register`
        too: the ranks share their microstructures' latents).
    replay_dir : where fine solves are stored (None: not stored, no retraining).
    retrain : online fine-tuning settings (None or ``enabled=False``: none).
    model_path : the model file (to find the anchor data sets next to it).
    cache_size : live fine solvers per rank, awake or hibernated (RVEs stay awake only within
        the MPI communicators left: see :class:`~neuroscale_couple.fine.SolverCache`).
    cache_memory : memory budget of a rank's live fine solvers (their estimated
        :meth:`~neuroscale_couple.fine.FineSolver.memory_bytes`): bytes, or a size such as
        ``"512M"``, ``"2G"`` (powers of 1024); None: the count only. Default 2 GiB.
    cold_start : learn the operator during the run (model None, the fine solver's material
        ``family`` given, retraining enabled with a ``replay_dir``; background retraining
        recommended: :class:`~neuroscale_couple.cold_start.ColdStart`).
    audit : check every load step against the fine solver at every point
        (:mod:`neuroscale_couple.audit`; a benchmark tool costing a classic FE² solve): the
        step's :class:`StepReport` ``audit``.
    balance_ranks : the fallback points of a rank are solved within its group of this many
        consecutive ranks, balanced there by measured cost (:func:`balance`): each rank gathers
        its group's requests only, so the exchange stays bounded on thousands of ranks; the
        results do not depend on the grouping (a point's warm-start state travels with it).
    """

    implemented_properties = ("stress", "tangent", "uncertainty")

    def __init__(self, model, fine_factory: Callable[[object], FineSolver], *,
                 family: dict | None = None, policy: Policy | None = None,
                 comm: MPI.Comm = MPI.COMM_WORLD, replay_dir: str | Path | None = None,
                 retrain: RetrainConfig | None = None, model_path: str | Path | None = None,
                 cache_size: int = LIVE_SOLVERS, cache_memory: int | str | None = LIVE_MEMORY,
                 dtype: torch.dtype = torch.float64, audit: bool = False,
                 balance_ranks: int = BALANCE_RANKS, cold_start: ColdStart | None = None
                 ) -> None:
        super().__init__()
        self.policy = policy or Policy()
        cache_size = whole_number(cache_size, "cache_size")
        balance_ranks = whole_number(balance_ranks, "balance_ranks")
        cache_memory = byte_size(cache_memory, "cache_memory")
        self.comm = comm
        self.cold_start = cold_start
        self.fits: CellFits | None = None  # the operator at points the fine solver solved
        if cold_start is not None:
            _check_cold_start(model, family, self.policy, retrain, replay_dir)
            model = cold_start.initial_model(family)
            if cold_start.cell_fits:
                self.fits = CellFits(self.policy.confidence, cold_start.history,
                                     cold_start.held_out, cold_start.seed)
        elif self.policy.cell_fits:
            if self.policy.classic or model is None or getattr(model, "dim", 2) != 2:
                raise InputError("cell_fits serve the points a trained 2D (plane-strain) operator "
                                 "sent to the fine solver: give a 2D model and a tolerance, or "
                                 "drop cell_fits")
            self.fits = CellFits(self.policy.confidence, audit=self.policy.cell_audit)
        if model is None and not self.policy.classic:
            raise InputError(f"rtol={self.policy.rtol} with atol={self.policy.atol} needs a "
                             "trained model: give a calibrated operator, or use rtol=0 without "
                             "atol (classic FE²)")
        self.material_outside: str | None = None  # why a family operator's phases are out
        if model is not None:  # all checks before the first collective call
            if not self.policy.classic and not self.policy.never and cold_start is None:
                if not model.calibration:
                    raise InputError("the model is not calibrated: run `neuroscale calibrate` "
                                     "before using it with a finite tol")
                Calibration.from_dict(model.calibration).norm_radius(self.policy.confidence)
            if family is not None:
                self.material_outside = self._check_material(model, family)
            elif model.takes_material:
                raise InputError("a family operator takes the phases as inputs: give the "
                                 "Coupler the fine solver's material, family={'matrix': {E, "
                                 "nu}, 'fibre': {E, nu}} (from_config passes its `fine` keys)")
            weights = (model.card.get("training") or {}).get("weights") or {}
            if self.policy.exclude_noise and not weights.get("noise", 0) > 0:
                raise InputError("exclude_noise needs a model whose covariance head learned the "
                                 "fine solver's noise (trained with the `noise` loss term); "
                                 "this one was not: drop exclude_noise")
        self.model = model
        # d of the loads F̄ (d×d): the model's; without one, the registered structures'
        self.dim = getattr(model, "dim", 2)
        self.version = 0
        # the absolute tolerance in stress units (Policy.atol None: 1 % of the stress scale)
        self.atol = (self.policy.atol if self.policy.atol is not None
                     else 0.01 * float(model.stress_scale) if model is not None else 0.0)
        self.region = None if model is None or self.policy.classic else model.region
        if (self.region is None and model is not None and not self.policy.classic
                and cold_start is None):
            log.warning("the model's card records no training region: points outside its "
                        "training data are not recognised (python scripts/model_region.py "
                        "MODEL adds it)")
        self.device = device_for_rank(comm)
        # fallback points are shared out within groups of consecutive ranks (one group up to
        # balance_ranks ranks): what a rank gathers and balances stays bounded at any scale
        self._group_start = comm.rank // balance_ranks * balance_ranks
        self._group = (comm if balance_ranks >= comm.size
                       else comm.Split(comm.rank // balance_ranks, comm.rank))
        if model is not None:
            self.model = model.to(self.device, dtype).eval()
            self.version = int(model.card.get("online_version", 0))
            log.info("rank %d: operator on %s (%d torch threads)", comm.rank, self.device,
                     torch.get_num_threads())
        use = retrain is not None and retrain.enabled and replay_dir and model is not None
        self.retrainer = Retrainer(retrain, comm, replay_dir=replay_dir, model_path=model_path,
                                   cold_start=cold_start) if use else None
        self.run_scores = self._run_scores(model)  # the bound at the run's material
        # replay segments render microstructure images as the model's training data did
        self.image_resolution = model.data_resolution if model is not None else 32
        self.family = dict(family or {})
        self.cache = SolverCache(fine_factory, cache_size, cache_memory)
        self.auditor = Auditor(self.cache) if audit else None
        self.replay = None if replay_dir is None else ReplayStore(
            replay_dir, comm.rank, self.family, self.image_resolution)
        self._ids = np.zeros(0, dtype=np.int64)
        self.latent_store: LatentStore | None = None
        # the distinct structures (by key) of this rank's points, and each point's (row's) one
        self._structures: list = []
        self._structure_of = np.zeros(0, dtype=np.int32)
        self._micro_outside: list[str | None] = []  # why each structure is outside
        self._micro_out = np.zeros(0, dtype=bool)
        self._z: torch.Tensor | None = None  # latents of the distinct structures, float32
        self._inference: Inference | None = None  # the operator at them, this model version
        self._factor_key: tuple | None = None  # what the bound factors below were made for
        self._kind_code, self._factor_table = np.zeros(0, dtype=int), np.zeros((0, 0))
        self._cost: dict[int, float] = {}
        self._last_rank: dict[int, int] = {}
        # per registered point (row): this step's marks
        self._sticky = self._fell_back = self._noise_limited = self._outside = np.zeros(0, bool)
        self._held_out = self._probed = np.zeros(0, bool)  # a cold start's extra solves
        self._probe_step: int | None = None
        self._last_operator: tuple[np.ndarray, np.ndarray] | None = None
        self._solved: dict[int, SolvedPoint] = {}  # this load step's fine solve per id
        self.step, self.evaluations = 0, 0
        self._cal: Calibration | None = None
        self._cal_version = -1
        self.stats = StepStats()

    def _check_material(self, model, family: dict) -> str | None:
        """Check the fine solver's material ``family`` against the model and bind it
        (:meth:`~neuroscale_couple.operators.base.CoarseGrainingOperator.bind_material`);
        returns why its phases lie outside a family operator's ranges where the policy's
        ``outside_material: fallback`` consents to run anyway (None: inside)."""
        reason = None
        try:
            model.check_family(family)
        except MaterialOutsideError as err:
            if self.policy.outside_material != "fallback":
                raise
            reason = str(err)
            log.warning("outside_material=fallback: every point falls back (%s)", reason)
        model.bind_material(family)
        return reason

    @property
    def _run_calibrated(self) -> bool:
        """Whether the run calibration has a bound at the run's material (its first census)."""
        return self.run_scores is not None and self.run_scores.calibrated

    def _run_scores(self, model) -> RunScores | None:
        """The run calibration of the network's bound (:class:`Policy` ``run_calibration``),
        None where it is off."""
        on = self.policy.run_calibration
        applies = (model is not None and self.cold_start is None and not self.policy.classic
                   and not self.policy.never)
        if on is None:  # outside a family's ranges no other calibration holds at all
            on = applies and model.takes_material and self.material_outside is not None
        elif on and not applies:
            raise InputError("run_calibration recalibrates a trained operator's bound on the "
                             "run's fine solves: it needs a model and a finite tolerance, and a "
                             "cold start calibrates its own; drop it")
        return RunScores(self.policy.confidence, 0.0, RUN_SEED, name="run") if on else None

    @classmethod
    def from_config(cls, config: str | Path | dict, *, comm: MPI.Comm = MPI.COMM_WORLD
                    ) -> Coupler:
        """A Coupler from a YAML file (or mapping) with the keys

        ``model`` (the operator file, relative to the YAML's folder; ``none``: classic FE²),
        ``fine`` (``kind: rve`` with the periodic RVE's ``law``, ``matrix: {E, nu}``,
        ``fibre: {E, nu}``, ``mesh: {size, degree}``; or ``kind: cauchy_born`` with the crystal
        keys), ``policy`` (:class:`Policy` fields; ``rtol`` 0 without a model: classic FE²),
        ``retrain`` (:class:`~neuroscale_couple.retraining.RetrainConfig` fields),
        ``replay_dir``, ``cache_size``, ``cache_memory`` (e.g. ``2G``), ``dtype`` (float64 or
        float32), ``audit`` (bool), ``balance_ranks``, ``cold_start`` (with ``model: none``:
        :class:`~neuroscale_couple.cold_start.ColdStart` fields, ``encoder`` relative to the
        YAML's folder). Unknown keys are refused with the nearest known one named."""
        from neuroscale_couple.config import coupler_from_config

        return coupler_from_config(config, comm)

    # ------------------------------------------------------------------ set-up
    def register(self, point_ids: Sequence[int], microstructures: Sequence) -> None:
        """Attach a microstructure to each of this rank's points (ids unique over all ranks and
        independent of the partition, e.g. from original cell indices) and encode them
        (collective)."""
        ids = np.asarray(point_ids, dtype=np.int64)
        if len(ids) != len(microstructures):
            raise InputError(f"{len(ids)} point ids for {len(microstructures)} microstructures")
        if len(np.unique(ids)) != len(ids):
            raise InputError("point ids must be unique")
        self._check_dim({getattr(m, "dim", 2) for m in microstructures})
        order = np.argsort(ids)
        self._ids = ids[order]  # the points' rows: sorted by id
        row_of = np.empty(len(ids), dtype=np.int64)
        row_of[order] = np.arange(len(ids))
        # the distinct structures (and their latents) in the order the points were given: a
        # host that evaluates its points in that order reads the latents front to back
        distinct: dict = {}  # key → index into self._structures
        self._structures = []
        self._structure_of = np.empty(len(ids), dtype=np.int32)
        for i, m in enumerate(microstructures):
            k = distinct.setdefault(m.key, len(distinct))
            if k == len(self._structures):
                self._structures.append(m)
            self._structure_of[row_of[i]] = k
        self._check_structures()
        self._sticky, self._fell_back, self._noise_limited, self._outside, self._probed = (
            np.zeros(len(ids), dtype=bool) for _ in range(5))
        self._held_out = (np.zeros(len(ids), dtype=bool) if self.cold_start is None
                          else self.cold_start.is_held_out(self._ids))
        self._last_F = np.full((len(ids), self.dim, self.dim), np.nan)
        # each point's converged F̄ of the step before (the censuses extrapolate)
        self._previous_F = np.tile(np.eye(self.dim), (len(ids), 1, 1))
        self._encode()

    def _check_dim(self, dims: set[int]) -> None:
        """Set :attr:`dim` from the dimensions ``dims`` of this rank's microstructures and the
        other ranks' (collective): one dimension, the model's."""
        dims = set().union(*self.comm.allgather(dims))
        if len(dims) > 1:
            raise InputError(f"microstructures of dimensions {sorted(dims)} in one run: a "
                             "Coupler takes 2D or 3D cells, not both")
        d = dims.pop() if dims else self.dim
        if self.model is not None and d != self.dim:
            raise InputError(f"the model takes {self.dim}D loads (F̄ {self.dim}×{self.dim}) but "
                             f"the microstructures are {d}D cells: give a model trained on {d}D "
                             "cells (examples/models/fe2_composite_3d.pt for 3D sphere cells)")
        self.dim = d

    def _check_structures(self) -> None:
        """Mark the registered (distinct) structures outside the model's training region."""
        self._micro_outside = [None if self.region is None else self.region.structure_reason(m)
                               for m in self._structures]
        self._micro_out = np.array([r is not None for r in self._micro_outside], dtype=bool)

    def _encode(self) -> None:
        """Latents of the registered points' microstructures: one encoding per distinct one
        over all ranks, none for those of an earlier run on the same replay folder
        (:class:`~neuroscale_couple.latents.LatentStore`; collective). Its time is micro work
        as building an RVE is: the next step reports it as ``encode_time_s``."""
        if self.model is None:
            return
        t0 = time.perf_counter()
        if self.latent_store is None:
            self.latent_store = LatentStore(
                self.model, self.comm, None if self.replay is None else self.replay.directory
                / "latents")
        # float32: the encoder's precision (Inference casts chunk by chunk), half the memory
        self._z = self.latent_store.latents(self._structures).float()
        self._inference = None
        return_free_memory()  # the images and activations of the encoding
        self.stats.encode_time_s += time.perf_counter() - t0

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
        with together(self.comm, "the operator stage of a Coupler evaluation"):
            d = self.dim
            Fb = as_deformation_batch(F, f"F̄ (the Coupler's cells are {d}D)", (d,))
            ids = np.asarray(point_ids, dtype=np.int64)
            if len(ids) != len(Fb):
                raise InputError(f"{len(ids)} point ids for {len(Fb)} deformation gradients")
            rows = self._rows(ids)
            n = len(Fb)
            self.evaluations += 1
            t0 = time.perf_counter()
            if self.serving and n:
                stress, tangent, unc, noise, energy = self._predict(rows, Fb)
            else:
                stress, tangent = np.zeros((n, d, d)), np.zeros((n, d, d, d, d))
                unc, energy, noise = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n)
            answering = self.answering
            if answering and self.fits is not None:
                self._fit_predict(ids, Fb, stress, tangent, unc, energy)
            if self.policy.classic or not answering:
                fallback = np.ones(n, dtype=bool)
            else:
                limit = self.atol + self.policy.rtol * np.linalg.norm(stress, axis=(1, 2))
                fallback = ~(unc <= np.maximum(limit, noise))  # NaN: no operator value here
                fallback |= self._outside_region(ids, rows, Fb)
                fallback |= self._sticky[rows]
                if self.fits is None:  # the network's held-out points: never on the operator
                    fallback |= self._held_out[rows]
                self._noise_limited[rows[noise > limit]] = True
        if self.cold_start is not None and answering and self._probe_step != self.step:
            fallback |= self._probe(ids, rows, fallback, unc / limit)
        with together(self.comm, "the operator stage of a Coupler evaluation"):
            # the step's last evaluation (its converged state) is checked at end_step
            self._last_operator = (ids[~fallback], tangent[~fallback])
            self._last_F[rows] = Fb
            self._sticky[rows[fallback]] = True
            self._fell_back[rows[fallback]] = True
            self.stats.operator_time_s += time.perf_counter() - t0
            source = np.where(fallback, FINE, OPERATOR)
            op_stress = stress.copy()
            reuse = self._near_solve(Fb, ids, fallback, op_stress)
            for j in np.flatnonzero(reuse):
                solved = self._solved[int(ids[j])]
                P0, A0, W0 = solved.answer.P, solved.answer.A, solved.answer.W
                dF = Fb[j] - solved.F
                stress[j], tangent[j] = P0 + np.einsum("ijkl,kl->ij", A0, dF), A0
                # the quadratic model whose gradient that stress is (NaN if the solve had no W)
                energy[j] = W0 + np.sum((P0 + 0.5 * (stress[j] - P0)) * dF)
            solve = fallback & ~reuse
        self.cache.new_pass()
        t1 = time.perf_counter()
        done, failed, total = self._solve_fallback(Fb[solve], ids[solve], rows[solve], n)
        self.stats.fine_time_s += time.perf_counter() - t1
        for j, answer in zip(np.flatnonzero(solve), done, strict=True):
            if answer.P is None:
                source[j] = FAILED
                continue
            stress[j], tangent[j], energy[j] = answer.P, answer.A, answer.W
            self._solved[int(ids[j])] = SolvedPoint(Fb[j].copy(), answer, op_stress[j].copy())
            if self.fits is not None:
                self.fits.observe(int(ids[j]), Fb[j], answer.P, answer.A)
        self._check_failures(failed, total)
        if self.auditor is not None:
            self.auditor.remember(Fb, ids, [self._structure(r) for r in rows], stress, unc,
                                  source == OPERATOR)
        return CouplerResult(stress, tangent, unc, source, energy)

    @property
    def serving(self) -> bool:
        """Whether the network operator answers (a cold start's only once trained and
        calibrated)."""
        return self.model is not None and (self.cold_start is None or bool(self.model.calibration))

    @property
    def answering(self) -> bool:
        """Whether an operator answers anywhere: the network, or calibrated cell fits."""
        return self.serving or (self.fits is not None and self.fits.calibrated)

    def _fit_predict(self, ids: np.ndarray, F: np.ndarray, stress: np.ndarray,
                     tangent: np.ndarray, unc: np.ndarray, energy: np.ndarray) -> None:
        """Where a point has a cell fit (:mod:`neuroscale_couple.cell_fits`), its response and
        bound replace the network's, in place; while the fits have no bound yet, a NaN bound
        (the census: every fitted point to the fine solver)."""
        fitted = self.fits.fitted(ids)
        if not fitted.any():
            return
        if not self.fits.calibrated:
            unc[fitted] = np.nan
            return
        r = self.fits.predict(ids[fitted], F[fitted])
        stress[fitted], tangent[fitted], energy[fitted] = r["stress"], r["tangent"], r["energy"]
        unc[fitted] = self.fits.quantile * r["sigma"]

    def _probe(self, ids: np.ndarray, rows: np.ndarray, fallback: np.ndarray,
               ratio: np.ndarray) -> np.ndarray:
        """A cold start's probes, chosen at the first evaluation of a load step among all
        ranks' operator points (collective; :meth:`ColdStart.probes
        <neuroscale_couple.cold_start.ColdStart.probes>`): this rank's as a mask (n,)."""
        self._probe_step = self.step
        candidates = np.flatnonzero(~fallback)
        mine = [(int(ids[j]), float(ratio[j]), self._structure(rows[j]).key) for j in candidates]
        gathered = sorted(e for part in self.comm.allgather(mine) for e in part)
        chosen = set() if not gathered else {gathered[k][0] for k in self.cold_start.probes(
            np.array([e[1] for e in gathered]), [e[2] for e in gathered],
            self.comm.allreduce(len(self._ids)))}
        probe = np.isin(ids, list(chosen))
        self._probed[rows[probe]] = True
        return probe

    def _outside_region(self, ids: np.ndarray, rows: np.ndarray, F: np.ndarray) -> np.ndarray:
        """Points outside the model's training region that :class:`Policy` ``outside`` sends
        to the fine solver (n,) bool — where the run's phases lie outside a family operator's
        ranges, all of them without a cell fit until the run calibration has a bound at them —
        counts them for the step, raises for ``refuse``."""
        if self.material_outside is not None and not self._run_calibrated:
            outside = np.ones(len(F), dtype=bool)
            if self.fits is not None:  # a cell fit is of the run's own solves, at its material
                outside &= ~self.fits.fitted(ids)
            self._outside[rows[outside]] = True
            return outside
        if self.region is None:
            return np.zeros(len(F), dtype=bool)
        outside = self._region_outside(rows, F)
        if not outside.any():
            return outside
        self._outside[rows[outside]] = True
        rule = "warn" if self.policy.never else self.policy.outside
        if rule == "refuse":
            j = int(np.flatnonzero(outside)[0])
            reason = (self._micro_outside[self._structure_of[rows[j]]]
                      or self.region.load_reason(F[j]))
            raise InputError(f"point {int(ids[j])} is outside the model's training region "
                             f"({reason}) and the policy says outside=refuse: use "
                             "outside=fallback to solve such points with the fine solver")
        return outside if rule == "fallback" else np.zeros(len(F), dtype=bool)

    def _region_outside(self, rows: np.ndarray, F: np.ndarray) -> np.ndarray:
        """Whether each point (rows (n,)) at F̄ (n, d, d) lies outside the model's training
        region (:class:`~neuroscale_couple.region.TrainingRegion`): its structure or its load,
        (n,) bool."""
        return self._micro_out[self._structure_of[rows]] | self.region.load_outside(F)

    def _near_solve(self, F: np.ndarray, ids: np.ndarray, fallback: np.ndarray,
                    op_stress: np.ndarray) -> np.ndarray:
        """Fallback points whose fine solve of this load step serves ``F`` linearised (see
        :class:`Policy`; ``op_stress`` (n, d, d): the operator's stresses at ``F``, or zeros
        without a model). Only fallback points are looked at: this runs every evaluation.
        """
        near = np.zeros(len(F), dtype=bool)
        classic = self.policy.classic
        for j in np.flatnonzero(fallback) if self._solved else ():
            solved = self._solved.get(int(ids[j]))
            if solved is None:
                continue
            A0, noise, op_stress0 = solved.answer.A, solved.answer.noise, solved.op_stress
            dF = F[j] - solved.F
            if noise is not None and not classic:
                error = np.linalg.norm(op_stress[j] - op_stress0
                                       - np.einsum("ijkl,kl->ij", A0, dF))
                near[j] = error <= noise
                continue
            radius = self.policy.noisy_reuse if noise is not None else (
                0.0 if classic else self.policy.reuse)
            near[j] = radius > 0 and np.abs(dF).max() <= radius
        return near

    def _structure(self, row: int):
        """The structure of the point in ``row``."""
        return self._structures[self._structure_of[row]]

    def _predict(self, rows: np.ndarray, F: np.ndarray, run: bool = True
                 ) -> tuple[np.ndarray, ...]:
        """Stress, tangent, error bound, noise bound (0 unless ``exclude_noise``; both stress
        units, Frobenius norm) and energy of the operator at ``F``
        (:class:`~neuroscale_couple.operators.inference.Inference`: what depends on the latents
        alone is computed once per model version). ``run``: the bounds with the run
        calibration's factor (``Policy.run_calibration``), where it has one; False: the model's
        own calibration."""
        if self._inference is None:
            self._inference = Inference(self.model, self._z)
        r = self._inference.response(self._structure_of[rows], F)
        unc, noise = np.zeros(len(F)), np.zeros(len(F))
        if not self.policy.never:
            factor = self._bound_factor(rows, F)
            if run and self._run_calibrated:
                factor = factor * self.run_scores.quantile
            if self.policy.exclude_noise:
                unc = factor * np.sqrt(np.maximum(r.trace_epistemic, 0.0))
                noise = factor * np.sqrt(np.maximum(r.trace_aleatoric, 0.0))
            else:
                unc = factor * np.sqrt(np.maximum(r.trace_aleatoric + r.trace_epistemic, 0.0))
        return r.stress, r.tangent, unc, noise, r.energy

    def _bound_factor(self, rows: np.ndarray, F: np.ndarray) -> float | np.ndarray:
        """q^e·s of the calibrated bound q^e·s·√tr Σ at the policy's confidence: one number,
        or per point (n,) from its structure kind and load band (and a family operator's
        contrast band) for a group-wise calibration
        (:class:`~neuroscale_couple.calibration.Calibration`)."""
        cal, level = self._calibration(), self.policy.confidence
        if not cal.grouped:
            return cal.norm_radius(level) * cal.scale
        key = (self.version, id(self._structures), len(self._structures))
        if self._factor_key != key:  # a new model version or new registrations
            kinds = sorted({m.kind for m in self._structures})
            code = {k: i for i, k in enumerate(kinds)}
            self._kind_code = np.array([code[m.kind] for m in self._structures])
            # a family operator's run has one material: its contrast band is the run's
            contrast = (descriptors(self.model.material_arrays(1))["contrast"]
                        if cal.contrast_bands else None)
            self._factor_table = np.array([cal.bound_factors(level, cal.labels(
                [k] * (len(cal.bands) + 1), np.r_[0.0, cal.bands],
                None if contrast is None else np.repeat(contrast, len(cal.bands) + 1)))
                for k in kinds])
            self._factor_key = key
        band = np.searchsorted(np.asarray(cal.bands), stretch_distance(F), side="right")
        return self._factor_table[self._kind_code[self._structure_of[rows]], band]

    def _calibration(self) -> Calibration:
        """The model's calibration, parsed once per model version."""
        if self._cal is None or self._cal_version != self.version:
            self._cal, self._cal_version = (Calibration.from_dict(self.model.calibration),
                                            self.version)
        return self._cal

    def _solve_fallback(self, F: np.ndarray, ids: np.ndarray, rows: np.ndarray,
                        n_points: int) -> tuple[list[FineAnswer], int, int]:
        """Solve the given points (of this rank's ``n_points`` evaluated) somewhere in this
        rank's balancing group (``balance_ranks``); returns their answers in the given order,
        and the numbers of failed solves and of evaluated points over all ranks (collective)."""
        comm, group = self.comm, self._group
        requested, total = (int(v) for v in comm.allreduce(np.array([len(ids), n_points])))
        if not requested:
            return [], 0, total
        mine = [FallbackRequest(int(i), F[k], self._structure(r), self._cost.get(int(i), np.nan),
                                self._last_rank.get(int(i), -1))
                for k, (i, r) in enumerate(zip(ids, rows, strict=True))]
        flat = [(owner, e) for owner, part in enumerate(group.allgather(mine)) for e in part]
        assign = self._assign(flat) if flat else []  # alike on the group's ranks
        outgoing: list[list] = [[] for _ in range(group.size)]
        with together(comm, "a fine solve"):  # a SolveError is a failed point, not an error
            for (owner, e), r in zip(flat, assign, strict=True):
                if r == group.rank:
                    outgoing[owner].append((e.point_id, self._fine_solve(e.point_id, e.F,
                                                                         e.structure)))
        back = dict(pair for part in group.alltoall(outgoing) for pair in part)
        failed = comm.allreduce(sum(answer.P is None for part in outgoing for _, answer in part))
        answers = [back[pid] for pid in ids.tolist()]
        for pid, answer in zip(ids.tolist(), answers, strict=True):
            self._cost[pid], self._last_rank[pid] = answer.time_s, answer.rank
        return answers, failed, total

    def _assign(self, flat: list[tuple[int, FallbackRequest]]) -> np.ndarray:
        """The group rank that solves each gathered request ``(owner, request)`` (collective
        over the group), moving warm-start states to where their points go."""
        group, start = self._group, self._group_start
        known = [e.cost_s for _, e in flat if np.isfinite(e.cost_s)]
        default = float(np.median(known)) if known else 1.0
        build = self.cache.setup_time / self.cache.builds if self.cache.builds else default
        build = group.allreduce(build, op=MPI.MAX)
        # a solved point costs its last solve (build excluded), a new one the median solve; on
        # a rank that holds no solver of its microstructure a build comes on top (a new point
        # has no preferred rank; a solved one prefers the rank holding its warm-start state)
        held = np.array(group.allgather([e.structure.key in self.cache for _, e in flat])).T
        costs = np.array([e.cost_s if np.isfinite(e.cost_s) else default for _, e in flat])
        preferred = np.array([e.last_rank - start if start <= e.last_rank < start + group.size
                              else -1 for _, e in flat])
        assign = balance(costs, preferred, group.size, np.where(held, 0.0, build))
        # a point leaving the rank that holds its warm-start state takes the state along: only
        # the solver's build is lost, and results do not depend on where a point is solved
        moving: list[list] = [[] for _ in range(group.size)]
        for (_, e), r in zip(flat, assign, strict=True):
            if e.last_rank == start + group.rank != start + r:
                key = e.structure.key
                moving[r].append((e.point_id, key, self.cache.pop_state(key, e.point_id)))
        for pid, key, state in (e for part in group.alltoall(moving) for e in part):
            if state is not None:
                self.cache.put_state(key, pid, state)
        return assign

    def _fine_solve(self, pid: int, F: np.ndarray, micro) -> FineAnswer:
        """The fine solve of one point on this rank."""
        t0 = time.perf_counter()
        solver = self.cache.get(micro.key, micro)
        t_solve = time.perf_counter()
        try:
            res = solver.solve(F, point_ids=[pid], tangent=True)
        except SolveError as err:
            log.warning("rank %d: fine solve of point %d failed: %s", self.comm.rank, pid, err)
            self.stats.fine_failed += 1
            return FineAnswer(None, None, np.nan, None, time.perf_counter() - t_solve,
                              self.comm.rank)
        t = time.perf_counter() - t0
        self.stats.fine_solves += 1
        self.stats.fine_solve_time_s += t
        stderr = res.info.get("stress_stderr")
        if self.replay is not None:
            self.replay.append(micro, pid, F, res.stress[0], res.tangent[0], step=self.step,
                               evaluation=self.evaluations, model_version=self.version,
                               time_s=t, stderr=None if stderr is None else stderr[0])
        W = float(res.info.get("energy_density", [np.nan])[0])
        noise = None if stderr is None else float(np.linalg.norm(stderr[0]))
        return FineAnswer(res.stress[0], res.tangent[0], W, noise, time.perf_counter() - t_solve,
                          self.comm.rank)

    def _check_failures(self, failed: int, total: int) -> None:
        """Raise :class:`SolveError` (on every rank: the counts are global) when ``failed`` of
        ``total`` points' fine solves failed beyond the policy's ratio."""
        if not failed:
            return
        if not self.answering or failed > self.policy.max_failed_fraction * total:
            if self.replay is not None:
                self.replay.flush(self.step)
            raise SolveError(
                f"{failed} of {total} fine solves failed in load step {self.step} (limit "
                f"{self.policy.max_failed_fraction:.1%}"
                + (", and classic FE² has no operator value to keep" if not self.answering
                   else "") + "): reduce the load increment; the last checkpoint is intact")

    # ------------------------------------------------------------------ load steps
    def begin_step(self, step: int) -> None:
        """Start load step ``step``, or a cut-back part or retry of it: sources may change
        again (never call it inside a Newton solve)."""
        self.step = step
        self._sticky[:] = False
        if self.fits is not None:  # the cell fits' audit: drawn afresh each step
            self._held_out = self.fits.audited(self._ids, step)
        # a deterministic solve stays valid (Policy.reuse); a noisy one is linearised per step,
        # judged with the operator's stresses, which may change between steps
        self._solved = {pid: s for pid, s in self._solved.items() if s.answer.noise is None}

    def end_step(self, steps_left: int | None = None) -> StepReport:
        """Finish the current load step (collective): store its fine solves, retrain if due,
        and report the step's global figures.

        ``steps_left``: load steps still to come (None: unknown). A retraining starts only if
        its model will serve one: not after the last step, and in background mode (the model
        arrives a step later) not after the last but one either; a later run can fine-tune on
        the replay store with ``retrain.replay_from``. A background retraining already running
        is still swapped in.

        A retraining (or background swap) that fails on any rank does not stop the run: every
        rank keeps the model it had (the fallback still bounds the error), rank 0 logs a
        warning, the report carries the failing rank's message in ``retrain_failed``, and the
        data stay counted, so a due retraining is tried again after the next step.
        """
        comm, stats = self.comm, self.stats
        if self.fits is not None:
            self._score_fits()
        report = StepReport(
            fallback_points=comm.allreduce(int(self._fell_back.sum())),
            noise_limited_points=comm.allreduce(int(self._noise_limited.sum())),
            fine_solves=comm.allreduce(stats.fine_solves),
            fine_failed=comm.allreduce(stats.fine_failed),
            fine_time_s=comm.allreduce(stats.fine_time_s, op=MPI.MAX),
            operator_time_s=comm.allreduce(stats.operator_time_s, op=MPI.MAX),
            encode_time_s=comm.allreduce(stats.encode_time_s, op=MPI.MAX),
            outside_points=comm.allreduce(int(self._outside.sum())),
            non_elliptic_points=comm.allreduce(self._non_elliptic()),
            probe_points=comm.allreduce(int(self._probed.sum())),
            held_out_points=comm.allreduce(int(self._held_out.sum())))
        n_points = comm.allreduce(len(self._ids))
        report.operator_share = 1 - report.fallback_points / max(n_points, 1)
        if self.replay is not None:
            self.replay.flush(self.step)
        if self.auditor is not None:
            with together(comm, "the audit of a load step"):
                report.audit = self.auditor.check(comm, self.atol, self.policy.rtol).as_dict()
        if comm.rank == 0:
            if report.noise_limited_points:
                log.warning("%d points: the fine solver's noise bound exceeds the tolerance, so "
                            "no fallback meets it there (longer fine-solve averages would)",
                            report.noise_limited_points)
            if report.outside_points:
                log.warning("step %d: %d points outside the model's training region (%s)",
                            self.step, report.outside_points,
                            "warn: kept on the operator where their bound allowed"
                            if self.policy.never or self.policy.outside == "warn"
                            else "sent to the fine solver")
            if report.non_elliptic_points:
                log.warning("step %d: %d points on the operator have a tangent that lost strong "
                            "ellipticity (acoustic tensor not positive definite)", self.step,
                            report.non_elliptic_points)
        comm.Barrier()
        t0 = time.perf_counter()
        if self.fits is not None:
            self._refit(report)
            if not self.fits.calibrated and steps_left != 0:
                self._fits_census(report)
        if self.retrainer is not None:
            self._retrain(report, steps_left)
            if self.cold_start is not None:
                self._recalibrate(report)
        report.retrain_time_s = time.perf_counter() - t0
        report.model_version = self.version
        if self.run_scores is not None:
            self._run_census(report, steps_left)
        converged = np.isfinite(self._last_F).all(axis=(1, 2))
        self._previous_F[converged] = self._last_F[converged]
        self.stats = StepStats()
        for counted in (self._fell_back, self._noise_limited, self._outside, self._probed):
            counted[:] = False
        self._last_F[:] = np.nan
        self._last_operator = None
        return_free_memory()  # the step's transients: resident memory stays what points hold
        return report

    def _non_elliptic(self) -> int:
        """Points of the step's last evaluation whose operator tangent lost strong ellipticity
        (checked once per step, at its converged state, not at every Newton iterate)."""
        if self._last_operator is None or not self.answering:
            return 0
        return int((acoustic_minimum(self._last_operator[1]) <= 0).sum())

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        """This rank's :class:`~neuroscale_couple.coupler_state.CouplerState` as named arrays
        (call between load steps): the model version, the retraining counters, a background
        retraining in progress, the fallback points' last solves, solve times and warm-start
        states. The model itself is the caller's to save.

        Per rank, not gathered: each rank holds its own points' records and the warm starts of
        the points it solved last, so a checkpoint costs no communication and no rank holds
        everyone's states; a restart on another number of ranks reads every rank's file and
        keeps its points' records (:meth:`restore_state`)."""
        r = self.retrainer
        state = CouplerState(
            rank=self.comm.rank, ranks=self.comm.size, step=self.step,
            evaluations=self.evaluations, version=self.version,
            new_since_retrain=0 if r is None else r.new_since,
            retrain_rate=None if r is None else r.rate,
            background_step=None if r is None or r.pending is None else r.pending.step,
            solved=dict(self._solved), cost_s=dict(self._cost), last_rank=dict(self._last_rank),
            warm=self.cache.warm_states()).to_arrays()
        if self.run_scores is not None:
            state |= self.run_scores.state()
        if self.run_scores is not None or self.fits is not None:  # the censuses extrapolate
            state |= {"run/id": self._ids.copy(), "run/previous_F": self._previous_F.copy()}
        return state if self.fits is None else {**state, **self.fits.state()}

    def restore_state(self, states: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Resume from :meth:`checkpoint_state` after :meth:`register` (collective; the model
        is loaded by the caller): the replay store loses the segments of later steps (the
        killed run's, which the restart solves again), and a background retraining that was
        running is started again.

        ``states``: this rank's own, when the run restarts on the number of ranks it was
        checkpointed on: it then continues exactly as the uninterrupted run; else every
        rank's, in rank order: each rank keeps its points' records and takes their warm
        starts (the run then agrees with the uninterrupted one as runs on different numbers of
        ranks agree, to the fine solver's tolerance)."""
        comm = self.comm
        with together(comm, "restoring the Coupler's checkpoint state"):
            parsed = [CouplerState.from_arrays(s) for s in states]
            if not parsed:
                raise CheckpointError("no Coupler state to restore from: the checkpoint is of "
                                      "another fine solver; start the run afresh")
            own = parsed[0]
            if len(parsed) != 1 or (own.rank, own.ranks) != (comm.rank, comm.size):
                own = CouplerState.merge(parsed, self._ids.tolist(), comm.rank, comm.size)
            if self.fits is not None:
                self.fits.restore(states, self._ids.tolist())
                self._follow_stress_scale()
            if self.run_scores is not None and "run/scores" in states[0]:
                self.run_scores.restore(states[0])
            if "run/previous_F" in states[0]:
                row = {int(pid): r for r, pid in enumerate(self._ids.tolist())}
                for s in states:
                    for pid, F in zip(s["run/id"].tolist(), s["run/previous_F"], strict=True):
                        if pid in row:
                            self._previous_F[row[pid]] = F
        self.step, self.evaluations, self.version = own.step, own.evaluations, own.version
        self._solved, self._cost = dict(own.solved), dict(own.cost_s)
        self._last_rank = dict(own.last_rank)
        for key, pid, state in own.warm:
            self.cache.put_state(key, pid, state)
        if self.replay is not None:
            if comm.rank == 0:
                self.replay.discard_after(own.step)
            comm.Barrier()
        r = self.retrainer
        if r is None:
            return
        r.new_since, r.rate = own.new_since_retrain, own.retrain_rate
        if own.background_step is not None:
            self._run_job(r.job(self.model, own.background_step, self.version),
                          own.background_step)

    # ------------------------------------------------------------------ retraining
    def _retrain(self, report: StepReport, steps_left: int | None) -> None:
        """Swap in a background retraining (with ``swap_when_ready``: one finished on every
        rank; else none starts), then retrain if due (collective); a
        :class:`RetrainError` (raised on every rank alike) keeps the model and is recorded in
        ``report``."""
        r, comm = self.retrainer, self.comm
        failed = []
        waiting = r.pending is not None and r.config.swap_when_ready and not r.ready()
        if r.pending is not None and not waiting:
            try:
                model, n_online, report.retrain_background_s = r.swap()
                report.training_s += report.retrain_background_s
                self._adopt(model, n_online)
            except RetrainError as err:
                failed.append(str(err))
        r.new_since += report.fine_solves
        # a cold start's held-out points and probes fall back by design, not for want of a
        # model; with cell fits, only points still without one call for the network
        if self.fits is None:
            evidence = report.fallback_points - (
                0 if self.cold_start is None or not self.serving
                else report.held_out_points + report.probe_points)
        else:  # a point that fell back is served by its fit from then on: the network serves,
            # and learns for, only the points without one (a cold start's)
            evidence = (0 if self.cold_start is None
                        else comm.allreduce(int((~self.fits.fitted(self._ids)).sum())))
        if not waiting and r.due(evidence, comm.allreduce(len(self._ids)), steps_left):
            try:
                job = r.job(self.model, self.step, self.version)
                if job is not None and r.config.cost_aware:
                    serves = 1 if steps_left is None else steps_left - (r.steps_needed - 1)
                    (report.retrain_estimate_s, report.retrain_saving_s,
                     report.retrain_skipped) = r.weigh(job, self.model, report.fine_time_s,
                                                       serves)
                if not report.retrain_skipped:
                    t0 = time.perf_counter()
                    self._run_job(job)
                    if not r.config.background:
                        report.training_s += time.perf_counter() - t0
                    r.new_since = 0
            except RetrainError as err:
                failed.append(str(err))
        if failed:
            report.retrain_failed = "; ".join(failed)
            if comm.rank == 0:
                log.warning("step %d: %s; the run goes on with model version %d", self.step,
                            report.retrain_failed, self.version)

    def _score_fits(self) -> None:
        """Score the cell fits at the step's converged loads (collective): at the audited points
        and, while no bound exists, the census (:meth:`CellFits.census
        <neuroscale_couple.cell_fits.CellFits.census>`). A drawn point whose last fine solve of
        the step is not at those loads — it stayed on its fit, or fell back and was linearised
        at the last iterates — is solved there besides; the solve teaches the fit, and the
        step's answer at the point stays what it was. A failed solve is not scored."""
        ids, F = self._ids, self._last_F
        drawn = self._held_out.copy()
        if not self.fits.calibrated:
            drawn |= self.fits.census(ids, self.step, self.comm)
        drawn = np.flatnonzero(drawn & self.fits.fitted(ids) & np.isfinite(F).all(axis=(1, 2)))
        at_loads = np.zeros(len(drawn), dtype=bool)
        for k, r in enumerate(drawn):
            last = self._solved.get(int(ids[r]))
            if last is not None and np.array_equal(last.F, F[r]):
                self.fits.score(int(ids[r]), F[r], last.answer.P)
                at_loads[k] = True
        solve = drawn[~at_loads]
        self.cache.new_pass()
        t0 = time.perf_counter()
        done, _, _ = self._solve_fallback(F[solve], ids[solve], solve, len(ids))
        self.stats.fine_time_s += time.perf_counter() - t0
        for r, answer in zip(solve, done, strict=True):
            if answer.P is not None:
                self.fits.score(int(ids[r]), F[r], answer.P)
                self.fits.observe(int(ids[r]), F[r], answer.P, answer.A)

    def _run_census(self, report: StepReport, steps_left: int | None) -> None:
        """The run calibration's census at a step's end (collective; :class:`Policy`
        ``run_calibration``): the model that serves the next step scored at that step's
        extrapolated loads, 2F̄ₖ − F̄ₖ₋₁ (F̄₋₁ = I), on points drawn among those its bound kept
        on the operator in the step (all, in a run outside a family's ranges before its first
        census; inside the training region at both loads, without a cell fit), solved there
        besides (:meth:`_solve_ahead`). Sets the next step's factor and the census's figures
        in ``report``; no census after the last step (``steps_left`` 0)."""
        comm, ids, F = self.comm, self._ids, self._last_F
        if steps_left != 0:
            ahead, eligible = self._ahead()
            if self.material_outside is None or self._run_calibrated:
                # where the bound decided, the points it kept on the operator: its guarantee
                # is wanted where it is used (the points it sent to the fine solver have wider
                # bounds, and their scores run lower)
                eligible &= ~self._fell_back
            if self.region is not None:  # the bound decides inside the region only
                all_rows = np.arange(len(ids))
                eligible[eligible] &= ~self._region_outside(all_rows[eligible], F[eligible])
                eligible &= ~self._region_outside(all_rows, ahead)
            if self.fits is not None:
                eligible &= ~self.fits.fitted(ids)
            drawn = np.flatnonzero(self.run_scores.census_exact(ids, self.step, eligible, comm))
            rows, truth = self._solve_ahead(ahead, drawn, report)
            if len(rows):
                stress, _, bound, _, _ = self._predict(rows, ahead[rows], run=False)
                error = np.linalg.norm(truth - stress, axis=(1, 2))
                with np.errstate(divide="ignore", invalid="ignore"):  # zero bound: infinite
                    for score in np.where(error > 0, error / bound, 0.0):
                        self.run_scores.add(float(score))
            report.run_scored = comm.allreduce(len(rows))
            self.run_scores.end_step(comm)
        if self._run_calibrated:
            report.run_bound_factor = self.run_scores.quantile
            if comm.rank == 0 and report.run_scored:
                log.info("step %d: the next step's bound is %.3g × the model's (census of %d "
                         "points at its extrapolated loads)", self.step,
                         self.run_scores.quantile, report.run_scored)

    def _fits_census(self, report: StepReport) -> None:
        """The cell fits' first census, at the end of a step that left them without a bound
        (collective): 2 / (1 − c) fitted points drawn by id, solved besides at the next step's
        extrapolated loads (:meth:`_solve_ahead`), score the fits that serve that step there,
        and the fits are calibrated on those scores (:meth:`CellFits.calibrate_ahead
        <neuroscale_couple.cell_fits.CellFits.calibrate_ahead>`)."""
        ahead, eligible = self._ahead()
        eligible &= self.fits.fitted(self._ids)
        drawn = np.flatnonzero(self.fits.scores.census_exact(self._ids, self.step, eligible,
                                                             self.comm))
        rows, truth = self._solve_ahead(ahead, drawn, report)
        self.fits.calibrate_ahead(self._ids[rows], ahead[rows], truth, self.comm)
        report.fits_scored = self.comm.allreduce(len(rows))
        if self.comm.rank == 0:
            log.info("step %d: cell fits' census of %d points at the next step's extrapolated "
                     "loads, bound factor %.3g", self.step, report.fits_scored,
                     self.fits.quantile)

    def _ahead(self) -> tuple[np.ndarray, np.ndarray]:
        """The next step's loads extrapolated from each point's last two converged ones,
        2F̄ₖ − F̄ₖ₋₁ (F̄₋₁ = I), (n, d, d), and whether a census may solve the point there (n,)
        bool: it converged in this step and the extrapolated F̄ has a positive determinant."""
        F = self._last_F
        converged = np.isfinite(F).all(axis=(1, 2))
        ahead = np.where(converged[:, None, None], 2 * F - self._previous_F, np.eye(self.dim))
        return ahead, converged & (np.linalg.det(ahead) > 0)

    def _solve_ahead(self, ahead: np.ndarray, drawn: np.ndarray, report: StepReport
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Solve the points of rows ``drawn`` besides at ``ahead[drawn]`` (a census: the
        step's answers stay what they were; the solves join the replay store, the fits do not
        learn them), counted in ``report``'s fine solves and time: the rows solved (m,) and
        their stresses (m, d, d), failed solves left out."""
        comm, d = self.comm, self.dim
        solves, t0 = self.stats.fine_solves, time.perf_counter()
        self.cache.new_pass()
        done, _, _ = self._solve_fallback(ahead[drawn], self._ids[drawn], drawn, len(self._ids))
        ok = np.array([a.P is not None for a in done], dtype=bool)
        truth = np.array([a.P for a in done if a.P is not None]).reshape(-1, d, d)
        report.fine_solves += comm.allreduce(self.stats.fine_solves - solves)
        report.fine_time_s += comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        return drawn[ok], truth

    def _refit(self, report: StepReport) -> None:
        """The cell fits learn the step's solves and are recalibrated on its scores
        (collective); a new fit is a new operator version. A cold start's ``atol``, where the
        policy leaves it to the model, follows the solves' stress scale."""
        t0 = time.perf_counter()
        refitted = self.fits.end_step(self.comm)
        if refitted:
            self.version += 1
            report.training_s += time.perf_counter() - t0
        self._follow_stress_scale()
        if self.comm.rank == 0 and refitted:
            log.info("step %d: %d cell fits learnt (version %d), bound factor %.3g", self.step,
                     refitted, self.version, self.fits.quantile)

    def _follow_stress_scale(self) -> None:
        """A cold start's ``atol``, where the policy leaves it to the model: 1 % of the stress
        scale of the cell fits' solves."""
        if self.policy.atol is None and self.cold_start is not None and self.fits.stress_scale:
            self.atol = 0.01 * self.fits.stress_scale

    def _recalibrate(self, report: StepReport) -> None:
        """A cold start's conformal recalibration of the serving operator on the held-out
        points' solves of the step just ended (collective); sets ``atol`` from the operator's
        stress scale where the policy leaves it to the model. A failure keeps the calibration
        and is recorded in ``report``."""
        if not self.model.card.get("trained_on"):
            return
        try:
            n = self.retrainer.recalibrate(self.model, self.step, self.policy.confidence)
        except RetrainError as err:
            report.retrain_failed = "; ".join(filter(None, (report.retrain_failed, str(err))))
            return
        self._cal = None
        if self.policy.atol is None and self.fits is None:
            self.atol = 0.01 * float(self.model.stress_scale)
        if self.comm.rank == 0 and n:
            log.info("step %d: operator v%d recalibrated on %d held-out solves (scale %.3g)",
                     self.step, self.version, n, self.model.calibration.get("scale", np.nan))

    def warm_start(self) -> bool:
        """Fine-tune on the replay stores of earlier runs (``retrain.replay_from``) before the
        first load step (collective); False if there is nothing to learn from. A failure raises
        :class:`RetrainError` on every rank (no load step is lost; the model is unchanged)."""
        r = self.retrainer
        if r is None or not r.config.replay_from:
            return False
        job = r.job(self.model, None, self.version, r.config.warm_start_epochs)
        if job is not None:  # the earlier runs' data only, in the foreground
            self._adopt(r.fit(job, self.model), job.n_online)
        return True

    def _run_job(self, job: RetrainJob | None, step: int | None = None) -> None:
        """Run a retraining job of the step just ended (or of ``step``) in the foreground,
        adopting its model, or start it in the background (``RetrainConfig.background``)."""
        if job is None:
            return
        if self.retrainer.config.background:
            self.retrainer.start(job, self.model, self.step if step is None else step)
        else:
            self._adopt(self.retrainer.fit(job, self.model), job.n_online)

    def _adopt(self, model, n_online: int) -> None:
        """Make ``model`` (a retrained copy) the run's operator and bump the version, once all
        ranks hold the same weights (else :class:`RetrainError` on every rank, the model kept).
        """
        self.check_same_weights(model, RetrainError)
        self.model = model
        self._inference = None
        self.version += 1
        self.model.card["online_version"] = self.version
        self.model.card["trained_on"] = n_online
        if self.run_scores is not None:  # scored afresh at the step's end (its census)
            self.run_scores.reset()
        if self.region is not None:  # the retraining's solves widened the region
            self.region = model.region
            self._check_structures()
        if (self.material_outside is not None and model.card.get("run_calibration", 0)
                >= points_for_level(self.policy.confidence)):
            # phases outside a family operator's ranges (run with the user's consent): its
            # heads are now trained on this material's fine solves and its bound calibrated
            # on held-out ones, so points may go to the operator where that bound allows
            self.material_outside = None
            if self.comm.rank == 0:
                log.info("the operator learnt the run's material (outside its trained "
                         "phases): its calibrated bound now decides, point by point")
        if self.comm.rank == 0:
            log.info("operator retrained on %d fine solves: version %d%s", n_online,
                     self.version, "" if not self.model.calibration else
                     f", calibration scale {self.model.calibration['scale']:.3g}")

    def check_same_weights(self, model=None, error: type[Exception] = NeuroScaleError) -> None:
        """Raise ``error`` on every rank if the ranks' copies of ``model`` (default: the run's
        operator) differ (collective)."""
        model = self.model if model is None else model
        digests = self.comm.allgather(model.weights_digest())
        if len(set(digests)) != 1:
            what = "model version" if model is self.model else "the model retrained from version"
            raise error(f"{what} {self.version} differs between ranks ({len(set(digests))} "
                        "distinct weight digests): the data-parallel update went out of step")

    def close(self) -> None:
        """Close the cached fine solvers; a background retraining still running is waited for
        and dropped (its data are in the replay store)."""
        if self.retrainer is not None:
            self.retrainer.close()
        self.cache.close()
        if self._group is not self.comm:
            self._group.Free()
            self._group = self.comm


def _check_cold_start(model, family: dict | None, policy: Policy,
                      retrain: RetrainConfig | None, replay_dir) -> None:
    """Refuse a cold start the Coupler cannot run (before any collective call)."""
    if model is not None:
        raise InputError("cold_start trains its own operator: give model=None (or drop "
                         "cold_start to run the trained model)")
    if policy.classic:
        raise InputError("cold_start with rtol=0 is classic FE² and trains nothing: give a "
                         "tolerance (e.g. rtol=0.02) or drop cold_start")
    if family is None:
        raise InputError("cold_start needs the fine solver's material: give family={'law': "
                         "..., 'matrix': {E, nu}, 'fibre': {E, nu}}")
    if retrain is None or not retrain.enabled or replay_dir is None:
        raise InputError("cold_start learns from the run's fine solves: give replay_dir and an "
                         "enabled retrain config (RetrainConfig(background=True); on the "
                         "command line drop --no-retrain)")
