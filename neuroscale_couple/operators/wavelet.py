"""Exactly invertible multiscale decomposition of periodic fields: the orthonormal Haar DWT in
d = 2 or 3 dimensions.

Conventions. Fields are tensors (B, C, n, n) (d = 2) or (B, C, n, n, n) (d = 3) on a periodic
grid; in 2D the row index is y and the column x, in 3D the axes are (z, y, x). One Haar level
groups the pixels (voxels) in disjoint 2^d blocks, so it needs no boundary treatment and is
exactly periodic. In 2D, with a = x[2i, 2j], b = x[2i, 2j+1], c = x[2i+1, 2j], d = x[2i+1, 2j+1],

    approx     = (a + b + c + d) / 2
    horizontal = (a + b - c - d) / 2   (difference along y: responds to horizontal edges)
    vertical   = (a - b + c - d) / 2   (difference along x: responds to vertical edges)
    diagonal   = (a - b - c + d) / 2

and in general each band is a choice of sum or difference along each of the d axes, divided by
2^(d/2): 2^d − 1 detail bands. Band k (k = 1 … 2^d − 1) takes the difference along the spatial
axis a (a = 0 the first, e.g. y in 2D, z in 3D) where bit a of k is set, the sum elsewhere; the
details are stored in the order k = 1, 2, …, so in 2D (horizontal, vertical, diagonal).

The 2^d × 2^d matrix of this map is orthogonal, so the transform preserves the sum of squares
(Parseval) and its inverse is its transpose. A translation by 2^L pixels commutes with L levels.
"""

from __future__ import annotations

import torch
from torch import nn

from neuroscale_couple.errors import InputError

BANDS = ("horizontal", "vertical", "diagonal")
"""Order of the three 2D detail bands along the band axis of :func:`haar_dwt2`."""


