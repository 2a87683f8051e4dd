"""Fibre-composite unit cells: circular fibres (:class:`FibreCell`) and laminates
(:class:`Laminate`), two families of :class:`~neuroscale_couple.solvers.phase_cell.PhaseCell`.

Constructors: :func:`single_fibre`, :func:`random_fibres` (random non-overlapping periodic
arrangement), :func:`fibre_chain` (fibres lined up across the cell with random, possibly small
gaps: nearly percolating stiff columns, which random addition almost never draws) and
:func:`laminate` (layers normal to x, whose effective response is known exactly); from a config
mapping, :func:`from_config`.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from neuroscale_couple import native
from neuroscale_couple.errors import InputError
from neuroscale_couple.solvers.phase_cell import (
    FIBRE,
    MATRIX,
    MESH_FILES,
    InclusionCell,
    PhaseCell,
    fragment_cell,
    inclusion_arrays,
    periodic_images,
)
from neuroscale_couple.structures import REQUIRED, register, settings

__all__ = ["FIBRE", "MATRIX", "MESH_FILES", "FibreCell", "Laminate", "Microstructure",
           "PhaseCell", "fibre_chain", "from_config", "laminate", "random_fibres",
           "random_fibres_many", "single_fibre"]

RANDOM_ADDITION = Path(__file__).with_name("random_addition.c")
_ROWS = {t: np.ctypeslib.ndpointer(t, flags="C_CONTIGUOUS")
         for t in (np.int64, np.float64, np.uint64, np.int8)}
_RSA_ARGUMENTS = (ctypes.c_int64, _ROWS[np.int64], _ROWS[np.float64], ctypes.c_double,
                  _ROWS[np.uint64], ctypes.c_int, _ROWS[np.float64], ctypes.c_int64,
                  ctypes.c_int64, _ROWS[np.float64], _ROWS[np.int8])
"""The signature of ``ns_sequential_addition`` in ``random_addition.c``."""
MIN_GAP = 0.02
"""Default gap (cell lengths) between fibres, their periodic images and the cell edges."""
N_FIBRES = {"single_fibre": 1, "random_fibres": 1, "fibre_chain": 2}
"""Fibres of a cell whose config gives no ``n_fibres``, per kind."""


@register
@dataclass(frozen=True)
class FibreCell(InclusionCell):
    """A periodic unit cell [0, 1)² of matrix with N equal circular fibres (the attributes of
    :class:`InclusionCell`: ``kind`` ``single_fibre``, ``random_fibres`` or ``fibre_chain``,
    the fibre area fraction, the (N, 2) centres, the radius and the seed)."""

    kinds: ClassVar[tuple[str, ...]] = ("single_fibre", "random_fibres", "fibre_chain")
    config_schema: ClassVar[dict[str, Any]] = {
        **PhaseCell.config_schema, "volume_fraction": REQUIRED, "n_fibres": None,
        "min_gap": MIN_GAP, "misalignment": 0.0}
    """``n_fibres`` None: the kind's default (:data:`N_FIBRES`); ``count`` (cells of a generate
    group) and ``seed`` (the group's or the arrangement's seed) as for every cell."""
    drawn: ClassVar[dict[str, bool]] = {"volume_fraction": False, "n_fibres": True}
    descriptor_keys: ClassVar[tuple[str, ...]] = ("volume_fraction", "n_fibres")

    @property
    def n_fibres(self) -> int:
        return len(self.centres)

    @classmethod
    def arrays(cls, structures: Sequence[FibreCell], resolution: int | None
               ) -> dict[str, np.ndarray]:
        """``volume_fraction``, ``n_fibres``, ``seed`` (−1: none), ``radius`` (M,),
        ``centres`` (M, N_max, 2) NaN-padded and ``image`` (M, r, r) float32."""
        return inclusion_arrays(structures, resolution, "n_fibres")

    @classmethod
    def from_config(cls, cfg: dict, *, seed: int | None = None) -> FibreCell:
        """Keys: ``kind``, ``volume_fraction``, ``n_fibres``, ``seed`` (overridden by the
        ``seed`` argument), ``min_gap``, for a chain also ``misalignment``."""
        o = settings(cls, cfg)
        kind = o.get("kind")
        if kind not in cls.kinds:
            raise InputError(f"microstructure.kind={kind!r}: {cls.__name__} makes "
                             f"{', '.join(cls.kinds)}")
        v, gap = _volume_fraction(cfg), float(o["min_gap"])
        n = N_FIBRES.get(kind, 1) if o["n_fibres"] is None else int(o["n_fibres"])
        s = int(o["seed"] if seed is None else seed)
        if kind == "single_fibre":
            return single_fibre(v, min_gap=gap)
        if kind == "fibre_chain":
            return fibre_chain(v, n, s, min_gap=gap, misalignment=float(o["misalignment"]))
        return random_fibres(v, n, s, min_gap=gap)

    def _fibre_mask(self, s: np.ndarray) -> np.ndarray:
        """Distances are separable, so no (m, m, 2) array is formed."""
        inside = np.zeros((len(s), len(s)), dtype=bool)
        for cx, cy in self.centres:
            dx, dy = s - cx, s - cy
            dx -= np.round(dx)  # nearest periodic image
            dy -= np.round(dy)
            inside |= dy[:, None] ** 2 + dx[None, :] ** 2 < self.radius**2
        return inside

    @classmethod
    def images(cls, cells: Sequence[FibreCell], resolution: int, supersample: int = 4
               ) -> np.ndarray:
        """Images (M, resolution, resolution) of M cells, equal to their :meth:`image`s to the
        bit, rendered together without a per-pixel test.

        Along a row of sample points a fibre covers one periodic run of columns; its ends come
        from √(r² − dy²) and are then settled by the pointwise test of :meth:`_fibre_mask` at
        the neighbouring columns (the same floating-point test, so the same samples). Runs are
        summed into pixels by a difference array over the pixel columns. Cost: a few numpy
        passes over the runs (about 2r·m per fibre), none over all pixels of all fibres.
        """
        if resolution < 1 or supersample < 1:
            raise InputError(
                f"image resolution={resolution}, supersample={supersample}: both must be ≥ 1"
            )
        m, n_cells = resolution * supersample, len(cells)
        if not n_cells:
            return np.zeros((0, resolution, resolution))
        per_cell = [c.n_fibres for c in cells]
        centres = np.concatenate([c.centres for c in cells]).reshape(-1, 2)  # (F, 2) all fibres
        radius = np.repeat([c.radius for c in cells], per_cell)
        r2 = np.repeat([c.radius**2 for c in cells], per_cell)  # as _fibre_mask squares it
        # each fibre's sample rows within its radius, one more on either side: (fibre, row)
        first = np.floor((centres[:, 1] - radius) * m - 0.5).astype(np.int64)
        n_rows = np.floor((centres[:, 1] + radius) * m - 0.5).astype(np.int64) + 2 - first
        fibre = np.repeat(np.arange(len(r2)), n_rows)
        row = (np.arange(len(fibre)) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
               + first[fibre]) % m
        s = (np.arange(m) + 0.5) / m
        cx, r2 = centres[fibre, 0], r2[fibre]
        dy = s[row] - centres[fibre, 1]
        dy -= np.round(dy)  # nearest periodic image, as in _fibre_mask
        dy2 = dy**2
        half = np.sqrt(np.maximum(r2 - dy2, 0.0)) * m
        mid = cx * m - 0.5  # the centre in column-index units
        lo = np.floor(mid - half).astype(np.int64) + 1
        hi = np.ceil(mid + half).astype(np.int64) - 1

        def inside(k: np.ndarray) -> np.ndarray:  # _fibre_mask's test at column k (mod m)
            dx = s[k % m] - cx
            dx -= np.round(dx)
            return dy2 + dx**2 < r2

        lo = np.where(inside(lo - 1), lo - 1, np.where(inside(lo), lo, lo + 1))
        hi = np.where(inside(hi + 1), hi + 1, np.where(inside(hi), hi, hi - 1))
        hi = np.maximum(hi, lo - 1)  # empty runs
        # Samples below column index k in pixel column J: ss·⌊k/m⌋ + clip(k mod m − ss·J, 0, ss),
        # a step function of J; a run [lo, hi] adds its value at hi + 1 minus that at lo, written
        # as a difference array over the pixel columns (one spare column) and summed up.
        c1, c0 = (hi + 1) // m, lo // m
        k1, k0 = hi + 1 - c1 * m, lo - c0 * m
        q1, q0 = k1 // supersample, k0 // supersample
        r1, r0 = k1 - q1 * supersample, k0 - q0 * supersample
        cell = np.repeat(np.arange(n_cells), per_cell)[fibre]
        width = resolution + 1
        index = (cell * resolution + row // supersample) * width + np.stack(
            [np.zeros_like(q1), q1, q1 + 1, q0, q0 + 1])
        weight = np.stack([(c1 - c0) * supersample, r1 - supersample, -r1, supersample - r0, r0])
        counts = np.bincount(index.ravel(), weight.ravel(), minlength=n_cells * resolution
                             * width).reshape(-1, width)
        for j in range(1, resolution):  # the running sum as column adds: 30× np.cumsum's speed
            np.add(counts[:, j - 1], counts[:, j], out=counts[:, j])
        return counts[:, :resolution].reshape(n_cells, resolution, resolution) / supersample**2

    def _gmsh_fibres(self) -> list[int]:
        """The fibres' disks and their periodic images, clipped to the cell."""
        import gmsh

        r = self.radius
        return fragment_cell(2, lambda: [
            (2, gmsh.model.occ.addDisk(x, y, 0, r, r))
            for c in self.centres for x, y in periodic_images(c, r)])


