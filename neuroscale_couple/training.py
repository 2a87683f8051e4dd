"""Training of the operator: one loop for offline training and online fine-tuning.

Loss of a batch (weights in :class:`TrainConfig`; every term dimensionless):

    stress       ⟨‖P̄_m − P̄‖²⟩ / σ_ref²             (each ensemble member m)
    tangent      ⟨‖A_m − A‖²⟩ / A_ref²              (Sobolev term)
    nll          Gaussian NLL of P̄ under N(P̄_m, Σ_m), member mean detached (Σ learns the residual)
    noise        KL(N(0, S) ‖ N(0, Σ_m)) where the data carry measured noise S = diag(s²) (MD
                 standard errors; 0 K samples count as s = NOISE_FLOOR·σ_ref): Σ learns the noise
    equilibrium, consistency, hill_mandel, symmetry    see :mod:`neuroscale_couple.physics`
    fields       ‖w − w_RVE‖² / e_ref²              where the data set holds micro fields
    kl           KL(q ‖ prior) / N of variational heads (N training samples; the ELBO's share
                 of a sample: :mod:`neuroscale_couple.operators.epistemic`)

The terms add up with fixed weights, or with learned uncertainty or GradNorm weights
(:mod:`neuroscale_couple.weighting`; ``weighting``).

Batches hold whole microstructures (the encoder runs once per microstructure and batch).
Data-parallel under MPI: every rank takes a strided share of each global batch's microstructures,
losses are summed over the global batch and gradients all-reduced, so N ranks follow the same
trajectory as one rank with the same global batch (to round-off).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch

from neuroscale_couple.config import check_keys
from neuroscale_couple.errors import InputError, NeuroScaleError
from neuroscale_couple.operators.base import CoarseGrainingOperator
from neuroscale_couple.operators.epistemic import kl_divergence, variational_layers
from neuroscale_couple.parallel import allreduce_gradients, allreduce_sum, init_torch_distributed
from neuroscale_couple.physics import (
    consistency_loss,
    equilibrium_loss,
    hill_mandel_loss,
    symmetry_loss,
    transform_sample,
)
from neuroscale_couple.region import TrainingRegion
from neuroscale_couple.store import WorkCheckpoint, rng_states, set_rng_states
from neuroscale_couple.weighting import (
    CARD_KEYS,
    LossWeighting,
    check_gradnorm_alpha,
    check_weighting,
)

log = logging.getLogger(__name__)

LOSS_TERMS = ("stress", "tangent", "nll", "noise", "equilibrium", "consistency", "hill_mandel",
              "symmetry", "fields", "kl")
NOISE_FLOOR = 1e-3
"""Measured noise below this fraction of σ_ref (static solves: 0) is taken as this much."""


@dataclass
class TrainConfig:
    """Optimisation settings; ``weights`` maps terms of ``LOSS_TERMS`` to weights (absent: 0),
    ``weighting`` (fixed, uncertainty or gradnorm: :mod:`neuroscale_couple.weighting`) says
    how they add up, ``gradnorm_alpha`` (≥ 0) how hard GradNorm pulls on slow terms;
    ``time_limit_s`` (s, None: none) ends the training at the first batch that ends after that
    much training time, the learning rate then following its cosine over the time budget (or
    over the epochs, whichever is further along); ``time_clock`` says which time: ``wall``
    (default) or ``cpu`` (this process's CPU seconds: a fair budget on shared cores, as
    bench/baselines.py uses)."""

    epochs: int = 200
    batch_size: int = 64
    physics_fraction: float = 0.25
    augment: bool = False
    lr: float = 2e-3
    lr_final: float = 1e-4
    val_fraction: float = 0.15
    patience: int = 40
    seed: int = 0
    weights: dict[str, float] = field(default_factory=lambda: {
        "stress": 1.0, "tangent": 0.2, "nll": 0.05, "equilibrium": 0.0, "consistency": 0.0,
        "hill_mandel": 0.0, "symmetry": 0.0, "fields": 0.0})
    weighting: str = "fixed"
    gradnorm_alpha: float = 1.5
    time_limit_s: float | None = None
    time_clock: str = "wall"

    def __post_init__(self) -> None:
        check_keys(self.weights, LOSS_TERMS, "the loss weights")
        self.weights = {k: float(self.weights.get(k, 0.0)) for k in LOSS_TERMS}
        check_weighting(self.weighting)
        check_gradnorm_alpha(self.gradnorm_alpha)
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise InputError(f"time_limit_s={self.time_limit_s!r} in the training config: give "
                             "seconds > 0, or leave it out for no limit")
        if self.time_clock not in ("wall", "cpu"):
            raise InputError(f"time_clock={self.time_clock!r} in the training config: give "
                             "wall or cpu")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From a config mapping; loss terms not named in ``weights`` are switched off."""
        check_keys(d, (f.name for f in dataclasses.fields(cls)), "the training config")
        return cls(**d)


