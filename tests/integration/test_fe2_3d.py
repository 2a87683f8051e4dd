"""The 3D FE² example (examples/fe2_composite_3d.py): the eighth of an open-hole coupon whose
points each have their own 3D cell, on the Coupler with 3×3 F̄."""

from __future__ import annotations

import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
from coupled_helpers import serial_and_parallel

from neuroscale_couple.errors import InputError
from neuroscale_couple.fine import FineSolver, MicroResult

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
pytestmark = pytest.mark.dolfinx
MATRIX = {"E": 3.0, "nu": 0.35}
COARSE = ["--mesh-size", "0.5", "--steps", "2", "--quiet"]


class NeoHookean(FineSolver):
    """The homogeneous cell in closed form: the compressible Neo-Hookean law of the matrix,
    P = μ (F − F⁻ᵀ) + λ ln J F⁻ᵀ and its tangent
    A_ijkl = μ δ_ik δ_jl + (μ − λ ln J) F⁻¹_jk F⁻¹_li + λ F⁻¹_ji F⁻¹_lk (GPa)."""

    def __init__(self, structure=None) -> None:
        from neuroscale_couple.materials import Phase

        super().__init__()
        self.lmbda, self.mu = Phase(**MATRIX).lame

    def solve(self, F, *, point_ids=None, tangent=True, fields_resolution=None):
        F = np.asarray(F, dtype=float).reshape(-1, 3, 3)
        inv = np.linalg.inv(F)
        log_j = np.log(np.linalg.det(F))[:, None, None]
        inv_t = inv.transpose(0, 2, 1)
        P = self.mu * (F - inv_t) + self.lmbda * log_j * inv_t
        eye = np.eye(3)
        A = (self.mu * np.einsum("ik,jl->ijkl", eye, eye)[None]
             + (self.mu - self.lmbda * log_j[..., None, None])
             * np.einsum("njk,nli->nijkl", inv, inv)
             + self.lmbda * np.einsum("nji,nlk->nijkl", inv, inv))
        return MicroResult(P, A, None, {"iterations": np.zeros(len(F)),
                                        "time_s": np.zeros(len(F))})


def coupon_args(tmp_path: Path, *flags: str):
    from fe2_composite_3d import parse_args

    return parse_args([*COARSE, "--matrix", "3", "0.35", "--fibre", "3", "0.35", "--reference",
                       *flags, "--out", str(tmp_path)])


def test_closed_form_cell_tangent_is_the_derivative_of_its_stress():
    """The test's fine solver: its tangent is the finite-difference derivative of its stress."""
    F = np.array([[1.05, 0.02, -0.01], [0.01, 0.97, 0.03], [0.0, -0.02, 1.02]])
    law, h = NeoHookean(), 1e-6
    A = law.solve(F).tangent[0]
    for k, l in np.ndindex(3, 3):
        dF = np.zeros((3, 3))
        dF[k, l] = h
        numeric = (law.solve(F + dF).stress[0] - law.solve(F - dF).stress[0]) / (2 * h)
        np.testing.assert_allclose(A[:, :, k, l], numeric, atol=1e-7)


@pytest.mark.skip_in_parallel
def test_homogeneous_cells_give_the_single_scale_coupon(tmp_path):
    """Cells whose spheres are matrix too answer the matrix's Neo-Hookean law at every point:
    FE² on the coupon (3×3 F̄ through the Coupler and the DOLFINx adapter) then solves the
    single-scale problem, the same displacement and reaction to Newton's tolerance."""
    from fe2_composite import composite, voigt_lame
    from fe2_composite_3d import HALF_THICKNESS, microstructures_at, particle_fraction
    from plate_with_hole import CoupledRun, quarter_plate, run_coupled
    from single_scale import run_single_scale

    from neuroscale_couple.coupler import Coupler, Policy

    fe2_args = coupon_args(tmp_path / "fe2")
    coupler = Coupler(None, NeoHookean, policy=Policy(rtol=0.0), comm=MPI.COMM_SELF)
    problem, set_load, right = quarter_plate(fe2_args, coupler, microstructures_at,
                                             MPI.COMM_SELF, thickness=HALF_THICKNESS)
    fe2 = run_coupled(CoupledRun(problem, coupler, set_load, right), fe2_args, MPI.COMM_SELF)
    single_args = coupon_args(tmp_path / "single")
    single = run_single_scale(single_args, lambda x: voigt_lame(x, composite(single_args),
                                                                particle_fraction),
                              MPI.COMM_SELF, thickness=HALF_THICKNESS)
    assert fe2["quadrature_points"] == single["quadrature_points"] == 140
    assert fe2["fallback_rate"] == 1.0 and fe2["ranks"] == 1
    for key in ("displacement_norm", "reaction_force"):
        assert fe2[key] == pytest.approx(single[key], rel=1e-9), key
    forces = [h["reaction_force"] for h in fe2["steps"]]
    assert 0 < forces[0] < forces[1]
    with np.load(tmp_path / "fe2" / "fields.npz") as f:
        assert f["stress"].shape == (140, 3, 3) and f["u"].shape[1] == 3
    assert (tmp_path / "fe2" / "fields.png").exists()
    assert (tmp_path / "fe2" / "displacement.bp").exists()