Microstructure = FibreCell
"""The former name of :class:`FibreCell`."""


@register
@dataclass(frozen=True)
class Laminate(FibreCell):
    """Two layers normal to x: fibre phase for 0 ≤ x < v, matrix for v ≤ x < 1 (kind
    ``laminate``; stored as a fibre cell without fibres: no centres, radius 0)."""

    kinds: ClassVar[tuple[str, ...]] = ("laminate",)
    descriptor_keys: ClassVar[tuple[str, ...]] = ("volume_fraction",)
    config_schema: ClassVar[dict[str, Any]] = {**PhaseCell.config_schema,
                                               "volume_fraction": REQUIRED}

    @classmethod
    def from_config(cls, cfg: dict, *, seed: int | None = None) -> Laminate:
        """Keys: ``kind`` and ``volume_fraction``."""
        return laminate(_volume_fraction(cfg))

    def _fibre_mask(self, s: np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.mod(s, 1.0) < self.volume_fraction, (len(s), len(s)))

    @classmethod
    def images(cls, cells: Sequence[Laminate], resolution: int, supersample: int = 4
               ) -> np.ndarray:
        """The cells' :meth:`image`s one by one (layers, not fibres: no runs to render)."""
        return PhaseCell.images.__func__(cls, cells, resolution, supersample)

    def _gmsh_fibres(self) -> list[int]:
        import gmsh

        occ = gmsh.model.occ
        v = self.volume_fraction
        layers = [(2, occ.addRectangle(0, 0, 0, v, 1)), (2, occ.addRectangle(v, 0, 0, 1 - v, 1))]
        _, children = occ.fragment(layers[:1], layers[1:])
        return [t for _, t in children[0]]


