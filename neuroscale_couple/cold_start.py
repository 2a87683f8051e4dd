"""Cold start: a coupled run with no operator trained for its material, learning one on the fly.

The run starts as classic FE² (every point on the fine solver) and learns an operator from its
own fine solves; each point is handed to the operator as soon as its calibrated bound at the
policy's confidence is within the tolerance.

What the operator is, at a point:

- where the point has been solved (every point, after the first load step): its **cell fit**
  (:mod:`neuroscale_couple.cell_fits`, ``cell_fits``, the default): the energy head's basis
  mixture with that cell's own weights, fitted in closed form to the point's latest fine solves
  at each step's end, calibrated on the solves of points drawn at random: a census at the
  end of the first step, scored at the second step's extrapolated loads (so the fits serve
  from the second step on), then audits each step at the steps' converged loads;
- elsewhere (a point without a solve of its own, or every point with ``cell_fits=False``): the
  **network**: the encoder of a shipped model of fibre cells (pretrained, given the run's
  phases as its image channels, frozen) with **fresh coarse-graining heads** (the energy mixture
  and the covariance head) trained from scratch on the run's solves
  (:mod:`neuroscale_couple.retraining`, in the background while the run goes on), with the
  normalisation (stress scale) of those solves. Training the heads alone keeps each retraining
  a few seconds and the latents valid for the whole run (encoded once, at registration).

How the bound stays valid: a share of the points, drawn by point id (:meth:`is_held_out`:
independent of the partition, spread over the plate and so over the microstructures), is
solved whatever its bound. For the network these points are held out for good: on the fine
solver every step and never trained on, they recalibrate the serving network (split conformal,
:mod:`neuroscale_couple.calibration`) after every load step on their solves of that step — the
nearest loads to the next step's. For the cell fits the share is drawn afresh each step (an
audit: the fit's error at a point chosen by no bound), solved besides at the step's converged
loads (the point stays on its fit) and learnt from afterwards like any solve. A few more
points (``probe``: the operator points with the largest bound relative to their tolerance, one
per microstructure) are solved each step to widen the training data where the operator knows
least.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neuroscale_couple.errors import InputError
from neuroscale_couple.sampling import uniform_by_id

PROBE_RATIO = 0.5
"""A probe's least bound / tolerance."""


