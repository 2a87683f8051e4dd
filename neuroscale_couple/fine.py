"""The fine-solver contract: what the true solvers, the operator and the Coupler all provide.

Like an ASE calculator, a :class:`FineSolver` declares what it computes in
``implemented_properties`` and answers one call, :meth:`FineSolver.solve`, for a batch of macro
states. A host never branches on which kind of fine solver it holds.
"""

from __future__ import annotations

import functools
import gc
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from neuroscale_couple.errors import InputError


@dataclass
class MicroResult:
    """Homogenized response of a batch of n micro problems.

    Attributes
    ----------
    stress : (n, d, d) first Piola–Kirchhoff stress P̄, float64 (d = 2 plane strain; 3 for 3D
        cells).
    tangent : (n, d, d, d, d) consistent tangent ∂P̄/∂F̄, or None when not asked for.
    fields : micro fields sampled on a regular r^d grid of the unit cell, each (n, r, ..., ...),
        e.g. ``w`` (n, r, r, 2) fluctuation, ``F`` and ``P`` (n, r, r, 2, 2) in 2D; None if not
        asked for.
    info : per-point solver information, each array of length n: ``iterations`` (of the
        solver's nonlinear solve: the RVE's Newton iterations, a crystal's relaxation steps) and
        ``time_s`` from every fine solver; ``substeps``, ``energy_density``,
        ``stress_stderr``, ... where a solver has them.
    """

    stress: np.ndarray
    tangent: np.ndarray | None = None
    fields: dict[str, np.ndarray] | None = None
    info: dict[str, np.ndarray] = field(default_factory=dict)


class FineSolver(ABC):
    """A solver mapping macro deformation gradients F̄ to homogenized stress and tangent.

    Besides :meth:`solve`, the contract has an optional lifecycle whose defaults do nothing:
    :meth:`register` (structures of the points), :meth:`begin_step` / :meth:`end_step` (load
    step boundaries), :meth:`checkpoint_state` / :meth:`restore_state` (restart) and
    :meth:`close`. ``states`` holds the warm-start state of each point id (empty for a solver
    that keeps none): an array, or a tuple of arrays and None (so that :func:`pack_states` can
    checkpoint it); a cache of solvers moves them between instances.
    """

    implemented_properties: tuple[str, ...] = ("stress", "tangent")
    states: dict[Hashable, object]

    def __init__(self) -> None:
        self.states = {}

    @abstractmethod
    def solve(
        self,
        F: np.ndarray,
        *,
        point_ids: Sequence[Hashable] | None = None,
        tangent: bool = True,
        fields_resolution: int | None = None,
    ) -> MicroResult:
        """Solve the micro problem for each F̄ in a batch.

        Parameters
        ----------
        F : (d, d) or (n, d, d) macro deformation gradients (d = 2 plane strain, 3 for 3D
            cells).
        point_ids : one key per F̄ (e.g. a quadrature point); a solver may warm-start a point from
            its last converged state under the same key.
        tangent : whether to compute the consistent tangent.
        fields_resolution : if given, sample micro fields on an r^d grid.
        """

    def register(self, point_ids: Sequence[Hashable], structures: Sequence) -> None:  # noqa: B027  (an optional hook)
        """Attach a structure to each point id of this rank (a solver of one structure has
        nothing to do)."""

    def begin_step(self, step: int) -> None:  # noqa: B027  (an optional hook)
        """Start load step ``step`` (again after a cut-back); never inside a Newton solve."""

    def end_step(self, steps_left: int | None = None) -> object | None:
        """End the current load step (collective); returns the step's figures as a dataclass
        (the Coupler's :class:`~neuroscale_couple.coupler.StepReport`), None if none."""
        return None

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        """What a restart needs besides the model file: this rank's state between load steps
        as named arrays, which a checkpoint stores bit for bit, one file per rank (nothing
        here)."""
        return {}

    def restore_state(self, states: Sequence[Mapping[str, np.ndarray]]) -> None:  # noqa: B027  (an optional hook)
        """Resume from :meth:`checkpoint_state` (collective): ``states`` holds this rank's
        own when the run restarts on as many ranks as it was checkpointed on, else every
        rank's, in rank order."""

    def close(self) -> None:  # noqa: B027  (an optional hook)
        """Release what the solver holds (PETSc objects, communicators, threads)."""

    def memory_bytes(self) -> int:
        """Estimated bytes of memory the solver holds now, i.e. what :meth:`close` frees (its
        warm-start ``states`` not counted: a cache keeps them when it evicts the solver).
        A solver that holds little reports 0 (the default): a :class:`SolverCache` then bounds
        it by count only."""
        return 0

    def communicators(self) -> int:
        """MPI communicators the solver holds now (0, the default, for one that holds none): a
        :class:`SolverCache` keeps the sum over its awake solvers within what MPI has left."""
        return 0

    def hibernate(self) -> bool:
        """Release what the solver can rebuild from plain arrays it keeps (communicators, PETSc
        objects, most of its memory), keeping its ``states``; its next :meth:`solve` resumes
        it. True if it did; False (the default) for a solver that cannot: a
        :class:`SolverCache` closes that one instead."""
        return False