def _volume_fraction(cfg: dict) -> float:
    if "volume_fraction" not in cfg:
        raise InputError("microstructure.volume_fraction is missing: give a value in (0, 1)")
    return float(cfg["volume_fraction"])



def single_fibre(volume_fraction: float, *, min_gap: float = MIN_GAP) -> FibreCell:
    """One fibre of area fraction v centred in the cell (a square fibre array)."""
    _check_fraction(volume_fraction)
    r = float(np.sqrt(volume_fraction / np.pi))
    if 2 * r + min_gap > 1.0:
        vmax = np.pi * ((1.0 - min_gap) / 2) ** 2
        raise InputError(
            f"volume_fraction={volume_fraction} leaves the fibre less than min_gap={min_gap} from "
            f"its periodic image; use volume_fraction ≤ {vmax:.3f}"
        )
    return FibreCell("single_fibre", float(volume_fraction), np.array([[0.5, 0.5]]), r)


def random_fibres(
    volume_fraction: float,
    n_fibres: int,
    seed: int,
    *,
    min_gap: float = MIN_GAP,
    max_sweeps: int = 20000,
) -> FibreCell:
    """N equal circular fibres placed at random, non-overlapping across the periodic boundary.

    Random sequential addition; where that jams (dense packings, v ≳ 0.45), hard-disk Monte Carlo
    from random centres with the radius grown to the largest admissible value after each sweep
    (Lubachevsky–Stillinger compression). Fibres keep a periodic gap ``min_gap`` and their circles
    do not nearly touch the cell edges (no sliver elements where an edge cuts a fibre).

    Raises
    ------
    InputError
        If v ∉ (0, 1), N < 1, or no admissible arrangement is found (v too high for N fibres).
    """
    n_fibres, r = _fibre_radius(volume_fraction, n_fibres)
    if 2 * r + min_gap > 1.0:
        raise InputError(
            f"{n_fibres} fibres of volume_fraction={volume_fraction} have radius {r:.3f}: each "
            f"would overlap its own periodic image; lower volume_fraction or raise n_fibres"
        )
    rng = np.random.default_rng(seed)
    centres = _sequential_addition(n_fibres, r, min_gap, rng)
    if centres is None:
        centres = _compress(rng.random((n_fibres, 2)), r, min_gap, rng, max_sweeps)
    if centres is None:
        raise InputError(
            f"could not place {n_fibres} fibres of volume_fraction={volume_fraction} with "
            f"min_gap={min_gap} (seed={seed}): lower volume_fraction, n_fibres or min_gap"
        )
    return FibreCell("random_fibres", float(volume_fraction), centres, r, seed)


