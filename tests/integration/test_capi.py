"""The C ABI (include/neuroscale.h, libneuroscale.so) and its Fortran module: the C demo and the
Fortran UMAT demo on 1 and 2 ranks give the Python API's answers on the same points; bad input
returns codes and messages, the host runs on.

The library and the host programs are built into build/capi by the tests when missing or older
than their sources (``make capi`` builds the library alone).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest

pytestmark = [pytest.mark.dolfinx, pytest.mark.capi, pytest.mark.skip_in_parallel]

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "capi"
CONFIG = ROOT / "examples" / "c" / "coupler.yaml"
MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.fixture(scope="module")
def library() -> Path:
    from neuroscale_couple.capi.build import ensure_library

    return ensure_library(BUILD)


def host(library: Path, name: str, *sources: Path) -> Path:
    """The host program ``name`` compiled from ``sources`` against ``library``."""
    from neuroscale_couple.capi.build import compile_host

    try:
        return compile_host(list(sources), BUILD / "bin" / name, library)
    except subprocess.CalledProcessError as err:
        raise AssertionError(f"compiling {name} failed:\n{err.stderr}") from None


def run(exe: str | Path, *args: object, ranks: int = 1, timeout: float = 600) -> str:
    """Run ``exe`` on ``ranks`` MPI ranks with the repository's package importable; its
    output (the test fails, showing it, on a non-zero exit)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(MPIEXEC), "-n", str(ranks), str(exe), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{Path(exe).name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def read_answers(path: Path) -> dict[str, np.ndarray]:
    """The answers the demo wrote: source (n,), bound (n,), P̄ (n, 2, 2), A (n, 2, 2, 2, 2)."""
    v = np.loadtxt(path, ndmin=2)
    return {"source": v[:, 8],
            "bound": v[:, 9], "P": v[:, 10:14].reshape(-1, 2, 2),
            "A": v[:, 14:30].reshape(-1, 2, 2, 2, 2)}


def fortran_host(library: Path, name: str, *sources: Path) -> Path:
    """A Fortran host program (with the demos' MPI module) compiled; skipped without gfortran."""
    if shutil.which("gfortran") is None:
        pytest.skip("gfortran is missing: `make system-packages` installs it")
    return host(library, name, ROOT / "examples" / "fortran" / "mpi_c.f90", *sources)


DEMOS = {"c": "examples/c/coupler_demo.c", "fortran_umat": "examples/fortran/umat_demo.f90"}


def demo(library: Path, name: str) -> Path:
    """The demo ``name`` of :data:`DEMOS`, compiled."""
    source = ROOT / DEMOS[name]
    return (host if source.suffix == ".c" else fortran_host)(library, name, source)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("name", list(DEMOS))
def test_demo_matches_python_api(library, tmp_path, name, ranks):
    """The C demo (ns_evaluate) and the Fortran UMAT demo (ns_umat point by point, then
    ns_umat_batch) give the Python API's answers to the same calls on as many ranks."""
    out = run(demo(library, name), CONFIG, tmp_path / "answers", ranks=ranks)
    assert "step 1:" in out
    # the same calls through the Python API on as many ranks (replay.py)
    run(sys.executable, Path(__file__).parent / "capi" / "replay.py", CONFIG,
        tmp_path / "answers", 2, ranks=ranks)
    sources = set()
    for rank in range(ranks):
        c = read_answers(tmp_path / f"answers.rank{rank}.txt")
        py = np.load(tmp_path / f"answers.python.rank{rank}.npz")
        np.testing.assert_array_equal(c["source"], py["source"])
        np.testing.assert_allclose(c["P"], py["P"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(c["A"], py["A"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(c["bound"], py["bound"], rtol=0, atol=1e-12)
        sources |= set(c["source"].astype(int).tolist())
    assert sources == {0, 1}, "the demo's points should use both the operator and the RVE"


@pytest.mark.parametrize("ranks", [1, 2])
def test_bad_input_returns_codes_and_the_host_runs_on(library, tmp_path, ranks):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {ROOT / 'examples/models/fe2_composite.pt'}\nfine: {{kind: rve}}\n"
                   "polcy: {rtol: 0.1}\nmicrostructures: {kind: random_fibres, "
                   "volume_fraction: 0.3}\n")
    exe = host(library, "bad_input", ROOT / "tests" / "integration" / "capi" / "bad_input.c")
    out = run(exe, CONFIG, bad, ranks=ranks)
    assert out.count("ALL PASSED") == ranks and "FAIL " not in out, out


@pytest.mark.parametrize("ranks", [1, 2])
def test_fortran_bad_input_returns_codes(library, ranks):
    """Through the Fortran module: wrong shapes (on rank 0 only) and a DFGRD1 that is not plane
    strain return NS_ERR_INPUT on every rank; the host runs on."""
    exe = fortran_host(library, "bad_input_f",
                       ROOT / "tests" / "integration" / "capi" / "bad_input.f90")
    out = run(exe, CONFIG, ranks=ranks)
    assert out.count("ALL PASSED") == ranks and "FAIL " not in out, out


def test_python_start_failure_is_an_error_code(library, tmp_path):
    """An interpreter that cannot start is reported through ns_last_error, not an exit."""
    exe = host(library, "bad_input", ROOT / "tests" / "integration" / "capi" / "bad_input.c")
    env = {**os.environ, "NEUROSCALE_PYTHON": str(tmp_path / "no-python")}
    proc = subprocess.run([str(MPIEXEC), "-n", "1", str(exe), CONFIG, CONFIG],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "code 5" in proc.stdout, proc.stdout


def bar(library: Path) -> Path:
    """The Fortran FE program examples/fortran/bar_fe.f90, compiled."""
    return fortran_host(library, "bar_fe", ROOT / "examples" / "fortran" / "bar_fe.f90")


def dolfinx_bar(n: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The same bar as bar_fe.f90 by the DOLFINx adapter (coupled_helpers.macro_problem: the
    same mesh, clamp and pull, one point per cell) with the same coupler config and the same
    microstructure per centroid; (node coordinates, u) sorted by coordinates."""
    from coupled_helpers import displacement_by_coordinates, macro_problem

    from neuroscale_couple.capi.session import Session

    s = Session(CONFIG, MPI.COMM_SELF)

    def structures(x, ids):  # bar_fe's micro id: the column third of the centroid
        return [s.structure(min(2, int(3 * xi[0]))) for xi in x]

    stepper, set_load = macro_problem(MPI.COMM_SELF, s.coupler, structures, n=n, stretch=0.06)
    stepper.run([(k + 1) / steps for k in range(steps)], set_load)
    x, u = displacement_by_coordinates(stepper)
    s.close()
    return x, u


def by_coordinates(path: Path) -> tuple[np.ndarray, np.ndarray]:
    v = np.loadtxt(path)
    order = np.lexsort(np.round(v[:, :2], 9).T[::-1])
    return v[order, :2], v[order, 2:]


@pytest.mark.slow
def test_fortran_fe_bar_matches_dolfinx_fe2_on_1_and_2_ranks(library, tmp_path):
    """bar_fe.f90 (UMAT-style batches, its own assembly and Newton) on 1 and 2 ranks gives the
    displacement of the DOLFINx FE² run of the same mesh and Newton path (same points on the
    fine solver) to the Newton tolerance (measured: 2e-14 of max |u| with the operator alone,
    1e-10 classic, 1e-9 with fallback: the 2-rank run's latents are encoded in float32 split
    over the ranks, rounded differently)."""
    exe = bar(library)
    x_ref, u_ref = dolfinx_bar(n=4, steps=2)
    scale = np.abs(u_ref).max()
    assert scale > 0.05
    for ranks in (1, 2):
        out = run(exe, CONFIG, tmp_path / f"u{ranks}.txt", 4, 2, ranks=ranks)
        assert "step 1:" in out and "fallback points" in out
        x, u = by_coordinates(tmp_path / f"u{ranks}.txt")
        np.testing.assert_allclose(x, x_ref, atol=1e-12)
        np.testing.assert_allclose(u, u_ref, rtol=0, atol=1e-8 * scale)


@pytest.mark.slow
def test_fortran_fe_bar_restarts_from_an_abi_checkpoint(library, tmp_path):
    """Stopped after step 1 of 2 with ns_checkpoint on 2 ranks and restarted with ns_restore,
    the bar ends where the uninterrupted run does: exactly on 2 ranks, to the float32 rounding
    of the latents (encoded over another split) on 1."""
    exe = bar(library)
    run(exe, CONFIG, tmp_path / "full.txt", 2, 2, ranks=2)
    ckpt = tmp_path / "checkpoint"
    run(exe, CONFIG, tmp_path / "half.txt", 2, 2, ckpt, 1, ranks=2)
    assert (ckpt / "coupler.json").is_file()
    _, u_full = by_coordinates(tmp_path / "full.txt")
    _, u_half = by_coordinates(tmp_path / "half.txt")
    assert np.abs(u_full - u_half).max() > 1e-3  # the stopped run ended a step early
    for ranks, tol in ((2, 1e-14), (1, 1e-8)):
        run(exe, CONFIG, tmp_path / "restarted.txt", 2, 2, ckpt, ranks=ranks)
        _, u_restart = by_coordinates(tmp_path / "restarted.txt")
        np.testing.assert_allclose(u_restart, u_full, rtol=0, atol=tol * np.abs(u_full).max())
