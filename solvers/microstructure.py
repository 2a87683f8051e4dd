"""Periodic 2D unit cells of a fibre composite: geometry, gmsh meshes and pixel images.

The unit cell is Y = [0, 1)² (lengths in units of the cell size). Phase 1 is the matrix, phase 2
the fibres. A :class:`Microstructure` gives

- a conforming triangle mesh with periodic boundary nodes and phase tags
  (:meth:`Microstructure.mesh`),
  which the periodic RVE solver uses, and
- a pixel image of the fibre fraction at any resolution (:meth:`Microstructure.image`), which is
  what the neural operator sees.

Constructors: :func:`single_fibre`, :func:`random_fibres` (random non-overlapping periodic
arrangement), :func:`fibre_chain` (fibres lined up across the cell with random, possibly small
gaps: nearly percolating stiff columns, which random addition almost never draws) and
:func:`laminate` (layers normal to x, whose effective response is known exactly).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from neuroscale_couple.errors import InputError

if TYPE_CHECKING:
    from mpi4py import MPI

MATRIX = 1
FIBRE = 2
KINDS = ("single_fibre", "random_fibres", "fibre_chain", "laminate")


@dataclass(frozen=True)
class Microstructure:
    """A periodic unit cell [0, 1)² of matrix with circular fibres, or a two-phase laminate.

    Attributes
    ----------
    kind : one of ``KINDS``.
    volume_fraction : fibre area fraction v in (0, 1).
    centres : (N, 2) fibre centres in [0, 1)² (empty for a laminate).
    radius : fibre radius (0 for a laminate).
    seed : random seed the arrangement was drawn with (None when deterministic).
    """

    kind: str
    volume_fraction: float
    centres: np.ndarray
    radius: float
    seed: int | None = None

    @property
    def n_fibres(self) -> int:
        return len(self.centres)

    @property
    def key(self) -> str:
        """A short digest identifying the geometry (equal cells share one RVE in a cache)."""
        h = hashlib.sha1(f"{self.kind}|{self.volume_fraction!r}|{self.radius!r}".encode())
        h.update(np.ascontiguousarray(self.centres, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    @staticmethod
    def arrays(structures: list[Microstructure], resolution: int) -> dict[str, np.ndarray]:
        """Per-microstructure arrays of a data set (see :mod:`neuroscale_couple.store`)."""
        n_max = max(1, max(s.n_fibres for s in structures))
        centres = np.full((len(structures), n_max, 2), np.nan)
        for i, s in enumerate(structures):
            centres[i, : s.n_fibres] = s.centres
        return {
            "volume_fraction": np.array([s.volume_fraction for s in structures]),
            "n_fibres": np.array([s.n_fibres for s in structures]),
            "seed": np.array([-1 if s.seed is None else s.seed for s in structures]),
            "radius": np.array([s.radius for s in structures]),
            "centres": centres,
            "image": np.stack([s.image(resolution) for s in structures]).astype(np.float32),
        }

    def image(self, resolution: int, supersample: int = 4) -> np.ndarray:
        """Fibre fraction per pixel, shape (resolution, resolution), values in [0, 1].

        Pixel ``[i, j]`` covers x ∈ [j, j+1)/n, y ∈ [i, i+1)/n (row index is y). Each pixel is
        sampled at ``supersample``² points, so the image's mean approaches the volume fraction.
        """
        if resolution < 1 or supersample < 1:
            raise InputError(
                f"image resolution={resolution}, supersample={supersample}: both must be ≥ 1"
            )
        m = resolution * supersample
        inside = self._fibre_mask((np.arange(m) + 0.5) / m)
        return inside.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))

    def _fibre_mask(self, s: np.ndarray) -> np.ndarray:
        """Boolean mask (m, m) of the grid points (x, y) = (s[j], s[i]) lying in the fibre
        phase (row index is y); distances are separable, so no (m, m, 2) array is formed."""
        if self.kind == "laminate":
            return np.broadcast_to(np.mod(s, 1.0) < self.volume_fraction, (len(s), len(s)))
        inside = np.zeros((len(s), len(s)), dtype=bool)
        for cx, cy in self.centres:
            dx, dy = s - cx, s - cy
            dx -= np.round(dx)  # nearest periodic image
            dy -= np.round(dy)
            inside |= dy[:, None] ** 2 + dx[None, :] ** 2 < self.radius**2
        return inside

    def mesh(self, comm: MPI.Comm, size: float, order: int = 1):
        """Mesh the cell with gmsh; returns DOLFINx ``MeshData`` (``.mesh``, ``.cell_tags``).

        Parameters
        ----------
        comm : communicator the mesh is distributed over (``MPI.COMM_SELF`` for a serial RVE).
        size : target element size, in units of the cell length (e.g. 0.02).
        order : geometric order of the cells; 2 gives curved fibre boundaries (use with P2).

        Cell tags are ``MATRIX`` (1) and ``FIBRE`` (2); nodes on x = 1 (y = 1) are exact periodic
        images of nodes on x = 0 (y = 0). On one process (``comm.size == 1``, the solver cache's
        RVEs) a cell meshed before is read back from its .msh file (:data:`MESH_FILES`) instead
        of meshed again, the first time as well: the same mesh, bit for bit, however often an
        RVE is rebuilt.
        """
        import gmsh
        from dolfinx.io import gmsh as gmshio

        if not 0.0 < size < 0.5:
            raise InputError(f"mesh size={size}: must lie in (0, 0.5) cell lengths, e.g. 0.02")
        rank = 0
        started = not gmsh.isInitialized()
        if comm.rank == rank:
            if started:
                gmsh.initialize(interruptible=False)
            gmsh.option.setNumber("General.Terminal", 0)
            gmsh.model.add("rve")
            try:
                key = (self.key, float(size), int(order))
                if comm.size > 1:  # the solver cache's serial RVEs are the ones rebuilt
                    _build_gmsh_model(self, size, order)
                elif not MESH_FILES.read(key):
                    _build_gmsh_model(self, size, order)
                    if MESH_FILES.write(key):  # first use as every later one: from the file
                        gmsh.model.remove()
                        gmsh.model.add("rve")
                        MESH_FILES.read(key)
            except Exception:
                gmsh.model.remove()
                if started:
                    gmsh.finalize()
                raise
        try:
            return gmshio.model_to_mesh(gmsh.model, comm, rank, gdim=2)
        finally:
            if comm.rank == rank:
                gmsh.model.remove()
                if started:
                    gmsh.finalize()


class MeshFiles:
    """gmsh meshes made in this process, kept as binary .msh files in a private temporary folder
    (removed at exit) up to ``budget`` bytes; once it is spent, further meshes are not kept —
    a cyclic sweep over more cells than fit (classic FE²) then still finds the kept ones,
    where dropping the least recently used would find none.

    Meshing is most of the cost of building an RVE (0.08 of 0.1 s at size 0.02); a solver cache
    that evicts RVEs rebuilds them, and reading the file is several times cheaper. The file
    holds the nodes and elements with their numbering, so the rebuilt mesh is the same and
    warm-start states stored with the old RVE fit the new one. (Read back, periodic image nodes
    sat exactly on their masters' images where gmsh's own mesh had some an ulp off; so the first
    build reads the file too.)
    """

    def __init__(self, budget: int = 256 * 2**20) -> None:
        self.budget, self.used = budget, 0
        self._files: dict[tuple, Path] = {}
        self._folder: Path | None = None

    def read(self, key: tuple) -> bool:
        """Merge the mesh of ``key`` into the current gmsh model; False if there is none."""
        import gmsh

        path = self._files.get(key)
        if path is None:
            return False
        # the nodes as written (DOLFINx does not use gmsh's periodic maps)
        before = gmsh.option.getNumber("Mesh.IgnorePeriodicity")
        gmsh.option.setNumber("Mesh.IgnorePeriodicity", 1)
        try:
            gmsh.merge(str(path))
        finally:
            gmsh.option.setNumber("Mesh.IgnorePeriodicity", before)
        return True

    def write(self, key: tuple) -> bool:
        """Keep the current gmsh model's mesh as the mesh of ``key``; False once the budget is
        spent (nothing kept)."""
        import gmsh

        if self.used >= self.budget:
            return False
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="neuroscale-meshes-"))
            weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        path = self._folder / f"{key[0]}-{key[1]!r}-{key[2]}.msh"
        options = {"Mesh.Binary": 1, "Mesh.SaveAll": 1}  # exact coordinates, every element
        before = {name: gmsh.option.getNumber(name) for name in options}
        try:
            for name, value in options.items():
                gmsh.option.setNumber(name, value)
            gmsh.write(str(path))
        finally:
            for name, value in before.items():
                gmsh.option.setNumber(name, value)
        self._files[key] = path
        self.used += path.stat().st_size
        return True


MESH_FILES = MeshFiles()


def single_fibre(volume_fraction: float, *, min_gap: float = 0.02) -> Microstructure:
    """One fibre of area fraction v centred in the cell (a square fibre array)."""
    _check_fraction(volume_fraction)
    r = float(np.sqrt(volume_fraction / np.pi))
    if 2 * r + min_gap > 1.0:
        vmax = np.pi * ((1.0 - min_gap) / 2) ** 2
        raise InputError(
            f"volume_fraction={volume_fraction} leaves the fibre less than min_gap={min_gap} from "
            f"its periodic image; use volume_fraction ≤ {vmax:.3f}"
        )
    return Microstructure("single_fibre", float(volume_fraction), np.array([[0.5, 0.5]]), r)


def random_fibres(
    volume_fraction: float,
    n_fibres: int,
    seed: int,
    *,
    min_gap: float = 0.02,
    max_sweeps: int = 20000,
) -> Microstructure:
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
    return Microstructure("random_fibres", float(volume_fraction), centres, r, seed)


def fibre_chain(volume_fraction: float, n_fibres: int, seed: int, *, min_gap: float = 0.02,
                misalignment: float = 0.0, attempts: int = 1000) -> Microstructure:
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
        if (all(_edge_ok(c, r, min_gap) for c in centres)
                and _closest_pair(centres) >= 2 * r + min_gap - 1e-12):
            return Microstructure("fibre_chain", float(volume_fraction), centres, r, seed)
    raise InputError(
        f"could not place a chain of {n_fibres} fibres of volume_fraction={volume_fraction} "
        f"clear of the cell edges (seed={seed}, misalignment={misalignment}): lower "
        "volume_fraction or misalignment"
    )


def laminate(volume_fraction: float) -> Microstructure:
    """Two layers normal to x: fibre phase for 0 ≤ x < v, matrix for v ≤ x < 1."""
    _check_fraction(volume_fraction)
    return Microstructure("laminate", float(volume_fraction), np.zeros((0, 2)), 0.0)


def from_config(cfg: dict, *, seed: int | None = None) -> Microstructure:
    """Build a microstructure from a config mapping.

    Keys: ``kind`` (``single_fibre|random_fibres|fibre_chain|laminate``), ``volume_fraction``,
    and for random arrangements ``n_fibres``, ``seed`` (overridden by the ``seed`` argument),
    ``min_gap``, for a chain also ``misalignment``.
    """
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise InputError(f"microstructure.kind={kind!r}: must be one of {', '.join(KINDS)}")
    if "volume_fraction" not in cfg:
        raise InputError("microstructure.volume_fraction is missing: give a value in (0, 1)")
    v = float(cfg["volume_fraction"])
    gap = float(cfg.get("min_gap", 0.02))
    if kind == "single_fibre":
        return single_fibre(v, min_gap=gap)
    if kind == "laminate":
        return laminate(v)
    s = int(cfg.get("seed", 0) if seed is None else seed)
    if kind == "fibre_chain":
        return fibre_chain(v, int(cfg.get("n_fibres", 2)), s, min_gap=gap,
                           misalignment=float(cfg.get("misalignment", 0.0)))
    return random_fibres(v, int(cfg.get("n_fibres", 1)), s, min_gap=gap)


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
                         attempts: int = 5000) -> np.ndarray | None:
    """Random sequential addition at radius r; None if some fibre finds no place."""
    centres = np.empty((0, 2))
    for _ in range(n):
        for _ in range(attempts):
            c = rng.random(2)
            if _edge_ok(c, r, gap) and np.all(_distances(c, centres) >= 2 * r + gap):
                centres = np.vstack([centres, c])
                break
        else:
            return None
    return centres


def _compress(centres: np.ndarray, r: float, gap: float, rng: np.random.Generator,
              max_sweeps: int) -> np.ndarray | None:
    """Hard-disk Monte Carlo, the radius ρ grown to min(r, largest admissible) after each sweep."""
    n = len(centres)
    for _ in range(max_sweeps):
        pair = _closest_pair(centres)
        rho = min(r, (pair - gap) / 2)
        if rho >= r and all(_edge_ok(c, r, gap) for c in centres):
            return centres
        step = max(0.5 * (r - rho), 0.05 * r)
        for i in rng.permutation(n):
            trial = np.mod(centres[i] + rng.normal(0.0, step, 2), 1.0)
            others = np.delete(centres, i, 0)
            if np.all(_distances(trial, others) >= 2 * rho + gap - 1e-12) and (
                    rho < r or _edge_ok(trial, r, gap)):
                centres[i] = trial
    return None


def _closest_pair(centres: np.ndarray) -> float:
    """Smallest periodic centre distance between two of the points centres (n, 2); ∞ if n < 2."""
    return min((_distances(c, np.delete(centres, i, 0)).min(initial=np.inf)
                for i, c in enumerate(centres)), default=np.inf)


def _distances(c: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Periodic distances from point c (2,) to points others (m, 2)."""
    d = others - c
    d -= np.round(d)
    return np.hypot(d[:, 0], d[:, 1])