def random_fibres_many(volume_fractions: Sequence[float], n_fibres: Sequence[int],
                       seeds: Sequence[int], *, min_gap: float = MIN_GAP) -> list[FibreCell]:
    """M cells ``random_fibres(v, n, seed, min_gap=min_gap)``, equal to them to the bit, the
    random sequential addition of all cells done together (:func:`sequential_addition_many`,
    compiled). The few jammed cells (70 of the 95 621 points of the composite example at mesh
    size 0.00625) are compressed one at a time."""
    v, n = np.asarray(volume_fractions, dtype=float), np.asarray(n_fibres)
    if len(v) != len(n) or not (np.all((v > 0) & (v < 1)) and np.all(n >= 1)
                                and np.all(n == np.floor(n))):
        for vi, ni in zip(volume_fractions, n_fibres, strict=True):  # the first bad one raises
            _fibre_radius(vi, ni)
    counts = n.astype(np.int64)
    radii = np.sqrt(v / (counts * np.pi))  # as _fibre_radius, to the bit
    seeds = [int(s) for s in seeds]
    placed = sequential_addition_many(counts, radii, min_gap, seeds)
    return [random_fibres(vi, ni, s, min_gap=min_gap) if c is None or 2 * r + min_gap > 1.0
            else FibreCell("random_fibres", float(vi), c, float(r), s)
            for vi, ni, s, r, c in zip(volume_fractions, counts, seeds, radii, placed,
                                       strict=True)]


def fibre_chain(volume_fraction: float, n_fibres: int, seed: int, *, min_gap: float = MIN_GAP,
                misalignment: float = 0.0, attempts: int = 1000) -> FibreCell:
    """N equal fibres in a periodic chain along x or y (drawn at random): a column of stiff fibres
    that nearly percolates when the volume fraction is high.

    The radius follows from v = Nπr²; the gap left along the chain, 1 − 2Nr, is split at random
    (uniform on the simplex) into N surface gaps of at least ``min_gap`` each, so at high v every
    gap is small. Each fibre is shifted across the chain by up to ``misalignment`` (cell lengths,
    uniform), which can only widen the gaps. The chain's position is drawn until no fibre nearly
    touches a cell edge.

    Raises
    ------
    InputError
        If v ∉ (0, 1), N < 1, misalignment < 0, or N fibres of fraction v do not fit in a chain
        with gaps ≥ min_gap.
    """
    n, r = _fibre_radius(volume_fraction, n_fibres)
    if not misalignment >= 0:
        raise InputError(f"misalignment={misalignment}: must be ≥ 0 cell lengths (0: straight)")
    slack = 1.0 - n * (2 * r + min_gap)
    if slack < 0:
        vmax = n * np.pi * ((1.0 - n * min_gap) / (2 * n)) ** 2
        raise InputError(
            f"a chain of {n_fibres} fibres of volume_fraction={volume_fraction} leaves gaps below "
            f"min_gap={min_gap}; use volume_fraction ≤ {vmax:.3f} or fewer fibres"
        )
    rng = np.random.default_rng(seed)
    gaps = min_gap + slack * rng.dirichlet(np.ones(n))
    along = np.concatenate([[0.0], np.cumsum(2 * r + gaps)[:-1]])
    across = rng.uniform(-misalignment, misalignment, n)
    axis = int(rng.integers(2))
    for _ in range(attempts):
        start = rng.random(2)
        centres = np.empty((n, 2))
        centres[:, axis] = along + start[0]
        centres[:, 1 - axis] = across + start[1]
        centres = np.mod(centres, 1.0)
        if (_edge_ok(centres, r, min_gap)
                and _closest_pair(centres) >= 2 * r + min_gap - 1e-12):
            return FibreCell("fibre_chain", float(volume_fraction), centres, r, seed)
    raise InputError(
        f"could not place a chain of {n_fibres} fibres of volume_fraction={volume_fraction} "
        f"clear of the cell edges (seed={seed}, misalignment={misalignment}): lower "
        "volume_fraction or misalignment"
    )


