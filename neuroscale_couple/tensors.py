"""Tensor conventions at the host boundary.

- Kinematics are 2D plane strain: the deformation gradient F̄ is a 2×2 array (F₃₃ = 1 implied);
  3D cells (:mod:`neuroscale_couple.solvers.cells3d`) take F̄ 3×3 and give P 3×3, A 3×3×3×3.
- Stress is the first Piola–Kirchhoff stress P (2×2), tangent A = ∂P/∂F (2×2×2×2, ``A[i,j,k,l]
  = ∂P_ij/∂F_kl``), both float64, in the units of the elastic moduli given by the user.
- Batches carry the point index first: F (n, 2, 2), P (n, 2, 2), A (n, 2, 2, 2, 2).
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
    det = np.linalg.det(arr)
    if np.any(det <= 1e-12):
        bad = int(np.argmax(det <= 1e-12))
        raise InputError(
            f"{name}[{bad}] = {arr[bad].tolist()} has det F = {det[bad]:.3g}: a deformation "
            "gradient must be invertible and preserve orientation (det F > 0)"
        )
    return arr



def acoustic_minimum(A: np.ndarray, directions: int = 36) -> np.ndarray:
    """Smallest eigenvalue of the acoustic tensor Q(n)ᵢₖ = Aᵢⱼₖₗ nⱼ nₗ over ``directions`` unit
    vectors n of the half circle, per tangent A (m, 2, 2, 2, 2): (m,). ≤ 0 means the tangent has
    lost strong ellipticity (Legendre–Hadamard): a localisation band may form there, and an
    operator's tangent showing it outside the training region deserves suspicion."""
    angles = np.linspace(0.0, np.pi, directions, endpoint=False)
    c, s = np.cos(angles), np.sin(angles)
    # Q(n) = c² A[:, :, 0, :, 0] + cs (A[:, :, 0, :, 1] + A[:, :, 1, :, 0]) + s² A[:, :, 1, :, 1]
    parts = np.stack([A[:, :, 0, :, 0], A[:, :, 0, :, 1] + A[:, :, 1, :, 0], A[:, :, 1, :, 1]],
                     axis=-1).reshape(len(A), 4, 3)
    Q = parts @ np.stack([c * c, c * s, s * s])  # (m, 4, directions): Q00, Q01, Q10, Q11
    half_trace = 0.5 * (Q[:, 0] + Q[:, 3])
    gap = np.hypot(0.5 * (Q[:, 0] - Q[:, 3]), 0.5 * (Q[:, 1] + Q[:, 2]))
    return (half_trace - gap).min(axis=1)