def _edge_ok(c: np.ndarray, r: float, gap: float) -> bool:
    """Whether a fibre at c stays at least gap/2 away from being tangent to a cell edge."""
    edge = np.minimum(c, 1.0 - c)
    return bool(np.all(np.abs(edge - r) >= gap / 2))


def _build_gmsh_model(ms: Microstructure, size: float, order: int) -> None:
    """Create the current gmsh model's geometry, physical groups, periodicity and mesh."""
    import gmsh

    occ = gmsh.model.occ
    if ms.kind == "laminate":
        layers = [(2, occ.addRectangle(0, 0, 0, ms.volume_fraction, 1)),
                  (2, occ.addRectangle(ms.volume_fraction, 0, 0, 1 - ms.volume_fraction, 1))]
        _, children = occ.fragment(layers[:1], layers[1:])
        fibre = [t for _, t in children[0]]
    else:
        cell = occ.addRectangle(0, 0, 0, 1, 1)
        disks = []
        for c in ms.centres:
            for sx in (-1, 0, 1):
                for sy in (-1, 0, 1):
                    x, y = c[0] + sx, c[1] + sy
                    if -ms.radius < x < 1 + ms.radius and -ms.radius < y < 1 + ms.radius:
                        disks.append((2, occ.addDisk(x, y, 0, ms.radius, ms.radius)))
        clip = occ.addRectangle(0, 0, 0, 1, 1)
        pieces, _ = occ.intersect(disks, [(2, clip)])
        _, children = occ.fragment([(2, cell)], pieces)
        fibre = sorted({t for child in children[1:] for _, t in child})
    occ.synchronize()
    everything = [t for _, t in gmsh.model.getEntities(2)]
    matrix = [t for t in everything if t not in fibre]
    gmsh.model.addPhysicalGroup(2, matrix, MATRIX, name="matrix")
    gmsh.model.addPhysicalGroup(2, fibre, FIBRE, name="fibre")
    _set_periodic(axis=0)
    _set_periodic(axis=1)
    gmsh.option.setNumber("Mesh.MeshSizeMax", size)
    gmsh.option.setNumber("Mesh.MeshSizeMin", 0.25 * size)
    gmsh.option.setNumber("Mesh.MeshSizeFromCurvature", 12)
    gmsh.option.setNumber("Mesh.Algorithm", 6)
    gmsh.model.mesh.generate(2)
    if order > 1:
        gmsh.model.mesh.setOrder(order)


