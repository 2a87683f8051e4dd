"""The ``neuroscale`` command line.

    neuroscale rve CONFIG.yaml [--json]          one RVE solve: homogenized P̄ and tangent A
    neuroscale generate CONFIG.yaml --out F.h5   RVE training data (MPI-parallel, resumable)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import yaml

from neuroscale_couple.errors import InputError, NeuroScaleError


def load_config(path: str | Path) -> dict:
    """Read a YAML config mapping; a missing or malformed file gives a clear :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"config file {path} must hold a mapping, got {type(cfg).__name__}")
    return cfg


def cmd_rve(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    from neuroscale_couple.solvers.microstructure import from_config
    from neuroscale_couple.solvers.rve_fenicsx import rve_from_config

    cfg = load_config(args.config)
    if "F" not in cfg:
        raise InputError(f"{args.config}: key F (the 2×2 macro deformation gradient) is missing")
    rve = rve_from_config(cfg, from_config(cfg.get("microstructure") or {}), MPI.COMM_WORLD)
    res = rve.solve(np.asarray(cfg["F"], dtype=float))
    out = {
        "stress": res.stress[0].tolist(),
        "tangent": res.tangent[0].tolist(),
        "dofs": rve.dofs,
        "newton_iterations": int(res.info["newton_iterations"][0]),
        "time_s": float(res.info["time_s"][0]),
    }
    if MPI.COMM_WORLD.rank != 0:
        return
    if args.json:
        print(json.dumps(out, indent=2))
        return
    np.set_printoptions(precision=6, suppress=True)
    print(f"RVE: {rve.microstructure.kind}, v = {rve.microstructure.volume_fraction:.3f}, "
          f"law {rve.law}, {rve.bc} bc, P{rve.degree}, {rve.dofs} dofs")
    print(f"Newton iterations {out['newton_iterations']}, solve + tangent {out['time_s']:.3f} s")
    print("homogenized first Piola–Kirchhoff stress P̄:\n", res.stress[0])
    print("homogenized tangent A = ∂P̄/∂F̄ as a 4×4 matrix (rows ij, columns kl):\n",
          res.tangent[0].reshape(4, 4))


def cmd_generate(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    from neuroscale_couple.datagen import generate

    generate(load_config(args.config), args.out, MPI.COMM_WORLD, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuroscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rve", help="solve one periodic RVE for one macro F̄")
    p.add_argument("config", help="YAML config (microstructure, law, matrix, fibre, F, mesh, bc)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_rve)
    p = sub.add_parser("generate", help="make an RVE training data set (HDF5)")
    p.add_argument("config", help="YAML config (see neuroscale_couple.datagen)")
    p.add_argument("--out", required=True, help="output HDF5 file; an unfinished one is resumed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except NeuroScaleError as err:
        print(f"neuroscale {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
