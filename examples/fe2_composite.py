"""FE² of a functionally graded fibre composite plate with a hole, RVEs done by the operator.

It illustrates how to:

- give every macro quadrature point its own microstructure (drawn from its partition-free id);
- build a :class:`~neuroscale_couple.coupler.Coupler` of the trained operator with fallback to
  the true periodic RVE solver and online retraining;
- plug it into a DOLFINx ``NonlinearProblem`` with ``MicroStress`` (in ``plate_with_hole.py``)
  and step the load with cut-back and checkpoints (``LoadStepper``).

Macro problem (plane strain, quarter of a square plate of width 2 with a central hole of radius
0.3, symmetry on x = 0 and y = 0): find u with u·n = 0 on the symmetry edges, u_x = δ(t) on x = 1,

    ∫ P̄(F̄) : ∇v dx = 0,   F̄ = I + ∇u,

where P̄(F̄) at every quadrature point is the homogenized stress of its own random periodic
microstructure: Neo-Hookean glass-like fibres in an epoxy-like matrix (stresses in GPa), fibre
fraction graded from 0.15 at the hole to 0.45 at the loaded edge. The Coupler answers with the
trained operator and falls back to the true periodic RVE solver wherever the calibrated error
bound exceeds --atol + --rtol·|P̄|, and wherever the point lies outside the model's training
region (--outside). A point that fell back is served in the later steps by its own cell fit
(:mod:`neuroscale_couple.cell_fits`: the energy basis fitted to its RVE solves) wherever that
fit's calibrated bound allows (``--no-cell-fits``: solved again every step).

Run: ``mpiexec -n 4 python examples/fe2_composite.py --out out/fe2``. Output in --out:
``summary.json``, ``fields.npz`` (per point stress/uncertainty/source, per dof u),
``displacement.bp`` (VTX), ``micro_fields.xdmf`` (cell stress, uncertainty, source), PNGs
(stress, uncertainty and fallback maps, load–displacement curve, fallback rate per step),
``checkpoint/`` (restart with --restart) and ``replay/`` (every fine solve; --replay-from starts a
later run from it). The script ends by checking itself (every step converged, reaction force
grows with the load, and, with --compare, the errors against a reference run).

``--matrix E NU`` and ``--fibre E NU`` give other phases. The shipped model knows only its own;
``--model examples/models/fe2_family.pt`` takes any phases inside its ranges, and others with
``--outside-material fallback`` (every point on the RVE until ``--run-calibration``'s first
census calibrates the bound at the run's material); ``--model none`` runs a cold start
(:mod:`neuroscale_couple.cold_start`): classic FE² at first, then each point on its own cell
fit (:mod:`neuroscale_couple.cell_fits`: the energy basis fitted to the point's RVE solves) as
soon as its bound, calibrated on audited points' solves after every step, allows
(``--no-cell-fits``: heads trained in the background on the shipped model's frozen encoder
instead), e.g.
``mpiexec -n 2 python examples/fe2_composite.py --model none --matrix 70 0.33 --fibre 410 0.14
--rtol 0.02``.

``--single-scale`` solves the same plate, mesh and load steps with a closed-form Neo-Hookean law
instead (``single_scale.py``): Lamé constants of the graded composite by the Voigt rule of
mixtures of the phases' (λ, μ) at each cell's fibre fraction — an upper bound of the stiffness,
the cost limit an FE² run is measured against, not its answer.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

from mpi4py import MPI

import numpy as np
from plate_with_hole import (
    HOLE_RADIUS,
    CoupledRun,
    cold_start,
    coupled_arguments,
    main_guard,
    prepare,
    quarter_plate,
    retrain_config,
    run_example,
)

DEFAULT_MODEL = Path(__file__).parent / "models" / "fe2_composite.pt"
# a cold start (--model none) takes the encoder of this model and trains fresh heads
# Neo-Hookean epoxy-like matrix and glass-like fibres (E in GPa), the phases of the shipped model
COMPOSITE = {"law": "neo_hookean", "matrix": {"E": 3.0, "nu": 0.35},
             "fibre": {"E": 70.0, "nu": 0.2}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = composite_arguments(__doc__.splitlines()[0], out="out/fe2_composite",
                            model=DEFAULT_MODEL, stretch=0.08, rtol=0.05, rve_mesh_size=0.02)
    p.add_argument("--cold-encoder", default=str(DEFAULT_MODEL),
                   help="--model none: the model whose (frozen) encoder the cold start takes; "
                   "its heads are trained afresh from the run's fine solves (e.g. "
                   "examples/models/fe2_composite_fast.pt, the distilled encoder)")
    p.add_argument("--held-out", type=float, default=0.05,
                   help="--model none: share of the points kept on the fine solver for the "
                   "conformal calibration (cell fits: audited, drawn afresh each step; network "
                   "heads: held out for good, never trained on)")
    p.add_argument("--no-cell-fits", action="store_true",
                   help="without cell fits (neuroscale_couple.cell_fits: each point that fell "
                   "back served in the later steps by the energy basis fitted to its own RVE "
                   "solves, where that fit's calibrated bound allows): a trained model's "
                   "fallback points are solved again every step; a cold start (--model none) "
                   "serves every point from network heads trained in the background")
    p.add_argument("--probe", type=float, default=0.02,
                   help="--model none: share of the points solved besides each step for "
                   "training data (largest bound first, one per microstructure)")
    return check_composite_arguments(p, p.parse_args(argv))


def composite_arguments(description: str, *, out: str, model: Path, stretch: float,
                        rtol: float, rve_mesh_size: float) -> argparse.ArgumentParser:
    """The command line of the composite examples (2D plate, 3D coupon): the coupled flags,
    the RVE's and the phases' (defaults given by the example)."""
    from neuroscale_couple.fine import LIVE_SOLVERS

    p = coupled_arguments(description, out=out, model=model, stretch=stretch, rtol=rtol,
                          stress_unit="GPa")
    p.add_argument("--rve-mesh-size", type=float, default=rve_mesh_size,
                   help=f"RVE element size in cell lengths ({rve_mesh_size}: the shipped "
                   "model's training data)")
    p.add_argument("--rve-cache", type=int, default=LIVE_SOLVERS,
                   help="live RVEs per rank: awake ones within the MPI communicators left (a "
                   "solved RVE holds 14, MPICH allows 2048 per process), the others hibernated "
                   "(mesh kept as arrays, no communicators); a rank with more points rebuilds "
                   "closed RVEs (their meshes read back from files)")
    p.add_argument("--single-scale", action="store_true",
                   help="no micro solver: the same plate with a closed-form Neo-Hookean law "
                   "(Voigt mixture of the phases), the single-scale limit of the run's cost")
    for phase in ("matrix", "fibre"):
        shipped = COMPOSITE[phase]
        p.add_argument(f"--{phase}", type=float, nargs=2, metavar=("E", "NU"),
                       default=(shipped["E"], shipped["nu"]),
                       help=f"the {phase}'s Neo-Hookean Young's modulus (GPa) and Poisson ratio "
                       f"(default {shipped['E']} {shipped['nu']}: the shipped model's; another "
                       "material needs a model trained for it, --reference or, in 2D, "
                       "--model none)")
    p.add_argument("--rve-memory", default="2G",
                   help="memory budget of a rank's live RVEs, e.g. 512M or 2G (powers of 1024; "
                   "none: --rve-cache only); one RVE of mesh size 0.02 takes ~14 MB awake, "
                   "~1 MB hibernated with its warm-start states")
    return p


def check_composite_arguments(p: argparse.ArgumentParser, args: argparse.Namespace
                              ) -> argparse.Namespace:
    """``args`` of :func:`composite_arguments` checked (``p.error`` on bad input)."""
    from neuroscale_couple.config import byte_size
    from neuroscale_couple.errors import InputError

    if not 0 < args.rve_mesh_size <= 0.25:
        p.error(f"--rve-mesh-size {args.rve_mesh_size}: give an element size in (0, 0.25] cell "
                "lengths")
    if args.rve_cache < 1:
        p.error(f"--rve-cache {args.rve_cache}: give at least 1 live RVE per rank")
    coupled = [flag for flag in ("reference", "restart", "audit", "compare", "replay_from")
               if getattr(args, flag)]
    if args.single_scale and coupled:
        p.error(f"--single-scale has no micro solver, checkpoints or fields to compare: drop "
                f"--{coupled[0].replace('_', '-')}")
    try:
        byte_size(args.rve_memory, "--rve-memory")
        composite(args)
    except InputError as err:
        p.error(str(err))
    return args


def composite(args: argparse.Namespace) -> dict:
    """The fine solver's material config of ``--matrix`` and ``--fibre`` (E in GPa)."""
    from neuroscale_couple.materials import TwoPhaseMaterial

    config = {"law": COMPOSITE["law"], **{phase: dict(zip(("E", "nu"), getattr(args, phase),
                                                          strict=True))
                                          for phase in ("matrix", "fibre")}}
    TwoPhaseMaterial.from_config(config)  # E > 0, −1 < ν < ½, else InputError naming the phase
    return config


