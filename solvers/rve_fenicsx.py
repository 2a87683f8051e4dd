"""The true fine solver of FE²: a periodic RVE homogenization in DOLFINx 0.11.

For a macro deformation gradient F̄ (d×d: d = 2 plane strain, d = 3 solid cells, the cell's
``dim``) the micro deformation on the unit cell Y = [0, 1)^d is
F(y) = F̄ + ∇w(y) with a fluctuation w that is periodic (or zero on ∂Y for affine conditions).
Equilibrium, in weak form, is

    R(w; v) = ∫_Y P(F̄ + ∇w) : ∇v dy = 0   for all admissible v,

solved by Newton (PETSc SNES, MUMPS) in the reduced space w = 𝒫 w_r of :mod:`.periodic`.

Homogenized output, with X_kl the interpolated affine field y ↦ E_kl y (∇X_kl = E_kl) and K the
unconstrained Jacobian at the solution:

    P̄_ij = ⟨P⟩_ij = R(w; X_ij) / |Y|
    A_ijkl = ∂P̄_ij/∂F̄_kl = (K X_ij) · (X_kl + ∂w/∂F̄_kl) / |Y|,   ∂w_r/∂F̄_kl = −K_r⁻¹ 𝒫ᵀ K X_kl

i.e. the consistent tangent by static condensation: one factorization of K_r = 𝒫ᵀ K 𝒫 at the
converged state and d² solves (4 in 2D, 9 in 3D). The sensitivities ∂w/∂F̄ also give a
first-order predictor when a point is warm-started at a new F̄.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Hashable, Sequence

from mpi4py import MPI

import dolfinx_solver  # noqa: F401  (must be imported before dolfinx)
import numpy as np
import ufl
from dolfinx import fem, geometry
from dolfinx.fem import petsc as fem_petsc
from dolfinx.mesh import create_mesh
from petsc4py import PETSc

from neuroscale_couple.config import check_keys
from neuroscale_couple.errors import InputError, SolveError
from neuroscale_couple.fine import FineSolver, MicroResult
from neuroscale_couple.materials import (
    DEFAULT_LAW,
    EPOXY_LIKE_MATRIX,
    GLASS_LIKE_FIBRE,
    Phase,
    TwoPhaseMaterial,
    check_law,
)
from neuroscale_couple.solvers.periodic import BOUNDARY_CONDITIONS, prolongation
from neuroscale_couple.solvers.phase_cell import (  # noqa: F401  (RVE_CONFIG_KEYS: re-exported)
    FIBRE,
    MATRIX,
    RVE_CONFIG_KEYS,
    PhaseCell,
)
from neuroscale_couple.tensors import as_deformation_batch

log = logging.getLogger(__name__)

#: Element size per degree that puts the homogenized stiffness within ~1 % of the mesh-converged
#: value for the composites of the FE² example (see tests/integration/test_rve_convergence.py).
DEFAULT_MESH_SIZE = {1: 0.02, 2: 0.05}
#: ... times this factor per cell dimension: a 3D cell at the 2D sizes would have ~10⁶ dofs
MESH_SIZE_SCALE = {2: 1.0, 3: 5.0}
#: MPI communicators a serial RVE holds once built (measured with MPICH, bench/rve_live.py): 4
#: its mesh (topology and index maps), 2 its function spaces' index maps, 3 PETSc's duplicates
#: (one more, PETSc's own of COMM_SELF, is shared by all the process's RVEs); a P2 RVE's curved
#: mesh holds one more, the index map of its geometry's nodes
COMMUNICATORS_BUILT = 9
#: ... and more once MUMPS has factorized (MUMPS's and PETSc's duplicates for it)
COMMUNICATORS_MUMPS = 5
# memory of an RVE's mesh, function spaces, forms and phase fields per owned cell, fitted to the
# resident-size growth of building P1 RVEs (sizes 0.05–0.01) less their matrices and vectors
MESH_BYTES_PER_CELL = 150
# resident memory of a hibernated RVE besides its arrays and warm-start states (allocator pages
# its released objects leave partly used), measured: 0.17–0.32 MB at mesh sizes 0.1–0.02
ASLEEP_BYTES = 250_000
# largest MUMPS working-space margin ICNTL(14), in %, that a failed factorization grows to
MAX_MUMPS_MARGIN = 3200
_ids = itertools.count()


def solver_options(petsc_options: dict) -> dict:
    """The RVE's PETSc options: Newton with backtracking and MUMPS LU, updated by
    ``petsc_options`` (checked: MUMPS controls as ``mat_mumps_icntl_<i>`` /
    ``mat_mumps_cntl_<i>``, and only with a MUMPS LU).

    A distributed cell's assembly sums in varying order, and so varies MUMPS's pivots: a 4-rank
    P2 cell sometimes ran out of MUMPS working space (INFOG(1) = -9); the RVE then raises the
    margin ICNTL(14) and factorizes again (``PeriodicRVE._grow_lu_workspace``).
    """
    options = {"snes_type": "newtonls", "snes_linesearch_type": "bt", "ksp_type": "preonly",
               "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"} | dict(petsc_options)
    mumps = [k for k in options if k.startswith("mat_mumps_")]
    if mumps and (options["pc_type"], options["pc_factor_mat_solver_type"]) != ("lu", "mumps"):
        raise InputError(f"petsc_options {sorted(mumps)}: MUMPS controls need pc_type lu with "
                         "pc_factor_mat_solver_type mumps")
    for key in mumps:
        kind, _, index = key.removeprefix("mat_mumps_").partition("_")
        if kind not in ("icntl", "cntl") or not index.isdigit():
            raise InputError(f"petsc_options {key!r}: give MUMPS controls as "
                             "mat_mumps_icntl_<i> or mat_mumps_cntl_<i>")
    return options


def first_piola(law: str, F, lmbda, mu):
    """UFL first Piola–Kirchhoff stress of a phase law (see :mod:`..materials`) for a d×d UFL
    deformation gradient F (d = 2: plane strain, d = 3)."""
    eye = ufl.Identity(ufl.shape(F)[0])
    if law == "linear":
        eps = ufl.sym(F - eye)
        return lmbda * ufl.tr(eps) * eye + 2 * mu * eps
    F_inv_T = ufl.inv(F).T
    return mu * (F - F_inv_T) + lmbda * ufl.ln(ufl.det(F)) * F_inv_T


class PeriodicRVE(FineSolver):
    """A periodic RVE of one microstructure, built once and solved for many F̄: plane strain
    for a 2D cell, F̄ 2×2; a solid for a 3D cell (:mod:`..cells3d`), F̄ 3×3.

    Parameters
    ----------
    microstructure : the unit cell: a two-phase cell
        (:class:`~neuroscale_couple.solvers.phase_cell.PhaseCell`) of any family, 2D or 3D.
    law : ``linear`` or ``neo_hookean`` (both phases).
    matrix, fibre : phase moduli; stresses come out in the unit of E.
    mesh_size : element size in cell lengths (default: ``DEFAULT_MESH_SIZE[degree]`` ×
        ``MESH_SIZE_SCALE[dim]``: 0.02 (P1) and 0.05 (P2) in 2D, 0.1 and 0.25 in 3D).
    degree : Lagrange degree of the fluctuation, 1 or 2.
    bc : ``periodic`` fluctuations or ``affine`` (w = 0 on ∂Y).
    comm : communicator; the intended use is one serial RVE per rank (``MPI.COMM_SELF``).
    max_substeps : load substeps tried (doubling from 2) before a non-converged solve raises.
    petsc_options : PETSc options of the Newton solver and its LU (as for a DOLFINx problem, no
        prefix), over the defaults: Newton with backtracking, MUMPS LU. Should MUMPS run out of
        working space in a factorization (INFOG(1) = -9: pivoting beyond its estimate, e.g. a
        distributed matrix whose summation order varies the pivots), its margin ICNTL(14) is
        doubled (up to ``MAX_MUMPS_MARGIN`` %) and the factorization repeated.

    While awake the RVE has ``mesh`` (DOLFINx) and ``phase`` ((n_cells,) int32, ``MATRIX`` or
    ``FIBRE`` per owned cell); ``dim`` is the cell's d and ``area`` its measure |Y| (= 1).
    Solved, a 2D RVE holds 14 MPI communicators (:meth:`communicators`) and, at mesh size
    0.02, ~14 MB (11 of them MUMPS's LU factors);
    :meth:`hibernate` releases all the communicators and keeps ~0.22 MB of mesh arrays besides
    the warm-start states (0.26 MB a point), ~0.5 MB resident, and the next solve resumes it
    in 0.03–0.05 s, half a warm solve (measured, ``python bench/rve_live.py``).
    """

    implemented_properties = ("stress", "tangent", "fields")

    def __init__(
        self,
        microstructure: PhaseCell,
        *,
        law: str = DEFAULT_LAW,
        matrix: Phase = EPOXY_LIKE_MATRIX,
        fibre: Phase = GLASS_LIKE_FIBRE,
        mesh_size: float | None = None,
        degree: int = 1,
        bc: str = "periodic",
        comm: MPI.Comm = MPI.COMM_SELF,
        max_substeps: int = 16,
        petsc_options: dict | None = None,
    ) -> None:
        if not isinstance(microstructure, PhaseCell):
            raise InputError(f"the periodic RVE meshes two-phase cells, not a "
                             f"{type(microstructure).__name__}: solve that structure with its "
                             "own fine solver (structure.fine_solver)")
        self.law = check_law(law)
        options = solver_options(petsc_options or {})
        if bc not in BOUNDARY_CONDITIONS:
            raise InputError(f"bc={bc!r} is unknown: use one of {', '.join(BOUNDARY_CONDITIONS)}")
        if degree not in DEFAULT_MESH_SIZE:
            raise InputError(f"degree={degree}: the RVE solver supports P1 and P2 (1 or 2)")
        self.microstructure, self.matrix, self.fibre = microstructure, matrix, fibre
        self.degree, self.bc, self.comm, self.max_substeps = degree, bc, comm, max_substeps
        self.dim = microstructure.dim
        self.mesh_size = float(mesh_size or DEFAULT_MESH_SIZE[degree] * MESH_SIZE_SCALE[self.dim])

        self._options = options
        self._mumps = {k: v for k, v in options.items() if k.startswith("mat_mumps_")}
        # warm-start state per point id: (F̄, reduced w, ∂w/∂F̄); public so that a solver cache
        # can carry it over to a rebuilt RVE of the same microstructure
        self.states: dict[Hashable, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        t0 = time.perf_counter()
        data = microstructure.mesh(comm, self.mesh_size, order=degree)
        phase = np.zeros(data.mesh.topology.index_map(self.dim).size_local, dtype=np.int32)
        owned = data.cell_tags.indices < len(phase)
        phase[data.cell_tags.indices[owned]] = data.cell_tags.values[owned]
        self._build(data.mesh, phase)
        self.setup_time = time.perf_counter() - t0
        log.debug("RVE %s: %d dofs, set up in %.2f s", microstructure.kind, self.dofs,
                  self.setup_time)

    def _build(self, mesh, phase: np.ndarray) -> None:
        """Create the function spaces, forms, PETSc matrices and Newton solver on ``mesh``,
        whose owned cells have the phase tags ``phase`` (n_cells,); what it creates is what
        :meth:`hibernate` releases (the names in ``self._built``)."""
        before = set(self.__dict__)
        degree, comm, d = self.degree, self.comm, self.dim
        self.mesh, self.phase = mesh, phase
        self._lmbda, self._mu = self._phase_fields(self.matrix, self.fibre)
        V = fem.functionspace(self.mesh, ("Lagrange", degree, (d,)))
        self.V = V
        self._w = fem.Function(V, name="w")
        self._Fbar = fem.Constant(self.mesh, np.eye(d))
        self._Fmicro = self._Fbar + ufl.grad(self._w)
        self._Pmicro = first_piola(self.law, self._Fmicro, self._lmbda, self._mu)
        quad = {"quadrature_degree": max(2 * (degree - 1), 1)}
        dx = ufl.Measure("dx", domain=self.mesh, metadata=quad)
        v, du = ufl.TestFunction(V), ufl.TrialFunction(V)
        residual = ufl.inner(self._Pmicro, ufl.grad(v)) * dx
        self._R = fem.form(residual)
        self._J = fem.form(ufl.derivative(residual, self._w, du))
        self.area = comm.allreduce(fem.assemble_scalar(fem.form(1.0 * dx)))

        self._Pr = prolongation(V, self.bc)
        self._b = fem_petsc.create_vector(V)
        self._K = fem_petsc.create_matrix(self._J)
        self._assemble_jacobian()
        self._Kr = self._K.ptap(self._Pr)
        self._wr, self._fr = self._Pr.createVecRight(), self._Pr.createVecRight()
        self._X = self._affine_fields()
        self._snes = self._make_snes(max(self.matrix.E, self.fibre.E), self._options)
        self._factored = False  # whether the LU has a factorization (memory_bytes asks it)
        self._static_bytes: int | None = None
        self._samplers: dict[int, tuple] = {}
        self.dofs = V.dofmap.index_map.size_global * V.dofmap.index_map_bs
        self._built = set(self.__dict__) - before - {"area", "dofs"}  # kept when asleep

    # ------------------------------------------------------------------ public API
    def solve(
        self,
        F: np.ndarray,
        *,
        point_ids: Sequence[Hashable] | None = None,
        tangent: bool = True,
        fields_resolution: int | None = None,
    ) -> MicroResult:
        """Homogenized stress (and tangent, fields) for each F̄ of a batch; see :class:`FineSolver`.

        A point with a ``point_id`` seen before starts from its last converged fluctuation plus
        the first-order predictor ∂w/∂F̄ ΔF̄; other points start from w = 0.

        Raises
        ------
        InputError : bad F̄ (shape, det F̄ ≤ 0) or point_ids of the wrong length.
        SolveError : Newton failed even with ``max_substeps`` load substeps, or the tangent's
            linear solve failed.
        """
        self._check_open()
        d = self.dim
        Fb = as_deformation_batch(F, f"F (for the {d}D {self.microstructure.kind} cell)", (d,))
        n = len(Fb)
        if point_ids is not None and len(point_ids) != n:
            raise InputError(f"point_ids has {len(point_ids)} entries for {n} gradients F")
        self.resume()
        stress = np.empty((n, d, d))
        tang = np.empty((n, d, d, d, d)) if tangent else None
        info = {k: np.zeros(n, dtype=d) for k, d in
                (("iterations", int), ("substeps", int), ("time_s", float))}
        fields: dict[str, list] | None = {} if fields_resolution else None
        for i, Fi in enumerate(Fb):
            t0 = time.perf_counter()
            key = None if point_ids is None else point_ids[i]
            its, subs = self._equilibrate(Fi, key)
            stress[i] = self._stress()
            dwr = None
            if tangent:
                tang[i], dwr = self._tangent()
            if key is not None:
                self.states[key] = (Fi.copy(), self._wr.getArray().copy(), dwr)
            if fields is not None:
                for name, value in self._sample_fields(int(fields_resolution)).items():
                    fields.setdefault(name, []).append(value)
            info["iterations"][i], info["substeps"][i] = its, subs
            info["time_s"][i] = time.perf_counter() - t0
        stacked = None if fields is None else {k: np.stack(v) for k, v in fields.items()}
        return MicroResult(stress, tang, stacked, info)

    def close(self) -> None:
        """Free the PETSc objects now and drop the mesh, forms and functions (collective on
        ``comm``).

        PETSc holds the SNES callbacks, so the garbage collector cannot free an RVE by itself;
        MPICH allows 2048 communicators per process (an awake RVE holds up to
        :data:`COMMUNICATORS_BUILT` + :data:`COMMUNICATORS_MUMPS`), so code that builds many
        RVEs closes them (or uses ``with PeriodicRVE(...) as rve:``), or lets them
        :meth:`hibernate`. Most of an RVE is then freed at once; what sits in reference cycles
        waits for a garbage collection, which :func:`~neuroscale_couple.fine.close_solver` runs
        every few closes (a full collection costs ~0.1 s in a process with torch and DOLFINx,
        as much as building an RVE). The RVE's PETSc options leave the options database with it.
        """
        self._release()
        self.__dict__.clear()

    def hibernate(self) -> bool:
        """Release every DOLFINx and PETSc object — all the RVE's MPI communicators and most of
        its memory — keeping the mesh as plain arrays (:attr:`asleep`), the warm-start
        ``states`` and the MUMPS settings; the next :meth:`solve` rebuilds the RVE from the
        arrays (no meshing, no file; the same mesh and dofs, bit for bit, so the states fit).
        A serial RVE only: on a communicator of several ranks nothing happens (False).
        """
        self._check_open()
        if self.comm.size > 1:
            return False
        if not self.asleep:
            geometry, topology = self.mesh.geometry, self.mesh.topology
            # the arrays create_mesh was given: nodes and cells in their input order
            nodes = np.argsort(geometry.input_global_indices)
            position = np.empty_like(nodes)
            position[nodes] = np.arange(len(nodes))
            cells = np.empty(geometry.dofmaps[0].shape, dtype=np.int64)
            cells[topology.original_cell_index] = position[geometry.dofmaps[0]]
            phase = np.empty_like(self.phase)
            phase[topology.original_cell_index] = self.phase
            x = geometry.x[nodes, : self.dim].copy()
            element = self.mesh.ufl_domain().ufl_coordinate_element()
            self._release()
            self._asleep = (cells, x, phase, element)
        return True

    @property
    def asleep(self) -> bool:
        """Whether the RVE is hibernating (holds its mesh as arrays, no DOLFINx objects)."""
        return "_asleep" in self.__dict__

    def resume(self) -> None:
        """Rebuild a hibernating RVE from its arrays now, as its next solve would (nothing for
        an awake one)."""
        self._check_open()
        if not self.asleep:
            return
        cells, x, phase, element = self._asleep
        mesh = create_mesh(self.comm, cells, ufl.Mesh(element), x)
        del self._asleep
        self._build(mesh, phase[mesh.topology.original_cell_index])

    def _check_open(self) -> None:
        if not self.__dict__:
            raise InputError("this PeriodicRVE was closed: build a new one to solve again")

    def _release(self) -> None:
        """Destroy the PETSc objects, remove the RVE's options from PETSc's database and drop
        what :meth:`_build` made (nothing if asleep)."""
        if "_snes" not in self.__dict__:
            return
        for obj in (self._snes, self._K, self._Kr, self._Pr, self._b, self._wr, self._fr,
                    *self._X):
            obj.destroy()
        opts = PETSc.Options()
        for key in self._option_keys:
            opts.delValue(key)
        for name in self._built:  # the forms, functions and mesh that hold communicators
            del self.__dict__[name]

    def communicators(self) -> int:
        """MPI communicators this RVE holds now on this rank: :data:`COMMUNICATORS_BUILT` (one
        more for P2), :data:`COMMUNICATORS_MUMPS` more once MUMPS has factorized, one per field
        resolution sampled; 0 asleep or closed (measured with MPICH on one rank,
        bench/rve_live.py)."""
        if "_snes" not in self.__dict__:
            return 0
        lu = self._options["pc_type"], self._options["pc_factor_mat_solver_type"]
        mumps = self._factored and lu == ("lu", "mumps")
        return (COMMUNICATORS_BUILT + (self.degree > 1) + COMMUNICATORS_MUMPS * mumps
                + len(self._samplers))

    def memory_bytes(self) -> int:
        """Estimated bytes this RVE holds (what :meth:`close` frees), on this rank: its LU
        factors (MUMPS: the memory it allocated, ``INFO(16)``; another package: PETSc's count of
        the factor's nonzeros), the nonzeros of its matrices K, K_r and 𝒫, its vectors, and
        :data:`MESH_BYTES_PER_CELL` per cell for the mesh, spaces and forms. 0 once closed; the
        factors count from the first solve on. Hibernated: its mesh arrays and
        ``ASLEEP_BYTES`` (measured at mesh size 0.02: 0.22 MB of arrays, ~0.5 MB resident).

        Measured (P1, one rank): at mesh size 0.02 (~6200 cells, ~6500 dofs) 14.4 MB of
        resident memory per solved RVE, of which 11 MB are MUMPS's factors; 2.6 MB at 0.05,
        61 MB at 0.01; P2 at 0.05: 12.3 MB. The estimate is within 10 % of these.
        """
        if self.asleep:
            return ASLEEP_BYTES + sum(a.nbytes for a in self._asleep[:3])
        if "_snes" not in self.__dict__:
            return 0
        if self._static_bytes is None:  # sizes fixed at the build
            scalar = np.dtype(PETSc.ScalarType).itemsize
            index = np.dtype(PETSc.IntType).itemsize
            total = MESH_BYTES_PER_CELL * self.mesh.topology.index_map(self.dim).size_local
            for mat in (self._K, self._Kr, self._Pr):
                total += (int(mat.getInfo()["nz_allocated"]) * (scalar + index)
                          + (mat.getLocalSize()[0] + 1) * index)
            # b, w, the d² affine fields; reduced w, residual and the SNES's work vectors
            total += scalar * ((2 + self.dim**2) * self._b.getLocalSize()
                               + 8 * self._wr.getLocalSize())
            self._static_bytes = total
        return self._static_bytes + self._factor_bytes()

    def _factor_bytes(self) -> int:
        """Bytes of the LU factors on this rank (0 before the first factorization: asking
        MUMPS for its figures before it has set up crashes the process)."""
        if not self._factored:
            return 0
        try:
            factor = self._snes.getKSP().getPC().getFactorMatrix()
            if factor.getType() == "mumps":
                return max(int(factor.getMumpsInfo(16)), 0) * 10**6  # INFO(16): MB allocated
            info = factor.getInfo()
        except PETSc.Error:  # no factorization yet, or no factor matrix (an iterative solver)
            return 0
        return int(info["nz_allocated"]) * (np.dtype(PETSc.ScalarType).itemsize
                                            + np.dtype(PETSc.IntType).itemsize)

    def __enter__(self) -> PeriodicRVE:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def forget(self, point_ids: Sequence[Hashable] | None = None) -> None:
        """Drop stored warm-start states (all of them when ``point_ids`` is None)."""
        if point_ids is None:
            self.states.clear()
        for key in point_ids or ():
            self.states.pop(key, None)

    def virtual_work(self, dF: np.ndarray, dw) -> float:
        """⟨P : δF⟩ = (1/|Y|) ∫_Y P : (δF̄ + ∇δw) dy at the last solved state.

        ``dF`` is a (d, d) virtual macro gradient δF̄ and ``dw`` a callable ``x -> (d, n)`` giving
        a virtual fluctuation at points ``x`` (3, n). For an admissible (periodic) δw Hill–Mandel
        requires this to equal P̄ : δF̄.
        """
        self.resume()
        test = fem.Function(self.V)
        test.interpolate(dw)
        dFc = fem.Constant(self.mesh, np.asarray(dF, dtype=float))
        dx = ufl.Measure("dx", domain=self.mesh, metadata={"quadrature_degree": 2 * self.degree})
        form = fem.form(ufl.inner(self._Pmicro, dFc + ufl.grad(test)) * dx)
        return self.comm.allreduce(fem.assemble_scalar(form)) / self.area

    # ------------------------------------------------------------------ set-up helpers
    def _phase_fields(self, matrix: Phase, fibre: Phase) -> tuple[fem.Function, fem.Function]:
        Q = fem.functionspace(self.mesh, ("DG", 0))
        lmbda, mu = fem.Function(Q), fem.Function(Q)
        for tag, phase in ((MATRIX, matrix), (FIBRE, fibre)):
            cells = np.flatnonzero(self.phase == tag)
            lmbda.x.array[cells], mu.x.array[cells] = phase.lame
        lmbda.x.scatter_forward()
        mu.x.scatter_forward()
        return lmbda, mu

    def _affine_fields(self) -> list[PETSc.Vec]:
        """PETSc vectors of the affine displacement fields y ↦ E_kl y, kl in row-major order."""
        n_own, d = self.V.dofmap.index_map.size_local, self.dim
        y = self.V.tabulate_dof_coordinates()[:n_own, :d]
        fields = []
        for k, l in itertools.product(range(d), range(d)):
            u = np.zeros((n_own, d))
            u[:, k] = y[:, l]
            vec = self._b.duplicate()
            vec.getArray()[: d * n_own] = u.ravel()
            fields.append(vec)
        return fields

    def _make_snes(self, E_max: float, options: dict) -> PETSc.SNES:
        snes = PETSc.SNES().create(self.comm)
        prefix = f"nsrve{next(_ids)}_"
        snes.setOptionsPrefix(prefix)
        opts = PETSc.Options()
        # kept in the database until close(): a factorization package reads its options (e.g.
        # mat_superlu_dist_*) when it first factorizes, and again after a reset
        self._option_keys = [prefix + k for k in options if k not in self._mumps]
        for key, value in options.items():
            if key not in self._mumps:
                opts[prefix + key] = value
        snes.setFunction(self._snes_residual, self._fr)
        snes.setJacobian(self._snes_jacobian, self._Kr)
        # Residual entries are stress × area: converge to 1e-11 E_max absolute or 1e-10 relative.
        snes.setTolerances(rtol=1e-10, atol=1e-11 * E_max, stol=0.0, max_it=25)
        snes.setFromOptions()
        if self._mumps:
            self._set_mumps(snes)
        return snes

    def _set_mumps(self, snes: PETSc.SNES) -> None:
        """Create the LU's factor matrix and set the MUMPS controls ``self._mumps``
        (``mat_mumps_icntl_<i>`` / ``mat_mumps_cntl_<i>``) on it, not in the options database:
        MUMPS reads that at every symbolic factorization, which would undo a margin raised by
        :meth:`_grow_lu_workspace`."""
        ksp = snes.getKSP()
        ksp.setOperators(self._Kr)
        pc = ksp.getPC()
        pc.setFactorSetUpSolverType()
        factor = pc.getFactorMatrix()
        for key, value in self._mumps.items():
            kind, _, index = key.removeprefix("mat_mumps_").partition("_")
            if kind == "icntl":
                factor.setMumpsIcntl(int(index), int(value))
            else:
                factor.setMumpsCntl(int(index), float(value))

    # ------------------------------------------------------------------ assembly
    def _set_fluctuation(self, wr: PETSc.Vec) -> None:
        self._Pr.mult(wr, self._w.x.petsc_vec)
        self._w.x.scatter_forward()

    def _assemble_residual(self) -> None:
        with self._b.localForm() as b_local:
            b_local.set(0.0)
        fem_petsc.assemble_vector(self._b, self._R)
        self._b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)

    def _assemble_jacobian(self) -> None:
        self._K.zeroEntries()
        fem_petsc.assemble_matrix(self._K, self._J)
        self._K.assemble()

    def _snes_residual(self, snes, wr: PETSc.Vec, fr: PETSc.Vec) -> None:
        self._set_fluctuation(wr)
        self._assemble_residual()
        self._Pr.multTranspose(self._b, fr)

    def _snes_jacobian(self, snes, wr: PETSc.Vec, Kr: PETSc.Mat, _pc: PETSc.Mat) -> None:
        self._set_fluctuation(wr)
        self._assemble_jacobian()
        self._K.ptap(self._Pr, result=Kr)
        self._factored = True  # the linear solve that follows factorizes Kr

    # ------------------------------------------------------------------ solve steps
    def _equilibrate(self, F: np.ndarray, key: Hashable | None) -> tuple[int, int]:
        """Converge w for F̄ = F into ``self._wr``; returns (Newton iterations, substeps used)."""
        eye = np.eye(self.dim)
        F_start, w_start, dw_start = self.states.get(key, (eye, None, None))
        if w_start is not None and len(w_start) != self._wr.getLocalSize():
            F_start, w_start, dw_start = eye, None, None  # a state from another mesh
        guess = np.zeros(self._wr.getLocalSize()) if w_start is None else w_start.copy()
        if dw_start is not None:
            guess += np.tensordot((F - F_start).ravel(), dw_start, axes=1)
        if self._newton(F, guess):
            return self._snes.getIterationNumber(), 1
        start = np.zeros_like(guess) if w_start is None else w_start
        its, n_steps = self._snes.getIterationNumber(), 2
        while n_steps <= self.max_substeps:
            log.info("RVE Newton failed at F=%s; retrying with %d load substeps", F.tolist(),
                     n_steps)
            current, ok = start.copy(), True
            for t in np.linspace(0.0, 1.0, n_steps + 1)[1:]:
                ok = self._newton(F_start + t * (F - F_start), current)
                its += self._snes.getIterationNumber()
                if not ok:
                    break
                current = self._wr.getArray().copy()
            if ok:
                return its, n_steps
            n_steps *= 2
        raise SolveError(
            f"RVE Newton solve did not converge for F={F.tolist()} ({self.microstructure.kind}, "
            f"v={self.microstructure.volume_fraction:.3f}) even with {self.max_substeps} load "
            f"substeps (SNES reason {self._snes.getConvergedReason()}): reduce the load increment "
            "or check the material parameters"
        )

    def _newton(self, F: np.ndarray, guess: np.ndarray) -> bool:
        self._Fbar.value[:] = F
        while True:
            self._wr.setArray(guess)
            self._snes.solve(None, self._wr)
            if self._snes.getConvergedReason() > 0 or not self._grow_lu_workspace():
                return self._snes.getConvergedReason() > 0

    def _grow_lu_workspace(self) -> bool:
        """After a failed solve: True if the LU failed for want of MUMPS working space
        (INFOG(1) = -9) and a new factor matrix with twice the margin ICNTL(14) is in place, so
        that factorizing again may succeed (raising the margin of the factor that failed did
        not help, measured up to 3200 %). INFOG is the same on every rank: all ranks decide
        alike."""
        pc = self._snes.getKSP().getPC()
        try:
            factor = pc.getFactorMatrix()
            if factor.getMumpsInfog(1) != -9:
                return False
            margin = factor.getMumpsIcntl(14)
        except PETSc.Error:  # no factorization yet, or not MUMPS
            return False
        if margin >= MAX_MUMPS_MARGIN:
            return False
        grown = min(max(2 * margin, 50), MAX_MUMPS_MARGIN)
        self._mumps["mat_mumps_icntl_14"] = grown
        self._factored = False  # until the next linear solve factorizes the new factor
        try:
            pc.reset()
            self._set_mumps(self._snes)
        except PETSc.Error as err:
            raise SolveError(f"RVE LU: no new MUMPS factorization with ICNTL(14) = {grown} % "
                             f"could be set up ({err})") from err
        log.info("RVE LU: MUMPS ran out of working space (INFOG(1) = -9); factorizing again "
                 "with ICNTL(14) = %d %% (was %d %%)", grown, margin)
        return True

    def _stress(self) -> np.ndarray:
        self._set_fluctuation(self._wr)
        self._assemble_residual()
        d = self.dim
        return np.array([self._b.dot(x) for x in self._X]).reshape(d, d) / self.area

    def _tangent(self) -> tuple[np.ndarray, np.ndarray]:
        """Consistent tangent (d,d,d,d) and reduced sensitivities ∂w_r/∂F̄ (d², n_reduced_local)."""
        self._assemble_jacobian()
        self._K.ptap(self._Pr, result=self._Kr)
        ksp = self._snes.getKSP()
        ksp.setOperators(self._Kr)
        d, dd = self.dim, self.dim**2
        KX = [self._K.createVecLeft() for _ in range(dd)]
        rhs, dwr, dw = self._Pr.createVecRight(), self._Pr.createVecRight(), self._b.duplicate()
        A = np.empty((dd, dd))
        sens = np.empty((dd, self._wr.getLocalSize()))
        for kl, x in enumerate(self._X):
            self._K.mult(x, KX[kl])
        for kl in range(dd):
            self._Pr.multTranspose(KX[kl], rhs)
            rhs.scale(-1.0)
            ksp.solve(rhs, dwr)
            self._factored = True
            while ksp.getConvergedReason() < 0 and self._grow_lu_workspace():
                ksp.solve(rhs, dwr)
                self._factored = True
            if ksp.getConvergedReason() < 0:  # else inf/NaN would pass for a tangent
                raise SolveError(
                    f"RVE tangent: the condensed stiffness solve failed (PETSc KSP reason "
                    f"{ksp.getConvergedReason()}, e.g. -11: the LU factorization failed) for "
                    f"the cell of v={self.microstructure.volume_fraction:.3f}")
            sens[kl] = dwr.getArray()
            self._Pr.mult(dwr, dw)
            dw.axpy(1.0, self._X[kl])
            A[:, kl] = [KX[ij].dot(dw) for ij in range(dd)]
        return A.reshape(d, d, d, d) / self.area, sens

    # ------------------------------------------------------------------ micro fields
    def _sample_fields(self, resolution: int) -> dict[str, np.ndarray]:
        """Micro fields at the r^d pixel centres (row index = y), gathered over the
        communicator: ``w`` (r, ..., d), ``F`` and ``P`` (r, ..., d, d)."""
        if resolution not in self._samplers:
            self._samplers[resolution] = self._make_sampler(resolution)
        points, cells, found, T, exprs = self._samplers[resolution]
        out = {"w": self._w}
        for name, expr in exprs.items():
            fn = fem.Function(T)
            fn.interpolate(expr)
            out[name] = fn
        grid, d = (resolution,) * self.dim, self.dim
        result = {}
        for name, fn in out.items():
            vals = np.zeros((resolution**d, fn.function_space.dofmap.index_map_bs))
            if len(cells):
                vals[found] = fn.eval(points[found], cells)
            self.comm.Allreduce(MPI.IN_PLACE, vals)
            shape = (*grid, d) if name == "w" else (*grid, d, d)
            result[name] = vals.reshape(shape)
        return result

    def _make_sampler(self, r: int):
        d = self.dim
        s = (np.arange(r) + 0.5) / r
        axes = np.meshgrid(*(s,) * d, indexing="ij")  # array axis 0 is the last coordinate
        points = np.zeros((r**d, 3))
        for c in range(d):
            points[:, c] = axes[d - 1 - c].ravel()
        tree = geometry.bb_tree(self.mesh, d)
        colliding = geometry.compute_colliding_cells(
            self.mesh, geometry.compute_collisions_points(tree, points), points)
        n_owned = self.mesh.topology.index_map(d).size_local
        found, cells = [], []
        for i in range(len(points)):
            links = colliding.links(i)
            owned = links[links < n_owned]
            if len(owned):
                found.append(i)
                cells.append(owned[0])
        # A point on an edge between ranks must count once: the lowest rank that has it keeps it.
        mine = np.full(len(points), self.comm.size, dtype=np.int32)
        mine[found] = self.comm.rank
        owner = np.empty_like(mine)
        self.comm.Allreduce(mine, owner, op=MPI.MIN)
        keep = owner[found] == self.comm.rank
        found = np.asarray(found, dtype=np.int64)[keep]
        cells = np.asarray(cells, dtype=np.int32)[keep]
        T = fem.functionspace(self.mesh, ("DG", self.degree - 1, (d, d)))
        ipts = T.element.interpolation_points
        exprs = {"F": fem.Expression(self._Fmicro, ipts), "P": fem.Expression(self._Pmicro, ipts)}
        return points, cells, found, T, exprs


def rve_from_config(cfg: dict, microstructure: PhaseCell,
                    comm: MPI.Comm = MPI.COMM_SELF) -> PeriodicRVE:
    """Build a :class:`PeriodicRVE` from the ``law``, ``matrix``, ``fibre``, ``mesh``, ``bc`` and
    ``petsc_options`` keys of a config mapping (``mesh: {size, degree}`` optional)."""
    mesh = cfg.get("mesh") or {}
    if not isinstance(mesh, dict):
        raise InputError(f"mesh must be a mapping like {{size: 0.02, degree: 1}}, got {mesh!r}")
    check_keys(mesh, ("size", "degree"), "mesh")
    petsc_options = cfg.get("petsc_options") or {}
    if not isinstance(petsc_options, dict):
        raise InputError("petsc_options must be a mapping like {mat_mumps_icntl_14: 50}, got "
                         f"{petsc_options!r}")
    material = TwoPhaseMaterial.from_config(cfg)
    return PeriodicRVE(
        microstructure,
        law=material.law,
        matrix=material.matrix,
        fibre=material.fibre,
        mesh_size=mesh.get("size"),
        degree=int(mesh.get("degree", 1)),
        bc=cfg.get("bc", "periodic"),
        comm=comm,
        petsc_options=petsc_options,
    )
