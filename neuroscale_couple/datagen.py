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
    fibre: {E: 70.0, nu: 0.2}            # or ranges, drawn per cell: neuroscale_couple.phases
    mesh: {size: 0.02, degree: 1}        # optional
    bc: periodic
    image_resolution: 64
    fields_resolution: 0                  # > 0: store micro fields w, F, P on that grid

``microstructure`` may be a list of such mappings, one per group of cells (each with its own
``count`` and ``seed``, and optionally its own ``loads: {radius, min_radius, seed}``), e.g. random
arrangements plus fibre chains (``kind: fibre_chain``) that random addition almost never draws.
Each group names its structure family by ``kind`` (:mod:`neuroscale_couple.structures`), whose
class draws its structures, stores their arrays and builds their fine solver; e.g. a crystal
(Cauchy–Born fine solver; one structure per temperature)::

    microstructure: {kind: crystal, element: Cu, lattice: fcc, supercell: [3, 3, 3],
                     vacancies: 1, calculator: emt, temperature: [0, 300]}  # K: number or list
    loads: {per_microstructure: 64, radius: 0.05, seed: 1}

(the older ``crystal: {element: Cu, ...}`` in place of ``microstructure`` is read as such).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np

from neuroscale_couple.config import check_keys, whole_number
from neuroscale_couple.errors import InputError, NeuroScaleError, SolveError
from neuroscale_couple.parallel import any_rank, round_robin
from neuroscale_couple.sampling import loads_in_ball, rng_for
from neuroscale_couple.structures import (
    BUILTIN,
    check_group,
    common_family,
    config_groups,
    family,
    stored_arrays,
    with_groups,
)

log = logging.getLogger(__name__)


GENERATE_KEYS = ("microstructure", "loads", "image_resolution", "fields_resolution")
"""Top-level keys of every generate config; each structure family adds its ``material_keys``
(and the older crystal shape has ``crystal`` in place of ``microstructure``)."""
LOAD_KEYS = ("radius", "min_radius", "seed")
"""Keys of a group's own ``loads``; the config's ``loads`` has ``per_microstructure`` too."""


def resolve_config(config: dict) -> dict:
    """``config`` (checked by :func:`check_config`) with what its data must record filled in
    by each group's family (a crystal's lattice constant); ``config`` itself where nothing is
    to fill."""
    groups, classes, _ = check_config(config)
    return with_groups(config, [cls.resolve(g) for g, cls in zip(groups, classes, strict=True)])


def check_config(config: dict) -> tuple[list[dict], list[type], list[str]]:
    """Refuse unknown keys — top level, ``loads``, each structure group and its ``loads`` —
    naming the nearest known one, and bad counts; no solver work. Returns the structure
    groups, their family classes and their names in errors."""
    where = "the generate config"
    try:
        groups = config_groups(config)
    except InputError:  # e.g. `microstructure` misspelt: name the key
        check_keys(config, _top_keys(config, [family(k) for k in BUILTIN]), where)
        raise
    names = _group_names(config)
    classes = [family(g.get("kind"), name) for g, name in zip(groups, names, strict=True)]
    check_keys(config, _top_keys(config, classes), where)
    lcfg = config.get("loads")
    if not isinstance(lcfg, dict):
        raise InputError("a generate config needs the mapping `loads` (per_microstructure, "
                         "radius, seed) besides `microstructure`")
    check_keys(lcfg, ("per_microstructure", *LOAD_KEYS), "loads")
    whole_number(lcfg.get("per_microstructure", 1), "loads.per_microstructure")
    whole_number(config.get("image_resolution", 64), "image_resolution")
    whole_number(config.get("fields_resolution", 0) or 0, "fields_resolution", minimum=0)
    for group, cls, name in zip(groups, classes, names, strict=True):
        check_group(group, cls, name)
        ball = group.get("loads", {})
        if not isinstance(ball, dict) or "per_microstructure" in ball:
            raise InputError(f"{name}.loads={ball!r}: give a mapping of radius, min_radius, seed "
                             "(loads.per_microstructure is one for the whole data set)")
        check_keys(ball, LOAD_KEYS, f"{name}.loads")
    return groups, classes, names