def laminate(volume_fraction: float) -> Laminate:
    """Two layers normal to x: fibre phase for 0 ≤ x < v, matrix for v ≤ x < 1."""
    _check_fraction(volume_fraction)
    return Laminate("laminate", float(volume_fraction), np.zeros((0, 2)), 0.0)


def from_config(cfg: dict, *, seed: int | None = None) -> PhaseCell:
    """A cell of any kind from its config mapping (see
    :func:`neuroscale_couple.structures.from_config`)."""
    from neuroscale_couple.structures import from_config as structure_from_config

    return structure_from_config(cfg, seed=seed)


def _fibre_radius(volume_fraction: float, n_fibres: int) -> tuple[int, float]:
    """Checked (N, r) of N equal fibres of total area fraction v: v = Nπr²."""
    _check_fraction(volume_fraction)
    if int(n_fibres) != n_fibres or n_fibres < 1:
        raise InputError(f"n_fibres={n_fibres}: must be a positive integer")
    return int(n_fibres), float(np.sqrt(volume_fraction / (int(n_fibres) * np.pi)))


def _check_fraction(v: float) -> None:
    if not 0.0 < v < 1.0:
        raise InputError(f"volume_fraction={v}: must lie strictly between 0 and 1")


def _sequential_addition(n: int, r: float, gap: float, rng: np.random.Generator,
                         attempts: int = 5000, batch: int = 64,
                         box: tuple[float, ...] = (1.0, 1.0)) -> np.ndarray | None:
    """Random sequential addition of n disks (a 2D ``box``) or spheres (3D) of radius r in the
    periodic box [0, box_0) × [0, box_1) (× [0, box_2)), the unit cell by default; their
    centres (n, d), or None if one finds no place.

    Each one tries up to ``attempts`` uniform candidates ``rng.random(d) · box`` in turn and
    takes the first admissible one. The candidates are drawn and checked ``batch`` at a time
    (4× more after each batch without one, up to 4 096: a jammed cell tries its 5 000 in a few
    passes), and the generator is then rewound to just after the one taken: the same centres
    and generator state as drawing one candidate at a time, without a Python loop per
    candidate."""
    size = np.array(box, dtype=float)
    dim = len(size)
    centres = np.empty((0, dim))
    for _ in range(n):
        left, chunk = attempts, batch
        while left:
            state = rng.bit_generator.state
            trials = rng.random((min(chunk, left), dim)) * size
            chunk = min(4 * chunk, 4096)
            edge = np.minimum(trials, size - trials)
            ok = np.all(np.abs(edge - r) >= gap / 2, axis=1)
            d = centres[None] - trials[:, None]
            d -= np.round(d / size) * size
            ok &= np.all(np.hypot.reduce(d, axis=-1) >= 2 * r + gap, axis=1)
            if ok.any():
                first = int(np.argmax(ok))
                rng.bit_generator.state = state
                rng.random((first + 1, dim))  # the draws up to the one taken, as one by one
                centres = np.vstack([centres, trials[first]])
                break
            left -= len(trials)
        else:
            return None
    return centres