def graded_fraction(x: np.ndarray, low: float = 0.15, span: float = 0.3) -> np.ndarray:
    """Fibre (particle) volume fraction at macro points x (n, d): ``low`` at the hole edge →
    ``low + span`` at x = 1, graded in the plane (x, y)."""
    r = np.clip((np.hypot(x[:, 0], x[:, 1]) - HOLE_RADIUS) / (np.sqrt(2) - HOLE_RADIUS), 0, 1)
    return low + span * np.clip(0.5 * r + 0.5 * x[:, 0], 0.0, 1.0)


def voigt_lame(x: np.ndarray, material: dict = COMPOSITE,
               fraction: Callable[[np.ndarray], np.ndarray] = graded_fraction
               ) -> tuple[np.ndarray, np.ndarray]:
    """Lamé constants (λ (n,), μ (n,), GPa) at macro points x (n, d): the Voigt rule of mixtures
    v·(λ, μ)_fibre + (1 − v)·(λ, μ)_matrix at the graded fraction v = ``fraction(x)`` of
    ``material``."""
    from neuroscale_couple.materials import Phase

    v = fraction(x)
    fibre, matrix = (np.array(Phase(**material[name]).lame) for name in ("fibre", "matrix"))
    lmbda, mu = np.outer(fibre, v) + np.outer(matrix, 1 - v)
    return lmbda, mu


