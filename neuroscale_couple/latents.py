"""Latents of structures, encoded once per content over all ranks and runs.

Encoding a cell (render its image, run the encoder) is the one-off cost of a point; a macro
problem with many points often holds far fewer distinct structures, and a rerun of the same
problem holds the same ones. :class:`LatentStore` keys each latent on the structure's content
digest (``Structure.key``) and on the encoder's weights
(:meth:`~neuroscale_couple.operators.base.CoarseGrainingOperator.encoder_digest`, unchanged by
online retraining), so that

- a structure held by several points, on one rank or several, is encoded once: the distinct
  missing keys of all ranks are dealt round-robin, each rank encodes its share, and each latent
  goes to the ranks that asked for it (collective; the same latents whatever the rank count);
- with a ``directory`` (the Coupler puts it beside its replay store) every encoded latent is
  written to ``latents-<encoder digest>-<rank>-<n>.npz`` (atomically) and a later run, on any
  number of ranks, reads them back and encodes nothing it has seen.

Latents are held in one float32 table (a row per structure, 256 B at latent size 64; the
encoder runs in float32, so nothing is rounded), not as one array object per structure.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch

from neuroscale_couple.store import atomic_write

log = logging.getLogger(__name__)


class LatentStore:
    """Latents by structure key for one encoder (see the module docstring).

    ``model``: the operator whose encoder makes them; ``comm``: the ranks that share them;
    ``directory``: where they persist (None: in memory for this run only)."""

    def __init__(self, model, comm: MPI.Comm, directory: str | Path | None = None) -> None:
        self.model, self.comm = model, comm
        self.digest = model.encoder_digest()
        self.directory = None if directory is None else Path(directory)
        self._row: dict[Hashable, int] = {}  # structure key → row of the table
        self._table = np.zeros((64, model.config.latent), dtype=np.float32)
        self._files = 0
        self.encoded = 0  # structures this rank encoded itself
        if self.directory is not None:
            self._read()

    def __len__(self) -> int:
        """The number of distinct structures whose latents the store holds."""
        return len(self._row)

    def _pattern(self) -> str:
        return f"latents-{self.digest[:16]}-*.npz"

    def _read(self) -> None:
        for path in sorted(self.directory.glob(self._pattern())):
            with np.load(path, allow_pickle=False) as f:
                self._add(f["keys"].tolist(), f["z"])

    def _add(self, keys: list, z: np.ndarray) -> None:
        """Rows ``z`` (k, latent) for ``keys`` not held yet (the table grows by doubling)."""
        fresh = [(k, row) for k, row in zip(keys, z, strict=True) if k not in self._row]
        need = len(self._row) + len(fresh)
        if need > len(self._table):
            table = np.zeros((max(need, 2 * len(self._table)), self._table.shape[1]),
                             dtype=np.float32)
            table[:len(self._row)] = self._table[:len(self._row)]
            self._table = table
        for k, row in fresh:
            self._table[len(self._row)] = row
            self._row[k] = len(self._row)

    def latents(self, structures: Sequence) -> torch.Tensor:
        """Latents (n, latent) of this rank's ``structures``, in the model's dtype, encoding
        only what no rank holds yet (collective)."""
        keys = [str(s.key) for s in structures]
        first = {}
        for key, s in zip(keys, structures, strict=True):
            first.setdefault(key, s)
        missing = sorted(k for k in first if k not in self._row)
        wanted = self.comm.allgather(missing)
        owner = {}  # the first rank that asked for a key hands over its structure
        for rank, part in enumerate(wanted):
            for key in part:
                owner.setdefault(key, rank)
        todo = sorted(owner)
        mine = todo[self.comm.rank::self.comm.size]
        # the structures to encode travel from the rank that holds them to the one dealt them
        send: list[list] = [[] for _ in range(self.comm.size)]
        for i, key in enumerate(todo):
            if owner[key] == self.comm.rank:
                send[i % self.comm.size].append((key, first[key]))
        received = dict(pair for part in self.comm.alltoall(send) for pair in part)
        new = {}
        if mine:
            z = self.model.latents([received[k] for k in mine])
            new = dict(zip(mine, z.detach().cpu().float().numpy(), strict=True))
            self.encoded += len(mine)
            self._write(new)
        # each encoded latent goes to every rank that wants it
        out: list[list] = [[] for _ in range(self.comm.size)]
        for rank, part in enumerate(wanted):
            out[rank] = [(k, new[k]) for k in part if k in new]
        for part in self.comm.alltoall(out):
            self._add([k for k, _ in part], np.array([z for _, z in part]))
        p = next(self.model.parameters())
        rows = np.array([self._row[k] for k in keys], dtype=np.int64)
        return torch.as_tensor(self._table[rows], dtype=p.dtype, device=p.device)

    def _write(self, latents: dict[str, np.ndarray]) -> None:
        if self.directory is None or not latents:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / (f"latents-{self.digest[:16]}-{self.comm.rank}-"
                                 f"{self._files}.npz")
        while path.exists():  # a later run on the same folder: never overwrite
            self._files += 1
            path = path.with_name(f"latents-{self.digest[:16]}-{self.comm.rank}-"
                                  f"{self._files}.npz")
        keys = np.array(list(latents), dtype=str)
        z = np.stack(list(latents.values()))

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
                np.savez(f, keys=keys, z=z)

        atomic_write(path, write)
        self._files += 1
