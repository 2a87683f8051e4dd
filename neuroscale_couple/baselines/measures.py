"""Numerical checks of two properties of a homogenised law P̄(F̄): objectivity and the major
symmetry of its tangent (what a hyperelastic RVE response has exactly)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def rotation(theta: torch.Tensor) -> torch.Tensor:
    """Rotations Q (..., 2, 2) by the angles ``theta`` (...), radians."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def objectivity_error(stress: Callable[[torch.Tensor], torch.Tensor], F: torch.Tensor, *,
                      rotations: int = 8, max_angle: float = math.pi, seed: int = 0) -> float:
    """Largest relative violation of P̄(Q F̄) = Q P̄(F̄) over ``rotations`` random rotations Q
    by angles uniform in ±``max_angle`` (radians): max_Q ‖P̄(Q F̄) − Q P̄(F̄)‖ / ‖P̄(F̄)‖
    (Frobenius norms over all the loads F̄ (B, 2, 2)). 0 for an objective law (to round-off)."""
    gen = torch.Generator().manual_seed(seed)
    angles = max_angle * (2 * torch.rand(rotations, generator=gen, dtype=torch.float64) - 1)
    with torch.no_grad():
        P = stress(F)
        norm = torch.linalg.norm(P)
        return max(float(torch.linalg.norm(stress(Q @ F) - Q @ P) / norm)
                   for Q in rotation(angles).to(F.dtype))


def major_symmetry_error(A: torch.Tensor) -> float:
    """‖A_iJkL − A_kLiJ‖ / ‖A‖ of tangents A (B, 2, 2, 2, 2): 0 for a hyperelastic law."""
    return float(torch.linalg.norm(A - A.permute(0, 3, 4, 1, 2)) / torch.linalg.norm(A))
