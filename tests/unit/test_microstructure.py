"""Microstructure geometry and images (no DOLFINx needed)."""

import numpy as np
import pytest

from neuroscale_couple import native
from neuroscale_couple.errors import InputError
from neuroscale_couple.solvers import microstructure as micro


@pytest.mark.parametrize("ms", [micro.single_fibre(0.4), micro.random_fibres(0.45, 6, seed=3),
                                micro.fibre_chain(0.33, 2, seed=4, misalignment=0.05),
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


def _surface_gaps(ms: micro.Microstructure) -> np.ndarray:
    """Periodic surface distances of every pair of fibres (the chain's neighbours included)."""
    d = ms.centres[:, None, :] - ms.centres[None, :, :]
    d -= np.round(d)
    pairs = np.triu_indices(ms.n_fibres, 1)
    return np.hypot(d[..., 0], d[..., 1])[pairs] - 2 * ms.radius


@pytest.mark.parametrize("seed", range(6))
def test_a_dense_two_fibre_chain_nearly_percolates(seed):
    """v = 0.36 in two fibres leaves 1 − 4r = 0.042 along the chain: both gaps (the one inside
    the cell and the one across the periodic boundary) lie between min_gap and 0.022."""
    ms = micro.fibre_chain(0.36, 2, seed=seed)
    assert ms.radius == pytest.approx(np.sqrt(0.36 / (2 * np.pi)))
    axis = 0 if ms.centres[0, 1] == ms.centres[1, 1] else 1  # straight: one coordinate shared
    assert ms.centres[0, 1 - axis] == ms.centres[1, 1 - axis]
    along = np.sort(ms.centres[:, axis])
    gaps = np.array([along[1] - along[0], 1 - along[1] + along[0]]) - 2 * ms.radius
    assert np.all(gaps >= 0.02 - 1e-12) and np.all(gaps <= 0.0225)


def test_a_misaligned_chain_keeps_its_gaps_and_is_reproducible():
    a = micro.fibre_chain(0.2, 3, seed=7, misalignment=0.06)
    b = micro.fibre_chain(0.2, 3, seed=7, misalignment=0.06)
    np.testing.assert_array_equal(a.centres, b.centres)
    assert np.all(_surface_gaps(a) >= 0.02 - 1e-12)
    assert micro.from_config({"kind": "fibre_chain", "volume_fraction": 0.2, "n_fibres": 3,
                              "misalignment": 0.06}, seed=7).key == a.key


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
    (lambda: micro.fibre_chain(0.3, 3, seed=0), "use volume_fraction ≤ 0.231"),
    (lambda: micro.fibre_chain(0.3, 2, seed=0, misalignment=-0.1), "misalignment=-0.1"),
    (lambda: micro.from_config({"kind": "hexagonal", "volume_fraction": 0.3}), "kind='hexagonal'"),
    (lambda: micro.from_config({"kind": "single_fibre"}), "volume_fraction is missing"),
])
def test_bad_parameters_raise_clear_errors(build, match):
    with pytest.raises(InputError, match=match):
        build()


@pytest.mark.parametrize(("resolution", "supersample"), [(64, 4), (32, 8), (17, 3), (5, 1)])
def test_batched_rendering_equals_the_pointwise_image_to_the_bit(resolution, supersample):
    """FibreCell.images (runs per sample row) against PhaseCell.image (a test per sample point),
    on cells whose fibres cross the cell edges, dense and sparse, with a laminate mixed in."""
    from neuroscale_couple.solvers.phase_cell import PhaseCell, cell_images

    rng = np.random.default_rng(1)
    cells = [micro.random_fibres(float(rng.uniform(0.1, 0.5)), int(rng.integers(1, 9)), seed=k)
             for k in range(40)]
    cells += [micro.fibre_chain(0.33, 2, seed=k, misalignment=0.03) for k in range(8)]
    cells += [micro.single_fibre(0.45), micro.laminate(0.3)]
    pointwise = np.stack([PhaseCell.image(c, resolution, supersample) for c in cells])
    np.testing.assert_array_equal(micro.FibreCell.images(cells[:-1], resolution, supersample),
                                  pointwise[:-1])
    if supersample == 4:  # the stored arrays: each family renders its own cells, order kept
        np.testing.assert_array_equal(cell_images(cells, resolution),
                                      pointwise.astype(np.float32))


def test_batched_sequential_addition_draws_as_one_candidate_at_a_time():
    def one_by_one(n, r, gap, rng, attempts=5000):
        centres = np.empty((0, 2))
        for _ in range(n):
            for _ in range(attempts):
                c = rng.random(2)
                far = np.all(micro._distances(c, centres) >= 2 * r + gap)
                if micro._edge_ok(c, r, gap) and far:
                    centres = np.vstack([centres, c])
                    break
            else:
                return None
        return centres

    for seed, (n, r) in enumerate([(1, 0.2), (4, 0.15), (8, 0.1), (6, 0.14), (3, 0.3)]):
        for batch in (1, 7, 64):
            a, b = np.random.default_rng(seed), np.random.default_rng(seed)
            got = micro._sequential_addition(n, r, 0.01, a, attempts=300, batch=batch)
            want = one_by_one(n, r, 0.01, b, attempts=300)
            assert (got is None) == (want is None)
            if want is not None:
                np.testing.assert_array_equal(got, want)
            assert a.random() == b.random()  # the generator left where one by one leaves it


