"""C code of the package, compiled on first use: :func:`library`.

A few inner loops of NeuroScale (the operator in the loop, the random placement of many
cells' fibres) are C files beside their Python modules. Each is compiled with the system's C
compiler (``$CC``, else ``cc``) the first time a process asks for it, into
``$NEUROSCALE_KERNEL_DIR`` (default ``$XDG_CACHE_HOME/neuroscale``, i.e.
``~/.cache/neuroscale``), one file per source, compiler and flags; later processes load it in a
millisecond. Without a compiler :func:`library` is None (a warning says so once) and the
callers run their numpy or torch version.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

LOG = logging.getLogger(__name__)
FLAGS = ("-O2", "-std=c11", "-ffp-contract=off", "-shared", "-fPIC")
"""No contraction into fused multiply-adds: the same rounding as numpy's and torch's."""


def kernel_dir() -> Path:
    """Where the compiled libraries are kept (see the module docstring)."""
    if os.environ.get("NEUROSCALE_KERNEL_DIR"):
        return Path(os.environ["NEUROSCALE_KERNEL_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "neuroscale"


@functools.cache
def library(source: Path) -> ctypes.CDLL | None:
    """The library of the C file ``source``, compiled first if this source, compiler and flags
    have none; None (with a warning) where no C compiler is found or it fails."""
    compiler = os.environ.get("CC") or "cc"
    text = source.read_bytes()
    tag = hashlib.sha256(text + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    path = kernel_dir() / f"{source.stem}-{tag}.so"
    if not path.is_file():
        if shutil.which(compiler) is None:
            LOG.warning("no C compiler (%s): %s runs its slower numpy/torch version; set CC to "
                        "a C compiler", compiler, source.name)
            return None
        try:
            _compile(compiler, source, path)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", None) or err
            LOG.warning("compiling %s into %s failed (its numpy/torch version runs; set "
                        "NEUROSCALE_KERNEL_DIR to a writable folder, CC to a C compiler):\n%s",
                        source.name, path.parent, detail)
            return None
    return ctypes.CDLL(str(path))


def function(source: Path, name: str, argtypes: tuple, restype=ctypes.c_int):
    """The C function ``name`` of ``source``'s library (:func:`library`) with its signature
    set, or None without a compiled library."""
    lib = library(source)
    if lib is None:
        return None
    f = getattr(lib, name)
    f.argtypes, f.restype = argtypes, restype
    return f


def _compile(compiler: str, source: Path, path: Path) -> None:
    """Compile ``source`` into the library ``path``: beside it, then renamed into place, so
    that ranks starting together never load a half-written library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        subprocess.run([compiler, *FLAGS, str(source), "-o", str(built), "-lm"],
                       capture_output=True, text=True, check=True)
        os.replace(built, path)
