"""The single-scale limit of the plate examples: a closed-form Neo-Hookean law, no micro solver.

FE² pays for a micro answer at every quadrature point. The cheapest a coupled run could ever
be is the same macro problem with a closed-form law in its place: the same mesh, boundary
conditions, load steps and Newton/linear solver (:data:`plate_with_hole.NEWTON`). The scaling
benchmark divides an FE² run's time by this one's (``limit_ratio``).

The law is the compressible Neo-Hookean of the micro phases (``neuroscale_couple.materials``)
in plane strain (in 3D on the eighth coupon),

    ψ(F) = μ/2 (tr C + 1 − 3) − μ ln J + λ/2 (ln J)²,   P = ∂ψ/∂F = μ (F − F⁻ᵀ) + λ ln J F⁻ᵀ,

with Lamé constants (λ, μ) per cell given by the example (``lame_at``), piecewise constant
(DG0, at the cell midpoints), integrated with the one-point rule of the FE² run's micro
responses: exact for P1 displacements, whose gradient is constant per cell.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

from mpi4py import MPI

import numpy as np

from neuroscale_couple.errors import SolveError

LOG = logging.getLogger("neuroscale_couple.run")

LameAt = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""Points x (n, d) → Lamé constants (λ (n,), μ (n,)) in stress units."""


def neo_hookean_stress(F, lmbda, mu):
    """UFL first Piola–Kirchhoff stress P = μ (F − F⁻ᵀ) + λ ln J F⁻ᵀ of the compressible
    Neo-Hookean law (F d×d: 2×2 plane strain, or 3×3; λ and μ in stress units)."""
    import ufl

    F_inv_T = ufl.inv(F).T
    return mu * (F - F_inv_T) + lmbda * ufl.ln(ufl.det(F)) * F_inv_T


def solve_steps(u, bcs: list, lmbda, mu, loads: np.ndarray, set_load: Callable[[float], None],
                reaction_dofs: np.ndarray, *, petsc_options: dict | None = None) -> list[dict]:
    """Newton solve of ∫ P(I + ∇u) : ∇v dx = 0 (:func:`neo_hookean_stress`, λ and μ constants
    or DG0 functions) at each load factor of ``loads``; raises :class:`SolveError` at a step
    that does not converge. Each record: ``step``, ``load``, ``residuals`` (one Newton
    history, as :class:`~neuroscale_couple.adapters.fenicsx_steps.LoadStepper` records it),
    ``newton_iterations``, ``reaction_force`` (sum of the internal force over
    ``reaction_dofs``, stress unit × length) and ``time_s``."""
    import ufl
    from dolfinx import fem
    from dolfinx.fem.petsc import NonlinearProblem, assemble_vector
    from petsc4py import PETSc
    from plate_with_hole import NEWTON

    from neuroscale_couple.adapters.fenicsx import owned_sum

    V = u.function_space
    dx = ufl.Measure("dx", domain=V.mesh, metadata={"quadrature_degree": 1})
    P = neo_hookean_stress(ufl.Identity(V.mesh.geometry.dim) + ufl.grad(u), lmbda, mu)
    residual = ufl.inner(P, ufl.grad(ufl.TestFunction(V))) * dx
    problem = NonlinearProblem(residual, u, bcs=bcs, petsc_options_prefix="single_",
                               petsc_options={**NEWTON, **(petsc_options or {})})
    snes = problem.solver
    norms: list[float] = []
    snes.setMonitor(lambda _snes, _it, norm: norms.append(float(norm)))
    internal = fem.form(residual)
    history = []
    for k, t in enumerate(loads):
        start = time.perf_counter()
        set_load(float(t))
        norms.clear()
        problem.solve()
        if snes.getConvergedReason() <= 0:
            raise SolveError(f"single-scale load step {k} (load {t:g}) did not converge (SNES "
                             f"reason {snes.getConvergedReason()}): take more load steps")
        f = assemble_vector(internal)
        f.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
        history.append({"step": k, "load": float(t), "residuals": [list(norms)],
                        "newton_iterations": snes.getIterationNumber(),
                        "reaction_force": owned_sum(f, reaction_dofs, V),
                        "time_s": time.perf_counter() - start})
        f.destroy()
    return history


def run_single_scale(args: argparse.Namespace, lame_at: LameAt,
                     comm: MPI.Comm = MPI.COMM_WORLD, *, thickness: float | None = None) -> dict:
    """The plate of ``args`` (``mesh_size``, ``steps``, ``stretch``, ``out``, ``quiet``; with
    ``thickness`` the eighth coupon of that half-thickness) with the closed-form law, (λ, μ) per
    cell from ``lame_at``; writes ``summary.json`` into
    ``args.out`` (rank 0) and returns the summary: the fields of the coupled runs' summary that
    apply (dofs, points, ranks, steps, times, Newton iterations, reaction force, displacement
    norm, ``per_rank`` peak memory) and ``single_scale: true``."""
    import json
    from pathlib import Path

    from dolfinx import fem
    from plate_with_hole import (
        HOLE_RADIUS,
        check,
        check_loading,
        mesh_size,
        per_rank,
        plate_with_hole,
        quarter_loading,
    )

    from neuroscale_couple.adapters.fenicsx_steps import displacement_norm

    check_loading(args)
    logging.basicConfig(level=logging.WARNING if args.quiet or comm.rank else logging.INFO,
                        format="%(message)s")
    t_start = time.perf_counter()
    msh = plate_with_hole(comm, mesh_size(args.mesh_size), HOLE_RADIUS, thickness)
    u, bcs, set_load, right = quarter_loading(msh, args.stretch)
    d = msh.geometry.dim
    Q = fem.functionspace(msh, ("DG", 0))
    lmbda, mu = fem.Function(Q, name="lambda"), fem.Function(Q, name="mu")
    for k, f in enumerate((lmbda, mu)):
        f.interpolate(lambda x, k=k: np.asarray(lame_at(x[:d].T)[k], dtype=float))
    cells = msh.topology.index_map(d).size_global
    dofs = u.function_space.dofmap.index_map.size_global * d
    LOG.info("single-scale Neo-Hookean %dD plate: %d dofs, %d cells, %d ranks", d, dofs, cells,
             comm.size)
    t_steps = time.perf_counter()
    history = solve_steps(u, bcs, lmbda, mu, np.linspace(0, 1, args.steps + 1)[1:], set_load,
                          right)
    t_end = time.perf_counter()
    summary = {"single_scale": True, "dofs": dofs, "quadrature_points": cells,
               "ranks": comm.size, "steps": history, "total_time_s": t_end - t_start,
               "setup_time_s": t_steps - t_start, "steps_time_s": t_end - t_steps,
               "newton_iterations": [h["newton_iterations"] for h in history],
               "displacement_norm": displacement_norm(u),
               "reaction_force": history[-1]["reaction_force"], "per_rank": per_rank(comm, {})}
    if comm.rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        check(summary)
        LOG.info("done in %.2f s (steps %.2f s, Newton %s): %s", summary["total_time_s"],
                 summary["steps_time_s"], summary["newton_iterations"], out / "summary.json")
    return summary
