"""`neuroscale distill-covariance`: replace an operator's aleatoric network by a head quadratic
in the strain (:class:`~neuroscale_couple.operators.heads.QuadraticCovarianceHead`), trained
against it from cell images alone.

In a coupled run the aleatoric network (M members, two hidden layers, run at every evaluation) is
most of the cost of the error bound; the quadratic head's coefficients depend on the latent
alone, so a run computes them once per point and each evaluation is a few multiply-adds. Cells
and loads are drawn as in :mod:`~neuroscale_couple.distillation` (the model's training groups,
other seeds; loads up to each group's radius, uniform in ‖F̄ − I‖); the target is the
ensemble's mean aleatoric covariance Σ̄ = ⟨L_m L_mᵀ⟩ (normalised by σ_ref²), and the loss of a batch

    ⟨(ln tr Σ − ln tr Σ̄)²⟩ + w ⟨(ln Σᵢᵢ − ln Σ̄ᵢᵢ)²⟩ᵢ        (w: ``diagonal_weight``)

first the bound's scale √tr Σ, then the components' error bars (a quadratic in ê follows the
shipped distilled model's tr Σ to ~7 %, its components less closely: the calibration's component
quantiles absorb that). Everything else of the model is kept. The conformal guarantee does
not rest on the fit: the new model is calibrated afresh on fine solves (``--calibration``), and
its bound's coverage is that calibration's. A checkpoint after every epoch lets a killed run
resume.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroscale_couple.distillation import EpochFit, distillation_cells, draw_loads
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.base import CoarseGrainingOperator
from neuroscale_couple.operators.heads import QuadraticCovarianceHead, green_lagrange_mandel
from neuroscale_couple.store import WorkCheckpoint, atomic_write

log = logging.getLogger(__name__)

SEED_SHIFT = 1000
"""Added to the seed of :func:`~neuroscale_couple.distillation.distillation_cells`: these cells
are neither the model's training cells nor the encoder distillation's."""


@dataclass
class CovarianceDistillConfig:
    """Settings: ``cells`` drawn like the model's data (``val_fraction`` held out to pick the best
    epoch), ``loads`` per cell and batch (``‖F̄ − I‖^load_power`` uniform from 0, with
    ``from_zero``, or from the group's min_radius, to its radius: uniform in the radius by
    default, for a macro problem's points sit mostly at small loads, where the bound decides
    most fallbacks), Adam with a cosine from ``lr`` to ``lr_final``, the loss's
    ``diagonal_weight``; the head's hidden width is the model's."""

    cells: int = 4000
    epochs: int = 40
    loads: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    lr_final: float = 1e-5
    diagonal_weight: float = 0.1
    load_power: int = 1
    from_zero: bool = True
    val_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("cells", "epochs", "loads", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"distill-covariance {name}={getattr(self, name)}: must be ≥ 1")
        if not 0 < self.val_fraction < 1 or round(self.val_fraction * self.cells) < 1:
            raise InputError(f"distill-covariance val_fraction={self.val_fraction} of "
                             f"{self.cells} cells holds out no cell: give more cells or a "
                             "fraction in (0, 1)")
        if not 0 < self.lr_final <= self.lr:
            raise InputError(f"distill-covariance lr={self.lr}, lr_final={self.lr_final}: need "
                             "0 < lr_final ≤ lr")


def mean_covariance(model: CoarseGrainingOperator, z: torch.Tensor, e: torch.Tensor
                    ) -> torch.Tensor:
    """The members' mean normalised aleatoric covariance ⟨L_m L_mᵀ⟩ (B, d², d²) of ``model``'s
    head at latents z (B, latent) and Mandel strains ê (B, s)."""
    M = model.draws
    L = model.covariance(z.unsqueeze(0).expand(M, -1, -1), e.unsqueeze(0).expand(M, -1, -1))
    return (L @ L.transpose(-1, -2)).mean(0)


def covariance_loss(S: torch.Tensor, target: torch.Tensor, diagonal_weight: float
                    ) -> torch.Tensor:
    """The loss of the module docstring for covariances S and target Σ̄ (B, n, n)."""
    def log_diagonal(X: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.diagonal(X, dim1=-2, dim2=-1))

    ls, lt = log_diagonal(S), log_diagonal(target)
    trace = (torch.logsumexp(ls, -1) - torch.logsumexp(lt, -1)) ** 2
    return (trace + diagonal_weight * ((ls - lt) ** 2).mean(-1)).mean()


def with_quadratic_covariance(model: CoarseGrainingOperator, head: QuadraticCovarianceHead
                              ) -> CoarseGrainingOperator:
    """A copy of ``model`` whose config says ``covariance="quadratic"`` and whose aleatoric head
    is ``head``; weights, normalisation, calibration and card otherwise ``model``'s."""
    if not dataclasses.is_dataclass(model.config) or not hasattr(model.config, "covariance"):
        raise InputError(f"a {type(model).__name__} has no choice of covariance head")
    new = type(model)(dataclasses.replace(model.config, covariance="quadratic")).to(
        next(model.parameters()).dtype)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("covariance.")}
    new.load_state_dict({**kept, **{f"covariance.{k}": v
                                    for k, v in head.state_dict().items()}})
    new.calibration, new.card = dict(model.calibration), dict(model.card)
    return new.eval()


