"""The compiled CPU kernel of the 2D basis-mixture operator in the loop (``closed_form.c``).

:func:`closed_form_2d` computes, point by point in registers, what
:class:`~neuroscale_couple.operators.inference.Inference` answers for a basis-mixture energy
head (:func:`~neuroscale_couple.operators.heads.mixture_response`): the energy W̄, stress P̄ and
tangent A of the members' mean weights, the members' spread mean_m ‖P(w_m − w̄)‖² (the
epistemic trace) and, for a strain-quadratic covariance head
(:class:`~neuroscale_couple.operators.heads.QuadraticCovarianceHead`), tr Σ/σ_ref² of its
factor (the aleatoric trace). The same formulas as the torch closed form (which serves other
devices), in float64, without its few dozen passes over memory per evaluation.

Compiled on first use (:func:`neuroscale_couple.native.library`); without a C compiler
:func:`library` is None and the operator runs in torch.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from neuroscale_couple import native

SOURCE = Path(__file__).with_name("closed_form.c")

_f64 = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
_i64 = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
_any = ctypes.c_void_p
_int, _double = ctypes.c_int, ctypes.c_double
ARGUMENTS = (ctypes.c_int64, _f64, _i64, _any, _int, _f64, _int, _any, _int, _any, _int, _int, _f64,
             _f64, _f64, _int, _double, _double, _double, _f64, _f64, _f64, _f64, _f64)


def library():
    """The compiled kernel ``ns_closed_form_2d``; None without a C compiler."""
    return native.function(SOURCE, "ns_closed_form_2d", ARGUMENTS)


@functools.lru_cache(maxsize=1)
def _order_of(rows: bytes) -> np.ndarray:
    return np.argsort(np.frombuffer(rows, dtype=np.int64), kind="stable")


def _row_order(rows: np.ndarray) -> np.ndarray | None:
    """The points in the order of their latent ``rows`` (n,) int64, so that the kernel reads
    the per-latent arrays front to back (None: already in that order, as a Coupler's points
    are when the host evaluates them in the order it registered them). Remembered for the
    last ``rows`` (those of every evaluation of a run)."""
    if len(rows) < 2 or (rows[1:] >= rows[:-1]).all():
        return None
    return _order_of(rows.tobytes())


def closed_form_2d(F: np.ndarray, rows: np.ndarray, w_mean: np.ndarray, w_dev: np.ndarray,
                   coef: np.ndarray, directions: tuple[np.ndarray, ...], quartic: bool,
                   e_ref: float, diag_offset: float, min_diag: float,
                   out: tuple[np.ndarray, ...]) -> None:
    """The response of n points with F̄ ``F`` (n, 2, 2) float64 whose latents are ``rows`` (n,),
    written into ``out`` = stress (n, 2, 2), tangent (n, 2, 2, 2, 2), energy, aleatoric and
    epistemic traces (n,) (float64, C order; the aleatoric trace is that of Σ/σ_ref², left
    untouched without a quadratic head).

    Per latent row: ``w_mean`` (u, K) float64 the members' mean weights, ``w_dev`` (u, M, K)
    each member's difference from it and ``coef`` (u, 10, 10) a quadratic covariance head's
    coefficients c(z) ((u, 0, 0): no such head), both float32 or both float64.
    ``directions``: cos², sin², cos·sin (n_directions,) of the basis directions; ``quartic``:
    whether w holds the quartic terms; ``e_ref``: the strain scale of the head's input;
    ``diag_offset``, ``min_diag``: its factor's diagonal map. Raises RuntimeError without a
    compiled kernel (:func:`library`)."""
    kernel = library()
    if kernel is None:
        raise RuntimeError("no compiled kernel: see the warning above (a C compiler is needed)")
    if w_dev.dtype != coef.dtype or w_dev.dtype not in (np.float32, np.float64):
        raise TypeError(f"w_dev and coef must both be float32 or float64, not {w_dev.dtype} "
                        f"and {coef.dtype}")
    if any(not (a.flags.c_contiguous and a.dtype == np.float64) for a in out):
        raise TypeError("the outputs must be C-contiguous float64 arrays")
    w_dev, coef = np.ascontiguousarray(w_dev), np.ascontiguousarray(coef)
    (u, K), M = w_mean.shape, w_dev.shape[1]
    n = len(F)
    shapes = [a.shape for a in (F, rows, w_dev, coef, *out)]
    if shapes != [(n, 2, 2), (n,), (u, M, K), (u, *coef.shape[1:]), (n, 2, 2),
                  (n, 2, 2, 2, 2), (n,), (n,), (n,)] or coef.shape[1:] not in ((0, 0), (10, 10)):
        raise ValueError(f"shapes {shapes} of F̄, rows, w_dev, coef and the outputs do not fit "
                         f"{n} points of {u} latents with {M} members of {K} weights")
    if len(rows) and not 0 <= rows.min() <= rows.max() < u:
        raise IndexError(f"rows must lie in [0, {u}): the latents' rows")
    cc, ss, cs = (np.ascontiguousarray(d, dtype=np.float64) for d in directions)
    rows = np.ascontiguousarray(rows, np.int64)
    order = _row_order(rows)
    status = kernel(
        len(F), np.ascontiguousarray(F, dtype=np.float64), rows,
        None if order is None else order.ctypes.data, K,
        np.ascontiguousarray(w_mean, dtype=np.float64), M, w_dev.ctypes.data, coef.shape[1],
        coef.ctypes.data, int(w_dev.dtype == np.float64), len(cc), cc, ss, cs, int(quartic),
        e_ref, diag_offset, min_diag, *out)
    if status:
        raise ValueError(f"{len(cc)} basis directions or a factor of {coef.shape[1]} entries: "
                         "the kernel takes ≤ 16 directions and 10 factor entries (2D)")
