"""Heads of the operator: probabilistic coarse-graining N(μ, Σ) and the fine-graining decoder.

Coarse-graining. Each of M ensemble members predicts a homogenized strain energy

    W̄(z, C̄) = σ_ref e_ref [ Σ_k w_k(z) Ψ_k(C̄)/e_ref² + 0.1 |ê|² φ(z, ê) ],  ê = e(Ē)/e_ref,

a learned mixture of hyperelastic basis energies Ψ_k (:func:`basis_energies`, in 3D
:func:`basis_energies_3d`) plus a free correction, with Ē = (C̄ − I)/2 in Mandel form
e = (E₁₁, E₂₂, √2 E₁₂) (3D: (E₁₁, E₂₂, E₃₃, √2 E₂₃, √2 E₁₃, √2 E₁₂)). Then P̄ = ∂W̄/∂F̄ and
A = ∂P̄/∂F̄ by automatic differentiation: W̄ depends on F̄ only through C̄ = F̄ᵀF̄ (objectivity),
P̄F̄ᵀ is symmetric (balance of angular momentum), A is major-symmetric, and W̄ and P̄ vanish at
F̄ = I. A second network gives an aleatoric covariance Σ = σ_ref² L_Σ L_Σᵀ of the d² stress
components (4 in 2D, 9 in 3D).

Members run vectorised: every layer holds weights (M, in, out) and acts on (M, B, in).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from neuroscale_couple.operators.spectral import FourierBlock

_SQRT2 = math.sqrt(2.0)


class EnsembleLinear(nn.Module):
    """M independent affine maps applied at once: (M, B, in) → (M, B, out)."""

    def __init__(self, members: int, n_in: int, n_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)
        self.weight = nn.Parameter(torch.empty(members, n_in, n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, n_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def ensemble_mlp(members: int, n_in: int, hidden: int, n_out: int, depth: int = 2, *,
                 linear: Callable[[int, int], nn.Module] | None = None,
                 after_activation: Callable[[], nn.Module] | None = None) -> nn.Sequential:
    """An MLP of ``depth`` hidden layers (SiLU, smooth so that tangents are smooth), vectorised:
    ``linear(n_in, n_out)`` makes its affine maps (default: :class:`EnsembleLinear` of
    ``members``), ``after_activation()`` a layer after each SiLU (default none; MC dropout:
    :mod:`~neuroscale_couple.operators.epistemic`)."""
    linear = linear or functools.partial(EnsembleLinear, members)
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(depth):
        layers += [linear(width, hidden), nn.SiLU()]
        if after_activation is not None:
            layers.append(after_activation())
        width = hidden
    layers.append(linear(width, n_out))
    return nn.Sequential(*layers)


def green_lagrange_mandel(F: torch.Tensor) -> torch.Tensor:
    """Mandel vector of Ē = (FᵀF − I)/2: F (..., 2, 2) → (E₁₁, E₂₂, √2 E₁₂) (..., 3);
    F (..., 3, 3) → (E₁₁, E₂₂, E₃₃, √2 E₂₃, √2 E₁₃, √2 E₁₂) (..., 6)."""
    C = F.transpose(-1, -2) @ F
    if F.shape[-1] == 3:
        return torch.stack([(C[..., 0, 0] - 1) / 2, (C[..., 1, 1] - 1) / 2,
                            (C[..., 2, 2] - 1) / 2, C[..., 1, 2] / _SQRT2, C[..., 0, 2] / _SQRT2,
                            C[..., 0, 1] / _SQRT2], dim=-1)
    return torch.stack([(C[..., 0, 0] - 1) / 2, (C[..., 1, 1] - 1) / 2, C[..., 0, 1] / _SQRT2],
                       dim=-1)


def mandel_size(dim: int) -> int:
    """Components of a symmetric d×d tensor in Mandel form: 3 (d = 2), 6 (d = 3)."""
    return dim * (dim + 1) // 2


MIN_DIAG = 1e-4
"""The floor of a covariance factor's diagonal (:func:`lower_triangular`)."""


