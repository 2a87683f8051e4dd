"""`neuroscale generate`: sample microstructures × loads, solve RVEs, write an HDF5 data set.

Work unit = one microstructure with all its loads (one mesh, warm starts along its loads); units
are dealt to ranks round-robin, results gathered on rank 0 which writes the file after each round.
Every random draw is keyed on (seed, microstructure index), so the data set does not depend on
the number of ranks, and a restart after a kill solves only the units not yet on disk.

Config (YAML)::

    microstructure: {kind: random_fibres, volume_fraction: [0.1, 0.5], n_fibres: [1, 6],
                     count: 16, seed: 0, min_gap: 0.02}
    loads: {per_microstructure: 8, radius: 0.15, seed: 1}   # min_radius: a shell (OOD)
    law: neo_hookean
    matrix: {E: 3.0, nu: 0.35}
    fibre: {E: 70.0, nu: 0.2}
    mesh: {size: 0.02, degree: 1}        # optional
    bc: periodic
    image_resolution: 64
    fields_resolution: 0                  # > 0: store micro fields w, F, P on that grid
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

from neuroscale_couple.errors import InputError, NeuroScaleError
from neuroscale_couple.materials import Phase, check_law
from neuroscale_couple.parallel import any_rank, round_robin
from neuroscale_couple.sampling import draw_parameter, loads_in_ball, rng_for
from neuroscale_couple.solvers import microstructure as micro

log = logging.getLogger(__name__)


def plan(config: dict) -> tuple[list[micro.Microstructure], np.ndarray]:
    """Validate a generate config; return the microstructures and the (M·L, 2, 2) loads."""
    check_law(config.get("law", "neo_hookean"))
    for name in ("matrix", "fibre"):
        if name in config:
            Phase.from_config(config[name], name)
    mcfg, lcfg = config.get("microstructure"), config.get("loads")
    if not isinstance(mcfg, dict) or not isinstance(lcfg, dict):
        raise InputError("a generate config needs the mappings `microstructure` and `loads`")
    count = int(mcfg.get("count", 1))
    per = int(lcfg.get("per_microstructure", 1))
    if count < 1 or per < 1:
        raise InputError(f"microstructure.count={count}, loads.per_microstructure={per}: "
                         "both must be ≥ 1")
    seed = int(mcfg.get("seed", 0))
    structures, loads = [], []
    for m in range(count):
        rng = rng_for(seed, m)
        drawn = dict(mcfg)
        drawn["volume_fraction"] = draw_parameter(mcfg.get("volume_fraction"), rng,
                                                  "microstructure.volume_fraction")
        drawn["n_fibres"] = draw_parameter(mcfg.get("n_fibres", 1), rng,
                                           "microstructure.n_fibres", integer=True)
        structures.append(micro.from_config(drawn, seed=int(rng.integers(2**31))))
        loads.append(loads_in_ball(per, float(lcfg.get("radius", 0.15)),
                                   rng_for(int(lcfg.get("seed", 1)), m),
                                   min_radius=float(lcfg.get("min_radius", 0.0))))
    return structures, np.concatenate(loads)


def micro_arrays(structures: list[micro.Microstructure], resolution: int) -> dict[str, np.ndarray]:
    """Per-microstructure arrays for the data set (see :mod:`neuroscale_couple.store`)."""
    n_max = max(1, max(s.n_fibres for s in structures))
    centres = np.full((len(structures), n_max, 2), np.nan)
    for i, s in enumerate(structures):
        centres[i, : s.n_fibres] = s.centres
    return {
        "volume_fraction": np.array([s.volume_fraction for s in structures]),
        "n_fibres": np.array([s.n_fibres for s in structures]),
        "seed": np.array([-1 if s.seed is None else s.seed for s in structures]),
        "radius": np.array([s.radius for s in structures]),
        "centres": centres,
        "image": np.stack([s.image(resolution) for s in structures]).astype(np.float32),
    }


def generate(config: dict, out: str | Path, comm: MPI.Comm = MPI.COMM_WORLD,
             progress: bool = True) -> Path:
    """Solve every (microstructure, load) sample of ``config`` into the HDF5 file ``out``."""
    from neuroscale_couple.solvers.rve_fenicsx import rve_from_config
    from neuroscale_couple.store import RVEDataset

    structures, F = plan(config)  # every rank validates the same config before any collective
    per = int(config["loads"].get("per_microstructure", 1))
    q = int(config.get("fields_resolution", 0) or 0)
    fields = {"w": (q, q, 2), "F": (q, q, 2, 2), "P": (q, q, 2, 2)} if q else {}
    store, error = None, None
    if comm.rank == 0:
        try:
            arrays = micro_arrays(structures, int(config.get("image_resolution", 64)))
            store = RVEDataset.create_or_resume(out, config, arrays, F, per, fields)
        except InputError as err:
            error = err
    error = comm.bcast(error, root=0)
    if error is not None:
        raise error
    done = comm.bcast(store.done if store is not None else None, root=0)
    pending = [m for m in range(len(structures)) if not done[m * per:(m + 1) * per].all()]
    if comm.rank == 0:
        log.info("generate: %d microstructures × %d loads, %d to solve on %d ranks",
                 len(structures), per, len(pending), comm.size)
    bar = _progress(len(pending), progress and comm.rank == 0)
    t0 = time.perf_counter()
    for m in round_robin(pending, comm):
        result, failure = None, None
        if m is not None:
            try:
                idx = np.arange(m * per, (m + 1) * per)
                with rve_from_config(config, structures[m]) as rve:
                    res = rve.solve(F[idx], fields_resolution=q or None)
                result = (idx, res.stress, res.tangent, res.info, res.fields)
            except Exception as err:  # reported on every rank below, never lost in one rank
                failure = f"microstructure {m}: {err}"
        gathered = comm.gather(result, root=0)
        if comm.rank == 0:
            for item in gathered:
                if item is not None:
                    store.write(*item)
            bar.update(sum(item is not None for item in gathered))
        if any_rank(failure is not None, comm):
            messages = [f for f in comm.allgather(failure) if f]
            if store is not None:
                store.close()
            raise NeuroScaleError("generate stopped (finished samples are saved; rerun to resume): "
                                  + "; ".join(messages))
    bar.close()
    if store is not None:
        store.close()
        log.info("generate: wrote %s in %.1f s", out, time.perf_counter() - t0)
    return Path(out)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="RVE microstructures", unit="micro", disable=not enabled)