def sequential_addition_many(counts: np.ndarray, radii: np.ndarray, gap: float,
                             seeds: Sequence[int], box: tuple[float, ...] = (1.0, 1.0),
                             attempts: int = 5000) -> list[np.ndarray | None]:
    """:func:`_sequential_addition` of M cells, each from a fresh generator
    ``default_rng(seed)``: counts (M,) disks (spheres, for a 3D ``box``) of radii (M,); each
    cell's centres (count, d), equal to the bit to the one-cell version's, or None where a disk
    finds no place in ``attempts`` candidates.

    Compiled (``random_addition.c``: numpy's SeedSequence and PCG64 streams reproduced word for
    word, the same tests in the same floating-point order): 0.33 s for the 95 621 cells of the
    composite example at mesh size 0.00625; one cell at a time in numpy without a C compiler."""
    counts, radii = np.asarray(counts, dtype=np.int64), np.asarray(radii, dtype=float)
    seeds = [int(s) for s in seeds]
    if any(not 0 <= s < 2**64 for s in seeds):
        raise InputError(f"seeds must lie in [0, 2**64), got {min(seeds)}…{max(seeds)}")
    place = native.function(RANDOM_ADDITION, "ns_sequential_addition", _RSA_ARGUMENTS)
    if place is None:
        return [_sequential_addition(int(n), float(r), gap, np.random.default_rng(s),
                                     attempts=attempts, box=box)
                for n, r, s in zip(counts, radii, seeds, strict=True)]
    dim, most = len(box), int(counts.max(initial=0))
    centres = np.zeros((len(counts), most, dim))
    placed = np.zeros(len(counts), dtype=np.int8)
    place(len(counts), counts, radii, float(gap), np.array(seeds, dtype=np.uint64), dim,
          np.asarray(box, dtype=float), attempts, most, centres, placed)
    return [centres[i, :counts[i]].copy() if placed[i] else None for i in range(len(counts))]


def _compress(centres: np.ndarray, r: float, gap: float, rng: np.random.Generator,
              max_sweeps: int) -> np.ndarray | None:
    """Hard-disk (hard-sphere) Monte Carlo on centres (n, d), the radius ρ grown to min(r,
    largest admissible) after each sweep.

    A sweep draws a permutation, then one Gaussian step (d,) per move in that order (drawn
    together: the same stream as one move at a time); a move is accepted if the disk keeps the
    gap to all others (and, once ρ = r, to the cell edges)."""
    n, dim = centres.shape
    for _ in range(max_sweeps):
        pair = _closest_pair(centres)
        rho = min(r, (pair - gap) / 2)
        if rho >= r and _edge_ok(centres, r, gap):
            return centres
        step = max(0.5 * (r - rho), 0.05 * r)
        order = rng.permutation(n)
        moves = rng.normal(0.0, step, (n, dim))
        for i, move in zip(order, moves, strict=True):
            trial = np.mod(centres[i] + move, 1.0)
            far = _distances(trial, centres)
            far[i] = np.inf  # the disk itself
            if far.min() >= 2 * rho + gap - 1e-12 and (rho < r or _edge_ok(trial, r, gap)):
                centres[i] = trial
    return None


def _closest_pair(centres: np.ndarray) -> float:
    """Smallest periodic centre distance between two of the points centres (n, d); ∞ if n < 2."""
    d = centres[None] - centres[:, None]  # [i, j]: centres[j] − centres[i]
    d -= np.round(d)
    far = functools.reduce(np.hypot, np.moveaxis(d, -1, 0))
    np.fill_diagonal(far, np.inf)
    return float(far.min(initial=np.inf))


def _distances(c: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Periodic distances from point c (d,) to points others (m, d)."""
    d = others - c
    d -= np.rint(d)  # np.round to 0 decimals, without its wrapper
    return functools.reduce(np.hypot, d.T)


def _edge_ok(c: np.ndarray, r: float, gap: float) -> bool:
    """Whether fibres (spheres) at c (d,) or (n, d) all stay at least gap/2 away from being
    tangent to a cell edge (face)."""
    edge = np.minimum(c, 1.0 - c)
    return bool(np.all(np.abs(edge - r) >= gap / 2))