def plan(config: dict) -> tuple[list, np.ndarray]:
    """Validate a generate config; return the structures and the (M·L, d, d) loads (d: the
    families' ``dim``, one for the whole config)."""
    groups, classes, names = check_config(config)
    lcfg = config["loads"]
    per = int(lcfg.get("per_microstructure", 1))
    for cls in dict.fromkeys(classes):
        cls.family_config(config)  # the material keys, checked before any structure is drawn
    dims = {cls.dim for cls in classes}
    if len(dims) > 1:
        raise InputError(f"{', '.join(names)} mix 2D and 3D structures: keep each dimension "
                         "in its own generate config")
    structures, loads = [], []
    for group, cls, name in zip(groups, classes, names, strict=True):
        ball = dict(lcfg, **group.get("loads", {}))
        for structure in cls.plan(cls.resolve(group), name):
            structures.append(structure)
            loads.append(loads_in_ball(per, float(ball.get("radius", cls.default_load_radius)),
                                       rng_for(int(ball.get("seed", 1)), len(loads)),
                                       min_radius=float(ball.get("min_radius", 0.0)),
                                       dim=cls.dim))
    return structures, np.concatenate(loads)


def structure_materials(config: dict, structures: list) -> tuple[dict[str, np.ndarray],
                                                                  list[dict]]:
    """Per-structure arrays of drawn material constants (stored under ``/micro``) and each
    structure's material config, from its family's optional ``materials`` (two-phase cells
    with phase ranges, :mod:`neuroscale_couple.phases`); else none and ``config`` for all."""
    draw = getattr(common_family(structures), "materials", None)
    return draw(config, len(structures)) if draw else ({}, [config] * len(structures))


def _top_keys(config: dict, classes: list[type]) -> set[str]:
    """The top-level keys a generate config of structure families ``classes`` may hold."""
    older = "crystal" in config and "microstructure" not in config
    return {*GENERATE_KEYS, *(("crystal",) if older else ()),
            *(key for cls in classes for key in cls.material_keys)}


def _group_names(config: dict) -> list[str]:
    """How errors name the groups: ``microstructure``, or ``microstructure[g]`` in a list."""
    n = len(config_groups(config))
    return ["microstructure"] if n == 1 else [f"microstructure[{g}]" for g in range(n)]


def generate(config: dict, out: str | Path, comm: MPI.Comm = MPI.COMM_WORLD,
             progress: bool = True) -> Path:
    """Solve every (microstructure, load) sample of ``config`` into the HDF5 file ``out``."""
    from neuroscale_couple.fine import close_solver
    from neuroscale_couple.store import RVEDataset

    config = resolve_config(config)  # e.g. a crystal's lattice constant, recorded with the data
    structures, F = plan(config)  # every rank validates the same config before any collective
    per = int(config["loads"].get("per_microstructure", 1))
    q = int(config.get("fields_resolution", 0) or 0)  # both checked by plan
    d = F.shape[1]
    grid = (q,) * d
    fields = {"w": (*grid, d), "F": (*grid, d, d), "P": (*grid, d, d)} if q else {}
    phases, materials = structure_materials(config, structures)
    store, error = None, None
    if comm.rank == 0:
        try:
            arrays = {**stored_arrays(structures, int(config.get("image_resolution", 64))),
                      **phases}
            noisy = any(s.noisy for s in structures)
            store = RVEDataset.create_or_resume(out, config, arrays, F, per, fields, noisy)
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
    failed: list[str] = []  # structures whose fine solve did not converge: skipped, recorded
    for m in round_robin(pending, comm):
        result, failure, unsolved = None, None, None
        if m is not None:
            try:
                idx = np.arange(m * per, (m + 1) * per)
                solver = structures[m].fine_solver(materials[m])
                try:
                    res = solver.solve(F[idx], fields_resolution=q or None)
                finally:
                    close_solver(solver)
                info = {"time_s": res.info["time_s"],
                        "newton_iterations": res.info["iterations"],
                        "stress_stderr": res.info.get("stress_stderr",  # 0 for static solves
                                                      np.zeros_like(res.stress))}
                result = (idx, res.stress, res.tangent, info, res.fields)
            except SolveError as err:  # the solver's own failure: this structure is left out
                unsolved = (np.arange(m * per, (m + 1) * per), f"microstructure {m}: {err}")
            except Exception as err:  # reported on every rank below, never lost in one rank
                failure = f"microstructure {m}: {err}"
        gathered, lost = comm.gather(result, root=0), comm.gather(unsolved, root=0)
        if comm.rank == 0:
            for item in gathered:
                if item is not None:
                    store.write(*item)
            for idx, why in (u for u in lost if u is not None):
                store.fail(idx)
                failed.append(why)
                log.warning("generate: %s — left out of the data set", why)
            bar.update(sum(item is not None for item in gathered + lost))
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
        if failed:
            log.warning("generate: %d microstructures failed in the fine solver and are left "
                        "out (flagged in /samples/done): %s", len(failed), "; ".join(failed))
    return Path(out)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="fine structures", unit="structure", disable=not enabled)
