"""Sampling of training inputs: microstructure parameters and macro loads.

Every draw is keyed on (seed, index), so sample i is the same whatever the number of MPI ranks
or the order in which samples are solved.
"""

from __future__ import annotations

import numpy as np

from neuroscale_couple.errors import InputError


def rng_for(seed: int, index: int) -> np.random.Generator:
    """The random generator of item ``index`` of a stream with base ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM = np.uint64(0xD1B54A32D192ED03)


def uniform_by_id(ids: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """A uniform number in [0, 1) for each id (n,) of stream ``stream`` (e.g. a load step) of
    ``seed``: a splitmix64 hash of (seed, stream, id), so a draw by point id does not depend on
    which rank holds the point."""
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):  # splitmix64: wrapping arithmetic is the point
        x = x + np.uint64(seed + 1) * _GOLDEN + np.uint64(stream) * _STREAM
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53


def loads_in_ball(n: int, radius: float, rng: np.random.Generator, min_det: float = 0.2,
                  min_radius: float = 0.0, dim: int = 2) -> np.ndarray:
    """n deformation gradients uniform in the shell min_radius ≤ ‖F̄ − I‖_Frobenius ≤ radius.

    Uniform in the d²-dimensional ball (or shell: loads beyond a training ball, for
    out-of-distribution tests), so tension, compression, shear and rotation all occur;
    det F̄ ≥ min_det. Shape (n, d, d), d = ``dim`` (2: plane strain, 3).
    """
    if not 0 < radius < np.inf or not 0 <= min_radius < radius:
        raise InputError(f"loads.radius={radius}, loads.min_radius={min_radius}: need "
                         "0 ≤ min_radius < radius (e.g. radius 0.15)")
    out = np.empty((n, dim, dim))
    k, m = 0, dim * dim
    while k < n:
        d = rng.standard_normal(m)
        r = (min_radius**m + rng.random() * (radius**m - min_radius**m)) ** (1 / m)
        F = np.eye(dim) + (d / np.linalg.norm(d) * r).reshape(dim, dim)
        if np.linalg.det(F) >= min_det:
            out[k] = F
            k += 1
    return out


def draw_parameter(spec, rng: np.random.Generator, name: str, integer: bool = False):
    """A number, or a uniform draw from ``[low, high]`` (inclusive for integers)."""
    if isinstance(spec, (list, tuple)):
        if len(spec) != 2 or spec[0] > spec[1]:
            raise InputError(f"{name}={spec}: give a number or a range [low, high] with low ≤ high")
        if integer:
            return int(rng.integers(int(spec[0]), int(spec[1]) + 1))
        return float(rng.uniform(spec[0], spec[1]))
    if not isinstance(spec, (int, float)):
        raise InputError(f"{name}={spec!r}: give a number or a range [low, high]")
    return int(spec) if integer else float(spec)
