"""SANO, the scale-adaptive neural operator: microstructure image + F̄ → N(P̄, Σ), ∂P̄/∂F̄, fields.

    image (B,1,n,n) → pixel moduli → lift → Fourier blocks → h (B,d,n,n) → decoder(z, F̄) → w(y)
    h → Haar DWT → S scales → tokens → cross-scale attention → scale weights → z (B, latent)
    z, F̄ → ensemble energy heads W̄_m → autograd → P̄_m, A_m;  covariance heads → Σ_m

The latent z of a microstructure is computed once (:meth:`SANO.encode`) and cached by the caller;
per Newton iteration only :meth:`SANO.predict` runs. The model records its constructor arguments
and its normalisation, so :meth:`SANO.from_checkpoint` rebuilds it from the file alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from neuroscale_couple import __version__
from neuroscale_couple.errors import CheckpointError, InputError
from neuroscale_couple.materials import Phase, check_law
from neuroscale_couple.operators.attention import CrossScaleAttention, ScaleMixer
from neuroscale_couple.operators.heads import (
    CovarianceHead,
    EnergyHead,
    FineDecoder,
    green_lagrange_mandel,
)
from neuroscale_couple.operators.spectral import FourierBlock
from neuroscale_couple.operators.wavelet import WaveletDecomposition
from neuroscale_couple.physics import micro_deformation, micro_stress
from neuroscale_couple.store import atomic_write

FORMAT = "neuroscale-sano/1"
_PAIRS = list(itertools.product(range(2), range(2)))


@dataclass(frozen=True)
class SANOConfig:
    """Constructor arguments of :class:`SANO` (all JSON-serialisable)."""

    resolution: int = 32
    width: int = 32
    modes: int = 8
    fourier_layers: int = 2
    levels: int = 3
    heads: int = 4
    attention_blocks: int = 1
    cross_scale: bool = True
    latent: int = 64
    hidden: int = 64
    members: int = 4
    energy_correction: bool = True
    law: str = "neo_hookean"
    matrix: tuple[float, float] = (3.0, 0.35)
    fibre: tuple[float, float] = (70.0, 0.2)

    def __post_init__(self) -> None:
        check_law(self.law)
        for name in ("matrix", "fibre"):
            Phase(*getattr(self, name))
        if self.resolution % 2**self.levels:
            raise InputError(f"resolution={self.resolution} must be divisible by 2**levels="
                             f"{2**self.levels}")

    @classmethod
    def from_dict(cls, d: dict) -> SANOConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


class SANO(nn.Module):
    """The operator. Stresses are in the unit of the phase moduli; F̄ is dimensionless."""

    def __init__(self, config: SANOConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or SANOConfig()
        d = c.width
        self.lift = nn.Conv2d(3, d, 1)
        self.fourier = nn.Sequential(*(FourierBlock(d, c.modes) for _ in range(c.fourier_layers)))
        self.wavelet = WaveletDecomposition(c.levels)
        n_scales = c.levels + 1
        self.tokens = nn.ModuleList([nn.Linear(3 * d, d) for _ in range(c.levels)]
                                    + [nn.Linear(d, d)])
        self.attention = nn.ModuleList(CrossScaleAttention(n_scales, d, c.heads, c.cross_scale)
                                       for _ in range(c.attention_blocks))
        self.mixer = ScaleMixer(n_scales)
        self.to_latent = nn.Sequential(nn.Linear(d + 1, c.latent), nn.SiLU(),
                                       nn.Linear(c.latent, c.latent))
        self.energy = EnergyHead(c.members, c.latent, c.hidden, c.energy_correction)
        self.covariance = CovarianceHead(c.members, c.latent, c.hidden)
        self.decoder = FineDecoder(d, c.latent, c.modes)
        # normalisation travels with the model: stress scale, strain scale, tangent scale
        self.register_buffer("sigma_ref", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("e_ref", torch.tensor(0.1, dtype=torch.float64))
        self.register_buffer("tangent_ref", torch.tensor(1.0, dtype=torch.float64))
        self.calibration: dict = {}
        self.card: dict = {}

    # ------------------------------------------------------------------ normalisation
    def set_normalisation(self, F: torch.Tensor, P: torch.Tensor, A: torch.Tensor) -> None:
        """Scales from training data: F (S, 2, 2), P (S, 2, 2), A (S, 2, 2, 2, 2)."""
        self.sigma_ref.fill_(float(P.std()))
        self.e_ref.fill_(float(green_lagrange_mandel(F.double()).std()))
        self.tangent_ref.fill_(float(A.std()))

    # ------------------------------------------------------------------ encoder
    def moduli(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel Lamé fields (λ, μ) (B, n, n) of fibre-fraction images (B, 1, n, n).

        Each pixel takes the phase at its centre (fibre where the fraction exceeds ½), which is
        where the RVE solver samples its micro fields.
        """
        phi = (images[:, 0] > 0.5).to(images.dtype)
        (lm, mm), (lf, mf) = Phase(*self.config.matrix).lame, Phase(*self.config.fibre).lame
        return phi * lf + (1 - phi) * lm, phi * mf + (1 - phi) * mm

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent z (B, latent) and feature map h (B, width, n, n) of images (B, 1, n, n)."""
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[-1] != self.config.resolution:
            raise InputError(f"microstructure images have shape {tuple(images.shape)}: expected "
                             f"(B, 1, {self.config.resolution}, {self.config.resolution})")
        E_max = max(self.config.matrix[0], self.config.fibre[0])
        phi = images[:, 0]
        E = (phi * self.config.fibre[0] + (1 - phi) * self.config.matrix[0]) / E_max
        nu = phi * self.config.fibre[1] + (1 - phi) * self.config.matrix[1]
        h = self.fourier(self.lift(torch.stack([phi, E, nu], dim=1)))
        tokens = [proj(s.flatten(2).transpose(1, 2))
                  for proj, s in zip(self.tokens, self.wavelet(h), strict=True)]
        for block in self.attention:
            tokens = block(tokens)
        pooled = torch.cat([self.mixer(tokens), phi.mean(dim=(-2, -1))[:, None]], dim=-1)
        return self.to_latent(pooled), h

    @property
    def scale_weights(self) -> torch.Tensor:
        """Learned weights of the S scales (finest detail first, approximation last)."""
        return self.mixer.weights.detach()

    # ------------------------------------------------------------------ coarse-graining
    def members_response(self, z: torch.Tensor, F: torch.Tensor, *, tangent: bool = True,
                         create_graph: bool = False) -> dict[str, torch.Tensor]:
        """Per-member stress P_m (M, B, 2, 2), tangent A_m (M, B, 2, 2, 2, 2) and Cholesky
        factor L_m (M, B, 4, 4) of Σ_m = σ_ref² L_m L_mᵀ, for latents z (B, latent), F (B, 2, 2).

        ``create_graph`` keeps the graph for training through P and A (Sobolev loss).
        """
        M = self.config.members
        with torch.enable_grad():
            Fm = F.detach().unsqueeze(0).expand(M, -1, -1, -1).clone().requires_grad_(True)
            e_ref = self.e_ref.to(F.dtype)
            e = green_lagrange_mandel(Fm) / e_ref
            zm = z.unsqueeze(0).expand(M, -1, -1)
            C = Fm.transpose(-1, -2) @ Fm
            W = self.energy(zm, C, e, e_ref) * (self.sigma_ref.to(F.dtype) * e_ref)
            P = torch.autograd.grad(W.sum(), Fm, create_graph=create_graph or tangent)[0]
            out = {"stress": P, "chol": self.covariance(zm, e.detach() if not create_graph else e)}
            if tangent:
                rows = [torch.autograd.grad(P[..., i, j].sum(), Fm, create_graph=create_graph,
                                            retain_graph=True)[0] for i, j in _PAIRS]
                out["tangent"] = torch.stack(rows, dim=-3).reshape(*P.shape, 2, 2)
        if not create_graph:
            out = {k: v.detach() for k, v in out.items()}
        return out

    def predict(self, z: torch.Tensor, F: torch.Tensor, *, tangent: bool = True
                ) -> dict[str, torch.Tensor]:
        """Ensemble prediction: ``mean`` (B, 2, 2), ``cov`` (B, 4, 4) = aleatoric + epistemic,
        ``tangent`` (B, 2, 2, 2, 2) = ∂mean/∂F̄ (if asked), all without a graph."""
        r = self.members_response(z, F, tangent=tangent)
        P = r["stress"]
        mean = P.mean(0)
        dev = (P - mean).flatten(-2)
        sigma2 = (self.sigma_ref**2).to(F.dtype)
        cov = sigma2 * (r["chol"] @ r["chol"].transpose(-1, -2)).mean(0)
        cov = cov + torch.einsum("mbi,mbj->bij", dev, dev) / P.shape[0]
        out = {"mean": mean, "cov": cov}
        if tangent:
            out["tangent"] = r["tangent"].mean(0)
        return out

    # ------------------------------------------------------------------ fine-graining
    def decode(self, images: torch.Tensor, z: torch.Tensor, h: torch.Tensor, F: torch.Tensor,
               noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Micro fields for F̄ (B, 2, 2): ``w`` (B, 2, n, n), ``F`` and ``P`` (B, n, n, 2, 2)."""
        e = green_lagrange_mandel(F) / self.e_ref.to(F.dtype)
        w = self.decoder(h, z, e, noise) * self.e_ref.to(F.dtype)
        F_field = micro_deformation(F, w)
        lmbda, mu = self.moduli(images)
        return {"w": w, "F": F_field, "P": micro_stress(F_field, lmbda, mu, self.config.law)}

    def sample_fields(self, images: torch.Tensor, F: torch.Tensor, n_samples: int,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``n_samples`` micro-field realizations per state: each field gets a leading sample
        axis (n_samples, B, ...). Realizations differ through the decoder's noise input."""
        z, h = self.encode(images)
        n = images.shape[-1]
        draws = [self.decode(images, z, h, F, torch.randn(len(F), 1, n, n, generator=generator,
                                                          dtype=images.dtype))
                 for _ in range(n_samples)]
        return {k: torch.stack([d[k] for d in draws]) for k in draws[0]}

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        """Write weights, config, normalisation, calibration and card atomically."""
        payload = {"format": FORMAT, "version": __version__,
                   "config": json.dumps(dataclasses.asdict(self.config)),
                   "state_dict": self.state_dict(),
                   "calibration": json.dumps(self.calibration), "card": json.dumps(self.card)}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> SANO:
        """Rebuild a model from a file written by :meth:`save` (no code is unpickled)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"model file {path} does not exist: train one with "
                                  "`neuroscale train` or use examples/models/fe2_composite.pt")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile,
                ValueError) as err:
            raise CheckpointError(f"{path} is not a readable NeuroScale model ({err}); it may be "
                                  "truncated or corrupt: re-copy or retrain it") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
        try:
            model = cls(SANOConfig.from_dict(json.loads(payload["config"])))
            model.load_state_dict(payload["state_dict"])
            model.calibration = json.loads(payload.get("calibration", "{}"))
            model.card = json.loads(payload.get("card", "{}"))
        except (KeyError, RuntimeError, json.JSONDecodeError, InputError) as err:
            raise CheckpointError(f"{path} does not match this version of SANO ({err})") from None
        return model.to(map_location)
