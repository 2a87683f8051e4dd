"""The latent store: a structure is encoded once over the ranks and runs, and what it hands out
equals a fresh encoding."""

from __future__ import annotations

from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch

from neuroscale_couple.latents import LatentStore
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.solvers.microstructure import random_fibres

MODEL = Path(__file__).resolve().parents[2] / "examples" / "models" / "fe2_composite.pt"


def cells(rank: int) -> list:
    """Six points per rank over five distinct cells, three of them on every rank."""
    shared = [random_fibres(0.3, 3, seed=s) for s in range(3)]
    own = [random_fibres(0.25, 2, seed=100 + rank), random_fibres(0.4, 5, seed=200 + rank)]
    return [shared[0], *own, shared[1], shared[0], shared[2]]


@pytest.mark.mpi
def test_latents_are_encoded_once_and_equal_a_fresh_encoding(mpi_tmp_path):
    comm = MPI.COMM_WORLD
    model = load_operator(MODEL).double()
    folder = mpi_tmp_path
    mine = cells(comm.rank)
    store = LatentStore(model, comm, folder)
    z = store.latents(mine)
    distinct = 3 + 2 * comm.size
    assert comm.allreduce(store.encoded) == distinct  # shared cells encoded by one rank only
    fresh = model.latents(mine)
    assert z.dtype == torch.float64
    np.testing.assert_allclose(z.numpy(), fresh.numpy(), rtol=0, atol=1e-6)
    # a rerun on the same folder, even on another rank count, encodes nothing it has seen
    comm.Barrier()
    again = LatentStore(model, MPI.COMM_SELF, folder)
    assert torch.equal(again.latents(mine), z) and again.encoded == 0
    # another encoder (online retraining leaves the encoder alone; a new model does not)
    other = load_operator(MODEL).double()
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if n.startswith("lift")).add_(0.1)
    assert other.encoder_digest() != model.encoder_digest()
    # (each rank on a folder of its own: another rank's store must not have written it first)
    fresh_store = LatentStore(other, MPI.COMM_SELF, folder / f"rank{comm.rank}")
    fresh_store.latents(mine[:1])
    assert fresh_store.encoded == 1


@pytest.mark.skip_in_parallel
def test_retraining_leaves_the_encoder_digest_alone():
    model = load_operator(MODEL)
    digest = model.encoder_digest()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("energy.")).add_(1.0)
    assert model.encoder_digest() == digest
