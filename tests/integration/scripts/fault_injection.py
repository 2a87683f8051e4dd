"""Small FE² runs with an exception injected, for the fault-injection tests (run under mpiexec).

    python fault_injection.py STAGE:RANKS:TIMES [STAGE:RANKS:TIMES ...]

runs one case after the other in one process (sharing its start-up). STAGE is where the fault
is injected:

- ``residual``: the Coupler's operator stage raises (inside the macro residual);
- ``jacobian``: the host's Jacobian callback raises after its assembly;
- ``jacobian-nan``: the assembled Jacobian gets a NaN entry;
- ``fine``: a fine solve raises (classic FE²);
- ``retraining``, ``retraining-bg``: the online retraining raises in a training step
  (foreground; background thread);
- ``collective``: the Jacobian callback raises before its assembly, so that on RANKS ``0`` of
  two ranks the other rank waits inside the assembly: the failed rank aborts all ranks after
  ``NEUROSCALE_FAULT_TIMEOUT_S`` (the process ends there).

RANKS ``0`` raises on rank 0 only, ``all`` on every rank; TIMES ``once`` at the first call,
``always`` at every one. Each rank writes one line per case:
``rank R CASE recovered after N cut-backs`` (the load step was cut back and the run ended),
``rank R CASE stopped: MESSAGE`` (the run stopped with an error on this rank) or, for the
retraining stages, ``rank R CASE retraining failed at steps [...], model version V: MESSAGE``
(the run ended). Exit status 3 if a case stopped, else 0.
"""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
from pathlib import Path

from mpi4py import MPI

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from coupled_helpers import macro_problem

from neuroscale_couple import training
from neuroscale_couple.coupler import Coupler, Policy
from neuroscale_couple.errors import NeuroScaleError
from neuroscale_couple.retraining import RetrainConfig
from neuroscale_couple.solvers.microstructure import single_fibre
from neuroscale_couple.solvers.rve_fenicsx import rve_from_config

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "examples" / "models" / "fe2_composite.pt"
FAMILY = {"law": "neo_hookean", "matrix": {"E": 3.0, "nu": 0.35},
          "fibre": {"E": 70.0, "nu": 0.2}, "mesh": {"size": 0.1}}
JACOBIAN = ("jacobian", "jacobian-nan", "collective")


class Fault:
    """Fires on the chosen ranks: at the first call (``once``) or at every one."""

    def __init__(self, ranks: str, times: str) -> None:
        self.ranks, self.times, self.calls, self.armed = ranks, times, 0, True

    def fires(self) -> bool:
        if not self.armed:
            return False
        self.calls += 1
        mine = self.ranks == "all" or MPI.COMM_WORLD.rank == int(self.ranks)
        return mine and (self.times == "always" or self.calls == 1)

    def __call__(self) -> None:
        if self.fires():
            raise RuntimeError(f"injected fault on rank {MPI.COMM_WORLD.rank}")


def patched(owner, name: str, make):
    """Replace ``owner.name`` by ``make(original)``; returns the undo."""
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    return lambda: setattr(owner, name, original)


def faulty(fault: Fault):
    """``make`` for :func:`patched`: the function, with the fault at each call first."""

    def make(function):
        def call(*args, **kwargs):
            fault()
            return function(*args, **kwargs)

        return call

    return make


def faulty_jacobian(stage: str, fault: Fault):
    """The host's Jacobian callback with the stage's fault."""

    def make(assemble):
        def jacobian(snes, x, J, P, **kwargs):
            if stage == "collective":
                fault()
            assemble(snes, x, J, P, **kwargs)
            if stage == "jacobian":
                fault()
            elif stage == "jacobian-nan":
                if fault.fires():
                    row = J.getOwnershipRange()[0]
                    J.setValue(row, row, np.nan)
                J.assemble()  # collective: on every rank

        return jacobian

    return make


def run_case(case: str, model) -> tuple[str, bool]:
    """One case; returns this rank's line and whether the run stopped."""
    import dolfinx.fem.petsc

    comm = MPI.COMM_WORLD
    stage, ranks, times = case.split(":")
    fault = Fault(ranks, times)
    retraining = stage.startswith("retraining")

    def factory(structure):
        rve = rve_from_config(FAMILY, structure)
        if stage == "fine":
            patched(rve, "solve", faulty(fault))
        return rve

    replay = comm.bcast(tempfile.mkdtemp(prefix="faults-") if comm.rank == 0 else None)
    options: dict = {"policy": Policy(rtol=np.inf)}
    if stage == "fine":
        model, options = None, {"policy": Policy(rtol=0.0)}
    elif retraining:
        options = {"policy": Policy(rtol=1e-6, atol=1e-9), "replay_dir": replay,
                   "model_path": MODEL,
                   "retrain": RetrainConfig(epochs=2, min_new=1, anchor_micro=2,
                                            background=stage.endswith("-bg"))}
    coupler = Coupler(copy.deepcopy(model), factory, family=FAMILY, comm=comm, **options)
    undo = [lambda: None]
    if stage == "residual":
        undo.append(patched(coupler, "_predict", faulty(fault)))
    elif stage in JACOBIAN:  # the problem takes the callback when it is built
        undo.append(patched(dolfinx.fem.petsc, "assemble_jacobian",
                            faulty_jacobian(stage, fault)))
        fault.armed = False  # not in MicroStress.attach's first assembly
    elif retraining:
        undo.append(patched(training, "batch_loss", faulty(fault)))
    try:
        stepper, set_load = macro_problem(comm, coupler,
                                          lambda x, ids: [single_fibre(0.3)] * len(ids))
        stepper.max_cutbacks = 1
        fault.armed = True
        loads = [1.0] if not retraining else [0.25, 0.5, 0.75, 1.0][stage == "retraining":]
        history = stepper.run(loads, set_load)
    except NeuroScaleError as err:
        return f"rank {comm.rank} {case} stopped: {err}", True
    finally:
        for u in undo:
            u()
        coupler.close()
        comm.Barrier()
        if comm.rank == 0:
            shutil.rmtree(replay, ignore_errors=True)
    if retraining:
        failed = [h["step"] for h in history if h["retrain_failed"]]
        messages = " | ".join(h["retrain_failed"] for h in history if h["retrain_failed"])
        return (f"rank {comm.rank} {case} retraining failed at steps {failed}, model version "
                f"{history[-1]['model_version']}: {messages}", False)
    return f"rank {comm.rank} {case} recovered after {history[0]['cutbacks']} cut-backs", False


def main(cases: list[str]) -> int:
    from neuroscale_couple.operators.sano import SANO

    model = SANO.from_checkpoint(MODEL)
    stopped = False
    for case in cases:
        line, stop = run_case(case, model)
        sys.stdout.write(line + "\n")  # one write: mpiexec interleaves the ranks' writes
        sys.stdout.flush()
        stopped |= stop
    return 3 if stopped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