def lower_triangular(flat: torch.Tensor, n: int, diag_offset: float = 0.0,
                     min_diag: float = MIN_DIAG) -> torch.Tensor:
    """(…, n(n+1)/2) → L = D (I + O) (…, n, n): D diagonal positive (softplus of the diagonal
    entries + ``diag_offset``), O strictly lower; well conditioned for any D, log det L = Σ log D.
    """
    rows, cols = torch.tril_indices(n, n, device=flat.device)
    M = flat.new_zeros((*flat.shape[:-1], n, n))
    M[..., rows, cols] = flat
    d = _positive_diagonal(torch.diagonal(M, dim1=-2, dim2=-1), diag_offset, min_diag)
    eye = torch.eye(n, dtype=flat.dtype, device=flat.device)
    return d[..., :, None] * (eye + torch.tril(M, -1))


def lower_triangular_norm2(flat: torch.Tensor, n: int, diag_offset: float = 0.0,
                           min_diag: float = MIN_DIAG, *, dim: int = -1) -> torch.Tensor:
    """‖L‖_F² = tr(L Lᵀ) of :func:`lower_triangular`'s L without forming it: row i of
    L = D (I + O) has the squared norm d_i² (1 + Σ_{j<i} O_ij²). The n(n+1)/2 entries lie
    along ``dim``: -1 (…, n(n+1)/2) → (…), or -2 (…, n(n+1)/2, b) → (…, b) (points along
    the columns)."""
    if dim not in (-1, -2):
        raise ValueError(f"dim={dim}: the entries lie along -1 or -2")
    diagonal, strictly_lower = _triangle(n, flat.dtype, flat.device)
    d = _positive_diagonal(flat.index_select(dim, diagonal), diag_offset, min_diag)
    off = flat.square() @ strictly_lower if dim == -1 else strictly_lower.T @ flat.square()
    return (d.square() * (1 + off)).sum(dim)


