"""Encoder layers of the operator: Haar wavelet decomposition, Fourier layers, spectral calculus."""

import io
import math

import pytest

torch = pytest.importorskip("torch")

from neuroscale_couple.errors import InputError  # noqa: E402
from neuroscale_couple.operators.spectral import (  # noqa: E402
    FourierBlock,
    SpectralConv2d,
    spectral_divergence,
    spectral_gradient,
)
from neuroscale_couple.operators.wavelet import (  # noqa: E402
    WaveletDecomposition,
    haar_dwt2,
    haar_idwt2,
    scale_sizes,
)

TWO_PI = 2 * math.pi


def grid(n: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (x, y) of the n×n cell-grid on [0, 1)², each (n, n): row = y, column = x."""
    t = torch.arange(n, dtype=dtype) / n
    y, x = torch.meshgrid(t, t, indexing="ij")
    return x, y


def band_limited(n: int, kmax: int, gen: torch.Generator, channels: int = 3) -> torch.Tensor:
    """A random real field (1, channels, n, n) whose Fourier modes all satisfy |kx|, |ky| ≤ kmax."""
    x, y = grid(n)
    out = torch.zeros(1, channels, n, n, dtype=torch.float64)
    for kx in range(-kmax, kmax + 1):
        for ky in range(-kmax, kmax + 1):
            a, b = torch.randn(2, channels, 1, 1, generator=gen, dtype=torch.float64)
            phase = TWO_PI * (kx * x + ky * y)
            out[0] += a * torch.cos(phase) + b * torch.sin(phase)
    return out


# --- Haar wavelet decomposition -------------------------------------------------------------


@pytest.mark.parametrize("n", [32, 64])
def test_wavelet_round_trip_is_exact_and_shapes_follow_scale_sizes(n):
    x = torch.randn(2, 3, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    for levels in range(1, 5):
        dec = WaveletDecomposition(levels)
        scales = dec(x)
        assert len(scales) == levels + 1
        shapes = [(2, 9, m, m) for m in scale_sizes(n, levels)]
        shapes[-1] = (2, 3, *shapes[-1][2:])
        assert [tuple(s.shape) for s in scales] == shapes
        assert (dec.inverse(scales) - x).abs().max() < 1e-12, levels


def test_haar_band_order_is_horizontal_vertical_diagonal():
    n = 8
    rows = (-1.0) ** torch.arange(n, dtype=torch.float64)
    horizontal_stripes = rows[:, None].expand(n, n)  # varies along y only
    vertical_stripes = rows[None, :].expand(n, n)  # varies along x only
    checkerboard = rows[:, None] * rows[None, :]
    for band, field in enumerate([horizontal_stripes, vertical_stripes, checkerboard]):
        approx, details = haar_dwt2(field[None, None])
        assert details.shape == (1, 1, 3, n // 2, n // 2)
        torch.testing.assert_close(approx, torch.zeros_like(approx), atol=0, rtol=0)
        expected = torch.zeros_like(details)
        expected[:, :, band] = 2.0
        torch.testing.assert_close(details, expected, atol=0, rtol=0)
        torch.testing.assert_close(haar_idwt2(approx, details), field[None, None])


def test_haar_preserves_energy_at_every_level():
    x = torch.randn(2, 2, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    approx = x
    for _ in range(4):
        energy = approx.square().sum()
        approx, details = haar_dwt2(approx)
        total = approx.square().sum() + details.square().sum()
        assert total.item() == pytest.approx(energy.item(), rel=1e-13)
    scales = WaveletDecomposition(4)(x)
    assert sum(s.square().sum() for s in scales).item() == pytest.approx(
        x.square().sum().item(), rel=1e-13
    )


def test_constant_field_has_no_details():
    x = torch.full((1, 2, 32, 32), 0.7, dtype=torch.float64)
    scales = WaveletDecomposition(3)(x)
    for details in scales[:-1]:
        assert torch.count_nonzero(details) == 0
    expected = torch.full((1, 2, 4, 4), 0.7 * 2**3, dtype=torch.float64)
    torch.testing.assert_close(scales[-1], expected)


def test_translation_by_two_to_the_levels_commutes_with_the_decomposition():
    x = torch.randn(1, 2, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for levels in (1, 2, 3):
        dec, step = WaveletDecomposition(levels), 2**levels
        shift = (3 * step, -5 * step)
        shifted = dec(torch.roll(x, shift, dims=(-2, -1)))
        for j, (s, s_shifted) in enumerate(zip(dec(x), shifted, strict=True), start=1):
            factor = 2 ** min(j, levels)
            expected = torch.roll(s, (shift[0] // factor, shift[1] // factor), dims=(-2, -1))
            torch.testing.assert_close(s_shifted, expected, atol=1e-14, rtol=0)
    # A one-pixel shift does not commute: the Haar transform is not shift-invariant.
    moved = dec(torch.roll(x, 1, dims=-1))
    assert not torch.allclose(moved[0], torch.roll(dec(x)[0], 1, dims=-1))


def test_wavelet_is_differentiable():
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: haar_dwt2(t)[1], (x,))
    dec = WaveletDecomposition(2)
    assert torch.autograd.gradcheck(lambda t: dec.inverse(dec(t)), (x,))


def test_bad_sizes_raise_helpful_errors():
    dec = WaveletDecomposition(2)
    with pytest.raises(InputError, match=r"\(2, 1, 30, 30\).*divisible by 2\^levels = 4"):
        dec(torch.zeros(2, 1, 30, 30))
    with pytest.raises(InputError, match=r"shape \(1, 32, 32\).*4-D batch \(B, C, n, n\)"):
        dec(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="n=30 .* 2\\^levels = 4"):
        scale_sizes(30, 2)
    with pytest.raises(InputError, match="even"):
        haar_dwt2(torch.zeros(1, 1, 5, 6))
    with pytest.raises(InputError, match="levels=-1"):
        WaveletDecomposition(-1)
    with pytest.raises(InputError, match="2 scales.*3 tensors"):
        dec.inverse(dec(torch.zeros(1, 1, 8, 8))[:2])


# --- Fourier layers -----------------------------------------------------------------------------


def test_spectral_conv_shapes_including_grids_coarser_than_the_modes():
    layer = SpectralConv2d(3, 5, modes=6)
    assert layer(torch.randn(2, 3, 32, 32)).shape == (2, 5, 32, 32)
    assert layer(torch.randn(2, 3, 8, 8)).shape == (2, 5, 8, 8)
    assert layer(torch.randn(2, 3, 15, 15)).shape == (2, 5, 15, 15)  # odd grids too
    assert FourierBlock(4, modes=3)(torch.randn(2, 4, 16, 16)).shape == (2, 4, 16, 16)
    with pytest.raises(InputError, match=r"\(2, 4, 16, 16\).*\(B, 3, n, n\)"):
        layer(torch.randn(2, 4, 16, 16))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("modes", [5, 17])  # 17 = n/2 + 1 keeps every mode of n = 32
def test_spectral_conv_is_translation_equivariant(dtype, tol, modes):
    torch.manual_seed(0)
    layer = SpectralConv2d(3, 4, modes)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    assert out.abs().max() > 1e-2  # not trivially zero
    for shift in [(1, 0), (0, 7), (3, -5), (17, 11)]:
        rolled = layer(torch.roll(x, shift, dims=(-2, -1)))
        expected = torch.roll(out, shift, dims=(-2, -1))
        torch.testing.assert_close(rolled, expected, atol=tol, rtol=0, msg=str(shift))


def test_spectral_conv_acts_mode_by_mode_on_band_limited_input():
    gen = torch.Generator().manual_seed(5)
    layer = SpectralConv2d(3, 2, modes=4).double()
    u, v = band_limited(32, 3, gen), band_limited(32, 3, gen)
    # Linear.
    torch.testing.assert_close(layer(2.0 * u - 3.0 * v), 2.0 * layer(u) - 3.0 * layer(v),
                               atol=1e-12, rtol=0)
    # Resolution independent: the same band-limited function sampled on 16² and 32², and on a
    # 4² grid too coarse for all the modes of the layer (only the resolved ones act).
    torch.testing.assert_close(layer(u)[..., ::2, ::2], layer(u[..., ::2, ::2]), atol=1e-12, rtol=0)
    wide, w = SpectralConv2d(3, 2, modes=6).double(), band_limited(32, 1, gen)
    torch.testing.assert_close(wide(w)[..., ::8, ::8], wide(w[..., ::8, ::8]), atol=1e-12, rtol=0)
    # Modes above the cut-off are annihilated; modes below it do not leak to other frequencies.
    x, y = grid(32)
    high = torch.cos(TWO_PI * (5 * x + 2 * y)).expand(1, 3, 32, 32)
    assert layer(high).abs().max() < 1e-12
    single = torch.cos(TWO_PI * (2 * x - 3 * y)).expand(1, 3, 32, 32)
    spectrum = torch.fft.rfft2(layer(single)).abs()
    assert spectrum[..., -3, 2].min() > 1e-3
    spectrum[..., -3, 2] = 0
    assert spectrum.max() < 1e-10


def test_fourier_block_is_gelu_of_spectral_plus_pointwise():
    torch.manual_seed(0)
    block = FourierBlock(3, modes=4, activation=False)
    x = torch.randn(2, 3, 16, 16)
    linear = block.spectral(x) + block.pointwise(x)
    torch.testing.assert_close(block(x), linear)
    block.activation = True
    torch.testing.assert_close(block(x), torch.nn.functional.gelu(linear))


def test_gradients_reach_the_weights():
    torch.manual_seed(0)
    block = FourierBlock(3, modes=4)
    loss = block(torch.randn(2, 3, 16, 16)).square().mean()
    loss.backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_state_dict_is_real_and_loads_with_weights_only():
    torch.manual_seed(0)
    block = FourierBlock(3, modes=4, activation=False)
    state = block.state_dict()
    assert state["spectral.weight"].shape == (2, 3, 3, 4, 4, 2)
    assert all(not t.is_complex() and t.dtype == torch.float32 for t in state.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other = FourierBlock(3, modes=4, activation=False)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(other(x), block(x))


def test_float32_layers_accept_float64_input():
    torch.manual_seed(0)
    block = FourierBlock(2, modes=3)
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    out = block(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), block(x.float()), atol=1e-5, rtol=1e-5)


# --- Spectral calculus --------------------------------------------------------------------------


def test_spectral_gradient_matches_analytic_derivatives():
    x, y = grid(32)
    s, c, phase = torch.sin, torch.cos, TWO_PI * (3 * x - 5 * y)
    u = s(TWO_PI * x) * c(2 * TWO_PI * y) + c(phase)
    du_dx = TWO_PI * c(TWO_PI * x) * c(2 * TWO_PI * y) - 3 * TWO_PI * s(phase)
    du_dy = -2 * TWO_PI * s(TWO_PI * x) * s(2 * TWO_PI * y) + 5 * TWO_PI * s(phase)
    grad = spectral_gradient(torch.stack([u, 2 * u])[None])  # leading dims (1, 2)
    assert grad.shape == (1, 2, 32, 32, 2)
    torch.testing.assert_close(grad[0, 0], torch.stack([du_dx, du_dy], dim=-1), atol=1e-10, rtol=0)
    torch.testing.assert_close(grad[0, 1], 2 * grad[0, 0], atol=1e-12, rtol=0)
    assert spectral_gradient(u.float()).dtype == torch.float32


def test_spectral_gradient_drops_the_nyquist_mode():
    x, y = grid(16)
    s, c = torch.sin, torch.cos
    nyquist_x, nyquist_y = c(16 * math.pi * x), c(16 * math.pi * y)  # (-1)^column, (-1)^row
    assert spectral_gradient(nyquist_x + nyquist_y).abs().max() < 1e-12
    # Mixed with a resolved mode, only the derivative along the resolved direction survives.
    u = nyquist_y * s(TWO_PI * x) + nyquist_x * c(3 * TWO_PI * y)
    expected = torch.stack([nyquist_y * TWO_PI * c(TWO_PI * x),
                            -nyquist_x * 3 * TWO_PI * s(3 * TWO_PI * y)], dim=-1)
    torch.testing.assert_close(spectral_gradient(u), expected, atol=1e-12, rtol=0)


def test_spectral_divergence_matches_analytic_divergence():
    x, y = grid(32)
    s, c = torch.sin, torch.cos
    P = torch.stack([
        torch.stack([s(TWO_PI * x) * c(TWO_PI * y), c(TWO_PI * (x + 2 * y))], dim=-1),
        torch.stack([s(2 * TWO_PI * y) * c(TWO_PI * x), c(TWO_PI * x) * s(3 * TWO_PI * y)], dim=-1),
    ], dim=-2)  # (n, n, 2, 2), P[..., i, j]
    div0 = TWO_PI * c(TWO_PI * x) * c(TWO_PI * y) - 2 * TWO_PI * s(TWO_PI * (x + 2 * y))
    div1 = -TWO_PI * s(2 * TWO_PI * y) * s(TWO_PI * x) + 3 * TWO_PI * c(TWO_PI * x) * c(
        3 * TWO_PI * y
    )
    torch.testing.assert_close(spectral_divergence(P), torch.stack([div0, div1], dim=-1),
                               atol=1e-10, rtol=0)


def test_divergence_is_the_trace_of_the_gradient_of_each_row():
    gen = torch.Generator().manual_seed(2)
    P = torch.randn(3, 32, 32, 2, 2, dtype=torch.float64, generator=gen)
    grad = spectral_gradient(P.movedim((-2, -1), (1, 2)))  # (3, 2, 2, n, n, 2): i, j, ..., d
    expected = (grad[:, :, 0, ..., 0] + grad[:, :, 1, ..., 1]).movedim(1, -1)
    torch.testing.assert_close(spectral_divergence(P), expected, atol=1e-11, rtol=0)
    with pytest.raises(InputError, match=r"\(32, 32, 2\).*\(\.\.\., n, n, 2, 2\)"):
        spectral_divergence(P[0, ..., 0])


def test_gradient_and_divergence_of_periodic_fields_have_zero_mean():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(4, 32, 32, dtype=torch.float64, generator=gen)
    mean = spectral_gradient(w).mean(dim=(-3, -2))
    assert mean.abs().max() < 1e-12
    P = torch.randn(4, 32, 32, 2, 2, dtype=torch.float64, generator=gen)
    assert spectral_divergence(P).mean(dim=(-3, -2)).abs().max() < 1e-12
