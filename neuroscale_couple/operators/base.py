"""What every operator shares: the probabilistic coarse-graining heads and the checkpoint format.

An operator maps a structure (a fibre microstructure image, a crystal descriptor) to a latent z
once (:meth:`CoarseGrainingOperator.encode`), then per Newton iteration maps (z, F̄) to an ensemble
of energy-based stresses P̄_m = ∂W̄_m/∂F̄ with tangents and aleatoric covariances
(:meth:`CoarseGrainingOperator.predict`). Subclasses give the encoder and the check that a fine
solver's material family is the one the model was trained for; the structures' family makes their
inputs (:mod:`neuroscale_couple.structures`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import pickle
import weakref
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from neuroscale_couple import __version__
from neuroscale_couple.errors import CheckpointError, InputError
from neuroscale_couple.operators.epistemic import ENSEMBLE, Epistemic
from neuroscale_couple.operators.heads import (
    COVARIANCE_FORMS,
    CovarianceHead,
    EnergyHead,
    QuadraticCovarianceHead,
    green_lagrange_mandel,
    mixture_response,
)
from neuroscale_couple.region import TrainingRegion
from neuroscale_couple.store import atomic_write


def check_covariance_form(form: str) -> None:
    """Refuse a model config's ``covariance`` outside :data:`COVARIANCE_FORMS`."""
    if form not in COVARIANCE_FORMS:
        raise InputError(f"covariance={form!r}: the aleatoric head is one of "
                         f"{', '.join(COVARIANCE_FORMS)}")


HEAD_PREFIXES = ("energy.", "covariance.")
"""Parameter names of the coarse-graining heads: what online retraining trains; the rest (the
encoder) stays frozen, so latents do not change (:meth:`CoarseGrainingOperator.encoder_digest`)."""


RECORDED_WHEN_SET = {"phase_ranges": {}, "dim": 2, "uncertainty": ENSEMBLE.kind,
                     "samples": ENSEMBLE.samples, "dropout": ENSEMBLE.dropout,
                     "covariance": "network"}
"""Config fields added after models were shipped → their value when unset: recorded (and
digested) only when set otherwise, so that the files saved before them keep their digest."""


def autograd_tangent(P: torch.Tensor, F: torch.Tensor, *, create_graph: bool = False
                     ) -> torch.Tensor:
    """A_iJkL = ∂P_iJ/∂F_kL (..., d, d, d, d) by automatic differentiation, for a stress P
    (..., d, d) computed from F (..., d, d, ``requires_grad``) so that each load's P depends on
    its own F only (one backward pass per component of P); ``create_graph`` keeps A
    differentiable (for a tangent loss)."""
    d = P.shape[-1]
    rows = [torch.autograd.grad(P[..., i, j].sum(), F, create_graph=create_graph,
                                retain_graph=True)[0]
            for i, j in itertools.product(range(d), range(d))]
    return torch.stack(rows, dim=-3).reshape(*P.shape, d, d)


def config_record(config) -> dict:
    """The config dataclass as recorded in a checkpoint and its digests."""
    return {k: v for k, v in dataclasses.asdict(config).items()
            if not (k in RECORDED_WHEN_SET and v == RECORDED_WHEN_SET[k])}