#: Default number of live fine solvers a rank keeps, awake or hibernated (a solved RVE holds 14
#: MPI communicators awake, so ~127 are awake in a fresh process; a hibernated one holds none).
LIVE_SOLVERS = 1024
#: Default memory budget of a rank's live fine solvers, bytes (2 GiB: measured, 113 awake RVEs of
#: the default mesh, ~15 MB each by their estimate, and 887 hibernated ones, ~0.5 MB each).
LIVE_MEMORY = 2 * 1024**3
#: MPI communicators a :class:`SolverCache` leaves to the rest of the process (host code, PETSc,
#: MPI-IO, and those closed solvers leave in reference cycles until a garbage collection).
RESERVED_COMMUNICATORS = 256


class SolverCache:
    """A bounded set of live fine solvers, one per microstructure key: awake ones, and
    hibernated ones (:meth:`FineSolver.hibernate`) that hold no communicators and little
    memory and resume at their next solve.

    Three bounds hold. The awake solvers' :meth:`FineSolver.communicators` stay within
    ``communicators`` (None: what MPI has left when the first solver reports some, less
    :data:`RESERVED_COMMUNICATORS`; MPICH allows 2048 a process, a solved RVE holds 14);
    all live solvers' :meth:`FineSolver.memory_bytes` stay within ``memory`` bytes (None: no
    budget); and at most ``capacity`` solvers are live. A solver about to be built or woken
    counts as the largest seen (bytes and communicators), so that the bounds hold once it has
    solved too. At least one solver is kept, whatever the budgets.

    To make room for communicators or memory it hibernates an awake solver (closes one that
    cannot hibernate; closes a hibernated one once none is awake); to make room in the count it
    closes one. The one chosen is the one used longest ago among those not yet used in the
    current pass (:meth:`new_pass`, one per evaluation of all points); when every candidate was
    used in this pass — a pass over more solvers than fit, as classic FE² on more points per
    rank — the one used last, so all but one stay as they are across passes instead of each
    being rebuilt (least-recently-used eviction would miss on every solve of such a cyclic
    sweep). The warm-start states of a closed solver (its ``states``) are kept and handed to
    the solver rebuilt for the same key; a hibernated one keeps its own.
    """

    def __init__(self, factory: Callable[[object], FineSolver], capacity: int = LIVE_SOLVERS,
                 memory: int | None = None, communicators: int | None = None) -> None:
        if capacity < 1:
            raise InputError(f"cache capacity={capacity}: keep at least one fine solver")
        if memory is not None and not memory > 0:
            raise InputError(f"cache memory={memory}: give a budget in bytes > 0, or None")
        if communicators is not None and not communicators > 0:
            raise InputError(f"cache communicators={communicators}: give a number > 0, or None "
                             "(what MPI has left)")
        self.factory, self.capacity, self.memory = factory, capacity, memory
        self.communicators = communicators
        self._live: OrderedDict[Hashable, FineSolver] = OrderedDict()
        self._asleep: set[Hashable] = set()
        self._used: dict[Hashable, int] = {}  # pass of each live solver's last use
        self._pass = 0
        self._saved: dict[Hashable, dict] = {}
        self.largest = 0  # bytes of the largest solver seen
        self.largest_communicators = 0  # communicators of the busiest solver seen
        self.setup_time = 0.0
        self.builds = 0
        self.evictions = 0  # solvers closed to make room
        self.hibernations = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._live

    def __len__(self) -> int:
        return len(self._live)

    def awake(self) -> int:
        """Number of live solvers not hibernating."""
        return len(self._live) - len(self._asleep)

    def memory_bytes(self) -> int:
        """Estimated bytes the live solvers hold (the sum of their
        :meth:`FineSolver.memory_bytes`; 0 for a solver without one, e.g. a duck-typed one)."""
        sizes = [solver_memory(s) for s in self._live.values()]
        self.largest = max([self.largest, *sizes])
        return sum(sizes)

    def communicators_held(self) -> int:
        """MPI communicators the live solvers hold (the sum of their
        :meth:`FineSolver.communicators`)."""
        counts = [solver_communicators(s) for s in self._live.values()]
        self.largest_communicators = max([self.largest_communicators, *counts])
        return sum(counts)

    def get(self, key: Hashable, spec: object) -> FineSolver:
        """The solver of ``key``, built from ``spec`` (e.g. a microstructure) if not live."""
        self._used[key] = self._pass
        if key in self._live:
            self._live.move_to_end(key)
            if key in self._asleep:  # it resumes at its next solve
                self._make_room(key)
                self._asleep.discard(key)
            return self._live[key]
        self._make_room(None)
        t0 = time.perf_counter()
        solver = self.factory(spec)
        self.setup_time += time.perf_counter() - t0
        self.builds += 1
        if key in self._saved:
            solver.states.update(self._saved.pop(key))
        self._live[key] = solver
        return solver

    def _make_room(self, waking: Hashable | None) -> None:
        """Hibernate or close live solvers until one more awake solver (``waking``, or a new
        one if None) fits the bounds."""
        while True:
            others = [k for k in self._live if k != waking]
            awake = [k for k in others if k not in self._asleep]
            if waking is None and len(self._live) >= self.capacity:
                candidates, hibernate = others, False
            elif self._over_budget():
                candidates, hibernate = awake or others, bool(awake)
            else:
                return
            if not candidates:
                return
            stale = (k for k in candidates if self._used[k] < self._pass)
            old_key = next(stale, candidates[-1])  # all used in this pass: the one used last
            old = self._live[old_key]
            if hibernate and hibernate_solver(old):
                self._asleep.add(old_key)
                self.hibernations += 1
                continue
            del self._live[old_key], self._used[old_key]
            self._asleep.discard(old_key)
            self._saved[old_key] = dict(old.states)
            close_solver(old)
            self.evictions += 1

    def _over_budget(self) -> bool:
        """Whether one more awake solver, as large as the largest seen, would exceed the
        memory or communicator budget."""
        if self.memory is not None and self.memory_bytes() + self.largest > self.memory:
            return True
        held = self.communicators_held()
        if not self.largest_communicators:
            return False  # solvers that hold none (or none built yet)
        if self.communicators is None:
            from neuroscale_couple.parallel import free_communicators

            self.communicators = held + free_communicators() - RESERVED_COMMUNICATORS
        return held + self.largest_communicators > self.communicators

    def pop_state(self, key: Hashable, point_id: Hashable) -> object | None:
        """Remove and return the warm-start state of ``point_id`` in the solver of ``key`` (live
        or evicted); None if there is none."""
        live = self._live.get(key)
        states = live.states if live is not None else self._saved.get(key, {})
        return states.pop(point_id, None)

    def put_state(self, key: Hashable, point_id: Hashable, state: object) -> None:
        """Give the solver of ``key`` the warm-start state of ``point_id`` (handed over when it
        is built if it is not live), e.g. one a point brought from another rank."""
        live = self._live.get(key)
        if live is None:
            self._saved.setdefault(key, {})[point_id] = state
        else:
            live.states[point_id] = state

    def warm_states(self) -> list[tuple[Hashable, Hashable, object]]:
        """Every warm-start state held, of live and evicted solvers: (key, point id, state)."""
        held = [(key, solver.states) for key, solver in self._live.items()]
        return [(key, pid, state) for key, states in [*held, *self._saved.items()]
                for pid, state in states.items()]

    def new_pass(self) -> None:
        """Start a new pass over the points (the Coupler calls it at every evaluation)."""
        self._pass += 1

    def close(self) -> None:
        """Close every live solver and hand the freed memory back to the system."""
        while self._live:
            close_solver(self._live.popitem()[1])
        self._asleep.clear()
        self._used.clear()
        self._saved.clear()
        gc.collect()
        release_memory()


