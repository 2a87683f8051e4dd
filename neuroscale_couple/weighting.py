"""How the loss terms of a batch add up (training config key ``weighting``).

- ``fixed`` (default): L = Σ_k w_k L_k with the configured weights w_k (``training.weights``).
- ``uncertainty``: homoscedastic-uncertainty weights (Kendall, Gal & Cipolla 2018): each data
  and physics term k of weight w_k > 0 (:data:`BALANCED_TERMS`) gets a learned log-variance s_k,

      L = Σ_k [exp(−s_k) w_k L_k + s_k] + Σ_other w_j L_j,

  twice Kendall's ½ exp(−s)L + ½ s, so that at s = 0 (the start) it is the fixed loss. For a
  term of size L_k the optimum is exp(s_k) = w_k L_k: each term's weight follows the inverse
  of its size, and w_k only sets where the balance starts. The likelihood and regulariser
  terms (``nll``, ``noise``, ``kl``) keep their fixed weights: ``nll`` is already a likelihood
  and may be negative, where exp(−s)L would have no minimum.

The log-variances train with the model (the same optimiser) and are saved with it: in its card
(``loss_weighting``), from which a later training (fine-tuning, online retraining) starts.
"""

from __future__ import annotations

import torch
from torch import nn

from neuroscale_couple.errors import InputError

WEIGHTINGS = ("fixed", "uncertainty")
"""The allowed values of the training config key ``weighting``."""

BALANCED_TERMS = ("stress", "tangent", "fields", "equilibrium", "consistency", "hill_mandel",
                  "symmetry")
"""The data and physics terms that ``uncertainty`` weighting balances."""

CARD_KEY = "loss_weighting"
"""The model card entry of the learned log-variances (term → s_k)."""


def check_weighting(kind: str) -> None:
    """Raise :class:`InputError` unless ``kind`` is one of :data:`WEIGHTINGS`."""
    if kind not in WEIGHTINGS:
        raise InputError(f"weighting={kind!r} in the training config is unknown: use one of "
                         f"{', '.join(WEIGHTINGS)}")


class LossWeighting(nn.Module):
    """The total loss of a batch's terms (see the module docstring): ``kind`` of
    :data:`WEIGHTINGS`, fixed ``weights`` (term → w_k), and log-variances to start from
    (term → s_k, e.g. a model card's; absent: 0)."""

    def __init__(self, kind: str, weights: dict[str, float],
                 log_variances: dict[str, float] | None = None) -> None:
        super().__init__()
        check_weighting(kind)
        self.kind, self.weights = kind, dict(weights)
        start = log_variances or {}
        balanced = [k for k in BALANCED_TERMS if weights.get(k, 0.0) > 0] \
            if kind == "uncertainty" else []
        self.log_variances = nn.ParameterDict({
            k: nn.Parameter(torch.tensor(float(start.get(k, 0.0)))) for k in balanced})

    def forward(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """L of the loss terms (name → scalar)."""
        if not self.log_variances:
            return sum(self.weights[k] * v for k, v in terms.items())
        total = 0.0
        for k, v in terms.items():
            s = self.log_variances[k].to(v.dtype) if k in self.log_variances else None
            total = total + (self.weights[k] * v if s is None
                             else torch.exp(-s) * self.weights[k] * v + s)
        return total

    def values(self) -> dict[str, float]:
        """The log-variances s_k (term → float; empty for ``fixed``)."""
        return {k: float(v.detach()) for k, v in self.log_variances.items()}

    def record(self, card: dict) -> None:
        """Write the log-variances into a model ``card`` (:data:`CARD_KEY`); a ``fixed``
        weighting leaves the card as it is."""
        if self.log_variances:
            card[CARD_KEY] = self.values()
