"""Optional helper around a user's DOLFINx problem: load stepping with cut-back, checkpoints.

:class:`LoadStepper` drives any ``NonlinearProblem`` whose stress comes from a
:class:`~neuroscale_couple.adapters.fenicsx.MicroStress` through a load path of any sign and
shape (unloading included): a step whose Newton solve fails is cut into halves, the state after
every step is checkpointed atomically (displacement by dof coordinates, so any rank count can
read it back; the micro solver's state; the model), and a killed run restarts from the last
completed step::

    stepper = LoadStepper(problem, micro)
    history = stepper.run(loads, set_load, checkpoint_dir="out/checkpoint")
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc

from neuroscale_couple.adapters.fenicsx import MicroStress
from neuroscale_couple.errors import CheckpointError, InputError, SolveError
from neuroscale_couple.store import atomic_write

log = logging.getLogger(__name__)


class LoadStepper:
    """Load steps of ``problem`` (its ``solve()`` attached to ``micro``), with cut-back.

    Parameters
    ----------
    problem : the user's ``dolfinx.fem.petsc.NonlinearProblem`` after ``micro.attach(problem)``.
    micro : its :class:`MicroStress`.
    max_cutbacks : halvings of a failing load increment before the run stops.
    """

    def __init__(self, problem: fem_petsc.NonlinearProblem, micro: MicroStress, *,
                 max_cutbacks: int = 4) -> None:
        if max_cutbacks < 0:
            raise InputError(f"max_cutbacks={max_cutbacks}: give 0 or more halvings")
        self.problem, self.micro, self.max_cutbacks = problem, micro, max_cutbacks
        self.u, self.comm = micro.u, micro.comm
        V = self.u.function_space
        self.dofs = V.dofmap.index_map.size_global * V.dofmap.index_map_bs
        self.residuals: list[float] = []
        problem.solver.setMonitor(lambda _snes, _it, norm: self.residuals.append(float(norm)))

    def run(self, loads: Sequence[float], set_load: Callable[[float], None], *,
            checkpoint_dir: str | Path | None = None, restart: bool = False,
            params: dict | None = None, allow_changes: bool = False,
            on_step: Callable[[dict], None] | None = None,
            model_saver: Callable[[Path], None] | None = None) -> list[dict]:
        """Solve at load factors ``loads[k]`` (finite, any sign and order; the path starts at
        0); returns one record per step.

        ``set_load(t)`` sets the boundary values or loads at factor t. With ``checkpoint_dir``
        the state after every step is written atomically (``model_saver(path)`` writes the
        model when given) and ``restart`` resumes from it. The checkpoint records the load
        path, the mesh size and ``params`` (the run's other settings, JSON values, e.g. the
        tolerance and the model file): a restart with any of them changed is refused unless
        ``allow_changes``. ``on_step(record)`` may add to a record before it is checkpointed.
        Each record holds ``step``, ``load``, ``residuals`` (per Newton solve),
        ``newton_iterations``, ``cutbacks``, ``time_s`` and the micro solver's step report
        (:attr:`MicroStress.reports`).
        """
        loads = [float(t) for t in loads]
        if not loads or not np.all(np.isfinite(loads)):
            raise InputError(f"loads {loads}: give a non-empty sequence of finite load factors")
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir)
        if restart and ckpt is None:
            raise InputError("restart needs the checkpoint directory of the killed run")
        history: list[dict] = []
        t_done, first = 0.0, 0
        run_params = {"loads": loads, "dofs": self.dofs, "points": self.micro.n_points,
                      **json.loads(json.dumps(params or {}))}
        if restart:
            state = self.load_checkpoint(ckpt)
            changed = {k: (state["params"].get(k), v) for k, v in run_params.items()
                       if state["params"].get(k) != v}
            if changed and not allow_changes:
                detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}"
                                   for k, (a, b) in changed.items())
                raise CheckpointError(f"the checkpoint in {ckpt} is of another run ({detail}): "
                                      "restart with the same settings, or start afresh")
            history, t_done, first = state["history"], state["load"], state["step"] + 1
            self.micro.micro.restore_state(state["micro_states"])
        for k in range(first, len(loads)):
            record = self._step(k, t_done, loads[k], set_load, steps_left=len(loads) - 1 - k)
            history.append(record)
            t_done = loads[k]
            if on_step is not None:
                on_step(record)
            if ckpt is not None:
                self.write_checkpoint(ckpt, k, t_done, history, run_params, model_saver)
        return history

    def _step(self, k: int, t0: float, t1: float, set_load: Callable[[float], None],
              steps_left: int) -> dict:
        start = time.perf_counter()
        record: dict = {"step": k, "load": t1, "residuals": []}
        u_saved = self.u.x.array.copy()
        targets, t_now, cut = [t1], t0, 0
        snes = self.problem.solver
        with self.micro.load_step(k, steps_left=steps_left):
            while targets:
                t = targets[0]
                set_load(t)
                self.residuals = []
                self.problem.solve()
                record["residuals"].append(self.residuals)
                if snes.getConvergedReason() > 0 and self.micro.error is None:
                    t_now = targets.pop(0)
                    u_saved = self.u.x.array.copy()
                    continue
                cut += 1
                self.u.x.array[:] = u_saved  # NonlinearProblem.solve keeps the failed iterate
                self.u.x.scatter_forward()
                if cut > self.max_cutbacks:
                    set_load(t_now)
                    error = self.micro.error
                    why = (f"the last solve's evaluation failed: {error}" if error is not None else
                           f"Newton diverged (SNES reason {snes.getConvergedReason()}): take "
                           "smaller load steps")
                    raise SolveError(
                        f"load step {k} (load {t1:g}) did not converge after {self.max_cutbacks} "
                        f"cut-backs; {why}" + ("; the last checkpoint is intact" if k else ""))
                log.info("step %d: Newton failed at load %.4g (%s), cutting the increment", k,
                         t, self.micro.error or snes.getConvergedReason())
                targets.insert(0, 0.5 * (t_now + t))
        record["cutbacks"] = cut
        record["newton_iterations"] = sum(max(len(r) - 1, 0) for r in record["residuals"])
        record.update(self.micro.reports[-1])
        record["time_s"] = time.perf_counter() - start
        return record

    # ------------------------------------------------------------------ checkpoints
    def write_checkpoint(self, directory: Path, step: int, load: float, history: list[dict],
                         params: dict, model_saver: Callable[[Path], None] | None = None
                         ) -> None:
        """Write u (by dof coordinates), the model (``model_saver``), each rank's micro solver
        ``checkpoint_state()`` (``micro_step<k>.rank<r>.npz``), the step history and the run's
        ``params``, with the SHA-256 of each file; atomic, collective."""
        V = self.u.function_space
        d = self.micro.dim
        n_own = V.dofmap.index_map.size_local
        coords = V.tabulate_dof_coordinates()[:n_own, :d]
        vals = self.u.x.array[: d * n_own].reshape(-1, d)
        gathered = self.comm.gather((coords, vals), root=0)
        micro_file = f"micro_step{step:04d}.rank{self.comm.rank:03d}.npz"
        micro_state = self.micro.micro.checkpoint_state()
        atomic_write(directory / micro_file, lambda tmp: _save_npz(tmp, **micro_state))
        micro_files = self.comm.gather((micro_file, _sha256(directory / micro_file)), root=0)
        if self.comm.rank == 0:
            files = {"u_file": f"u_step{step:04d}.npz"}
            if model_saver is not None:
                files["model_file"] = f"model_step{step:04d}.pt"
                model_saver(directory / files["model_file"])
            atomic_write(directory / files["u_file"], lambda tmp: _save_npz(
                tmp, x=np.concatenate([g[0] for g in gathered]),
                u=np.concatenate([g[1] for g in gathered])))
            state = {"step": step, "load": load, **files,
                     "micro_files": [name for name, _ in micro_files], "history": history,
                     "params": params,
                     "digests": {**{name: _sha256(directory / name) for name in files.values()},
                                 **dict(micro_files)}}
            atomic_write(directory / "state.json",
                         lambda tmp: tmp.write_text(json.dumps(state, indent=1)))
            for old in directory.glob("*_step*"):
                if f"step{step:04d}" not in old.name:
                    old.unlink(missing_ok=True)
        self.comm.Barrier()

    @staticmethod
    def read_checkpoint(directory: str | Path) -> dict:
        """The state written by :meth:`write_checkpoint`, its files checked against their
        digests (``u_file``, ``model_file`` and the ranks' ``micro_files`` made full paths); a
        missing, malformed or altered checkpoint raises :class:`CheckpointError` naming the
        file."""
        directory = Path(directory)
        path = directory / "state.json"
        fix = f"delete {directory} and start the run afresh"
        if not path.is_file():
            raise CheckpointError(f"no checkpoint in {directory}: start the run afresh (no "
                                  "restart) to write one")
        try:
            state = json.loads(path.read_text())
            missing = [k for k in ("step", "load", "u_file", "micro_files", "history", "params",
                                   "digests") if k not in state]
            if missing:
                raise KeyError(f"no {', '.join(missing)}")
            if not isinstance(state["micro_files"], list) or not state["micro_files"]:
                raise TypeError(f"micro_files {state['micro_files']!r} is no list of files")
            if not isinstance(state["digests"], dict):
                raise TypeError(f"digests {state['digests']!r} is no mapping")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path} is not a NeuroScale checkpoint state ({err!r}): "
                                  f"{fix}") from None

        def checked(key: str, name: object) -> str:
            if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
                raise CheckpointError(f"{path}: {key} {name!r} points outside the checkpoint "
                                      f"folder: {fix}")
            file = directory / name
            if not file.is_file() or _sha256(file) != state["digests"].get(name):
                raise CheckpointError(f"{file} is missing or differs from the file the "
                                      f"checkpoint wrote (SHA-256 mismatch): {fix}")
            return str(file)

        for key in ("u_file", "model_file"):
            if state.get(key) is not None:
                state[key] = checked(key, state[key])
        state["micro_files"] = [checked("micro_files", name) for name in state["micro_files"]]
        return state

    def load_checkpoint(self, directory: Path) -> dict:
        """Set u from the checkpoint in ``directory``; returns its state with ``micro_states``,
        the micro solver states to restore (this rank's, if the checkpoint was written on as
        many ranks, else every rank's)."""
        from scipy.spatial import cKDTree

        state = self.read_checkpoint(directory)
        data = _load_npz(state["u_file"], directory)
        x, vals = data.get("x"), data.get("u")
        if x is None or vals is None or not np.isfinite(vals).all():
            raise CheckpointError(f"{state['u_file']} holds no finite displacements: delete "
                                  f"{directory} and start the run afresh")
        mine = self.u.function_space.tabulate_dof_coordinates()[:, : self.micro.dim]
        dist, idx = cKDTree(x).query(mine)
        if dist.max() > 1e-8 * max(1.0, np.abs(x).max()):
            raise CheckpointError(f"the checkpoint in {directory} was written for another mesh")
        self.u.x.array[:] = vals[idx].reshape(-1)
        self.u.x.scatter_forward()
        files = state["micro_files"]
        same = len(files) == self.comm.size
        state["micro_states"] = [_load_npz(f, directory)
                                 for f in ([files[self.comm.rank]] if same else files)]
        return state


def displacement_norm(u: fem.Function) -> float:
    """Euclidean norm of the owned dof values of ``u`` over all ranks (collective)."""
    V = u.function_space
    n = V.dofmap.index_map.size_local * V.dofmap.index_map_bs
    return V.mesh.comm.allreduce(float(np.sum(u.x.array[:n] ** 2))) ** 0.5


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append .npz to a path
        np.savez(fh, **arrays)


def _load_npz(path: str | Path, directory: Path) -> dict[str, np.ndarray]:
    """The arrays of a checkpoint's npz file (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise CheckpointError(f"{path} is unreadable ({err!r}): delete {directory} and start "
                              "the run afresh") from None
