"""How the loss terms of a batch add up (training config key ``weighting``).

- ``fixed`` (default): L = Σ_k w_k L_k with the configured weights w_k (``training.weights``).
- ``uncertainty``: homoscedastic-uncertainty weights (Kendall, Gal & Cipolla 2018): each data
  and physics term k of weight w_k > 0 (:data:`BALANCED_TERMS`) gets a learned log-variance s_k,

      L = Σ_k [exp(−s_k) w_k L_k + s_k] + Σ_other w_j L_j,

  twice Kendall's ½ exp(−s)L + ½ s, so that at s = 0 (the start) it is the fixed loss. For a
  term of size L_k the optimum is exp(s_k) = w_k L_k: each term's weight follows the inverse
  of its size, and w_k only sets where the balance starts.
- ``gradnorm``: gradient-norm balancing (Chen et al. 2018, GradNorm) of the same terms: learned
  weights w_k(t) > 0, starting at the configured w_k (at t = 0 the fixed loss), in
  L = Σ_k w_k(t) L_k + Σ_other w_j L_j. Once per step, with G_k = ‖∇_W w_k L_k‖ the gradient
  norm of each term over the shared layer W (the operator's last layer before the heads, the
  final linear map to the latent z; the energy head's output layer where online retraining
  freezes the encoder: :meth:`~neuroscale_couple.operators.base.CoarseGrainingOperator.
  shared_parameters`), the weights (and only they) descend

      L_grad = Σ_k |G_k − Ḡ · r_k^α|,    r_k = (L_k(t)/L_k(0)) / mean_j (L_j(t)/L_j(0)),

  the target Ḡ r_k^α (Ḡ = mean_k G_k) held constant, and are renormalised after each step to
  Σ_k w_k(t) = Σ_k w_k (the configured sum; each at least :data:`MIN_SHARE` of it). A term
  with a larger gradient is weighted down, one that trains slower (larger r_k) up; α
  (``training.gradnorm_alpha``, default 1.5 as in the paper, ≥ 0) sets how hard. The model's
  gradient is that of L with the w_k(t) held fixed. L_k(0) is a term's size at the first step
  of this training. Cost: one autograd.grad per balanced term w.r.t. W, once per step.

The likelihood and regulariser terms (``nll``, ``noise``, ``kl``) keep their fixed weights in
both learned weightings: ``nll`` is already a likelihood and may be negative, where exp(−s)L
would have no minimum and L_k(t)/L_k(0) no meaning.

The learned values train with the model (the same optimiser; the GradNorm weights on the
gradient of L_grad) and are saved with it: in its card (:data:`CARD_KEYS`: ``loss_weighting``
the log-variances, ``gradnorm_weights`` the weights), from which a later training (fine-tuning,
online retraining) starts. Under MPI their gradients are all-reduced as the model's, and the
GradNorm statistics (terms, gradients over W) are summed over the ranks first: every rank
holds one set.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from neuroscale_couple.errors import InputError

WEIGHTINGS = ("fixed", "uncertainty", "gradnorm")
"""The allowed values of the training config key ``weighting``."""

BALANCED_TERMS = ("stress", "tangent", "fields", "equilibrium", "consistency", "hill_mandel",
                  "symmetry")
"""The data and physics terms that ``uncertainty`` and ``gradnorm`` weighting balance."""

CARD_KEY = "loss_weighting"
"""The model card entry of the learned log-variances (term → s_k)."""

GRADNORM_CARD_KEY = "gradnorm_weights"
"""The model card entry of the learned GradNorm weights (term → w_k)."""

CARD_KEYS = {"uncertainty": CARD_KEY, "gradnorm": GRADNORM_CARD_KEY}
"""The model card entry of each learned weighting."""

MIN_SHARE = 1e-3
"""The least share of the configured sum a GradNorm weight keeps (the weights stay positive)."""


def check_weighting(kind: str) -> None:
    """Raise :class:`InputError` unless ``kind`` is one of :data:`WEIGHTINGS`."""
    if kind not in WEIGHTINGS:
        raise InputError(f"weighting={kind!r} in the training config is unknown: use one of "
                         f"{', '.join(WEIGHTINGS)}")


def check_gradnorm_alpha(alpha: object) -> None:
    """Raise :class:`InputError` unless ``alpha`` is a finite number ≥ 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (
            math.isfinite(alpha) and alpha >= 0):
        raise InputError(f"gradnorm_alpha={alpha!r} in the training config: give a number ≥ 0 "
                         "(1.5, as in GradNorm; 0 balances the gradient norms alone, larger "
                         "values pull harder on the terms that train slower)")


