"""Cauchy–Born fine solver: homogenized stress of a crystal cell deformed by the macro F̄.

The reference cell (an ASE ``Atoms`` with its calculator: EMT by default, LAMMPS through
``ase.calculators.lammpslib``, any other ASE calculator) is deformed affinely,

    cell' = cell · F̄ᵀ      (ASE stores cell vectors as rows),

the internal degrees of freedom are relaxed at fixed cell where the cell has a basis or defects,
and the first Piola–Kirchhoff stress is P̄ = J σ F̄⁻ᵀ from the calculator's Cauchy stress σ.
The tangent ∂P̄/∂F̄ is taken by central differences of the relaxed stress. Stresses are in GPa.

At a finite temperature the stress is the time average of the virial (kinetic part included)
over a Langevin NVT run at fixed F̄, with its statistical error from the integrated
autocorrelation time (:func:`statistical_error`) in ``info['stress_stderr']``; that noise is real
and is what the operator's aleatoric head must learn. The tangent is then the static (0 K,
relaxed) one at the same F̄: a consistent tangent of a noisy average does not exist, and the
static one keeps the macro Newton convergent.

``info['energy_density']`` is the strain energy density W̄ = (E − E₀)/V₀ (GPa, E₀ the relaxed
reference cell's energy, V₀ its volume) at 0 K, so that P̄ = ∂W̄/∂F̄.

2D (plane strain) batches (n, 2, 2) are embedded as F̄ = diag-block with F₃₃ = 1 and answered with
the in-plane blocks of P̄ and of the tangent; 3D batches (n, 3, 3) get the full tensors.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Hashable, Sequence

import numpy as np
from ase import Atoms, units
from ase.constraints import FixCom
from ase.optimize import LBFGS
from ase.parallel import DummyMPI

from neuroscale_couple.errors import InputError, SolveError
from neuroscale_couple.fine import FineSolver, MicroResult
from neuroscale_couple.solvers.crystal import CONFIG_SCHEMA, T_SCALE, Crystal
from neuroscale_couple.tensors import as_deformation_batch

__all__ = ["LATTICES", "T_SCALE", "CauchyBorn", "Crystal", "cauchy_born_from_config",
           "embed_plane_strain", "equilibrium_lattice_constant", "make_calculator",
           "statistical_error"]

log = logging.getLogger(__name__)
_DEFAULT = CONFIG_SCHEMA  # the defaults of the solver settings, written once
# ASE's optimizers and MD broadcast over MPI_COMM_WORLD by default; a cell is solved by one rank
SERIAL = DummyMPI()


def statistical_error(x: np.ndarray, c: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Standard error of the mean of correlated time series and their integrated
    autocorrelation times (in samples), by Sokal's automatic windowing.

    Parameters
    ----------
    x : (N, ...) samples along axis 0.
    c : window factor: the sum over the autocorrelation stops at the first M ≥ c·τ(M).
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    flat = x.reshape(n, -1)
    dev = flat - flat.mean(axis=0)
    var = (dev**2).mean(axis=0)
    f = np.fft.rfft(dev, n=2 * n, axis=0)
    acov = np.fft.irfft(f * np.conj(f), axis=0)[:n] / n
    tau = np.full(flat.shape[1], 0.5)
    for j in range(flat.shape[1]):
        if var[j] <= 0:
            continue
        rho = acov[:, j] / acov[0, j]
        cum = 0.5 + np.cumsum(rho[1:])
        window = np.flatnonzero(np.arange(1, n) >= c * cum)
        tau[j] = max(0.5, cum[window[0]] if len(window) else cum[-1])
    err = np.sqrt(var * 2 * tau / n)
    return err.reshape(x.shape[1:]), tau.reshape(x.shape[1:])


def embed_plane_strain(F: np.ndarray) -> tuple[np.ndarray, int]:
    """(n, 3, 3) gradients from validated (n, 2, 2) or (n, 3, 3) ones (F₃₃ = 1 for 2D), and the
    input dimension."""
    Fb = as_deformation_batch(F, dims=(2, 3))
    dim = Fb.shape[1]
    if dim == 3:
        return Fb, 3
    full = np.tile(np.eye(3), (len(Fb), 1, 1))
    full[:, :2, :2] = Fb
    return full, 2


class CauchyBorn(FineSolver):
    """A crystal cell as a fine solver; see the module docstring.

    Parameters
    ----------
    atoms : the reference (undeformed) cell, periodic in all directions, with a calculator.
    relax : relax the atoms at fixed cell after each deformation (default: when the cell has
        more than one atom, i.e. a basis or a defect can move non-affinely).
    fmax : force tolerance of the relaxation, eV/Å.
    fd_step : central-difference step in F̄ for the tangent.
    max_steps : LBFGS step limit; beyond it the solve fails with :class:`SolveError`.
    temperature : K; 0 for static solves, > 0 for Langevin NVT averages.
    md_steps, equilibration_steps : production and discarded MD steps per solve.
    timestep : MD time step, fs.
    friction : Langevin friction, 1/fs.
    seed : seed of the thermostat noise. A solve with a point id draws the stream of (seed,
        point id, F̄): the same on any rank and solver instance, so coupled runs at a finite
        temperature are reproducible and rank-count independent; without an id every solve draws
        a new stream.
    """

    implemented_properties = ("stress", "tangent")

    def __init__(self, atoms: Atoms, *, relax: bool | None = None,
                 fmax: float = _DEFAULT["fmax"], fd_step: float = _DEFAULT["fd_step"],
                 max_steps: int = _DEFAULT["max_steps"],
                 temperature: float = _DEFAULT["temperature"],
                 md_steps: int = _DEFAULT["md_steps"],
                 equilibration_steps: int = _DEFAULT["equilibration_steps"],
                 timestep: float = _DEFAULT["timestep"], friction: float = _DEFAULT["friction"],
                 seed: int = _DEFAULT["seed"]) -> None:
        if atoms.calc is None:
            raise InputError("atoms has no calculator: attach one (e.g. ase.calculators.emt.EMT())")
        if not all(atoms.pbc):
            raise InputError("the Cauchy–Born cell must be periodic in x, y and z (atoms.pbc)")
        if fmax <= 0 or fd_step <= 0:
            raise InputError(f"fmax={fmax}, fd_step={fd_step}: both must be > 0")
        self.reference = atoms.copy()
        self.atoms = atoms
        self.relax = len(atoms) > 1 if relax is None else bool(relax)
        self.fmax, self.fd_step, self.max_steps = fmax, fd_step, max_steps
        if temperature < 0 or md_steps < 10 or equilibration_steps < 0 or timestep <= 0:
            raise InputError(f"temperature={temperature} K, md_steps={md_steps}, "
                             f"equilibration_steps={equilibration_steps}, timestep={timestep} fs:"
                             " need T ≥ 0, ≥ 10 production steps, a positive time step")
        self.temperature, self.md_steps = float(temperature), int(md_steps)
        self.equilibration_steps, self.timestep, self.friction = (int(equilibration_steps),
                                                                  float(timestep), float(friction))
        self._seed, self._rng = int(seed), np.random.default_rng(seed)
        self.states: dict[Hashable, np.ndarray] = {}  # relaxed scaled positions per point id
        self._e0: float | None = None

    @property
    def natoms(self) -> int:
        return len(self.reference)

    def solve(self, F: np.ndarray, *, point_ids: Sequence[Hashable] | None = None,
              tangent: bool = True, fields_resolution: int | None = None) -> MicroResult:
        """P̄ (GPa) and ∂P̄/∂F̄ (GPa) for each F̄; see :class:`~neuroscale_couple.fine.FineSolver`."""
        if fields_resolution:
            raise InputError("the Cauchy–Born solver has no micro fields on a grid")
        Fb, dim = embed_plane_strain(F)
        n = len(Fb)
        if point_ids is not None and len(point_ids) != n:
            raise InputError(f"point_ids has {len(point_ids)} entries for {n} gradients F")
        stress = np.empty((n, dim, dim))
        tang = np.empty((n, dim, dim, dim, dim)) if tangent else None
        info = {"iterations": np.zeros(n, dtype=int), "time_s": np.zeros(n),
                "energy_density": np.full(n, np.nan)}
        if self.temperature > 0:
            info["stress_stderr"] = np.zeros((n, dim, dim))
        for i, Fi in enumerate(Fb):
            t0 = time.perf_counter()
            key = None if point_ids is None else point_ids[i]
            P, steps, scaled = self._first_piola(Fi, self.states.get(key))
            info["energy_density"][i] = self._energy_density()
            if self.temperature > 0:
                P, err = self._thermal_first_piola(Fi, scaled, self._thermostat_rng(key, Fi))
                info["stress_stderr"][i] = err[:dim, :dim]
            stress[i] = P[:dim, :dim]
            if tangent:
                tang[i] = self._tangent(Fi, scaled, dim)
            if key is not None:
                self.states[key] = scaled
            info["iterations"][i] = steps
            info["time_s"][i] = time.perf_counter() - t0
        return MicroResult(stress, tang, None, info)

    def cauchy(self, F: np.ndarray) -> np.ndarray:
        """Cauchy stress σ (3, 3), GPa, of the relaxed cell at one F̄ (2×2 or 3×3)."""
        Fb, _ = embed_plane_strain(F)
        P, _, _ = self._first_piola(Fb[0], None)
        return P @ Fb[0].T / np.linalg.det(Fb[0])

    # ------------------------------------------------------------------ internals
    def _energy_density(self) -> float:
        """W̄ = (E − E₀)/V₀ in GPa of the cell as last relaxed (E₀: relaxed reference); NaN at
        a finite temperature, where the free energy is not computed."""
        if self.temperature > 0:
            return np.nan
        E = self.atoms.get_potential_energy()
        if self._e0 is None:
            scaled, cell = self.atoms.get_scaled_positions(), self.atoms.cell.array.copy()
            self._first_piola(np.eye(3), None)
            self._e0 = self.atoms.get_potential_energy()
            self.atoms.set_cell(cell, scale_atoms=False)
            self.atoms.set_scaled_positions(scaled)
        return (E - self._e0) / self.reference.get_volume() / units.GPa

    def _first_piola(self, F: np.ndarray, start: np.ndarray | None
                     ) -> tuple[np.ndarray, int, np.ndarray]:
        """(P̄ (3, 3) GPa, relaxation steps, relaxed scaled positions) at F̄."""
        atoms = self.atoms
        atoms.set_cell(self.reference.cell.array @ F.T, scale_atoms=False)
        atoms.set_scaled_positions(self.reference.get_scaled_positions()
                                   if start is None else start)
        steps = 0
        if self.relax:
            opt = LBFGS(atoms, logfile=None, comm=SERIAL)
            converged = opt.run(fmax=self.fmax, steps=self.max_steps)
            steps = opt.get_number_of_steps()
            if not converged:
                raise SolveError(f"relaxation at F={F.tolist()} did not reach fmax={self.fmax} "
                                 f"eV/Å in {self.max_steps} steps: raise max_steps or fmax")
        sigma = atoms.get_stress(voigt=False) / units.GPa
        J = np.linalg.det(F)
        return J * sigma @ np.linalg.inv(F).T, steps, atoms.get_scaled_positions()

    def _thermostat_rng(self, key: Hashable | None, F: np.ndarray) -> np.random.Generator:
        if key is None:
            return np.random.default_rng(self._rng.integers(2**63))
        digest = hashlib.sha256(repr(key).encode() + np.ascontiguousarray(F, float).tobytes())
        return np.random.default_rng(np.random.SeedSequence(
            [self._seed, *np.frombuffer(digest.digest()[:16], dtype=np.uint32).tolist()]))

    def _thermal_first_piola(self, F: np.ndarray, scaled: np.ndarray, rng: np.random.Generator
                             ) -> tuple[np.ndarray, np.ndarray]:
        """Time-averaged P̄ (3, 3) and its standard error, GPa, of a Langevin NVT run at F̄
        started from the relaxed positions ``scaled``, thermostat noise from ``rng``."""
        from ase.md.langevin import Langevin
        from ase.md.velocitydistribution import thermalize_momenta

        atoms = self.atoms
        atoms.set_cell(self.reference.cell.array @ F.T, scale_atoms=False)
        atoms.set_scaled_positions(scaled)
        thermalize_momenta(atoms, self.temperature, rng=rng, comm=SERIAL)
        atoms.set_constraint(FixCom())  # no drift of the centre of mass
        dyn = Langevin(atoms, self.timestep * units.fs, temperature_K=self.temperature,
                       friction=self.friction / units.fs, fixcm=False, rng=rng, comm=SERIAL)
        try:
            dyn.run(self.equilibration_steps)
            Finv_T = np.linalg.inv(F).T * np.linalg.det(F)
            samples = np.empty((self.md_steps, 3, 3))
            for k in range(self.md_steps):
                dyn.run(1)
                sigma = atoms.get_stress(voigt=False, include_ideal_gas=True) / units.GPa
                samples[k] = sigma @ Finv_T
        finally:
            atoms.set_constraint()
            atoms.set_velocities(np.zeros((len(atoms), 3)))
        err, _ = statistical_error(samples)
        return samples.mean(axis=0), err

    def _tangent(self, F: np.ndarray, scaled: np.ndarray, dim: int) -> np.ndarray:
        """Central differences of the relaxed P̄ in the in-plane (2D) or all (3D) components."""
        h = self.fd_step
        A = np.empty((dim, dim, dim, dim))
        for k in range(dim):
            for m in range(dim):
                dF = np.zeros((3, 3))
                dF[k, m] = h
                Pp = self._first_piola(F + dF, scaled)[0]
                Pm = self._first_piola(F - dF, scaled)[0]
                A[:, :, k, m] = ((Pp - Pm) / (2 * h))[:dim, :dim]
        return A


LATTICES = ("fcc", "bcc", "hcp", "diamond")


def make_calculator(cfg: dict):
    """An ASE calculator from the ``calculator`` config value: ``emt`` (default) or a mapping
    ``{name: lammps, pair_style: ..., pair_coeff: [...]}`` (needs the ``lammps`` module)."""
    spec = cfg.get("calculator", _DEFAULT["calculator"])
    name = spec if isinstance(spec, str) else (spec or {}).get("name")
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if name == "lammps":
        if not isinstance(spec, dict) or "pair_style" not in spec or "pair_coeff" not in spec:
            raise InputError("calculator: {name: lammps, pair_style: ..., pair_coeff: [...]}")
        from neuroscale_couple.adapters.lammps import lammps_calculator

        return lammps_calculator(spec["pair_style"], spec["pair_coeff"])
    raise InputError(f"calculator={spec!r}: use emt or {{name: lammps, pair_style, pair_coeff}}")


def _unit_cell(element: str, lattice: str, a: float) -> Atoms:
    from ase.build import bulk

    if lattice == "hcp":
        return bulk(element, "hcp", a=a, orthorhombic=True)
    return bulk(element, lattice, a=a, cubic=True)


def equilibrium_lattice_constant(cfg: dict, guess: float | None = None) -> float:
    """Lattice constant a₀ (Å) at which the cell of the crystal config ``cfg`` (supercell,
    vacancies; relaxed at fixed cell where it relaxes) has minimal energy, i.e. is free of
    pressure: the stress-free reference of the Cauchy–Born map (hcp: at the ideal c/a)."""
    from ase.data import atomic_numbers, reference_states
    from scipy.optimize import minimize_scalar

    element = cfg["element"]
    a = guess or (reference_states[atomic_numbers[element]] or {}).get("a") or 4.0
    atoms = _crystal_cell(cfg, a)
    atoms.calc = make_calculator(cfg)
    relax = len(atoms) > 1 if cfg.get("relax") is None else cfg["relax"]
    cell, scaled = atoms.cell.array.copy(), atoms.get_scaled_positions()

    def energy(x: float) -> float:
        atoms.set_cell(cell * (x / a), scale_atoms=False)
        atoms.set_scaled_positions(scaled)
        if relax:
            LBFGS(atoms, logfile=None, comm=SERIAL).run(
                fmax=float(cfg.get("fmax", _DEFAULT["fmax"])),
                steps=int(cfg.get("max_steps", _DEFAULT["max_steps"])))
        return atoms.get_potential_energy() / len(atoms)

    return float(minimize_scalar(energy, bracket=(0.97 * a, a, 1.03 * a), tol=1e-10).x)


def _crystal_cell(cfg: dict, a: float) -> Atoms:
    """The (super)cell of a crystal config at lattice constant ``a``, vacancies removed evenly."""
    atoms = _unit_cell(cfg["element"], cfg.get("lattice", _DEFAULT["lattice"]), a).repeat(
        [int(r) for r in cfg.get("supercell", _DEFAULT["supercell"])])
    n_vac = int(cfg.get("vacancies", _DEFAULT["vacancies"]))
    if not 0 <= n_vac < len(atoms):
        raise InputError(f"vacancies={n_vac}: the cell has {len(atoms)} atoms")
    if n_vac:
        del atoms[list(np.linspace(0, len(atoms), n_vac, endpoint=False).astype(int))]
    return atoms


def cauchy_born_from_config(cfg: dict) -> tuple[CauchyBorn, float]:
    """A :class:`CauchyBorn` solver and its lattice constant a₀ (Å) from a config mapping.

    Keys: ``element``; ``lattice`` (fcc|bcc|hcp|diamond); ``a0`` (Å; omit for the equilibrium
    value of this cell with its vacancies relaxed: a stress-free reference); ``supercell``
    ([n, n, n], default [1, 1, 1]); ``vacancies`` (count, removed evenly through the cell);
    ``calculator`` (see :func:`make_calculator`); ``relax``
    (default: when the cell has a basis or vacancies) with ``fmax`` (eV/Å), ``fd_step``,
    ``max_steps`` (see :class:`CauchyBorn`); ``temperature`` (K, default 0) with
    ``md_steps``, ``equilibration_steps``, ``timestep`` (fs), ``friction`` (1/fs), ``seed``.
    """
    from ase.data import atomic_numbers

    element = cfg.get("element")
    if element not in atomic_numbers:
        raise InputError(f"element={element!r}: give a chemical symbol such as Cu")
    lattice = cfg.get("lattice", _DEFAULT["lattice"])
    if lattice not in LATTICES:
        raise InputError(f"lattice={lattice!r}: use one of {', '.join(LATTICES)}")
    reps = cfg.get("supercell", _DEFAULT["supercell"])
    if len(reps) != 3 or any(int(r) < 1 for r in reps):
        raise InputError(f"supercell={reps}: give three positive repetitions like [3, 3, 3]")
    a0 = cfg.get("a0")
    if a0 is not None and not float(a0) > 0:
        raise InputError(f"a0={a0}: the lattice constant must be > 0 Å (omit it for the "
                         "equilibrium value)")
    a0 = float(a0) if a0 is not None else equilibrium_lattice_constant(cfg)
    atoms = _crystal_cell(cfg, a0)
    atoms.calc = make_calculator(cfg)
    md = {k: cfg[k] for k in ("fmax", "fd_step", "max_steps", "md_steps", "equilibration_steps",
                              "timestep", "friction", "seed") if k in cfg}
    return CauchyBorn(atoms, relax=cfg.get("relax"),
                      temperature=float(cfg.get("temperature", _DEFAULT["temperature"])),
                      **md), a0
