"""DOLFINx plug-in: the stress of the user's own hyperelasticity problem comes from a Coupler.

The user keeps their mesh, function space, forms, boundary conditions, solver options, load
loop and ``dolfinx.fem.petsc.NonlinearProblem``; only the constitutive law changes. Like
dolfinx-external-operator, the micro response lives in quadrature-space coefficients — the
homogenized stress P̄ₖ (d×d) and tangent Aₖ = ∂P̄/∂F̄ (d²×d²) at each quadrature point of the
rank's owned cells — filled by one collective call of the Coupler (or any
:class:`~neuroscale_couple.fine.FineSolver` taking ``point_ids``) each time the problem
evaluates its residual. The stress handed to the forms is the linearisation

    P̄(u) = P̄ₖ + Aₖ : (∇u − ∇uₖ),

uₖ the iterate the coefficients were evaluated at. It equals P̄ₖ exactly at that iterate, and
UFL's automatic derivative of a residual written with it is the consistent tangent, so the
user's ``NonlinearProblem(residual, u, ...)`` needs no hand-written Jacobian::

    micro = MicroStress(u, coupler, microstructures)       # 1. the micro stress of u
    residual = ufl.inner(micro.stress, ufl.grad(v)) * micro.dx - ufl.inner(T, v) * ds
    problem = NonlinearProblem(residual, u, bcs=bcs, petsc_options_prefix="fe2_", ...)
    micro.attach(problem)                                   # 2. update P̄, A in its residual
    for t in loads:
        T.value = ...
        problem.solve()                                     # one load step of the Coupler

Point ids are ``original_cell_index · n_qp + q``: the same on any number of ranks, so each point
keeps its microstructure, warm starts and replay records whatever the partition. Load stepping
with cut-back, checkpoints and per-step reports are optional:
:class:`~neuroscale_couple.adapters.fenicsx_steps.LoadStepper`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import basix
import basix.ufl
import numpy as np
import ufl
from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc
from petsc4py import PETSc

from neuroscale_couple.coupler import FAILED, SOURCE_NAMES, Coupler
from neuroscale_couple.errors import InputError, SolveError
from neuroscale_couple.parallel import FAULT_TIMEOUT_S, together

log = logging.getLogger(__name__)

Microstructures = Callable[[np.ndarray, np.ndarray], Sequence] | object


class MicroStress:
    """Quadrature-space stress and tangent of ``u`` answered by a micro solver.

    Parameters
    ----------
    u : displacement, a vector Lagrange function on a d-dimensional mesh (d = 2: plane strain).
    micro : the :class:`~neuroscale_couple.coupler.Coupler` (or another
        :class:`~neuroscale_couple.fine.FineSolver` taking ``point_ids``; ``info['uncertainty']``
        and ``info['source']`` are shown if it has them),
        or a coupler config (YAML path or mapping) for
        :meth:`~neuroscale_couple.coupler.Coupler.from_config` on the mesh's communicator.
    microstructures : one microstructure for every point, or ``(x (n, d) quadrature points,
        ids (n,)) -> sequence of n microstructures``, called once for this rank's points.
    quadrature_degree : degree of the quadrature rule carrying the micro responses; default
        ``max(1, 2 (p − 1))`` for elements of degree p, the exact rule for ∫ P̄ : ∇v of a
        linearised P̄. A lower degree is refused: it under-integrates the tangent (singular
        Jacobian).

    Attributes
    ----------
    stress : UFL expression of P̄(u), for the residual.
    dx : the cell measure of that quadrature rule; integrate ``stress`` with it.
    P, A : the quadrature functions P̄ₖ (value shape (d, d)) and Aₖ ((d², d²), row-major
        ``A[d·i + j, d·k + l] = ∂P̄_ij/∂F̄_kl``), in the micro solver's stress unit.
    bound, source : per point the calibrated relative error bound (NaN where no operator ran)
        and where the stress came from (0 operator, 1 fine solve, 2 failed fine solve).
    point_ids, points : this rank's point ids (n,) and their coordinates (n, d).
    reports : one record per load step ended: the fields of the Coupler's
        :class:`~neuroscale_couple.coupler.StepReport` and ``failed_points``.
    error : the exception that ended the current Newton solve (None while none did; see
        :meth:`attach`).
    rank_totals : this rank's own figures summed over the load steps ended (local, not
        gathered): ``micro_time_s``, the wall seconds of its micro-solver calls, and the
        per-rank step statistics of a micro solver that keeps them in ``stats`` (a Coupler's
        :class:`~neuroscale_couple.coupler.StepStats`: operator, encoding, fallback-stage wall
        and own fine-solve seconds, fine solves).
    """

    def __init__(self, u: fem.Function, micro, microstructures: Microstructures, *,
                 quadrature_degree: int | None = None) -> None:
        V = u.function_space
        mesh = V.mesh
        d = mesh.geometry.dim
        if V.value_shape != (d,):
            raise InputError(f"u has value shape {V.value_shape}: MicroStress needs the "
                             f"displacement, a {d}-component vector field on the {d}D mesh")
        degree = V.ufl_element().embedded_superdegree
        needed = max(1, 2 * (degree - 1))
        q = needed if quadrature_degree is None else int(quadrature_degree)
        if q < needed:
            raise InputError(f"quadrature_degree={quadrature_degree} under-integrates "
                             f"∫ P̄ : ∇v for degree-{degree} elements (singular Jacobian): give "
                             f"quadrature_degree ≥ {needed}, or leave it out")
        if isinstance(micro, str | Path | dict):
            micro = Coupler.from_config(micro, comm=mesh.comm)
        self.u, self.micro, self.mesh, self.comm = u, micro, mesh, mesh.comm
        self.dim, self.quadrature_degree = d, q
        cell = mesh.basix_cell()
        rule, _ = basix.make_quadrature(cell, q)
        self.n_qp = len(rule)

        n_cells = mesh.topology.index_map(mesh.topology.dim).size_local
        self.cells = np.arange(n_cells, dtype=np.int32)
        original = np.asarray(mesh.topology.original_cell_index)[:n_cells]
        self.point_ids = (original[:, None] * self.n_qp + np.arange(self.n_qp)).ravel()
        x = fem.Expression(ufl.SpatialCoordinate(mesh), rule).eval(mesh, self.cells)
        self.points = x.reshape(-1, d)
        structures = self._structures(microstructures)
        self.n_points = self.comm.allreduce(len(self.point_ids))
        micro.register(self.point_ids, structures)
        self._agree_comm = self.comm.Dup()  # the callbacks' agreement, apart from their work

        def space(shape: tuple[int, ...]) -> fem.FunctionSpace:
            return fem.functionspace(mesh, basix.ufl.quadrature_element(
                cell, value_shape=shape, scheme="default", degree=q))

        self.P = fem.Function(space((d, d)), name="stress")
        self.A = fem.Function(space((d * d, d * d)), name="tangent")
        self.bound = fem.Function(space(()), name="uncertainty")
        self.source = fem.Function(space(()), name="source")
        self._u_k = fem.Function(V, name="u_k")
        self.dx = ufl.Measure("dx", domain=mesh, metadata={"quadrature_degree": q,
                                                           "quadrature_scheme": "default"})
        dG = ufl.grad(u) - ufl.grad(self._u_k)
        dP = ufl.dot(self.A, ufl.as_vector([dG[i, j] for i in range(d) for j in range(d)]))
        self.stress = self.P + ufl.as_matrix([[dP[d * i + j] for j in range(d)]
                                              for i in range(d)])
        self._F_expr = fem.Expression(ufl.Identity(d) + ufl.grad(u), rule)
        self._internal = fem.form(ufl.inner(self.P, ufl.grad(ufl.TestFunction(V))) * self.dx)
        self.reports: list[dict] = []
        self.rank_totals: dict[str, float] = {"micro_time_s": 0.0}
        self.error: BaseException | None = None
        self._step, self._in_step, self._converged = 0, False, False
        self._warned_unloaded = False

    def _structures(self, microstructures: Microstructures) -> list:
        """This rank's points' microstructures, checked before any collective call."""
        if callable(microstructures):
            structures = list(microstructures(self.points, self.point_ids))
        else:
            structures = [microstructures] * len(self.point_ids)
        if len(structures) != len(self.point_ids):
            raise InputError(f"microstructures returned {len(structures)} microstructures for "
                             f"{len(self.point_ids)} points: give one per point (x, ids)")
        return structures

    # ------------------------------------------------------------------ evaluation
    def update(self) -> None:
        """Evaluate the micro solver at the current ``u`` and fill P, A, bound and source for
        the owned cells (collective).

        The micro solver checks F̄ (the Coupler refuses a non-finite or inverted one on every
        rank). Whatever it raises on this rank, this rank still takes part in the ghost
        exchange (its responses NaN) and raises afterwards, as it does for a non-finite stress
        or tangent; :meth:`attach`'s callbacks agree on it over the ranks."""
        d, n = self.dim, len(self.point_ids)
        F = self._F_expr.eval(self.mesh, self.cells).reshape(-1, d, d)
        fields, sizes = (self.P, self.A, self.bound, self.source), (d * d, d**4, 1, 1)
        failure: Exception | None = None
        t0 = time.perf_counter()
        try:
            r = self.micro.solve(F, point_ids=self.point_ids, tangent=True)
            values = [np.reshape(v, size * n) for v, size in zip(
                (r.stress, r.tangent, r.info.get("uncertainty", np.full(n, np.nan)),
                 r.info.get("source", np.ones(n))), sizes, strict=True)]
        except Exception as err:  # raised below, after the collective ghost exchange
            failure, values = err, [np.nan] * len(fields)
        self.rank_totals["micro_time_s"] += time.perf_counter() - t0
        for f, v, size in zip(fields, values, sizes, strict=True):
            f.x.array[: size * n] = v
            f.x.scatter_forward()
        self.u.x.petsc_vec.copy(self._u_k.x.petsc_vec)
        self._u_k.x.scatter_forward()
        if failure is not None:
            raise failure
        self._check_responses(F)

    def _check_responses(self, F: np.ndarray) -> None:
        """Raise :class:`SolveError` naming the first of this rank's points (F̄ ``F`` (n, d, d))
        whose stress or tangent is not finite (local)."""
        d, n = self.dim, len(self.point_ids)
        ok = (np.isfinite(self.P.x.array[: d * d * n].reshape(n, -1)).all(axis=1)
              & np.isfinite(self.A.x.array[: d**4 * n].reshape(n, -1)).all(axis=1))
        if not ok.all():
            k = int(np.argmin(ok))
            source = SOURCE_NAMES.get(int(self.source.x.array[k]), "micro solver")
            raise SolveError(f"point {int(self.point_ids[k])} got a non-finite stress or tangent "
                             f"from the {source} at F̄ = {F[k].tolist()}")

    # ------------------------------------------------------------------ the user's problem
    def attach(self, problem: fem_petsc.NonlinearProblem) -> None:
        """Make ``problem`` (a NonlinearProblem whose residual uses :attr:`stress`) update the
        micro responses before each residual assembly, and bracket each ``problem.solve()``
        as one load step of the Coupler (its report appended to :attr:`reports`), unless
        :meth:`load_step` brackets it.

        Both SNES callbacks are fail safe (:meth:`_guarded`): an exception raised while the
        residual or the Jacobian is evaluated (an inverted iterate, fine solves failing beyond
        the policy's ratio, any exception of a fine solver, the user's form or the assembly)
        or a non-finite result is kept in :attr:`error` and agreed over the ranks with one
        collective flag. Every rank then hands SNES a NaN residual (or an identity Jacobian,
        whose step ends in a NaN residual; petsc4py has no domain-error call): the solve ends
        unconverged on every rank (``problem.solver.getConvergedReason() < 0``), and the caller
        may cut the load increment back (:class:`~.fenicsx_steps.LoadStepper` does)."""
        snes = problem.solver
        b, (assemble_residual, f_args, f_kargs) = snes.getFunction()
        J, P, (assemble_jacobian, j_args, j_kargs) = snes.getJacobian()

        def residual(snes: PETSc.SNES, x: PETSc.Vec, F: PETSc.Vec) -> None:
            x.ghostUpdate(PETSc.InsertMode.INSERT, PETSc.ScatterMode.FORWARD)
            fem_petsc.assign(x, self.u)
            try:
                self.update()
            finally:  # failed or not, every rank joins the assembly's ghost exchange
                assemble_residual(snes, x, F, *(f_args or ()), **(f_kargs or {}))

        def jacobian(snes: PETSc.SNES, x: PETSc.Vec, J: PETSc.Mat, P: PETSc.Mat) -> None:
            assemble_jacobian(snes, x, J, P, *(j_args or ()), **(j_kargs or {}))

        if not J.assembled:  # a failed Jacobian needs a matrix with its nonzero pattern
            x = self.u.x.petsc_vec.copy()  # at u itself (A still 0): u keeps its values
            with together(self._agree_comm, "the first Jacobian assembly",
                          timeout_s=FAULT_TIMEOUT_S):
                jacobian(snes, x, J, P)
            x.destroy()
        snes.setFunction(self._guarded("the residual evaluation", residual), b)
        snes.setJacobian(self._guarded("the Jacobian evaluation", jacobian), J, P)
        solve = problem.solve

        def solve_step() -> fem.Function:
            with self.load_step(self._step) if not self._in_step else contextlib.nullcontext():
                self.begin()
                result = solve()
                self._check_unloaded(snes)
            return result

        problem.solve = solve_step

    def _guarded(self, what: str, evaluate: Callable) -> Callable:
        """The SNES callback ``evaluate(snes, x, *out)`` (out: the residual vector, or the
        Jacobian and preconditioner matrices) made fail safe: an exception or a non-finite
        entry of ``out`` on any rank sets :attr:`error` on every rank (one collective flag; the
        other ranks' error names the failing rank and its message), and every rank then fills
        ``out`` with NaN (a vector) or the identity (matrices). Once :attr:`error` is set,
        later calls of the solve only fill ``out``.

        Work that fails on one rank inside a collective call (e.g. inside the assembly) leaves
        the others waiting there: the failed rank then aborts all ranks after
        ``NEUROSCALE_FAULT_TIMEOUT_S`` seconds (:func:`~neuroscale_couple.parallel.agree`)."""

        def callback(snes: PETSc.SNES, x: PETSc.Vec, *out) -> None:
            if self.error is None:
                try:
                    with together(self._agree_comm, what, timeout_s=FAULT_TIMEOUT_S):
                        evaluate(snes, x, *out)
                        _check_finite(out, self.comm.rank)
                except Exception as err:  # the same on every rank: the solve ends
                    self.error = err
            if self.error is not None:
                _fail(out)

        return callback

    def begin(self) -> None:
        """Start a Newton solve: clear the last error and let the Coupler start the load step
        (again, after a cut-back: its fallback choices are free again)."""
        self.error = None
        self.micro.begin_step(self._step)

    @contextlib.contextmanager
    def load_step(self, step: int, steps_left: int | None = None) -> Iterator[None]:
        """Bracket one load step ``step`` of one or more ``problem.solve()`` calls (cut-backs):
        the Coupler ends it (its report appended to :attr:`reports`) when the block exits with
        the last solve converged. ``steps_left``: load steps still to come (None: unknown; the
        Coupler then retrains whenever due)."""
        self._step, self._in_step, self._converged = step, True, False
        try:
            yield
        finally:
            self._in_step = False
        if self._converged:
            stats = getattr(self.micro, "stats", None)
            for k, v in (dataclasses.asdict(stats) if dataclasses.is_dataclass(stats)
                         else {}).items():
                self.rank_totals[k] = self.rank_totals.get(k, 0) + v
            report = self.micro.end_step(steps_left=steps_left)
            report = {} if report is None else dataclasses.asdict(report)
            report["failed_points"] = self.comm.allreduce(
                int((self.source.x.array[: len(self.point_ids)] == FAILED).sum()))
            self.reports.append(report)
            self._step = step + 1

    def _check_unloaded(self, snes: PETSc.SNES) -> None:
        """Note convergence for :meth:`load_step`; warn once if a solve converged in 0 Newton
        iterations at u = 0 (nothing loads the problem)."""
        self._converged = snes.getConvergedReason() > 0 and self.error is None
        if (self._converged and snes.getIterationNumber() == 0 and not self._warned_unloaded
                and self.u.x.petsc_vec.norm() == 0.0):
            self._warned_unloaded = True
            if self.comm.rank == 0:
                log.warning("the solve converged in 0 Newton iterations at u = 0: nothing loads "
                            "the problem (a Dirichlet value, traction or body force set to 0, "
                            "or a load term missing from the residual?)")

    # ------------------------------------------------------------------ output
    def internal_force(self) -> PETSc.Vec:
        """Assembled ∫ P̄ : ∇v dx (no boundary conditions), a ghost-updated PETSc vector."""
        f = fem_petsc.assemble_vector(self._internal)
        f.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
        return f

    def reaction(self, dofs: np.ndarray) -> float:
        """Sum of the internal force over local dof indices ``dofs`` (e.g. the x-dofs of the
        loaded edge), over all ranks: the reaction force there (stress unit × length^(d−1))."""
        f = self.internal_force()
        value = owned_sum(f, dofs, self.u.function_space)
        f.destroy()
        return value

    def cell_average(self, f: fem.Function, reduce: str = "mean") -> np.ndarray:
        """Per owned cell: mean (or max) over its quadrature points, shape (n_cells, size)."""
        shape = f.function_space.value_shape
        size = int(np.prod(shape)) if shape else 1
        a = f.x.array[: len(self.cells) * self.n_qp * size].reshape(-1, self.n_qp, size)
        return a.max(axis=1) if reduce == "max" else a.mean(axis=1)


