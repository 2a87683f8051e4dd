"""Online retraining of a Coupler's operator between load steps (never inside a Newton solve).

After a load step that sent enough points to the fine solver, the operator's coarse-graining
heads (encoder frozen) are fine-tuned on the run's fine solves (the replay store) plus anchor
samples of the original training data (no forgetting), data-parallel over the ranks with
all-reduced gradients, and recalibrated; the :class:`~neuroscale_couple.coupler.Coupler` then
adopts the model (version bump, weights compared across ranks). With
``RetrainConfig.background`` a copy trains in a thread while the next step runs on the old
operator; with ``RetrainConfig.cost_aware`` a due retraining runs only if it is estimated to pay.

A retraining never changes the model it starts from: it trains a copy, which the Coupler adopts
only once every rank has finished it. A failure on any rank (an exception in the training, the
recalibration, reading the data or the background thread; weights that differ between ranks)
raises :class:`~neuroscale_couple.errors.RetrainError` on every rank, with the failing rank's
message, and the Coupler goes on with the model it has (see
:meth:`~neuroscale_couple.coupler.Coupler.end_step`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from mpi4py import MPI

import numpy as np
import torch

from neuroscale_couple.errors import InputError, RetrainError
from neuroscale_couple.operators.base import HEAD_PREFIXES
from neuroscale_couple.parallel import FAULT_TIMEOUT_S, together
from neuroscale_couple.region import TrainingRegion
from neuroscale_couple.store import ReplayStore, load_rve_dataset

if TYPE_CHECKING:
    from neuroscale_couple.cold_start import ColdStart
    from neuroscale_couple.training import TrainConfig, TrainingData

log = logging.getLogger(__name__)


@dataclass
class RetrainConfig:
    """Online fine-tuning between load steps.

    ``anchor`` / ``anchor_calibration``: RVE data sets sampled from the operator's original
    training and calibration data (default: ``<model>.anchor.h5`` and
    ``<model>.anchor_calibration.h5`` next to the model file): up to ``anchor_micro``
    microstructures of the first are mixed into the training data so the operator does not
    forget its training range, and all of the second into the recalibration (never trained
    on, so every one of its points sharpens the conformal quantiles).
    Retraining runs after a step in which at least ``min_fallback_fraction`` of all points fell
    back (evidence that the loading left the operator's range; scattered in-range fallbacks do
    not pay for a retraining) and at least ``min_new`` fine solves arrived since the last one;
    it trains in float32 (the run evaluates in float64);
    ``calibration_fraction`` of the new samples are held out for recalibration.
    ``replay_from``: replay directories of earlier runs whose fine solves join the training data
    (and :meth:`~neuroscale_couple.coupler.Coupler.warm_start` fine-tunes on them for
    ``warm_start_epochs`` before the first step).
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
    ``swap_when_ready`` (with ``background``): the run never waits for a retraining: it is
    swapped in at the first step boundary at which it has finished on every rank, the steps
    until then run on the old operator (and no other retraining starts); at the end of the run
    a cold start's unfinished retraining is cancelled, not waited for. Which step gets the new
    model then depends on timing: off by default, so runs are reproducible.
    """

    enabled: bool = True
    background: bool = False
    cost_aware: bool = False
    swap_when_ready: bool = False
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


class RetrainJob(NamedTuple):
    """One retraining: training data, calibration data (None: keep the calibration), the
    optimisation settings, how many of the samples are the runs' fine solves, whether the
    normalisation is set from the data (a cold start's first training), and how many of the
    calibration samples are this run's own held-out fine solves."""

    data: TrainingData
    calibration: TrainingData | None
    config: TrainConfig
    n_online: int
    normalise: bool = False
    run_calibration: int = 0


class Retrainer:
    """Decides when the operator is retrained, gathers the data and runs the fine-tuning
    (collective over ``comm``; see the module docstring).

    Parameters
    ----------
    config : the retraining settings (the Coupler builds a Retrainer only when they are enabled).
    comm : the macro problem's communicator.
    replay_dir : this run's replay store (the fine solves to learn from).
    model_path : the model file, to find the anchor data sets next to it.
    cold_start : a cold start's settings (:mod:`neuroscale_couple.cold_start`): no anchors (the
        run's material is not the encoder model's), the held-out points' solves kept out of
        training and used by :meth:`recalibrate`, the first training longer and normalising.
    """

    def __init__(self, config: RetrainConfig, comm: MPI.Comm, *, replay_dir: str | Path,
                 model_path: str | Path | None, cold_start: ColdStart | None = None) -> None:
        self.config, self.comm, self.replay_dir = config, comm, Path(replay_dir)
        self.cold_start = cold_start
        if cold_start is not None and config.replay_from:
            raise InputError("a cold start learns from its own run only: drop replay_from "
                             "(--replay-from), or fine-tune a trained model on it")
        self._bg_comm: MPI.Comm | None = None
        self._agree_comm: MPI.Comm | None = comm.Dup()  # agreements after collective training
        if config.background:
            if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
                raise InputError("background retraining needs MPI initialised with "
                                 "MPI_THREAD_MULTIPLE (mpi4py's default): drop "
                                 "mpi4py.rc.thread_level, or retrain in the foreground")
            self._bg_comm = comm.Dup()
        elif config.swap_when_ready:
            raise InputError("swap_when_ready swaps in a background retraining: set background "
                             "too (--background-retrain)")
        self._anchor = (None, None) if cold_start else self._anchor_paths(model_path)
        for d in config.replay_from:
            if not ReplayStore.segments(d):
                raise InputError(f"replay directory {d} holds no segments (step*.rank*.h5) of "
                                 "an earlier run")
            if Path(d).resolve() == self.replay_dir.resolve():
                raise InputError(f"replay_from {d} is this run's own replay directory: copy it "
                                 "elsewhere first")
        self.new_since = 0  # fine solves since the last retraining
        self.rate: float | None = None  # seconds per sample-epoch (this rank)
        self.pending: _Background | None = None

    def _anchor_paths(self, model_path) -> tuple[Path | None, Path | None]:
        stem = None if model_path is None else Path(model_path).with_suffix("")
        paths = []
        for given, suffix in ((self.config.anchor, ".anchor.h5"),
                              (self.config.anchor_calibration, ".anchor_calibration.h5")):
            path = Path(given) if given else (None if stem is None else
                                              stem.with_name(stem.name + suffix))
            if given and not path.is_file():
                raise InputError(f"anchor data set {path} does not exist")
            paths.append(path if path is not None and path.is_file() else None)
        if paths[0] is None and self.comm.rank == 0:
            log.warning("no anchor data next to the model: online retraining uses only the "
                        "run's fallback data and may forget the training range")
        return paths[0], paths[1]

    def due(self, fallback_points: int, n_points: int, steps_left: int | None) -> bool:
        """Whether a retraining is due after a step with ``fallback_points`` of ``n_points``
        points on the fine solver: enough fine solves since the last one, enough of the points
        (evidence that the loading left the operator's range), and a step left for the new model
        to serve (two in background mode, whose model arrives a step later)."""
        cfg = self.config
        return ((steps_left is None or steps_left >= self.steps_needed)
                and self.new_since >= cfg.min_new
                and fallback_points >= cfg.min_fallback_fraction * n_points)

    @property
    def steps_needed(self) -> int:
        """Load steps that must remain after a retraining for its model to serve one."""
        return 2 if self.config.background else 1

    def replay_data(self, resolution: int, up_to_step: int | None, from_step: int = 0,
                    material_inputs: bool = False):
        """The fine solves of earlier runs (``replay_from``) and of this run from
        ``from_step`` up to ``up_to_step`` (None: none of this run) as
        :class:`~neuroscale_couple.training.TrainingData` with images at ``resolution`` (with
        ``material_inputs``, a family operator's: the phases of each segment's material join
        them, stresses in its E_m), in a rank-count independent order (run, step, evaluation,
        point id), and their point ids (S,); None if there are none.
        """
        from neuroscale_couple.training import TrainingData

        sources = [(i, p) for i, d in enumerate(self.config.replay_from)
                   for p in ReplayStore.segments(d)]
        if up_to_step is not None:
            run = len(self.config.replay_from)
            sources += [(run, p) for p in ReplayStore.segments(self.replay_dir, up_to_step)
                        if ReplayStore.segment_step(p) >= from_step]
        parts, keys = [], []
        for run, path in sources:
            d = load_rve_dataset(path)
            parts.append(TrainingData.from_arrays(d, resolution, torch.float64, str(path),
                                                  material_inputs))
            keys.append(np.stack([np.full(len(d["samples/step"]), run), d["samples/step"],
                                  d["samples/evaluation"], d["samples/point_id"]], axis=1))
        if not parts:
            return None
        data = TrainingData.concat(parts)
        k = np.concatenate(keys)
        order = np.lexsort(k.T[::-1])
        data = data.subset(order)
        # one image per microstructure, numbered by first appearance: the grouping into training
        # batches must not depend on which rank happened to solve a point
        digests = [hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in data.images]
        first: dict[str, tuple[int, int]] = {}
        index = [first.setdefault(digests[m], (len(first), m))[0]
                 for m in data.micro_index.tolist()]
        kept = [m for _, m in first.values()]
        return dataclasses.replace(data, images=data.images[kept],
                                   micro_index=torch.as_tensor(index, dtype=torch.long),
                                   kinds=None if data.kinds is None else data.kinds[kept]
                                   ), k[order, 3]

    def _anchor_data(self, path: Path | None, resolution: int, seed: int,
                     material_inputs: bool = False, every_cell: bool = False):
        from neuroscale_couple.training import TrainingData

        if path is None:
            return None
        data = TrainingData.from_h5(path, resolution, torch.float64, material_inputs)
        n_micro = len(data.images)
        if n_micro > self.config.anchor_micro and not every_cell:
            keep = np.random.default_rng(seed).choice(n_micro, self.config.anchor_micro,
                                                      replace=False)
            data = data.subset(np.flatnonzero(np.isin(data.micro_index.numpy(), keep)))
        return data

    def job(self, model, up_to_step: int | None, version: int,
            epochs: int | None = None) -> RetrainJob | None:
        """Training data, calibration data and settings of a retraining of ``model`` (at model
        ``version``) on the fine solves up to ``up_to_step`` (None if there are none); reads the
        replay and anchor files (collective: a file that fails to read on any rank raises
        :class:`RetrainError` on every rank)."""
        with self._agreed("reading the retraining data", local=True):
            return self._job(model, up_to_step, version, epochs)

    def _job(self, model, up_to_step: int | None, version: int,
             epochs: int | None) -> RetrainJob | None:
        from neuroscale_couple.training import TrainConfig, TrainingData

        cfg = self.config
        seed = 1000 + version
        resolution, phases = model.input_resolution, model.takes_material
        replayed = self.replay_data(resolution, up_to_step, material_inputs=phases)
        if replayed is None:
            return None
        online, point_ids = replayed
        cold = self.cold_start
        if cold is not None:  # the held-out points calibrate (recalibrate), never train
            fit = online.subset(np.flatnonzero(~cold.is_held_out(point_ids)))
            held = None
            if not len(fit):
                return None
        else:
            # hold out samples, not microstructures: the coupler predicts new loads of
            # microstructures it has seen, which is what the recalibration must measure
            order = np.random.default_rng(seed).permutation(len(online))
            n_held = round(cfg.calibration_fraction * len(online))
            fit = online.subset(np.sort(order[n_held:]))
            held = online.subset(np.sort(order[:n_held]))
        anchor = self._anchor_data(self._anchor[0], resolution, seed, phases)
        anchor_cal = self._anchor_data(self._anchor[1], resolution, seed, phases,
                                       every_cell=True)
        data = TrainingData.concat([p for p in (fit, anchor) if p is not None])
        cal_parts = [p for p in (held, anchor_cal) if p is not None and len(p)]
        calibration = TrainingData.concat(cal_parts) if cal_parts else None
        # fresh heads (never trained: no Coupler adopted the model): train them longer
        first = cold is not None and not model.card.get("trained_on")
        n_epochs = epochs or (cold.epochs if first else cfg.epochs)
        # a cold start trains the whole heads, not a correction: larger batches, larger steps
        batch, lr = (cfg.batch_size, cfg.lr) if cold is None else (cold.batch_size, cold.lr)
        tcfg = TrainConfig(epochs=n_epochs, batch_size=batch, lr=lr, lr_final=cfg.lr_final,
                           val_fraction=0.0, patience=n_epochs, seed=seed,
                           weights=dict(cfg.weights))
        return RetrainJob(data, calibration, tcfg, len(online), normalise=first,
                          run_calibration=0 if held is None else len(held))

    def recalibrate(self, model, step: int, confidence: float) -> int:
        """Calibrate ``model`` in place (split conformal, at ``confidence`` and the default
        levels) on the held-out points' fine solves of load step ``step`` — of earlier steps
        too where that step has fewer than a finite quantile at ``confidence`` needs (19 at
        0.95) — (a cold start's; every rank reads the same files: collective). Returns the
        number of samples used, 0 if too few (the calibration is then left as it was)."""
        from neuroscale_couple.calibration import LEVELS, points_for_level
        from neuroscale_couple.evaluation import calibrate_model

        needed = points_for_level(confidence)
        with self._agreed("the cold start's recalibration", local=True):
            for first in range(step, -1, -1):
                replayed = self.replay_data(model.input_resolution, step, first,
                                            model.takes_material)
                if replayed is None:
                    continue
                data, point_ids = replayed
                held = data.subset(np.flatnonzero(self.cold_start.is_held_out(point_ids)))
                if len(held) >= needed:
                    calibrate_model(model, held, tuple(sorted({*LEVELS, confidence})))
                    return len(held)
            return 0

    @staticmethod
    def _fit(model, data, calibration, tcfg, comm: MPI.Comm, normalise: bool = False,
             cancel: threading.Event | None = None) -> dict:
        """Fine-tune ``model``'s coarse-graining heads in place (``normalise``: its scales set
        from ``data`` first) and recalibrate it (collective over ``comm``); returns the training
        history. ``cancel`` (a training on one process): see :func:`~neuroscale_couple.training.
        train`."""
        from neuroscale_couple.evaluation import calibrate_model
        from neuroscale_couple.training import train

        # only the coarse-graining heads learn: the latents of the run's microstructures stay
        # put (no re-encoding drift) and the encoder cannot forget the training range
        frozen = [p for name, p in model.named_parameters()
                  if not name.startswith(HEAD_PREFIXES)]
        for p in frozen:
            p.requires_grad_(False)
        dtype = next(model.parameters()).dtype
        model.float().train()
        try:
            learner, data = _on_latents(model, data, tcfg)
            history = train(learner, data, tcfg, comm=comm,
                            validation=data.subset(np.zeros(0, np.int64)), normalise=normalise,
                            progress=False, cancel=cancel)
        finally:
            model.to(dtype).eval()
            for p in frozen:
                p.requires_grad_(True)
        if calibration is not None:
            # a family operator keeps its groups (its error grows with the contrast); a model of
            # one material recalibrates globally: the anchor cells fill its groups in the
            # training mix's proportions, and after fine-tuning on the run's solves they had
            # widened the bound of the run's group so much that a retraining no longer paid
            calibrate_model(model, calibration,
                            bands="as before" if model.takes_material else None)
        # the bound is now earned on the online solves too: the region grows to cover them
        regions = [r for r in (model.region, data.region,
                               None if calibration is None else calibration.region)
                   if r is not None]
        if model.region is not None and len(regions) > 1:
            model.card["region"] = functools.reduce(TrainingRegion.union, regions).to_dict()
        return history

    def fit(self, job: RetrainJob, model):
        """Run a :meth:`job` in the foreground: fine-tune and recalibrate a copy of ``model``
        and return it (collective). A failure on any rank raises :class:`RetrainError` on every
        rank; ``model`` is left as it was."""
        t0 = time.perf_counter()
        trained = copy.deepcopy(model)
        trained.card["run_calibration"] = job.run_calibration
        with self._agreed("the retraining"):
            self._fit(trained, job.data, job.calibration, job.config, self._training_comm(),
                      job.normalise)
        self.rate = (time.perf_counter() - t0) / (len(job.data) * job.config.epochs)
        return trained

    def _training_comm(self, background: bool = False) -> MPI.Comm:
        """The communicator a training runs on: data-parallel over the ranks (a duplicate one
        in the background); a cold start's on ``COMM_SELF``: every rank trains the same copy on
        all the data (its few hundred solves), so the weights do not depend on the number of
        ranks, bit for bit, and a background thread makes no MPI calls beside the run's."""
        if self.cold_start is not None:
            return MPI.COMM_SELF
        return self._bg_comm if background else self.comm

    def _agreed(self, what: str, *, local: bool = False) -> contextlib.AbstractContextManager:
        """Agree on the outcome of a block over the ranks: any exception becomes a
        :class:`RetrainError` on every rank. A block with collective calls (``local`` False) is
        agreed on a communicator of its own, and a failed rank that the others never join
        aborts the run after ``FAULT_TIMEOUT_S`` (:func:`~neuroscale_couple.parallel.agree`)."""
        if local:
            return together(self.comm, what, raise_as=RetrainError)
        return together(self._agree_comm, what, raise_as=RetrainError,
                        timeout_s=FAULT_TIMEOUT_S)

    def start(self, job: RetrainJob, model, step: int) -> None:
        """Start a :meth:`job` of load step ``step`` on a copy of ``model`` in a thread
        (collectives on a duplicate communicator); :meth:`swap` returns the result."""
        copied = copy.deepcopy(model)
        copied.card["run_calibration"] = job.run_calibration
        comm = self._training_comm(background=True)
        self.pending = _Background(
            lambda cancel: self._fit(copied, job.data, job.calibration, job.config, comm,
                                     job.normalise, cancel if comm.size == 1 else None),
            copied, step, job.n_online, len(job.data) * job.config.epochs)

    def ready(self) -> bool:
        """Whether the background retraining has finished on every rank (collective)."""
        return bool(self.comm.allreduce(not self.pending.thread.is_alive(), op=MPI.LAND))

    def swap(self) -> tuple:
        """Wait for the background retraining (collective); returns its model, its number of
        online samples and its training time (max over ranks). If it failed on any rank,
        :class:`RetrainError` is raised on every rank."""
        job, self.pending = self.pending, None
        job.thread.join()
        # a rank whose thread failed outside the training's agreed steps may have left the
        # others' threads waiting in a collective: the timeout then aborts the run
        with self._agreed(f"the background retraining after step {job.step}"):
            if job.error is not None:
                raise job.error
        self.rate = job.time_s / job.sample_epochs
        return job.model, job.n_online, self.comm.allreduce(job.time_s, op=MPI.MAX)

    def weigh(self, job: RetrainJob, model, fine_time_s: float, serves: int
              ) -> tuple[float, float, bool]:
        """Whether the retraining ``job`` pays (collective): its estimated wall time (s), the
        fine-solve time it could save (this step's ``fine_time_s`` × the ``serves`` steps the
        new model would serve) and whether it is skipped (estimate ≥ saving)."""
        saving = fine_time_s * serves
        estimate = self._estimate(job, model)
        skipped = estimate >= saving
        if self.comm.rank == 0:
            log.info("retraining estimated at %.1f s, would save at most %.1f s of fine solves: "
                     "%s", estimate, saving, "skipped" if skipped else "retraining")
        return estimate, saving, skipped

    def _estimate(self, job: RetrainJob, model) -> float:
        """Estimated wall time (s) of the retraining ``job``: the slowest rank's (collective,
        so the ranks decide alike)."""
        data, tcfg = job.data, job.config
        if self.rate is None:  # two epochs on a copy: the second one's time (the first pays
            # one-time costs that the rate would multiply by the epochs)
            probe = dataclasses.replace(tcfg, epochs=2, patience=2)
            with self._agreed("the retraining's timing probe"):
                history = self._fit(copy.deepcopy(model), data, None, probe,
                                    self._training_comm())
            self.rate = history["epoch_time_s"][-1] / len(data)
        return self.comm.allreduce(self.rate * len(data) * tcfg.epochs, op=MPI.MAX)

    def close(self) -> None:
        """Wait for a background retraining still running and drop it (its data are in the
        replay store; with ``swap_when_ready``, one on a single process is cancelled at its
        next epoch); free the duplicate communicators."""
        if self.pending is not None:
            if self.config.swap_when_ready:
                self.pending.cancel.set()
            self.pending.thread.join()
            self.pending = None
        for name in ("_bg_comm", "_agree_comm"):
            if getattr(self, name) is not None:
                getattr(self, name).Free()
                setattr(self, name, None)


class _FrozenEncoder(torch.nn.Module):
    """What training sees of a model whose encoder is frozen: its heads on latents computed
    once (the training data's ``images`` replaced by them, :func:`_on_latents`), instead of
    the encoder run again on every batch of every epoch."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def encode(self, z: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The latents (B, latent) themselves; no feature map."""
        return z, None

    def members_response(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The model's per-member response (``members_response``)."""
        return self.model.members_response(*args, **kwargs)

    def set_normalisation(self, *args) -> None:
        """The model's scales from the data."""
        self.model.set_normalisation(*args)

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        """The model's layer shared by the loss terms (GradNorm weighting)."""
        return self.model.shared_parameters()

    def __getattr__(self, name: str):
        if name in ("sigma_ref", "e_ref", "tangent_ref", "card"):  # the card: learned weights
            return getattr(self.model, name)
        return super().__getattr__(name)


IMAGE_TERMS = ("equilibrium", "consistency", "hill_mandel", "symmetry", "fields")
"""Loss terms that need the encoder's inputs (micro fields, symmetry images): a retraining
with any of them trains on the images, not on latents."""


@torch.no_grad()
def _on_latents(model, data: TrainingData, tcfg: TrainConfig) -> tuple:
    """The module and data to train ``model``'s heads on (its encoder frozen): the heads on
    the structures' latents, encoded once in the model's training mode, where nothing needs
    the images (no augmentation, no image terms); else the model and the data as given."""
    if tcfg.augment or any(tcfg.weights.get(k, 0) > 0 for k in IMAGE_TERMS):
        return model, data
    param = next(model.parameters())
    images = data.images.to(param.device, param.dtype)
    z = torch.cat([model.encode(images[i:i + 64])[0] for i in range(0, len(images), 64)])
    return _FrozenEncoder(model), dataclasses.replace(data, images=z, w=None)


class _Background:
    """A retraining running in a daemon thread; ``error`` holds what it raised."""

    def __init__(self, fit: Callable[[threading.Event], None], model, step: int, n_online: int,
                 sample_epochs: int) -> None:
        self.model, self.step, self.n_online = model, step, n_online
        self.sample_epochs = sample_epochs
        self.cancel = threading.Event()  # honoured by a training on one process
        self.error: BaseException | None = None
        self.time_s = 0.0
        # a new thread starts with the OpenMP default thread count, not the caller's: the same
        # count keeps the reduction order, so the result equals a foreground retraining
        self.thread = threading.Thread(target=self._run, args=(fit, torch.get_num_threads()),
                                       daemon=True, name=f"neuroscale-retrain-{step}")
        self.thread.start()

    def _run(self, fit: Callable[[threading.Event], None], threads: int) -> None:
        t0 = time.perf_counter()
        try:
            torch.set_num_threads(threads)
            fit(self.cancel)
        except BaseException as err:  # re-raised on every rank at the swap
            self.error = err
        self.time_s = time.perf_counter() - t0
