"""Structures: what tells the quadrature points of a multiscale run apart, as one protocol.

A *structure* is the fine-scale object behind a point: a fibre cell of a composite, a crystal
cell at a temperature. A *family* of structures is one class implementing :class:`Structure`:
its ``key``, its stored arrays (HDF5 data sets and replay segments), the operator inputs made
from them, its config schema, how its fine solver is built and which operator learns it.
Nothing else in NeuroScale asks which family it holds; adding one is one new module with a
class decorated by :func:`register`, found by its kind once the module is imported (a package of
its own names it by an entry point of :data:`ENTRY_POINTS`; a built-in one is listed in
:data:`BUILTIN`).

Configs name their family by ``kind``. A generate config lists its structures under
``microstructure``, one mapping or a list of groups::

    microstructure:
      - {kind: random_fibres, volume_fraction: [0.1, 0.5], n_fibres: [1, 8], count: 800}
      - {kind: fibre_chain, volume_fraction: [0.22, 0.36], count: 160, seed: 10}
    # or: microstructure: {kind: crystal, element: Cu, supercell: [2, 2, 2], temperature: [0, 300]}

The older crystal shape, ``crystal: {element: Cu, ...}`` in place of ``microstructure``, and data
sets written before structures stored their kind are read by :func:`config_groups` and
:func:`data_family`, the only places that know them.

The built-in kinds: ``single_fibre``, ``random_fibres``, ``fibre_chain`` (``FibreCell``) and
``laminate`` (``Laminate``) in :mod:`neuroscale_couple.solvers.microstructure`; the 3D cells
``single_sphere``, ``random_spheres`` (``SphereCell``), ``random_ellipsoids``
(``EllipsoidCell``) and ``ud_fibres`` (``UDFibreCell``) in
:mod:`neuroscale_couple.solvers.cells3d`; ``crystal``
(``Crystal``) in :mod:`neuroscale_couple.solvers.crystal`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from neuroscale_couple.config import check_keys
from neuroscale_couple.errors import InputError

if TYPE_CHECKING:
    from mpi4py import MPI

    import torch

    from neuroscale_couple.fine import FineSolver
    from neuroscale_couple.operators.base import CoarseGrainingOperator
    from neuroscale_couple.training import TrainingData


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Schema value of a config key without a default."""

GROUP_KEYS = ("kind", "loads")
"""Keys of every structure group of a generate config: the family's ``kind`` and the group's own
load shell ``loads: {radius, min_radius, seed}``."""


