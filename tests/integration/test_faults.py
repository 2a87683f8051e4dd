"""Fault injection: an exception (or a NaN Jacobian) on one rank or on all, in the residual, the
Jacobian, a fine solve or the online retraining, on 1 and 2 ranks, ends on every rank — with a
cut-back when the fault passes, with a clear error naming the failing rank's message when it
does not, with the old model kept when a retraining fails — and never hangs (each run is a
subprocess with a timeout).

One subprocess runs all the cases of a rank set one after the other (their start-up, MPI,
DOLFINx and torch, dominates a case); each rank writes one line per case, and the process ends
with status 3 since the persistent faults stop their runs (see scripts/fault_injection.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dolfinx, pytest.mark.skip_in_parallel, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "scripts" / "fault_injection.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
NEWTON_STAGES = ["residual", "jacobian", "jacobian-nan", "fine"]
RETRAINING_STAGES = ["retraining", "retraining-bg"]
RANKS = [(1, "0"), (2, "0"), (2, "all")]


def run(n_ranks: int, *cases: str, timeout: float = 300, **env: str
        ) -> subprocess.CompletedProcess:
    return subprocess.run([str(MPIEXEC), "-n", str(n_ranks), sys.executable, str(SCRIPT),
                           *cases], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def matrix():
    """``matrix(n_ranks, ranks)``: the output of the run of all cases with faults on ``ranks``
    of ``n_ranks`` (run once, at first use)."""
    runs: dict = {}

    def get(n_ranks: int, ranks: str) -> str:
        if (n_ranks, ranks) not in runs:
            proc = run(n_ranks, *(f"{stage}:{ranks}:{times}"
                                  for stage in NEWTON_STAGES + RETRAINING_STAGES
                                  for times in ("once", "always")))
            runs[n_ranks, ranks] = (proc.returncode, proc.stdout + proc.stderr)
        code, out = runs[n_ranks, ranks]
        assert code == 3, out  # the persistent faults stopped their runs, nothing else broke
        return out

    return get


def each_case(test):
    """Run ``test`` for each Newton stage of a fault and each rank layout of the matrix."""
    return pytest.mark.parametrize("stage", NEWTON_STAGES)(
        pytest.mark.parametrize("n_ranks, ranks", RANKS)(test))


def lines(out: str, case: str, outcome: str) -> dict[int, str]:
    """Each rank's line of ``case`` with ``outcome``, by rank (mpiexec may join the lines of
    two ranks)."""
    found = re.findall(rf"rank (\d+) {re.escape(case)} {outcome}(.*?)(?=rank \d+ \S+:\S+:|\n|$)",
                       out)
    return {int(rank): rest for rank, rest in found}


@each_case
def test_a_passing_fault_cuts_the_step_back_on_every_rank(matrix, stage, n_ranks, ranks):
    out = matrix(n_ranks, ranks)
    got = lines(out, f"{stage}:{ranks}:once", "recovered after 1 cut-backs")
    assert sorted(got) == list(range(n_ranks)), out


@each_case
def test_a_persistent_fault_stops_every_rank_with_its_message(matrix, stage, n_ranks, ranks):
    out = matrix(n_ranks, ranks)
    got = lines(out, f"{stage}:{ranks}:always", "stopped: load step 0")
    assert sorted(got) == list(range(n_ranks)), out
    fault = ("the Jacobian has non-finite entries on rank 0" if stage == "jacobian-nan"
             else "injected fault on rank 0")
    assert all(fault in message or ranks == "all" for message in got.values()), got
    if ranks == "0" and n_ranks == 2:  # the rank that did not fail names the one that did
        assert "failed on rank 0: " in got[1], got[1]


@pytest.mark.parametrize("stage", RETRAINING_STAGES)
@pytest.mark.parametrize("n_ranks, ranks", RANKS)
@pytest.mark.parametrize("times", ["once", "always"])
def test_a_failed_retraining_keeps_the_model_and_the_run_goes_on(matrix, stage, n_ranks,
                                                                  ranks, times):
    """Foreground: retrainings after steps 0 and 1 of 3; background: started after steps 0 and
    1 of 4, swapped in a step later. A failure is flagged in its step's report on every rank,
    the model is kept; the next due retraining succeeds once the fault has passed."""
    out = matrix(n_ranks, ranks)
    got = lines(out, f"{stage}:{ranks}:{times}", "retraining failed at steps ")
    assert sorted(got) == list(range(n_ranks)), out
    first = 1 if stage.endswith("-bg") else 0
    steps, version = ([first], 1) if times == "once" else ([first, first + 1], 0)
    for message in got.values():
        assert message.startswith(f"{steps}, model version {version}: "), message
        assert "injected fault on rank" in message and "failed on rank 0" in message, message


def test_a_fault_inside_a_collective_call_aborts_every_rank_with_its_message():
    """Rank 0's Jacobian raises before its assembly, whose ghost exchange rank 1 waits in:
    rank 0 gives up waiting for the agreement and aborts the run."""
    proc = run(2, "collective:0:once", timeout=120, NEUROSCALE_FAULT_TIMEOUT_S="3")
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 3), out
    assert "rank 0: the Jacobian evaluation failed: RuntimeError: injected fault on rank 0" in out
    assert "aborting all ranks" in out
