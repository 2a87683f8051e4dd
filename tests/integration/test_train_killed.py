"""`neuroscale train` killed (SIGKILL) after an epoch and run again ends with the model and the
history of an uninterrupted run, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRYSTAL = ROOT / "examples" / "models" / "hmm_cu.anchor.h5"
EPOCHS = 24

pytestmark = [pytest.mark.slow, pytest.mark.skip_in_parallel]


def command(tmp_path: Path, name: str, *options: str) -> list[str]:
    """`neuroscale [options] train` writing ``name``.pt (and keeping ``name``.train)."""
    return [sys.executable, "-m", "neuroscale_couple.cli", *options, "train",
            str(tmp_path / "t.yaml"),
            "--data", str(CRYSTAL), "--out", str(tmp_path / f"{name}.pt"), "--quiet",
            "--keep-work"]


def saved_epoch(path: Path) -> int:
    """The last epoch in the checkpoint at ``path`` (0 where there is none yet)."""
    if not path.is_file():
        return 0
    return torch.load(path, weights_only=True)["state"]["epoch"]


def test_a_killed_training_resumes_to_the_uninterrupted_model(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "model": {"latent": 4, "hidden": 8, "members": 2},
        "training": {"epochs": EPOCHS, "batch_size": 32, "val_fraction": 0.3, "patience": EPOCHS,
                     "weights": {"stress": 1.0, "tangent": 0.2, "nll": 0.1}}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.Popen(command(tmp_path, "whole"), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL)
    killed = subprocess.Popen(command(tmp_path, "killed"), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL)
    ckpt = tmp_path / "killed.train" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while saved_epoch(ckpt) < 3 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    at_kill = saved_epoch(ckpt)
    assert 3 <= at_kill < EPOCHS and not (tmp_path / "killed.pt").exists()
    assert whole.wait(timeout=300) == 0
    resumed = subprocess.run(command(tmp_path, "killed", "-v"), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert (f"resuming at epoch {at_kill + 1} of {EPOCHS} from {tmp_path / 'killed.train'}"
            in resumed.stderr)
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("whole", "killed"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["calibration"] == b["calibration"]
    h_a, h_b = (torch.load(tmp_path / f"{n}.train" / "checkpoint.pt", weights_only=True)[
        "state"]["history"] for n in ("whole", "killed"))
    assert len(h_a["train"]) == EPOCHS
    assert all(h_a[k] == h_b[k] for k in ("train", "val", "best_epoch"))
