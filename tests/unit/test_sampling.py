"""Load and parameter sampling for data generation."""

import numpy as np
import pytest

from neuroscale_couple.errors import InputError
from neuroscale_couple.sampling import draw_parameter, loads_in_ball, rng_for


def test_loads_fill_the_ball_with_tension_compression_and_shear():
    F = loads_in_ball(4000, 0.15, rng_for(1, 0))
    H = F - np.eye(2)
    r = np.linalg.norm(H.reshape(-1, 4), axis=1)
    assert r.max() <= 0.15 + 1e-12
    assert np.all(np.linalg.det(F) > 0)
    # Uniform in a 4D ball: P(|H| ≤ r/2) = 1/16.
    assert np.mean(r <= 0.075) == pytest.approx(1 / 16, abs=0.015)
    assert (H[:, 0, 0] > 0.1).any() and (H[:, 0, 0] < -0.1).any()
    assert (np.abs(H[:, 0, 1]) > 0.1).any()


def test_draws_are_keyed_on_seed_and_index():
    a = loads_in_ball(3, 0.1, rng_for(7, 4))
    b = loads_in_ball(3, 0.1, rng_for(7, 4))
    c = loads_in_ball(3, 0.1, rng_for(7, 5))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_draw_parameter():
    rng = rng_for(0, 0)
    assert draw_parameter(0.3, rng, "v") == 0.3
    assert 0.1 <= draw_parameter([0.1, 0.5], rng, "v") <= 0.5
    assert draw_parameter([2, 2], rng, "n", integer=True) == 2
    with pytest.raises(InputError, match=r"v=\[0.5, 0.1\]"):
        draw_parameter([0.5, 0.1], rng, "v")
    with pytest.raises(InputError, match="loads.radius"):
        loads_in_ball(2, 0.1, rng, min_radius=0.2)
    with pytest.raises(InputError, match="loads.radius"):
        loads_in_ball(2, 0.0, rng)


def test_shell_loads_lie_beyond_the_inner_radius():
    F = loads_in_ball(500, 0.3, rng_for(2, 0), min_radius=0.2)
    r = np.linalg.norm((F - np.eye(2)).reshape(-1, 4), axis=1)
    assert r.min() >= 0.2 - 1e-12 and r.max() <= 0.3 + 1e-12


def test_a_data_set_of_several_families_keeps_the_first_family_as_alone():
    """`microstructure` as a list: the families follow each other, each with its own count, seed
    and load ball; a one-family list plans exactly what the bare mapping plans."""
    from neuroscale_couple.datagen import plan

    random = {"kind": "random_fibres", "volume_fraction": [0.1, 0.5], "n_fibres": [1, 6],
              "count": 4, "seed": 3}
    chains = {"kind": "fibre_chain", "volume_fraction": [0.3, 0.36], "n_fibres": 2, "count": 3,
              "seed": 9, "loads": {"radius": 0.3, "min_radius": 0.2}}
    loads = {"per_microstructure": 5, "radius": 0.15, "seed": 4}
    alone, F_alone = plan({"microstructure": random, "loads": loads})
    both, F = plan({"microstructure": [random, chains], "loads": loads})
    assert [s.key for s in both[:4]] == [s.key for s in alone]
    np.testing.assert_array_equal(F[:20], F_alone)
    assert [s.kind for s in both[4:]] == ["fibre_chain"] * 3
    r = np.linalg.norm((F[20:] - np.eye(2)).reshape(-1, 4), axis=1)
    assert r.min() >= 0.2 and r.max() <= 0.3
    with pytest.raises(InputError, match=r"microstructure\[1\].loads"):
        plan({"microstructure": [random, dict(chains, loads={"per_microstructure": 2})],
              "loads": loads})
    default, _ = plan({"microstructure": {k: v for k, v in chains.items() if k != "n_fibres"},
                       "loads": loads})
    assert {s.n_fibres for s in default} == {2}  # fibre_chain's own default, as in from_config
    with pytest.raises(InputError, match=r"microstructure\[1\].count=0"):
        plan({"microstructure": [random, dict(chains, count=0)], "loads": loads})
    with pytest.raises(InputError, match="loads.per_microstructure=0"):
        plan({"microstructure": [random, chains], "loads": dict(loads, per_microstructure=0)})