class CovarianceDistillation:
    """One fit of a quadratic covariance head to ``model``'s aleatoric network with settings
    ``cfg``, kept in ``work`` (cells' latents, per-epoch checkpoint); :meth:`run` resumes where
    a killed run stopped."""

    def __init__(self, model: CoarseGrainingOperator, cfg: CovarianceDistillConfig,
                 work: str | Path) -> None:
        if isinstance(model.covariance, QuadraticCovarianceHead):
            raise InputError("the model's covariance head is already quadratic in the strain")
        if model.takes_material:
            raise InputError("the model is a family operator (phases as inputs): "
                             "distill-covariance fits models of one material")
        if model.dim != 2:
            raise InputError(f"the model is a {model.dim}D operator: distill-covariance draws "
                             "2D loads; fit 2D models")
        self.model, self.cfg, self.work = model.float().eval(), cfg, Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.key = {"model": model.weights_digest(), "cells": cfg.cells, "seed": cfg.seed}

    def cell_data(self) -> dict[str, torch.Tensor]:
        """Latents (N, latent) and load shells (N, 2) of the cells, from the work folder when it
        holds this model's."""
        path = self.work / "cells.pt"
        if path.is_file():
            data = torch.load(path, weights_only=True)
            if data["key"] == self.key:
                return data
        t0 = time.perf_counter()
        cells, shells = distillation_cells(self.model, self.cfg.cells,
                                           self.cfg.seed + SEED_SHIFT)
        with torch.inference_mode():
            z = self.model.latents(cells)
        log.info("distill-covariance: %d cells drawn and encoded in %.0f s", len(cells),
                 time.perf_counter() - t0)
        data = {"key": self.key, "z": z.clone(),
                "shells": torch.as_tensor(shells, dtype=torch.float32)}
        atomic_write(path, lambda tmp: torch.save(data, tmp))
        return data

    def shells(self, data: dict, idx: torch.Tensor) -> torch.Tensor:
        """The load shells (B, 2) of cells ``idx``: from 0 to their group's radius where
        ``cfg.from_zero`` (a macro problem's points meet a cell at any load up to it)."""
        shells = data["shells"][idx].clone()
        if self.cfg.from_zero:
            shells[:, 0] = 0.0
        return shells

    def run(self, progress: bool = True) -> tuple[CoarseGrainingOperator, dict]:
        """Fit (or resume) to ``cfg.epochs``; the model with the head of the best validation
        epoch (uncalibrated for it: calibrate afresh) and the history (per epoch: the training
        loss and the validation errors of tr Σ and of Σ, relative)."""
        cfg, data, model = self.cfg, self.cell_data(), self.model
        n = len(data["z"])
        n_val = max(1, round(cfg.val_fraction * n))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
        val, fit = order[:n_val], order[n_val:]
        e_ref = float(model.e_ref)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            head = QuadraticCovarianceHead(model.config.latent, model.config.hidden, model.dim)
        ckpt = WorkCheckpoint(self.work, {**self.key, "config": dataclasses.asdict(cfg)})
        loop = EpochFit(head, list(head.parameters()), cfg, len(fit), ckpt, "head")
        F_val = draw_loads(self.shells(data, val), cfg.loads, torch.Generator().manual_seed(
            cfg.seed + 1), cfg.load_power)
        z_val = data["z"][val].repeat_interleave(cfg.loads, 0)
        with torch.no_grad():
            e_val = green_lagrange_mandel(F_val) / e_ref
            target_val = mean_covariance(model, z_val, e_val)

        def batch_loss(idx: torch.Tensor, g: torch.Generator):
            F = draw_loads(self.shells(data, idx), cfg.loads, g, cfg.load_power)
            z = data["z"][idx].repeat_interleave(cfg.loads, 0)
            e = green_lagrange_mandel(F) / e_ref
            with torch.no_grad():
                target = mean_covariance(model, z, e)
            L = head(z[None], e[None])[0]
            loss = covariance_loss(L @ L.transpose(-1, -2), target, cfg.diagonal_weight)
            return loss, {"loss": loss}

        def validate() -> dict[str, float]:
            with torch.no_grad():
                L = head(z_val[None], e_val[None])[0]
                S = L @ L.transpose(-1, -2)
            tr_s, tr_t = (torch.diagonal(x, dim1=-2, dim2=-1).sum(-1) for x in (S, target_val))
            return {"val_rel_trace": float(((tr_s - tr_t).abs() / tr_t).mean()),
                    "val_rel_sigma": float(((S - target_val).norm(dim=(-1, -2))
                                            / target_val.norm(dim=(-1, -2))).mean())}

        state = loop.run(fit, batch_loss, validate, "val_rel_trace", until=cfg.epochs,
                         progress=progress)
        head.load_state_dict(state["best_state"])
        return with_quadratic_covariance(model, head), {
            "history": state["history"], "best_val_rel_trace": state["best"]}