@dataclass
class TrainingData:
    """Fine-solve samples as tensors: ``images`` the operator inputs of the M structures (made
    by their family: cell images (M, 1, n, n) or (M, 1, n, n, n), crystal descriptors (M, k)),
    micro_index (S,), F, P (S, d, d), A (S, d, d, d, d) (d = 2, or 3 for 3D cells), optional
    fields w (S, 2, n, n); ``config`` is the
    generate config; ``noise`` (S, 2, 2) the measured standard error of P where the fine solver
    reports one (finite-temperature MD; 0 for static solves, NaN where unknown), else None;
    ``structure`` the structures' family (a :class:`~neuroscale_couple.structures.Structure`
    class; None: unknown, its structures are whole units as those of cells); ``region`` the
    loads and structures the data cover (recorded in the card of a model trained on them);
    ``kinds`` (M,) each structure's kind (group-wise calibration), None where unknown.
    Cells that drew their phases (:mod:`neuroscale_couple.phases`) carry their phase
    descriptors as image channels, and their P, A, noise are divided by each cell's matrix
    modulus: a family operator learns P̄/E_m."""

    images: torch.Tensor
    micro_index: torch.Tensor
    F: torch.Tensor
    P: torch.Tensor
    A: torch.Tensor
    w: torch.Tensor | None = None
    config: dict = field(default_factory=dict)
    noise: torch.Tensor | None = None
    structure: type | None = None
    region: TrainingRegion | None = None
    kinds: np.ndarray | None = None  # (M,) str: each structure's kind, where known

    @classmethod
    def from_h5(cls, path: str | Path, resolution: int | None,
                dtype: torch.dtype = torch.float32, material_inputs: bool = False
                ) -> TrainingData:
        """Load a `neuroscale generate` file; ``resolution``: the model's input images (cell
        images are average-pooled to it; None for operators without images);
        ``material_inputs``: for an operator that takes the phases (:meth:`from_arrays`)."""
        from neuroscale_couple.store import load_rve_dataset

        return cls.from_arrays(load_rve_dataset(path), resolution, dtype, str(path),
                               material_inputs)

    @classmethod
    def from_arrays(cls, d: dict, resolution: int | None, dtype: torch.dtype = torch.float32,
                    source: str = "data set", material_inputs: bool = False) -> TrainingData:
        """From the arrays of :func:`~neuroscale_couple.store.load_rve_dataset`; the family of
        the structures (:func:`~neuroscale_couple.structures.data_family`) makes their inputs.
        ``material_inputs``: inputs for a family operator also from a data set of one material
        (its config's phases join each cell's arrays)."""
        from neuroscale_couple.structures import data_family

        family = data_family(d)
        micro = {k.split("/", 1)[1]: v for k, v in d.items() if k.startswith("micro/")}
        if material_inputs:
            micro = family.with_material(micro, d["config"])
        inputs = family.operator_inputs(micro, resolution, dtype, source)
        units = getattr(family, "stress_units", lambda _: None)(micro)
        scale = (np.ones(len(d["samples/F"])) if units is None  # stresses in each cell's unit
                 else 1.0 / np.asarray(units, dtype=float)[d["samples/micro_index"]])
        index, F_ = (torch.as_tensor(d["samples/micro_index"], dtype=torch.long),
                     torch.as_tensor(d["samples/F"], dtype=dtype))
        P_ = torch.as_tensor(d["samples/P"] * scale[:, None, None], dtype=dtype)
        A_ = torch.as_tensor(d["samples/A"] * scale[:, None, None, None, None], dtype=dtype)
        w = d.get("samples/fields/w")
        w = (torch.as_tensor(w, dtype=dtype).permute(0, 3, 1, 2)
             if w is not None and w.shape[1] == resolution else None)
        noise = d.get("samples/stress_stderr")
        noise = None if noise is None else noise * scale[:, None, None]
        # older replay segments (data sets fill theirs in as drawn: load_rve_dataset)
        kinds = micro.get("kind", np.array([family.kinds[0]] * len(inputs)))
        region = TrainingRegion.from_data(d["samples/F"], kinds, micro)
        return cls(inputs, index, F_, P_, A_, w, d["config"],
                   None if noise is None else torch.as_tensor(noise, dtype=dtype), family, region,
                   np.array([k.decode() if isinstance(k, bytes) else str(k) for k in kinds]))

    @classmethod
    def concat(cls, parts: list[TrainingData]) -> TrainingData:
        """One data set of several (micro fields kept only if every part has them; measured
        noise kept if any part has it, NaN for the others)."""
        if not parts:
            raise InputError("TrainingData.concat needs at least one data set")
        offsets = np.cumsum([0] + [len(p.images) for p in parts[:-1]])
        has_w = all(p.w is not None for p in parts)
        noise = None
        if any(p.noise is not None for p in parts):
            noise = torch.cat([p.noise if p.noise is not None else torch.full_like(p.P, np.nan)
                               for p in parts])
        return cls(torch.cat([p.images for p in parts]),
                   torch.cat([p.micro_index + int(o) for p, o in zip(parts, offsets, strict=True)]),
                   torch.cat([p.F for p in parts]), torch.cat([p.P for p in parts]),
                   torch.cat([p.A for p in parts]),
                   torch.cat([p.w for p in parts]) if has_w else None, parts[0].config, noise,
                   parts[0].structure, _union([p.region for p in parts]),
                   np.concatenate([p.kinds for p in parts])
                   if all(p.kinds is not None for p in parts) else None)

    def __len__(self) -> int:
        return len(self.F)

    def subset(self, samples: np.ndarray | torch.Tensor) -> TrainingData:
        """The given samples (images kept whole, indices unchanged)."""
        idx = torch.as_tensor(samples, dtype=torch.long)
        return dataclasses.replace(self, micro_index=self.micro_index[idx], F=self.F[idx],
                                   P=self.P[idx], A=self.A[idx],
                                   w=None if self.w is None else self.w[idx],
                                   noise=None if self.noise is None else self.noise[idx])

    @property
    def whole_structures(self) -> bool:
        """Whether splits and batches keep each structure's samples together (the family's
        ``hold_out_structures``)."""
        return self.structure is None or self.structure.hold_out_structures

    def split(self, fraction: float, seed: int) -> tuple[TrainingData, TrainingData]:
        """(train, held-out): whole structures held out where the family holds out structures
        (cells: the operator must generalise to new microstructures), else samples (a crystal:
        one material at a few temperatures)."""
        if self.whole_structures:
            return self.split_by_microstructure(fraction, seed)
        n_out = round(fraction * len(self))
        order = np.random.default_rng(seed).permutation(len(self))
        return self.subset(np.sort(order[n_out:])), self.subset(np.sort(order[:n_out]))

    def split_by_microstructure(self, fraction: float, seed: int
                                ) -> tuple[TrainingData, TrainingData]:
        """(train, held-out) with whole microstructures held out."""
        micro = np.unique(self.micro_index.numpy())
        rng = np.random.default_rng(seed)
        n_out = max(1, round(fraction * len(micro))) if fraction > 0 else 0
        held = set(rng.choice(micro, n_out, replace=False).tolist())
        mask = np.array([m in held for m in self.micro_index.numpy()])
        return self.subset(np.flatnonzero(~mask)), self.subset(np.flatnonzero(mask))

    def to(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> TrainingData:
        """The same samples as ``dtype`` on ``device`` (indices stay on the CPU)."""
        conv = {k: getattr(self, k).to(device, dtype) for k in ("images", "F", "P", "A")}
        for k in ("w", "noise"):
            conv[k] = None if getattr(self, k) is None else getattr(self, k).to(device, dtype)
        return dataclasses.replace(self, **conv)


def _union(regions: list[TrainingRegion | None]) -> TrainingRegion | None:
    """The region of data sets trained together (None if any is unknown)."""
    if any(r is None for r in regions):
        return None
    return functools.reduce(TrainingRegion.union, regions)


def batch_loss(model: CoarseGrainingOperator, data: TrainingData, idx: torch.Tensor,
               weights: dict[str, float], generator: torch.Generator, physics_fraction: float = 1.0,
               augment: bool = False) -> dict[str, torch.Tensor]:
    """Loss terms (each a mean over the samples ``idx``) of one (shard of a) batch.

    The decoder and symmetry terms, the costly ones, use the first ``physics_fraction`` of the
    samples (batches are shuffled, so that is a random subset). ``augment`` replaces the batch by
    its image under a random symmetry of the cell (:func:`..physics.transform_sample`).
    """
    micro = data.micro_index[idx]
    uniq, inv = torch.unique(micro, return_inverse=True)
    images, Fb, Pb, Ab = data.images[uniq], data.F[idx], data.P[idx], data.A[idx]
    wb = None if data.w is None else data.w[idx]
    if augment:  # a random element of the cell's symmetry group, with its exact response
        turns = int(torch.randint(0, 4, (1,), generator=generator))
        flip = bool(torch.randint(0, 2, (1,), generator=generator))
        shift = tuple(int(s) for s in torch.randint(0, images.shape[-1], (2,),
                                                    generator=generator))
        images, Fb, Pb, Ab, wb = transform_sample(turns, flip, shift, images, Fb, Pb, Ab, wb)
    z_u, h_u = model.encode(images)
    z = z_u[inv]
    use_tangent = weights["tangent"] > 0
    r = model.members_response(z, Fb, tangent=use_tangent, create_graph=True)
    sig, dt = model.sigma_ref.to(Fb.dtype), Fb.dtype
    terms = {"stress": ((r["stress"] - Pb) ** 2).sum((-1, -2)).mean() / sig**2}
    if use_tangent:
        terms["tangent"] = (((r["tangent"] - Ab) ** 2).sum((-1, -2, -3, -4)).mean()
                            / model.tangent_ref.to(dt) ** 2)
    if weights["nll"] > 0:
        res = ((Pb - r["stress"].detach()) / sig).flatten(-2).unsqueeze(-1)
        u = torch.linalg.solve_triangular(r["chol"], res, upper=False)[..., 0]
        logdet = torch.log(torch.diagonal(r["chol"], dim1=-2, dim2=-1)).sum(-1)
        terms["nll"] = (0.5 * (u**2).sum(-1) + logdet).mean()
    if weights["noise"] > 0 and data.noise is not None:
        terms.update(noise_loss(r["chol"], data.noise[idx], sig))
    k = max(1, math.ceil(physics_fraction * len(idx)))
    sub, mean = inv[:k], r["stress"].mean(0)[:k]
    if any(weights[t] > 0 for t in ("equilibrium", "consistency", "hill_mandel", "fields")):
        fields = model.decode(images[sub], z[:k], h_u[sub], Fb[:k])
        terms["equilibrium"] = equilibrium_loss(fields["P"], sig)
        terms["consistency"] = consistency_loss(fields["P"], mean, sig)
        terms["hill_mandel"] = hill_mandel_loss(fields["P"], fields["F"], Fb[:k], sig)
        if wb is not None:
            terms["fields"] = ((fields["w"] - wb[:k]) ** 2).sum(1).mean() / (
                model.e_ref.to(dt) ** 2)
    if weights.get("kl", 0.0) > 0:
        terms["kl"] = kl_divergence(model).to(dt) / len(data)
    if weights["symmetry"] > 0:
        def response(imgs: torch.Tensor, Fs: torch.Tensor) -> torch.Tensor:
            zt = model.encode(imgs)[0][sub]
            return model.members_response(zt, Fs, tangent=False, create_graph=True)[
                "stress"].mean(0)

        terms["symmetry"] = symmetry_loss(response, images, Fb[:k], mean, sig, generator)
    return terms


def noise_loss(chol: torch.Tensor, stderr: torch.Tensor, sigma_ref: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """Mean KL(N(0, S) ‖ N(0, L Lᵀ)) over members and the samples whose noise is known: the
    aleatoric head ``chol`` (M, B, 4, 4) (σ_ref units) against the measured standard errors
    ``stderr`` (B, 2, 2) (stress units; S = diag(max(s, NOISE_FLOOR·σ_ref)² / σ_ref²)).
    Its minimum, 0, is Σ = S. Empty dict if no sample of the batch has a known noise."""
    known = torch.isfinite(stderr).all(-1).all(-1)
    if not known.any():
        return {}
    s = torch.clamp(stderr[known].flatten(-2) / sigma_ref, min=NOISE_FLOOR)  # (B', 4)
    L = chol[:, known]
    X = torch.linalg.solve_triangular(L, torch.diag_embed(s).expand_as(L), upper=False)
    logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    kl = 0.5 * ((X**2).sum((-1, -2)) + logdet - 2 * torch.log(s).sum(-1) - 4)
    return {"noise": kl.mean()}


def microstructure_batches(data: TrainingData, batch_size: int,
                           generator: torch.Generator) -> list[list[torch.Tensor]]:
    """Shuffled batches of whole microstructures (each a list of per-microstructure sample index
    tensors, about ``batch_size`` samples in all): the encoder then runs once per microstructure
    per batch, not once per sample. Structures of a family that does not hold them out (crystal
    descriptors: cheap to encode, few structures with many samples) are split into shuffled
    chunks of ``batch_size`` samples."""
    order = torch.argsort(data.micro_index, stable=True)
    ids, counts = torch.unique_consecutive(data.micro_index[order], return_counts=True)
    groups = list(torch.split(order, counts.tolist()))
    if not data.whole_structures:
        groups = [chunk for g in groups
                  for chunk in torch.split(g[torch.randperm(len(g), generator=generator)],
                                           batch_size)]
        ids = torch.arange(len(groups))
    batches, current, size = [], [], 0
    for k in torch.randperm(len(ids), generator=generator).tolist():
        current.append(groups[k])
        size += len(groups[k])
        if size >= batch_size:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def _batch_loss_sum(comm: MPI.Comm, loss: float, failure: Exception | None,
                    epoch: int) -> float:
    """The batch loss summed over ``comm``'s ranks (collective); if the step failed on any
    rank, the same error is raised on every rank, before the gradient all-reduce that the
    failed rank would never join (the others would wait for it for ever)."""
    reports = comm.allgather((loss, None if failure is None else
                              f"{type(failure).__name__}: {failure}"))
    failed = [(rank, msg) for rank, (_, msg) in enumerate(reports) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise NeuroScaleError(f"training step failed on rank {rank} of {comm.size} in epoch "
                              f"{epoch}: {msg}") from failure
    return sum(value for value, _ in reports)


def train(model: CoarseGrainingOperator, data: TrainingData, cfg: TrainConfig, *,
          comm: MPI.Comm = MPI.COMM_WORLD, validation: TrainingData | None = None,
          normalise: bool = True, progress: bool = True,
          checkpoint: WorkCheckpoint | None = None, stop_after_epoch: int | None = None,
          cancel: threading.Event | None = None,
          clock: Callable[[], float] | None = None) -> dict:
    """Fit ``model`` in place; returns the history (per-epoch losses and wall times, best
    epoch, total time, ``log_variances`` of an uncertainty weighting, ``loss_weights`` of a
    GradNorm weighting, ``time_limited`` where ``cfg.time_limit_s`` ended it).

    With ``validation`` None, ``cfg.val_fraction`` of the data are held out for early stopping
    (:meth:`TrainingData.split`). ``normalise`` (offline training) sets the model's scales from
    ``data``; online fine-tuning keeps them.

    With ``checkpoint`` (offline training), the whole state of the run (weights, optimiser,
    scheduler, best epoch, history, every random generator) is written there after every epoch
    (rank 0), and a run that finds one resumes from it: it ends with the weights and history
    of an uninterrupted run, bit for bit. ``stop_after_epoch`` (for tests) returns after that
    epoch's checkpoint as a killed run would have stopped there.

    ``cancel``, checked before each epoch: once set, the training returns there (``history
    ["cancelled"]`` True). Only for a training on one process: the ranks of a data-parallel
    training would see it at different epochs and leave each other in a collective.

    ``cfg.time_limit_s`` (seconds of ``cfg.time_clock``; ``clock`` overrides that clock, for
    tests) is checked before each epoch and after each batch, rank 0's clock deciding for all:
    past it, the epoch ends there (validated and recorded, truncated) and the training returns
    with its best validated weights (``history["time_limited"]`` True).
    """
    if cancel is not None and comm.size > 1:
        raise InputError("cancel stops a training on one process only: the ranks of a "
                         f"data-parallel training on {comm.size} ranks would stop at different "
                         "epochs")
    if cfg.augment and data.images.ndim != 4:
        raise InputError("augment draws symmetries of 2D cells (square turns, flips, shifts): "
                         "train 3D cells with augment: false")
    if cfg.augment and data.noise is not None and cfg.weights["noise"] > 0:
        raise InputError("augment rotates the samples but not their measured noise: train with "
                         "augment: false, or without the noise term")
    saved = None if checkpoint is None else checkpoint.load(map_location="cpu")
    distributed = init_torch_distributed(comm)
    torch.manual_seed(cfg.seed)
    if validation is None:
        data, validation = data.split(cfg.val_fraction, cfg.seed)
    if len(data) == 0:
        raise InputError("no training samples: the data set is empty after the validation split")
    param = next(model.parameters())
    dtype = param.dtype
    data, validation = data.to(dtype, param.device), validation.to(dtype, param.device)
    if normalise:
        model.set_normalisation(data.F, data.P, data.A)
    if cfg.weights["kl"] > 0 and not variational_layers(model):
        raise InputError("training.weights.kl > 0 regularises variational heads: train a model "
                         "with uncertainty: variational, or set the kl weight to 0")
    learned = getattr(model, "card", {}).get(CARD_KEYS.get(cfg.weighting))
    weighting = LossWeighting(cfg.weighting, cfg.weights, learned,
                              cfg.gradnorm_alpha).to(param.device)
    shared = model.shared_parameters() if weighting.balanced else []
    opt = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs, eta_min=cfg.lr_final)
    gen = torch.Generator().manual_seed(cfg.seed)
    weights = weighting.weights
    history: dict = {"train": [], "val": [], "epoch_time_s": [], "best_epoch": 0,
                     "cancelled": False, "time_limited": False}
    best, best_state, since_best = np.inf, _state(model, weighting), 0
    start, stopped, elapsed = 0, False, 0.0
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        gen.set_state(saved["generator"])
        set_rng_states(saved["rng"])
        history, best, since_best = saved["history"], saved["best"], saved["since_best"]
        history.setdefault("time_limited", False)  # a checkpoint from before time limits
        best_state = {k: v.to(param.device) for k, v in saved["best_state"].items()}
        weighting.load_state_dict(saved.get("weighting", {}))
        start, stopped, elapsed = saved["epoch"], saved["stopped"], saved["elapsed_s"]
        if comm.rank == 0 and (stopped or start == cfg.epochs):
            log.info("resuming after the last epoch (%d of %d) from %s: training is done",
                     start, cfg.epochs, checkpoint.work)
        elif comm.rank == 0:
            log.info("resuming at epoch %d of %d from %s", start + 1, cfg.epochs, checkpoint.work)
    t0 = time.perf_counter() - elapsed
    clock = clock or (time.process_time if cfg.time_clock == "cpu" else time.perf_counter)
    clock_start = clock() - (saved or {}).get("limit_spent_s", 0.0)

    def spent() -> float:
        """Seconds of ``clock`` the training has taken, rank 0's: every rank stops together."""
        return comm.bcast(clock() - clock_start, root=0)

    def over_limit() -> bool:
        return cfg.time_limit_s is not None and spent() >= cfg.time_limit_s

    bar = _progress(cfg.epochs, progress and comm.rank == 0, start)
    for epoch in range(start, cfg.epochs):
        if stopped or epoch == stop_after_epoch:
            break
        if cancel is not None and cancel.is_set():
            history["cancelled"] = True
            break
        if over_limit():
            history["time_limited"] = True
            break
        if cfg.time_limit_s is not None:
            set_cosine_lr(opt, cfg.lr, cfg.lr_final,
                          max(epoch / cfg.epochs, spent() / cfg.time_limit_s))
        t_epoch = time.perf_counter()
        model.train()
        epoch_loss = 0.0
        for batch in microstructure_batches(data, cfg.batch_size, gen):
            shard = torch.cat(batch[comm.rank::comm.size] or [torch.zeros(0, dtype=torch.long)])
            n_batch = sum(len(g) for g in batch)
            opt.zero_grad()
            loss, failure, stats = torch.zeros((), dtype=dtype), None, None
            if len(shard):
                try:
                    terms = batch_loss(model, data, shard, weights, gen, cfg.physics_fraction,
                                       cfg.augment)
                    loss = weighting(terms) * (len(shard) / n_batch)
                    if not torch.isfinite(loss):  # would turn every weight into NaN
                        bad = sorted(k for k, v in terms.items() if not torch.isfinite(v))
                        raise NeuroScaleError(f"non-finite loss terms {bad}: lower training.lr "
                                              "or check the data for NaN")
                    stats = weighting.statistics(terms, shared, len(shard) / n_batch)
                    loss.backward()
                except Exception as err:  # raised on every rank by _batch_loss_sum
                    failure = err
            total = _batch_loss_sum(comm, float(loss.detach()), failure, epoch)
            if distributed:
                allreduce_gradients(model)
                allreduce_gradients(weighting)  # learned loss weights: one set on every rank
            if stats is None:  # GradNorm on a rank without samples: it adds nothing
                stats = weighting.statistics(None, shared)
            weighting.balance(stats, allreduce_sum if distributed else None)
            opt.step()
            weighting.renormalise()
            epoch_loss += total * n_batch / len(data)
            if over_limit():  # the epoch ends here: validated and recorded as truncated
                history["time_limited"] = True
                break
        if cfg.time_limit_s is None:  # else set at each epoch's start
            sched.step()
        val = relative_errors(model, validation)["rel_l2_stress"] if len(validation) else np.nan
        history["train"].append(epoch_loss)
        history["epoch_time_s"].append(time.perf_counter() - t_epoch)
        history["val"].append(val)
        bar.update(1)
        bar.set_postfix(loss=f"{epoch_loss:.3e}", val_rel_l2=f"{val:.4f}")
        if not len(validation):  # nothing to select on: keep the last epoch
            history["best_epoch"] = epoch
        elif val < best:
            best, best_state, since_best = val, _state(model, weighting), 0
            history["best_epoch"] = epoch
        else:
            since_best += 1
            stopped = since_best > cfg.patience
            if stopped:
                log.info("early stopping at epoch %d (best %d)", epoch, history["best_epoch"])
        history["time_limited"] = history["time_limited"] or over_limit()  # saved as stopped
        stopped = stopped or history["time_limited"]
        if checkpoint is not None and comm.rank == 0:
            checkpoint.save({
                "epoch": epoch + 1, "stopped": stopped, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "generator": gen.get_state(), "rng": rng_states(), "history": history,
                "best": float(best), "best_state": best_state, "since_best": since_best,
                "elapsed_s": time.perf_counter() - t0, "limit_spent_s": clock() - clock_start,
                "weighting": weighting.state_dict()})
    bar.close()
    if len(validation):
        _load_state(model, weighting, best_state)
    if hasattr(model, "card"):
        weighting.record(model.card)
    learned = weighting.values()
    history["log_variances"] = learned if cfg.weighting == "uncertainty" else {}
    history["loss_weights"] = learned if cfg.weighting == "gradnorm" else {}
    history["time_s"] = time.perf_counter() - t0
    history["best_val_rel_l2_stress"] = float(best)
    return history


def _state(model: CoarseGrainingOperator, weighting: LossWeighting) -> dict:
    """A copy of the model's state, and the learned loss weights' (``weighting.``-prefixed)."""
    return copy.deepcopy({**model.state_dict(), **{f"weighting.{k}": v for k, v in
                                                   weighting.state_dict().items()}})


def _load_state(model: CoarseGrainingOperator, weighting: LossWeighting, state: dict) -> None:
    """Load a :func:`_state` into the model and the loss weighting."""
    prefix = "weighting."
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(prefix)})
    weighting.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                               if k.startswith(prefix)})


