"""HDF5 data sets of micro solutions, written so that a killed run loses nothing it had finished.

Layout of a data set (M structures × L loads, S = M·L samples)::

    /micro/kind (M,)              each structure's kind (bytes), naming the family that reads
                                  the arrays back (neuroscale_couple.structures.data_family)
    /micro/<name> (M, ...)        the structures' arrays, as their family's ``arrays`` makes
                                  them: e.g. a fibre cell's volume_fraction, n_fibres, seed,
                                  radius, centres (M, N_max, 2) NaN-padded and image (M, r, r)
                                  (fibre fraction per pixel, row index = y); a crystal's
                                  descriptor (M, k), temperature, config (JSON)
    /samples/micro_index (S,)     /samples/F (S, d, d)    /samples/P (S, d, d)
    /samples/A (S, d, d, d, d)    /samples/newton_iterations (S,)   /samples/time_s (S,)
                                  (d = 2: plane strain; d = 3: 3D cells; the fine solver's
                                  ``iterations``: a crystal's relaxations)
    /samples/stress_stderr (S, d, d)   standard error of time-averaged P (finite temperature)
    /samples/done (S,)            1 once the sample's results are on disk, 2 if its fine solve
                                  failed (:data:`FAILED`: kept out of the data as read)
    /samples/fields/<name> (S, q, q, ...)   optional micro fields
    attrs: config (JSON), version, law, kind = "rve"

The file is opened in SWMR mode and flushed after every batch of results: a kill leaves the file
readable with every flagged sample intact; a restart copies it out atomically (clearing the
writer's flag) and solves only what is not flagged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from neuroscale_couple import __version__
from neuroscale_couple.errors import CheckpointError, InputError
from neuroscale_couple.structures import Structure, stored_arrays

log = logging.getLogger(__name__)


FAILED = 2
"""``/samples/done`` of a sample whose fine solve failed (`neuroscale generate` goes on)."""


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


def file_identity(path: str | Path) -> dict:
    """Resolved path, size (bytes) and modification time (ns) of a file: what a resumable run
    compares to tell whether an input file is still the one it started on."""
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def rng_states() -> dict:
    """The states of every random number generator a run may draw from: torch (CPU, and CUDA
    where it is in use), NumPy's global one and Python's ``random``, in a form that
    ``torch.load(weights_only=True)`` reads back."""
    import torch

    # the legacy global generator is the one to record: code that calls np.random.* draws it
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    states = {"torch": torch.get_rng_state(),
              "numpy": {"kind": kind, "keys": torch.as_tensor(keys.astype(np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore the generators recorded by :func:`rng_states`."""
    import torch

    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    legacy = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    np.random.set_state(legacy)  # noqa: NPY002
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class WorkCheckpoint:
    """The per-epoch checkpoint of a resumable run (``neuroscale train``, ``neuroscale
    distill``) in its work folder ``work``.

    ``key`` (a JSON-ready dict: settings and the identity of the inputs) is stored with the
    state as a SHA-256 digest; a rerun reads the state back only under the same key.
    """

    def __init__(self, work: str | Path, key: dict, name: str = "checkpoint.pt") -> None:
        self.work, self.key = Path(work), key
        self.path = self.work / name
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()
                                     ).hexdigest()

    def load(self, map_location: object = None) -> dict | None:
        """The saved state, None where the folder holds none; raises :class:`CheckpointError`
        (naming what differs, the folder and the fix) where it holds another run's."""
        if not self.path.is_file():
            return None
        import torch

        fix = (f"rerun with --fresh to start over (the checkpoint is discarded), or delete "
               f"{self.work}, or give another --work")
        try:
            saved = torch.load(self.path, map_location=map_location, weights_only=True)
        except Exception as err:
            raise CheckpointError(f"the work folder {self.work} holds an unreadable checkpoint "
                                  f"({type(err).__name__}): {fix}") from err
        if not isinstance(saved, dict) or saved.get("digest") != self.digest:
            old = (saved.get("key") or {}) if isinstance(saved, dict) else {}
            differ = sorted(k for k in old.keys() | self.key.keys()
                            if old.get(k) != self.key.get(k))
            raise CheckpointError(f"the work folder {self.work} holds the checkpoint of another "
                                  f"run (other {', '.join(differ) or 'settings'}): {fix}")
        return saved["state"]

    def save(self, state: dict) -> None:
        """Write ``state`` (tensors, numbers, lists, dicts) atomically with the key."""
        import torch

        payload = {"key": self.key, "digest": self.digest, "state": state}
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))

    def remove(self) -> None:
        """Delete the checkpoint (and temporary files of a write cut short), then the work
        folder if nothing else is in it: a folder given by the user may hold other files."""
        for path in (self.path, *self.work.glob(f".{self.path.name}.*.tmp")):
            path.unlink(missing_ok=True)
        if self.work.is_dir() and not any(self.work.iterdir()):
            self.work.rmdir()


