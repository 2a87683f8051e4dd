"""Fourier kernel-integral layers and spectral calculus on the periodic unit cell.

Conventions. A field is a tensor (..., n, n) sampled on the periodic unit cell [0, 1)², grid
spacing 1/n, row index = y, column = x; (B, C, n, n) for the layers, (B, C, n, n, n) on the
unit cube [0, 1)³ (axes z, y, x) for the 3D layers. Derivative components are
ordered (x, y): index 0 is ∂/∂x (along columns), index 1 is ∂/∂y (along rows).

:class:`SpectralConv` is the FNO kernel integral (K v)(y) = ∫ κ(y − y') v(y') dy' with κ
parametrised by its lowest Fourier coefficients, in 2D or 3D. rfftn is unnormalised and irfftn
divides by the number of points, so the layer acts on band-limited inputs independently of the
grid resolution.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from neuroscale_couple.errors import InputError


class SpectralConv(nn.Module):
    """FNO Fourier layer: multiply the lowest Fourier modes by learned complex matrices, on a
    grid of ``dim`` = 2 or 3 axes.

    Keeps, along every axis but the last, the indices ``[:modes]`` and ``[-modes:]``
    (non-negative and negative frequencies), and ``[:modes]`` of the last (rfft) axis; all other
    modes are set to zero. On a grid too coarse for ``modes`` (n < 2 modes) only the modes the
    grid resolves are used, each with the same weight as on a fine grid.

    The complex weights are stored as a real parameter ``weight`` of shape
    (2^(dim−1), in, out, modes, …, modes, 2) (``dim`` mode axes): corner c holds the
    frequencies whose index along axis a < dim − 1 is non-negative where bit a of c is 0 and
    negative (k − modes) where it is 1; in 2D ``weight[0, :, :, r, c]`` multiplies frequency
    (ky, kx) = (r, c) and ``weight[1, :, :, r, c]`` frequency (r − modes, c). The last axis is
    (real, imaginary). They are cast to the dtype and device of the input, so the layer accepts
    float32 and float64 input (B, in, n, …) and returns (B, out, n, …).
    """

    def __init__(self, in_channels: int, out_channels: int, modes: int, dim: int = 2) -> None:
        super().__init__()
        if min(in_channels, out_channels, modes) < 1 or dim not in (2, 3):
            raise InputError(
                f"SpectralConv(in_channels={in_channels}, out_channels={out_channels}, "
                f"modes={modes}, dim={dim}): channels and modes must be positive integers, "
                "dim 2 or 3"
            )
        self.in_channels, self.out_channels, self.modes = in_channels, out_channels, modes
        self.dim = dim
        scale = 1.0 / (in_channels * out_channels)
        self.weight = nn.Parameter(
            scale * torch.rand(2 ** (dim - 1), in_channels, out_channels, *(modes,) * dim, 2)
        )

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, modes={self.modes}"
                + (f", dim={self.dim}" if self.dim != 2 else ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in, n, …) → (B, out, n, …)."""
        d = self.dim
        if x.ndim != 2 + d or x.shape[1] != self.in_channels:
            grid = ", ".join(["n"] * d)
            raise InputError(
                f"SpectralConv({self.in_channels} → {self.out_channels}, dim={d}) got a tensor "
                f"of shape {tuple(x.shape)}: give (B, {self.in_channels}, {grid})"
            )
        if x.dtype not in (torch.float32, torch.float64):
            raise InputError(
                f"SpectralConv got {x.dtype} input: give float32 or float64 (e.g. x.float())"
            )
        sizes = x.shape[2:]
        kept = [min(self.modes, n // 2) for n in sizes[:-1]] + [min(self.modes, sizes[-1] // 2 + 1)]
        w = torch.view_as_complex(self.weight.to(device=x.device, dtype=x.dtype).contiguous())
        axes = tuple(range(-d, 0))
        x_ft = torch.fft.rfftn(x, dim=axes)
        out_ft = x_ft.new_zeros(x.shape[0], self.out_channels, *sizes[:-1], sizes[-1] // 2 + 1)
        letters = "xyz"[:d]
        rule = f"bi{letters},io{letters}->bo{letters}"
        for corner in range(2 ** (d - 1)):
            data, weight = [slice(None)] * 2, [corner, slice(None), slice(None)]
            for a, (n, m) in enumerate(zip(sizes[:-1], kept, strict=False)):
                negative = (corner >> a) & 1
                data.append(slice(n - m, None) if negative else slice(None, m))
                weight.append(slice(self.modes - m, None) if negative else slice(None, m))
            data.append(slice(None, kept[-1]))
            weight.append(slice(None, kept[-1]))
            out_ft[tuple(data)] = torch.einsum(rule, x_ft[tuple(data)], w[tuple(weight)])
        return torch.fft.irfftn(out_ft, s=sizes, dim=axes)


class SpectralConv2d(SpectralConv):
    """:class:`SpectralConv` on 2D grids (B, in, n, m) → (B, out, n, m)."""

    def __init__(self, in_channels: int, out_channels: int, modes: int) -> None:
        super().__init__(in_channels, out_channels, modes, dim=2)


class FourierBlock(nn.Module):
    """Standard FNO block y = GELU(K x + W x): spectral conv plus a pointwise (1×1) linear map,
    on grids of ``dim`` = 2 or 3 axes.

    ``activation=False`` omits the GELU (for the last block). Shapes (B, channels, n, …) →
    (B, channels, n, …); like :class:`SpectralConv` it accepts float32 and float64 input.
    """

    def __init__(self, channels: int, modes: int, activation: bool = True, dim: int = 2) -> None:
        super().__init__()
        self.spectral = SpectralConv(channels, channels, modes, dim)
        self.pointwise = pointwise_conv(channels, channels, dim)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, channels, n, …) → (B, channels, n, …)."""
        weight = self.pointwise.weight.to(device=x.device, dtype=x.dtype)
        bias = self.pointwise.bias.to(device=x.device, dtype=x.dtype)
        conv = F.conv2d if self.spectral.dim == 2 else F.conv3d
        y = self.spectral(x) + conv(x, weight, bias)
        return F.gelu(y) if self.activation else y


def pointwise_conv(in_channels: int, out_channels: int, dim: int) -> nn.Module:
    """A 1×1 (×1) convolution on grids of ``dim`` = 2 or 3 axes: a per-pixel linear map."""
    return (nn.Conv2d if dim == 2 else nn.Conv3d)(in_channels, out_channels, kernel_size=1)


def _wavenumbers(n: int, m: int, dtype: torch.dtype, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Angular wavenumbers 2πk of rfft2 on (n, m): kx (m//2 + 1,) and ky (n, 1), Nyquist zeroed."""
    kx = torch.arange(m // 2 + 1, dtype=dtype, device=device)
    ky = torch.fft.ifftshift(torch.arange(-(n // 2), n - n // 2, dtype=dtype, device=device))
    if m % 2 == 0:
        kx[-1] = 0
    if n % 2 == 0:
        ky[n // 2] = 0
    return 2 * math.pi * kx, 2 * math.pi * ky[:, None]


def _check_field(u: torch.Tensor, name: str, trailing: tuple[int, ...]) -> None:
    k = len(trailing)
    if u.ndim < 2 + k or u.shape[u.ndim - k :] != trailing or not u.is_floating_point():
        tail = ", ".join(["n", "n", *map(str, trailing)])
        raise InputError(
            f"{name} got a {u.dtype} tensor of shape {tuple(u.shape)}: give a real floating-point "
            f"field of shape (..., {tail})"
        )


def spectral_gradient(u: torch.Tensor) -> torch.Tensor:
    """Gradient of a periodic field on the unit cell, by FFT.

    Parameters
    ----------
    u : Tensor (..., n, n), real, row index = y, column = x, spacing 1/n.

    Returns
    -------
    Tensor (..., n, n, 2): [..., 0] = ∂u/∂x, [..., 1] = ∂u/∂y. The Nyquist modes are dropped
    (an odd derivative of them is not real), so the result is the exact gradient of the
    band-limited interpolant without them; its mean is zero up to round-off.
    """
    _check_field(u, "spectral_gradient", ())
    n, m = u.shape[-2:]
    kx, ky = _wavenumbers(n, m, u.dtype, u.device)
    u_ft = torch.fft.rfft2(u)
    du_dx = torch.fft.irfft2(1j * kx * u_ft, s=(n, m))
    du_dy = torch.fft.irfft2(1j * ky * u_ft, s=(n, m))
    return torch.stack([du_dx, du_dy], dim=-1)


def spectral_divergence(P: torch.Tensor) -> torch.Tensor:
    """Row-wise divergence of a periodic tensor field on the unit cell, by FFT.

    Parameters
    ----------
    P : Tensor (..., n, n, 2, 2), real; P[..., i, j] is component ij, coordinates y_0 = x
        (columns) and y_1 = y (rows).

    Returns
    -------
    Tensor (..., n, n, 2): (div P)_i = Σ_j ∂P_ij/∂y_j, Nyquist modes dropped as in
    :func:`spectral_gradient`.
    """
    _check_field(P, "spectral_divergence", (2, 2))
    n, m = P.shape[-4:-2]
    kx, ky = _wavenumbers(n, m, P.dtype, P.device)
    P_ft = torch.fft.rfft2(torch.movedim(P, (-2, -1), (0, 1)))  # (2, 2, ..., n, m//2 + 1)
    div = torch.fft.irfft2(1j * (kx * P_ft[:, 0] + ky * P_ft[:, 1]), s=(n, m))
    return torch.movedim(div, 0, -1)