@dataclass(frozen=True)
class ColdStart:
    """How a :class:`~neuroscale_couple.coupler.Coupler` without a trained model learns one.

    ``encoder``: a model file of fibre cells of one material (e.g.
    ``examples/models/fe2_composite.pt``, or the distilled ``fe2_composite_fast.pt``) whose
    encoder is taken, frozen; its heads are not. ``held_out``: share of the points (by id)
    kept on the fine solver every step for the conformal calibration, never trained on.
    ``probe``: share of the points solved besides, each step once an operator serves: those with
    the largest bound / tolerance, one per microstructure. ``epochs``: epochs of the first
    training (fresh heads; later retrainings fine-tune for ``RetrainConfig.epochs``);
    ``batch_size`` (samples) and ``lr``: of every training of the run (the heads are learnt
    whole, not corrected: on 176 solves of the benchmark's material, batches of 64 at 3e-3
    took 3.3× less CPU time per epoch than the fine-tuning's 16 at 1e-3, and 300 epochs of
    them reached a lower error than 150 of those). ``seed``: the heads' initialisation and the
    held-out draw.
    """

    encoder: str | Path
    held_out: float = 0.05
    probe: float = 0.02
    epochs: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    cell_fits: bool = True
    history: int = 3

    def __post_init__(self) -> None:
        if not Path(self.encoder).is_file():
            raise InputError(f"cold_start encoder {self.encoder}: no such model file; give a "
                             "shipped model of fibre cells, e.g. examples/models/fe2_composite.pt")
        if not 0 < self.held_out < 1:
            raise InputError(f"cold_start held_out={self.held_out}: give the share of points "
                             "kept for calibration in (0, 1), e.g. 0.25")
        if not 0 <= self.probe < 1:
            raise InputError(f"cold_start probe={self.probe}: give a share of points in [0, 1)")
        for name in ("epochs", "batch_size", "history"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise InputError(f"cold_start {name}={value}: give a whole number ≥ 1")
        if not self.lr > 0:
            raise InputError(f"cold_start lr={self.lr}: give a learning rate > 0, e.g. 3e-3")

    @classmethod
    def from_dict(cls, d: dict) -> ColdStart:
        """From a config mapping (the ``cold_start`` section of a coupler config)."""
        from neuroscale_couple.config import dataclass_from_dict

        return dataclass_from_dict(cls, d, "cold_start")

    def initial_model(self, family: dict):
        """The untrained operator of the fine solver's material ``family`` (keys ``law``,
        ``matrix``, ``fibre``): the encoder model's class and encoder weights, fresh heads
        (seeded), unit normalisation, no calibration (the Coupler sends every point to the fine
        solver until it has one)."""
        from neuroscale_couple.materials import TwoPhaseMaterial
        from neuroscale_couple.operators.base import HEAD_PREFIXES, load_operator

        pretrained = load_operator(self.encoder)
        config = pretrained.config
        if pretrained.takes_material or not hasattr(config, "matrix"):
            raise InputError(f"cold_start encoder {self.encoder}: give a model of fibre cells "
                             "of one material (a SANO or distilled SANO file), not "
                             f"{type(pretrained).__name__}"
                             + (" with phase inputs" if pretrained.takes_material else ""))
        if pretrained.dim != 2:
            raise InputError(f"cold_start encoder {self.encoder}: a cold start is built for 2D "
                             "(plane-strain) cells; give a 2D fibre-cell model, e.g. "
                             "examples/models/fe2_composite.pt")
        material = TwoPhaseMaterial.from_config(family)
        config = dataclasses.replace(config, law=material.law,
                                     matrix=dataclasses.astuple(material.matrix),
                                     fibre=dataclasses.astuple(material.fibre))
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = type(pretrained)(config)
        encoder = {k: v for k, v in pretrained.state_dict().items()
                   if not k.startswith(HEAD_PREFIXES) and k in model.state_dict()
                   and k not in ("sigma_ref", "e_ref", "tangent_ref")}
        model.load_state_dict(encoder, strict=False)
        model.card = {"cold_start": {"encoder": str(self.encoder),
                                     "encoder_digest": pretrained.encoder_digest(),
                                     "held_out": self.held_out, "probe": self.probe},
                      "data_config": dict(pretrained.card.get("data_config") or {})}
        model.calibration = {}
        return model.double().eval()

    def is_held_out(self, point_ids: np.ndarray, step: int = 0) -> np.ndarray:
        """Whether each point (ids (n,)) is held out for calibration (with ``cell_fits``:
        audited in load step ``step``), (n,) bool: a uniform draw by point id
        (:func:`~neuroscale_couple.sampling.uniform_by_id`) below ``held_out``, so the draw does
        not depend on the partition."""
        return uniform_by_id(point_ids, self.seed, step) < self.held_out

    def probes(self, ratio: np.ndarray, keys: list, n_points: int) -> np.ndarray:
        """Indices into ``ratio`` (n,) (bound / tolerance of the operator points of all ranks,
        gathered in a rank-independent order) of the points to solve besides: the largest
        ratios first, one per microstructure (``keys`` (n,)), ``probe`` × ``n_points`` in all,
        among the points within a factor :data:`PROBE_RATIO` of falling back (a point far
        within its tolerance gains nothing from a solve)."""
        budget = round(self.probe * n_points)
        chosen, seen = [], set()
        for j in np.argsort(-ratio, kind="stable"):
            if len(chosen) >= budget or not ratio[j] >= PROBE_RATIO:
                break
            if keys[j] not in seen:
                seen.add(keys[j])
                chosen.append(j)
        return np.array(chosen, dtype=np.int64)
