"""`neuroscale distill`: train a slim encoder against a shipped SANO (the teacher), from cell
images alone.

The student (:class:`~neuroscale_couple.operators.distilled.DistilledSANO`) takes the teacher's
coarse-graining heads, frozen, and learns a latent z_s such that the heads answer as they do on
the teacher's z_t. Cells are drawn like the teacher's training data (its card's generate config,
other seeds), each with loads F̄ drawn in its group's load ball; no fine solve is needed. Loss of
a batch (members m, loads F̄; every term dimensionless):

    stress    ⟨‖P_m(z_s, F̄) − P_m(z_t, F̄)‖²⟩ / σ_ref²
    tangent   ⟨‖A_m(z_s, F̄) − A_m(z_t, F̄)‖²⟩ / A_ref²
    bound     ⟨‖L_m(z_s, F̄) − L_m(z_t, F̄)‖²⟩   (Cholesky factors of the normalised Σ_m)
    latent    ⟨‖z_s − z_t‖²⟩ / ⟨‖z_t − ⟨z_t⟩‖²⟩

The teacher's images and latents are computed once and kept in the work folder with a checkpoint
after every epoch, so a killed run resumes at its last epoch. A distilled model is calibrated
afresh on fine solves (``neuroscale calibrate``): its errors are not the teacher's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from neuroscale_couple.config import check_keys
from neuroscale_couple.errors import CheckpointError, InputError
from neuroscale_couple.operators.distilled import DistilledSANO
from neuroscale_couple.operators.sano import SANO
from neuroscale_couple.store import WorkCheckpoint, atomic_write
from neuroscale_couple.structures import config_groups, family

log = logging.getLogger(__name__)

SEED_OFFSET = 7_919_000
"""Added to the teacher's group seeds: distillation cells are not the teacher's training cells."""
MAX_LOAD_RADIUS = 0.5
"""‖F̄ − I‖ ≤ 0.5 keeps det F̄ ≥ 0.25 without rejection draws."""


@dataclass
class DistillConfig:
    """Distillation settings: ``cells`` drawn like the teacher's data (``val_fraction`` of them
    held out to pick the best epoch), ``loads`` per cell and batch, ``channels`` of the student,
    the optimiser (Adam, cosine from ``lr`` to ``lr_final``) and the loss ``weights``."""

    cells: int = 8000
    epochs: int = 60
    loads: int = 4
    batch_size: int = 128
    channels: tuple[int, ...] = (32, 64, 64, 64)
    lr: float = 2e-3
    lr_final: float = 5e-5
    val_fraction: float = 0.05
    seed: int = 0
    weights: dict[str, float] = field(default_factory=lambda: {
        "stress": 1.0, "tangent": 0.2, "bound": 0.1, "latent": 0.1})

    def __post_init__(self) -> None:
        check_keys(self.weights, ("stress", "tangent", "bound", "latent"), "the distill weights")
        self.channels = tuple(int(c) for c in self.channels)
        for name in ("cells", "epochs", "loads", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"distill {name}={getattr(self, name)}: must be ≥ 1")
        if not 0 < self.val_fraction < 1 or round(self.val_fraction * self.cells) < 1:
            raise InputError(f"distill val_fraction={self.val_fraction} of {self.cells} cells "
                             "holds out no cell: give more cells or a fraction in (0, 1)")
        if not 0 < self.lr_final <= self.lr:
            raise InputError(f"distill lr={self.lr}, lr_final={self.lr_final}: need "
                             "0 < lr_final ≤ lr")


def distillation_cells(teacher: SANO, n: int, seed: int) -> tuple[list, np.ndarray]:
    """``n`` structures drawn like the teacher's training data (the generate config in its card:
    each group's share of ``n`` by its count, other seeds) and the load shell (n, 2) (min_radius,
    radius) of each one's group."""
    config = teacher.card.get("data_config")
    if not config:
        raise InputError("the teacher's card has no data_config (the generate config it was "
                         "trained on): distill a model written by `neuroscale train`")
    groups = config_groups(config)
    counts = np.array([int(g.get("count", 1)) for g in groups], dtype=float)
    shares = np.floor(n * counts / counts.sum()).astype(int)
    shares[: n - shares.sum()] += 1  # the remainder to the first groups
    loads = config.get("loads") or {}
    cells, shells = [], []
    for i, (group, share) in enumerate(zip(groups, shares, strict=True)):
        if share == 0:
            continue
        own = {**loads, **(group.get("loads") or {})}
        shell = (float(own.get("min_radius", 0.0)), float(own.get("radius", 0.15)))
        if shell[1] > MAX_LOAD_RADIUS:
            raise InputError(f"the teacher's loads reach radius {shell[1]} in "
                             f"microstructure[{i}]: distillation draws loads up to "
                             f"{MAX_LOAD_RADIUS}")
        drawn = dict(group, count=int(share), seed=int(group.get("seed", 0)) + SEED_OFFSET + seed)
        cells += family(group["kind"]).plan(drawn, f"microstructure[{i}]")
        shells += [shell] * int(share)
    return cells, np.array(shells)