def microstructures_at(x: np.ndarray, ids: np.ndarray) -> list:
    """Each point's own random fibre arrangement, drawn from its (partition-free) id."""
    from neuroscale_couple.solvers.microstructure import random_fibres_many

    return random_fibres_many(graded_fraction(x), 1 + np.asarray(ids) % 8, ids)


def build(args: argparse.Namespace, comm: MPI.Comm) -> CoupledRun:
    """Macro problem and Coupler; all input is checked before collective work."""
    from neuroscale_couple.cold_start import ColdStart

    policy, model_path, model = prepare(args)
    retrain = retrain_config(args)
    cold = None
    if cold_start(args, policy):  # trains in the background (--swap-when-ready: never waits for it)
        cold = ColdStart(args.cold_encoder, held_out=args.held_out, probe=args.probe,
                         cell_fits=not args.no_cell_fits)
        retrain = dataclasses.replace(retrain, background=True)
    return composite_run(args, comm, (policy, model_path, model), retrain, microstructures_at,
                         cold_start=cold)


def composite_run(args: argparse.Namespace, comm: MPI.Comm, prepared: tuple, retrain,
                  structures_at: Callable, *, cold_start=None, thickness: float | None = None
                  ) -> CoupledRun:
    """The :class:`CoupledRun` of a composite example: its Coupler (``prepared``: what
    :func:`~plate_with_hole.prepare` returned; ``retrain`` a RetrainConfig) with the periodic
    RVE of the phases and ``--rve-mesh-size`` as fine solver, on the plate (``thickness``
    given: the eighth coupon) whose points' cells ``structures_at(x, ids)`` gives."""
    from neuroscale_couple.coupler import Coupler
    from neuroscale_couple.solvers.rve_fenicsx import rve_from_config

    policy, model_path, model = prepared
    # The true fine solver: the composite's phases and the RVE mesh; the Coupler refuses a model
    # trained for other phases.
    family = dict(composite(args), mesh={"size": args.rve_mesh_size})
    coupler = Coupler(model, lambda m: rve_from_config(family, m), family=family, policy=policy,
                      comm=comm, replay_dir=Path(args.out) / "replay", cache_size=args.rve_cache,
                      cache_memory=args.rve_memory, retrain=retrain, model_path=model_path,
                      audit=args.audit, cold_start=cold_start)
    problem, set_load, right = quarter_plate(args, coupler, structures_at, comm,
                                             thickness=thickness)
    return CoupledRun(problem, coupler, set_load, right, "GPa")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.single_scale:
        from single_scale import run_single_scale

        return run_single_scale(args, lambda x: voigt_lame(x, composite(args)))
    return run_example(args, build)


if __name__ == "__main__":
    main_guard(main, "fe2_composite")