@functools.lru_cache
def _triangle(n: int, dtype: torch.dtype, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the n(n+1)/2 entries of :func:`lower_triangular`'s ``flat``: the positions of the
    diagonal (n,) and the map (n(n+1)/2, n) of each strictly lower entry to its row. Made
    outside inference mode, even when first asked for there: a cached inference tensor could
    not be saved for a later backward."""
    with torch.inference_mode(False):
        rows, cols = torch.tril_indices(n, n, device=device)
        return (torch.nonzero(rows == cols)[:, 0],
                ((rows > cols)[:, None] & (rows[:, None] == torch.arange(n, device=device))
                 ).to(dtype))


def _positive_diagonal(x: torch.Tensor, diag_offset: float, min_diag: float) -> torch.Tensor:
    """The diagonal D of :func:`lower_triangular` from its raw entries x (…, n)."""
    return nn.functional.softplus(x + diag_offset) + min_diag


def basis_energies(C: torch.Tensor, n_directions: int = 6, quartic: bool = False
                   ) -> torch.Tensor:
    """Hyperelastic basis energies Ψ_k(C̄) (…, K) for C̄ (…, 2, 2), plane strain;
    K = 2 + 2·n_directions, plus 3 with ``quartic``.

    Ψ₁ = ½(tr C − 2) − ln J and Ψ₂ = ½(ln J)² (Neo-Hookean shear and volume), and for unit
    vectors a at angles kπ/n_directions the stretch energies ½(ln I₄)² and I₄ − 1 − ln I₄ with
    I₄ = aᵀC a (anisotropy of the arrangement). Each is objective, vanishes with zero stress at
    C = I, and is of order |Ē|², so that W̄ = Σ w_k Ψ_k spans anisotropic Neo-Hookean-like laws.
    ``quartic`` appends the isotropic terms of order |Ē|⁴, Ψ₁², Ψ₁ (ln J)² and (ln J)⁴: the
    stiffening of a composite whose matrix ligaments strain far more than the cell (per-cell
    least-squares weights then leave 1.3 % instead of 3.2 % of P̄ at 0.15 ≤ |F̄ − I| ≤ 0.3).
    """
    C00, C11, _, D, I4, _ = _invariants(C, n_directions)
    return _basis_of(C00, C11, D, I4, quartic)


def _invariants(C: torch.Tensor, n_directions: int) -> tuple[torch.Tensor, ...]:
    """C̄₁₁, C̄₂₂, sym C̄₁₂, det C̄, the stretches I₄ = aᵀC̄a (…, n_directions) of the basis
    directions a at angles kπ/n_directions, and those directions (n_directions, 2)."""
    C00, C11, C01 = C[..., 0, 0], C[..., 1, 1], 0.5 * (C[..., 0, 1] + C[..., 1, 0])
    D = C00 * C11 - C01 * C01  # explicit 2×2 algebra: no batched LU
    c, s = _directions(n_directions, C)
    I4 = c * c * C00[..., None] + 2 * c * s * C01[..., None] + s * s * C11[..., None]
    return C00, C11, C01, D, I4, torch.stack([c, s], -1)


def _directions(n_directions: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (n_directions,) of the basis directions' angles kπ/n_directions, in the
    dtype and on the device of ``like``."""
    angles = (torch.arange(n_directions, dtype=like.dtype, device=like.device)
              * torch.pi / n_directions)
    return torch.cos(angles), torch.sin(angles)


def _matrix(a00: torch.Tensor, a01: torch.Tensor, a10: torch.Tensor, a11: torch.Tensor
            ) -> torch.Tensor:
    """The 2×2 matrices (…, 2, 2) of the components (…)."""
    return torch.stack([a00, a01, a10, a11], -1).unflatten(-1, (2, 2))


def _basis_of(C00: torch.Tensor, C11: torch.Tensor, D: torch.Tensor, I4: torch.Tensor,
              quartic: bool) -> torch.Tensor:
    """The basis energies of :func:`basis_energies` from :func:`_invariants`."""
    lnJ, lnI4 = 0.5 * torch.log(D), torch.log(I4)
    psi1 = 0.5 * (C00 + C11 - 2) - lnJ
    parts = [torch.stack([psi1, 0.5 * lnJ**2], dim=-1), 0.5 * lnI4**2, I4 - 1 - lnI4]
    if quartic:
        parts.append(torch.stack([psi1**2, psi1 * lnJ**2, lnJ**4], dim=-1))
    return torch.cat(parts, dim=-1)


CUBIC_DIRECTIONS = torch.tensor(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1],
     [1, 1, 0], [1, -1, 0], [1, 0, 1], [1, 0, -1], [0, 1, 1], [0, 1, -1],
     [1, 1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]], dtype=torch.float64)
"""The 13 directions of the 3D stretch energies (unnormalised): the cube's 3 axes, 6 face
diagonals and 4 body diagonals, a set the cube's rotations map onto itself."""


def basis_energies_3d(C: torch.Tensor, quartic: bool = False) -> torch.Tensor:
    """Hyperelastic basis energies Ψ_k(C̄) (…, K) for C̄ (…, 3, 3); K = 3 + 2·13, plus 3 with
    ``quartic``.

    The invariants I₁ = tr C̄, I₂ = ½(I₁² − tr C̄²), J = √det C̄ and, for the unit vectors a of
    :data:`CUBIC_DIRECTIONS`, I₄ = aᵀC̄a: Ψ₁ = ½(I₁ − 3) − ln J, Ψ₂ = ½(ln J)²,
    Ψ₃ = ½(I₂ − 3) − 2 ln J (Mooney–Rivlin-like), and per direction ½(ln I₄)² and
    I₄ − 1 − ln I₄; ``quartic`` appends Ψ₁², Ψ₁(ln J)², (ln J)⁴ as in :func:`basis_energies`.
    Each is objective, vanishes with zero stress at C̄ = I and is of order |Ē|².
    """
    C = 0.5 * (C + C.transpose(-1, -2))
    I1 = torch.diagonal(C, dim1=-2, dim2=-1).sum(-1)
    I2 = 0.5 * (I1 * I1 - (C * C).sum((-1, -2)))
    D = (C[..., 0, 0] * (C[..., 1, 1] * C[..., 2, 2] - C[..., 1, 2] * C[..., 2, 1])
         - C[..., 0, 1] * (C[..., 1, 0] * C[..., 2, 2] - C[..., 1, 2] * C[..., 2, 0])
         + C[..., 0, 2] * (C[..., 1, 0] * C[..., 2, 1] - C[..., 1, 1] * C[..., 2, 0]))
    a = CUBIC_DIRECTIONS.to(C)
    a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    I4 = torch.einsum("...ij,ki,kj->...k", C, a, a)
    lnJ, lnI4 = 0.5 * torch.log(D), torch.log(I4)
    psi1 = 0.5 * (I1 - 3) - lnJ
    parts = [torch.stack([psi1, 0.5 * lnJ**2, 0.5 * (I2 - 3) - 2 * lnJ], dim=-1),
             0.5 * lnI4**2, I4 - 1 - lnI4]
    if quartic:
        parts.append(torch.stack([psi1**2, psi1 * lnJ**2, lnJ**4], dim=-1))
    return torch.cat(parts, dim=-1)


