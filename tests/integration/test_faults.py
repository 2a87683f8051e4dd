"""Fault injection: an exception on one rank or all, in the residual or a fine solve, on 1 and
2 ranks, ends on every rank — with a cut-back when it passes, with a clear error when it does
not — and never hangs (each run is a subprocess with a timeout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dolfinx, pytest.mark.skip_in_parallel, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "scripts" / "fault_injection.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def run(n_ranks: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MPIEXEC), "-n", str(n_ranks), sys.executable, str(SCRIPT), *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("stage", ["operator", "fine"])
@pytest.mark.parametrize("n_ranks, ranks", [(1, "0"), (2, "0"), (2, "all")])
def test_a_passing_fault_cuts_the_step_back_on_every_rank(stage, n_ranks, ranks):
    proc = run(n_ranks, stage, ranks, "once")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("recovered after 1 cut-backs") == n_ranks, proc.stdout


@pytest.mark.parametrize("stage", ["operator", "fine"])
@pytest.mark.parametrize("n_ranks, ranks", [(1, "0"), (2, "0"), (2, "all")])
def test_a_persistent_fault_stops_every_rank_with_its_message(stage, n_ranks, ranks):
    proc = run(n_ranks, stage, ranks, "always")
    assert proc.returncode != 0
    assert proc.stdout.count("stopped: load step 0") == n_ranks, proc.stdout + proc.stderr
    assert "injected fault on rank" in proc.stdout