def draw_loads(shells: torch.Tensor, k: int, generator: torch.Generator, power: int = 4
               ) -> torch.Tensor:
    """``k`` loads F̄ (B·k, 2, 2) per cell in its shell min_radius ≤ ‖F̄ − I‖ ≤ radius (shells
    (B, 2)): uniform in the shell's volume (``power`` 4), as
    :func:`~neuroscale_couple.sampling.loads_in_ball` draws them, or with ‖F̄ − I‖ᵖ uniform
    (``power`` 1: uniform in the radius, more small loads)."""
    lo, hi = (shells.repeat_interleave(k, 0)[:, j] for j in (0, 1))
    d = torch.randn(len(lo), 4, generator=generator, dtype=shells.dtype)
    u = torch.rand(len(lo), generator=generator, dtype=shells.dtype)
    r = (lo**power + u * (hi**power - lo**power)) ** (1 / power)
    H = d / d.norm(dim=1, keepdim=True) * r[:, None]
    return torch.eye(2, dtype=shells.dtype) + H.reshape(-1, 2, 2)


def distill_loss(student: DistilledSANO, z_s: torch.Tensor, z_t: torch.Tensor, F: torch.Tensor,
                 z_var: float) -> dict[str, torch.Tensor]:
    """The loss terms (module docstring) for latents z_s, z_t (B, latent) and loads F̄
    (B·k, 2, 2), k per cell, through the student's (the teacher's) heads."""
    k = len(F) // len(z_s)
    s = student.members_response(z_s.repeat_interleave(k, 0), F, create_graph=True)
    with torch.no_grad():
        t = student.members_response(z_t.repeat_interleave(k, 0), F)
    sig, a_ref = student.sigma_ref.to(F.dtype), student.tangent_ref.to(F.dtype)
    return {"stress": ((s["stress"] - t["stress"]) ** 2).sum((-1, -2)).mean() / sig**2,
            "tangent": ((s["tangent"] - t["tangent"]) ** 2).sum((-1, -2, -3, -4)).mean()
            / a_ref**2,
            "bound": ((s["chol"] - t["chol"]) ** 2).sum((-1, -2)).mean(),
            "latent": ((z_s - z_t) ** 2).sum(-1).mean() / z_var}


