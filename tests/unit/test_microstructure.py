"""Microstructure geometry and images (no DOLFINx needed)."""

import numpy as np
import pytest

from neuroscale_couple.errors import InputError
from neuroscale_couple.solvers import microstructure as micro


@pytest.mark.parametrize("ms", [micro.single_fibre(0.4), micro.random_fibres(0.45, 6, seed=3),
                                micro.laminate(0.3)])
def test_image_mean_is_the_volume_fraction(ms):
    image = ms.image(128)
    assert image.shape == (128, 128)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.mean() == pytest.approx(ms.volume_fraction, abs=2e-3)


def test_random_fibres_do_not_overlap_across_the_periodic_boundary():
    ms = micro.random_fibres(0.5, 8, seed=11, min_gap=0.02)
    for i, a in enumerate(ms.centres):
        for b in ms.centres[i + 1:]:
            d = a - b
            d -= np.round(d)
            assert np.hypot(*d) >= 2 * ms.radius + 0.02 - 1e-12


def test_random_fibres_are_reproducible_and_seed_dependent():
    a, b = micro.random_fibres(0.3, 4, seed=5), micro.random_fibres(0.3, 4, seed=5)
    c = micro.random_fibres(0.3, 4, seed=6)
    np.testing.assert_array_equal(a.centres, b.centres)
    assert not np.allclose(a.centres, c.centres)


def test_image_is_periodic_under_a_shift_of_the_fibres():
    ms = micro.random_fibres(0.3, 3, seed=2)
    shifted = micro.Microstructure(ms.kind, ms.volume_fraction, np.mod(ms.centres + 0.25, 1.0),
                                   ms.radius)
    np.testing.assert_allclose(np.roll(ms.image(64), (16, 16), axis=(0, 1)), shifted.image(64))


@pytest.mark.parametrize("build, match", [
    (lambda: micro.single_fibre(0.0), "volume_fraction=0.0"),
    (lambda: micro.single_fibre(-0.2), "strictly between 0 and 1"),
    (lambda: micro.single_fibre(0.78), "use volume_fraction ≤"),
    (lambda: micro.random_fibres(0.8, 1, seed=0), "overlap its own periodic image"),
    (lambda: micro.random_fibres(0.3, 0, seed=0), "n_fibres=0"),
    (lambda: micro.from_config({"kind": "hexagonal", "volume_fraction": 0.3}), "kind='hexagonal'"),
    (lambda: micro.from_config({"kind": "single_fibre"}), "volume_fraction is missing"),
])
def test_bad_parameters_raise_clear_errors(build, match):
    with pytest.raises(InputError, match=match):
        build()