@pytest.mark.parametrize("compiler", ["cc", "none"])
def test_cells_drawn_together_equal_cells_drawn_one_at_a_time(compiler, tmp_path, monkeypatch):
    """Sparse, dense (a few jam and are compressed) and single-fibre cells, seeds across the
    32-bit words of numpy's seeding: the same centres, radii, seeds and keys as one call a
    cell, with the compiled placement and (no C compiler) without it."""
    if compiler == "none":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("NEUROSCALE_KERNEL_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        rng = np.random.default_rng(3)
        v = np.concatenate([rng.uniform(0.1, 0.3, 40), rng.uniform(0.42, 0.5, 80)])
        n = np.concatenate([rng.integers(1, 9, 40), rng.integers(5, 9, 80)])
        seeds = [0, 2**32 - 1, 2**32, 2**40 + 7, 2**64 - 1, *range(1005, 1000 + len(v))]
        together = micro.random_fibres_many(v, n, seeds)
        assert (native.library(micro.RANDOM_ADDITION) is None) == (compiler == "none")
        counts = n.astype(np.int64)
        radii = np.array([micro._fibre_radius(vi, ni)[1] for vi, ni in zip(v, n, strict=True)])
        placed = micro.sequential_addition_many(counts, radii, micro.MIN_GAP, seeds)
        assert 0 < sum(c is None for c in placed) < 20  # some jam: compressed one by one
    finally:
        native.library.cache_clear()
    for vi, ni, s, cell in zip(v, n, seeds, together, strict=True):
        alone = micro.random_fibres(float(vi), int(ni), int(s))
        np.testing.assert_array_equal(cell.centres, alone.centres)
        assert (cell.key, cell.radius, cell.seed) == (alone.key, alone.radius, alone.seed)
        assert type(cell.seed) is int and type(cell.radius) is float
    with pytest.raises(InputError, match="volume_fraction=1.5"):
        micro.random_fibres_many([0.3, 1.5], [2, 2], [0, 1])
    with pytest.raises(InputError, match="overlap its own periodic image"):
        micro.random_fibres_many([0.3, 0.77], [2, 1], [0, 1])
    with pytest.raises(InputError, match=r"seeds must lie in \[0, 2\*\*64\)"):
        micro.random_fibres_many([0.3, 0.3], [2, 2], [0, -1])


def test_spheres_placed_together_equal_spheres_placed_one_cell_at_a_time():
    seeds = range(60)
    got = micro.sequential_addition_many(np.full(60, 6), np.full(60, 0.23), 0.02, seeds,
                                         box=(1.0, 1.0, 1.0), attempts=400)
    for s, centres in zip(seeds, got, strict=True):
        alone = micro._sequential_addition(6, 0.23, 0.02, np.random.default_rng(s),
                                           attempts=400, box=(1.0, 1.0, 1.0))
        assert (centres is None) == (alone is None)
        if alone is not None:
            np.testing.assert_array_equal(centres, alone)
    assert 0 < sum(c is None for c in got) < 60


@pytest.mark.parametrize("dim", [2, 3])
def test_compression_draws_as_one_move_at_a_time(dim):
    """Hard-disk (hard-sphere) compression of jammed packings: the same centres as drawing
    each move's Gaussian step on its own and testing it against the other disks one by one."""
    def one_move_at_a_time(centres, r, gap, rng, max_sweeps):
        n = len(centres)
        for _ in range(max_sweeps):
            pair = min(np.min(micro._distances(c, np.delete(centres, i, 0)), initial=np.inf)
                       for i, c in enumerate(centres))
            rho = min(r, (pair - gap) / 2)
            if rho >= r and all(micro._edge_ok(c, r, gap) for c in centres):
                return centres
            step = max(0.5 * (r - rho), 0.05 * r)
            for i in rng.permutation(n):
                trial = np.mod(centres[i] + rng.normal(0.0, step, dim), 1.0)
                others = np.delete(centres, i, 0)
                if np.all(micro._distances(trial, others) >= 2 * rho + gap - 1e-12) and (
                        rho < r or micro._edge_ok(trial, r, gap)):
                    centres[i] = trial
        return None

    n, r = (8, 0.13) if dim == 2 else (5, 0.22)
    placed = 0
    for seed in range(4):
        start = np.random.default_rng(seed).random((n, dim))
        a, b = np.random.default_rng(100 + seed), np.random.default_rng(100 + seed)
        got = micro._compress(start.copy(), r, 0.02, a, 300)
        want = one_move_at_a_time(start.copy(), r, 0.02, b, 300)
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_array_equal(got, want)
            placed += 1
        assert a.random() == b.random()
    assert placed  # a packing that random addition cannot place is found by compression
