"""Fourier kernel-integral layers and spectral calculus on the periodic unit cell.

Conventions. A field is a tensor (..., n, n) sampled on the periodic unit cell [0, 1)², grid
spacing 1/n, row index = y, column = x; (B, C, n, n) for the layers. Derivative components are
ordered (x, y): index 0 is ∂/∂x (along columns), index 1 is ∂/∂y (along rows).

:class:`SpectralConv2d` is the FNO kernel integral (K v)(y) = ∫ κ(y − y') v(y') dy' with κ
parametrised by its lowest Fourier coefficients. rfft2 is unnormalised and irfft2 divides by the
number of points, so the layer acts on band-limited inputs independently of the grid resolution.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from neuroscale_couple.errors import InputError


class SpectralConv2d(nn.Module):
    """FNO Fourier layer: multiply the lowest Fourier modes by learned complex matrices.

    Keeps rows ``[:modes]`` and ``[-modes:]`` (non-negative and negative frequencies along y) and
    columns ``[:modes]`` of the rfft axis (x); all other modes are set to zero. On a grid too coarse
    for ``modes`` (n < 2 modes) only the modes the grid resolves are used, each with the same
    weight as on a fine grid.

    The complex weights are stored as a real parameter ``weight`` of shape
    (2, in, out, modes, modes, 2): ``weight[0, :, :, r, c]`` multiplies frequency (ky, kx) = (r, c),
    ``weight[1, :, :, r, c]`` frequency (r − modes, c); the last axis is (real, imaginary).
    They are cast to the dtype and device of the input, so the layer accepts float32 and float64
    input (B, in, n, m) and returns (B, out, n, m).
    """

    def __init__(self, in_channels: int, out_channels: int, modes: int) -> None:
        super().__init__()
        if min(in_channels, out_channels, modes) < 1:
            raise InputError(
                f"SpectralConv2d(in_channels={in_channels}, out_channels={out_channels}, "
                f"modes={modes}): all three must be positive integers"
            )
        self.in_channels, self.out_channels, self.modes = in_channels, out_channels, modes
        scale = 1.0 / (in_channels * out_channels)
        self.weight = nn.Parameter(
            scale * torch.rand(2, in_channels, out_channels, modes, modes, 2)
        )

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, modes={self.modes}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in, n, m) → (B, out, n, m)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"SpectralConv2d({self.in_channels} → {self.out_channels}) got a tensor of shape "
                f"{tuple(x.shape)}: give (B, {self.in_channels}, n, n)"
            )
        if x.dtype not in (torch.float32, torch.float64):
            raise InputError(
                f"SpectralConv2d got {x.dtype} input: give float32 or float64 (e.g. x.float())"
            )
        n, m = x.shape[-2:]
        my, mx = min(self.modes, n // 2), min(self.modes, m // 2 + 1)
        w = torch.view_as_complex(self.weight.to(device=x.device, dtype=x.dtype).contiguous())
        x_ft = torch.fft.rfft2(x)
        out_ft = x_ft.new_zeros(x.shape[0], self.out_channels, n, m // 2 + 1)
        out_ft[..., :my, :mx] = torch.einsum(
            "bixy,ioxy->boxy", x_ft[..., :my, :mx], w[0, ..., :my, :mx]
        )
        out_ft[..., n - my :, :mx] = torch.einsum(
            "bixy,ioxy->boxy", x_ft[..., n - my :, :mx], w[1, ..., self.modes - my :, :mx]
        )
        return torch.fft.irfft2(out_ft, s=(n, m))


class FourierBlock(nn.Module):
    """Standard FNO block y = GELU(K x + W x): spectral conv plus a pointwise (1×1) linear map.

    ``activation=False`` omits the GELU (for the last block). Shapes (B, channels, n, n) →
    (B, channels, n, n); like :class:`SpectralConv2d` it accepts float32 and float64 input.
    """

    def __init__(self, channels: int, modes: int, activation: bool = True) -> None:
        super().__init__()
        self.spectral = SpectralConv2d(channels, channels, modes)
        self.pointwise = nn.Conv2d(channels, channels, kernel_size=1)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, channels, n, n) → (B, channels, n, n)."""
        weight = self.pointwise.weight.to(device=x.device, dtype=x.dtype)
        bias = self.pointwise.bias.to(device=x.device, dtype=x.dtype)
        y = self.spectral(x) + F.conv2d(x, weight, bias)
        return F.gelu(y) if self.activation else y


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