@pytest.mark.slow
@pytest.mark.skip_in_parallel
def test_one_and_two_ranks_give_the_same_coupon(tmp_path):
    """The example with the 3D operator and fallback to the true 3D RVE solver (a coarse RVE
    mesh) on 1 and on 2 ranks (mpiexec): the same points fall back and the displacement and
    stress agree to the solvers' tolerance. A wide absolute tolerance keeps the fallback to a
    few points (measured 5 of 140: those outside the model's training region), ~25 s a run."""
    flags = [*COARSE, "--steps", "1", "--rve-mesh-size", "0.25", "--rtol", "0.05", "--atol",
             "0.05", "--no-retrain"]
    one, two = serial_and_parallel(ROOT / "examples" / "fe2_composite_3d.py", flags, tmp_path,
                                   2)
    assert two["ranks"] == 2 and two["quadrature_points"] == one["quadrature_points"] == 140
    fallback = [h["fallback_points"] for h in two["steps"]]
    assert fallback == [h["fallback_points"] for h in one["steps"]] and min(fallback) > 0
    assert two["rel_l2_displacement"] < 1e-8 and two["rel_l2_stress"] < 1e-7, two


def test_a_2x2_load_for_3d_cells_is_refused():
    from neuroscale_couple.coupler import Coupler, Policy
    from neuroscale_couple.solvers.cells3d import single_sphere

    coupler = Coupler(None, NeoHookean, policy=Policy(rtol=0.0), comm=MPI.COMM_SELF)
    coupler.register([0, 1], [single_sphere(0.1)] * 2)
    coupler.begin_step(0)
    with pytest.raises(InputError, match=r"F̄ \(the Coupler's cells are 3D\) has shape "
                       r"\(2, 2, 2\): give one 3×3 deformation gradient"):
        coupler.evaluate(np.stack([np.eye(2)] * 2), [0, 1])
    assert coupler.evaluate(np.stack([np.eye(3)] * 2), [0, 1]).stress.shape == (2, 3, 3)


def test_a_2d_model_for_3d_cells_is_refused(tmp_path):
    from neuroscale_couple.coupler import Coupler, Policy
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.solvers.cells3d import single_sphere

    model_2d = ROOT / "examples" / "models" / "fe2_composite.pt"
    coupler = Coupler(load_operator(model_2d), NeoHookean, policy=Policy(rtol=0.1),
                      comm=MPI.COMM_SELF)
    with pytest.raises(InputError, match="the model takes 2D loads .* but the microstructures "
                       "are 3D cells: give a model trained on 3D cells"):
        coupler.register([0], [single_sphere(0.1)])
    from fe2_composite_3d import main

    with pytest.raises(InputError, match=r"takes 2D loads \(F̄ 2×2\): the 3D coupon needs a "
                       "model trained on 3D cells"):
        main([*COARSE, "--model", str(model_2d), "--out", str(tmp_path)])
    assert not (tmp_path / "summary.json").exists()


def test_a_cold_start_is_refused_in_3d(capsys):
    from fe2_composite_3d import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model", "none"])
    assert exit_info.value.code == 2
    assert ("--model none (a cold start) is built for the 2D example (fe2_composite.py) only"
            in capsys.readouterr().err)
