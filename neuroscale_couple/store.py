"""HDF5 data sets of micro solutions, written so that a killed run loses nothing it had finished.

Layout of an RVE data set (M microstructures × L loads, S = M·L samples, r = image resolution)::

    /micro/volume_fraction (M,)   /micro/n_fibres (M,)   /micro/seed (M,)   /micro/radius (M,)
    /micro/centres (M, N_max, 2)  NaN-padded fibre centres
    /micro/image   (M, r, r)      fibre fraction per pixel (row index = y)
    /samples/micro_index (S,)     /samples/F (S, 2, 2)    /samples/P (S, 2, 2)
    /samples/A (S, 2, 2, 2, 2)    /samples/newton_iterations (S,)   /samples/time_s (S,)
    /samples/done (S,)            1 once the sample's results are on disk
    /samples/fields/<name> (S, q, q, ...)   optional micro fields
    attrs: config (JSON), version, law, kind = "rve"

The file is opened in SWMR mode and flushed after every batch of results: a kill leaves the file
readable with every flagged sample intact; a restart copies it out atomically (clearing the
writer's flag) and solves only what is not flagged.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from neuroscale_couple import __version__
from neuroscale_couple.errors import InputError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write a file atomically: ``write(tmp)`` fills a temporary file that is then renamed.

    A reader (or a restart after a kill) sees either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RVEDataset:
    """Writer of an RVE data set (rank 0 only); see the module docstring for the layout."""

    def __init__(self, h5: h5py.File) -> None:
        self.h5 = h5

    @classmethod
    def create_or_resume(cls, path: str | Path, config: dict, micro: dict[str, np.ndarray],
                         F: np.ndarray, loads_per_micro: int,
                         fields: dict[str, tuple[int, ...]]) -> RVEDataset:
        """Open ``path`` to resume it if it holds the same config, else create it.

        Parameters
        ----------
        micro : per-microstructure arrays (``volume_fraction``, ``n_fibres``, ``seed``, ``radius``,
            ``centres``, ``image``).
        F : (S, 2, 2) loads of all samples, sample s = m·L + j.
        fields : name → per-sample shape of the micro fields to store (empty for none).
        """
        path = Path(path)
        cfg_json = json.dumps(config, sort_keys=True)
        if path.exists():
            try:
                h5 = h5py.File(path, "a", libver="latest")
            except OSError:  # a killed SWMR writer leaves its flag set: copy out what it saved
                _recover(path)
                h5 = h5py.File(path, "a", libver="latest")
            if h5.attrs.get("config") != cfg_json:
                h5.close()
                raise InputError(f"{path} holds a data set made from a different config: remove "
                                 "it or choose another --out to start a new one")
            h5.swmr_mode = True
            return cls(h5)
        path.parent.mkdir(parents=True, exist_ok=True)
        h5 = h5py.File(path, "w", libver="latest")
        h5.attrs.update(config=cfg_json, version=__version__, law=config.get("law", ""),
                        kind="rve")
        for name, arr in micro.items():
            h5.create_dataset(f"micro/{name}", data=arr)
        S = len(F)
        s = h5.create_group("samples")
        s.create_dataset("micro_index", data=np.arange(S) // loads_per_micro)
        s.create_dataset("F", data=F)
        s.create_dataset("P", shape=(S, 2, 2), dtype="f8", fillvalue=np.nan)
        s.create_dataset("A", shape=(S, 2, 2, 2, 2), dtype="f8", fillvalue=np.nan)
        s.create_dataset("newton_iterations", shape=(S,), dtype="i4")
        s.create_dataset("time_s", shape=(S,), dtype="f8")
        s.create_dataset("done", shape=(S,), dtype="u1")
        for name, shape in fields.items():
            s.create_dataset(f"fields/{name}", shape=(S, *shape), dtype="f4",
                             chunks=(1, *shape), compression="gzip")
        h5.flush()
        h5.swmr_mode = True
        return cls(h5)

    @property
    def done(self) -> np.ndarray:
        """(S,) bool: which samples are finished."""
        return self.h5["samples/done"][:].astype(bool)

    def write(self, index: np.ndarray, P: np.ndarray, A: np.ndarray, info: dict[str, np.ndarray],
              fields: dict[str, np.ndarray] | None = None) -> None:
        """Store the results of samples ``index`` (sorted), then flag them done and flush."""
        s = self.h5["samples"]
        for name, arr in (("P", P), ("A", A), ("newton_iterations", info["newton_iterations"]),
                          ("time_s", info["time_s"])):
            s[name][index] = arr
        for name, arr in (fields or {}).items():
            s[f"fields/{name}"][index] = arr
        self.h5.flush()
        s["done"][index] = 1
        self.h5.flush()

    def close(self) -> None:
        self.h5.close()


def _recover(path: Path) -> None:
    """Rewrite a file left open by a killed writer (readable in SWMR-read mode) atomically."""
    try:
        src = h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as err:
        raise InputError(f"{path} exists but is not a readable HDF5 file ({err}): remove it or "
                         "choose another --out") from None

    def copy(tmp: Path) -> None:
        with h5py.File(tmp, "w", libver="latest") as dst:
            dst.attrs.update(src.attrs)
            for name in src:
                src.copy(src[name], dst, name=name)

    with src:
        atomic_write(path, copy)


def load_rve_dataset(path: str | Path) -> dict[str, np.ndarray]:
    """Read a finished RVE data set into a dict of arrays (``micro/...`` and ``samples/...``).

    Raises :class:`InputError` if the file is missing, not an RVE data set, or unfinished.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"data set {path} does not exist: make one with `neuroscale generate`")
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r", libver="latest", swmr=True) as h5:
        if h5.attrs.get("kind") != "rve":
            raise InputError(f"{path} is not an RVE data set written by `neuroscale generate`")
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                      if isinstance(obj, h5py.Dataset) else None)
        out["config"] = json.loads(h5.attrs["config"])
    if not out["samples/done"].all():
        n = int((~out["samples/done"].astype(bool)).sum())
        raise InputError(f"{path} is unfinished ({n} samples missing): rerun `neuroscale generate` "
                         "with the same config and --out to complete it")
    return out
