"""The periodic RVE solver on 3D cells (spheres, unidirectional fibres) against results known
independently of it. Coarse meshes: each test takes seconds.
"""

from __future__ import annotations

import json

from mpi4py import MPI

import numpy as np
import pytest
from test_rve_physics import MATRIX, rve, stress_tangent

from neuroscale_couple.errors import InputError
from neuroscale_couple.solvers import cells3d
from neuroscale_couple.solvers import microstructure as micro

pytestmark = pytest.mark.dolfinx

F_3D = np.array([[1.06, 0.03, -0.02], [-0.04, 0.97, 0.05], [0.02, -0.01, 1.03]])


def mandel6(A: np.ndarray) -> np.ndarray:
    """6×6 Mandel matrix (basis e11, e22, e33, √2 e23, √2 e13, √2 e12) of a minor-symmetric
    3D stiffness A (3, 3, 3, 3)."""
    idx = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    w = [1.0, 1.0, 1.0, np.sqrt(2.0), np.sqrt(2.0), np.sqrt(2.0)]
    return np.array([[w[a] * w[b] * A[(*idx[a], *idx[b])] for b in range(6)] for a in range(6)])


@pytest.mark.mpi
@pytest.mark.parametrize("degree", [1, 2])
def test_homogeneous_3d_cell_returns_the_analytic_neo_hookean_response(degree):
    cell = rve(cells3d.random_spheres(0.15, 3, seed=1), matrix=MATRIX, fibre=MATRIX,
               degree=degree, mesh_size=0.25 if degree == 1 else 0.4, comm=MPI.COMM_WORLD)
    res = cell.solve(F_3D)
    P, A = stress_tangent("neo_hookean", MATRIX, F_3D)
    assert res.stress.shape == (1, 3, 3) and res.tangent.shape == (1, 3, 3, 3, 3)
    np.testing.assert_allclose(res.stress[0], P, rtol=0, atol=1e-8 * MATRIX.E)
    np.testing.assert_allclose(res.tangent[0], A, rtol=0, atol=1e-8 * MATRIX.E)


@pytest.mark.mpi
def test_ud_fibres_under_a_transverse_load_is_the_plane_strain_cell_of_its_section():
    """F̄₁₃ = F̄₂₃ = F̄₃₁ = F̄₃₂ = 0, F̄₃₃ = 1: the exact 3D solution is the plane-strain one of
    the cross-section (w₃ = 0, nothing varies along x₃). The ud_fibres mesh is the section's
    2D mesh extruded in layers, so the P1 plane-strain solution, constant along x₃, is also
    the discrete 3D one: P̄ and the in-plane tangent agree with the 2D RVE on the same mesh to
    round-off (measured 6e-15 and 3e-14 relative), and the transverse shear stresses vanish.
    (The discretisation error itself, against a converged 2D cell, is that of the 2D mesh.)"""
    section = micro.random_fibres(0.35, 3, seed=2)
    F2 = np.array([[1.08, 0.04], [-0.03, 0.95]])
    F3 = np.eye(3)
    F3[:2, :2] = F2
    want = rve(section, mesh_size=0.15, comm=MPI.COMM_WORLD).solve(F2)
    got = rve(cells3d.ud_fibres(section), mesh_size=0.15, comm=MPI.COMM_WORLD).solve(F3)
    P, A = got.stress[0], got.tangent[0]
    scale_P, scale_A = np.abs(want.stress[0]).max(), np.abs(want.tangent[0]).max()
    np.testing.assert_allclose(P[:2, :2], want.stress[0], rtol=0, atol=1e-10 * scale_P)
    np.testing.assert_allclose(A[:2, :2, :2, :2], want.tangent[0], rtol=0, atol=1e-10 * scale_A)
    np.testing.assert_allclose(P[[0, 1, 2, 2], [2, 2, 0, 1]], 0.0, atol=1e-10 * scale_P)


