"""Where the operator's epistemic uncertainty comes from (model config key ``uncertainty``).

- ``ensemble`` (default): M independently initialised members (``members``), each its own
  weights (:class:`~neuroscale_couple.operators.heads.EnsembleLinear`).
- ``mc_dropout``: one set of head weights; dropout (rate ``dropout``) after every hidden
  activation of the heads, kept active at prediction (Gal & Ghahramani 2016).
- ``variational``: Bayes by backprop (Blundell et al. 2015): every head weight and bias is a
  Gaussian N(μ, σ²) with a N(0, :data:`PRIOR_SIGMA`²) prior; training adds the KL divergence to
  the prior (loss term ``kl``, weight ``training.weights.kl``, divided by the training samples).

A draw (a dropout mask, a weight sample) is one function W̄(z, C̄): it is shared by every point
of a batch, so that P̄ = ∂W̄/∂F̄ and A = ∂P̄/∂F̄ of a draw are consistent and a point's answer does
not depend on the others in its batch. Training takes ``members`` draws per step from the global
random generator; prediction (eval mode) ``samples`` draws from a generator seeded with
:attr:`Epistemic.seed`, anew at each call, so that the operator is one deterministic function
(what a Newton solve needs). The samples' mean and spread give P̄ and the epistemic covariance
exactly as the members of an ensemble do; the heads' aleatoric Σ is added as for an ensemble.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from neuroscale_couple.config import whole_number
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.heads import ensemble_mlp

UNCERTAINTIES = ("ensemble", "mc_dropout", "variational")
"""The allowed values of the model config key ``uncertainty``."""

PRIOR_SIGMA = 1.0
"""Standard deviation of the variational heads' Gaussian prior on every weight and bias (the
heads' weights start at |w| ≤ 1/√fan-in ≤ 0.2)."""

POSTERIOR_SIGMA = 1e-3
"""Initial standard deviation of the variational posterior of every weight and bias."""


@dataclass(frozen=True)
class Epistemic:
    """The operator's epistemic model: ``kind`` (one of :data:`UNCERTAINTIES`), ``samples``
    (draws at prediction; Bayesian kinds), ``dropout`` (rate; ``mc_dropout``) and ``seed`` of
    the prediction draws."""

    kind: str = "ensemble"
    samples: int = 16
    dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in UNCERTAINTIES:
            raise InputError(f"uncertainty={self.kind!r} in the model config is unknown: use "
                             f"one of {', '.join(UNCERTAINTIES)}")
        whole_number(self.samples, "samples", 2)
        if not 0.0 < self.dropout < 1.0:
            raise InputError(f"dropout={self.dropout!r} in the model config: give a rate in "
                             "(0, 1), e.g. 0.1")

    @property
    def bayesian(self) -> bool:
        """Whether the draws are random functions of one model (MC dropout, variational), not
        the members of an ensemble."""
        return self.kind != "ensemble"

    def mlp(self) -> Callable[..., nn.Sequential]:
        """The heads' MLP builder, with :func:`~.heads.ensemble_mlp`'s arguments ``(members,
        n_in, hidden, n_out, depth)``: the ensemble's itself, or one of shared stochastic
        layers (``members`` then unused: the draws are made at each call)."""
        if self.kind == "mc_dropout":
            return functools.partial(ensemble_mlp, linear=SharedLinear,
                                     after_activation=functools.partial(MCDropout, self.dropout))
        if self.kind == "variational":
            return functools.partial(ensemble_mlp, linear=VariationalLinear)
        return ensemble_mlp

    def draws(self, members: int, training: bool) -> int:
        """Draws of the heads per call: the ensemble's members; a Bayesian model's ``members``
        in training, ``samples`` at prediction."""
        return self.samples if self.bayesian and not training else members

    def sampling(self, heads: nn.Module, training: bool) -> contextlib.AbstractContextManager:
        """Context in which ``heads`` draw: at prediction from a generator seeded with
        :attr:`seed` (the same draws at every call), in training (or for an ensemble, which
        draws nothing) from the global generator."""
        if not self.bayesian or training:
            return contextlib.nullcontext()
        return _seeded(heads, self.seed)


ENSEMBLE = Epistemic()
"""The default: an ensemble of the config's ``members``."""


