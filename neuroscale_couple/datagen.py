"""`neuroscale generate`: sample structures × loads, solve the fine problems, write HDF5 data.

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

``microstructure`` may be a list of such mappings, one per family of cells (each with its own
``count`` and ``seed``, and optionally its own ``loads: {radius, min_radius, seed}``), e.g. random
arrangements plus fibre chains (``kind: fibre_chain``) that random addition almost never draws.

or, for a crystal (Cauchy–Born fine solver; one structure per temperature)::

    crystal: {element: Cu, lattice: fcc, supercell: [3, 3, 3], vacancies: 1, calculator: emt,
              temperature: [0, 300]}      # a number or a list of temperatures (K)
    loads: {per_microstructure: 64, radius: 0.05, seed: 1}
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


def plan(config: dict) -> tuple[list, np.ndarray]:
    """Validate a generate config; return the structures and the (M·L, 2, 2) loads."""
    if "crystal" in config:
        return _plan_crystal(config)
    check_law(config.get("law", "neo_hookean"))
    for name in ("matrix", "fibre"):
        if name in config:
            Phase.from_config(config[name], name)
    mcfg, lcfg = config.get("microstructure"), config.get("loads")
    groups = mcfg if isinstance(mcfg, list) else [mcfg]
    if not groups or not all(isinstance(g, dict) for g in groups) or not isinstance(lcfg, dict):
        raise InputError("a generate config needs the mappings `microstructure` (or a list of "
                         "them, one per family of cells) and `loads`")
    per = int(lcfg.get("per_microstructure", 1))
    if per < 1:
        raise InputError(f"loads.per_microstructure={per}: must be ≥ 1")
    structures, loads = [], []
    for g, group in enumerate(groups):
        name = "microstructure" if len(groups) == 1 else f"microstructure[{g}]"
        count, ball = int(group.get("count", 1)), group.get("loads", {})
        if count < 1:
            raise InputError(f"{name}.count={count}: must be ≥ 1")
        if not isinstance(ball, dict) or "per_microstructure" in ball:
            raise InputError(f"{name}.loads={ball!r}: give a mapping of radius, min_radius, seed "
                             "(loads.per_microstructure is one for the whole data set)")
        ball = dict(lcfg, **ball)
        seed = int(group.get("seed", 0))
        for m in range(count):
            rng = rng_for(seed, m)
            drawn = {k: v for k, v in group.items() if k != "loads"}
            drawn["volume_fraction"] = draw_parameter(group.get("volume_fraction"), rng,
                                                      f"{name}.volume_fraction")
            if "n_fibres" in group:  # else the kind's default (a chain: 2)
                drawn["n_fibres"] = draw_parameter(group["n_fibres"], rng, f"{name}.n_fibres",
                                                   integer=True)
            structures.append(micro.from_config(drawn, seed=int(rng.integers(2**31))))
            loads.append(loads_in_ball(per, float(ball.get("radius", 0.15)),
                                       rng_for(int(ball.get("seed", 1)), len(loads)),
                                       min_radius=float(ball.get("min_radius", 0.0))))
    return structures, np.concatenate(loads)


def _plan_crystal(config: dict) -> tuple[list, np.ndarray]:
    from neuroscale_couple.solvers.cauchy_born import Crystal, cauchy_born_from_config

    ccfg, lcfg = config["crystal"], config.get("loads")
    if not isinstance(ccfg, dict) or not isinstance(lcfg, dict):
        raise InputError("a crystal generate config needs the mappings `crystal` and `loads`")
    temps = ccfg.get("temperature", 0.0)
    temps = [float(t) for t in (temps if isinstance(temps, list) else [temps])]
    base = {k: v for k, v in ccfg.items() if k != "temperature"}
    if "a0" not in base:  # resolve once, so every structure (and the model family) records it
        base["a0"] = cauchy_born_from_config(base)[1]
    structures = [Crystal(dict(base, temperature=t)) for t in temps]
    structures[0].solver()  # validates the config before any collective work
    per = int(lcfg.get("per_microstructure", 1))
    if per < 1:
        raise InputError(f"loads.per_microstructure={per}: must be ≥ 1")
    loads = [loads_in_ball(per, float(lcfg.get("radius", 0.05)),
                           rng_for(int(lcfg.get("seed", 1)), m),
                           min_radius=float(lcfg.get("min_radius", 0.0)))
             for m in range(len(structures))]
    return structures, np.concatenate(loads)


def fine_solver(config: dict, structure):
    """The true fine solver of one structure of a generate config (RVE or crystal)."""
    if "crystal" in config:
        return structure.solver()
    from neuroscale_couple.solvers.rve_fenicsx import rve_from_config

    return rve_from_config(config, structure)


def generate(config: dict, out: str | Path, comm: MPI.Comm = MPI.COMM_WORLD,
             progress: bool = True) -> Path:
    """Solve every (microstructure, load) sample of ``config`` into the HDF5 file ``out``."""
    from neuroscale_couple.fine import close_solver
    from neuroscale_couple.store import RVEDataset

    structures, F = plan(config)  # every rank validates the same config before any collective
    if "crystal" in config:  # record the resolved lattice constant with the data
        config = dict(config, crystal=dict(config["crystal"], a0=structures[0].config["a0"]))
    per = int(config["loads"].get("per_microstructure", 1))
    q = int(config.get("fields_resolution", 0) or 0)
    fields = {"w": (q, q, 2), "F": (q, q, 2, 2), "P": (q, q, 2, 2)} if q else {}
    store, error = None, None
    if comm.rank == 0:
        try:
            arrays = type(structures[0]).arrays(structures,
                                                int(config.get("image_resolution", 64)))
            thermal = any(getattr(s, "temperature", 0.0) > 0 for s in structures)
            store = RVEDataset.create_or_resume(out, config, arrays, F, per, fields, thermal)
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
                solver = fine_solver(config, structures[m])
                try:
                    res = solver.solve(F[idx], fields_resolution=q or None)
                finally:
                    close_solver(solver)
                info = {"time_s": res.info["time_s"],  # a crystal reports relaxation steps
                        "newton_iterations": res.info.get("newton_iterations",
                                                          res.info.get("relax_steps")),
                        "stress_stderr": res.info.get("stress_stderr",  # 0 for static solves
                                                      np.zeros_like(res.stress))}
                result = (idx, res.stress, res.tangent, info, res.fields)
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

    return tqdm(total=total, desc="fine structures", unit="structure", disable=not enabled)
