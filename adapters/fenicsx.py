"""DOLFINx adapter: an existing macro hyperelasticity problem whose stress comes from a Coupler.

The constitutive law of the macro problem becomes two quadrature-space coefficients, the stress
P̄ (2×2) and the tangent ∂P̄/∂F̄ (4×4), filled inside the SNES residual callback by one call of
the Coupler (or any :class:`~neuroscale_couple.fine.FineSolver` with ``point_ids``) for the
quadrature points of the rank's owned cells; no micro problem is ever solved on a ghost.

    problem = FE2Problem(u, bcs, coupler, microstructure_at)        # instead of NonlinearProblem
    history = problem.run(loads, set_load, checkpoint_dir="out/ckpt")

Point ids are ``original_cell_index · n_qp + q``: the same on any number of ranks, so each point
keeps its microstructure, warm starts and replay records whatever the partition.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import basix
import basix.ufl
import numpy as np
import ufl
from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc
from petsc4py import PETSc

from neuroscale_couple.coupler import FAILED
from neuroscale_couple.errors import CheckpointError, InputError, SolveError
from neuroscale_couple.store import atomic_write

log = logging.getLogger(__name__)

DEFAULT_PETSC = {
    "snes_type": "newtonls",
    "snes_linesearch_type": "basic",
    "snes_rtol": 1e-9,
    "snes_atol": 1e-10,
    "snes_stol": 0.0,
    "snes_max_it": 15,
    "ksp_type": "preonly",
    "pc_type": "lu",
    "pc_factor_mat_solver_type": "mumps",
}


class FE2Problem:
    """A plane-strain macro problem ∫ P̄(F̄) : ∇v dx = ℓ(v) with P̄ from a micro solver.

    Parameters
    ----------
    u : displacement (vector Lagrange function) of the existing problem.
    bcs : its Dirichlet conditions (their values may change with the load).
    micro : the :class:`~neuroscale_couple.coupler.Coupler` (or another fine solver taking
        ``point_ids`` and returning ``info['uncertainty']``/``info['source']`` if it has them).
    microstructure_at : ``(x (n, 2) quadrature points, ids (n,)) -> list`` of microstructures;
        called once for this rank's points.
    external : the load ℓ(v) as a UFL form in the test function of ``u``'s space (None: 0).
    quadrature_degree : degree of the quadrature rule carrying the micro responses.
    petsc_options : overrides of :data:`DEFAULT_PETSC`.
    """

    def __init__(self, u: fem.Function, bcs: Sequence[fem.DirichletBC], micro,
                 microstructure_at: Callable[[np.ndarray, np.ndarray], list], *,
                 external: ufl.Form | None = None, quadrature_degree: int = 2,
                 petsc_options: dict | None = None, prefix: str = "fe2_") -> None:
        V = u.function_space
        mesh = V.mesh
        if mesh.geometry.dim != 2 or V.value_shape != (2,):
            raise InputError("FE2Problem is plane strain: u must be a 2-component vector field "
                             "on a 2D mesh")
        self.u, self.bcs, self.micro, self.mesh = u, list(bcs), micro, mesh
        self.comm = mesh.comm
        cell = mesh.basix_cell()
        points, _ = basix.make_quadrature(cell, quadrature_degree)
        self.n_qp = len(points)
        qel = {shape: basix.ufl.quadrature_element(cell, value_shape=shape, scheme="default",
                                                   degree=quadrature_degree)
               for shape in ((2, 2), (4, 4), ())}
        self.stress = fem.Function(fem.functionspace(mesh, qel[(2, 2)]), name="stress")
        self.tangent = fem.Function(fem.functionspace(mesh, qel[(4, 4)]), name="tangent")
        self.uncertainty = fem.Function(fem.functionspace(mesh, qel[()]), name="uncertainty")
        self.source = fem.Function(fem.functionspace(mesh, qel[()]), name="source")

        n_cells = mesh.topology.index_map(mesh.topology.dim).size_local
        self.cells = np.arange(n_cells, dtype=np.int32)
        original = np.asarray(mesh.topology.original_cell_index)[:n_cells]
        self.point_ids = (original[:, None] * self.n_qp + np.arange(self.n_qp)).ravel()
        self._F_expr = fem.Expression(ufl.Identity(2) + ufl.grad(u), points)
        x = fem.Expression(ufl.SpatialCoordinate(mesh), points).eval(mesh, self.cells)
        self.points = x.reshape(-1, 2)
        structures = microstructure_at(self.points, self.point_ids)
        if len(structures) != len(self.point_ids):
            raise InputError(f"microstructure_at returned {len(structures)} microstructures "
                             f"for {len(self.point_ids)} points")
        if hasattr(micro, "register"):
            micro.register(self.point_ids, structures)

        v, du = ufl.TestFunction(V), ufl.TrialFunction(V)
        dx = ufl.Measure("dx", domain=mesh, metadata={"quadrature_degree": quadrature_degree,
                                                      "quadrature_scheme": "default"})
        g = ufl.grad(du)
        g4 = ufl.as_vector([g[0, 0], g[0, 1], g[1, 0], g[1, 1]])
        s = ufl.dot(self.tangent, g4)
        residual = ufl.inner(self.stress, ufl.grad(v)) * dx
        if external is not None:
            residual = residual - external
        self._R = fem.form(residual)
        self._J = fem.form(ufl.inner(ufl.as_matrix([[s[0], s[1]], [s[2], s[3]]]),
                                     ufl.grad(v)) * dx)
        self._internal = fem.form(ufl.inner(self.stress, ufl.grad(v)) * dx)

        self._b = fem_petsc.create_vector(V)
        self._A = fem_petsc.create_matrix(self._J)
        self.snes = PETSc.SNES().create(self.comm)
        self.snes.setOptionsPrefix(prefix)
        opts = PETSc.Options()
        for k, val in {**DEFAULT_PETSC, **(petsc_options or {})}.items():
            opts[f"{prefix}{k}"] = val
        self.snes.setFromOptions()
        self.snes.setFunction(self._residual, self._b)
        self.snes.setJacobian(self._jacobian, self._A, self._A)
        self.snes.setMonitor(lambda _s, _it, norm: self.residuals.append(float(norm)))
        self._x = fem_petsc.create_vector(V)
        self.residuals: list[float] = []
        self._error: Exception | None = None
        self.dofs = V.dofmap.index_map.size_global * V.dofmap.index_map_bs
        self.n_points = self.comm.allreduce(len(self.point_ids))

    # ------------------------------------------------------------------ SNES callbacks
    def update(self) -> None:
        """Evaluate the micro solver at the current u and fill the quadrature coefficients
        (collective)."""
        F = self._F_expr.eval(self.mesh, self.cells).reshape(-1, 2, 2)
        r = self.micro.solve(F, point_ids=self.point_ids, tangent=True)
        n = len(F)
        self.stress.x.array[: 4 * n] = r.stress.reshape(-1)
        self.tangent.x.array[: 16 * n] = r.tangent.reshape(-1)
        self.uncertainty.x.array[:n] = r.info.get("uncertainty", np.zeros(n))
        self.source.x.array[:n] = r.info.get("source", np.ones(n))
        for f in (self.stress, self.tangent, self.uncertainty, self.source):
            f.x.scatter_forward()

    def _residual(self, snes: PETSc.SNES, x: PETSc.Vec, b: PETSc.Vec) -> None:
        x.ghostUpdate(PETSc.InsertMode.INSERT, PETSc.ScatterMode.FORWARD)
        fem_petsc.assign(x, self.u)
        try:
            self.update()
        except SolveError as err:  # collective in the Coupler: every rank gets here
            self._error = err
            b.set(np.nan)
            return
        fem_petsc.assemble_residual(snes, x, b, self.u, self._R, self._J, self.bcs)

    def _jacobian(self, snes: PETSc.SNES, x: PETSc.Vec, A: PETSc.Mat, P: PETSc.Mat) -> None:
        fem_petsc.assemble_jacobian(snes, x, A, P, self.u, self._J, None, self.bcs)

    # ------------------------------------------------------------------ solving
    def solve(self) -> tuple[bool, list[float]]:
        """One Newton solve from the current u; (converged, residual norms per iteration)."""
        self.residuals = []
        self._error = None
        u_vec = self._x
        self.u.x.petsc_vec.copy(u_vec)
        self.snes.solve(None, u_vec)
        ok = self.snes.getConvergedReason() > 0 and self._error is None
        if ok:
            fem_petsc.assign(u_vec, self.u)
            self.u.x.scatter_forward()
        return ok, list(self.residuals)

    def run(self, loads: Sequence[float], set_load: Callable[[float], None], *,
            checkpoint_dir: str | Path | None = None, restart: bool = False,
            max_cutbacks: int = 4, on_step: Callable[[dict], None] | None = None,
            model_saver: Callable[[Path], None] | None = None) -> list[dict]:
        """Load steps t = loads[k] (increasing factors); returns one record per step.

        A step whose Newton solve fails is cut into halves (up to ``max_cutbacks`` times). With
        ``checkpoint_dir`` the state after every step is written atomically; ``restart`` resumes
        from it. Each record holds ``step``, ``load``, ``residuals`` (per Newton solve),
        ``newton_iterations``, ``cutbacks``, ``time_s`` and the Coupler's step figures.
        """
        loads = [float(t) for t in loads]
        if any(b <= a for a, b in zip([0.0, *loads], loads, strict=False)):
            raise InputError(f"loads {loads} must increase from 0")
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir)
        history: list[dict] = []
        t_done, first = 0.0, 0
        if restart:
            if ckpt is None:
                raise InputError("restart needs the checkpoint directory of the killed run")
            state = self.load_checkpoint(ckpt)
            history, t_done, first = state["history"], state["load"], state["step"] + 1
            restore = getattr(self.micro, "restore_state", None)
            if restore is not None:
                restore(state.get("micro_state", {}))
        for k in range(first, len(loads)):
            record = self._step(k, t_done, loads[k], set_load, max_cutbacks,
                                steps_left=len(loads) - 1 - k)
            history.append(record)
            t_done = loads[k]
            if on_step is not None:  # may add to the record before it is checkpointed
                on_step(record)
            if ckpt is not None:
                self.write_checkpoint(ckpt, k, t_done, history, model_saver)
        return history

    def _step(self, k: int, t0: float, t1: float, set_load: Callable[[float], None],
              max_cutbacks: int, steps_left: int) -> dict:
        start = time.perf_counter()
        u_saved = self.u.x.array.copy()
        record: dict = {"step": k, "load": t1, "residuals": [], "cutbacks": 0}
        targets, cut = [t1], 0
        t_now = t0
        begin = getattr(self.micro, "begin_step", None)
        while targets:
            t = targets[0]
            if begin is not None:
                begin(k)
            set_load(t)
            ok, res = self.solve()
            record["residuals"].append(res)
            if ok:
                t_now = targets.pop(0)
                u_saved = self.u.x.array.copy()
                continue
            cut += 1
            self.u.x.array[:] = u_saved
            self.u.x.scatter_forward()
            if cut > max_cutbacks:
                set_load(t_now)
                raise SolveError(
                    f"load step {k} (load {t1:g}) did not converge after {max_cutbacks} "
                    f"cut-backs (last error: {self._error or self.snes.getConvergedReason()}); "
                    "use more --steps; the last checkpoint is intact")
            log.info("step %d: Newton failed at load %.4g, cutting the increment", k, t)
            targets.insert(0, 0.5 * (t_now + t))
        record["cutbacks"] = cut
        record["newton_iterations"] = sum(len(r) - 1 for r in record["residuals"])
        end = getattr(self.micro, "end_step", None)
        record.update(end(steps_left=steps_left) if end is not None else {})
        record["failed_points"] = self.comm.allreduce(int((self.source.x.array[
            : len(self.point_ids)] == FAILED).sum()))
        record["time_s"] = time.perf_counter() - start
        return record

    # ------------------------------------------------------------------ output
    def internal_force(self) -> PETSc.Vec:
        """Assembled ∫ P̄ : ∇v dx (no boundary conditions), a ghost-updated PETSc vector."""
        f = fem_petsc.create_vector(self.u.function_space)
        with f.localForm() as fl:
            fl.set(0.0)
        fem_petsc.assemble_vector(f, self._internal)
        f.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
        return f

    def reaction(self, dofs: np.ndarray) -> float:
        """Sum of the internal force over local dof indices ``dofs`` (e.g. the x-dofs of the
        loaded edge), over all ranks: the reaction force there (stress unit × length)."""
        f = self.internal_force()
        n_owned = self.u.function_space.dofmap.index_map.size_local * 2
        arr = f.getArray(readonly=True)
        own = np.asarray(dofs)[np.asarray(dofs) < n_owned]
        value = self.comm.allreduce(float(arr[own].sum()))
        f.destroy()
        return value

    def cell_average(self, f: fem.Function, reduce: str = "mean") -> np.ndarray:
        """Per owned cell: mean (or max) over its quadrature points, shape (n_cells, *value)."""
        n = len(self.cells)
        size = int(np.prod(f.function_space.value_shape)) if f.function_space.value_shape else 1
        a = f.x.array[: n * self.n_qp * size].reshape(n, self.n_qp, size)
        return a.max(axis=1) if reduce == "max" else a.mean(axis=1)

    # ------------------------------------------------------------------ checkpoints
    def write_checkpoint(self, directory: Path, step: int, load: float, history: list[dict],
                         model_saver: Callable[[Path], None] | None = None) -> None:
        """Write u (by dof coordinates, so any rank count can read it), the model (if a
        ``model_saver`` is given), the micro solver's ``checkpoint_state()`` (if it has one) and
        the step history; atomic, collective."""
        V = self.u.function_space
        n_own = V.dofmap.index_map.size_local
        coords = V.tabulate_dof_coordinates()[:n_own, :2]
        vals = self.u.x.array[: 2 * n_own].reshape(-1, 2)
        gathered = self.comm.gather((coords, vals), root=0)
        model_file = f"model_step{step:04d}.pt" if model_saver is not None else None
        if model_saver is not None:
            if self.comm.rank == 0:
                model_saver(directory / model_file)
        if self.comm.rank == 0:
            c = np.concatenate([g[0] for g in gathered])
            v = np.concatenate([g[1] for g in gathered])
            u_file = f"u_step{step:04d}.npz"
            atomic_write(directory / u_file, lambda tmp: _save_npz(tmp, x=c, u=v))
            state = {"step": step, "load": load, "u_file": u_file, "model_file": model_file,
                     "history": history,
                     "micro_state": getattr(self.micro, "checkpoint_state", dict)()}
            atomic_write(directory / "state.json",
                         lambda tmp: tmp.write_text(json.dumps(state, indent=1)))
            for old in directory.glob("*_step*"):
                if f"step{step:04d}" not in old.name:
                    old.unlink(missing_ok=True)
        self.comm.Barrier()

    @staticmethod
    def read_checkpoint(directory: str | Path) -> dict:
        """The state written by :meth:`write_checkpoint` (``model_file`` made a full path)."""
        path = Path(directory) / "state.json"
        if not path.is_file():
            raise CheckpointError(f"no checkpoint in {directory}: run without --restart first")
        state = json.loads(path.read_text())
        if state.get("model_file"):
            state["model_file"] = str(Path(directory) / state["model_file"])
        return state

    def load_checkpoint(self, directory: Path) -> dict:
        """Set u from the checkpoint in ``directory``; returns its state."""
        from scipy.spatial import cKDTree

        state = self.read_checkpoint(directory)
        with np.load(directory / state["u_file"]) as data:
            x, vals = data["x"], data["u"]
        V = self.u.function_space
        mine = V.tabulate_dof_coordinates()[:, :2]
        dist, idx = cKDTree(x).query(mine)
        if dist.max() > 1e-8 * max(1.0, np.abs(x).max()):
            raise CheckpointError(f"the checkpoint in {directory} was written for another mesh")
        self.u.x.array[:] = vals[idx].reshape(-1)
        self.u.x.scatter_forward()
        return state


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append .npz to a path
        np.savez(fh, **arrays)