_FLOAT32_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Model → (weights key, its float32 copy) for :meth:`CoarseGrainingOperator.latents`."""


class CoarseGrainingOperator(nn.Module):
    """Base of the operators; stresses in the unit of the training data, F̄ dimensionless.

    Subclasses set ``FORMAT`` and ``CONFIG`` (a frozen dataclass with ``from_dict``), call
    :meth:`_build_heads` and :meth:`_build_buffers` in their constructor and implement
    :meth:`encode` and :meth:`check_family` (and, operators of images, :attr:`input_resolution`
    and :attr:`data_resolution`); their inputs come from the structures' family
    (:meth:`structure_inputs`).
    """

    FORMAT: ClassVar[str]
    CONFIG: ClassVar[type]

    def _build_heads(self, members: int, latent: int, hidden: int, correction: bool,
                     residual: bool = False, quartic: bool = False, dim: int = 2,
                     epistemic: Epistemic = ENSEMBLE, covariance: str = "network") -> None:
        """The probabilistic coarse-graining heads (energy ensemble, aleatoric covariance) of
        F̄ d×d, d = ``dim`` (2: plane strain, 3); ``epistemic``: an ensemble of ``members``
        or a Bayesian model (:mod:`~neuroscale_couple.operators.epistemic`); ``covariance``:
        the form of the aleatoric head, a network of (z, ê) per member or one head quadratic
        in ê (:data:`~neuroscale_couple.operators.heads.COVARIANCE_FORMS`)."""
        check_covariance_form(covariance)
        self.epistemic, self.members = epistemic, members
        mlp = epistemic.mlp()
        self.energy = EnergyHead(members, latent, hidden, correction, residual, quartic, dim,
                                 mlp)
        self.covariance = (CovarianceHead(members, latent, hidden, dim, mlp)
                           if covariance == "network"
                           else QuadraticCovarianceHead(latent, hidden, dim))

    def _build_buffers(self) -> None:
        """Normalisation buffers (σ_ref, e_ref, A_ref), calibration and model card."""
        # normalisation travels with the model: stress scale, strain scale, tangent scale
        self.register_buffer("sigma_ref", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("e_ref", torch.tensor(0.1, dtype=torch.float64))
        self.register_buffer("tangent_ref", torch.tensor(1.0, dtype=torch.float64))
        self.calibration: dict = {}
        self.card: dict = {}
        self.bound: dict | None = None  # the run's material family (bind_material)
        self.stress_unit = 1.0  # the bound material's stress unit (a family operator's E_m)

    # ------------------------------------------------------------------ subclass interface
    def encode(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent z (B, latent) of structure inputs, and a feature map for fine-graining (or
        None when the operator has no decoder)."""
        raise NotImplementedError

    def structure_inputs(self, structures: Sequence) -> torch.Tensor:
        """The encoder's input tensor for structure objects of one family (any
        :class:`~neuroscale_couple.structures.Structure`), made as in training: through the
        arrays a data set stores (images at :attr:`data_resolution`), on the model's device and
        dtype."""
        from neuroscale_couple.structures import common_family

        p = next(self.parameters())
        family = common_family(structures)
        micro = {**family.arrays(structures, self.data_resolution),
                 **self.material_arrays(len(structures))}
        return family.operator_inputs(micro, self.input_resolution, p.dtype,
                                      "structures").to(p.device)

    def check_family(self, family: dict) -> None:
        """Raise :class:`InputError` if the fine solver's material ``family`` config is not the
        one the model was trained for."""
        raise NotImplementedError

    def adopt_material(self, family: dict) -> dict | None:
        """Take the material of the ``family`` config as the model's own, to fine-tune it on
        data of that material (few-shot transfer: ``neuroscale train --init M.pt
        --new-material``); returns what it learnt before (config fields → values), or None if
        that is the same material. This base raises :class:`InputError` for another material
        (:meth:`check_family`): an operator that can change it overrides this."""
        self.check_family(family)
        return None

    def bind_material(self, family: dict) -> None:
        """Take the fine solver's material ``family`` config as the material of the structures
        to encode and predict: what an operator with material inputs needs (a family
        operator); an operator of one material has nothing to take (:meth:`check_family`
        checks it)."""

    @property
    def takes_material(self) -> bool:
        """Whether the operator takes the phases as inputs (a family operator), so that it must
        be bound to a material (:meth:`bind_material`) before it encodes or predicts."""
        return False

    def material_arrays(self, count: int) -> dict[str, np.ndarray]:
        """The bound material's arrays (name → (count,)) that join ``count`` structures' stored
        arrays to make their inputs; none for an operator of one material."""
        return {}

    @property
    def stress_scale(self) -> torch.Tensor:
        """σ_ref in the unit of the predicted stresses: the normalisation times the bound
        material's :attr:`stress_unit`."""
        return self.sigma_ref * self.stress_unit

    @torch.no_grad()
    def latents(self, structures: Sequence, batch: int = 64) -> torch.Tensor:
        """Latents z (B, latent) of B structures, in the model's dtype.

        Encoded in float32, the precision the encoder is trained in (online retraining leaves it
        frozen): a float64 model encodes through a float32 copy, about twice as fast, changing z
        by ~1e-7 relative. Structures are rendered ``batch`` at a time, so the images (16 KB a
        structure at resolution 64) never exist for all of them at once.
        """
        p = next(self.parameters())
        dtype = p.dtype
        structures = list(structures)
        if not structures:
            return torch.zeros((0, self.config.latent), dtype=dtype, device=p.device)
        encoder = self if dtype == torch.float32 else self._float32_encoder()
        return torch.cat([encoder.encode(encoder.structure_inputs(structures[i:i + batch]))[0]
                          for i in range(0, len(structures), batch)]).to(dtype)

    def _float32_encoder(self) -> CoarseGrainingOperator:
        """A float32 copy of this model for :meth:`latents`, made once and kept while the
        encoder's weights stay put: keyed on every non-head tensor's storage and in-place
        version counter (an optimiser step, ``load_state_dict`` or a dtype or device move makes
        a new copy) and on the data resolution."""
        key = (self.data_resolution, *((t.data_ptr(), t._version) for name, t in
                                       itertools.chain(self.named_parameters(),
                                                       self.named_buffers())
                                       if not name.startswith(HEAD_PREFIXES)))
        cached = _FLOAT32_ENCODERS.get(self)
        if cached is None or cached[0] != key:
            encoder = type(self)(self.config).float()
            encoder.load_state_dict(self.state_dict())
            encoder.card = copy.deepcopy(self.card)
            cached = _FLOAT32_ENCODERS[self] = (key, encoder.to(next(self.parameters()).device))
        cached[1].bound, cached[1].stress_unit = self.bound, self.stress_unit
        return cached[1].train(self.training)

    @property
    def input_resolution(self) -> int | None:
        """Resolution of the model's input images (None: an operator without images)."""
        return None

    @property
    def data_resolution(self) -> int | None:
        """Resolution of the training data's images, at which structures are rendered before
        they are pooled to :attr:`input_resolution` (None: an operator without images)."""
        return None

    @property
    def dim(self) -> int:
        """d of the F̄ (d×d) the operator takes: 2 (plane strain) or 3."""
        return self.energy.dim

    def check_loads(self, F: torch.Tensor) -> None:
        """Raise :class:`InputError` unless F has shape (B, d, d) with the operator's d."""
        d = self.dim
        if F.ndim != 3 or F.shape[-2:] != (d, d):
            kind = "plane-strain (2D) operator" if d == 2 else "3D operator"
            raise InputError(f"F has shape {tuple(F.shape)}: this {kind} takes F̄ batches "
                             f"(B, {d}, {d}); loads of another dimension need a model trained "
                             "on cells of that dimension")

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the last layer that every data term's gradient passes
        through, over which GradNorm loss weighting (:mod:`neuroscale_couple.weighting`)
        balances the terms' gradient norms: the encoder's final linear map to the latent z
        (``to_latent[-1]``), which the energy and covariance heads and the fine-graining
        decoder all read; where the encoder is frozen (online retraining trains the heads
        only), the output layer of the energy head's basis-weight network
        (``energy.weights[-1]``), through which every stress and tangent passes."""
        layers = [self.energy.weights[-1]]
        if isinstance(getattr(self, "to_latent", None), nn.Sequential):
            layers.insert(0, self.to_latent[-1])
        for layer in layers:
            params = [p for p in layer.parameters() if p.requires_grad]
            if params:
                return params
        raise InputError(f"{type(self).__name__} has no trainable layer shared by the loss "
                         "terms (to_latent, energy head): train it with weighting: fixed or "
                         "uncertainty")

    # ------------------------------------------------------------------ normalisation
    def set_normalisation(self, F: torch.Tensor, P: torch.Tensor, A: torch.Tensor) -> None:
        """Scales from training data: F (S, d, d), P (S, d, d), A (S, d, d, d, d)."""
        self.check_loads(F)
        self.e_ref.fill_(float(green_lagrange_mandel(F.double()).std()))
        self.set_stress_scales(P, A)

    def set_stress_scales(self, P: torch.Tensor, A: torch.Tensor) -> None:
        """σ_ref and A_ref from training data P (S, d, d), A (S, d, d, d, d), the strain scale
        kept: what a model fine-tuned to another material (:meth:`adopt_material`) needs, its
        stresses being of another size."""
        self.sigma_ref.fill_(float(P.std()))
        self.tangent_ref.fill_(float(A.std()))

    # ------------------------------------------------------------------ coarse-graining
    @property
    def draws(self) -> int:
        """M, the members (draws of a Bayesian model) that :meth:`members_response` answers
        with: the ensemble's members; a Bayesian model's ``members`` in training, ``samples``
        at prediction (:meth:`~.epistemic.Epistemic.draws`)."""
        return self.epistemic.draws(self.members, self.training)

    def members_response(self, z: torch.Tensor, F: torch.Tensor, *, tangent: bool = True,
                         create_graph: bool = False) -> dict[str, torch.Tensor]:
        """Per-member stress P_m (M, B, d, d), tangent A_m (M, B, d, d, d, d) and Cholesky
        factor L_m (M, B, d², d²) of Σ_m = σ_ref² L_m L_mᵀ, for latents z (B, latent),
        F (B, d, d) (d: :attr:`dim`).

        ``create_graph`` keeps the graph for training through P and A (Sobolev loss); without
        it a basis-mixture energy head answers in closed form (:func:`mixture_response`).
        M = :attr:`draws`; a Bayesian model's draws are those of
        :meth:`~.epistemic.Epistemic.sampling`.
        """
        M = self.draws
        self.check_loads(F)
        with self.epistemic.sampling(self, self.training):
            if not create_graph and self.energy.closed_form:
                return self._closed_form_response(z, F, tangent)
            return self._autograd_response(z, F, M, tangent, create_graph)

    def _autograd_response(self, z: torch.Tensor, F: torch.Tensor, M: int, tangent: bool,
                           create_graph: bool) -> dict[str, torch.Tensor]:
        """:meth:`members_response` of M members through automatic differentiation."""
        with torch.enable_grad():
            Fm = F.detach().unsqueeze(0).expand(M, -1, -1, -1).clone().requires_grad_(True)
            e_ref = self.e_ref.to(F.dtype)
            e = green_lagrange_mandel(Fm) / e_ref
            zm = z.unsqueeze(0).expand(M, -1, -1)
            C = Fm.transpose(-1, -2) @ Fm
            W = self.energy(zm, C, e, e_ref) * (self.stress_scale.to(F.dtype) * e_ref)
            P = torch.autograd.grad(W.sum(), Fm, create_graph=create_graph or tangent)[0]
            out = {"stress": P, "chol": self.covariance(zm, e.detach() if not create_graph else e),
                   "energy": W}
            if tangent:
                out["tangent"] = autograd_tangent(P, Fm, create_graph=create_graph)
        if not create_graph:
            out = {k: v.detach() for k, v in out.items()}
        return out

    def _mixture_weights(self, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Physical weights (M, B, K) of a basis-mixture energy head: W = σ_ref e_ref Σ_k w_k
        Ψ_k / e_ref², so the weights of the Ψ_k are w σ_ref / e_ref (σ_ref:
        :attr:`stress_scale`)."""
        w = self.energy.weights(z.unsqueeze(0).expand(self.draws, -1, -1))
        return w * (self.stress_scale / self.e_ref).to(dtype)

    @torch.no_grad()
    def _closed_form_response(self, z: torch.Tensor, F: torch.Tensor, tangent: bool
                              ) -> dict[str, torch.Tensor]:
        """:meth:`members_response` of a basis-mixture energy head, without autograd; also
        returns the members' physical ``weights`` (M, B, K)."""
        w = self._mixture_weights(z, F.dtype)
        out = mixture_response(w, F.unsqueeze(0), self.energy.n_directions, tangent=tangent)
        out["weights"] = w
        M = len(w)
        e = green_lagrange_mandel(F) / self.e_ref.to(F.dtype)
        out["chol"] = self.covariance(z.unsqueeze(0).expand(M, -1, -1),
                                      e.unsqueeze(0).expand(M, -1, -1))
        return out

    def predict(self, z: torch.Tensor, F: torch.Tensor, *, tangent: bool = True
                ) -> dict[str, torch.Tensor]:
        """Ensemble prediction for F (B, d, d): ``mean`` (B, d, d), ``cov`` (B, d², d²) =
        aleatoric + epistemic, ``aleatoric`` (B, d², d²) its first part (the covariance head),
        ``energy`` (B,) strain energy density W̄ (stress unit) with mean = ∂W̄/∂F̄, ``tangent``
        (B, d, d, d, d) = ∂mean/∂F̄ (if asked), all without a graph."""
        # a basis mixture is linear in its weights: its mean tangent is the tangent of the mean
        # weights, one member's work instead of M
        closed = self.energy.closed_form
        r = self.members_response(z, F, tangent=tangent and not closed)
        P = r["stress"]
        mean = P.mean(0)
        dev = (P - mean).flatten(-2)
        sigma2 = (self.stress_scale**2).to(F.dtype)
        alea = sigma2 * (r["chol"] @ r["chol"].transpose(-1, -2)).mean(0)
        cov = alea + torch.einsum("mbi,mbj->bij", dev, dev) / P.shape[0]
        out = {"mean": mean, "cov": cov, "aleatoric": alea, "energy": r["energy"].mean(0)}
        if tangent and closed:
            with torch.no_grad():
                out["tangent"] = mixture_response(r["weights"].mean(0), F,
                                                  self.energy.n_directions)["tangent"]
        elif tangent:
            out["tangent"] = r["tangent"].mean(0)
        return out

    # ------------------------------------------------------------------ checkpoints
    def weights_digest(self, calibration: bool = True) -> str:
        """SHA-256 of the config, the weights and buffers (names, dtypes, values), the
        calibration and the training region: what a model file's digest covers (the rest of
        the card is a record, not covered). ``calibration=False`` leaves the calibration out:
        what a distilled student records of its teacher, whose calibration it does not learn."""
        h = hashlib.sha256(json.dumps(config_record(self.config), sort_keys=True).encode())
        for name, t in self.state_dict().items():
            h.update(f"{name}:{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        if calibration:
            h.update(json.dumps(self.calibration, sort_keys=True).encode())
        if "region" in self.card:
            h.update(json.dumps(self.card["region"], sort_keys=True).encode())
        return h.hexdigest()

    def encoder_digest(self) -> str:
        """SHA-256 of the config and every weight but the coarse-graining heads' (names
        starting with :data:`HEAD_PREFIXES`): what a structure's latent depends on, so latents
        cached under it stay valid through online retraining, which trains the heads only; and
        the bound material, where the operator takes it as input."""
        h = hashlib.sha256(json.dumps(config_record(self.config), sort_keys=True).encode())
        h.update(f"resolution:{self.data_resolution}".encode())
        if self.takes_material:
            h.update(json.dumps(self.bound, sort_keys=True, default=str).encode())
        for name, t in self.state_dict().items():
            if not name.startswith(HEAD_PREFIXES):  # in float32, the encoding's precision
                h.update(name.encode())
                h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def region(self) -> TrainingRegion | None:
        """The loads and structures the model was trained on (its card's ``region``; None for
        a model saved without one)."""
        d = self.card.get("region")
        return None if d is None else TrainingRegion.from_dict(d)

    def save(self, path: str | Path) -> None:
        """Write weights, config, normalisation, calibration, card and the weights' digest
        (:meth:`weights_digest`, checked at load) atomically."""
        payload = {"format": self.FORMAT, "version": __version__,
                   "config": json.dumps(config_record(self.config)),
                   "state_dict": self.state_dict(),
                   "calibration": json.dumps(self.calibration), "card": json.dumps(self.card),
                   "digest": self.weights_digest()}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu"):
        """Rebuild a model from a file written by :meth:`save` (no code is unpickled), in eval
        mode (a Bayesian model's prediction draws: :mod:`~.epistemic`)."""
        payload = _read_payload(path, map_location)
        if payload.get("format") != cls.FORMAT:
            raise CheckpointError(f"{path} is not a {cls.FORMAT} checkpoint (it holds "
                                  f"{payload.get('format')!r}): load it with load_operator")
        return cls._from_payload(payload, path, map_location)

    @classmethod
    def _from_payload(cls, payload: dict, path, map_location):
        try:
            model = cls(cls.CONFIG.from_dict(json.loads(payload["config"])))
            # weights stored in float64 (a run's checkpoint) load without rounding to float32
            dtypes = {t.dtype for t in payload["state_dict"].values() if t.is_floating_point()}
            if len(dtypes) == 1:
                model.to(dtypes.pop())
            model.load_state_dict(payload["state_dict"])
            model.calibration = json.loads(payload.get("calibration", "{}"))
            model.card = json.loads(payload.get("card", "{}"))
        except (KeyError, RuntimeError, json.JSONDecodeError, InputError) as err:
            raise CheckpointError(f"{path} does not match this version of {cls.__name__} "
                                  f"({err})") from None
        bad = [name for name, t in model.state_dict().items()
               if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise CheckpointError(f"{path} holds non-finite weights ({', '.join(bad[:3])}): the "
                                  "file is corrupt: re-copy or retrain it")
        if payload.get("digest") != model.weights_digest():
            raise CheckpointError(f"{path}: its weights do not match the SHA-256 digest written "
                                  "with them (a corrupt or altered file, or one saved without a "
                                  "digest): re-copy or retrain it")
        return model.to(map_location).eval()


def _read_payload(path: str | Path, map_location) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist: train one with "
                              "`neuroscale train` or use a model shipped in examples/models/")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile,
            ValueError) as err:
        raise CheckpointError(f"{path} is not a readable NeuroScale model ({err}); it may be "
                              "truncated or corrupt: re-copy or retrain it") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{path} is not a NeuroScale model checkpoint")
    return payload


def load_operator(path: str | Path, map_location: str | torch.device = "cpu"
                  ) -> CoarseGrainingOperator:
    """Any NeuroScale operator from its checkpoint (the class is chosen by the file's format),
    in eval mode."""
    from neuroscale_couple.operators.crystal import CrystalOperator
    from neuroscale_couple.operators.distilled import DistilledSANO
    from neuroscale_couple.operators.sano import SANO

    payload = _read_payload(path, map_location)
    for cls in (SANO, DistilledSANO, CrystalOperator):
        if payload["format"] == cls.FORMAT:
            return cls._from_payload(payload, path, map_location)
    raise CheckpointError(f"{path} holds an operator of format {payload['format']!r}, unknown to "
                          f"NeuroScale {__version__}")