class EpochFit:
    """The resumable training loop of a distillation: Adam on ``params`` of ``module`` with a
    cosine from ``cfg.lr`` to ``cfg.lr_final`` over ``cfg.epochs`` epochs of ``n_fit`` samples
    in batches of ``cfg.batch_size``, resumed from ``ckpt`` (its state under ``name``) where it
    holds this run's, and the best validation epoch's weights kept."""

    def __init__(self, module: torch.nn.Module, params: list, cfg, n_fit: int,
                 ckpt: WorkCheckpoint, name: str) -> None:
        self.module, self.cfg, self.ckpt, self.name = module, cfg, ckpt, name
        self.opt = torch.optim.Adam(params, lr=cfg.lr)
        steps = cfg.epochs * math.ceil(n_fit / cfg.batch_size)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, steps,
                                                                eta_min=cfg.lr_final)
        self.state = {"epoch": 0, "history": [], "best": math.inf, "best_state": None}
        try:
            saved = ckpt.load()
        except CheckpointError:
            log.warning("%s holds another run (other settings or another model): starting "
                        "afresh (it will be overwritten)", ckpt.path)
            saved = None
        if saved is not None:
            module.load_state_dict(saved[name])
            self.opt.load_state_dict(saved["optimizer"])
            self.sched.load_state_dict(saved["scheduler"])
            self.state = saved["state"]
            log.info("resumed after epoch %d", self.state["epoch"])

    def run(self, fit: torch.Tensor, batch_loss, validate, best: str, *, until: int,
            progress: bool) -> dict:
        """Epochs up to ``until``: each a shuffle of the sample indices ``fit`` (from the seed
        and the epoch), ``batch_loss(idx, generator)`` → (loss, terms) per batch, then
        ``validate()`` → metrics, ``best`` naming the one to minimise; a checkpoint after
        each. Returns the state (``history``, ``best``, ``best_state``)."""
        cfg, state = self.cfg, self.state
        while state["epoch"] < until:
            epoch = state["epoch"]
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            perm = fit[torch.randperm(len(fit), generator=g)]
            self.module.train()
            for i in range(0, len(perm), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                loss, terms = batch_loss(idx, g)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                self.sched.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
            metrics = validate()
            record = {"epoch": epoch + 1, "time_s": time.perf_counter() - t0, **metrics,
                      **{k: v / len(fit) for k, v in sums.items()}}
            state["history"].append(record)
            if metrics[best] < state["best"]:
                state["best"] = metrics[best]
                state["best_state"] = {k: v.clone() for k, v in self.module.state_dict().items()}
            state["epoch"] = epoch + 1
            self.ckpt.save({self.name: self.module.state_dict(), "optimizer": self.opt.state_dict(),
                            "scheduler": self.sched.state_dict(), "state": state})
            if progress:
                print(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(
                    f"{k} {v:.3g}" for k, v in record.items() if k != "epoch"), flush=True)
        return state


class Distillation:
    """One distillation of ``teacher`` with settings ``cfg``, kept in ``work`` (teacher data,
    per-epoch checkpoint, log); :meth:`run` resumes where a killed run stopped."""

    def __init__(self, teacher: SANO, cfg: DistillConfig, work: str | Path) -> None:
        if not isinstance(teacher, SANO):
            raise InputError(f"the teacher is a {type(teacher).__name__}: distillation trains "
                             "a student of a SANO model (cell images)")
        self.teacher, self.cfg, self.work = teacher.float().eval(), cfg, Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.key = {"teacher": teacher.weights_digest(), "cells": cfg.cells, "seed": cfg.seed}

    def teacher_data(self) -> dict[str, torch.Tensor]:
        """Images (N, 1, n, n), teacher latents (N, latent) and load shells (N, 2) of the
        distillation cells, from the work folder when it holds this teacher's."""
        path = self.work / "teacher.pt"
        if path.is_file():
            data = torch.load(path, weights_only=True)
            if data["key"] == self.key:
                return data
        t0 = time.perf_counter()
        cells, shells = distillation_cells(self.teacher, self.cfg.cells, self.cfg.seed)
        t1 = time.perf_counter()
        images, z = [], []
        with torch.inference_mode():
            for i in range(0, len(cells), 256):
                x = self.teacher.structure_inputs(cells[i:i + 256])
                images.append(x)
                z.append(torch.cat([self.teacher.encode(x[j:j + 64])[0]
                                    for j in range(0, len(x), 64)]))
        log.info("distillation cells: %d drawn in %.0f s, encoded by the teacher in %.0f s",
                 len(cells), t1 - t0, time.perf_counter() - t1)
        data = {"key": self.key, "images": torch.cat(images), "z": torch.cat(z),
                "shells": torch.as_tensor(shells, dtype=torch.float32)}
        atomic_write(path, lambda tmp: torch.save(data, tmp))
        return data

    def run(self, progress: bool = True, stop_after: int | None = None
            ) -> tuple[DistilledSANO, dict]:
        """Train (or resume) to ``cfg.epochs``, or pause after epoch ``stop_after`` (a later
        run goes on from there, as from a killed one); the student of the best validation
        epoch so far and the history (per epoch: loss terms, validation stress error against
        the teacher)."""
        cfg, data = self.cfg, self.teacher_data()
        n = len(data["z"])
        n_val = max(1, round(cfg.val_fraction * n))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
        val, fit = order[:n_val], order[n_val:]
        with torch.random.fork_rng():  # the initial weights are drawn from the seed
            torch.manual_seed(cfg.seed)
            student = DistilledSANO.student_of(self.teacher, cfg.channels)
        params = [p for p in student.parameters() if p.requires_grad]
        ckpt = WorkCheckpoint(self.work, {**self.key, "config": self.settings(cfg)})
        loop = EpochFit(student, params, cfg, len(fit), ckpt, "student")
        z_var = float(((data["z"] - data["z"].mean(0)) ** 2).sum(-1).mean())
        g_val = torch.Generator().manual_seed(cfg.seed + 1)
        F_val = draw_loads(data["shells"][val], cfg.loads, g_val)

        def batch_loss(idx: torch.Tensor, g: torch.Generator):
            F = draw_loads(data["shells"][idx], cfg.loads, g)
            terms = distill_loss(student, student.encode(data["images"][idx])[0],
                                 data["z"][idx], F, z_var)
            return sum(cfg.weights[k] * v for k, v in terms.items()), terms

        state = loop.run(fit, batch_loss, lambda: {"val_rel_l2_stress": self.validation_error(
            student, data, val, F_val)}, "val_rel_l2_stress",
            until=min(cfg.epochs, stop_after or cfg.epochs), progress=progress)
        student.load_state_dict(state["best_state"])
        return student.eval(), {"history": state["history"], "best_val_rel_l2_stress":
                                state["best"]}

    @staticmethod
    @torch.no_grad()
    def validation_error(student: DistilledSANO, data: dict, val: torch.Tensor,
                         F: torch.Tensor) -> float:
        """Relative L2 error of the student's ensemble-mean stress against the teacher's at the
        validation cells ``val`` and their loads F̄ (k per cell)."""
        student.eval()
        k = len(F) // len(val)
        z_s = student.encode(data["images"][val])[0].repeat_interleave(k, 0)
        z_t = data["z"][val].repeat_interleave(k, 0)
        P_s, P_t = (student.predict(z, F, tangent=False)["mean"] for z in (z_s, z_t))
        return float((P_s - P_t).norm() / P_t.norm())

    @staticmethod
    def settings(cfg: DistillConfig) -> dict:
        """``cfg`` as a JSON-ready dict (recorded in the checkpoint and the model card)."""
        d = dataclasses.asdict(cfg)
        d["channels"] = list(d["channels"])
        return d
