"""Validation of materials, laws, deformation gradients and configs (no DOLFINx needed)."""

import re
from pathlib import Path

import numpy as np
import pytest

from neuroscale_couple.errors import InputError
from neuroscale_couple.materials import Phase, check_law
from neuroscale_couple.tensors import as_deformation_batch


def test_lame_constants():
    lmbda, mu = Phase(E=3.0, nu=0.35).lame
    assert mu == pytest.approx(3.0 / 2.7)
    assert lmbda == pytest.approx(3.0 * 0.35 / (1.35 * 0.3))


@pytest.mark.parametrize("E, nu, match", [(-1.0, 0.3, "E=-1.0"), (0.0, 0.3, "E=0.0"),
                                          (1.0, 0.5, "nu=0.5"), (1.0, 0.7, "nu=0.7"),
                                          (1.0, -1.0, "nu=-1.0")])
def test_bad_phase_moduli(E, nu, match):
    with pytest.raises(InputError, match=match):
        Phase(E, nu)


def test_phase_from_config_names_the_phase():
    with pytest.raises(InputError, match="fibre: .*nu=0.5"):
        Phase.from_config({"E": 70, "nu": 0.5}, "fibre")
    with pytest.raises(InputError, match="matrix must be a mapping"):
        Phase.from_config([3.0, 0.3], "matrix")


def test_unknown_law():
    assert check_law("neo_hookean") == "neo_hookean"
    with pytest.raises(InputError, match="law='mooney' is unknown"):
        check_law("mooney")


def test_deformation_batch_shapes():
    assert as_deformation_batch(np.eye(2)).shape == (1, 2, 2)
    assert as_deformation_batch(np.tile(np.eye(2), (5, 1, 1))).shape == (5, 2, 2)
    with pytest.raises(InputError, match="shape"):
        as_deformation_batch(np.eye(3))


@pytest.mark.parametrize("F", [[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]],
                               [[-1.0, 0.0], [0.0, 1.0]]])
def test_singular_or_inverted_F_is_rejected(F):
    with pytest.raises(InputError, match="det F"):
        as_deformation_batch([np.eye(2), F])


def test_non_finite_F_is_rejected():
    with pytest.raises(InputError, match=r"F\[0\] has non-finite"):
        as_deformation_batch([[np.nan, 0.0], [0.0, 1.0]])


def test_a_typo_in_a_config_key_is_refused_naming_the_right_key(tmp_path):
    from neuroscale_couple.config import check_keys, coupler_from_config

    with pytest.raises(InputError, match="unknown key 'matrx' in the RVE: did you mean 'matrix'"):
        check_keys({"matrx": {"E": 3.0}}, ("law", "matrix", "fibre"), "the RVE")
    path = tmp_path / "coupler.yaml"
    path.write_text("modle: none\nfine: {kind: rve}\n")
    with pytest.raises(InputError, match="unknown key 'modle'.*did you mean 'model'"):
        coupler_from_config(path, comm=None)


# ---------------------------------------------------------------- strict configs: every YAML
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CELLS = {"microstructure": {"kind": "single_fibre", "volume_fraction": 0.3},
         "loads": {"per_microstructure": 2, "radius": 0.1, "seed": 1},
         "law": "neo_hookean", "matrix": {"E": 3.0, "nu": 0.35}, "fibre": {"E": 70.0, "nu": 0.2}}


def _with(cfg: dict, path: tuple, key: str, value=None) -> dict:
    """A deep copy of ``cfg`` with ``key`` set in the mapping at ``path``."""
    import copy

    out = copy.deepcopy(cfg)
    node = out
    for step in path:
        node = node[step]
    node[key] = value
    return out


@pytest.mark.parametrize("cfg, message", [
    ({k: v for k, v in CELLS.items() if k != "microstructure"}
     | {"microstucture": CELLS["microstructure"]},
     "unknown key 'microstucture' in the generate config: did you mean 'microstructure'?"),
    (_with(CELLS, (), "fields_resolutoin", 0),
     "unknown key 'fields_resolutoin' in the generate config: did you mean 'fields_resolution'?"),
    (_with(CELLS, (), "lw", "linear"), "unknown key 'lw' in the generate config: did you mean "
     "'law'?"),
    (_with(CELLS, ("loads",), "radus", 0.1), "unknown key 'radus' in loads: did you mean "
     "'radius'?"),
    (_with(CELLS, ("microstructure",), "loads", {"min_radus": 0.1}),
     "unknown key 'min_radus' in microstructure.loads: did you mean 'min_radius'?"),
    (_with(CELLS, ("microstructure",), "cont", 3),
     "unknown key 'cont' in microstructure (kind 'single_fibre'): did you mean 'count'?"),
    (_with(CELLS, ("matrix",), "Nu", 0.3), "unknown key 'Nu' in matrix: did you mean 'nu'?"),
    ({"crystal": {"element": "Cu"}, "loads": {"per_microstructure": 2}, "law": "linear"},
     "unknown key 'law' in the generate config: known keys: crystal, fields_resolution"),
    ({"microstructure": {"kind": "crystal", "elemnt": "Cu"}, "loads": {}},
     "unknown key 'elemnt' in microstructure (kind 'crystal'): did you mean 'element'?"),
    (_with(CELLS, ("loads",), "per_microstructure", 2.5),
     "loads.per_microstructure=2.5: give a whole number ≥ 1"),
    (_with(CELLS, (), "image_resolution", 0), "image_resolution=0: give a whole number ≥ 1"),
])
def test_generate_config_typos_are_refused_naming_the_nearest_key(cfg, message):
    from neuroscale_couple.datagen import plan

    with pytest.raises(InputError, match=re.escape(message)):
        plan(cfg)


