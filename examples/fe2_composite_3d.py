"""3D FE² of a particle composite open-hole coupon, RVEs done by the 3D operator.

It is ``fe2_composite.py`` in 3D: the same command line, Coupler, load stepping and outputs,
with the 3D operator (``examples/models/fe2_composite_3d.pt``, trained on random-sphere cells)
and the 3D periodic RVE solver as its fallback.

Macro problem (the eighth of an open-hole coupon: the plate of half-width 1 with a central
hole of radius 0.3 through its thickness 2·t₃, t₃ = 0.25; symmetry on x = 0, y = 0 and z = 0):
find u with u·n = 0 on the symmetry planes, u_x = δ(t) on x = 1,

    ∫ P̄(F̄) : ∇v dx = 0,   F̄ = I + ∇u (3×3),

where P̄(F̄) at every quadrature point is the homogenized stress of its own random periodic
particle cell: 1–6 Neo-Hookean glass-like spheres in an epoxy-like matrix (stresses in GPa),
particle fraction graded from 0.05 at the hole to 0.25 at the loaded face (the shipped model
was trained on 0.05–0.3). The Coupler answers with the trained operator and falls back to the
true periodic RVE solver wherever the calibrated error bound exceeds --atol + --rtol·|P̄|, and
wherever the point lies outside the model's training region (--outside).

Run: ``mpiexec -n 2 python examples/fe2_composite_3d.py --out out/fe2_3d``. Output in --out, as
the 2D example's: ``summary.json`` (``displacement_norm``, ``reaction_force``, per-step
records), ``fields.npz``, ``displacement.bp`` (VTX for ParaView), ``micro_fields.xdmf``,
``fields.png`` (P̄₁₁, bound and source on the mid-plane slice), ``steps.png`` (load–reaction
curve, fallback rate per step), ``checkpoint/`` and ``replay/``. ``--reference`` runs classic
FE² (every point on the RVE solver), ``--single-scale`` the closed-form Voigt-mixture law.

A cold start (``--model none``) is built for the 2D example only and is refused here, as is a
model trained on 2D cells.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpi4py import MPI

import numpy as np
from fe2_composite import (
    check_composite_arguments,
    composite,
    composite_arguments,
    composite_run,
    graded_fraction,
    voigt_lame,
)
from plate_with_hole import CoupledRun, main_guard, prepare, retrain_config, run_example

from neuroscale_couple.errors import InputError

DEFAULT_MODEL = Path(__file__).parent / "models" / "fe2_composite_3d.pt"
HALF_THICKNESS = 0.25
"""t₃: the coupon's half-thickness (the eighth spans z ∈ [0, t₃]), in plate half-widths."""
FRACTION = (0.05, 0.2)
"""Particle volume fraction at the hole edge, and what it grows by to the loaded face."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = composite_arguments(__doc__.splitlines()[0], out="out/fe2_composite_3d",
                            model=DEFAULT_MODEL, stretch=0.06, rtol=0.15, rve_mesh_size=0.1)
    p.set_defaults(mesh_size="0.3", steps=3)
    args = check_composite_arguments(p, p.parse_args(argv))
    if str(args.model).lower() == "none" and not args.reference:
        p.error("--model none (a cold start) is built for the 2D example (fe2_composite.py) "
                f"only: give a model trained on 3D cells (default {DEFAULT_MODEL}), or "
                "--reference for classic FE²")
    return args


def particle_fraction(x: np.ndarray) -> np.ndarray:
    """Particle volume fraction at macro points x (n, 3), graded in the plane (x, y)."""
    return graded_fraction(x, *FRACTION)


def microstructures_at(x: np.ndarray, ids: np.ndarray) -> list:
    """Each point's own random sphere arrangement (1–6 spheres), drawn from its
    (partition-free) id."""
    from neuroscale_couple.solvers.cells3d import random_spheres

    v = particle_fraction(x)
    return [random_spheres(float(vi), int(1 + i % 6), int(i))
            for vi, i in zip(v, ids, strict=True)]


def build(args: argparse.Namespace, comm: MPI.Comm) -> CoupledRun:
    """Macro problem and Coupler; all input is checked before collective work (a model of
    another dimension is refused here, before the mesh is made)."""
    policy, model_path, model = prepare(args)
    if model is not None and model.dim != 3:
        raise InputError(f"--model {args.model} takes {model.dim}D loads (F̄ "
                         f"{model.dim}×{model.dim}): the 3D coupon needs a model trained on 3D "
                         f"cells (default {DEFAULT_MODEL})")
    return composite_run(args, comm, (policy, model_path, model), retrain_config(args),
                         microstructures_at, thickness=HALF_THICKNESS)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.single_scale:
        from single_scale import run_single_scale

        return run_single_scale(args, lambda x: voigt_lame(x, composite(args), particle_fraction),
                                thickness=HALF_THICKNESS)
    return run_example(args, build)


if __name__ == "__main__":
    main_guard(main, "fe2_composite_3d")
