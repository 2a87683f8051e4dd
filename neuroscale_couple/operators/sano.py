"""SANO, the scale-adaptive neural operator: microstructure image + F̄ → N(P̄, Σ), ∂P̄/∂F̄, fields.

    image (B,1,n,n) → pixel moduli → lift → Fourier blocks → h (B,c,n,n) → decoder(z, F̄) → w(y)
    h → Haar DWT → S scales → tokens → cross-scale attention → scale weights → z (B, latent)
    z, F̄ → ensemble energy heads W̄_m → autograd → P̄_m, A_m;  covariance heads → Σ_m

The same architecture learns 3D cells (``dim: 3``): voxel images (B,1,n,n,n), 3D Fourier layers
and Haar scales (7 detail bands a level), F̄ 3×3 and an energy of 3D invariants
(:func:`~neuroscale_couple.operators.heads.basis_energies_3d`); a 3D model has no fine-graining
decoder (its micro fields come from the fine solver).

The latent z of a microstructure is computed once (:meth:`SANO.encode`) and cached by the caller;
per Newton iteration only :meth:`SANO.predict` runs. The model records its constructor arguments
and its normalisation, so :meth:`SANO.from_checkpoint` rebuilds it from the file alone.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field, replace

import numpy as np
import torch
from torch import nn

from neuroscale_couple.config import dataclass_from_dict
from neuroscale_couple.errors import InputError, MaterialOutsideError
from neuroscale_couple.materials import (
    DEFAULT_LAW,
    EPOXY_LIKE_MATRIX,
    GLASS_LIKE_FIBRE,
    Phase,
    TwoPhaseMaterial,
    check_law,
    lame,
)
from neuroscale_couple.operators.attention import CrossScaleAttention, ScaleMixer
from neuroscale_couple.operators.base import CoarseGrainingOperator, check_covariance_form
from neuroscale_couple.operators.epistemic import EpistemicConfig
from neuroscale_couple.operators.heads import FineDecoder, green_lagrange_mandel
from neuroscale_couple.operators.spectral import FourierBlock, pointwise_conv
from neuroscale_couple.operators.wavelet import WaveletDecomposition
from neuroscale_couple.phases import (
    DESCRIPTORS,
    PhaseRanges,
    in_range,
    material_arrays,
    outside_reason,
)
from neuroscale_couple.physics import micro_deformation, micro_stress


@dataclass(frozen=True)
class CellHeadsConfig(EpistemicConfig):
    """What every operator of fibre-cell images records besides its encoder: the latent size,
    the heads (ensemble ``members``, ``hidden`` width, energy basis), the source of their
    epistemic uncertainty (``uncertainty``: ensemble, mc_dropout or variational, with the
    ``samples`` drawn at prediction and the ``dropout`` rate of mc_dropout; a Bayesian model
    trains with ``members`` draws a step: :mod:`~neuroscale_couple.operators.epistemic`) and
    the law and phases (E, ν) of the material it learnt — or, for a family operator,
    ``phase_ranges``: the ranges of the phase descriptors it takes as inputs (contrast
    E_f/E_m, ν_m, ν_f → [low, high]; :mod:`neuroscale_couple.phases`), ``matrix`` and
    ``fibre`` then unused; ``covariance``: the form of the aleatoric head (``network`` or
    ``quadratic``, :data:`~neuroscale_couple.operators.heads.COVARIANCE_FORMS`)."""

    latent: int = 64
    hidden: int = 64
    members: int = 4
    energy_correction: bool = True
    quartic_basis: bool = False
    law: str = DEFAULT_LAW
    matrix: tuple[float, float] = astuple(EPOXY_LIKE_MATRIX)
    fibre: tuple[float, float] = astuple(GLASS_LIKE_FIBRE)
    phase_ranges: dict[str, list[float]] = field(default_factory=dict)
    covariance: str = "network"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_covariance_form(self.covariance)
        check_law(self.law)
        for name in ("matrix", "fibre"):
            Phase(*getattr(self, name))
        ranges = self.phase_ranges
        if ranges and (set(ranges) != set(DESCRIPTORS) or not all(
                len(r) == 2 and r[0] <= r[1] for r in ranges.values())):
            raise InputError(f"phase_ranges={ranges!r}: give [low, high] for each of "
                             f"{', '.join(DESCRIPTORS)}")


@dataclass(frozen=True)
class SANOConfig(CellHeadsConfig):
    """Constructor arguments of :class:`SANO` (all JSON-serialisable): the encoder's, and
    those of :class:`CellHeadsConfig`."""

    resolution: int = 32
    width: int = 32
    modes: int = 8
    fourier_layers: int = 2
    levels: int = 3
    heads: int = 4
    attention_blocks: int = 1
    cross_scale: bool = True
    dim: int = 2
    """Space dimension of the cells: 2 (pixel images, F̄ 2×2) or 3 (voxel images, F̄ 3×3);
    set from the data's structure family by ``neuroscale train``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dim not in (2, 3):
            raise InputError(f"dim={self.dim!r}: SANO learns 2D or 3D cells, give 2 or 3")
        if self.resolution % 2**self.levels:
            raise InputError(f"resolution={self.resolution} must be divisible by 2**levels="
                             f"{2**self.levels}")

    @classmethod
    def from_dict(cls, d: dict) -> SANOConfig:
        return dataclass_from_dict(cls, d, "the model config")