def test_train_config_typos_are_refused_naming_the_nearest_key(tmp_path, capsys):
    from neuroscale_couple.cli import main

    for text, message in (
            ("modl: {width: 8}\ntraining: {epochs: 1}\n",
             "unknown key 'modl' in {}: did you mean 'model'?"),
            ("training: {epochs: 1, weights: {stres: 1.0}}\n",
             "unknown key 'stres' in the loss weights: did you mean 'stress'?"),
            ("training: {epoch: 1}\n",
             "unknown key 'epoch' in the training config: did you mean 'epochs'?")):
        path = tmp_path / "train.yaml"
        path.write_text(text)
        assert main(["train", str(path), "--data", "no.h5", "--out", "m.pt"]) == 2
        assert message.format(path) in capsys.readouterr().err


def test_coupler_fine_section_typos_are_refused_for_either_solver():
    from neuroscale_couple.config import coupler_from_config

    for fine, message in (
            ({"kind": "rve", "fiber": {"E": 70.0, "nu": 0.2}},
             "unknown key 'fiber' in fine: did you mean 'fibre'?"),
            ({"kind": "cauchy_born", "elemnt": "Cu"},
             "unknown key 'elemnt' in fine: did you mean 'element'?"),
            ({"kind": "cauchyborn"}, "did you mean 'cauchy_born'?")):
        with pytest.raises(InputError, match=re.escape(message)):
            coupler_from_config({"model": "none", "fine": fine}, comm=None)
    with pytest.raises(InputError, match="cache_memory='2X': give a memory size"):
        coupler_from_config({"model": "none", "fine": {"kind": "rve"}, "cache_memory": "2X"},
                            comm=None)


def test_cli_numeric_flags_are_checked_before_work(capsys):
    from neuroscale_couple.cli import main

    assert main(["subset", "no.h5", "--micro", "0", "--out", "x.h5"]) == 2
    assert "--micro 0: give the number of microstructures" in capsys.readouterr().err
    assert main(["subset", "no.h5", "--micro", "2", "--seed", "-1", "--out", "x.h5"]) == 2
    assert "--seed -1: give a seed ≥ 0" in capsys.readouterr().err


def test_every_shipped_yaml_passes_its_strict_reader():
    from neuroscale_couple.cli import TRAIN_KEYS
    from neuroscale_couple.config import (
        COUPLER_KEYS,
        check_keys,
        dataclass_from_dict,
        fine_solver_family,
        load_yaml,
    )
    from neuroscale_couple.datagen import check_config
    from neuroscale_couple.operators.crystal import CrystalConfig
    from neuroscale_couple.operators.sano import SANOConfig
    from neuroscale_couple.solvers.phase_cell import RVE_CONFIG_KEYS
    from neuroscale_couple.training import TrainConfig

    paths = sorted(EXAMPLES.rglob("*.yaml"))
    assert len(paths) >= 16
    for path in paths:
        cfg = load_yaml(path)
        if path.name.endswith((".train.yaml", ".finetune.yaml")):  # neuroscale train
            check_keys(cfg, TRAIN_KEYS, path.name)
            TrainConfig.from_dict(cfg["training"])
            if "model" in cfg:
                config = CrystalConfig if path.name.startswith("hmm") else SANOConfig
                dataclass_from_dict(config, cfg["model"], "model")
        elif "microstructures" in cfg:  # a C ABI coupler config (ns_create)
            from neuroscale_couple.capi.session import CAPI_KEYS

            check_keys(cfg, CAPI_KEYS, path.name)
            fine_solver_family(cfg["fine"])
        elif "fine" in cfg:  # a Coupler config
            check_keys(cfg, COUPLER_KEYS, path.name)
            fine_solver_family(cfg["fine"])
        elif "F" in cfg:  # neuroscale rve
            check_keys(cfg, (*RVE_CONFIG_KEYS, "microstructure", "F"), path.name)
        else:  # neuroscale generate
            check_config(cfg)