class LossWeighting(nn.Module):
    """The total loss of a batch's terms (see the module docstring): ``kind`` of
    :data:`WEIGHTINGS`, fixed ``weights`` (term → w_k), learned values to start from
    (``learned``, e.g. a model card's: term → s_k for ``uncertainty``, absent 0; term → w_k
    for ``gradnorm``, absent the configured w_k, renormalised to the configured sum) and
    GradNorm's ``alpha``."""

    def __init__(self, kind: str, weights: dict[str, float],
                 learned: dict[str, float] | None = None, alpha: float = 1.5) -> None:
        super().__init__()
        check_weighting(kind)
        check_gradnorm_alpha(alpha)
        self.kind, self.weights, self.alpha = kind, dict(weights), float(alpha)
        start = learned or {}
        balanced = [k for k in BALANCED_TERMS if weights.get(k, 0.0) > 0] \
            if kind != "fixed" else []
        self.log_variances = nn.ParameterDict({
            k: nn.Parameter(torch.tensor(float(start.get(k, 0.0))))
            for k in balanced if kind == "uncertainty"})
        self.balanced = tuple(balanced) if kind == "gradnorm" else ()
        self.total = sum(self.weights[k] for k in self.balanced)
        w = torch.tensor([float(start.get(k, self.weights[k])) for k in self.balanced])
        self.term_weights = nn.Parameter(w) if self.balanced else None
        # L_k(0): each term at the first step it took part in (NaN: not yet)
        self.register_buffer("initial_losses", torch.full((len(self.balanced),), math.nan)
                             if self.balanced else None)
        if self.balanced:
            self.renormalise()

    def forward(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """L of the loss terms (name → scalar)."""
        if not self.log_variances and not self.balanced:
            return sum(self.weights[k] * v for k, v in terms.items())
        total = 0.0
        for k, v in terms.items():
            if k in self.log_variances:
                s = self.log_variances[k].to(v.dtype)
                total = total + torch.exp(-s) * self.weights[k] * v + s
            elif k in self.balanced:  # held fixed for the model: L_grad trains the weights
                w = self.term_weights[self.balanced.index(k)].detach().to(v.dtype)
                total = total + w * v
            else:
                total = total + self.weights[k] * v
        return total

    def values(self) -> dict[str, float]:
        """The learned values: log-variances s_k (``uncertainty``), weights w_k
        (``gradnorm``), term → float; empty for ``fixed``."""
        if self.balanced:
            return dict(zip(self.balanced, self.term_weights.detach().tolist(), strict=True))
        return {k: float(v.detach()) for k, v in self.log_variances.items()}

    def record(self, card: dict) -> None:
        """Write the learned values into a model ``card`` (:data:`CARD_KEYS`); a ``fixed``
        weighting leaves the card as it is."""
        if self.kind in CARD_KEYS and self.values():
            card[CARD_KEYS[self.kind]] = self.values()

    # ------------------------------------------------------------------ GradNorm
    def statistics(self, terms: dict[str, torch.Tensor] | None,
                   shared: list[torch.Tensor], scale: float = 1.0) -> torch.Tensor | None:
        """GradNorm's statistics of a (shard of a) batch, to be summed over the ranks: per
        balanced term, ``scale``·L_k and ``scale``·∇_W L_k over the ``shared`` parameters W,
        flat (K + K·|W|,) (zeros for a term absent from ``terms``, or for ``terms`` None: a rank
        without samples). Call it before the loss's backward (it keeps the graph). None unless
        ``gradnorm``."""
        if not self.balanced:
            return None
        size = sum(p.numel() for p in shared)
        dtype = shared[0].dtype
        values = torch.zeros(len(self.balanced), dtype=dtype, device=shared[0].device)
        grads = torch.zeros(len(self.balanced), size, dtype=dtype, device=shared[0].device)
        for i, k in enumerate(self.balanced):
            if terms is None or k not in terms:
                continue
            g = torch.autograd.grad(terms[k], shared, retain_graph=True, allow_unused=True)
            values[i] = scale * terms[k].detach()
            grads[i] = scale * torch.cat([torch.zeros(p.numel(), dtype=dtype, device=p.device)
                                          if gi is None else gi.reshape(-1)
                                          for p, gi in zip(shared, g, strict=True)])
        return torch.cat([values, grads.reshape(-1)])

    def balance(self, stats: torch.Tensor | None,
                reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Set the weights' gradient to that of L_grad (module docstring) from the batch's
        :meth:`statistics`, summed first by ``reduce`` (in place; an all-reduce over the ranks,
        None on one process). Terms without a loss or gradient this step are left out. Then
        step the optimiser and :meth:`renormalise`. Does nothing unless ``gradnorm``."""
        if not self.balanced:
            return
        if reduce is not None:
            reduce(stats)
        K, w = len(self.balanced), self.term_weights
        losses = stats[:K].to(w)
        norms = torch.linalg.vector_norm(stats[K:].reshape(K, -1), dim=1).to(w)
        active = (losses > 0) & (norms > 0) & torch.isfinite(losses) & torch.isfinite(norms)
        with torch.no_grad():
            start = active & torch.isnan(self.initial_losses)
            self.initial_losses[start] = losses[start]
        grad = torch.zeros_like(w)
        if active.any():
            a = active
            G = w.detach()[a] * norms[a]
            ratio = losses[a] / self.initial_losses[a]
            target = G.mean() * (ratio / ratio.mean()) ** self.alpha
            grad[a] = torch.sign(G - target) * norms[a]  # ∂ Σ|w_k n_k − target_k| / ∂w_k
        w.grad = grad

    @torch.no_grad()
    def renormalise(self) -> None:
        """Keep the GradNorm weights positive (each ≥ :data:`MIN_SHARE` of the sum) and their
        sum that of the configured weights. Nothing unless ``gradnorm``."""
        if not self.balanced:
            return
        w = self.term_weights
        w.clamp_(min=MIN_SHARE * self.total)
        w.mul_(self.total / w.sum())
