"""Build libneuroscale.so, the C ABI of include/neuroscale.h, with cffi's embedding mode.

``python -m neuroscale_couple.capi.build [--out build/capi]`` (``make capi``) compiles
``neuroscale.c`` (the public entry points, the error buffer, the start of Python) together with
cffi's code for the ``nsi_*`` functions implemented in Python
(:mod:`neuroscale_couple.capi.entry`). The header is the one source of the API: its
``#define NS_*`` constants, its report struct and the prototypes between ``NS_API_BEGIN`` and
``NS_API_END`` are read here, so Python sees the same codes and signatures as C.
The interpreter running this build (the project's venv python) is the one the library embeds.
"""

from __future__ import annotations

import argparse
import re
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HEADER = ROOT / "include" / "neuroscale.h"
LIBRARY = "libneuroscale.so"

INIT_CODE = """
from _neuroscale_capi import ffi, lib
try:
    from neuroscale_couple.capi.entry import bind
    bind(ffi, lib)
except BaseException:  # reported through ns_last_error, never raised into the host
    import traceback
    lib.nsi_set_error(("NeuroScale's Python side failed to start: "
                       + traceback.format_exc()).encode(errors="replace"))
"""


def header_parts(header: Path = HEADER) -> tuple[str, str, list[str]]:
    """The header's ``#define NS_*`` lines and report struct (as cffi declarations) and the
    prototypes of its API block, each one statement without comments."""
    text = header.read_text()
    defines = "\n".join(re.findall(r"^#define NS_\w+ -?\d+", text, flags=re.M))
    struct = re.search(r"typedef struct ns_step_report \{.*?\} ns_step_report;", text, re.S)
    block = re.search(r"NS_API_BEGIN.*?\*/(.*?)/\*\s*NS_API_END", text, re.S)
    if struct is None or block is None:
        raise RuntimeError(f"{header}: no ns_step_report struct or no NS_API block")
    code = re.sub(r"/\*.*?\*/", "", block.group(1), flags=re.S)
    prototypes = [" ".join(p.split()) + ";" for p in code.split(";") if p.strip()]
    if not prototypes:
        raise RuntimeError(f"{header}: the NS_API block holds no prototype")
    return defines, struct.group(0), prototypes


def internal(prototypes: list[str]) -> str:
    """The Python-implemented twins ``nsi_<name>`` of the public ``ns_<name>`` prototypes,
    and ``nsi_start`` (returns 1 once the Python side is bound)."""
    renamed = [re.sub(r"\bns_(\w+)\s*\(", r"nsi_\1(", p, count=1) for p in prototypes]
    return "\n".join([*renamed, "int nsi_start(void);"])


def build(out: Path) -> Path:
    """Compile the library into ``out``; returns its path."""
    import cffi

    defines, struct, prototypes = header_parts()
    ffi = cffi.FFI()
    ffi.cdef(f"{defines}\n{struct}\nvoid nsi_set_error(const char *message);")
    ffi.embedding_api(internal(prototypes))
    ffi.embedding_init_code(INIT_CODE)
    python = sys.executable.replace("\\", "\\\\").replace('"', '\\"')
    libdir = sysconfig.get_config_var("LIBDIR")
    ffi.set_source("_neuroscale_capi",
                   f'#define NS_PYTHON "{python}"\n#include "neuroscale.h"\n'
                   f"{internal(prototypes)}\n{(HERE / 'neuroscale.c').read_text()}",
                   include_dirs=[str(HEADER.parent)], libraries=["pthread"],
                   extra_compile_args=["-std=gnu11", "-O2"],
                   extra_link_args=[f"-Wl,-rpath,{libdir}", f"-Wl,-soname,{LIBRARY}"])
    out.mkdir(parents=True, exist_ok=True)
    built = Path(ffi.compile(tmpdir=str(out), target=LIBRARY, verbose=False))
    return built


SOURCES = (HEADER, HERE / "neuroscale.c", Path(__file__).resolve())


def ensure_library(out: Path = ROOT / "build" / "capi") -> Path:
    """The library in ``out``, built first if it is missing or older than its sources."""
    lib = out / LIBRARY
    if not lib.is_file() or lib.stat().st_mtime < max(s.stat().st_mtime for s in SOURCES):
        build(out)
    return lib


def compile_host(sources: list[Path], exe: Path, library: Path) -> Path:
    """Compile and link a C (``.c``) or Fortran (``.f90``) host program of ``sources`` against
    ``library`` into ``exe``: C with the venv's ``mpicc``, Fortran with ``gfortran`` and the
    Fortran module include/neuroscale.f90 (its ``.mod`` goes next to ``exe``) plus the venv's
    MPI library. Raises ``subprocess.CalledProcessError`` with the compiler's output."""
    import subprocess

    bindir = Path(sys.executable).parent
    exe.parent.mkdir(parents=True, exist_ok=True)
    link = [f"-L{library.parent}", "-lneuroscale", f"-Wl,-rpath,{library.parent}", "-lm"]
    if all(s.suffix == ".c" for s in sources):
        cmd = [str(bindir / "mpicc"), "-O2", "-Wall", f"-I{HEADER.parent}", *map(str, sources)]
    else:
        mpi = bindir.parent / "lib"
        cmd = ["gfortran", "-O2", "-Wall", f"-J{exe.parent}", str(HEADER.parent / "neuroscale.f90"),
               *map(str, sources), f"-L{mpi}", "-lmpi", f"-Wl,-rpath,{mpi}"]
    subprocess.run([*cmd, *link, "-o", str(exe)], check=True, capture_output=True, text=True)
    return exe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "capi",
                        help="folder of the library (default: build/capi)")
    print(build(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
