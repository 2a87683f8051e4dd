"""Replay a C or Fortran host's calls through the Python API on as many ranks: ``mpiexec -n R
python replay.py CONFIG PREFIX N_STEPS``. Rank r reads the calls the host wrote to
PREFIX.rank<r>.txt (call number, step, point and micro id, F̄, then the host's answers), makes
them (register, begin_step, evaluate, end_step after a step's last call) on a Session over
COMM_WORLD, and writes its answers (P, A, bound, source, in the file's order) to
PREFIX.python.rank<r>.npz. The same ranks matter: the latents of the structures are encoded
in float32 spread over the ranks, so another split rounds them differently."""

from __future__ import annotations

import sys
from collections import defaultdict

from mpi4py import MPI

import numpy as np

from neuroscale_couple.capi.session import Session


def main(config: str, prefix: str, n_steps: int) -> None:
    comm = MPI.COMM_WORLD
    rows = np.loadtxt(f"{prefix}.rank{comm.rank}.txt", ndmin=2)
    s = Session(config, comm)
    ids, first = np.unique(rows[:, 2].astype(np.int64), return_index=True)
    s.register(ids, rows[first, 3].astype(np.int64))
    calls: dict[tuple[int, int], list[int]] = defaultdict(list)  # (call, step) → rows
    for k, (call, step) in enumerate(rows[:, :2].astype(int)):
        calls[call, step].append(k)
    last = {step: max(c for c, st in calls if st == step) for _, step in calls}
    begun = -1
    out = {"P": np.zeros((len(rows), 2, 2)), "A": np.zeros((len(rows), 2, 2, 2, 2)),
           "bound": np.zeros(len(rows)), "source": np.zeros(len(rows), np.int32)}
    for (call, step), ks in sorted(calls.items()):
        if step != begun:
            s.begin_step(step)
            begun = step
        r = s.evaluate(rows[ks, 2].astype(np.int64), rows[ks, 4:8].reshape(-1, 2, 2))
        out["P"][ks], out["A"][ks] = r.stress, r.tangent
        out["bound"][ks], out["source"][ks] = r.uncertainty, r.source
        if call == last[step]:
            s.end_step(n_steps - 1 - step)
    s.close()
    np.savez(f"{prefix}.python.rank{comm.rank}.npz", **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