def test_the_simple_cubic_sphere_cell_has_cubic_symmetry():
    """Small-strain stiffness of one centred sphere: C₁₁ = C₂₂ = C₃₃, C₁₂ = C₁₃ = C₂₃,
    C₄₄ = C₅₅ = C₆₆ (Mandel), every other entry 0 — to the mesh's tolerance, which breaks the
    symmetry slightly (measured 0.3 % of C₁₁ at h = 0.15), and with both symmetries of the
    tangent."""
    C = mandel6(rve(cells3d.single_sphere(0.2), law="linear", mesh_size=0.15)
                .solve(np.eye(3)).tangent[0])
    tol = 1e-2 * C[0, 0]
    np.testing.assert_allclose(C, C.T, atol=1e-10 * C[0, 0])
    for group in ([(0, 0), (1, 1), (2, 2)], [(0, 1), (0, 2), (1, 2)], [(3, 3), (4, 4), (5, 5)]):
        values = [C[i, j] for i, j in group]
        assert max(values) - min(values) <= tol
    cubic = np.zeros((6, 6), dtype=bool)
    cubic[:3, :3] = True
    cubic[np.diag_indices(6)] = True
    assert np.abs(C[~cubic]).max() <= tol
    assert C[0, 0] > C[0, 1] > 0 and C[3, 3] > 0


@pytest.mark.mpi
def test_hill_mandel_condition_in_3d():
    cell = rve(cells3d.random_spheres(0.2, 3, seed=4), mesh_size=0.25, comm=MPI.COMM_WORLD)
    P_bar = cell.solve(F_3D).stress[0]
    dF = np.array([[0.3, -0.2, 0.1], [0.5, 0.1, -0.4], [0.2, 0.3, -0.1]])
    s = 2 * np.pi

    def periodic(x):
        return np.stack([np.sin(s * x[0]) * np.cos(s * x[2]),
                         np.cos(2 * s * x[1]) + np.sin(s * x[0]),
                         np.sin(s * x[2]) * np.cos(s * x[1])])

    def not_periodic(x):
        return np.stack([x[0] ** 2, 0 * x[1], x[2] * x[1]])

    scale = np.abs(P_bar).max()
    assert cell.virtual_work(dF, periodic) == pytest.approx(np.sum(P_bar * dF), abs=1e-9 * scale)
    assert abs(cell.virtual_work(dF, not_periodic) - np.sum(P_bar * dF)) > 1e-3 * scale


def test_3d_stiffness_converges_under_mesh_refinement():
    """Small-strain C₁₁₁₁ of the simple-cubic sphere cell against a curved-P2 reference: the P1
    error falls with the element size (measured 5.0 %, 3.8 %, 2.1 % at h = 0.25, 0.15, 0.1;
    near the sphere the curvature sets a finer size, so h is not the element size there)."""
    ms = cells3d.single_sphere(0.2)

    def stiffness(**kw) -> float:
        return rve(ms, law="linear", **kw).solve(np.eye(3)).tangent[0][0, 0, 0, 0]

    ref = stiffness(degree=2, mesh_size=0.15)
    errors = [abs(stiffness(mesh_size=h) - ref) / ref for h in (0.25, 0.15, 0.1)]
    print(f"P1 C1111 errors {errors}")
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.03


def test_aligned_prolate_ellipsoids_stiffen_the_cell_along_their_axis():
    """Spheroids of aspect ratio 3 along x₃ (short-fibre-like): C₃₃₃₃ above C₁₁₁₁ and C₂₂₂₂
    (measured 6.7 against 5.5 at v = 0.1), and the image holds the volume fraction."""
    ms = cells3d.random_ellipsoids(0.1, 3, seed=1, aspect_ratio=3.0)
    assert ms.image(32).mean() == pytest.approx(0.1, abs=0.005)
    A = rve(ms, law="linear", mesh_size=0.25).solve(np.eye(3)).tangent[0]
    assert A[2, 2, 2, 2] > 1.1 * max(A[0, 0, 0, 0], A[1, 1, 1, 1])


def test_warm_start_and_hibernation_of_a_3d_cell():
    """A warm start reaches the cold state in fewer iterations; a hibernated 3D RVE resumes to
    the same results, bit for bit."""
    F_next = F_3D + 0.01 * np.eye(3)
    with rve(cells3d.single_sphere(0.15), mesh_size=0.25) as cell:
        cold = cell.solve(F_next)
        cell.solve(F_3D, point_ids=[0])
        warm = cell.solve(F_next, point_ids=[0])
        assert cell.hibernate() and cell.asleep
        again = cell.solve(F_next, point_ids=[1])
    np.testing.assert_allclose(warm.stress, cold.stress, atol=1e-10)
    assert warm.info["iterations"][0] < cold.info["iterations"][0]
    np.testing.assert_array_equal(again.stress, cold.stress)
    np.testing.assert_array_equal(again.tangent, cold.tangent)