@runtime_checkable
class Structure(Protocol):
    """A family of fine-scale structures; one class per family (see the module docstring).

    Class attributes
    ----------------
    kinds : the config ``kind`` names the class answers (a fibre cell has several generators).
    dim : d of the macro deformation gradients F̄ (d×d) its fine solver takes and its data sets
        store: 2 (plane strain) or 3.
    config_schema : key → default (:data:`REQUIRED` where there is none) of the family's config
        mapping, besides :data:`GROUP_KEYS`; the one place its defaults are written.
    material_keys : the top-level keys of a generate config that the family's material is
        read from (what :meth:`fine_solver` reads of ``material``; none for a family whose
        structures carry their whole material).
    default_load_radius : ‖F̄ − I‖ radius of generated loads when ``loads.radius`` is not given.
    hold_out_structures : whether training splits and batches keep each structure's samples
        together (many structures: held-out ones test generalisation) or split by sample (a few
        structures with many samples each, e.g. one crystal per temperature).
    descriptor_keys : scalar attributes of a structure, stored under the same names in its
        ``arrays``, whose trained ranges bound a model's training region
        (:mod:`neuroscale_couple.region`; optional: without them only the kind is checked).

    Optional class methods of a family whose structures draw material constants per structure
    (two-phase cells with phase ranges, :mod:`neuroscale_couple.phases`):
    ``materials(config, count) -> (arrays, material configs)``, the drawn constants stored under
    ``/micro`` and each structure's fine-solver material; ``stress_units(micro) -> (M,) | None``,
    the stress unit of each structure, in which a model learns its stresses.
    """

    kinds: ClassVar[tuple[str, ...]]
    dim: ClassVar[int]
    config_schema: ClassVar[Mapping[str, Any]]
    material_keys: ClassVar[tuple[str, ...]]
    default_load_radius: ClassVar[float]
    hold_out_structures: ClassVar[bool]

    @property
    def kind(self) -> str:
        """The kind this structure was made as (one of ``kinds``)."""

    @property
    def key(self) -> Hashable:
        """Content digest: equal structures share one key (solver caches, latent caches)."""

    @property
    def noisy(self) -> bool:
        """Whether its fine solves report a standard error of P̄ (time averages)."""

    @classmethod
    def from_config(cls, cfg: dict, *, seed: int | None = None) -> Structure:
        """One structure from a config mapping of ``config_schema`` keys (checked by
        :func:`check_group`); ``seed`` overrides the mapping's."""

    @classmethod
    def resolve(cls, group: dict) -> dict:
        """The group with what its data must record filled in (e.g. a crystal's lattice
        constant); ``group`` itself where there is nothing to fill."""

    @classmethod
    def plan(cls, group: dict, name: str) -> list[Structure]:
        """The structures of one (resolved) generate group, drawn reproducibly from its seeds;
        ``name`` (e.g. ``microstructure[1]``) is used in errors. Validates everything the fine
        solves need, so that bad input fails before any collective work."""

    @classmethod
    def arrays(cls, structures: Sequence[Structure], resolution: int | None
               ) -> dict[str, np.ndarray]:
        """Per-structure arrays (M, ...) stored under ``/micro`` in data sets and replay
        segments; ``resolution``: pixels per side of image inputs (unused without images)."""

    @classmethod
    def operator_inputs(cls, micro: dict[str, np.ndarray], resolution: int | None,
                        dtype: torch.dtype, source: str) -> torch.Tensor:
        """The encoder's input tensor (M, ...) of stored ``arrays`` ``micro``, for an operator
        taking images of ``resolution`` pixels per side (None: an operator without images);
        ``source`` names the data in errors. Live structures take the same path (through
        :meth:`arrays`), so they are encoded exactly as in training."""

    @classmethod
    def family_config(cls, config: dict) -> dict:
        """The material family of a generate config (what a model trained on its data is
        bound to, checked by the operator's ``check_family``, and what data sets trained
        together must share); validates its keys."""

    @classmethod
    def new_operator(cls, model_config: dict, data: TrainingData
                     ) -> tuple[CoarseGrainingOperator, dict]:
        """A fresh operator for training on ``data`` (its ``config`` a generate config of this
        family) from the ``model:`` mapping, and that mapping completed as recorded in the
        model card."""

    def fine_solver(self, material: dict, comm: MPI.Comm | None = None) -> FineSolver:
        """The true fine solver of this structure; ``material``: the generate config, or the
        material family config of a coupled run (families whose structure carries its whole
        material ignore it); ``comm``: the solver's communicator (default ``MPI.COMM_SELF``)."""


# ---------------------------------------------------------------------- registry
BUILTIN = {"single_fibre": "neuroscale_couple.solvers.microstructure",
           "random_fibres": "neuroscale_couple.solvers.microstructure",
           "fibre_chain": "neuroscale_couple.solvers.microstructure",
           "laminate": "neuroscale_couple.solvers.microstructure",
           "single_sphere": "neuroscale_couple.solvers.cells3d",
           "random_spheres": "neuroscale_couple.solvers.cells3d",
           "ud_fibres": "neuroscale_couple.solvers.cells3d",
           "random_ellipsoids": "neuroscale_couple.solvers.cells3d",
           "crystal": "neuroscale_couple.solvers.crystal"}
"""Kind → module of the built-in families (imported on first use, so the core needs neither
DOLFINx nor ASE)."""

_FAMILIES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make ``cls`` the family of each of its ``kinds``.

    Raises
    ------
    InputError
        If another class already holds one of the kinds.
    """
    for kind in cls.kinds:
        other = _FAMILIES.get(kind)
        if other is not None and (other.__module__, other.__qualname__) != (
                cls.__module__, cls.__qualname__):
            raise InputError(f"structure kind {kind!r} belongs to {other.__qualname__} already: "
                             f"give {cls.__qualname__} another kind name")
        _FAMILIES[kind] = cls
    return cls


def known_kinds() -> list[str]:
    """Every kind a config may name (built-in and registered)."""
    return sorted(set(BUILTIN) | set(_FAMILIES))


ENTRY_POINTS = "neuroscale_couple.structures"
"""Entry-point group through which another package adds families: ``kind = module:Class``
(loading it imports the module, whose ``@register`` enrols the class)."""


def family(kind: object, name: str = "microstructure") -> type:
    """The family class of ``kind``: registered, built-in (:data:`BUILTIN`) or named by an
    entry point of :data:`ENTRY_POINTS`; ``name`` is the config mapping's name in errors."""
    if isinstance(kind, str) and kind not in _FAMILIES:
        if kind in BUILTIN:
            importlib.import_module(BUILTIN[kind])
        else:
            for entry in importlib.metadata.entry_points(group=ENTRY_POINTS, name=kind):
                entry.load()
    cls = _FAMILIES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InputError(f"{name}.kind={kind!r}: must be one of {', '.join(known_kinds())}")
    return cls