class _Kinematics(NamedTuple):
    """What :func:`mixture_response` needs of F̄ (…, 2, 2) alone, in component form (symmetric
    2×2 tensors as their (00, 11, 01) components, each (…)): F̄'s components, C̄ = F̄ᵀF̄,
    L = ln det C̄, ψ = Ψ₁, the stretches I₄ and ln I₄ (…, n_directions), N_a = a⊗a
    ((n_directions,) each), C̄⁻¹ and B = ½(I − C̄⁻¹)."""

    F00: torch.Tensor
    F01: torch.Tensor
    F10: torch.Tensor
    F11: torch.Tensor
    C: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    L: torch.Tensor
    psi: torch.Tensor
    I4: torch.Tensor
    lnI4: torch.Tensor
    N: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    inverse: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    B: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _kinematics(F: torch.Tensor, n_directions: int) -> _Kinematics:
    """:class:`_Kinematics` of F̄ (…, 2, 2)."""
    F00, F01, F10, F11 = F[..., 0, 0], F[..., 0, 1], F[..., 1, 0], F[..., 1, 1]
    C00, C11, C01 = F00 * F00 + F10 * F10, F01 * F01 + F11 * F11, F00 * F01 + F10 * F11
    D = C00 * C11 - C01 * C01
    L = torch.log(D)
    c, s = _directions(n_directions, F)
    cc, ss, cs = c * c, s * s, c * s  # N_a = a⊗a in components, (n_directions,)
    I4 = C00[..., None] * cc + C11[..., None] * ss + (2 * C01)[..., None] * cs
    i00, i11, i01 = C11 / D, C00 / D, -C01 / D  # C̄⁻¹
    return _Kinematics(F00, F01, F10, F11, (C00, C11, C01), L, 0.5 * (C00 + C11 - 2 - L), I4,
                       torch.log(I4), (cc, ss, cs), (i00, i11, i01),
                       (0.5 * (1 - i00), 0.5 * (1 - i11), -0.5 * i01))


def _quartic(w: torch.Tensor, n_directions: int) -> bool:
    """Whether the mixture weights w (…, K) include the quartic terms (else raise for a K that
    fits no basis of ``n_directions``)."""
    K = w.shape[-1]
    if K not in (2 + 2 * n_directions, 5 + 2 * n_directions):
        raise ValueError(f"{K} mixture weights fit no basis of {n_directions} directions")
    return K == 5 + 2 * n_directions


