"""Exactly invertible multiscale decomposition of periodic fields: the orthonormal 2D Haar DWT.

Conventions. Fields are tensors (B, C, n, n) on a periodic grid, row index = y, column = x. One
Haar level groups the pixels in disjoint 2×2 blocks, so it needs no boundary treatment and is
exactly periodic: with a = x[2i, 2j], b = x[2i, 2j+1], c = x[2i+1, 2j], d = x[2i+1, 2j+1],

    approx     = (a + b + c + d) / 2
    horizontal = (a + b - c - d) / 2   (difference along y: responds to horizontal edges)
    vertical   = (a - b + c - d) / 2   (difference along x: responds to vertical edges)
    diagonal   = (a - b - c + d) / 2

The 4×4 matrix of this map is orthogonal, so the transform preserves the sum of squares (Parseval)
and its inverse is its transpose. A translation by 2^L pixels commutes with L levels.
"""

from __future__ import annotations

import torch
from torch import nn

from neuroscale_couple.errors import InputError

BANDS = ("horizontal", "vertical", "diagonal")
"""Order of the three detail bands along the band axis of :func:`haar_dwt2`."""


def haar_dwt2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of the orthonormal 2D Haar transform on a periodic grid.

    Parameters
    ----------
    x : Tensor (..., n, m), n and m even (normally (B, C, n, n)).

    Returns
    -------
    approx : Tensor (..., n/2, m/2)
    details : Tensor (..., 3, n/2, m/2), bands in the order of :data:`BANDS`
        (horizontal, vertical, diagonal).
    """
    if x.ndim < 2 or x.shape[-2] % 2 or x.shape[-1] % 2:
        raise InputError(
            f"haar_dwt2 got a tensor of shape {tuple(x.shape)}: the last two (spatial) axes must "
            "both have even size; crop or resample the field to an even grid"
        )
    # Rows first, then columns: row sums (a + c, b + d) and row differences (a - c, b - d),
    # interleaved along x. Twice as fast as combining the four strided quarter views directly.
    sums, diffs = x[..., 0::2, :] + x[..., 1::2, :], x[..., 0::2, :] - x[..., 1::2, :]
    s0, s1, d0, d1 = sums[..., 0::2], sums[..., 1::2], diffs[..., 0::2], diffs[..., 1::2]
    return (s0 + s1) / 2, torch.stack([d0 + d1, s0 - s1, d0 - d1], dim=-3) / 2


def haar_idwt2(approx: torch.Tensor, details: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`haar_dwt2`: (..., n, m) and (..., 3, n, m) → (..., 2n, 2m)."""
    if details.shape != (*approx.shape[:-2], 3, *approx.shape[-2:]):
        raise InputError(
            f"haar_idwt2 got approx of shape {tuple(approx.shape)} and details of shape "
            f"{tuple(details.shape)}: details must have shape (..., 3, n, m) for approx "
            "(..., n, m), as returned by haar_dwt2"
        )
    h, v, g = details.unbind(dim=-3)
    a = (approx + h + v + g) / 2
    b = (approx + h - v - g) / 2
    c = (approx - h + v - g) / 2
    d = (approx - h - v + g) / 2
    # (..., n, 2, m, 2): row parity before the column axis, column parity last.
    blocks = torch.stack([torch.stack([a, b], dim=-1), torch.stack([c, d], dim=-1)], dim=-3)
    n, m = approx.shape[-2:]
    return blocks.reshape(*approx.shape[:-2], 2 * n, 2 * m)


def scale_sizes(n: int, levels: int) -> list[int]:
    """Spatial size of each of the ``levels + 1`` scales of :class:`WaveletDecomposition`.

    Returns ``[n/2, n/4, ..., n/2^levels, n/2^levels]``: the detail bands of levels 1..levels,
    then the final approximation.
    """
    _check_levels(levels)
    if n <= 0 or n % 2**levels:
        raise InputError(
            f"grid size n={n} is not a positive multiple of 2^levels = {2**levels} "
            f"(levels={levels}): choose n divisible by {2**levels} or fewer levels"
        )
    return [n // 2**j for j in range(1, levels + 1)] + [n // 2**levels]


def _check_levels(levels: int) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
        raise InputError(f"levels={levels!r}: give a non-negative integer number of Haar levels")


class WaveletDecomposition(nn.Module):
    """Split a periodic field into ``levels + 1`` scales with the Haar DWT, exactly invertibly.

    ``forward(x)`` with x (B, C, n, n) returns S = levels + 1 tensors, finest first:

    - for j = 1..levels, the details of level j as (B, 3C, n/2^j, n/2^j), the bands folded into
      the channels channel-major: channel 3c + k is band k (:data:`BANDS`) of input channel c;
    - the final approximation (B, C, n/2^levels, n/2^levels).

    ``inverse(scales)`` reconstructs x up to round-off. The module has no parameters.
    """

    def __init__(self, levels: int) -> None:
        super().__init__()
        _check_levels(levels)
        self.levels = levels

    def extra_repr(self) -> str:
        return f"levels={self.levels}"

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C, n, n) → list of S = levels + 1 scale tensors (see the class docstring)."""
        factor = 2**self.levels
        if x.ndim != 4 or x.shape[-2] % factor or x.shape[-1] % factor:
            raise InputError(
                f"WaveletDecomposition(levels={self.levels}) got a tensor of shape "
                f"{tuple(x.shape)}: give a 4-D batch (B, C, n, n) with n divisible by "
                f"2^levels = {factor}; pad or resample the grid, or use fewer levels"
            )
        scales = []
        approx = x
        for _ in range(self.levels):
            approx, details = haar_dwt2(approx)
            scales.append(details.flatten(1, 2))
        scales.append(approx)
        return scales

    def inverse(self, scales: list[torch.Tensor]) -> torch.Tensor:
        """Reconstruct x (B, C, n, n) from the output of :meth:`forward`."""
        if len(scales) != self.levels + 1:
            raise InputError(
                f"WaveletDecomposition(levels={self.levels}).inverse got {len(scales)} scales: "
                f"pass the list of {self.levels + 1} tensors returned by forward"
            )
        approx = scales[-1]
        for details in reversed(scales[:-1]):
            if details.ndim != 4 or details.shape[1] % 3:
                raise InputError(
                    f"detail scale of shape {tuple(details.shape)}: expected (B, 3C, m, m), three "
                    "bands per input channel, as returned by forward"
                )
            approx = haar_idwt2(approx, details.unflatten(1, (details.shape[1] // 3, 3)))
        return approx
