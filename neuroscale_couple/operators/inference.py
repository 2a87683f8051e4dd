"""The operator inside a coupled run: many points, fixed latents, one model version.

Between two retrainings a point's latent z does not change and neither do the weights, so what
depends on z alone is computed once per model version and structure (:class:`Inference`):

- the members' basis-mixture weights w_m(z) (M, K) — of a basis-mixture energy head
  (:attr:`~neuroscale_couple.operators.heads.EnergyHead.closed_form`), stress, tangent and
  energy are then a closed form in (w, F̄) and the energy network never runs per evaluation;
- the latent's part of the covariance head's first layer, b₁ + W₁ᶻ z (M, hidden) — or, of a
  head quadratic in the strain (:class:`~.heads.QuadraticCovarianceHead`), its coefficients
  c(z), whose evaluation is then K multiply-adds per entry of its factor.

Each evaluation then runs the closed form of the mean weights w̄ in float64 (P̄, A, W̄:
exactly consistent, as Newton needs them) and what the error bound needs: the ensemble spread,
which needs no member stresses (the mixture is linear in w, so P_m − P̄ = P(w_m − w̄), and only
its norm ‖P(w_m − w̄)‖² = 4 tr(C̄ G²) is formed), and the trace of the covariance head's Σ (no
factor formed). On the CPU one compiled pass over the points does all of it
(:func:`~neuroscale_couple.operators.kernels.closed_form_2d`, float64), except a covariance
network's pass; elsewhere (a GPU, or no C compiler) torch does it in chunks of points, the
bound's parts in float32, whose round-off (~1e-6 of the bound) is far below the bound's own
calibration error.
A covariance network runs all members in batched GEMMs on :data:`NET_CHUNK` points at a time
(its activations stay in the cache).

Other operators (an energy correction or a residual stress: no closed form; MC dropout or
variational heads, :mod:`~neuroscale_couple.operators.epistemic`) run their
:meth:`~neuroscale_couple.operators.base.CoarseGrainingOperator.predict` chunk by chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from neuroscale_couple.operators import kernels
from neuroscale_couple.operators.heads import (
    DIAG_OFFSET,
    MIN_DIAG,
    EnsembleLinear,
    QuadraticCovarianceHead,
    _directions,
    green_lagrange_mandel,
    mixture_response,
    mixture_stress_norm2,
)

CHUNK = 8192
"""Points per chunk (measured fastest of 2048–32768 on one core: the elementwise closed form
wants long vectors; the covariance network runs :data:`NET_CHUNK` points at a time)."""

NET_CHUNK = 512
"""Points per pass through the covariance network: its activations (M, 512, hidden) float32,
512 KB for the shipped models, stay in a core's L2 cache."""


class Response(NamedTuple):
    """The operator's response at n points, float64 numpy: ``stress`` P̄ (n, d, d), ``tangent``
    A = ∂P̄/∂F̄ (n, d, d, d, d), ``energy`` W̄ (n,) (stress unit), and the traces of the
    aleatoric and epistemic parts of the predicted stress covariance Σ (n,) (stress unit²):
    what the calibrated bound q·s·√tr Σ needs."""

    stress: np.ndarray
    tangent: np.ndarray
    energy: np.ndarray
    trace_aleatoric: np.ndarray
    trace_epistemic: np.ndarray


