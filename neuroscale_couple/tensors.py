"""Tensor conventions at the host boundary.

- Kinematics are d-dimensional: the deformation gradient F̄ is a d×d array, d = 2 plane strain
  (F₃₃ = 1 implied) or d = 3 (3D cells, :mod:`neuroscale_couple.solvers.cells3d`).
- Stress is the first Piola–Kirchhoff stress P (d×d), tangent A = ∂P/∂F (d×d×d×d, ``A[i,j,k,l]
  = ∂P_ij/∂F_kl``), both float64, in the units of the elastic moduli given by the user.
- Batches carry the point index first: F (n, d, d), P (n, d, d), A (n, d, d, d, d).
"""

from __future__ import annotations

import numpy as np

from neuroscale_couple.errors import InputError


def as_deformation_batch(F: np.ndarray | list, name: str = "F", dims: tuple[int, ...] = (2,)
                         ) -> np.ndarray:
    """Validate deformation gradients and return them as a float64 batch of shape (n, d, d).

    Accepts one d×d gradient or a batch (n, d, d) with d in ``dims`` (plane strain: 2; the
    atomistic solvers also take 3). Raises :class:`InputError` for a wrong shape, non-finite
    entries or det F ≤ 0 (singular or inverted), naming the first bad index.
    """
    arr = np.asarray(F, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[0] == arr.shape[1]:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2] or arr.shape[1] not in dims:
        shapes = " or ".join(f"{d}×{d}" for d in dims)
        raise InputError(
            f"{name} has shape {np.shape(F)}: give one {shapes} deformation gradient or a batch "
            f"(n, {dims[0]}, {dims[0]})"
        )
    if not np.all(np.isfinite(arr)):
        bad = int(np.argwhere(~np.isfinite(arr).all(axis=(1, 2)))[0, 0])
        raise InputError(f"{name}[{bad}] has non-finite entries: {arr[bad].tolist()}")
    det = determinant(arr)
    if np.any(det <= 1e-12):
        bad = int(np.argmax(det <= 1e-12))
        raise InputError(
            f"{name}[{bad}] = {arr[bad].tolist()} has det F = {det[bad]:.3g}: a deformation "
            "gradient must be invertible and preserve orientation (det F > 0)"
        )
    return arr


def determinant(F: np.ndarray) -> np.ndarray:
    """det F (…) of matrices F (…, d, d), in closed form for d = 2 and 3: ~50× faster per
    matrix than the batched LU of ``np.linalg.det``, which runs every evaluation of a
    coupled run on every point (input checks, training region)."""
    if F.shape[-1] == 2:
        return F[..., 0, 0] * F[..., 1, 1] - F[..., 0, 1] * F[..., 1, 0]
    if F.shape[-1] == 3:
        return (F[..., 0, 0] * (F[..., 1, 1] * F[..., 2, 2] - F[..., 1, 2] * F[..., 2, 1])
                - F[..., 0, 1] * (F[..., 1, 0] * F[..., 2, 2] - F[..., 1, 2] * F[..., 2, 0])
                + F[..., 0, 2] * (F[..., 1, 0] * F[..., 2, 1] - F[..., 1, 1] * F[..., 2, 0]))
    return np.linalg.det(F)


ACOUSTIC_CHUNK = 512
"""Tangents per chunk of :func:`acoustic_minimum` (3D: 432 directions, 16 MB of Q a chunk)."""


def acoustic_minimum(A: np.ndarray, directions: int = 36) -> np.ndarray:
    """Smallest eigenvalue of the (symmetrised) acoustic tensor Q(n)ᵢₖ = Aᵢⱼₖₗ nⱼ nₗ over unit
    vectors n, per tangent A (m, d, d, d, d): (m,). d = 2: ``directions`` angles of the half
    circle; d = 3: ``directions``²/3 points of a Fibonacci lattice on the half sphere (as fine
    a spacing). ≤ 0 means the tangent has lost strong ellipticity (Legendre–Hadamard): a
    localisation band may form there, and an operator's tangent showing it outside the
    training region deserves suspicion."""
    d = A.shape[1]
    if d == 2:
        angles = np.linspace(0.0, np.pi, directions, endpoint=False)
        normals = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    else:
        k = directions * directions // 3
        z = (np.arange(k) + 0.5) / k  # uniform in z ∈ (0, 1): uniform on the half sphere
        phi = np.pi * (3.0 - np.sqrt(5.0)) * np.arange(k)
        r = np.sqrt(1.0 - z * z)
        normals = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    nn = np.einsum("pj,pl->pjl", normals, normals).reshape(len(normals), d * d)
    out = np.empty(len(A))
    for i in range(0, len(A), ACOUSTIC_CHUNK):  # Q of a chunk: (c, directions, d, d) float64
        a = A[i:i + ACOUSTIC_CHUNK]
        Q = (a.transpose(0, 1, 3, 2, 4).reshape(-1, d * d) @ nn.T).reshape(len(a), d, d, -1)
        Q = Q.transpose(0, 3, 1, 2)  # (c, directions, i, k)
        out[i:i + ACOUSTIC_CHUNK] = _lowest_eigenvalue(0.5 * (Q + Q.swapaxes(-1, -2))).min(axis=1)
    return out


def _lowest_eigenvalue(S: np.ndarray) -> np.ndarray:
    """Smallest eigenvalue (…) of symmetric matrices S (…, d, d); for d = 2 in closed form,
    (a + c)/2 − √(((a − c)/2)² + b²), ~20× faster than the batched ``eigvalsh``."""
    if S.shape[-1] != 2:
        return np.linalg.eigvalsh(S)[..., 0]
    a, b, c = S[..., 0, 0], S[..., 0, 1], S[..., 1, 1]
    return 0.5 * (a + c) - np.hypot(0.5 * (a - c), b)