def _gradient(w: torch.Tensor, kin: _Kinematics, n_directions: int, quartic: bool
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """f_ψ, f_L and G = ∂W̄/∂C̄ (components (00, 11, 01)) of :func:`mixture_response`."""
    w1, w2 = w[..., 0], w[..., 1]
    w3, w4 = w[..., 2:2 + n_directions], w[..., 2 + n_directions:2 + 2 * n_directions]
    # derivatives of f = w₁ψ + w₂L²/8 [+ w₅ψ² + w₆ψL²/4 + w₇L⁴/16]
    L, psi, I4 = kin.L, kin.psi, kin.I4
    f_p, f_L = w1, 0.25 * w2 * L
    if quartic:
        w5, w6, w7 = w[..., -3], w[..., -2], w[..., -1]
        f_p = f_p + 2 * w5 * psi + 0.25 * w6 * L * L
        f_L = f_L + 0.5 * w6 * psi * L + 0.25 * w7 * L**3
    gamma = w3 * kin.lnI4 / I4 + w4 * (1 - 1 / I4)
    G = tuple(f_p * b + f_L * i + gamma @ n
              for b, i, n in zip(kin.B, kin.inverse, kin.N, strict=True))
    return f_p, f_L, G


def mixture_stress_norm2(w: torch.Tensor, F: torch.Tensor, n_directions: int = 6
                         ) -> torch.Tensor:
    """‖P̄‖_F² (…) of :func:`mixture_response`'s stress P̄ for weights w (…, K) and F̄
    (…, 2, 2), without P̄ or the energy: P̄ = 2 F̄ G, so ‖P̄‖² = 4 tr(G C̄ G) = 4 tr(C̄ G²)."""
    kin = _kinematics(F, n_directions)
    _, _, (G00, G11, G01) = _gradient(w, kin, n_directions, _quartic(w, n_directions))
    C00, C11, C01 = kin.C
    return 4 * (C00 * (G00 * G00 + G01 * G01) + C11 * (G11 * G11 + G01 * G01)
                + 2 * C01 * G01 * (G00 + G11))


def mixture_response(w: torch.Tensor, F: torch.Tensor, n_directions: int = 6, *,
                     tangent: bool = True) -> dict[str, torch.Tensor]:
    """Energy W̄ = Σ_k w_k Ψ_k(C̄) of a basis mixture (:func:`basis_energies`; the quartic terms
    when w has 2·n_directions + 5 entries), its stress P̄ = ∂W̄/∂F̄ and tangent A = ∂P̄/∂F̄ in
    closed form: w (..., K) weights, F (..., 2, 2) → ``energy`` (...), ``stress`` (..., 2, 2),
    ``tangent`` (..., 2, 2, 2, 2).

    With G = ∂W̄/∂C̄ and H = ∂²W̄/∂C̄², P̄ = 2 F̄ G and A_iJkL = 2 δ_ik G_JL + 4 F̄_iI F̄_kK H_IJKL.
    The isotropic part f(ψ, L) is a function of ψ = Ψ₁ and L = ln D (D = det C̄), with
    ∂ψ/∂C̄ = B = ½(I − C̄⁻¹), ∂L/∂C̄ = C̄⁻¹ and ∂C̄⁻¹/∂C̄ = −S (S_IJKL = ½(C̄⁻¹_IK C̄⁻¹_JL +
    C̄⁻¹_IL C̄⁻¹_JK)); the stretch energies are functions g_a(I₄) of I₄ = N_a:C̄ (N = a⊗a):
    G = f_ψ B + f_L C̄⁻¹ + Σ g′_a N_a,
    H = f_ψψ B⊗B + f_ψL (B⊗C̄⁻¹ + C̄⁻¹⊗B) + f_LL C̄⁻¹⊗C̄⁻¹ + (½f_ψ − f_L) S + Σ g″_a N_a⊗N_a.
    The same numbers as automatic differentiation of the energy, in a few dozen tensor
    operations instead of five passes through a graph.
    """
    # Component form: every quantity is a (...)-shaped tensor, symmetric 2×2 tensors are their
    # (00, 11, 01) components and H is a symmetric 3×3 matrix over those pairs (Voigt order
    # without factors); no 2×2×2×2 intermediates and no einsum, as in a fused kernel.
    quartic = _quartic(w, n_directions)
    kin = _kinematics(F, n_directions)
    F00, F01, F10, F11, L, I4, lnI4 = kin.F00, kin.F01, kin.F10, kin.F11, kin.L, kin.I4, kin.lnI4
    cc, ss, cs, i00, i11, i01, b00, b11, b01 = kin.N + kin.inverse + kin.B
    w1, w2 = w[..., 0], w[..., 1]
    w3, w4 = w[..., 2:2 + n_directions], w[..., 2 + n_directions:2 + 2 * n_directions]
    energy = (w1 * kin.psi + 0.125 * w2 * L * L
              + (w3 * (0.5 * lnI4 * lnI4) + w4 * (I4 - 1 - lnI4)).sum(-1))
    if quartic:
        w5, w6, w7 = w[..., -3], w[..., -2], w[..., -1]
        energy = energy + w5 * kin.psi * kin.psi + 0.25 * w6 * kin.psi * L * L + 0.0625 * w7 * L**4
    f_p, f_L, (G00, G11, G01) = _gradient(w, kin, n_directions, quartic)
    X00, X01 = F00 * G00 + F01 * G01, F00 * G01 + F01 * G11  # F̄ G
    X10, X11 = F10 * G00 + F11 * G01, F10 * G01 + F11 * G11
    out = {"energy": energy, "stress": 2 * _matrix(X00, X01, X10, X11)}
    if not tangent:
        return out
    f_LL = 0.25 * w2
    if quartic:
        f_LL = f_LL + 0.5 * w6 * kin.psi + 0.75 * w7 * L * L
    eta = (w3 * (1 - lnI4) + w4) / (I4 * I4)
    s_, f = 0.5 * f_p - f_L, f_LL  # H = s_ S + f C̄⁻¹⊗C̄⁻¹ + Σ η N⊗N [+ quartic terms]
    H = {(0, 0): s_ * i00 * i00 + f * i00 * i00 + eta @ (cc * cc),
         (1, 1): s_ * i11 * i11 + f * i11 * i11 + eta @ (ss * ss),
         (2, 2): s_ * 0.5 * (i00 * i11 + i01 * i01) + f * i01 * i01 + eta @ (cs * cs),
         (0, 1): s_ * i01 * i01 + f * i00 * i11 + eta @ (cc * ss),
         (0, 2): s_ * i00 * i01 + f * i00 * i01 + eta @ (cc * cs),
         (1, 2): s_ * i11 * i01 + f * i11 * i01 + eta @ (ss * cs)}
    if quartic:  # + f_ψψ B⊗B + f_ψL (B⊗C̄⁻¹ + C̄⁻¹⊗B), f_ψψ = 2w₅, f_ψL = w₆L/2
        bb, bi = 2 * w5, 0.5 * w6 * L
        b, i = (b00, b11, b01), (i00, i11, i01)
        for (p, q) in H:
            H[p, q] = H[p, q] + bb * b[p] * b[q] + bi * (b[p] * i[q] + i[p] * b[q])

    def h(p: int, q: int) -> torch.Tensor:  # H is symmetric: its upper triangle is stored
        return H[min(p, q), max(p, q)]

    # A_iJkL = 2 δ_ik G_JL + 4 (F̄ h^{JL} F̄ᵀ)_ik with h^{JL}_IK = H_IJKL; Voigt index of (I, J):
    # (0,0) → 0, (1,1) → 1, (0,1) and (1,0) → 2
    v = ((0, 2), (2, 1))
    G = ((G00, G01), (G01, G11))
    blocks = {}
    for J, L_ in ((0, 0), (1, 1), (0, 1)):
        h00, h01 = h(v[0][J], v[0][L_]), h(v[0][J], v[1][L_])
        h10, h11 = h(v[1][J], v[0][L_]), h(v[1][J], v[1][L_])
        Y00, Y01 = F00 * h00 + F01 * h10, F00 * h01 + F01 * h11  # F̄ h
        Y10, Y11 = F10 * h00 + F11 * h10, F10 * h01 + F11 * h11
        T = [[4 * (Y00 * F00 + Y01 * F01), 4 * (Y00 * F10 + Y01 * F11)],  # (F̄ h F̄ᵀ)_ik
             [4 * (Y10 * F00 + Y11 * F01), 4 * (Y10 * F10 + Y11 * F11)]]
        T[0][0] = T[0][0] + 2 * G[J][L_]
        T[1][1] = T[1][1] + 2 * G[J][L_]
        blocks[J, L_] = T
    blocks[1, 0] = [[blocks[0, 1][k][i] for k in range(2)] for i in range(2)]  # major symmetry
    out["tangent"] = torch.stack([blocks[J, L_][i][k] for i in range(2) for J in range(2)
                                  for k in range(2) for L_ in range(2)], -1
                                 ).unflatten(-1, (2, 2, 2, 2))
    return out


class EnergyHead(nn.Module):
    """Per-member normalised energy W(z, C̄) = Σ_k w_k(z) Ψ_k(C̄)/e_ref² + |ê|² φ(z, ê) [+ s(z)·ê]:
    learned weights of hyperelastic basis energies (with ``quartic``, the isotropic terms of
    order |Ē|⁴ too: :func:`basis_energies`) plus (``correction``) a free higher-order term
    and (``residual``) a stress at F̄ = I, S̄₀ = σ_ref s(z) in Mandel form (e.g. the thermal
    pressure of a crystal held at its 0 K lattice constant; without it P̄(I) = 0).
    Inputs z (M, B, latent), C̄ (M, B, d, d), ê (M, B, 3 or 6) (Mandel form); output (M, B).
    ``dim`` d = 2 (plane strain, :func:`basis_energies`) or 3 (:func:`basis_energies_3d`);
    ``mlp`` builds the networks (:func:`ensemble_mlp`'s arguments; M draws of a Bayesian
    head: :mod:`~neuroscale_couple.operators.epistemic`)."""

    n_directions = 6

    def __init__(self, members: int, latent: int, hidden: int, correction: bool = True,
                 residual: bool = False, quartic: bool = False, dim: int = 2,
                 mlp: Callable[..., nn.Sequential] = ensemble_mlp) -> None:
        super().__init__()
        self.quartic, self.dim = quartic, dim
        n_basis = (2 + 2 * self.n_directions if dim == 2 else 3 + 2 * len(CUBIC_DIRECTIONS)
                   ) + (3 if quartic else 0)
        n_e = mandel_size(dim)
        self.weights = mlp(members, latent, hidden, n_basis, depth=1)
        self.higher = mlp(members, latent + n_e, hidden, 1) if correction else None
        self.residual = mlp(members, latent, hidden, n_e, depth=1) if residual else None

    @property
    def closed_form(self) -> bool:
        """True when W is the 2D basis mixture alone (no correction, no residual stress), so
        that stress and tangent follow from :func:`mixture_response` without autograd."""
        return self.dim == 2 and self.higher is None and self.residual is None

    def forward(self, z: torch.Tensor, C: torch.Tensor, e: torch.Tensor,
                e_ref: torch.Tensor) -> torch.Tensor:
        psi = (basis_energies(C, self.n_directions, self.quartic) if self.dim == 2
               else basis_energies_3d(C, self.quartic)) / e_ref**2
        W = (self.weights(z) * psi).sum(-1)
        if self.higher is not None:  # None: basis only, ~4× faster predictions
            W = W + 0.1 * (e * e).sum(-1) * self.higher(torch.cat([z, e], dim=-1))[..., 0]
        if self.residual is not None:
            W = W + (self.residual(z) * e).sum(-1)
        return W


DIAG_OFFSET = -3.0
"""Offset of the covariance factor's raw diagonal: an untrained head starts with small Σ."""


COVARIANCE_FORMS = ("network", "quadratic")
"""The allowed values of the model config key ``covariance`` (:class:`CovarianceHead`,
:class:`QuadraticCovarianceHead`)."""


class _CholeskyHead(nn.Module):
    """What the covariance heads share: the factor L = D (I + O) of Σ/σ_ref² (d² × d²) from the
    d²(d² + 1)/2 raw entries (``n`` = d²)."""

    n: int

    def factor(self, raw: torch.Tensor) -> torch.Tensor:
        """The Cholesky factor L (…, d², d²) from the network's d²(d² + 1)/2 outputs."""
        return lower_triangular(raw, self.n, diag_offset=DIAG_OFFSET)

    def factor_norm2(self, raw: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
        """tr(L Lᵀ) of :meth:`factor`'s L, without forming it, from the network's outputs along
        ``dim`` (:func:`lower_triangular_norm2`)."""
        return lower_triangular_norm2(raw, self.n, diag_offset=DIAG_OFFSET, dim=dim)


class CovarianceHead(_CholeskyHead):
    """Per-member Cholesky factor (M, B, d², d²) of the normalised aleatoric covariance of the
    d² stress components (d = ``dim``: 4×4 in 2D, 9×9 in 3D), from z and the Mandel strain."""

    def __init__(self, members: int, latent: int, hidden: int, dim: int = 2,
                 mlp: Callable[..., nn.Sequential] = ensemble_mlp) -> None:
        super().__init__()
        self.n = dim * dim
        self.net = mlp(members, latent + mandel_size(dim), hidden, self.n * (self.n + 1) // 2)

    def forward(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.factor(self.net(torch.cat([z, e], dim=-1)))


class QuadraticCovarianceHead(_CholeskyHead):
    """One Cholesky factor (1, B, d², d²) for the whole ensemble whose raw entries are
    quadratic in the Mandel strain ê with coefficients from the latent alone:

        raw_r(z, ê) = Σ_k c_rk(z) φ_k(ê),  φ(ê) = (1, ê, êᵢêⱼ for i ≤ j)   (10 in 2D, 28 in 3D)

    so that a coupled run computes c(z) (d²(d² + 1)/2 × K numbers, :meth:`coefficients`) once
    per point and model version and each evaluation is K multiply-adds per entry
    (:class:`~neuroscale_couple.operators.inference.Inference`) instead of a network pass.
    Inputs z (M, B, latent) and ê (M, B, s) are the members' copies of the same rows, as
    :class:`CovarianceHead` takes them; the first is read."""

    def __init__(self, latent: int, hidden: int, dim: int = 2) -> None:
        super().__init__()
        self.n, s = dim * dim, mandel_size(dim)
        self.features = 1 + s + s * (s + 1) // 2
        self.net = ensemble_mlp(1, latent, hidden, self.n * (self.n + 1) // 2 * self.features)

    def coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """c(z) (B, d²(d² + 1)/2, K) of latents z (B, latent)."""
        return self.net(z.unsqueeze(0))[0].unflatten(-1, (-1, self.features))

    @staticmethod
    def strain_features(e: torch.Tensor) -> torch.Tensor:
        """φ(ê) (…, K) of Mandel strains ê (…, s): 1, ê and the products êᵢêⱼ, i ≤ j."""
        i, j = torch.triu_indices(e.shape[-1], e.shape[-1], device=e.device)
        return torch.cat([torch.ones_like(e[..., :1]), e, e[..., i] * e[..., j]], dim=-1)

    def raw(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The factor's raw entries (B, d²(d² + 1)/2) at latents z (B, latent) and Mandel
        strains ê (B, s)."""
        return (self.coefficients(z) @ self.strain_features(e).unsqueeze(-1))[..., 0]

    def forward(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.factor(self.raw(z[0], e[0])).unsqueeze(0)


class FineDecoder(nn.Module):
    """Periodic fluctuation field w(y) (B, 2, n, n) from the encoder's feature map, the latent,
    the macro strain and an optional noise field (one realization per noise draw).

    The load enters by FiLM (feature-wise scale and shift), then Fourier blocks decode; w is in
    cell lengths and its mean is removed (the fluctuation is defined up to a translation).
    """

    def __init__(self, width: int, latent: int, modes: int, blocks: int = 2) -> None:
        super().__init__()
        self.film = nn.Sequential(nn.Linear(latent + 3, 2 * width), nn.SiLU(),
                                  nn.Linear(2 * width, 2 * width))
        self.noise = nn.Conv2d(1, width, 1)
        self.blocks = nn.Sequential(*(FourierBlock(width, modes) for _ in range(blocks)))
        self.project = nn.Conv2d(width, 2, 1)

    def forward(self, features: torch.Tensor, z: torch.Tensor, e: torch.Tensor,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        scale, shift = self.film(torch.cat([z, e], dim=-1)).chunk(2, dim=-1)
        h = features * (1 + scale[..., None, None]) + shift[..., None, None]
        if noise is not None:
            h = h + self.noise(noise)
        w = self.project(self.blocks(h))
        return w - w.mean(dim=(-2, -1), keepdim=True)
