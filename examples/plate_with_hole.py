"""The loaded quarter plate with a hole shared by the FE² and HMM examples, and its 3D twin.

The macro problem of ``fe2_composite.py`` and ``hmm_atomistic.py`` (plane strain, quarter of a
square plate of width 2 with a central hole of radius 0.3, symmetry on x = 0 and y = 0,
u_x = δ(t) on x = 1; ``fe2_composite_3d.py``: the eighth of an open-hole coupon, the same
plate of thickness 2·t₃ with symmetry on z = 0 too), written as a user writes a DOLFINx
problem — mesh, space, boundary conditions, residual, ``NonlinearProblem`` — with its stress
from a :class:`~neuroscale_couple.adapters.fenicsx.MicroStress`; and what the examples share
around it:
the command line (:func:`coupled_arguments`), the run (:func:`run_example`: restart and warm
start, load steps with progress on rank 0, ParaView fields ``displacement.bp`` and
``micro_fields.xdmf``, ``fields.npz``, PNG figures, ``summary.json``, the comparison with a
reference run and the self-check).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mpi4py import MPI

import numpy as np

from neuroscale_couple.errors import InputError

LOG = logging.getLogger("neuroscale_couple.run")
MESH_SIZES = {"coarse": 0.1, "medium": 0.05, "fine": 0.025}
HOLE_RADIUS = 0.3


def coupled_arguments(description: str, *, out: str, model: Path | None, stretch: float,
                      rtol: float, stress_unit: str) -> argparse.ArgumentParser:
    """The command line every coupled example shares (defaults given by the example)."""
    from neuroscale_couple.coupler import OUTSIDE, OUTSIDE_MATERIAL

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--mesh-size", default="coarse",
                   help="macro element size: coarse|medium|fine or a number (plate half-width 1)")
    p.add_argument("--steps", type=int, default=5, help="load steps")
    p.add_argument("--stretch", type=float, default=stretch, help="final macro stretch δ/1")
    p.add_argument("--rtol", type=float, default=rtol,
                   help="tolerated relative stress error: a point falls back when its error "
                   "bound exceeds atol + rtol·|P̄| (0 = classic coupling, every point on the fine "
                   "solver; inf = never fall back)")
    p.add_argument("--atol", type=float, default=None,
                   help=f"tolerated absolute stress error ({stress_unit}; default 1 %% of the "
                   "model's stress scale)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--run-calibration", choices=("on", "off"), default=None,
                   help="the operator's bound recalibrated on the run's own fine solves (a "
                   "census of 2/(1 − confidence) points a step, solved besides at the next "
                   "step's extrapolated loads; default: on for a family operator run outside "
                   "its ranges with --outside-material fallback, off otherwise)")
    p.add_argument("--outside", choices=OUTSIDE, default="fallback",
                   help="points outside the model's training region: fine solver (fallback), "
                   "stop (refuse) or keep the bound's decision with a warning (warn)")
    p.add_argument("--outside-material", choices=OUTSIDE_MATERIAL, default="refuse",
                   help="a family operator given phases outside its ranges: stop before the "
                   "run (refuse), or run with every point on the fine solver until the bound is "
                   "calibrated at the run's material (fallback: your consent)")
    p.add_argument("--model", default=None if model is None else str(model),
                   help="the trained operator's file; none: a cold start where the example "
                   "offers one (an operator trained during the run)")
    p.add_argument("--reference", action="store_true",
                   help="the true fine solver at every point (same as --rtol 0)")
    p.add_argument("--no-retrain", action="store_true", help="no online retraining")
    p.add_argument("--background-retrain", action="store_true",
                   help="retrain in a thread while the next load step runs (swapped in after it)")
    p.add_argument("--swap-when-ready", action="store_true",
                   help="with --background-retrain (or a cold start): never wait for a "
                   "retraining, swap it in at the first step end at which it has finished (which "
                   "step gets it then depends on timing)")
    p.add_argument("--cost-aware-retrain", action="store_true",
                   help="retrain only when the estimated training time is below the fine-solve "
                   "time it could save (the retraining steps then depend on measured times)")
    p.add_argument("--restart", action="store_true", help="resume from OUT/checkpoint")
    p.add_argument("--audit", action="store_true",
                   help="after every load step solve every point with the fine solver too and "
                   "report the bound's coverage and the false negatives (costs a classic run)")
    p.add_argument("--compare", help="summary.json/fields.npz folder of a reference run")
    p.add_argument("--replay-from", action="append", default=[], metavar="DIR",
                   help="replay/ folder of an earlier run: fine-tune on its fine solves first")
    p.add_argument("--out", default=out)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def mesh_size(value: str) -> float:
    """Macro element size from a name or a number."""
    if value in MESH_SIZES:
        return MESH_SIZES[value]
    try:
        h = float(value)
    except ValueError:
        raise InputError(f"--mesh-size {value!r}: use coarse, medium, fine or a number") from None
    if not 0.005 <= h <= 0.5:
        raise InputError(f"--mesh-size {h}: choose an element size in [0.005, 0.5]")
    return h


def prepare(args: argparse.Namespace):
    """Check the shared flags; return the policy, the model file named by ``--model`` (its
    anchor data sets lie next to it) and the model (None for a reference run or a cold start,
    ``--model none``; on restart, the checkpoint's model)."""
    from neuroscale_couple.adapters.fenicsx_steps import LoadStepper
    from neuroscale_couple.coupler import Policy
    from neuroscale_couple.operators.base import load_operator

    check_loading(args)
    policy = Policy(rtol=0.0 if args.reference else args.rtol,
                    atol=None if args.reference else args.atol, confidence=args.confidence,
                    outside=args.outside, outside_material=args.outside_material,
                    exclude_noise=getattr(args, "exclude_noise", False),
                    run_calibration=(None if args.reference or args.run_calibration is None
                                     else args.run_calibration == "on"))
    # an example with --no-cell-fits serves a trained model's fallback points by their cell fits
    # unless the flag is given (classic FE² has no operator; a cold start sets its own)
    if getattr(args, "no_cell_fits", True) is False and not (policy.classic
                                                             or cold_start(args, policy)):
        policy = dataclasses.replace(policy, cell_fits=True)
    if args.replay_from and (args.no_retrain or policy.classic):
        raise InputError("--replay-from fine-tunes the operator: drop --no-retrain/--reference")
    for flag in ("background_retrain", "cost_aware_retrain", "swap_when_ready"):
        if getattr(args, flag) and args.no_retrain:
            raise InputError(f"--{flag.replace('_', '-')} and --no-retrain contradict: drop one")
    if args.swap_when_ready and not (args.background_retrain or cold_start(args, policy)):
        raise InputError("--swap-when-ready swaps in a background retraining: add "
                         "--background-retrain")
    if cold_start(args, policy):
        given = [flag for flag in ("no_retrain", "replay_from") if getattr(args, flag)]
        if given:
            raise InputError(f"--model none (a cold start) and --{given[0].replace('_', '-')} "
                             "contradict: a cold start trains its operator from this run's own "
                             "fine solves from the first step")
        if args.restart and getattr(args, "no_cell_fits", False):
            raise InputError("--restart and --no-cell-fits contradict: a cold start restarts "
                             "with its cell fits (the heads' training is not in the "
                             "checkpoint): drop --no-cell-fits, or start afresh")
        return policy, None, None
    state = LoadStepper.read_checkpoint(Path(args.out) / "checkpoint") if args.restart else None
    weights = (state or {}).get("model_file") or args.model
    model = None if policy.classic else load_operator(weights)
    return policy, args.model, model


def cold_start(args: argparse.Namespace, policy=None) -> bool:
    """Whether the command line asks for a cold start (``--model none`` with a tolerance)."""
    return str(args.model).lower() == "none" and not (args.reference if policy is None
                                                      else policy.classic)


def check_loading(args: argparse.Namespace) -> None:
    """Check ``--mesh-size``, ``--steps`` and ``--stretch`` (raises :class:`InputError`)."""
    mesh_size(args.mesh_size)
    if args.steps < 1:
        raise InputError(f"--steps {args.steps}: give at least one load step")
    if not -1 < args.stretch < 1:  # also catches NaN
        raise InputError(f"--stretch {args.stretch}: give a finite macro stretch in (-1, 1) "
                         "(the loaded edge moves by stretch × the plate's half-width 1)")


def retrain_config(args: argparse.Namespace):
    """The online retraining the shared flags ask for."""
    from neuroscale_couple.retraining import RetrainConfig

    return RetrainConfig(enabled=not args.no_retrain, background=args.background_retrain,
                         cost_aware=args.cost_aware_retrain,
                         swap_when_ready=args.swap_when_ready,
                         replay_from=tuple(args.replay_from))


NEWTON = {"snes_type": "newtonls", "snes_linesearch_type": "basic", "snes_rtol": 1e-9,
          "snes_atol": 1e-10, "snes_stol": 0.0, "snes_max_it": 15, "ksp_type": "preonly",
          "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}


def quarter_plate(args: argparse.Namespace, coupler, structures_at: Callable,
                  comm: MPI.Comm, petsc_options: dict | None = None, *,
                  thickness: float | None = None):
    """The loaded quarter plate with a hole (``thickness`` t₃ given: the eighth coupon, see
    :func:`plate_with_hole`), P1 displacement:

        ∫ P̄(F̄) : ∇v dx = 0,   u_i = 0 on x_i = 0 (i < d),  u_x = t · stretch on x = 1,

    P̄ from ``coupler`` at each quadrature point, whose microstructure ``structures_at(x, ids)``
    gives. Newton settings :data:`NEWTON`, overridden by ``petsc_options``. Returns the
    :class:`~neuroscale_couple.adapters.fenicsx_steps.LoadStepper` of the problem, the load
    function t ↦ boundary values and the dofs of the loaded edge."""
    import ufl
    from dolfinx.fem.petsc import NonlinearProblem

    from neuroscale_couple.adapters.fenicsx import MicroStress
    from neuroscale_couple.adapters.fenicsx_steps import LoadStepper

    msh = plate_with_hole(comm, mesh_size(args.mesh_size), HOLE_RADIUS, thickness)
    u, bcs, set_load, right = quarter_loading(msh, args.stretch)
    # The plug-in: P̄ and its tangent from the Coupler at each quadrature point of u.
    micro = MicroStress(u, coupler, structures_at)
    residual = ufl.inner(micro.stress, ufl.grad(ufl.TestFunction(u.function_space))) * micro.dx
    problem = NonlinearProblem(residual, u, bcs=bcs, petsc_options_prefix="plate_",
                               petsc_options={**NEWTON, **(petsc_options or {})})
    micro.attach(problem)
    return LoadStepper(problem, micro), set_load, right


def quarter_loading(msh, stretch: float):
    """P1 displacement on ``msh`` (a domain in [0, 1]^d touching x_i = 0 for i < d and x = 1)
    with the plate's boundary conditions: symmetry u_i = 0 on x_i = 0 (u_x on x = 0, u_y on
    y = 0, and in 3D u_z on z = 0), u_x = t · stretch on x = 1. Returns u, the Dirichlet
    conditions, the load function t ↦ boundary values and the x-dofs of the loaded face x = 1
    (local indices)."""
    from dolfinx import fem, mesh

    d = msh.geometry.dim
    V = fem.functionspace(msh, ("Lagrange", 1, (d,)))
    u = fem.Function(V, name="displacement")
    fdim = msh.topology.dim - 1
    msh.topology.create_connectivity(fdim, msh.topology.dim)
    delta = fem.Constant(msh, 0.0)
    bcs = []
    for i, value, at in [(i, 0.0, 0.0) for i in range(d)] + [(0, delta, 1.0)]:
        facets = mesh.locate_entities_boundary(msh, fdim, lambda x, i=i, at=at:
                                               np.isclose(x[i], at))
        dofs = fem.locate_dofs_topological(V.sub(i), fdim, facets)
        bcs.append(fem.dirichletbc(value, dofs, V.sub(i)))

    def set_load(t: float) -> None:
        delta.value = stretch * t

    return u, bcs, set_load, dofs


def plate_with_hole(comm: MPI.Comm, h: float, radius: float, thickness: float | None = None):
    """Quarter plate [0, 1]² minus the disc of ``radius`` at the origin (gmsh), refined to h/3
    at the hole; with ``thickness`` t₃: the eighth coupon [0, 1]² × [0, t₃] minus the cylinder
    of ``radius`` along z (tetrahedra, refined to h/2 at the hole: 140 cells at h = 0.5)."""
    import gmsh
    from dolfinx.io import gmsh as gmshio

    d = 2 if thickness is None else 3
    h_min = h / 3 if d == 2 else h / 2
    gmsh.initialize(interruptible=False)
    gmsh.option.setNumber("General.Terminal", 0)
    if comm.rank == 0:
        occ = gmsh.model.occ
        if d == 2:
            plate, hole = occ.addRectangle(0, 0, 0, 1, 1), occ.addDisk(0, 0, 0, radius, radius)
        else:
            plate = occ.addBox(0, 0, 0, 1, 1, thickness)
            hole = occ.addCylinder(0, 0, 0, 0, 0, thickness, radius)
        body, _ = occ.cut([(d, plate)], [(d, hole)])
        occ.synchronize()
        gmsh.model.addPhysicalGroup(d, [body[0][1]], 1)
        gmsh.option.setNumber("Mesh.CharacteristicLengthMax", h)
        gmsh.option.setNumber("Mesh.CharacteristicLengthMin", h_min)
        field = gmsh.model.mesh.field
        dist = field.add("Distance")
        faces = [c[1] for c in gmsh.model.getBoundary(body, oriented=False)]
        bore = np.pi * radius / 2 * (1.0 if thickness is None else thickness)  # its length/area
        arc = [c for c in faces if abs(gmsh.model.occ.getMass(d - 1, c) - bore) < 1e-6]
        field.setNumbers(dist, "CurvesList" if d == 2 else "SurfacesList", arc)
        thr = field.add("Threshold")
        field.setNumber(thr, "InField", dist)
        field.setNumber(thr, "SizeMin", h_min)
        field.setNumber(thr, "SizeMax", h)
        field.setNumber(thr, "DistMin", 0.0)
        field.setNumber(thr, "DistMax", 0.5)
        field.setAsBackgroundMesh(thr)
        gmsh.option.setNumber("Mesh.MeshSizeExtendFromBoundary", 0)
        gmsh.model.mesh.generate(d)
    data = gmshio.model_to_mesh(gmsh.model, comm, 0, gdim=d)
    gmsh.finalize()
    return data.mesh


@dataclass
class CoupledRun:
    """What an example hands to :func:`run_coupled`.

    problem : the :class:`~neuroscale_couple.adapters.fenicsx_steps.LoadStepper` of the plate.
    coupler : its :class:`~neuroscale_couple.coupler.Coupler`.
    set_load : load factor t ∈ (0, 1] → boundary values.
    reaction_dofs : dofs whose reaction force is recorded per step.
    stress_unit : for plot labels, e.g. "GPa".
    """

    problem: object
    coupler: object
    set_load: object
    reaction_dofs: np.ndarray
    stress_unit: str = "GPa"


def run_example(args: argparse.Namespace, build: Callable, comm: MPI.Comm = MPI.COMM_WORLD
                ) -> dict:
    """Log progress on rank 0 (unless ``args.quiet``), ``build(args, comm)`` the example's
    :class:`CoupledRun` and run it (:func:`run_coupled`)."""
    logging.basicConfig(level=logging.WARNING if args.quiet or comm.rank else logging.INFO,
                        format="%(message)s")
    t_start = time.perf_counter()
    return run_coupled(build(args, comm), args, comm, t_start)


def run_coupled(run: CoupledRun, args: argparse.Namespace, comm: MPI.Comm = MPI.COMM_WORLD,
                t_start: float | None = None) -> dict:
    """Step the load, write every output into ``args.out`` and return the summary.

    ``args`` carries ``out``, ``steps``, ``restart``, ``replay_from``, ``no_retrain`` and
    ``compare`` as the examples' command lines define them; ``total_time_s`` counts from
    ``t_start`` (``time.perf_counter()`` before the set-up; default: now), of which
    ``setup_time_s`` passed before the first load step (imports, model, meshes, latents) and
    ``steps_time_s`` in the load steps; the rest is output (fields, checkpoints closed).
    """
    from neuroscale_couple.adapters.fenicsx_steps import displacement_norm
    from neuroscale_couple.audit import summarise

    problem, coupler = run.problem, run.coupler
    micro = problem.micro
    out = Path(args.out)
    t_start = time.perf_counter() if t_start is None else t_start
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not args.restart:
            for old in (out / "replay").glob("*.h5"):
                old.unlink()
    comm.Barrier()
    if not args.restart and coupler.warm_start():
        LOG.info("operator fine-tuned on %s: model version %d", ", ".join(args.replay_from),
                 coupler.version)
    LOG.info("macro: %d dofs, %d quadrature points (one fine problem each), %d ranks; fallback "
             "where the bound exceeds %.3g %s + %g·|P̄|", problem.dofs, micro.n_points,
             comm.size, coupler.atol, run.stress_unit, coupler.policy.rtol)

    def on_step(record: dict) -> None:
        record["reaction_force"] = micro.reaction(run.reaction_dofs)
        record["n_points"] = micro.n_points
        LOG.info("step %d  load %.3f  Newton %d (|R| %s)  fallback %d/%d (on operator %.0f %%)  "
                 "fine %.1f s  operator %.3f s  retrain %.1f s (training %.1f s)  model v%d  "
                 "reaction %.5g", record["step"], record["load"], record["newton_iterations"],
                 " ".join(f"{r:.1e}" for r in record["residuals"][-1]),
                 record["fallback_points"], micro.n_points, 100 * record["operator_share"],
                 record["fine_time_s"], record["operator_time_s"], record["retrain_time_s"],
                 record["training_s"], record["model_version"], record["reaction_force"])

    loads = np.linspace(0, 1, args.steps + 1)[1:]
    # the Coupler may swap in another model object (background retraining): save the current one
    saver = None if coupler.model is None else (lambda path: coupler.model.save(path))
    t_steps = time.perf_counter()
    # every setting but where the output goes and how it is shown: a restart must match them
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
              if k not in ("out", "restart", "quiet", "compare")}
    history = problem.run(loads, run.set_load, checkpoint_dir=out / "checkpoint",
                          restart=args.restart, params=params, on_step=on_step,
                          model_saver=saver)
    t_output = time.perf_counter()
    u_norm = displacement_norm(micro.u)
    fields = gather_fields(micro)
    write_fields(micro, out)
    coupler.close()
    summary = {
        "dofs": problem.dofs, "quadrature_points": micro.n_points, "ranks": comm.size,
        "rtol": coupler.policy.rtol, "atol": coupler.atol, "stress_unit": run.stress_unit,
        "confidence": coupler.policy.confidence, "outside": coupler.policy.outside,
        "reference": coupler.policy.classic, "retrain": not args.no_retrain,
        "cold_start": coupler.cold_start is not None, "cell_fits": coupler.fits is not None,
        "training_time_s": sum(h.get("training_s", 0.0) for h in history),
        "steps": history, "total_time_s": time.perf_counter() - t_start,
        "setup_time_s": t_steps - t_start, "steps_time_s": t_output - t_steps,
        "micro_time_s": sum(h["fine_time_s"] + h["operator_time_s"] + h.get("encode_time_s", 0.0)
                            for h in history),
        "fallback_rate": sum(h["fallback_points"] for h in history)
        / (len(history) * micro.n_points),
        "newton_iterations": [h["newton_iterations"] for h in history],
        "displacement_norm": u_norm, "reaction_force": history[-1]["reaction_force"],
        "model_version": coupler.version, "per_rank": per_rank(comm, micro.rank_totals),
    }
    if args.audit:
        summary["audit"] = summarise([h["audit"] for h in history])
    if comm.rank == 0:
        np.savez(out / "fields.npz", **fields)
        reference = None
        if args.compare:
            summary.update(compare(fields, Path(args.compare)))
            reference = json.loads((Path(args.compare) / "summary.json").read_text())
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        plot(fields, history, out, reference, run.stress_unit)
        check(summary)
        LOG.info("done in %.1f s: %s", summary["total_time_s"], out / "summary.json")
    return summary


def per_rank(comm: MPI.Comm, figures: dict[str, float]) -> dict[str, list[float]]:
    """This rank's ``figures`` and its peak resident memory ``peak_rss_mb`` (MiB) as lists
    indexed by rank, on every rank (collective)."""
    import resource

    mine = {**figures, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    parts = comm.allgather(mine)
    return {k: [part.get(k, 0.0) for part in parts] for k in mine}


def gather_fields(micro) -> dict | None:
    """Point-wise and dof-wise results of a :class:`MicroStress` on rank 0 (None elsewhere)."""
    n, d = len(micro.point_ids), micro.dim
    V = micro.u.function_space
    n_own = V.dofmap.index_map.size_local
    local = {"point_id": micro.point_ids, "x_point": micro.points,
             "stress": micro.P.x.array[: d * d * n].reshape(-1, d, d).copy(),
             "uncertainty": micro.bound.x.array[:n].copy(),
             "source": micro.source.x.array[:n].copy(),
             "x_dof": V.tabulate_dof_coordinates()[:n_own, :d],
             "u": micro.u.x.array[: d * n_own].reshape(-1, d).copy()}
    parts = micro.comm.gather(local, root=0)
    if parts is None:
        return None
    out = {k: np.concatenate([p[k] for p in parts]) for k in local}
    order = np.argsort(out["point_id"])
    for k in ("point_id", "x_point", "stress", "uncertainty", "source"):
        out[k] = out[k][order]
    order = np.lexsort(np.round(out["x_dof"], 9).T[::-1])
    out["x_dof"], out["u"] = out["x_dof"][order], out["u"][order]
    return out


def write_fields(micro, out: Path) -> None:
    """VTX displacement and XDMF cell fields for ParaView."""
    from dolfinx import fem, io

    msh = micro.mesh
    with io.VTXWriter(msh.comm, str(out / "displacement.bp"), [micro.u]) as vtx:
        vtx.write(0.0)
    cells = {}
    for name, f, shape, red in (("stress", micro.P, (micro.dim, micro.dim), "mean"),
                                ("uncertainty", micro.bound, (), "max"),
                                ("source", micro.source, (), "max")):
        Q = fem.functionspace(msh, ("DG", 0, shape) if shape else ("DG", 0))
        g = fem.Function(Q, name=name)
        vals = micro.cell_average(f, red)
        g.x.array[: vals.size] = vals.ravel()
        g.x.scatter_forward()
        cells[name] = g
    with io.XDMFFile(msh.comm, str(out / "micro_fields.xdmf"), "w") as xdmf:
        xdmf.write_mesh(msh)
        for g in cells.values():
            xdmf.write_function(g)


def plot(fields: dict, history: list[dict], out: Path, reference: dict | None,
         stress_unit: str = "GPa") -> None:
    """PNG figures: maps of P̄₁₁, uncertainty and source (in 3D of the points of the mid-plane
    slice z ≤ t₃/4 of the full coupon, whose mid-plane is the symmetry plane z = 0); curves per
    load step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = fields["x_point"]
    near = x[:, 2] <= 0.25 * x[:, 2].max() if x.shape[1] == 3 else np.ones(len(x), dtype=bool)
    fields = {k: fields[k][near] for k in ("x_point", "stress", "uncertainty", "source")}
    x = fields["x_point"]
    unc = fields["uncertainty"]
    finite = unc[np.isfinite(unc)]
    # no operator (NaN) shows as 0; an unbounded error (calibration quantile ∞) as the largest
    unc = np.nan_to_num(unc, nan=0.0, posinf=finite.max() if len(finite) else 1.0)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, values, title, cmap in (
            (axes[0], fields["stress"][:, 0, 0], f"P̄₁₁ ({stress_unit})", "viridis"),
            (axes[1], unc, f"error bound ({stress_unit}; ∞ shown as the largest)", "magma"),
            (axes[2], fields["source"], "source (0 operator, 1 fine, 2 failed)", "coolwarm")):
        sc = ax.scatter(x[:, 0], x[:, 1], c=values, s=8, cmap=cmap)
        fig.colorbar(sc, ax=ax)
        ax.set_title(title)
        ax.set_aspect("equal")
    if x.shape[1] == 3:
        fig.suptitle("points of the mid-plane slice z ≤ t₃/4, seen along z")
    fig.tight_layout()
    fig.savefig(out / "fields.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    loads = [0.0] + [h["load"] for h in history]
    axes[0].plot(loads, [0.0] + [h["reaction_force"] for h in history], "o-", label="this run")
    if reference is not None:
        ref = reference["steps"]
        axes[0].plot([0.0] + [h["load"] for h in ref],
                     [0.0] + [h["reaction_force"] for h in ref], "k--", label="reference")
    axes[0].set_xlabel("load factor t (δ = t · stretch)")
    axes[0].set_ylabel(f"reaction force ({stress_unit} · length)")
    axes[0].legend()
    n = max(1, history[-1].get("n_points", 1))
    axes[1].bar([h["step"] for h in history], [h["fallback_points"] / n for h in history])
    axes[1].set_xlabel("load step")
    axes[1].set_ylabel("fallback rate")
    twin = axes[1].twinx()
    twin.plot([h["step"] for h in history], [h["model_version"] for h in history], "r.-")
    twin.set_ylabel("model version", color="r")
    fig.tight_layout()
    fig.savefig(out / "steps.png", dpi=110)
    plt.close(fig)


def compare(fields: dict, ref_dir: Path) -> dict:
    """Relative L2 errors of displacement and stress against a reference run's fields.npz."""
    with np.load(ref_dir / "fields.npz") as ref:
        if not (np.array_equal(ref["point_id"], fields["point_id"])
                and np.allclose(ref["x_dof"], fields["x_dof"])):
            raise SystemExit(f"--compare {ref_dir}: the reference used another mesh")
        du = np.linalg.norm(fields["u"] - ref["u"]) / np.linalg.norm(ref["u"])
        ds = np.linalg.norm(fields["stress"] - ref["stress"]) / np.linalg.norm(ref["stress"])
    return {"rel_l2_displacement": float(du), "rel_l2_stress": float(ds)}


def check(summary: dict) -> None:
    """The examples' self-check (raises SystemExit with the reason). The reaction force must
    grow from step to step; the unloaded body's need not be zero (at a finite temperature the
    blocked thermal expansion pushes back), so the first step's is not compared with 0."""
    forces = [h["reaction_force"] for h in summary["steps"]]
    if any(b <= a for a, b in itertools.pairwise(forces)):
        raise SystemExit(f"self-check failed: reaction force does not grow with load: {forces}")
    if summary["steps"][-1].get("failed_points"):
        LOG.warning("%d points kept the operator's value after failed fine solves",
                    summary["steps"][-1]["failed_points"])
    if "audit" in summary:
        a = summary["audit"]
        LOG.info("audit: the bound covered %.1f %% of %d operator point-steps; false negatives "
                 "%.2f %% of %d point-steps (%.2f %% against rtol·|P̄| alone)",
                 100 * a["coverage"], a["operator_point_steps"], 100 * a["false_negative_rate"],
                 a["point_steps"], 100 * a["false_negative_rate_relative"])
    if "rel_l2_displacement" in summary:
        LOG.info("against the reference: displacement error %.2e, stress error %.2e",
                 summary["rel_l2_displacement"], summary["rel_l2_stress"])


def main_guard(main, name: str) -> None:
    """Run an example's ``main``; a :class:`NeuroScaleError` (raised on every rank alike,
    before collective work) becomes a one-line message and exit code 2."""
    import sys

    from neuroscale_couple.errors import NeuroScaleError

    try:
        main()
    except NeuroScaleError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