def check_group(group: dict, cls: type, name: str) -> None:
    """Refuse keys of a config mapping that ``cls``'s schema does not know, naming the nearest
    known key, and missing required keys."""
    check_keys(group, set(GROUP_KEYS) | set(cls.config_schema),
               f"{name} (kind {group.get('kind')!r})")
    for key, default in cls.config_schema.items():
        if default is REQUIRED and key not in group:
            raise InputError(f"{name}.{key} is missing: kind {group.get('kind')!r} needs it")


def settings(cls: type, cfg: dict) -> dict:
    """``cfg`` over the defaults of ``cls.config_schema`` (required keys only where given)."""
    defaults = {k: v for k, v in cls.config_schema.items() if v is not REQUIRED}
    return {**defaults, **cfg}


def from_config(cfg: dict, *, seed: int | None = None, name: str = "microstructure"
                ) -> Structure:
    """One structure of any kind from its config mapping (``kind`` and the family's keys)."""
    if not isinstance(cfg, dict):
        raise InputError(f"{name} must be a mapping with a kind ({', '.join(known_kinds())}), "
                         f"got {cfg!r}")
    cls = family(cfg.get("kind"), name)
    check_group(cfg, cls, name)
    return cls.from_config(cfg, seed=seed)


def common_family(structures: Sequence[Structure]) -> type:
    """The class whose :meth:`~Structure.arrays` stores all of ``structures`` together.

    Raises
    ------
    InputError
        If the list is empty or mixes families that store different arrays.
    """
    if not len(structures):
        raise InputError("no structures given: give at least one")
    owners = {_arrays_owner(type(s)) for s in structures}
    if len(owners) > 1:
        kinds = sorted({s.kind for s in structures})
        raise InputError(f"structures of the kinds {', '.join(kinds)} store different arrays: "
                         "keep each family in its own data set and model")
    return owners.pop()


def _arrays_owner(cls: type) -> type:
    return next(c for c in cls.__mro__ if "arrays" in vars(c))


def stored_arrays(structures: Sequence[Structure], resolution: int | None
                  ) -> dict[str, np.ndarray]:
    """The ``/micro`` arrays of ``structures``: their family's :meth:`~Structure.arrays` and
    ``kind`` (M,) (bytes), which names the family that reads them back (:func:`data_family`)."""
    arrays = common_family(structures).arrays(structures, resolution)
    return {**arrays, "kind": np.array([s.kind for s in structures], dtype="S")}


def data_family(d: dict) -> type:
    """The family of a loaded data set (the dict of
    :func:`~neuroscale_couple.store.load_rve_dataset`): named by ``micro/kind``."""
    kinds = d.get("micro/kind")
    if kinds is None:
        return family(_kind_of_older_data(d.get("config") or {}))
    kind = kinds[0]
    return family(kind.decode() if isinstance(kind, bytes) else str(kind))


# ---------------------------------------------------------------------- configs
def config_groups(config: dict) -> list[dict]:
    """The structure groups of a generate config, each a mapping with a ``kind``: the
    ``microstructure`` mapping or list, or the older ``crystal`` mapping as one group of kind
    ``crystal``."""
    if "crystal" in config and "microstructure" not in config:  # the older crystal shape
        crystal = config["crystal"]
        if not isinstance(crystal, dict):
            raise InputError(f"crystal={crystal!r}: give a mapping of crystal keys (element, "
                             "lattice, supercell, ...), or write it as microstructure: "
                             "{kind: crystal, ...}")
        return [{"kind": "crystal", **crystal}]
    groups = config.get("microstructure")
    groups = groups if isinstance(groups, list) else [groups]
    if not groups or not all(isinstance(g, dict) for g in groups):
        raise InputError("a generate config needs `microstructure`: a mapping with a kind "
                         f"({', '.join(known_kinds())}), or a list of them, one per group of "
                         "structures")
    return groups


def with_groups(config: dict, groups: list[dict]) -> dict:
    """``config`` with its structure groups replaced by ``groups`` (e.g. resolved ones), in the
    config's own shape; ``config`` itself where nothing changed."""
    if groups == config_groups(config):
        return config
    if "crystal" in config and "microstructure" not in config:
        return dict(config, crystal={k: v for k, v in groups[0].items() if k != "kind"})
    own = config["microstructure"]
    return dict(config, microstructure=groups if isinstance(own, list) else groups[0])


def _kind_of_older_data(config: dict) -> str:
    """A kind of the family of a data set written before ``micro/kind`` was stored: crystal
    data sets (generate config with ``crystal``, or a replay segment whose config is a crystal
    config) and fibre-cell data sets (every other)."""
    return "crystal" if "crystal" in config or "element" in config else "random_fibres"
