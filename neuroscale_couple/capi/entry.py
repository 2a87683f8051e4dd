"""The Python implementation of the C ABI: ``nsi_<name>`` for each ``ns_<name>`` of
include/neuroscale.h, bound into libneuroscale.so by cffi's embedding init code.

Each function turns the host's pointers into numpy arrays (views, no copy of outputs), checks
them and runs the :class:`~neuroscale_couple.capi.session.Session` of the handle. Any exception
— NeuroScale's own, a bug, even ``SystemExit`` — becomes an error code and the message
:c:func:`ns_last_error` returns: nothing raised here reaches the host. Checks of collective
calls run inside :func:`~neuroscale_couple.parallel.together`, so bad input on one rank is an
error on every rank and no rank waits forever.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import traceback
from collections.abc import Callable
from typing import Any

from mpi4py import MPI

import numpy as np

from neuroscale_couple.errors import (
    CheckpointError,
    InputError,
    NeuroScaleError,
    SolveError,
)
from neuroscale_couple.parallel import together

log = logging.getLogger(__name__)

_sessions: dict[int, Any] = {}  # handle → Session
_next_handle = [1]


def error_code(err: BaseException, lib) -> int:
    """The NS_ERR_* code of an exception."""
    for kind, code in ((InputError, lib.NS_ERR_INPUT), (SolveError, lib.NS_ERR_SOLVE),
                       (CheckpointError, lib.NS_ERR_CHECKPOINT)):
        if isinstance(err, kind):
            return code
    return lib.NS_ERR_RUNTIME


def bind(ffi, lib) -> None:
    """Attach the ``nsi_*`` functions to the library (cffi's ``def_extern``)."""
    if importlib.util.find_spec("dolfinx_solver") is not None:
        import dolfinx_solver  # noqa: F401  (before any dolfinx import: loads its MPI)

    def entry(fn: Callable[..., None]) -> None:
        """Export ``fn`` as ``nsi_<name>``: returns NS_OK, or an error code and message."""
        @functools.wraps(fn)
        def call(*args) -> int:
            try:
                lib.nsi_set_error(b"")
                fn(*args)
                return lib.NS_OK
            except BaseException as err:  # the host must keep running, whatever happened
                known = isinstance(err, NeuroScaleError)
                message = str(err) if known else "".join(
                    traceback.format_exception_only(err)).strip()
                if not known:
                    log.error("%s failed:\n%s", fn.__name__, traceback.format_exc())
                lib.nsi_set_error(f"{fn.__name__}: {message}".encode(errors="replace"))
                return error_code(err, lib)
        ffi.def_extern(name=f"nsi_{fn.__name__}", error=lib.NS_ERR_RUNTIME)(call)

    def array(ptr, shape: tuple[int, ...], dtype: type, name: str) -> np.ndarray:
        """A numpy view of the host's buffer ``ptr`` of ``shape``; NULL raises."""
        if ptr == ffi.NULL:
            raise InputError(f"{name} is NULL: give an array of shape {shape}")
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(ffi.buffer(ptr, size), dtype=dtype).reshape(shape)

    def text(ptr, name: str) -> str:
        if ptr == ffi.NULL:
            raise InputError(f"{name} is NULL: give a path")
        return ffi.string(ptr).decode()

    def session(handle: int):
        s = _sessions.get(handle)
        if s is None:
            raise InputError(f"handle {handle} is not a live coupler: use the handle ns_create "
                             "gave (and not after ns_destroy)")
        return s

    def count(n: int) -> int:
        if n < 0:
            raise InputError(f"n = {n}: give the number of points (≥ 0)")
        return n

    @entry
    def create(config, comm, handle) -> None:
        from neuroscale_couple.capi.session import Session

        host_comm = MPI.Comm.f2py(comm)
        with together(host_comm, "ns_create's arguments"):
            if handle == ffi.NULL:
                raise InputError("handle is NULL: give the address of an int to receive it")
            path = text(config, "config_path")
        s = Session(path, host_comm)
        _sessions[_next_handle[0]] = s
        handle[0], _next_handle[0] = _next_handle[0], _next_handle[0] + 1

    @entry
    def register(handle, n, point_ids, micro_ids) -> None:
        s = session(handle)
        with together(s.comm, "ns_register's arguments"):
            m = count(n)
            ids = array(point_ids, (m,), np.int64, "point_ids").copy()
            micro = array(micro_ids, (m,), np.int64, "micro_ids").copy()
        s.register(ids, micro)

    @entry
    def evaluate(handle, n, point_ids, F, P, A, bound, source) -> None:
        s = session(handle)
        with together(s.comm, "ns_evaluate's arguments"):
            m = count(n)
            ids = array(point_ids, (m,), np.int64, "point_ids").copy()
            Fb = array(F, (m, 2, 2), np.float64, "F").copy()
            P_out = array(P, (m, 2, 2), np.float64, "P")
            outputs = [(array(p, shape, dtype, name), field) for p, shape, dtype, name, field in (
                (A, (m, 2, 2, 2, 2), np.float64, "A", "tangent"),
                (bound, (m,), np.float64, "bound", "uncertainty"),
                (source, (m,), np.int32, "source", "source")) if p != ffi.NULL]
        r = s.evaluate(ids, Fb)
        P_out[...] = r.stress
        for out, field in outputs:
            out[...] = getattr(r, field)

    @entry
    def begin_step(handle, step) -> None:
        s = session(handle)
        with together(s.comm, "ns_begin_step's arguments"):
            if step < 0:
                raise InputError(f"step = {step}: load steps count from 0")
        s.begin_step(int(step))

    @entry
    def end_step(handle, steps_left, report) -> None:
        r = session(handle).end_step(None if steps_left < 0 else int(steps_left))
        if report != ffi.NULL:
            for field in ("fallback_points", "fine_solves", "fine_failed", "outside_points",
                          "model_version", "fine_time_s", "operator_time_s", "retrain_time_s"):
                setattr(report, field, getattr(r, field))

    def folder_entry(method: str) -> None:
        """Export ``nsi_<method>(handle, path)``: the Session's method on a folder."""
        def call(handle, path) -> None:
            s = session(handle)
            with together(s.comm, f"ns_{method}'s arguments"):
                folder = text(path, "path")
            getattr(s, method)(folder)
        call.__name__ = method
        entry(call)

    folder_entry("checkpoint")
    folder_entry("restore")

    @entry
    def destroy(handle) -> None:
        session(handle).close()
        del _sessions[handle]

    @ffi.def_extern(name="nsi_start")
    def start() -> int:
        return 1
