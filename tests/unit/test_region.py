"""The training region: computed from the data, recorded in the card under the digest, and
points outside it sent to the fine solver, refused or counted as the policy says."""

from __future__ import annotations

from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest

from neuroscale_couple.coupler import FINE, OPERATOR, Coupler, Policy
from neuroscale_couple.errors import CheckpointError, InputError
from neuroscale_couple.fine import FineSolver, MicroResult
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.region import TrainingRegion, stretch_distance
from neuroscale_couple.solvers.microstructure import laminate, random_fibres
from neuroscale_couple.tensors import acoustic_minimum

pytestmark = pytest.mark.skip_in_parallel

MODEL = Path(__file__).resolve().parents[2] / "examples" / "models" / "fe2_composite.pt"


def rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def paths(magnitude: float) -> dict[str, np.ndarray]:
    """Deformation gradients of magnitude ``magnitude`` along the three loading directions."""
    return {"tension": np.diag([1 + magnitude, 1.0]),
            "compression": np.diag([1 - magnitude, 1.0]),
            "shear": np.array([[1.0, magnitude], [0.0, 1.0]])}


def test_stretch_distance_ignores_rotations_and_measures_the_stretch():
    U = np.array([[1.1, 0.05], [0.05, 0.95]])
    lam = np.linalg.eigvalsh(U)
    expected = np.linalg.norm(lam - 1)
    F = np.stack([U, rotation(0.7) @ U, rotation(-2.5) @ U])
    np.testing.assert_allclose(stretch_distance(F), expected, rtol=1e-12)


def test_region_of_a_generate_config_spans_its_draws():
    config = {"microstructure": [
        {"kind": "random_fibres", "volume_fraction": [0.2, 0.4], "n_fibres": [2, 4], "count": 12},
        {"kind": "laminate", "volume_fraction": 0.5, "count": 1}],
        "loads": {"per_microstructure": 40, "radius": 0.1, "seed": 3},
        "law": "neo_hookean", "matrix": {"E": 3.0, "nu": 0.35}, "fibre": {"E": 70.0, "nu": 0.2}}
    region = TrainingRegion.from_config(config)
    assert 0.07 < region.stretch <= 0.1  # ‖U − I‖ ≤ ‖F̄ − I‖ ≤ radius
    vf = region.structures["random_fibres"]["volume_fraction"]
    assert 0.2 <= vf[0] < vf[1] <= 0.4
    assert region.structures["laminate"] == {"volume_fraction": (0.5, 0.5)}
    assert TrainingRegion.from_dict(region.to_dict()) == region


def test_loads_and_structures_outside_the_shipped_region():
    region = load_operator(MODEL).region
    assert region.stretch == pytest.approx(0.3, abs=1e-3)
    for magnitude, outside in ((0.2, False), (0.5, True)):
        F = np.stack(list(paths(magnitude).values()))
        assert region.load_outside(F).tolist() == [outside] * 3
        # a rigid rotation of any size changes nothing
        assert region.load_outside(rotation(1.2) @ F).tolist() == [outside] * 3
    assert region.structure_reason(random_fibres(0.3, 3, seed=1)) is None
    assert "volume_fraction 0.55" in region.structure_reason(random_fibres(0.55, 6, seed=1))
    assert "kind 'laminate' was not trained" in region.structure_reason(laminate(0.3))


def test_the_region_is_covered_by_the_model_digest(tmp_path):
    model = load_operator(MODEL)
    model.save(tmp_path / "m.pt")
    assert load_operator(tmp_path / "m.pt").region == model.region
    model.card["region"]["stretch"] = 0.9  # a widened region is an altered file
    import torch

    payload = torch.load(tmp_path / "m.pt", weights_only=False)
    payload["card"] = __import__("json").dumps(model.card)
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_operator(tmp_path / "m.pt")


class _Exact(FineSolver):
    """A fine solver returning a known stress, counting its solves."""

    solves = 0

    def __init__(self, micro) -> None:
        super().__init__()

    def solve(self, F, *, point_ids=None, tangent=True, fields_resolution=None):
        _Exact.solves += 1
        return MicroResult(np.full((1, 2, 2), 7.0), np.zeros((1, 2, 2, 2, 2)))