def test_neuroscale_rve_prints_3x3_stress_and_3x3x3x3_tangent(tmp_path, capsys):
    from neuroscale_couple.cli import main

    cfg = {"microstructure": {"kind": "ud_fibres", "volume_fraction": 0.3, "n_fibres": 2,
                              "seed": 3},
           "mesh": {"size": 0.3}, "F": F_3D.tolist()}
    path = tmp_path / "rve3d.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    main(["rve", str(path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert np.shape(out["stress"]) == (3, 3) and np.shape(out["tangent"]) == (3, 3, 3, 3)
    assert out["newton_iterations"] > 0


def test_generate_writes_a_3d_data_set(tmp_path):
    import h5py

    from neuroscale_couple.datagen import generate

    config = {"microstructure": {"kind": "single_sphere", "volume_fraction": [0.1, 0.2],
                                 "count": 2, "seed": 1},
              "loads": {"per_microstructure": 2, "radius": 0.05, "seed": 2},
              "mesh": {"size": 0.3}, "image_resolution": 8}
    path = generate(config, tmp_path / "d3.h5", MPI.COMM_SELF, progress=False)
    with h5py.File(path) as h5:
        assert h5["samples/F"].shape == (4, 3, 3) and h5["samples/A"].shape == (4, 3, 3, 3, 3)
        assert h5["micro/image"].shape == (2, 8, 8, 8)
        assert np.all(h5["samples/done"][:] == 1) and np.isfinite(h5["samples/P"][:]).all()
        v = h5["micro/volume_fraction"][:]
        np.testing.assert_allclose(h5["micro/image"][:].mean(axis=(1, 2, 3)), v, atol=0.02)


@pytest.mark.parametrize("make, match", [
    (lambda: cells3d.random_spheres(0.7, 8, seed=0), r"largest feasible volume_fraction is 0\.6"),
    (lambda: cells3d.single_sphere(0.5), r"largest feasible volume_fraction is 0\.49"),
    (lambda: cells3d.random_spheres(0.2, 0, seed=0), "n_spheres=0"),
    (lambda: cells3d.ud_fibres(micro.laminate(0.3)), "section must be a 2D fibre cell"),
    (lambda: cells3d.random_ellipsoids(0.6, 4, seed=1),
     r"largest feasible volume_fraction is 0\.19"),
    (lambda: cells3d.random_ellipsoids(0.1, 2, seed=1, aspect_ratio=0), "aspect_ratio=0"),
])
def test_impossible_3d_cells_are_refused(make, match):
    with pytest.raises(InputError, match=match):
        make()


@pytest.mark.parametrize("cfg, match", [
    ({"kind": "random_spheres", "volume_fraction": 0.2, "n_sphere": 3}, "did you mean 'n_spheres'"),
    ({"kind": "ud_fibres", "volume_fraction": 0.2, "section": "laminate"},
     "microstructure.section='laminate'"),
    ({"kind": "single_sphere"}, "microstructure.volume_fraction is missing"),
])
def test_bad_3d_configs_are_refused(cfg, match):
    from neuroscale_couple.structures import from_config

    with pytest.raises(InputError, match=match):
        from_config(cfg)


def test_a_gradient_of_the_wrong_dimension_is_refused():
    with pytest.raises(InputError, match=r"3D single_sphere cell\) has shape \(2, 2\): give one 3"):
        rve(cells3d.single_sphere(0.1), mesh_size=0.3).solve(np.eye(2))
    with pytest.raises(InputError, match=r"2D single_fibre cell\) has shape \(3, 3\): give one 2"):
        rve(micro.single_fibre(0.2), mesh_size=0.1).solve(np.eye(3))


def test_sphere_images_hold_the_volume_fraction():
    ms = cells3d.random_spheres(0.25, 5, seed=3)
    image = ms.image(16)
    assert image.shape == (16, 16, 16)
    assert image.mean() == pytest.approx(0.25, abs=0.01)
    assert cells3d.ud_fibres(micro.single_fibre(0.3)).image(8).mean() == pytest.approx(0.3,
                                                                                       abs=0.01)


def test_3d_micro_fields_average_to_the_macro_state():
    res = rve(cells3d.single_sphere(0.2), mesh_size=0.25).solve(F_3D, fields_resolution=8)
    assert res.fields["w"].shape == (1, 8, 8, 8, 3) and res.fields["P"].shape == (1, 8, 8, 8, 3, 3)
    # ⟨F⟩ = F̄ exactly for periodic w; the voxel average is a quadrature of it
    np.testing.assert_allclose(res.fields["F"][0].mean(axis=(0, 1, 2)), F_3D, atol=5e-3)
