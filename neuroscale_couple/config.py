"""Reading configs strictly: YAML files, known keys only, typos answered with the nearest key."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neuroscale_couple.errors import InputError


def load_yaml(path: str | Path) -> dict:
    """A YAML config mapping; a missing or malformed file gives a clear :class:`InputError`."""
    import yaml

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


def check_keys(cfg: dict, known: Iterable[str], where: str) -> None:
    """Refuse keys of ``cfg`` not in ``known``, naming the nearest known key of each."""
    known = sorted(known)
    if not isinstance(cfg, dict):
        raise InputError(f"{where} must be a mapping of {', '.join(known)}; got {cfg!r}")
    lower = {k.lower(): k for k in known}  # nearest regardless of case: Nu → nu
    for key in cfg:
        if key not in known:
            near = [lower[k] for k in difflib.get_close_matches(str(key).lower(), lower, n=1)]
            hint = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(known)}"
            raise InputError(f"unknown key {key!r} in {where}: {hint}")


def whole_number(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an int if it is a whole number ≥ ``minimum`` (``name`` is named in the
    error)."""
    number = value if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number != int(number) \
            or number < minimum:
        raise InputError(f"{name}={value!r}: give a whole number ≥ {minimum}")
    return int(number)


def dataclass_from_dict(cls: type, cfg: dict, where: str) -> Any:
    """An instance of the dataclass ``cls`` from a mapping of its field names (lists become
    tuples); unknown keys are refused by :func:`check_keys`."""
    check_keys(cfg, (f.name for f in dataclasses.fields(cls)), where)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


BYTE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*")


def byte_size(value: object, name: str) -> int | None:
    """Bytes of a memory size: a number of bytes, or a string with a binary unit — ``512M``,
    ``2G``, ``1.5GiB``, ``800MB`` (K, M, G, T: powers of 1024; B, iB optional) — or None /
    ``none`` (no budget). ``name`` (a flag such as ``--rve-memory`` or a config key) is named in
    the error.

    Raises
    ------
    InputError
        If the value is not such a size, or not finite and > 0.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    size = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        size = float(value)
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        size = float(match[1]) * BYTE_UNITS[match[2].upper()]
    if size is None or not math.isfinite(size) or size < 1:
        shown = f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"
        raise InputError(f"{shown}: give a memory size > 0 such as 512M or 2G (bytes, or K, M, "
                         "G, T: powers of 1024), or none for no budget")
    return int(size)


COUPLER_KEYS = ("model", "fine", "policy", "retrain", "replay_dir", "cache_size",
                "cache_memory", "dtype", "audit", "balance_ranks", "cold_start")


def fine_solver_family(fine: dict, where: str = "fine") -> tuple[Any, dict]:
    """The fine-solver factory and the material family config (checked against the model) of
    a ``fine`` mapping: ``kind: rve`` with the periodic RVE keys (``law``, ``matrix``,
    ``fibre``, ``mesh``, ``bc``, ``petsc_options``), or ``kind: cauchy_born`` with the crystal
    keys of the atomistic solver. The factory builds each structure's own solver, its
    :meth:`~neuroscale_couple.structures.Structure.fine_solver` with the family config, on
    ``MPI.COMM_SELF``."""
    if not isinstance(fine, dict):
        raise InputError(f"{where} must be a mapping with a kind (rve or cauchy_born); "
                         f"got {fine!r}")
    family = {k: v for k, v in fine.items() if k != "kind"}
    check_keys(family, _fine_keys(fine.get("kind", "rve"), where), where)
    return (lambda structure: structure.fine_solver(family)), family


def _fine_keys(kind: object, where: str) -> tuple[str, ...]:
    """The keys of a ``fine`` mapping of ``kind`` besides ``kind``: the RVE's, or a crystal's
    (a crystal carries its whole material)."""
    from neuroscale_couple.solvers.crystal import CONFIG_SCHEMA
    from neuroscale_couple.solvers.phase_cell import RVE_CONFIG_KEYS

    kinds = {"rve": RVE_CONFIG_KEYS, "cauchy_born": tuple(CONFIG_SCHEMA)}
    if kind not in kinds:
        near = difflib.get_close_matches(str(kind), kinds, n=1)
        raise InputError(f"{where}.kind={kind!r} is unknown: use rve or cauchy_born"
                         + (f" (did you mean {near[0]!r}?)" if near else ""))
    return kinds[kind]


def coupler_from_config(config: str | Path | dict, comm, *, base: Path | None = None) -> Any:
    """A :class:`~neuroscale_couple.coupler.Coupler` from a YAML file or mapping; see
    :meth:`~neuroscale_couple.coupler.Coupler.from_config`. ``base``: the folder a mapping's
    relative paths start from (default: the YAML's folder, or the working directory)."""
    import torch

    from neuroscale_couple.coupler import Coupler, Policy
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.retraining import RetrainConfig

    if base is None:
        base = Path(config).parent if isinstance(config, str | Path) else Path.cwd()
    cfg = load_yaml(config) if isinstance(config, str | Path) else dict(config)
    where = f"the coupler config {config}" if isinstance(config, str | Path) else "the config"
    check_keys(cfg, COUPLER_KEYS, where)
    if "fine" not in cfg:
        raise InputError(f"{where} has no 'fine' section: name the fine solver, e.g. "
                         "fine: {kind: rve, matrix: {E: 3.0, nu: 0.35}, fibre: {E: 70.0, nu: 0.2}}")
    factory, family = fine_solver_family(cfg["fine"])
    model_path = cfg.get("model")
    if model_path in (None, "none"):
        model_path, model = None, None
    else:
        model_path = base / Path(model_path).expanduser()
        model = load_operator(model_path)
    cold = cfg.get("cold_start")
    if cold is not None:
        from neuroscale_couple.cold_start import ColdStart

        if model is not None:
            raise InputError(f"{where}: cold_start trains its own operator: set model: none, "
                             "or drop cold_start to run the model")
        if not isinstance(cold, dict) or "encoder" not in cold:
            raise InputError(f"{where}: cold_start needs a mapping with the encoder's model "
                             "file, e.g. cold_start: {encoder: models/fe2_composite.pt}")
        cold = ColdStart.from_dict({**cold, "encoder": base / Path(cold["encoder"])
                                    .expanduser()})
    classic = model is None and cold is None
    policy = dataclass_from_dict(Policy, {"rtol": 0.0 if classic else Policy.rtol,
                                          **(cfg.get("policy") or {})}, "policy")
    retrain = dataclass_from_dict(RetrainConfig, cfg.get("retrain") or {}, "retrain")
    replay = cfg.get("replay_dir")
    dtype = {"float64": torch.float64, "float32": torch.float32}.get(cfg.get("dtype", "float64"))
    if dtype is None:
        raise InputError(f"dtype={cfg['dtype']!r} in {where}: use float64 or float32")
    extra = {k: cfg[k] for k in ("cache_size", "cache_memory", "balance_ranks") if k in cfg}
    if "audit" in cfg:
        extra["audit"] = bool(cfg["audit"])
    return Coupler(model, factory, family=family, policy=policy, comm=comm,
                   replay_dir=None if replay is None else base / replay, retrain=retrain,
                   model_path=model_path, dtype=dtype, cold_start=cold, **extra)