def _set_periodic(axis: int) -> None:
    """Declare curves on the far cell edge (x=1 or y=1) periodic images of those on the near one."""
    import gmsh

    eps = 1e-7

    def edge_curves(value: float) -> dict[tuple, int]:
        lo = [-eps, -eps, -eps]
        hi = [1 + eps, 1 + eps, eps]
        lo[axis], hi[axis] = value - eps, value + eps
        curves = gmsh.model.getEntitiesInBoundingBox(*lo, *hi, dim=1)
        out = {}
        for _, tag in curves:
            box = np.array(gmsh.model.getBoundingBox(1, tag))
            key = tuple(np.round(np.delete(box, [axis, axis + 3]), 6))
            out[key] = tag
        return out

    near, far = edge_curves(0.0), edge_curves(1.0)
    if near.keys() != far.keys():
        raise RuntimeError("gmsh produced non-matching boundary curves; report this microstructure")
    shift = [0.0, 0.0, 0.0]
    shift[axis] = 1.0
    affine = [1, 0, 0, shift[0], 0, 1, 0, shift[1], 0, 0, 1, shift[2], 0, 0, 0, 1]
    keys = sorted(near)
    gmsh.model.mesh.setPeriodic(1, [far[k] for k in keys], [near[k] for k in keys], affine)