def owned_sum(f: PETSc.Vec, dofs: np.ndarray, V: fem.FunctionSpace) -> float:
    """Sum of the ghost-updated vector ``f`` of space ``V`` over local dof indices ``dofs``
    (blocked), each dof counted on its owning rank only, over all ranks (collective): e.g. the
    reaction force of an assembled internal force on a loaded edge."""
    n_owned = V.dofmap.index_map.size_local * V.dofmap.index_map_bs
    dofs = np.asarray(dofs)
    return V.mesh.comm.allreduce(float(f.getArray(readonly=True)[dofs[dofs < n_owned]].sum()))


def _check_finite(out: tuple, rank: int) -> None:
    """Raise :class:`SolveError` if this rank's entries of a SNES callback's output (a vector,
    or AIJ matrices) are not all finite (local)."""
    for obj in _distinct(out):
        if isinstance(obj, PETSc.Vec):
            values, what = obj.getArray(readonly=True), "residual"
        elif obj.getType().endswith("aij"):
            values, what = obj.getValuesCSR()[2], "Jacobian"
        else:
            continue
        if not np.isfinite(values).all():
            raise SolveError(f"the {what} has non-finite entries on rank {rank} (a NaN or inf "
                             "stress or tangent, or a form that divides by zero)")


def _fail(out: tuple) -> None:
    """What SNES gets from a failed callback (collective): a NaN residual, which stops it
    (DIVERGED_FNORM_NAN), or identity matrices, whose step reaches the NaN residual next."""
    for obj in _distinct(out):
        if isinstance(obj, PETSc.Vec):
            obj.set(np.nan)
            continue
        obj.zeroEntries()
        obj.shift(1.0)


def _distinct(out: tuple) -> list:
    """The PETSc objects of ``out``, each once (the preconditioner matrix may be the Jacobian
    or None)."""
    return [o for k, o in enumerate(out) if o is not None and all(o is not p for p in out[:k])]