def coupler(outside: str) -> Coupler:
    # a huge rtol: only the region sends points to the fine solver
    c = Coupler(load_operator(MODEL), _Exact, policy=Policy(rtol=1e6, outside=outside),
                comm=MPI.COMM_SELF)
    cells = [random_fibres(0.3, 3, seed=1)] * 6 + [random_fibres(0.55, 6, seed=2)]
    c.register(range(7), cells)
    c.begin_step(0)
    return c


def loads() -> np.ndarray:
    """Points 0–2 inside on the three paths, 3–5 beyond the training loads on them, point 6
    inside but of a cell outside the trained fibre fractions."""
    return np.stack([*paths(0.15).values(), *paths(0.6).values(), np.diag([1.05, 1.0])])


def test_points_outside_the_region_fall_back_whatever_their_bound():
    c = coupler("fallback")
    _Exact.solves = 0
    r = c.evaluate(loads(), range(7))
    assert r.source.tolist() == [OPERATOR] * 3 + [FINE] * 4
    assert _Exact.solves == 4 and (r.stress[3:] == 7.0).all()
    assert c.end_step().outside_points == 4


def test_points_outside_the_region_are_refused_or_counted():
    c = coupler("refuse")
    with pytest.raises(InputError, match=r"point 3 is outside the model's training region "
                       r"\(‖U − I‖ = 0.6"):
        c.evaluate(loads(), range(7))
    c = coupler("warn")
    assert (c.evaluate(loads(), range(7)).source == OPERATOR).all()
    assert c.end_step().outside_points == 4


def isotropic(d: int, lam: float, mu: float) -> np.ndarray:
    """The tangent of isotropic linear elasticity, d×d×d×d."""
    eye = np.eye(d)
    return (lam * np.einsum("ij,kl->ijkl", eye, eye)
            + mu * (np.einsum("ik,jl->ijkl", eye, eye) + np.einsum("il,jk->ijkl", eye, eye)))


def test_ellipticity_of_known_tangents():
    mu, lam = 1.0, 2.0
    linear = isotropic(2, lam, mu)
    # isotropic elasticity: the acoustic tensor's eigenvalues are μ and λ + 2μ
    assert acoustic_minimum(linear[None])[0] == pytest.approx(mu)
    soft = linear.copy()
    soft[0, 1, 0, 1] = soft[1, 0, 1, 0] = -0.5  # a negative shear modulus in one direction
    assert acoustic_minimum(soft[None])[0] < 0


def test_plane_acoustic_minimum_in_closed_form_equals_the_eigensolver():
    """The 2×2 closed form against ``eigvalsh`` on random tangents (major-symmetric or not:
    Q is symmetrised), one with a degenerate acoustic tensor (isotropic, λ + μ = 0)."""
    rng = np.random.default_rng(7)
    A = np.concatenate([rng.normal(size=(300, 2, 2, 2, 2)), isotropic(2, -1.0, 1.0)[None]])
    angles = np.linspace(0.0, np.pi, 36, endpoint=False)
    n = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    Q = np.einsum("mijkl,pj,pl->mpik", A, n, n)
    want = np.linalg.eigvalsh(0.5 * (Q + Q.swapaxes(-1, -2)))[..., 0].min(axis=1)
    np.testing.assert_allclose(acoustic_minimum(A), want, rtol=0, atol=1e-13 * np.abs(A).max())
    assert acoustic_minimum(A[-1:])[0] == pytest.approx(1.0)


def test_ellipticity_of_known_3d_tangents():
    """In 3D too: isotropic elasticity gives μ (the half sphere's lattice holds the exact
    minimum: every direction has it); a shear modulus made negative in the plane (x, z) only
    is found by the directions there."""
    mu, lam = 1.0, 2.0
    linear = isotropic(3, lam, mu)
    assert acoustic_minimum(linear[None])[0] == pytest.approx(mu)
    soft = linear.copy()
    soft[0, 2, 0, 2] = soft[2, 0, 2, 0] = -0.5
    assert acoustic_minimum(np.stack([linear, soft]))[1] < 0