def solver_memory(solver: object) -> int:
    """:meth:`FineSolver.memory_bytes` of ``solver``; 0 for a solver that does not report it."""
    memory_bytes = getattr(solver, "memory_bytes", None)
    return 0 if memory_bytes is None else int(memory_bytes())


def solver_communicators(solver: object) -> int:
    """:meth:`FineSolver.communicators` of ``solver``; 0 for a solver that does not report
    them."""
    communicators = getattr(solver, "communicators", None)
    return 0 if communicators is None else int(communicators())


def pack_states(entries: Sequence[tuple[Hashable, int, object]], prefix: str
                ) -> dict[str, np.ndarray]:
    """Warm-start states (structure key, point id, state) as named arrays under ``prefix``,
    bit-exact through ``np.savez``: ``key`` (n,) str, ``id`` (n,) int64, ``parts`` (n,) (−1: the
    state is an array, else the length of its tuple) and ``<i>/<j>``, part j of state i (an
    absent name: None). Another kind of state raises :class:`InputError`."""
    arrays = {f"{prefix}/key": np.array([str(key) for key, _, _ in entries], dtype=str),
              f"{prefix}/id": np.array([pid for _, pid, _ in entries], dtype=np.int64)}
    n_parts = []
    for i, (key, pid, state) in enumerate(entries):
        parts = (state,) if isinstance(state, np.ndarray) else state
        if not isinstance(parts, tuple) or not all(
                p is None or isinstance(p, np.ndarray) for p in parts):
            raise InputError(f"the warm-start state of point {pid} ({key}) is a "
                             f"{type(state).__name__}: a checkpoint stores an array or a tuple "
                             "of arrays and None")
        n_parts.append(-1 if isinstance(state, np.ndarray) else len(parts))
        arrays.update({f"{prefix}/{i}/{j}": p for j, p in enumerate(parts) if p is not None})
    arrays[f"{prefix}/parts"] = np.array(n_parts, dtype=np.int64)
    return arrays