class RVEDataset:
    """Writer of an RVE data set (rank 0 only); see the module docstring for the layout."""

    def __init__(self, h5: h5py.File) -> None:
        self.h5 = h5

    @classmethod
    def create_or_resume(cls, path: str | Path, config: dict, micro: dict[str, np.ndarray],
                         F: np.ndarray, loads_per_micro: int,
                         fields: dict[str, tuple[int, ...]], stderr: bool = False
                         ) -> RVEDataset:
        """Open ``path`` to resume it if it holds the same config, else create it. A finished
        data set is opened read-only, so that a rerun leaves the file (and its modification
        time, which resumable trainings on it compare) as it was.

        Parameters
        ----------
        micro : per-structure arrays
            (:func:`~neuroscale_couple.structures.stored_arrays`).
        F : (S, d, d) loads of all samples, sample s = m·L + j.
        fields : name → per-sample shape of the micro fields to store (empty for none).
        stderr : store ``stress_stderr`` (S, d, d), the statistical error of time-averaged
            stresses (finite-temperature crystals).
        """
        path = Path(path)
        cfg_json = json.dumps(config, sort_keys=True)
        if path.exists():
            finished = _finished(path, cfg_json)
            if finished is not None:
                return cls(finished)
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
        S, d = len(F), F.shape[1]
        s = h5.create_group("samples")
        s.create_dataset("micro_index", data=np.arange(S) // loads_per_micro)
        s.create_dataset("F", data=F)
        s.create_dataset("P", shape=(S, d, d), dtype="f8", fillvalue=np.nan)
        s.create_dataset("A", shape=(S, d, d, d, d), dtype="f8", fillvalue=np.nan)
        s.create_dataset("newton_iterations", shape=(S,), dtype="i4")
        s.create_dataset("time_s", shape=(S,), dtype="f8")
        s.create_dataset("done", shape=(S,), dtype="u1")
        if stderr:
            s.create_dataset("stress_stderr", shape=(S, d, d), dtype="f8", fillvalue=np.nan)
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

    def fail(self, index: np.ndarray) -> None:
        """Flag samples ``index`` as failed (:data:`FAILED`): finished, but without results."""
        self.h5["samples"]["done"][np.sort(index)] = FAILED
        self.h5.flush()

    def write(self, index: np.ndarray, P: np.ndarray, A: np.ndarray, info: dict[str, np.ndarray],
              fields: dict[str, np.ndarray] | None = None) -> None:
        """Store the results of samples ``index`` (sorted), then flag them done and flush."""
        s = self.h5["samples"]
        if "stress_stderr" in s:
            s["stress_stderr"][index] = info["stress_stderr"]
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


def _finished(path: Path, cfg_json: str) -> h5py.File | None:
    """``path`` opened read-only where it is a finished data set of config ``cfg_json`` (every
    sample flagged), else None (unreadable, another config or unfinished: the caller decides)."""
    try:
        h5 = h5py.File(path, "r", libver="latest", swmr=True)
    except OSError:
        return None
    if h5.attrs.get("config") == cfg_json and h5["samples/done"][:].all():
        return h5
    h5.close()
    return None


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
    done = out["samples/done"]
    if not done.all():
        n = int((~done.astype(bool)).sum())
        raise InputError(f"{path} is unfinished ({n} samples missing): rerun `neuroscale generate` "
                         "with the same config and --out to complete it")
    failed = done == FAILED
    if failed.any():  # the samples whose fine solve failed are not data
        log.warning("%s: %d of %d samples failed in the fine solver and are left out", path,
                    int(failed.sum()), len(done))
        for key, arr in list(out.items()):
            if key.startswith("samples/") and len(arr) == len(done):
                out[key] = arr[~failed]
    if "micro/kind" not in out and "loads" in out["config"]:  # a generate config's data set
        out["micro/kind"] = _drawn_kinds(out, path)  # written before the kinds were stored
    return out


def _drawn_kinds(d: dict, path: Path) -> np.ndarray:
    """Each structure's kind (M,), bytes as stored, of a data set ``d`` that does not store them:
    as its generate config draws its structures. Raises :class:`InputError` for a subset of a
    data set of several kinds (which of them it kept is not recorded)."""
    from neuroscale_couple.datagen import plan

    n = max((len(v) for k, v in d.items() if k.startswith("micro/")), default=0)
    config = {k: v for k, v in d["config"].items() if k != "subset"}
    kinds = [s.kind for s in plan(config)[0]]
    if len(set(kinds)) == 1 or ("subset" not in d["config"] and len(kinds) == n):
        return np.array(kinds[:1] * n if len(set(kinds)) == 1 else kinds, dtype=bytes)
    raise InputError(f"{path} does not record its structures' kinds (micro/kind; it was written "
                     f"before they were stored) and its config draws {len(kinds)} structures of "
                     f"kinds {sorted(set(kinds))} for its {n}: make it again with `neuroscale "
                     "generate` (or `neuroscale subset` of a data set that records them)")


def write_dataset(path: str | Path, config: dict, micro: dict[str, np.ndarray],
                  samples: dict[str, np.ndarray]) -> None:
    """Write a finished RVE data set (layout above) in one atomic step.

    ``samples`` holds at least ``micro_index``, ``F``, ``P``, ``A``; further per-sample arrays
    (e.g. ``point_id``, ``step``) are stored alongside. Used for data-set subsets and for the
    Coupler's replay segments, which `neuroscale train` and ``TrainingData.from_h5`` read as-is.
    """
    missing = {"micro_index", "F", "P", "A"} - set(samples)
    if missing:
        raise InputError(f"write_dataset: samples lack {sorted(missing)}")
    n = len(samples["F"])

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w", libver="latest") as h5:
            h5.attrs.update(config=json.dumps(config, sort_keys=True), version=__version__,
                            law=config.get("law", ""), kind="rve")
            for name, arr in micro.items():
                h5.create_dataset(f"micro/{name}", data=arr)
            for name, arr in samples.items():
                h5.create_dataset(f"samples/{name}", data=arr)
            if "done" not in samples:
                h5.create_dataset("samples/done", data=np.ones(n, dtype="u1"))

    atomic_write(path, write)


def subset_dataset(src: str | Path, dst: str | Path, n_micro: int | None = None, seed: int = 0,
                   *, n_samples: int | None = None) -> int:
    """Copy a random part of the data set ``src`` into ``dst`` (no micro fields); returns the
    number of samples written.

    Give one of ``n_micro`` (that many microstructures, all their samples) or ``n_samples``
    (that many samples, i.e. fine solves, and the microstructures they use). Subsets by samples
    are nested: for one ``seed``, the samples of a smaller ``n_samples`` are among those of a
    larger one (a seeded permutation's first ``n_samples``), so runs on growing subsets are
    comparable (e.g. a learning curve).
    """
    if (n_micro is None) == (n_samples is None):
        raise InputError("subset_dataset: give one of n_micro and n_samples")
    d = load_rve_dataset(src)
    index = d["samples/micro_index"]
    m_total = int(index.max()) + 1
    rng = np.random.default_rng(seed)
    if n_samples is not None:
        if not 0 < n_samples <= len(index):
            raise InputError(f"n_samples={n_samples}: {src} has {len(index)} samples")
        mask = np.zeros(len(index), dtype=bool)
        mask[rng.permutation(len(index))[:n_samples]] = True
        keep = np.unique(index[mask])
    else:
        if not 0 < n_micro <= m_total:
            raise InputError(f"n_micro={n_micro}: {src} has {m_total} microstructures")
        keep = np.sort(rng.choice(m_total, n_micro, replace=False))
    new_index = np.full(m_total, -1)
    new_index[keep] = np.arange(len(keep))
    if n_samples is None:
        mask = new_index[index] >= 0
    micro = {k.split("/", 1)[1]: v[keep] for k, v in d.items() if k.startswith("micro/")}
    samples = {k.split("/", 1)[1]: v[mask] for k, v in d.items()
               if k.startswith("samples/") and not k.startswith("samples/fields/")}
    samples["micro_index"] = new_index[index[mask]]
    chosen = {"n_micro": n_micro} if n_samples is None else {"n_samples": n_samples}
    config = dict(d["config"], subset={"source": str(src), **chosen, "seed": seed},
                  fields_resolution=0)
    write_dataset(dst, config, micro, samples)
    return int(mask.sum())


class ReplayStore:
    """Every fine solve of a coupled run, kept for retraining now and warm-starting later runs.

    A directory of segments ``step{k:04d}.rank{r:03d}.h5``, one per load step and rank, each a
    finished RVE data set (see :func:`write_dataset`) with the extra per-sample arrays
    ``point_id``, ``step``, ``evaluation`` and ``model_version`` (and ``stress_stderr`` where the
    fine solver measured its noise, NaN for solves without). A segment is written atomically
    when its step ends (and before an abort), so a kill loses at most the solves of the step in
    progress, which a restart from the step's checkpoint repeats anyway. ``image_resolution``:
    pixels per side of the structures' stored images (the model's ``data_resolution``; None for
    families without images).
    """

    def __init__(self, directory: str | Path, rank: int, config: dict,
                 image_resolution: int | None) -> None:
        self.directory, self.rank, self.config = Path(directory), rank, config
        self.image_resolution = image_resolution
        self._rows: list[tuple] = []

    def append(self, micro: Structure, point_id: int, F: np.ndarray, P: np.ndarray,
               A: np.ndarray, *, step: int, evaluation: int, model_version: int, time_s: float,
               stderr: np.ndarray | None = None) -> None:
        """Buffer one fine solve (``micro`` is the structure it was solved on, of any family;
        ``stderr`` the standard error of P where the solver measured one)."""
        self._rows.append((micro, point_id, F, P, A, step, evaluation, model_version, time_s,
                           np.full(np.shape(P), np.nan) if stderr is None else stderr))

    def flush(self, step: int) -> Path | None:
        """Write the buffered solves as the segment of ``step``; None if there were none."""
        if not self._rows:
            return None
        keys = list(dict.fromkeys(r[0].key for r in self._rows))
        first = {r[0].key: r[0] for r in reversed(self._rows)}
        structures = [first[k] for k in keys]
        micro = stored_arrays(structures, self.image_resolution)
        index = {k: i for i, k in enumerate(keys)}
        cols = list(zip(*self._rows, strict=True))
        samples = {"micro_index": np.array([index[m.key] for m in cols[0]]),
                   "point_id": np.array(cols[1], dtype=np.int64),
                   "F": np.stack(cols[2]), "P": np.stack(cols[3]), "A": np.stack(cols[4]),
                   "step": np.array(cols[5]), "evaluation": np.array(cols[6]),
                   "model_version": np.array(cols[7]), "time_s": np.array(cols[8])}
        if not np.isnan(np.stack(cols[9])).all():
            samples["stress_stderr"] = np.stack(cols[9])
        path = self.directory / f"step{step:04d}.rank{self.rank:03d}.h5"
        write_dataset(path, dict(self.config, image_resolution=self.image_resolution), micro,
                      samples)
        self._rows.clear()
        return path

    def discard_after(self, step: int) -> None:
        """Remove all ranks' segments of steps after ``step`` (restart from that step; call on
        one rank)."""
        for path in self.segments(self.directory):
            if _segment_step(path) > step:
                path.unlink()
        self._rows.clear()

    @staticmethod
    def segments(directory: str | Path, up_to_step: int | None = None) -> list[Path]:
        """Segment files of a replay directory, by step then rank."""
        paths = sorted(Path(directory).glob("step*.rank*.h5"))
        return [p for p in paths if up_to_step is None or _segment_step(p) <= up_to_step]

    @staticmethod
    def segment_step(path: Path) -> int:
        """The load step of a segment file."""
        return _segment_step(path)


def _segment_step(path: Path) -> int:
    return int(path.name[4:8])