def haar_dwt(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of the orthonormal Haar transform over the last ``dim`` axes, periodic grid.

    Parameters
    ----------
    x : Tensor (..., n_1, …, n_dim), every n_a even (normally (B, C, n, n[, n])).
    dim : number of spatial axes, 2 or 3.

    Returns
    -------
    approx : Tensor (..., n_1/2, …, n_dim/2)
    details : Tensor (..., 2^dim − 1, n_1/2, …, n_dim/2), bands in the order of the module
        docstring ((horizontal, vertical, diagonal) in 2D).
    """
    if dim not in (2, 3) or x.ndim < dim or any(n % 2 for n in x.shape[x.ndim - dim:]):
        raise InputError(
            f"haar_dwt(dim={dim}) got a tensor of shape {tuple(x.shape)}: dim must be 2 or 3 "
            f"and the last {dim} (spatial) axes must all have even size; crop or resample the "
            "field to an even grid"
        )
    # Axis by axis (first spatial axis first): sums and differences of the even and odd slices,
    # unnormalised. In 2D: row sums and differences, then their column sums and differences —
    # twice as fast as combining the four strided quarter views directly.
    bands = [x]
    for a in range(dim):
        axis = x.ndim - dim + a
        even, odd = _halves(bands, axis, 0), _halves(bands, axis, 1)
        bands = ([e + o for e, o in zip(even, odd, strict=True)]
                 + [e - o for e, o in zip(even, odd, strict=True)])
    # the sums come first at every step: bit a of a band's position is the difference along
    # axis a, the order of the module docstring
    norm = 2.0 ** (dim / 2)
    return bands[0] / norm, torch.stack(bands[1:], dim=-dim - 1) / norm


def _halves(bands: list[torch.Tensor], axis: int, parity: int) -> list[torch.Tensor]:
    """The even (``parity`` 0) or odd (1) slices along ``axis`` of each tensor (strided
    views, no copy)."""
    index = [slice(None)] * bands[0].ndim
    index[axis] = slice(parity, None, 2)
    return [b[tuple(index)] for b in bands]


def haar_idwt(approx: torch.Tensor, details: torch.Tensor, dim: int) -> torch.Tensor:
    """Exact inverse of :func:`haar_dwt`: (..., m_1, …, m_dim) and (..., 2^dim − 1, m_1, …)
    → (..., 2m_1, …, 2m_dim)."""
    spatial = approx.shape[approx.ndim - dim:]
    if dim not in (2, 3) or details.shape != (*approx.shape[:-dim], 2**dim - 1, *spatial):
        raise InputError(
            f"haar_idwt(dim={dim}) got approx of shape {tuple(approx.shape)} and details of "
            f"shape {tuple(details.shape)}: details must have shape (..., {2**dim - 1}, "
            "m, ...) for approx (..., m, ...), as returned by haar_dwt"
        )
    bands = [approx, *details.unbind(dim=-dim - 1)]
    norm = 2.0 ** (dim / 2)
    # the transform matrix is orthogonal and symmetric: x_p = Σ_k (−1)^{popcount(k & p)} b_k / norm,
    # with p the parity bits of the voxel within its block (bit a: odd along axis a)
    out = approx.new_empty((*approx.shape[:-dim], *(2 * m for m in spatial)))
    for p in range(2**dim):
        value = sum(b if bin(k & p).count("1") % 2 == 0 else -b for k, b in enumerate(bands))
        index = [slice(None)] * (approx.ndim - dim) + [
            slice((p >> a) & 1, None, 2) for a in range(dim)]
        out[tuple(index)] = value / norm
    return out


def haar_dwt2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of the 2D Haar transform (:func:`haar_dwt` with dim 2): x (..., n, m) →
    approx (..., n/2, m/2), details (..., 3, n/2, m/2) in the order of :data:`BANDS`."""
    return haar_dwt(x, 2)


def haar_idwt2(approx: torch.Tensor, details: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`haar_dwt2`: (..., n, m) and (..., 3, n, m) → (..., 2n, 2m)."""
    return haar_idwt(approx, details, 2)


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

    ``forward(x)`` with x (B, C, n, n) (``dim`` 2) or (B, C, n, n, n) (``dim`` 3) returns
    S = levels + 1 tensors, finest first (K = 2^dim − 1 bands: 3 in 2D, 7 in 3D):

    - for j = 1..levels, the details of level j as (B, KC, n/2^j, …), the bands folded into
      the channels channel-major: channel Kc + k is band k (:data:`BANDS` in 2D) of input
      channel c;
    - the final approximation (B, C, n/2^levels, …).

    ``inverse(scales)`` reconstructs x up to round-off. The module has no parameters.
    """

    def __init__(self, levels: int, dim: int = 2) -> None:
        super().__init__()
        _check_levels(levels)
        if dim not in (2, 3):
            raise InputError(f"WaveletDecomposition(dim={dim!r}): give 2 or 3 spatial axes")
        self.levels, self.dim = levels, dim

    def extra_repr(self) -> str:
        return f"levels={self.levels}" + (f", dim={self.dim}" if self.dim != 2 else "")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C, n, …) → list of S = levels + 1 scale tensors (see the class docstring)."""
        factor, d = 2**self.levels, self.dim
        if x.ndim != 2 + d or any(n % factor for n in x.shape[2:]):
            grid = ", ".join(["n"] * d)
            raise InputError(
                f"WaveletDecomposition(levels={self.levels}) got a tensor of shape "
                f"{tuple(x.shape)}: give a {2 + d}-D batch (B, C, {grid}) with n divisible by "
                f"2^levels = {factor}; pad or resample the grid, or use fewer levels"
            )
        scales = []
        approx = x
        for _ in range(self.levels):
            approx, details = haar_dwt(approx, d)
            scales.append(details.flatten(1, 2))
        scales.append(approx)
        return scales

    def inverse(self, scales: list[torch.Tensor]) -> torch.Tensor:
        """Reconstruct x (B, C, n, …) from the output of :meth:`forward`."""
        if len(scales) != self.levels + 1:
            raise InputError(
                f"WaveletDecomposition(levels={self.levels}).inverse got {len(scales)} scales: "
                f"pass the list of {self.levels + 1} tensors returned by forward"
            )
        approx, d = scales[-1], self.dim
        k = 2**d - 1
        for details in reversed(scales[:-1]):
            if details.ndim != 2 + d or details.shape[1] % k:
                raise InputError(
                    f"detail scale of shape {tuple(details.shape)}: expected (B, {k}C, m, ...), "
                    f"{k} bands per input channel, as returned by forward"
                )
            approx = haar_idwt(approx, details.unflatten(1, (details.shape[1] // k, k)), d)
        return approx
