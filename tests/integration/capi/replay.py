"""Replay a C host's calls through the Python API on as many ranks: ``mpiexec -n R python
replay.py CONFIG PREFIX N_STEPS``. Rank r reads the calls the host wrote to PREFIX.rank<r>.txt
(step, iterate, point and micro id, F̄, then the C answers), makes them on a Session over
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
    first = rows[(rows[:, 0] == 0) & (rows[:, 1] == 0)]
    s.register(first[:, 2].astype(np.int64), first[:, 3].astype(np.int64))
    calls: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, (step, iterate) in enumerate(rows[:, :2].astype(int)):
        calls[step, iterate].append(k)
    last = {step: max(i for st, i in calls if st == step) for step, _ in calls}
    out = {"P": np.zeros((len(rows), 2, 2)), "A": np.zeros((len(rows), 2, 2, 2, 2)),
           "bound": np.zeros(len(rows)), "source": np.zeros(len(rows), np.int32)}
    for (step, iterate), ks in sorted(calls.items()):
        if iterate == 0:
            s.begin_step(step)
        r = s.evaluate(rows[ks, 2].astype(np.int64), rows[ks, 4:8].reshape(-1, 2, 2))
        out["P"][ks], out["A"][ks] = r.stress, r.tangent
        out["bound"][ks], out["source"][ks] = r.uncertainty, r.source
        if iterate == last[step]:
            s.end_step(n_steps - 1 - step)
    s.close()
    np.savez(f"{prefix}.python.rank{comm.rank}.npz", **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