@dataclass(frozen=True, kw_only=True)
class EpistemicConfig:
    """The model config keys of :class:`Epistemic` (a base of the operators' configs):
    ``uncertainty`` (one of :data:`UNCERTAINTIES`), ``samples``, ``dropout``."""

    uncertainty: str = ENSEMBLE.kind
    samples: int = ENSEMBLE.samples
    dropout: float = ENSEMBLE.dropout

    def __post_init__(self) -> None:
        self.epistemic  # noqa: B018 — refuses unknown or out-of-range values

    @property
    def epistemic(self) -> Epistemic:
        """The heads' epistemic model."""
        return Epistemic(self.uncertainty, self.samples, self.dropout)


class _Stochastic(nn.Module):
    """A layer that draws noise, one draw per entry of its inputs' leading (draw) axis, from
    :attr:`generator` (None: the global generator)."""

    generator: torch.Generator | None = None

    def noise(self, shape: tuple[int, ...], like: torch.Tensor, kind: str = "normal"
              ) -> torch.Tensor:
        """Standard normal (or uniform on [0, 1)) noise of ``shape`` in the dtype and on the
        device of ``like``."""
        draw = torch.randn if kind == "normal" else torch.rand
        return draw(shape, generator=self.generator, dtype=like.dtype, device=like.device)


@contextlib.contextmanager
def _seeded(module: nn.Module, seed: int) -> Iterator[None]:
    """Let every stochastic layer of ``module`` draw from one generator seeded with ``seed``."""
    layers = [m for m in module.modules() if isinstance(m, _Stochastic)]
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for layer in layers:
        layer.generator = generator
    try:
        yield
    finally:
        for layer in layers:
            layer.generator = None


class SharedLinear(nn.Module):
    """One affine map applied to every draw: (S, B, in) → (S, B, out); weights (1, in, out)
    initialised as an :class:`~.heads.EnsembleLinear` member's."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)
        self.weight = nn.Parameter(torch.empty(1, n_in, n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(1, 1, n_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class MCDropout(_Stochastic):
    """Dropout of rate ``rate`` with one mask per draw (S, 1, n), shared by the batch, active
    in training and at prediction (inverted: kept units scaled by 1/(1 − rate))."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.noise((x.shape[0], *(1,) * (x.ndim - 2), x.shape[-1]), x, "uniform")
        return x * (keep >= self.rate).to(x.dtype) / (1.0 - self.rate)


class VariationalLinear(_Stochastic):
    """An affine map with Gaussian weights and bias N(μ, σ²), σ = softplus(ρ): one weight
    sample (S, in, out) per draw, (S, B, in) → (S, B, out) (reparametrised: gradients reach
    μ and ρ)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)
        rho = math.log(math.expm1(POSTERIOR_SIGMA))
        self.weight = nn.Parameter(torch.empty(1, n_in, n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(1, 1, n_out).uniform_(-bound, bound))
        self.weight_rho = nn.Parameter(torch.full((1, n_in, n_out), rho))
        self.bias_rho = nn.Parameter(torch.full((1, 1, n_out), rho))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = x.shape[0]
        w = self.weight + nn.functional.softplus(self.weight_rho) * self.noise(
            (S, *self.weight.shape[1:]), x)
        b = self.bias + nn.functional.softplus(self.bias_rho) * self.noise(
            (S, *self.bias.shape[1:]), x)
        return torch.baddbmm(b, x, w)

    def kl(self) -> torch.Tensor:
        """KL(q ‖ p) of the weights and bias to the N(0, :data:`PRIOR_SIGMA`²) prior (scalar):
        Σ log(σ_p/σ) + (σ² + μ²)/(2σ_p²) − ½."""
        total = self.weight.new_zeros(())
        for mu, rho in ((self.weight, self.weight_rho), (self.bias, self.bias_rho)):
            sigma = nn.functional.softplus(rho)
            total = total + (math.log(PRIOR_SIGMA) - torch.log(sigma)
                             + (sigma**2 + mu**2) / (2 * PRIOR_SIGMA**2) - 0.5).sum()
        return total


def variational_layers(model: nn.Module) -> list[VariationalLinear]:
    """The variational layers of ``model`` (none but in ``variational`` heads)."""
    return [m for m in model.modules() if isinstance(m, VariationalLinear)]


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """Σ KL(q ‖ p) over the variational layers of ``model`` (scalar; 0 without any)."""
    parts = [m.kl() for m in variational_layers(model)]
    return torch.stack(parts).sum() if parts else torch.zeros(())
