"""Checkpoints of LoadStepper: what a restart trusts is checked — settings, digests, paths."""

from __future__ import annotations

import json

from mpi4py import MPI

import numpy as np
import pytest
from coupled_helpers import displacement_by_coordinates, macro_problem
from test_plugin import fibres, operator_coupler

from neuroscale_couple.errors import CheckpointError

pytestmark = [pytest.mark.dolfinx, pytest.mark.skip_in_parallel, pytest.mark.slow]


def run(tmp_path, loads, restart=False, **kwargs):
    c = operator_coupler(MPI.COMM_SELF)
    stepper, set_load = macro_problem(MPI.COMM_SELF, c, fibres, stretch=0.1)
    try:
        history = stepper.run(loads, set_load, checkpoint_dir=tmp_path, restart=restart,
                              **kwargs)
    finally:
        c.close()
    return history, displacement_by_coordinates(stepper)[1]


class Killed(Exception):
    pass


def kill_at(step):
    def on_step(record):
        if record["step"] == step:  # before its checkpoint is written
            raise Killed

    return on_step


def test_a_restart_ends_where_the_whole_run_ends_and_refuses_other_settings(tmp_path):
    loads = [0.5, 1.0]
    _, u_whole = run(tmp_path / "whole", loads, params={"tol": 0.05})
    with pytest.raises(Killed):
        run(tmp_path / "cut", loads, params={"tol": 0.05}, on_step=kill_at(1))
    with pytest.raises(CheckpointError, match=r"loads: checkpoint \[0.5, 1.0\], now \[0.5, 0.9\]"):
        run(tmp_path / "cut", [0.5, 0.9], restart=True, params={"tol": 0.05})
    with pytest.raises(CheckpointError, match="tol: checkpoint 0.05, now 0.02"):
        run(tmp_path / "cut", loads, restart=True, params={"tol": 0.02})
    history, u = run(tmp_path / "cut", loads, restart=True, params={"tol": 0.05})
    assert [h["load"] for h in history] == loads
    np.testing.assert_allclose(u, u_whole, rtol=0, atol=1e-12 * np.abs(u_whole).max())


@pytest.mark.parametrize("damage", ["truncated state", "flipped displacement", "path outside",
                                    "missing key"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    run(tmp_path, [0.5, 1.0])
    state_file = tmp_path / "state.json"
    state = json.loads(state_file.read_text())
    if damage == "truncated state":
        state_file.write_text(state_file.read_text()[:40])
        match = "state.json is not a NeuroScale checkpoint state"
    elif damage == "flipped displacement":
        u_file = tmp_path / state["u_file"]
        raw = bytearray(u_file.read_bytes())
        raw[-100] ^= 0xFF
        u_file.write_bytes(bytes(raw))
        match = "differs from the file the checkpoint wrote"
    elif damage == "path outside":
        state["u_file"] = "../elsewhere.npz"
        state_file.write_text(json.dumps(state))
        match = "points outside the checkpoint folder"
    else:
        del state["history"]
        state_file.write_text(json.dumps(state))
        match = "no history"
    with pytest.raises(CheckpointError, match=match):
        run(tmp_path, [0.5, 1.0], restart=True)
