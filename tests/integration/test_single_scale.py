"""The single-scale baseline of the plate examples (examples/single_scale.py): a closed-form
Neo-Hookean law on the macro mesh, the cost limit FE² runs are measured against."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
from coupled_helpers import convergence_order

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
pytestmark = pytest.mark.dolfinx


def uniaxial_plane_strain(stretch: float, lmbda: float, mu: float) -> tuple[float, float]:
    """Homogeneous uniaxial tension of the plane-strain Neo-Hookean law: F = diag(a, b) with
    a = 1 + stretch and P₂₂ = μ (b − 1/b) + λ ln(ab)/b = 0. Returns (b, P₁₁)."""
    from scipy.optimize import brentq

    a = 1 + stretch
    b = brentq(lambda b: mu * (b - 1 / b) + lmbda * np.log(a * b) / b, 0.3, 1.5, xtol=1e-15)
    return b, mu * (a - 1 / a) + lmbda * np.log(a * b) / a


@pytest.mark.mpi
def test_uniaxial_block_gives_the_closed_form_stress_with_quadratic_newton():
    """A unit block with the plate's boundary conditions (u_x = 0 on x = 0, u_y = 0 on y = 0,
    u_x = stretch on x = 1, top free) deforms homogeneously: its reaction is P̄₁₁ of the
    closed-form law and its top moves by b − 1; Newton converges quadratically."""
    from dolfinx import fem, mesh
    from plate_with_hole import quarter_loading
    from single_scale import solve_steps

    comm = MPI.COMM_WORLD
    lmbda, mu, stretch = 4.0, 1.5, 0.25
    msh = mesh.create_unit_square(comm, 4, 4, mesh.CellType.triangle)
    u, bcs, set_load, right = quarter_loading(msh, stretch)
    history = solve_steps(u, bcs, fem.Constant(msh, lmbda), fem.Constant(msh, mu),
                          np.array([0.5, 1.0]), set_load, right)
    for t, h in zip((0.5, 1.0), history, strict=True):
        b, P11 = uniaxial_plane_strain(t * stretch, lmbda, mu)
        assert h["reaction_force"] == pytest.approx(P11, rel=1e-10)
        assert convergence_order(h["residuals"][0]) > 1.8, h["residuals"]
    x = u.function_space.tabulate_dof_coordinates()[:, :2]
    top = np.isclose(x[:, 1], 1.0)
    np.testing.assert_allclose(u.x.array.reshape(-1, 2)[top, 1], b - 1, rtol=1e-10)
    np.testing.assert_allclose(u.x.array.reshape(-1, 2)[:, 0], stretch * x[:, 0], atol=1e-12)


def test_voigt_constants_follow_the_graded_fraction():
    """The example's homogenised constants lie between the phases' and stiffen with the fibre
    fraction, which grows from the hole to the loaded edge."""
    from fe2_composite import COMPOSITE, graded_fraction, voigt_lame

    from neuroscale_couple.materials import Phase

    x = np.array([[0.3, 0.0], [0.6, 0.3], [1.0, 1.0]])
    lmbda, mu = voigt_lame(x)
    v = graded_fraction(x)
    (lf, mf), (lm, mm) = (Phase(**COMPOSITE[p]).lame for p in ("fibre", "matrix"))
    np.testing.assert_allclose(mu, v * mf + (1 - v) * mm, rtol=1e-14)
    np.testing.assert_allclose(lmbda, v * lf + (1 - v) * lm, rtol=1e-14)
    assert np.all(np.diff(v) > 0) and np.all(np.diff(mu) > 0)


@pytest.mark.skip_in_parallel
def test_example_single_scale_flag_runs_the_plate_and_checks_itself(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "fe2_composite.py"),
                           "--single-scale", "--mesh-size", "0.2", "--steps", "3", "--out",
                           str(tmp_path), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["single_scale"] and s["ranks"] == 1 and len(s["steps"]) == 3
    assert s["steps_time_s"] <= s["total_time_s"]
    assert s["per_rank"]["peak_rss_mb"][0] > 0
    forces = [h["reaction_force"] for h in s["steps"]]
    assert 0 < forces[0] < forces[1] < forces[2]
    for h in s["steps"]:
        assert convergence_order(h["residuals"][0]) > 1.8, h["residuals"]