class Inference:
    """The response of ``model`` at points whose latents are rows of ``z`` (u, latent; float32,
    the encoder's precision, or the model's dtype), for one model version (build a new one
    after retraining); see the module docstring.

    Memory per latent row: M·K float32 weight differences, K float64 mean weights and M·hidden
    float32 first-layer activations (1.5 KB for the shipped composite model) or, of a quadratic
    covariance head, its R·K float32 coefficients (10·10 in 2D).
    ``bound_dtype``: the storage of the error bound's per-latent parts, and the precision of
    the torch path's bound (float64 to check them against the model's own predict).
    ``compiled``: whether a closed-form operator on the CPU runs the compiled kernel (default)
    or the torch path that serves other devices."""

    def __init__(self, model, z: torch.Tensor, *, chunk: int = CHUNK,
                 bound_dtype: torch.dtype = torch.float32, compiled: bool = True) -> None:
        self.model, self.chunk, self.bound_dtype = model, chunk, bound_dtype
        # a Bayesian model's draws are made at each call (its predict): no cached weights
        self.closed = bool(model.energy.closed_form) and not model.epistemic.bayesian
        p = next(model.parameters())
        self.dtype, self.z = p.dtype, z.to(p.device)  # z kept as given (float32: exact)
        self.sigma2 = float(model.stress_scale) ** 2
        if not self.closed:
            return
        self.e_ref = float(model.e_ref)
        self.quadratic = isinstance(model.covariance, QuadraticCovarianceHead)
        self.compiled = (compiled and self.z.device.type == "cpu"
                         and kernels.library() is not None)
        if not self.quadratic:
            net = model.covariance.net
            first = net[0]  # b₁ + W₁ [z, ê]: the latent's part is computed here, once
            latent, M = z.shape[1], len(first.weight)
            self.first_e = first.weight[:, latent:].detach().to(bound_dtype)  # (M, 3, h)
            self.rest = _layers(net[1:], bound_dtype)
        w_mean, w_dev, latent_part = [], [], []
        with torch.no_grad():
            for i in range(0, max(len(z), 1), chunk):  # one (empty) chunk without points
                zc = self.z[i:i + chunk].to(self.dtype)
                w = model._mixture_weights(zc, torch.float64).double()  # (M, b, K)
                w_mean.append(w.mean(0))
                w_dev.append((w - w_mean[-1]).transpose(0, 1).to(bound_dtype))  # (b, M, K)
                latent_part.append(
                    model.covariance.coefficients(zc).to(bound_dtype)  # (b, R, K)
                    if self.quadratic else
                    torch.baddbmm(first.bias, zc.unsqueeze(0).expand(M, -1, -1),
                                  first.weight[:, :latent]).to(bound_dtype))
        self.w_mean, self.w_dev = torch.cat(w_mean), torch.cat(w_dev).contiguous()
        # the covariance head's part of the latent: its coefficients c(z) (u, R, K), or the
        # network's first-layer activations (M, u, hidden)
        self.latent_part = torch.cat(latent_part, 0 if self.quadratic else 1).contiguous()
        c, s = _directions(model.energy.n_directions, self.w_mean)
        self.directions = tuple(a.numpy() for a in (c * c, s * s, c * s))

    @torch.no_grad()
    def response(self, rows: np.ndarray, F: np.ndarray) -> Response:
        """The response at F̄ (n, d, d) float64 (d: the model's) of the points whose latents are
        ``rows`` (n,) of ``z``."""
        n, d = len(F), F.shape[-1]
        out = Response(np.empty((n, d, d)), np.empty((n, d, d, d, d)), np.empty(n),
                       np.empty(n), np.empty(n))
        if self.closed and self.compiled:
            self._kernel(np.asarray(rows, dtype=np.int64), F, out)
            return out
        part = self._closed if self.closed else self._generic
        for i in range(0, n, self.chunk):
            r = _selection(rows[i:i + self.chunk], self.z.device)
            Fc = torch.as_tensor(F[i:i + self.chunk], device=self.z.device)
            for array, value in zip(out, part(r, Fc), strict=True):
                array[i:i + self.chunk] = value.cpu().numpy()
        return out

    def _kernel(self, rows: np.ndarray, F: np.ndarray, out: Response) -> None:
        """All n points through the compiled kernel (a covariance network's pass aside)."""
        coef = (self.latent_part if self.quadratic
                else self.latent_part.new_empty((len(self.w_mean), 0, 0)))
        kernels.closed_form_2d(F, rows, self.w_mean.numpy(), self.w_dev.numpy(), coef.numpy(),
                               self.directions, self.model.energy.quartic, self.e_ref,
                               DIAG_OFFSET, MIN_DIAG, out)
        if self.quadratic:
            out.trace_aleatoric[:] *= self.sigma2
            return
        for i in range(0, len(F), self.chunk):
            r = _selection(rows[i:i + self.chunk], self.z.device)
            Fc = torch.as_tensor(F[i:i + self.chunk]).to(self.bound_dtype)
            out.trace_aleatoric[i:i + self.chunk] = self._network_aleatoric(r, Fc).numpy()

    def _closed(self, rows: torch.Tensor | slice, F: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One chunk of a basis-mixture operator in torch (see the module docstring)."""
        mean = mixture_response(self.w_mean[rows], F.double(), self.model.energy.n_directions)
        Fb = F.to(self.bound_dtype)
        epi = mixture_stress_norm2(self.w_dev[rows], Fb.unsqueeze(1),
                                   self.model.energy.n_directions).mean(1)
        if self.quadratic:
            alea = self.sigma2 * self.model.covariance.factor_norm2(
                self._quadratic_raw(rows, green_lagrange_mandel(Fb) / self.e_ref))
        else:
            alea = self._network_aleatoric(rows, Fb)
        return mean["stress"], mean["tangent"], mean["energy"], alea, epi

    def _network_aleatoric(self, rows: torch.Tensor | slice, F: torch.Tensor) -> torch.Tensor:
        """The aleatoric trace (n,) of a covariance network at F̄ (n, 2, 2) (``bound_dtype``)."""
        e = green_lagrange_mandel(F) / self.e_ref
        (*hidden, (weight, bias)), M = self.rest, len(self.first_e)
        raw = bias.new_empty((M, len(bias[0]), len(F)))  # outputs along the rows: few of them
        for i in range(0, len(F), NET_CHUNK):  # activations (M, NET_CHUNK, h) stay in the cache
            x = torch.baddbmm(_rows(self.latent_part, _part(rows, i)),
                              e[i:i + NET_CHUNK].expand(M, -1, -1), self.first_e)
            for w, b in hidden:
                x = torch.baddbmm(b, nn.functional.silu(x, inplace=True), w)
            torch.baddbmm(bias, weight, nn.functional.silu(x, inplace=True).transpose(1, 2),
                          out=raw[..., i:i + NET_CHUNK])
        return self.sigma2 * self.model.covariance.factor_norm2(raw, dim=-2).mean(0)

    def _quadratic_raw(self, rows: torch.Tensor | slice, e: torch.Tensor) -> torch.Tensor:
        """The raw entries (n, R) of a quadratic covariance head at n points of Mandel strain
        ê (n, s): Σ_k c_k(z) φ_k(ê)."""
        c = self.latent_part[rows]
        phi = self.model.covariance.strain_features(e).to(c.dtype)  # (n, K); φ₀ = 1
        return (c @ phi.unsqueeze(-1))[..., 0]

    def _generic(self, rows: torch.Tensor | slice, F: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One chunk of any operator, through its ``predict`` in its own dtype."""
        pred = self.model.predict(self.z[rows].to(self.dtype), F.to(self.dtype))
        alea = torch.diagonal(pred["aleatoric"], dim1=-2, dim2=-1).sum(-1)
        total = torch.diagonal(pred["cov"], dim1=-2, dim2=-1).sum(-1)
        return pred["mean"], pred["tangent"], pred["energy"], alea, total - alea


def _layers(layers: nn.Sequential, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """The hidden layers of an ensemble MLP after its first layer — (SiLU, EnsembleLinear)
    pairs — as (weight (M, in, out), bias (M, 1, out)) in ``dtype``."""
    mods = list(layers)
    if len(mods) % 2 or not all(isinstance(a, nn.SiLU) and isinstance(b, EnsembleLinear)
                                for a, b in zip(mods[::2], mods[1::2], strict=True)):
        raise TypeError(f"expected (SiLU, EnsembleLinear) pairs, got {layers}")
    out = [(b.weight.detach().to(dtype), b.bias.detach().to(dtype)) for b in mods[1::2]]
    weight, bias = out[-1]  # the last one transposed, to answer its few outputs along rows
    return [*out[:-1], (weight.transpose(1, 2).contiguous(), bias.transpose(1, 2).contiguous())]


def _rows(t: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """The latent ``rows`` of a per-member array ``t`` (M, u, …): a view for a slice, else
    gathered."""
    return t[:, rows] if isinstance(rows, slice) else t.index_select(1, rows)


def _part(rows: torch.Tensor | slice, start: int) -> torch.Tensor | slice:
    """``rows[start:start + NET_CHUNK]`` of an index or a slice of step 1."""
    if isinstance(rows, slice):
        return slice(rows.start + start, min(rows.start + start + NET_CHUNK, rows.stop))
    return rows[start:start + NET_CHUNK]


def _selection(rows: np.ndarray, device: torch.device) -> torch.Tensor | slice:
    """Latent rows (n,) as an index: a slice where they are consecutive (one structure per
    point, in order: the rows are read in place instead of gathered)."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (
            len(rows) == 1 or np.all(np.diff(rows) == 1)):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return torch.as_tensor(rows, device=device)
