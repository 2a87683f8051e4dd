"""Validation of materials, laws, deformation gradients and configs (no DOLFINx needed)."""

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
