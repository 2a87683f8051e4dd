"""Scale-adaptive cross-scale attention.

Each scale s of the wavelet decomposition is a set of tokens T_s (B, N_s, d). Every scale has its
own query/key/value projections; with ``cross=True`` the queries of scale s attend to the keys and
values of *all* scales (cross-scale attention), with ``cross=False`` only to its own (the ablation).
:class:`ScaleMixer` pools each scale to one vector and combines them with learnable scale weights
softmax(α), which can be read out (:attr:`ScaleMixer.weights`) and plotted.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class CrossScaleAttention(nn.Module):
    """One pre-norm transformer block over S scales with scale-specific Q/K/V projections."""

    def __init__(self, n_scales: int, dim: int, heads: int, cross: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} must be divisible by heads={heads}")
        self.heads, self.cross = heads, cross
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_scales))
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(n_scales))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_scales))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                          nn.Linear(2 * dim, dim)) for _ in range(n_scales))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, N, D = t.shape
        return t.view(B, N, self.heads, D // self.heads).transpose(1, 2)

    def _project(self, tokens: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Per scale s: its queries (B, heads, N_s, d/heads) and the keys and values it
        attends to (all scales' with ``cross``, else its own)."""
        q, k, v = [], [], []
        for s, t in enumerate(tokens):
            qs, ks, vs = self.qkv[s](self.norm[s](t)).chunk(3, dim=-1)
            q.append(self._split(qs))
            k.append(self._split(ks))
            v.append(self._split(vs))
        if self.cross:
            keys, values = torch.cat(k, dim=2), torch.cat(v, dim=2)
            return [(qs, keys, values) for qs in q]
        return list(zip(q, k, v, strict=True))

    def attention_weights(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """The attention weights of each query scale s, (B, heads, N_s, N_keys), rows summing
        to one; the keys are all scales' tokens in order with ``cross``, else scale s's."""
        return [torch.softmax(qs @ ks.transpose(-1, -2) / qs.shape[-1] ** 0.5, dim=-1)
                for qs, ks, _ in self._project(tokens)]

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """tokens: list of S tensors (B, N_s, d) → the same shapes."""
        out = []
        for s, (t, (qs, ks, vs)) in enumerate(zip(tokens, self._project(tokens), strict=True)):
            a = F.scaled_dot_product_attention(qs, ks, vs)
            a = a.transpose(1, 2).reshape(t.shape)
            t = t + self.out[s](a)
            out.append(t + self.mlp[s](t))
        return out


class ScaleMixer(nn.Module):
    """Mean-pool each scale and combine: z = Σ_s softmax(α)_s · pool(T_s)."""

    def __init__(self, n_scales: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_scales))

    @property
    def weights(self) -> torch.Tensor:
        """The learned scale weights (S,), summing to one."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        pooled = torch.stack([t.mean(dim=1) for t in tokens], dim=1)  # (B, S, d)
        return torch.einsum("s,bsd->bd", self.weights, pooled)
