"""What a handle of the C ABI stands for: a Coupler built from a YAML config on a duplicate of
the host's communicator, and the config's table of microstructures by id.

The config holds the keys of :meth:`~neuroscale_couple.coupler.Coupler.from_config` plus
``microstructures``, which maps the host's integer microstructure ids to structures, either

- one structure mapping whose ``seed`` is the id (``{kind: random_fibres, volume_fraction: 0.3,
  n_fibres: 4}``: id 7 is the cell drawn with seed 7), or
- a list of structure mappings, id k being the k-th (ids 0 … len − 1).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mpi4py import MPI

import numpy as np

from neuroscale_couple.config import COUPLER_KEYS, check_keys, coupler_from_config, load_yaml
from neuroscale_couple.coupler import Coupler, CouplerResult, StepReport
from neuroscale_couple.errors import CheckpointError, InputError
from neuroscale_couple.parallel import together
from neuroscale_couple.store import atomic_write
from neuroscale_couple.structures import Structure
from neuroscale_couple.structures import from_config as structure_from_config

CAPI_KEYS = (*COUPLER_KEYS, "microstructures")
"""Keys of a C ABI coupler config: the Coupler's and the host's microstructure ids."""
MANIFEST = "coupler.json"


def structure_table(spec: object) -> Callable[[int], Structure]:
    """The structure of each microstructure id under a config's ``microstructures`` (see the
    module docstring); equal ids give the same object."""
    if isinstance(spec, dict):
        def make(i: int) -> Structure:
            return structure_from_config(spec, seed=i, name="microstructures")
    elif isinstance(spec, list) and spec:
        def make(i: int) -> Structure:
            if not 0 <= i < len(spec):
                raise InputError(f"microstructure id {i}: the config's microstructures list "
                                 f"has ids 0 to {len(spec) - 1}")
            return structure_from_config(spec[i], name=f"microstructures[{i}]")
    else:
        raise InputError(f"microstructures={spec!r}: give one structure mapping (the id is its "
                         "seed) or a list of them (the id is the index)")
    made: dict[int, Structure] = {}

    def structure(i: int) -> Structure:
        if i not in made:
            made[i] = make(i)
        return made[i]

    return structure


def start_petsc() -> None:
    """Start PETSc (when installed, for the DOLFINx fine solvers) on ``MPI.COMM_SELF``: PETSc's
    start is collective over its world, and its default world, ``MPI.COMM_WORLD``, would make
    the first fallback solve, on one rank only, wait there forever; the fine solvers run on
    ``COMM_SELF``. A Python host that imported DOLFINx has started it already: nothing is done.
    """
    if "petsc4py.PETSc" in sys.modules or importlib.util.find_spec("petsc4py") is None:
        return
    import petsc4py

    petsc4py.init(comm=MPI.COMM_SELF)
    from petsc4py import PETSc  # noqa: F401  (the start)


class Session:
    """A Coupler driven through the C ABI.

    Parameters
    ----------
    config : the YAML file (relative paths in it start from its folder).
    comm : the host's communicator; the session works on a duplicate of it (collective).
    """

    def __init__(self, config: str | Path, comm: MPI.Comm) -> None:
        config = Path(config)
        self.comm = comm.Dup()
        try:
            start_petsc()
            with together(self.comm, f"reading the coupler config {config}"):
                cfg = load_yaml(config)
                check_keys(cfg, CAPI_KEYS, f"the coupler config {config}")
                if "microstructures" not in cfg:
                    raise InputError(f"the coupler config {config} has no microstructures: map "
                                     "the host's microstructure ids to structures, e.g. "
                                     "microstructures: {kind: random_fibres, volume_fraction: "
                                     "0.3}")
                self.structure = structure_table(cfg.pop("microstructures"))
            self.coupler: Coupler = coupler_from_config(cfg, self.comm, base=config.parent)
        except BaseException:
            self.comm.Free()
            raise

    def register(self, point_ids: np.ndarray, micro_ids: np.ndarray) -> None:
        """Attach structure ``micro_ids[k]`` to point ``point_ids[k]`` (collective)."""
        with together(self.comm, "ns_register's microstructures"):
            structures = [self.structure(int(i)) for i in micro_ids]
        self.coupler.register(point_ids, structures)

    def evaluate(self, point_ids: np.ndarray, F: np.ndarray) -> CouplerResult:
        """The Coupler's response of this rank's points at ``F`` (n, 2, 2) (collective)."""
        return self.coupler.evaluate(F, point_ids)

    def begin_step(self, step: int) -> None:
        """Start load step ``step``."""
        self.coupler.begin_step(step)

    def end_step(self, steps_left: int | None) -> StepReport:
        """End the load step (collective); its global report."""
        return self.coupler.end_step(steps_left)

    def checkpoint(self, folder: str | Path) -> None:
        """Write each rank's Coupler state (``coupler.rank<r>.npz``) and a manifest naming
        them into ``folder``, atomically (collective). The model is not written: restart a
        retrained run with its saved model as the config's ``model``."""
        folder = Path(folder)
        name = f"coupler.rank{self.comm.rank:04d}.npz"
        with together(self.comm, f"writing the coupler checkpoint {folder}"):
            state = self.coupler.checkpoint_state()
            atomic_write(folder / name, lambda tmp: _save_npz(tmp, state))
        names = self.comm.gather(name, root=0)
        with together(self.comm, f"writing the coupler checkpoint {folder}"):
            if self.comm.rank == 0:
                manifest = {"ranks": self.comm.size, "files": names,
                            "model_version": self.coupler.version}
                atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest)))

    def restore(self, folder: str | Path) -> None:
        """Restore the state :meth:`checkpoint` wrote into ``folder``, on any number of ranks
        (collective; after :meth:`register`)."""
        folder = Path(folder)
        with together(self.comm, f"reading the coupler checkpoint {folder}"):
            files = _manifest_files(folder)
            same = len(files) == self.comm.size
            states = [_load_npz(f) for f in ([files[self.comm.rank]] if same else files)]
        self.coupler.restore_state(states)

    def close(self) -> None:
        """Close the Coupler and free the duplicate communicator (collective)."""
        self.coupler.close()
        self.comm.Free()


def _manifest_files(folder: Path) -> Sequence[Path]:
    """The rank files named by the checkpoint manifest in ``folder``."""
    path = folder / MANIFEST
    try:
        names = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is no coupler checkpoint ({err!r}): give a folder "
                              "written by ns_checkpoint") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and Path(n).name == n
                                              for n in names):
        raise CheckpointError(f"{path}: files {names!r} must name files in {folder}")
    return [folder / n for n in names]


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append .npz to a path
        np.savez(fh, **arrays)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"{path} is unreadable ({err!r}): write the checkpoint "
                              "again") from None