def unpack_states(arrays: Mapping[str, np.ndarray], prefix: str
                  ) -> list[tuple[str, int, object]]:
    """The warm-start states that :func:`pack_states` stored under ``prefix``."""
    keys, ids = arrays[f"{prefix}/key"].tolist(), arrays[f"{prefix}/id"].tolist()
    entries = []
    for i, (key, pid, n) in enumerate(zip(keys, ids, arrays[f"{prefix}/parts"].tolist(),
                                          strict=True)):
        state = arrays[f"{prefix}/{i}/0"] if n < 0 else tuple(
            arrays.get(f"{prefix}/{i}/{j}") for j in range(n))
        entries.append((key, pid, state))
    return entries


COLLECT_EVERY = 16
_released = 0


def close_solver(solver: FineSolver) -> None:
    """Close a solver; every ``COLLECT_EVERY``-th close or hibernation also collects garbage,
    freeing what released solvers left in reference cycles (MPI communicators among it) at a
    fraction of a collection each, and hands freed memory back to the system
    (:func:`release_memory`)."""
    solver.close()
    _count_release()


def hibernate_solver(solver: FineSolver) -> bool:
    """Hibernate a solver (:meth:`FineSolver.hibernate`, collecting garbage as
    :func:`close_solver` does); False for one that cannot (a duck-typed one without it)."""
    hibernate = getattr(solver, "hibernate", None)
    if hibernate is None or not hibernate():
        return False
    _count_release()
    return True


def _count_release() -> None:
    global _released
    _released += 1
    if _released % COLLECT_EVERY == 0:
        gc.collect()
        release_memory()


def release_memory() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``; nothing elsewhere).

    A closed RVE frees its LU factors and mesh, but the C allocator keeps the pages for reuse,
    so the process's resident size would stay at its peak; trimming (10–30 ms, measured) makes
    it follow the live solvers down."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
