"""A small FE² run with an exception injected, for the fault-injection tests (run under mpiexec).

    python fault_injection.py STAGE RANKS TIMES

STAGE ``operator`` raises in the Coupler's operator stage (inside the macro residual),
``fine`` in a fine solve; RANKS ``0`` on rank 0 only, ``all`` on every rank; TIMES ``once``
(the load step is cut back and the run ends normally: exit 0, ``recovered`` printed) or
``always`` (the run stops with a clear error on every rank: exit 3, ``stopped: ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from coupled_helpers import macro_problem

from neuroscale_couple.coupler import Coupler, Policy
from neuroscale_couple.errors import NeuroScaleError
from neuroscale_couple.solvers.microstructure import single_fibre
from neuroscale_couple.solvers.rve_fenicsx import rve_from_config

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "examples" / "models" / "fe2_composite.pt"
FAMILY = {"law": "neo_hookean", "matrix": {"E": 3.0, "nu": 0.35},
          "fibre": {"E": 70.0, "nu": 0.2}, "mesh": {"size": 0.1}}


class Fault:
    """Raises RuntimeError on the chosen ranks: at the first call (``once``) or at every one."""

    def __init__(self, ranks: str, times: str) -> None:
        self.ranks, self.times, self.calls = ranks, times, 0

    def __call__(self) -> None:
        self.calls += 1
        mine = self.ranks == "all" or MPI.COMM_WORLD.rank == int(self.ranks)
        if mine and (self.times == "always" or self.calls == 1):
            raise RuntimeError(f"injected fault on rank {MPI.COMM_WORLD.rank}")


def main(stage: str, ranks: str, times: str) -> int:
    comm = MPI.COMM_WORLD
    fault = Fault(ranks, times)

    def factory(structure):
        rve = rve_from_config(FAMILY, structure)
        if stage == "fine":
            solve = rve.solve

            def faulty(*args, **kwargs):
                fault()
                return solve(*args, **kwargs)

            rve.solve = faulty
        return rve

    from neuroscale_couple.operators.sano import SANO

    model = SANO.from_checkpoint(MODEL) if stage == "operator" else None
    coupler = Coupler(model, factory, family=FAMILY, comm=comm,
                      policy=Policy(rtol=np.inf if model is not None else 0.0))
    if stage == "operator":
        predict = coupler._predict

        def faulty_predict(*args):
            fault()
            return predict(*args)

        coupler._predict = faulty_predict
    stepper, set_load = macro_problem(comm, coupler, lambda x, ids: [single_fibre(0.3)] * len(ids))
    stepper.max_cutbacks = 1
    try:
        history = stepper.run([1.0], set_load)
    except NeuroScaleError as err:
        print(f"rank {comm.rank} stopped: {err}", flush=True)
        return 3
    finally:
        coupler.close()
    print(f"rank {comm.rank} recovered after {history[0]['cutbacks']} cut-backs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
