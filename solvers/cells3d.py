"""3D periodic two-phase unit cells [0, 1)³, families of
:class:`~neuroscale_couple.solvers.phase_cell.PhaseCell` with ``dim = 3``: the periodic RVE
solves them with F̄ 3×3 (:class:`~neuroscale_couple.solvers.rve_fenicsx.PeriodicRVE`).

- :class:`SphereCell`: equal spheres in a matrix (particle composites). Kinds ``single_sphere``
  (one centred sphere: the simple-cubic array, :func:`single_sphere`) and ``random_spheres``
  (N spheres, non-overlapping with each other and their periodic images, a minimum gap,
  :func:`random_spheres`).
- :class:`EllipsoidCell`: kind ``random_ellipsoids``, N equal spheroids aligned with x₃ of
  aspect ratio c/a (``aspect_ratio``: > 1 short-fibre-like, < 1 platelets), placed at random
  (:func:`random_ellipsoids`).
- :class:`UDFibreCell`: kind ``ud_fibres``, unidirectional cylindrical fibres along x₃ through
  the cell; its cross-section (x₁, x₂) is a 2D
  :class:`~neuroscale_couple.solvers.microstructure.FibreCell` (``section``: ``single_fibre``,
  ``random_fibres`` or ``fibre_chain``), so a transverse F̄ (F̄₁₃ = F̄₂₃ = F̄₃₁ = F̄₃₂ = 0,
  F̄₃₃ = 1) gives the 2D plane-strain RVE of that section.

Config (``neuroscale rve`` / ``neuroscale generate``)::

    microstructure: {kind: random_spheres, volume_fraction: 0.2, n_spheres: 4, seed: 1}
    microstructure: {kind: ud_fibres, volume_fraction: 0.4, n_fibres: 3, section: random_fibres}
    mesh: {size: 0.1, degree: 1}      # 3D default: 0.1 (P1), 0.25 (P2)
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

from neuroscale_couple.errors import InputError
from neuroscale_couple.solvers.microstructure import (
    MIN_GAP,
    FibreCell,
    _check_fraction,
    _compress,
    _sequential_addition,
)
from neuroscale_couple.solvers.phase_cell import (
    InclusionCell,
    PhaseCell,
    fragment_cell,
    inclusion_arrays,
    periodic_images,
)
from neuroscale_couple.structures import REQUIRED, register, settings

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["DENSEST_PACKING", "EllipsoidCell", "SolidCell", "SphereCell", "UDFibreCell",
           "random_ellipsoids", "random_spheres", "single_sphere", "ud_fibres"]

DENSEST_PACKING = np.pi / np.sqrt(18.0)
"""Volume fraction of the densest packing of equal spheres (Kepler, ≈ 0.7405)."""


class SolidCell(PhaseCell):
    """Base of the 3D cell families: ``dim = 3`` (F̄ 3×3, tetrahedral meshes, voxel images,
    learnt by a 3D SANO)."""

    dim: ClassVar[int] = 3
    default_load_radius: ClassVar[float] = 0.1


@register
@dataclass(frozen=True)
class SphereCell(SolidCell, InclusionCell):
    """A periodic unit cube of matrix with N equal spheres (the attributes of
    :class:`InclusionCell`: ``kind`` ``single_sphere`` or ``random_spheres``, the volume
    fraction v = N·4πr³/3, the (N, 3) centres, the radius and the seed)."""

    kinds: ClassVar[tuple[str, ...]] = ("single_sphere", "random_spheres")
    config_schema: ClassVar[dict[str, Any]] = {
        **PhaseCell.config_schema, "volume_fraction": REQUIRED, "n_spheres": 1,
        "min_gap": MIN_GAP}
    drawn: ClassVar[dict[str, bool]] = {"volume_fraction": False, "n_spheres": True}
    descriptor_keys: ClassVar[tuple[str, ...]] = ("volume_fraction", "n_spheres")

    @property
    def n_spheres(self) -> int:
        return len(self.centres)

    @classmethod
    def arrays(cls, structures: Sequence[SphereCell], resolution: int | None
               ) -> dict[str, np.ndarray]:
        """``volume_fraction``, ``n_spheres``, ``seed`` (−1: none), ``radius`` (M,),
        ``centres`` (M, N_max, 3) NaN-padded and ``image`` (M, r, r, r) float32."""
        return inclusion_arrays(structures, resolution, "n_spheres")

    @classmethod
    def from_config(cls, cfg: dict, *, seed: int | None = None) -> SphereCell:
        """Keys: ``kind``, ``volume_fraction``, ``n_spheres`` (random_spheres), ``min_gap``,
        ``seed`` (overridden by the ``seed`` argument)."""
        o = settings(cls, cfg)
        v, gap = float(o["volume_fraction"]), float(o["min_gap"])
        if o["kind"] == "single_sphere":
            return single_sphere(v, min_gap=gap)
        return random_spheres(v, int(o["n_spheres"]), int(o["seed"] if seed is None else seed),
                              min_gap=gap)

    def _fibre_mask(self, s: np.ndarray) -> np.ndarray:
        """Mask (m, m, m), [k, i, j] = (x, y, z) = (s[j], s[i], s[k]); no (m³, 3) array."""
        inside = np.zeros((len(s),) * 3, dtype=bool)
        for centre in self.centres:
            dx, dy, dz = (s - c - np.round(s - c) for c in centre)  # nearest periodic image
            inside |= (dz[:, None, None] ** 2 + dy[None, :, None] ** 2
                       + dx[None, None, :] ** 2) < self.radius**2
        return inside

    def _gmsh_fibres(self) -> list[int]:
        """The spheres and their periodic images, clipped to the cube."""
        import gmsh

        r = self.radius
        return fragment_cell(3, lambda: [(3, gmsh.model.occ.addSphere(*x, r))
                                         for c in self.centres for x in periodic_images(c, r)])


def largest_sphere_fraction(n_spheres: int, min_gap: float) -> float:
    """An upper bound of the volume fraction of N equal spheres with a periodic gap
    ``min_gap``: each sphere clear of its own image (2r + gap ≤ 1), and the spheres grown by
    gap/2 no denser than the densest packing (:data:`DENSEST_PACKING`)."""
    own = (1.0 - min_gap) / 2
    packed = (3 * DENSEST_PACKING / (4 * np.pi * n_spheres)) ** (1 / 3) - min_gap / 2
    return float(n_spheres * 4 * np.pi / 3 * max(min(own, packed), 0.0) ** 3)


def _sphere_radius(volume_fraction: float, n_spheres: int, min_gap: float) -> float:
    """Checked radius of N equal spheres of total volume fraction v (v = N·4πr³/3)."""
    _check_fraction(volume_fraction)
    if int(n_spheres) != n_spheres or n_spheres < 1:
        raise InputError(f"n_spheres={n_spheres}: must be a positive integer")
    if not 0.0 <= min_gap < 0.5:
        raise InputError(f"min_gap={min_gap}: must lie in [0, 0.5) cell lengths, e.g. 0.02")
    vmax = largest_sphere_fraction(int(n_spheres), min_gap)
    if volume_fraction > vmax:
        raise InputError(
            f"{n_spheres} sphere(s) of volume_fraction={volume_fraction} cannot keep "
            f"min_gap={min_gap} from each other and their periodic images: the largest "
            f"feasible volume_fraction is {vmax:.3f}; lower it or min_gap")
    return float((3 * volume_fraction / (4 * np.pi * n_spheres)) ** (1 / 3))


def single_sphere(volume_fraction: float, *, min_gap: float = MIN_GAP) -> SphereCell:
    """One sphere of volume fraction v centred in the cube (the simple-cubic array)."""
    r = _sphere_radius(volume_fraction, 1, min_gap)
    return SphereCell("single_sphere", float(volume_fraction), np.array([[0.5, 0.5, 0.5]]), r)


def random_spheres(volume_fraction: float, n_spheres: int, seed: int, *,
                   min_gap: float = MIN_GAP, max_sweeps: int = 2000) -> SphereCell:
    """N equal spheres placed at random, non-overlapping across the periodic boundary.

    Random sequential addition (it jams near v ≈ 0.38 for many spheres); where it fails,
    hard-sphere Monte Carlo with the radius grown after each sweep (Lubachevsky–Stillinger).
    Spheres keep the gap ``min_gap`` to each other and their images, and their surfaces stay
    gap/2 from being tangent to a cell face (no sliver elements).

    Raises
    ------
    InputError
        If v ∉ (0, 1), N < 1, v exceeds :func:`largest_sphere_fraction` (the message names
        it), or no arrangement is found.
    """
    r = _sphere_radius(volume_fraction, n_spheres, min_gap)
    n = int(n_spheres)
    rng = np.random.default_rng(seed)
    centres = _sequential_addition(n, r, min_gap, rng, box=(1.0, 1.0, 1.0))
    if centres is None:
        centres = _compress(rng.random((n, 3)), r, min_gap, rng, max_sweeps)
    if centres is None:
        raise InputError(
            f"could not place {n} spheres of volume_fraction={volume_fraction} with "
            f"min_gap={min_gap} (seed={seed}; bound {largest_sphere_fraction(n, min_gap):.3f}, "
            "random placement jams well below it): lower volume_fraction or min_gap")
    return SphereCell("random_spheres", float(volume_fraction), centres, r, seed)


@register
@dataclass(frozen=True)
class EllipsoidCell(SolidCell, InclusionCell):
    """A periodic unit cube of matrix with N equal spheroids aligned with x₃ (kind
    ``random_ellipsoids``): semi-axes a, a (``radius``) and c = α·a (α = ``aspect_ratio``;
    α > 1 prolate, short-fibre-like; α < 1 oblate, platelet-like), volume fraction
    v = N·4πα a³/3; other attributes as :class:`InclusionCell`."""

    kinds: ClassVar[tuple[str, ...]] = ("random_ellipsoids",)
    config_schema: ClassVar[dict[str, Any]] = {
        **PhaseCell.config_schema, "volume_fraction": REQUIRED, "n_ellipsoids": 1,
        "aspect_ratio": 3.0, "min_gap": MIN_GAP}
    drawn: ClassVar[dict[str, bool]] = {"volume_fraction": False, "n_ellipsoids": True,
                                        "aspect_ratio": False}
    descriptor_keys: ClassVar[tuple[str, ...]] = ("volume_fraction", "n_ellipsoids",
                                                  "aspect_ratio")

    aspect_ratio: float = 1.0

    @property
    def n_ellipsoids(self) -> int:
        return len(self.centres)

    @functools.cached_property
    def key(self) -> str:
        """A short digest of the geometry (the inclusion cell's and the aspect ratio)."""
        return hashlib.sha1(f"{self._digest()}|{self.aspect_ratio!r}".encode()).hexdigest()[:16]

    @classmethod
    def arrays(cls, structures: Sequence[EllipsoidCell], resolution: int | None
               ) -> dict[str, np.ndarray]:
        """Those of :class:`SphereCell` (``n_ellipsoids`` the count, ``radius`` the semi-axis
        a) and ``aspect_ratio`` (M,)."""
        return {**inclusion_arrays(structures, resolution, "n_ellipsoids"),
                "aspect_ratio": np.array([s.aspect_ratio for s in structures])}

    @classmethod
    def from_config(cls, cfg: dict, *, seed: int | None = None) -> EllipsoidCell:
        """Keys: ``volume_fraction``, ``n_ellipsoids``, ``aspect_ratio``, ``min_gap``,
        ``seed`` (overridden by the ``seed`` argument)."""
        o = settings(cls, cfg)
        return random_ellipsoids(float(o["volume_fraction"]), int(o["n_ellipsoids"]),
                                 int(o["seed"] if seed is None else seed),
                                 aspect_ratio=float(o["aspect_ratio"]),
                                 min_gap=float(o["min_gap"]))

    def _fibre_mask(self, s: np.ndarray) -> np.ndarray:
        """Mask (m, m, m), [k, i, j] = (x, y, z) = (s[j], s[i], s[k])."""
        inside = np.zeros((len(s),) * 3, dtype=bool)
        a, c = self.radius, self.aspect_ratio * self.radius
        for centre in self.centres:
            dx, dy, dz = (s - x - np.round(s - x) for x in centre)  # nearest periodic image
            inside |= ((dz[:, None, None] / c) ** 2 + (dy[None, :, None] / a) ** 2
                       + (dx[None, None, :] / a) ** 2) < 1.0
        return inside

    def _gmsh_fibres(self) -> list[int]:
        """The spheroids (unit spheres scaled by a, a, c) and their periodic images, clipped
        to the cube."""
        import gmsh

        occ = gmsh.model.occ
        a, c = self.radius, self.aspect_ratio * self.radius

        def spheroid(x: np.ndarray) -> tuple[int, int]:
            tag = occ.addSphere(*x, 1.0)
            occ.dilate([(3, tag)], *x, a, a, c)
            return 3, tag

        return fragment_cell(3, lambda: [spheroid(x) for centre in self.centres
                                         for x in periodic_images(centre, max(a, c))])


def largest_ellipsoid_fraction(n: int, aspect_ratio: float, min_gap: float) -> float:
    """An upper bound of the volume fraction of N equal spheroids of aspect ratio α with the
    gap ``min_gap``, from :func:`largest_sphere_fraction` in the frame z' = z/α, where they
    are spheres in a box of height 1/α (the gap counted in that frame)."""
    a_own = (min(1.0, 1.0 / aspect_ratio) - min_gap) / 2
    a_packed = (3 * DENSEST_PACKING / (4 * np.pi * n * aspect_ratio)) ** (1 / 3) - min_gap / 2
    return float(n * 4 * np.pi / 3 * aspect_ratio * max(min(a_own, a_packed), 0.0) ** 3)


def random_ellipsoids(volume_fraction: float, n_ellipsoids: int, seed: int, *,
                      aspect_ratio: float = 3.0, min_gap: float = MIN_GAP) -> EllipsoidCell:
    """N equal spheroids aligned with x₃ placed at random, clear of each other and their
    periodic images: random sequential addition of spheres of radius a in the frame
    z' = z/α (box 1 × 1 × 1/α), which maps the spheroids to those spheres; the gap
    ``min_gap`` is kept in that frame.

    Raises
    ------
    InputError
        If v ∉ (0, 1), N < 1, α ≤ 0, v exceeds :func:`largest_ellipsoid_fraction` (named),
        or random addition finds no arrangement.
    """
    _check_fraction(volume_fraction)
    if int(n_ellipsoids) != n_ellipsoids or n_ellipsoids < 1:
        raise InputError(f"n_ellipsoids={n_ellipsoids}: must be a positive integer")
    if not 0.05 <= aspect_ratio <= 20:
        raise InputError(f"aspect_ratio={aspect_ratio}: give c/a in [0.05, 20] (> 1 prolate)")
    n, alpha = int(n_ellipsoids), float(aspect_ratio)
    vmax = largest_ellipsoid_fraction(n, alpha, min_gap)
    if volume_fraction > vmax:
        raise InputError(
            f"{n} ellipsoid(s) of aspect_ratio={alpha} and volume_fraction={volume_fraction} "
            f"cannot keep min_gap={min_gap} from each other and their periodic images: the "
            f"largest feasible volume_fraction is {vmax:.3f}; lower it or min_gap")
    a = float((3 * volume_fraction / (4 * np.pi * n * alpha)) ** (1 / 3))
    rng = np.random.default_rng(seed)
    mapped = _sequential_addition(n, a, min_gap, rng, box=(1.0, 1.0, 1.0 / alpha))
    if mapped is None:
        raise InputError(
            f"could not place {n} ellipsoids of volume_fraction={volume_fraction} and "
            f"aspect_ratio={alpha} with min_gap={min_gap} (seed={seed}; bound {vmax:.3f}, "
            "random addition jams well below it): lower volume_fraction or min_gap")
    centres = mapped * np.array([1.0, 1.0, alpha])
    return EllipsoidCell("random_ellipsoids", float(volume_fraction), centres, a, seed, alpha)


@register
@dataclass(frozen=True)
class UDFibreCell(SolidCell):
    """Unidirectional cylindrical fibres along x₃ through the unit cube (kind ``ud_fibres``):
    the 2D fibre cell ``section`` extruded over 0 ≤ x₃ < 1.

    Attributes
    ----------
    kind : ``ud_fibres``.
    section : the cross-section in (x₁, x₂), a 2D :class:`FibreCell`.
    """

    kinds: ClassVar[tuple[str, ...]] = ("ud_fibres",)
    config_schema: ClassVar[dict[str, Any]] = {
        **FibreCell.config_schema, "section": "random_fibres"}
    """The keys of the 2D fibre cell (:class:`FibreCell`) of the cross-section, whose kind is
    ``section``."""
    drawn: ClassVar[dict[str, bool]] = FibreCell.drawn

    kind: str
    section: FibreCell

    @property
    def volume_fraction(self) -> float:
        """Fibre volume fraction (= the section's area fraction)."""
        return self.section.volume_fraction

    @property
    def n_fibres(self) -> int:
        return self.section.n_fibres

    @property
    def key(self) -> str:
        """A short digest of the geometry."""
        return hashlib.sha1(f"{self.kind}|{self.section.key}".encode()).hexdigest()[:16]

    @classmethod
    def from_config(cls, cfg: dict, *, seed: int | None = None) -> UDFibreCell:
        """Keys: those of the 2D fibre cell of kind ``section`` (``volume_fraction``,
        ``n_fibres``, ``min_gap``, ``misalignment``, ``seed``)."""
        o = settings(cls, cfg)
        section = o.pop("section")
        if section not in FibreCell.kinds:
            raise InputError(f"microstructure.section={section!r}: the cross-section of "
                             f"ud_fibres is a 2D fibre cell, one of {', '.join(FibreCell.kinds)}")
        return ud_fibres(FibreCell.from_config({**o, "kind": section}, seed=seed))

    def _fibre_mask(self, s: np.ndarray) -> np.ndarray:
        """The section's mask, the same at every x₃: (m, m, m), [k, i, j] as for spheres."""
        return np.broadcast_to(self.section._fibre_mask(s), (len(s),) * 3)

    def _gmsh_fibres(self) -> list[int]:
        raise InputError("a ud_fibres cell is meshed by extruding its section's mesh "
                         "(UDFibreCell.mesh), not from a gmsh geometry")

    def mesh(self, comm: MPI.Comm, size: float, order: int = 1) -> LayeredMesh:
        """The section's periodic gmsh triangle mesh (order 1, element size ``size``)
        extruded along x₃ in n = ⌈1/size⌉ layers, each prism cut into three tetrahedra;
        ``order`` is ignored (straight tetrahedra: a P2 field lives on them as well).

        Every quadrilateral side face of a prism is cut by the diagonal from its vertex of
        lower periodic key (the index of the vertex's image in [0, 1)²) at the bottom to the
        other at the top, the same in every layer and on opposite cell faces, so the mesh is
        conforming and periodic. A plane-strain P1 solution of the section, constant in x₃, is
        then the P1 solution of the 3D cell under a transverse F̄ to round-off (each
        side-face hat integrates to the 2D edge hat times the layer height).
        """
        from mpi4py import MPI

        import basix.ufl
        import ufl
        from dolfinx.mesh import create_mesh, meshtags

        n = max(1, int(np.ceil(1.0 / size - 1e-9)))
        if comm.rank == 0:
            flat = self.section.mesh(MPI.COMM_SELF, size, order=1)
            x2 = flat.mesh.geometry.x[:, :2]
            tri = flat.mesh.geometry.dofmaps[0]
            phase2 = np.empty(len(tri), dtype=np.int32)
            phase2[flat.cell_tags.indices] = flat.cell_tags.values
            nodes, cells, phase = _extrude(x2, tri, phase2, n)
        else:
            nodes, cells = np.empty((0, 3)), np.empty((0, 4), dtype=np.int64)
            phase = None
        phase = comm.bcast(phase, root=0)
        element = basix.ufl.element("Lagrange", "tetrahedron", 1, shape=(3,))
        mesh = create_mesh(comm, cells, ufl.Mesh(element), nodes)
        local = np.arange(mesh.topology.index_map(3).size_local, dtype=np.int32)
        tags = meshtags(mesh, 3, local, phase[mesh.topology.original_cell_index[local]])
        return LayeredMesh(mesh, tags)


class LayeredMesh(NamedTuple):
    """The DOLFINx mesh of an extruded cell and its phase tags (as gmsh's ``MeshData``)."""

    mesh: Any
    cell_tags: Any


def _extrude(x2: np.ndarray, tri: np.ndarray, phase2: np.ndarray, n: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes (N·(n+1), 3), tetrahedra (3·T·n, 4) and their phases of the triangle mesh
    (x2 (N, 2), tri (T, 3), phase2 (T,)) extruded over [0, 1] in n layers (see
    :meth:`UDFibreCell.mesh`)."""
    image = np.where(np.abs(x2 - 1.0) < 1e-8, 0.0, x2)
    _, key = np.unique(np.round(image, 9), axis=0, return_inverse=True)
    ordered = np.take_along_axis(tri, np.argsort(key[tri], axis=1), axis=1)  # a, b, c by key
    n_nodes = len(x2)
    nodes = np.concatenate([np.column_stack([x2, np.full(n_nodes, k / n)])
                            for k in range(n + 1)])
    a, b, c = ordered.T
    layers = []
    for k in range(n):  # per layer: the three tetrahedra of each prism, triangle by triangle
        lo, hi = k * n_nodes, (k + 1) * n_nodes
        layers.append(np.stack([np.column_stack(t) for t in (
            (a + lo, b + lo, c + lo, c + hi), (a + lo, b + lo, b + hi, c + hi),
            (a + lo, a + hi, b + hi, c + hi))], axis=1).reshape(-1, 4))
    cells = np.concatenate(layers)
    phase = np.tile(np.repeat(phase2, 3), n)
    return nodes, cells.astype(np.int64), phase


def ud_fibres(section: FibreCell) -> UDFibreCell:
    """The 3D cell of unidirectional fibres along x₃ with the 2D cross-section ``section``."""
    if not isinstance(section, FibreCell) or section.kind not in FibreCell.kinds:
        raise InputError(f"ud_fibres: the section must be a 2D fibre cell of kind "
                         f"{', '.join(FibreCell.kinds)}, got {section!r}")
    return UDFibreCell("ud_fibres", section)
