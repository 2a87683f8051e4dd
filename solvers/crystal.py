"""Crystal cells: the structure family of HMM with a Cauchy–Born fine solver.

A :class:`Crystal` is the config of one Cauchy–Born cell (element, lattice, supercell,
vacancies, calculator, temperature, solver settings; :data:`CONFIG_SCHEMA`); what varies between
the quadrature points of one material is its thermodynamic state, which the crystal operator sees
as a descriptor (temperature / :data:`T_SCALE`). This module needs no ASE: the fine solver
(:mod:`neuroscale_couple.solvers.cauchy_born`) is imported when one is built.

Config (a group of a generate config, one structure per temperature)::

    microstructure: {kind: crystal, element: Cu, lattice: fcc, supercell: [3, 3, 3],
                     vacancies: 1, calculator: emt, temperature: [0, 300]}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from neuroscale_couple.structures import GROUP_KEYS, REQUIRED, config_groups, register

if TYPE_CHECKING:
    from mpi4py import MPI

    import torch

    from neuroscale_couple.operators.crystal import CrystalOperator
    from neuroscale_couple.solvers.cauchy_born import CauchyBorn
    from neuroscale_couple.training import TrainingData

T_SCALE = 1000.0  # K: temperatures enter the operator's descriptor as T / T_SCALE

CONFIG_SCHEMA: dict[str, Any] = {
    "element": REQUIRED, "lattice": "fcc", "a0": None, "supercell": (1, 1, 1), "vacancies": 0,
    "calculator": "emt", "relax": None, "fmax": 1e-5, "fd_step": 1e-5, "max_steps": 500,
    "temperature": 0.0, "md_steps": 1000, "equilibration_steps": 200, "timestep": 5.0,
    "friction": 0.01, "seed": 0}
"""Keys of a crystal config and their defaults (see
:func:`~neuroscale_couple.solvers.cauchy_born.cauchy_born_from_config`): ``a0`` None: the
equilibrium lattice constant of the cell; ``relax`` None: when the cell has a basis or
vacancies; units Å, eV/Å (``fmax``), K, fs (``timestep``), 1/fs (``friction``)."""


@register
@dataclass(frozen=True, eq=False)
class Crystal:
    """The fine-scale structure of an HMM quadrature point: a Cauchy–Born crystal config (the
    keys of :data:`CONFIG_SCHEMA`), hashable by :attr:`key`."""

    config: dict

    kinds: ClassVar[tuple[str, ...]] = ("crystal",)
    dim: ClassVar[int] = 2  # plane-strain loads, as the 2D cells
    config_schema: ClassVar[dict[str, Any]] = CONFIG_SCHEMA
    material_keys: ClassVar[tuple[str, ...]] = ()
    """None: a crystal's config is its whole material."""
    default_load_radius: ClassVar[float] = 0.05
    hold_out_structures: ClassVar[bool] = False
    """One crystal per temperature, many loads each: training splits and batches by sample."""
    descriptor_keys: ClassVar[tuple[str, ...]] = ("temperature",)
    kind: ClassVar[str] = "crystal"

    @property
    def key(self) -> str:
        """Digest of the config (equal configs share one solver in a cache)."""
        return hashlib.sha1(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def temperature(self) -> float:
        """K."""
        return float(self.config.get("temperature", CONFIG_SCHEMA["temperature"]))

    @property
    def noisy(self) -> bool:
        """Above 0 K the stress is a time average with a statistical error."""
        return self.temperature > 0

    def descriptor(self) -> np.ndarray:
        """The operator's input (1,): temperature / 1000 K."""
        return np.array([self.temperature / T_SCALE])

    def solver(self) -> CauchyBorn:
        """A new Cauchy–Born solver of this crystal."""
        from neuroscale_couple.solvers.cauchy_born import cauchy_born_from_config

        return cauchy_born_from_config(self.config)[0]

    def fine_solver(self, material: dict | None = None, comm: MPI.Comm | None = None
                    ) -> CauchyBorn:
        """:meth:`solver`: the crystal carries its whole material (``material`` is not read);
        a cell is solved on one rank (``comm`` is not read)."""
        return self.solver()

    # ------------------------------------------------------------------ configs and data
    @classmethod
    def from_config(cls, cfg: dict, *, seed: int | None = None) -> Crystal:
        """The crystal of a config mapping (``kind`` and ``loads`` dropped; ``seed``, the
        thermostat's, overridden where given)."""
        config = {k: v for k, v in cfg.items() if k not in GROUP_KEYS}
        return cls(config if seed is None else dict(config, seed=seed))

    @classmethod
    def resolve(cls, group: dict) -> dict:
        """The group with its equilibrium lattice constant ``a0`` (Å) where it gives none, so
        that every structure and the model's family record it."""
        if group.get("a0") is not None:
            return group
        from neuroscale_couple.solvers.cauchy_born import cauchy_born_from_config

        base = {k: v for k, v in group.items() if k not in (*GROUP_KEYS, "temperature")}
        return dict(group, a0=cauchy_born_from_config(base)[1])

    @classmethod
    def plan(cls, group: dict, name: str) -> list[Crystal]:
        """One crystal per temperature of the group (``temperature``: a number or a list, K);
        the first one's solver is built to check the config."""
        temps = group.get("temperature", CONFIG_SCHEMA["temperature"])
        temps = [float(t) for t in (temps if isinstance(temps, list) else [temps])]
        base = {k: v for k, v in group.items() if k not in (*GROUP_KEYS, "temperature")}
        structures = [cls(dict(base, temperature=t)) for t in temps]
        structures[0].solver()  # validates the config before any collective work
        return structures

    @classmethod
    def arrays(cls, structures: Sequence[Crystal], resolution: int | None = None
               ) -> dict[str, np.ndarray]:
        """``descriptor`` (M, 1), ``temperature`` (M,) K and ``config`` (M,) JSON strings
        (``resolution`` is not read: crystals have no image)."""
        return {"descriptor": np.stack([s.descriptor() for s in structures]),
                "temperature": np.array([s.temperature for s in structures]),
                "config": np.array([json.dumps(s.config, sort_keys=True) for s in structures],
                                   dtype="S")}

    @classmethod
    def operator_inputs(cls, micro: dict[str, np.ndarray], resolution: int | None,
                        dtype: torch.dtype, source: str) -> torch.Tensor:
        """The stored descriptors (M, k)."""
        import torch

        return torch.as_tensor(micro["descriptor"], dtype=dtype)

    @classmethod
    def family_config(cls, config: dict) -> dict:
        """The crystal config of a generate config (its first group, without ``kind`` and
        ``loads``), whose material keys the crystal operator checks."""
        return {k: v for k, v in config_groups(config)[0].items() if k not in GROUP_KEYS}

    @classmethod
    def new_operator(cls, model_config: dict, data: TrainingData
                     ) -> tuple[CrystalOperator, dict]:
        """A :class:`~neuroscale_couple.operators.crystal.CrystalOperator` of the data's
        crystal, with as many input features as its descriptors."""
        from neuroscale_couple.operators.crystal import CrystalConfig, CrystalOperator, family_json

        mcfg = dict(model_config, n_features=data.images.shape[1],
                    family=family_json(cls.family_config(data.config)))
        return CrystalOperator(CrystalConfig.from_dict(mcfg)), mcfg