class SANO(CoarseGrainingOperator):
    """The operator of fibre microstructures. Stresses are in the unit of the phase moduli; F̄
    is dimensionless."""

    FORMAT = "neuroscale-sano/1"
    CONFIG = SANOConfig

    def __init__(self, config: SANOConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or SANOConfig()
        d = c.width
        self.lift = pointwise_conv(3, d, c.dim)
        self.fourier = nn.Sequential(*(FourierBlock(d, c.modes, dim=c.dim)
                                       for _ in range(c.fourier_layers)))
        self.wavelet = WaveletDecomposition(c.levels, c.dim)
        n_scales, bands = c.levels + 1, 2**c.dim - 1
        self.tokens = nn.ModuleList([nn.Linear(bands * d, d) for _ in range(c.levels)]
                                    + [nn.Linear(d, d)])
        self.attention = nn.ModuleList(CrossScaleAttention(n_scales, d, c.heads, c.cross_scale)
                                       for _ in range(c.attention_blocks))
        self.mixer = ScaleMixer(n_scales)
        n_phase = len(DESCRIPTORS) if c.phase_ranges else 0
        self.to_latent = nn.Sequential(nn.Linear(d + 1 + n_phase, c.latent), nn.SiLU(),
                                       nn.Linear(c.latent, c.latent))
        self._build_heads(c.members, c.latent, c.hidden, c.energy_correction,
                          quartic=c.quartic_basis, dim=c.dim, epistemic=c.epistemic,
                          covariance=c.covariance)
        self.decoder = FineDecoder(d, c.latent, c.modes) if c.dim == 2 else None
        self._build_buffers()

    # ------------------------------------------------------------------ encoder
    def _phases(self, images: torch.Tensor) -> tuple:
        """(E_m, E_f, ν_m, ν_f) of inputs (B, C, n, …): the config's numbers, or for a family
        operator each structure's descriptors (B, 1, …) with E_m = 1, E_f = contrast."""
        if not self.takes_material:
            return (self.config.matrix[0], self.config.fibre[0], self.config.matrix[1],
                    self.config.fibre[1])
        c, nu_m, nu_f = images[(slice(None), slice(1, None))
                               + (slice(None, 1),) * self.config.dim].unbind(1)
        return torch.ones_like(c), c, nu_m, nu_f

    def moduli(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel Lamé fields (λ, μ) (B, n, …) of inputs (B, C, n, …) (a family operator's
        in units of E_m).

        Each pixel takes the phase at its centre (fibre where the fraction exceeds ½), which is
        where the RVE solver samples its micro fields.
        """
        phi = (images[:, 0] > 0.5).to(images.dtype)
        E_m, E_f, nu_m, nu_f = self._phases(images)
        (lm, mm), (lf, mf) = lame(E_m, nu_m), lame(E_f, nu_f)
        return phi * lf + (1 - phi) * lm, phi * mf + (1 - phi) * mm

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent z (B, latent) and feature map h (B, width, n, …) of inputs (B, C, n, …)
        (n² pixels, or n³ voxels for a 3D model): the fibre-fraction image (C = 1), and for a
        family operator its phase descriptors as constant channels (C = 4;
        :meth:`PhaseCell.operator_inputs
        <neuroscale_couple.solvers.phase_cell.PhaseCell.operator_inputs>`)."""
        phi, h, (E_f, nu_m, nu_f) = self._feature_map(images)
        tokens = self._tokens(self.wavelet(h))
        for block in self.attention:
            tokens = block(tokens)
        pooled = [self.mixer(tokens), phi.flatten(1).mean(-1)[:, None]]
        if self.takes_material:  # log contrast: 0–4.6 over contrasts 1–100
            pooled.append(torch.cat([torch.log(E_f), nu_m, nu_f], dim=-1)[:, 0])
        return self.to_latent(torch.cat(pooled, dim=-1)), h

    def _feature_map(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """The fibre fraction φ (B, n, …), the feature map h (B, width, n, …) and the phases
        (E_f, ν_m, ν_f) of inputs (B, C, n, …), checked (see :meth:`encode`)."""
        n, channels = self.config.resolution, 1 + len(DESCRIPTORS) * self.takes_material
        d = self.config.dim
        if images.ndim != 2 + d or images.shape[1] != channels or images.shape[-1] != n:
            other = ({2 + 3: " — 3D (voxel) images: this operator learnt 2D cells; use a 3D "
                             "model (trained on 3D cells)",
                      2 + 2: " — 2D (pixel) images: this operator learnt 3D cells; use a 2D "
                             "model"}.get(images.ndim, "") if images.ndim != 2 + d else "")
            raise InputError(f"microstructure images have shape {tuple(images.shape)}: expected "
                             f"({', '.join(['B', str(channels)] + [str(n)] * d)})" + other + (
                                 " — a family operator takes cells with their phases"
                                 if self.takes_material else ""))
        E_m, E_f, nu_m, nu_f = self._phases(images)
        E_max = torch.maximum(E_m, E_f) if self.takes_material else max(E_m, E_f)
        phi = images[:, 0]
        E = (phi * E_f + (1 - phi) * E_m) / E_max
        nu = phi * nu_f + (1 - phi) * nu_m
        return phi, self.fourier(self.lift(torch.stack([phi, E, nu], dim=1))), (E_f, nu_m, nu_f)

    def _tokens(self, scales: list[torch.Tensor]) -> list[torch.Tensor]:
        """The wavelet scales (B, c_s, n_s, …) of h as tokens (B, n_s^dim, width), one per
        pixel (voxel)."""
        return [proj(s.flatten(2).transpose(1, 2))
                for proj, s in zip(self.tokens, scales, strict=True)]

    @torch.no_grad()
    def explain(self, images: torch.Tensor) -> dict[str, object]:
        """What the encoder sees of inputs (B, C, n, n) (see :meth:`encode`), for plots:

        - ``fraction`` (B, n, n): the fibre fraction image;
        - ``scale_energy``: per wavelet scale s (finest detail first, approximation last) the
          energy Σ_c h_s,c² (B, n_s, …) of the feature map's Haar coefficients — by Parseval
          they add up to ‖h‖²;
        - ``attention``: per attention block, per query scale s, the share of each token's
          attention (mean over heads) on each key scale (B, n_s, …, S), summing to one;
        - ``scale_weights`` (S,): the learned weights with which the scales are pooled.
        """
        phi, h, _ = self._feature_map(images)
        scales = self.wavelet(h)
        tokens = self._tokens(scales)
        sizes = [t.shape[1] for t in tokens]
        maps = []
        for block in self.attention:
            shares = []
            for s, w in enumerate(block.attention_weights(tokens)):
                mass = w.mean(1)  # (B, N_s, N_keys)
                if block.cross:
                    mass = torch.stack([part.sum(-1) for part in mass.split(sizes, -1)], -1)
                else:  # all of it on its own scale
                    mass = nn.functional.one_hot(torch.full(mass.shape[:2], s),
                                                 len(sizes)).to(mass)
                n_s = scales[s].shape[-1]
                shares.append(mass.reshape(len(phi), *(n_s,) * self.config.dim, len(sizes)))
            maps.append(shares)
            tokens = block(tokens)
        return {"fraction": phi, "scale_energy": [c.square().sum(1) for c in scales],
                "attention": maps, "scale_weights": self.scale_weights}

    @property
    def input_resolution(self) -> int:
        """Resolution of the model's input images."""
        return self.config.resolution

    @property
    def data_resolution(self) -> int:
        """Resolution of the training data's images (model card; default the model's own)."""
        return int((self.card.get("data_config") or {}).get("image_resolution",
                                                             self.config.resolution))

    @property
    def takes_material(self) -> bool:
        """Whether this is a family operator (phases as inputs, ``phase_ranges`` set)."""
        return bool(self.config.phase_ranges)

    def bind_material(self, family: dict) -> None:
        """A family operator takes the phases of the fine solver's ``family`` config (RVE keys
        ``law``, ``matrix``, ``fibre``) as its inputs and E_m as its stress unit; one of one
        material has nothing to take."""
        if not self.takes_material:
            return
        m = TwoPhaseMaterial.from_config(family)
        self.bound = {"law": m.law, "matrix": astuple(m.matrix), "fibre": astuple(m.fibre)}
        self.stress_unit = m.matrix.E

    def material_arrays(self, count: int) -> dict[str, np.ndarray]:
        """The bound phases (:data:`~neuroscale_couple.phases.PHASE_ARRAYS`, (count,)) of a
        family operator; none for one of one material."""
        if not self.takes_material:
            return {}
        if self.bound is None:
            raise InputError("this family operator takes the phases as inputs: bind the run's "
                             "material first (Coupler(..., family=fine config), or "
                             "model.bind_material({'matrix': {E, nu}, 'fibre': {E, nu}}))")
        b = self.bound
        return material_arrays(TwoPhaseMaterial(b["law"], Phase(*b["matrix"]),
                                                Phase(*b["fibre"])), count)

    def check_family(self, family: dict) -> None:
        """Raise :class:`InputError` if the model was trained for another law than the fine
        solver's ``family`` config (keys ``law``, ``matrix``, ``fibre`` as in the RVE config)
        or for other phases; a family operator raises :class:`MaterialOutsideError` for phases
        outside its ``phase_ranges``."""
        c = self.config
        if family.get("law", c.law) != c.law:
            raise InputError(f"the model was trained for law={c.law!r} but the fine solver uses "
                             f"law={family['law']!r}: use a model trained for this material")
        if self.takes_material:
            drawn = PhaseRanges.from_config(family)
            if drawn is not None:  # data whose cells draw their phases (a family's again)
                for key, (lo, hi) in drawn.descriptor_ranges().items():
                    trained = c.phase_ranges[key]
                    if not (in_range(lo, trained) and in_range(hi, trained)):
                        raise InputError(
                            f"the data's {key} range [{lo:.4g}, {hi:.4g}] leaves the family "
                            f"model's trained [{trained[0]:.4g}, {trained[1]:.4g}]: fine-tune "
                            "on data inside its ranges, or train a family model on the wider "
                            "ranges")
                return
            reason = outside_reason(TwoPhaseMaterial.from_config(family), c.phase_ranges)
            if reason is not None:
                ranges = ", ".join(f"{k} [{lo:.4g}, {hi:.4g}]"
                                   for k, (lo, hi) in c.phase_ranges.items())
                raise MaterialOutsideError(
                    f"the fine solver's phases lie outside the family model's phase ranges "
                    f"({reason}; trained: {ranges}, any matrix E): use a model trained for "
                    "these phases, or run anyway with the policy's outside_material: fallback "
                    "(the examples' --outside-material fallback: points fall back to the fine "
                    "solver until the bound is calibrated at these phases)")
            return
        for name in ("matrix", "fibre"):
            if name in family:
                phase = Phase.from_config(family[name], name)
                if not np.allclose((phase.E, phase.nu), getattr(c, name), rtol=1e-9):
                    raise InputError(
                        f"the model was trained for {name} (E, nu) = {tuple(getattr(c, name))} "
                        f"but the fine solver's {name} is ({phase.E}, {phase.nu}): the model "
                        "and the microstructure family do not match; train a model for these "
                        "phases")

    def adopt_material(self, family: dict) -> dict | None:
        """A model of one material takes the phases (E, ν) of the ``family`` config (same law)
        as its own, for fine-tuning on their data: the encoder then sees the new phases'
        moduli, and a coupled run of that material accepts the model. Returns the phases it
        learnt before (``matrix``, ``fibre`` → [E, ν]) or None if they are the same. A family
        operator does not change (:meth:`check_family`)."""
        if self.takes_material:
            return super().adopt_material(family)
        c, m = self.config, TwoPhaseMaterial.from_config(family)
        if m.law != c.law:
            raise InputError(f"the model was trained for law={c.law!r}, the data use "
                             f"law={m.law!r}: fine-tuning changes phases, not the law; train "
                             "a model from scratch")
        new = {"matrix": astuple(m.matrix), "fibre": astuple(m.fibre)}
        if all(np.allclose(v, getattr(c, k), rtol=1e-9) for k, v in new.items()):
            return None
        self.config = replace(c, **new)
        return {k: list(getattr(c, k)) for k in new}

    @property
    def scale_weights(self) -> torch.Tensor:
        """Learned weights of the S scales (finest detail first, approximation last)."""
        return self.mixer.weights.detach()

    # ------------------------------------------------------------------ fine-graining
    def decode(self, images: torch.Tensor, z: torch.Tensor, h: torch.Tensor, F: torch.Tensor,
               noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Micro fields for F̄ (B, 2, 2): ``w`` (B, 2, n, n), ``F`` and ``P`` (B, n, n, 2, 2)
        (2D operators; a 3D one raises :class:`InputError`)."""
        if self.decoder is None:
            raise InputError("a 3D operator has no fine-graining decoder: take micro fields of "
                             "3D cells from the fine solver (the RVE)")
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
