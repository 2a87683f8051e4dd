"""The base of periodic two-phase unit cells, 2D and 3D: pixel (voxel) images, gmsh meshes, and
the :class:`~neuroscale_couple.structures.Structure` protocol for every cell family.

The unit cell is Y = [0, 1)^d, d = :attr:`PhaseCell.dim` (2: plane strain, 3: solid), lengths in
units of the cell size. Phase 1 is the matrix, phase 2 the inclusions (fibres, spheres). A
:class:`PhaseCell` gives

- a conforming triangle (d = 2) or tetrahedron (d = 3) mesh with periodic boundary nodes and
  phase tags (:meth:`PhaseCell.mesh`), which the periodic RVE solver uses,
- a pixel (voxel) image of the fibre fraction at any resolution (:meth:`PhaseCell.image`), which
  is what the neural operator (SANO) sees,

and the rest of the protocol: images as stored arrays and operator inputs, draws of a generate
group, the two-phase material (law, matrix, fibre) of its config, the RVE as fine solver.
A family of cells (e.g. :class:`~neuroscale_couple.solvers.microstructure.FibreCell`, the 3D
families of :mod:`~neuroscale_couple.solvers.cells3d`) subclasses it with its ``dim`` and
geometry (:meth:`PhaseCell._fibre_mask`, :meth:`PhaseCell._gmsh_fibres`), ``key``, ``kinds``,
``config_schema`` and ``from_config``, decorated with
:func:`~neuroscale_couple.structures.register`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import shutil
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from neuroscale_couple.errors import InputError
from neuroscale_couple.materials import DEFAULT_LAW, TwoPhaseMaterial, check_law
from neuroscale_couple.phases import (
    PHASE_ARRAYS,
    PhaseRanges,
    cell_material,
    descriptors,
    material_arrays,
)
from neuroscale_couple.sampling import draw_parameter, rng_for
from neuroscale_couple.structures import settings

if TYPE_CHECKING:
    from mpi4py import MPI

    import torch

    from neuroscale_couple.solvers.rve_fenicsx import PeriodicRVE
    from neuroscale_couple.training import TrainingData

MATRIX = 1
FIBRE = 2
#: The keys of an RVE's config mapping that
#: :func:`~neuroscale_couple.solvers.rve_fenicsx.rve_from_config` reads.
RVE_CONFIG_KEYS = ("law", "matrix", "fibre", "mesh", "bc", "petsc_options")


class PhaseCell(ABC):
    """A periodic two-phase unit cell [0, 1)^d, seen by the operator as its fibre-fraction image
    and solved by the periodic RVE (see the module docstring).

    Subclasses set ``kinds`` and ``config_schema``, implement :meth:`from_config`, ``key``,
    :meth:`_fibre_mask` and :meth:`_gmsh_fibres`, and have the attributes ``kind`` and
    ``volume_fraction``; those that store more than the image and the fibre fraction override
    :meth:`arrays`.
    """

    kinds: ClassVar[tuple[str, ...]]
    dim: ClassVar[int] = 2
    """Space dimension d of the cell: 2 (plane strain, F̄ 2×2) or 3 (F̄ 3×3)."""
    config_schema: ClassVar[dict[str, Any]] = {"count": 1, "seed": 0}
    """Keys every cell family accepts: ``count`` (cells of a generate group) and ``seed`` (the
    group's draws); a family adds its own (``{**PhaseCell.config_schema, ...}``)."""
    material_keys: ClassVar[tuple[str, ...]] = (*RVE_CONFIG_KEYS, "phase_seed")
    """The RVE's keys: law, phases, mesh, boundary conditions, PETSc options; and the seed of
    phases drawn per cell (:mod:`neuroscale_couple.phases`)."""
    drawn: ClassVar[dict[str, bool]] = {"volume_fraction": False}
    """Keys a generate group may give as a range [low, high], drawn per cell in this order
    (value: whether the draw is an integer)."""
    default_load_radius: ClassVar[float] = 0.15
    hold_out_structures: ClassVar[bool] = True
    descriptor_keys: ClassVar[tuple[str, ...]] = ("volume_fraction",)
    kind: str
    volume_fraction: float

    @property
    @abstractmethod
    def key(self) -> Hashable:
        """A short digest identifying the geometry (equal cells share one RVE in a cache)."""

    @property
    def noisy(self) -> bool:
        """RVE solves are static: no statistical error."""
        return False

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: dict, *, seed: int | None = None) -> PhaseCell:
        """One cell from its config mapping; ``seed`` overrides the mapping's."""

    @abstractmethod
    def _fibre_mask(self, s: np.ndarray) -> np.ndarray:
        """Boolean mask (m,)*d of the grid points lying in the fibre phase: in 2D [i, j] is
        (x, y) = (s[j], s[i]) (row index is y), in 3D [k, i, j] is (s[j], s[i], s[k])."""

    @abstractmethod
    def _gmsh_fibres(self) -> list[int]:
        """Create the cell's geometry in the current gmsh OCC model: the unit square (cube) cut
        into its phases (fragmented, so that the phases share their boundary; see
        :func:`fragment_cell`); return the tags of the fibre-phase surfaces (volumes)."""

    # ------------------------------------------------------------------ geometry
    def image(self, resolution: int, supersample: int = 4) -> np.ndarray:
        """Fibre fraction per pixel, shape (resolution,)*d, values in [0, 1].

        Pixel ``[i, j]`` covers x ∈ [j, j+1)/n, y ∈ [i, i+1)/n (row index is y); voxel
        ``[k, i, j]`` also z ∈ [k, k+1)/n. Each pixel is sampled at ``supersample``^d points,
        so the image's mean approaches the volume fraction.
        """
        if resolution < 1 or supersample < 1:
            raise InputError(
                f"image resolution={resolution}, supersample={supersample}: both must be ≥ 1"
            )
        m = resolution * supersample
        inside = self._fibre_mask((np.arange(m) + 0.5) / m)
        d = self.dim
        return inside.reshape((resolution, supersample) * d).mean(axis=tuple(range(1, 2 * d, 2)))

    @classmethod
    def images(cls, cells: Sequence[PhaseCell], resolution: int, supersample: int = 4
               ) -> np.ndarray:
        """Images (M, resolution, ...) of M cells of this class, each equal to its
        :meth:`image`; a family with a faster batched rendering overrides this."""
        return np.stack([c.image(resolution, supersample) for c in cells])

    def mesh(self, comm: MPI.Comm, size: float, order: int = 1):
        """Mesh the cell with gmsh; returns DOLFINx ``MeshData`` (``.mesh``, ``.cell_tags``).

        Parameters
        ----------
        comm : communicator the mesh is distributed over (``MPI.COMM_SELF`` for a serial RVE).
        size : target element size, in units of the cell length (e.g. 0.02 in 2D, 0.1 in 3D).
        order : geometric order of the cells; 2 gives curved fibre boundaries (use with P2).

        Triangles in 2D, tetrahedra in 3D. Cell tags are ``MATRIX`` (1) and ``FIBRE`` (2); nodes
        on x = 1 (y = 1, z = 1) are exact periodic images of nodes on x = 0 (y = 0, z = 0): gmsh
        meshes the far edges (faces) as copies of the near ones (``setPeriodic``). On one
        process (``comm.size == 1``, the solver cache's RVEs) a cell meshed before is read
        back from its .msh file (:data:`MESH_FILES`) instead of meshed again, the first time
        as well: the same mesh, bit for bit, however often an RVE is rebuilt.
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
            return gmshio.model_to_mesh(gmsh.model, comm, rank, gdim=self.dim)
        finally:
            if comm.rank == rank:
                gmsh.model.remove()
                if started:
                    gmsh.finalize()


    # ------------------------------------------------------------------ Structure protocol
    @classmethod
    def resolve(cls, group: dict) -> dict:
        """Nothing to fill in: a cell is its config."""
        return group

    @classmethod
    def plan(cls, group: dict, name: str) -> list[PhaseCell]:
        """``count`` cells of a generate group; cell m draws the ranges of :attr:`drawn` and its
        arrangement seed from the stream (``seed``, m)."""
        opts = settings(cls, group)
        count, seed = int(opts["count"]), int(opts["seed"])
        if count < 1:
            raise InputError(f"{name}.count={count}: must be ≥ 1")
        cells = []
        for m in range(count):
            rng = rng_for(seed, m)
            cfg = {k: v for k, v in group.items() if k != "loads"}
            for key, integer in cls.drawn.items():
                if key in group:
                    cfg[key] = draw_parameter(group[key], rng, f"{name}.{key}", integer=integer)
            cells.append(cls.from_config(cfg, seed=int(rng.integers(2**31))))
        return cells

    @classmethod
    def arrays(cls, structures: Sequence[PhaseCell], resolution: int | None
               ) -> dict[str, np.ndarray]:
        """``volume_fraction`` (M,) and ``image`` (M, r, ...) float32 (r^d pixels), the fibre
        fraction per pixel (row index = y) at ``resolution`` r."""
        return {"volume_fraction": np.array([s.volume_fraction for s in structures]),
                "image": cell_images(structures, resolution)}

    @classmethod
    def operator_inputs(cls, micro: dict[str, np.ndarray], resolution: int | None,
                        dtype: torch.dtype, source: str) -> torch.Tensor:
        """Images (M, 1, n, ...) (n^d pixels) at the model's resolution n: the stored ``image``
        average-pooled (its resolution must be a multiple of n); cells with drawn phases add
        three constant channels (M, 4, n, ...), their
        :data:`~neuroscale_couple.phases.DESCRIPTORS`."""
        import torch
        from torch.nn import functional as F

        if resolution is None:
            raise InputError(f"{source} holds cell images: give the model resolution")
        images = torch.as_tensor(micro["image"], dtype=dtype)[:, None]
        n = images.shape[-1]
        if n % resolution:
            raise InputError(f"{source}: image_resolution {n} is not a multiple of the model "
                             f"resolution {resolution}; regenerate with image_resolution = "
                             f"k·{resolution}")
        dim = images.ndim - 2
        pool = getattr(F, f"avg_pool{dim}d")
        images = pool(images, n // resolution) if n != resolution else images
        if not all(k in micro for k in PHASE_ARRAYS):
            return images
        d = torch.as_tensor(np.stack(list(descriptors(micro).values()), axis=1), dtype=dtype)
        d = d.reshape(*d.shape, *(1,) * dim).expand(-1, -1, *(resolution,) * dim)
        return torch.cat([images, d], dim=1)

    @classmethod
    def stress_units(cls, micro: dict[str, np.ndarray]) -> np.ndarray | None:
        """Each cell's matrix modulus E_m (M,), the unit a family operator learns stresses in
        (:mod:`neuroscale_couple.phases`); None for cells of one material."""
        return micro.get("matrix_E")

    @classmethod
    def with_material(cls, micro: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
        """``micro`` with phase arrays: its own (drawn per cell), else those of the one
        material of ``config`` (a data set of one material fed to a family operator)."""
        if all(k in micro for k in PHASE_ARRAYS):
            return micro
        return {**micro, **material_arrays(TwoPhaseMaterial.from_config(config),
                                           len(micro["image"]))}

    @classmethod
    def materials(cls, config: dict, count: int) -> tuple[dict[str, np.ndarray], list[dict]]:
        """The phases of ``count`` cells of a generate config: the arrays to store
        (:data:`~neuroscale_couple.phases.PHASE_ARRAYS`, none for one material) and each
        cell's material config (its fine solver's)."""
        ranges = PhaseRanges.from_config(config)
        if ranges is None:
            return {}, [config] * count
        phases = ranges.draw(count)
        return phases, [cell_material(config, phases, m) for m in range(count)]

    @classmethod
    def family_config(cls, config: dict) -> dict:
        """Every key but ``microstructure`` and ``loads`` (law, phases, mesh, bc, resolutions);
        the phases (numbers or ranges, :mod:`neuroscale_couple.phases`) and law are checked."""
        if PhaseRanges.from_config(config) is None:
            TwoPhaseMaterial.from_config(config)
        else:
            check_law(config.get("law", DEFAULT_LAW))
        return {k: v for k, v in config.items() if k not in ("microstructure", "loads")}

    @classmethod
    def new_operator(cls, model_config: dict, data: TrainingData) -> tuple[Any, dict]:
        """A :class:`~neuroscale_couple.operators.sano.SANO` of the cells' dimension
        (``dim``; set here, a ``model.dim`` that differs is refused) with the data's law and
        phases, or, for data whose cells drew their phases, a family SANO over their ranges."""
        from neuroscale_couple.operators.sano import SANO, SANOConfig

        if model_config.get("dim", cls.dim) != cls.dim:
            raise InputError(f"model.dim={model_config['dim']!r} but the data hold {cls.dim}D "
                             f"cells: remove model.dim (it is taken from the data)")
        model_config = dict(model_config, dim=cls.dim) if cls.dim != 2 else model_config
        ranges = PhaseRanges.from_config(data.config)
        if ranges is not None:
            law = check_law(data.config.get("law", DEFAULT_LAW))
            mcfg = dict(model_config, law=law, phase_ranges=ranges.descriptor_ranges())
            return SANO(SANOConfig.from_dict(mcfg)), mcfg
        m = TwoPhaseMaterial.from_config(data.config)
        mcfg = dict(model_config, law=m.law, matrix=(m.matrix.E, m.matrix.nu),
                    fibre=(m.fibre.E, m.fibre.nu))
        return SANO(SANOConfig.from_dict(mcfg)), mcfg

    def fine_solver(self, material: dict, comm: MPI.Comm | None = None) -> PeriodicRVE:
        """The periodic RVE of this cell with the RVE keys of ``material`` (``law``, ``matrix``,
        ``fibre``, ``mesh``, ``bc``, ``petsc_options``; see
        :func:`~neuroscale_couple.solvers.rve_fenicsx.rve_from_config`)."""
        from mpi4py import MPI

        from neuroscale_couple.solvers.rve_fenicsx import rve_from_config

        return rve_from_config(material, self, MPI.COMM_SELF if comm is None else comm)


@dataclass(frozen=True)
class InclusionCell(PhaseCell):
    """A cell of N equal inclusions of one radius in the matrix: disks (2D fibres) or spheres.

    Attributes
    ----------
    kind : the generator that made it (one of the family's ``kinds``).
    volume_fraction : inclusion area (volume) fraction v in (0, 1).
    centres : (N, d) inclusion centres in [0, 1)^d.
    radius : inclusion radius, cell lengths.
    seed : random seed the arrangement was drawn with (None when deterministic).
    """

    kind: str
    volume_fraction: float
    centres: np.ndarray
    radius: float
    seed: int | None = None

    @functools.cached_property
    def key(self) -> str:
        """A short digest identifying the geometry (equal cells share one RVE in a cache);
        computed once per cell (a coupled run asks for it per point several times)."""
        return self._digest()

    def _digest(self) -> str:
        """The digest of :attr:`key`: kind, fraction, radius and centres."""
        h = hashlib.sha1(f"{self.kind}|{self.volume_fraction!r}|{self.radius!r}".encode())
        h.update(np.ascontiguousarray(self.centres, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]



def inclusion_arrays(structures: Sequence[InclusionCell], resolution: int | None,
                     count_key: str) -> dict[str, np.ndarray]:
    """The stored arrays of inclusion cells of one dimension d: ``volume_fraction``, the
    count (named ``count_key``: ``n_fibres``, ``n_spheres``), ``seed`` (−1: none), ``radius``
    (M,), ``centres`` (M, N_max, d) NaN-padded and ``image`` (M, r, ...) float32."""
    image = cell_images(structures, resolution)  # refuses cells of mixed dimensions
    n_max = max(1, max(len(s.centres) for s in structures))
    centres = np.full((len(structures), n_max, structures[0].dim), np.nan)
    for i, s in enumerate(structures):
        centres[i, : len(s.centres)] = s.centres
    return {
        "volume_fraction": np.array([s.volume_fraction for s in structures]),
        count_key: np.array([len(s.centres) for s in structures]),
        "seed": np.array([-1 if s.seed is None else s.seed for s in structures]),
        "radius": np.array([s.radius for s in structures]),
        "centres": centres,
        "image": image,
    }


def cell_images(structures: Sequence[PhaseCell], resolution: int | None) -> np.ndarray:
    """(M, r, ...) float32 images (r^d pixels) of cells of one dimension d at ``resolution`` r
    (the ``image`` array of a data set)."""
    if resolution is None:
        raise InputError("cell images need a resolution: give image_resolution, e.g. 64")
    dims = {s.dim for s in structures}
    if len(dims) > 1:
        raise InputError("2D and 3D cells in one data set: keep each dimension in its own "
                         "data set and model")
    dim = dims.pop() if dims else 2
    out = np.empty((len(structures), *(resolution,) * dim), dtype=np.float32)
    groups: dict[type, list[int]] = {}
    for i, s in enumerate(structures):
        groups.setdefault(type(s), []).append(i)
    for cls, idx in groups.items():  # each family renders its cells as one batch
        out[idx] = cls.images([structures[i] for i in idx], resolution)
    return out



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


def _build_gmsh_model(ms: PhaseCell, size: float, order: int) -> None:
    """Create the current gmsh model's geometry, physical groups, periodicity and mesh."""
    import gmsh

    d = ms.dim
    fibre = ms._gmsh_fibres()
    gmsh.model.occ.synchronize()
    everything = [t for _, t in gmsh.model.getEntities(d)]
    matrix = [t for t in everything if t not in fibre]
    gmsh.model.addPhysicalGroup(d, matrix, MATRIX, name="matrix")
    gmsh.model.addPhysicalGroup(d, fibre, FIBRE, name="fibre")
    for axis in range(d):
        _set_periodic(axis, d)
    gmsh.option.setNumber("Mesh.MeshSizeMax", size)
    gmsh.option.setNumber("Mesh.MeshSizeMin", 0.25 * size)
    gmsh.option.setNumber("Mesh.MeshSizeFromCurvature", 12)
    gmsh.option.setNumber("Mesh.Algorithm", 6)
    gmsh.model.mesh.generate(d)
    if order > 1:
        gmsh.model.mesh.setOrder(order)


def _set_periodic(axis: int, dim: int) -> None:
    """Declare the boundary entities (curves in 2D, surfaces in 3D) on the far cell side
    x_axis = 1 periodic images of those on the near side x_axis = 0."""
    import gmsh

    def side_entities(value: float) -> dict[tuple, int]:
        out = {}
        for _, tag in gmsh.model.getEntities(dim - 1):
            if _on_plane(dim - 1, tag, axis, value):  # known by the centre of mass on the side
                centre = np.array(gmsh.model.occ.getCenterOfMass(dim - 1, tag))
                out[tuple(np.round(np.delete(centre, axis), 6))] = tag
        return out

    near, far = side_entities(0.0), side_entities(1.0)
    if near.keys() != far.keys():
        raise RuntimeError("gmsh produced non-matching boundary entities; report this "
                           "microstructure")
    shift = [0.0, 0.0, 0.0]
    shift[axis] = 1.0
    affine = [1, 0, 0, shift[0], 0, 1, 0, shift[1], 0, 0, 1, shift[2], 0, 0, 0, 1]
    keys = sorted(near)
    gmsh.model.mesh.setPeriodic(dim - 1, [far[k] for k in keys], [near[k] for k in keys], affine)


def _on_plane(dim: int, tag: int, axis: int, value: float) -> bool:
    """Whether the gmsh entity (dim, tag) lies in the plane x_axis = value: its underlying
    curve or surface, sampled on a 5^dim grid of its parameter range, stays on it (OCC's
    bounding boxes are loose for curved and scaled shapes, so they cannot tell)."""
    import gmsh

    lo, hi = gmsh.model.getParametrizationBounds(dim, tag)
    grid = np.meshgrid(*(np.linspace(a, b, 5) for a, b in zip(lo, hi, strict=True)),
                       indexing="ij")
    points = gmsh.model.getValue(dim, tag, np.stack([g.ravel() for g in grid], axis=1).ravel())
    return bool(np.all(np.abs(np.reshape(points, (-1, 3))[:, axis] - value) < 1e-7))


def periodic_images(centre: np.ndarray, reach: float, axes: int | None = None
                    ) -> list[np.ndarray]:
    """The periodic images centre + s (s ∈ {−1, 0, 1}^k on the first k = ``axes`` coordinates,
    all by default) of an inclusion that reaches ``reach`` cell lengths from its centre and
    meets the open cell (−reach, 1 + reach)^k."""
    centre = np.asarray(centre, dtype=float)
    k = len(centre) if axes is None else axes
    images = []
    for shift in itertools.product((-1, 0, 1), repeat=k):
        x = centre.copy()
        x[:k] += shift
        if np.all((-reach < x[:k]) & (x[:k] < 1 + reach)):
            images.append(x)
    return images


def fragment_cell(dim: int, inclusions: Callable[[], list[tuple[int, int]]]) -> list[int]:
    """Cut the unit square (dim 2) or cube (dim 3) of the current gmsh OCC model by the shapes
    that ``inclusions()`` creates (OCC dim tags; they may reach beyond the cell): the shapes
    are clipped to the cell and fragmented with it, so the phases share their boundary.
    Returns the tags of the clipped inclusions (the fibre phase)."""
    import gmsh

    occ = gmsh.model.occ

    def unit_cell() -> int:
        return occ.addRectangle(0, 0, 0, 1, 1) if dim == 2 else occ.addBox(0, 0, 0, 1, 1, 1)

    cell = unit_cell()
    shapes = inclusions()
    clip = unit_cell()
    pieces, _ = occ.intersect(shapes, [(dim, clip)])
    _, children = occ.fragment([(dim, cell)], pieces)
    return sorted({t for child in children[1:] for _, t in child})