def set_cosine_lr(opt: torch.optim.Optimizer, lr: float, lr_final: float,
                  progress: float) -> None:
    """Set the learning rate of a cosine from ``lr`` to ``lr_final`` at ``progress`` (0–1) of
    the training: under a time limit, the larger of the epochs' and the time's fraction (the
    operator's training and the baselines' share this rule)."""
    rate = lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * min(progress, 1)))
    for group in opt.param_groups:
        group["lr"] = rate


@torch.no_grad()
def predict_dataset(model: CoarseGrainingOperator, data: TrainingData) -> dict[str, torch.Tensor]:
    """Ensemble predictions (``mean``, ``cov``, ``tangent``) for every sample of ``data``."""
    model.eval()
    param = next(model.parameters())
    uniq, inv = torch.unique(data.micro_index, return_inverse=True)
    z = torch.cat([model.encode(data.images[uniq[i:i + 64]].to(param.device, param.dtype))[0]
                   for i in range(0, len(uniq), 64)])[inv]
    return model.predict(z, data.F.to(param.device, param.dtype))


def relative_errors(model: CoarseGrainingOperator, data: TrainingData) -> dict[str, float]:
    """Relative L2 errors of the ensemble-mean stress and tangent over a data set."""
    pred = predict_dataset(model, data)
    P, A = (t.to(pred["mean"].device, pred["mean"].dtype) for t in (data.P, data.A))
    return {"rel_l2_stress": float(torch.linalg.norm(pred["mean"] - P) / torch.linalg.norm(P)),
            "rel_l2_tangent": float(torch.linalg.norm(pred["tangent"] - A)
                                    / torch.linalg.norm(A))}


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="epoch",
                disable=not enabled)
