"""The family operator end to end at the smoke size of `make family-model`: data whose cells draw
their phases, solved by the RVE, a few epochs of training, calibration; then the model in a
Coupler for materials inside and outside its ranges."""

from __future__ import annotations

import json

from mpi4py import MPI

import numpy as np
import pytest

from neuroscale_couple.calibration import CONTRAST_BANDS, LOAD_BANDS, Calibration
from neuroscale_couple.cli import main
from neuroscale_couple.config import load_yaml
from neuroscale_couple.coupler import FINE, OPERATOR, Coupler, Policy
from neuroscale_couple.datagen import generate, plan
from neuroscale_couple.errors import MaterialOutsideError
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.phases import PHASE_ARRAYS, cell_material
from neuroscale_couple.solvers.microstructure import random_fibres
from neuroscale_couple.solvers.rve_fenicsx import rve_from_config
from neuroscale_couple.store import load_rve_dataset

pytestmark = [pytest.mark.dolfinx, pytest.mark.slow, pytest.mark.skip_in_parallel]

SMOKE = "examples/configs/family_smoke"
F = np.array([[[1.06, 0.02], [0.0, 0.97]], [[0.97, -0.03], [0.04, 1.05]]])


def material(E_m: float, nu_m: float, E_f: float, nu_f: float) -> dict:
    return {"law": "neo_hookean", "matrix": {"E": E_m, "nu": nu_m},
            "fibre": {"E": E_f, "nu": nu_f}, "mesh": {"size": 0.06}}


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """The smoke recipe (`make family-model FAMILY=examples/configs/family_smoke`), in process."""
    out = tmp_path_factory.mktemp("family")
    for part in ("data", "calibration"):
        generate(load_yaml(f"{SMOKE}.{part}.yaml"), out / f"{part}.h5", MPI.COMM_SELF,
                 progress=False)
    assert main(["train", f"{SMOKE}.train.yaml", "--data", str(out / "data.h5"), "--out",
                 str(out / "model.pt"), "--quiet"]) == 0
    assert main(["calibrate", "--model", str(out / "model.pt"), "--data",
                 str(out / "calibration.h5")]) == 0
    return out


def test_generated_cells_carry_their_drawn_phases(family_model):
    config = load_yaml(f"{SMOKE}.data.yaml")
    d = load_rve_dataset(family_model / "data.h5")
    contrast = d["micro/fibre_E"] / d["micro/matrix_E"]
    assert len(np.unique(contrast)) == len(contrast)
    assert 1 <= contrast.min() and contrast.max() <= 100
    # each cell was solved with its own phases: the stiffest one re-solved with them agrees
    structures, loads = plan(config)
    m, per = int(np.argmax(contrast)), config["loads"]["per_microstructure"]
    own = cell_material(config, {k: d[f"micro/{k}"] for k in PHASE_ARRAYS}, m)
    res = rve_from_config(own, structures[m]).solve(loads[m * per:(m + 1) * per])
    np.testing.assert_allclose(d["samples/P"][m * per:(m + 1) * per], res.stress, rtol=1e-8,
                               atol=1e-10)


def test_family_model_takes_materials_in_its_ranges_and_refuses_others(family_model):
    model = load_operator(family_model / "model.pt").double()
    card_ranges = model.config.phase_ranges
    assert card_ranges["contrast"] == [1.0, 100.0] and model.region.phases
    cells = [random_fibres(0.3, 3, seed=5), random_fibres(0.4, 2, seed=6)]
    stresses = {}
    for name, fam in (("a", material(3.0, 0.35, 70.0, 0.2)), ("b", material(1.0, 0.3, 8.0, 0.4)),
                      ("a_x1000", material(3000.0, 0.35, 70000.0, 0.2))):
        c = Coupler(model, lambda s, fam=fam: rve_from_config(fam, s), family=fam,
                    policy=Policy(rtol=float("inf")), comm=MPI.COMM_SELF)
        c.register([0, 1], cells)
        r = c.evaluate(F, [0, 1])
        assert np.all(r.source == OPERATOR)
        stresses[name] = r.stress
        c.close()
    np.testing.assert_allclose(stresses["a_x1000"], 1000 * stresses["a"], rtol=1e-6)
    assert not np.allclose(stresses["a"] / 3.0, stresses["b"] / 1.0, rtol=1e-3)
    outside = material(3.0, 0.35, 600.0, 0.2)  # contrast 200
    with pytest.raises(MaterialOutsideError, match="contrast 200 outside"):
        Coupler(model, lambda s: rve_from_config(outside, s), family=outside,
                comm=MPI.COMM_SELF)
    # with the user's consent every point runs on the fine solver
    c = Coupler(model, lambda s: rve_from_config(outside, s), family=outside,
                policy=Policy(outside_material="fallback"), comm=MPI.COMM_SELF)
    c.register([0, 1], cells)
    r = c.evaluate(F, [0, 1])
    assert np.all(r.source == FINE)
    for j, cell in enumerate(cells):
        truth = rve_from_config(outside, cell).solve(F[j:j + 1]).stress[0]
        np.testing.assert_allclose(r.stress[j], truth, rtol=1e-8)
    c.close()


def test_family_model_is_evaluated_and_fine_tuned_on_data_of_one_material(family_model, tmp_path,
                                                                         capsys):
    """A data set of one material inside the ranges is evaluated, and trains with data that
    draws its phases (a family model made sharper at a user's material): the model fine-tuned
    with it is closer at that material than the same fine-tuning without. A set of one
    material outside the ranges is refused."""
    one = {k: v for k, v in material(3.0, 0.35, 70.0, 0.2).items() if k != "mesh"}
    fixed = {}
    for part in ("test", "calibration"):  # fine-tuning data, and other cells to evaluate on
        fixed[part] = dict(load_yaml(f"{SMOKE}.{part}.yaml"), **one)
        fixed[part].pop("phase_seed")
        generate(fixed[part], tmp_path / f"fixed_{part}.h5", MPI.COMM_SELF, progress=False)

    def error(model: str) -> float:
        capsys.readouterr()
        assert main(["evaluate", "--model", model, "--data",
                     str(tmp_path / "fixed_calibration.h5"), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["rel_l2_stress"]

    stage = tmp_path / "stage2.yaml"
    stage.write_text("training: {epochs: 20, batch_size: 16, lr: 0.002, val_fraction: 0.2, "
                     "patience: 20, seed: 0, weights: {stress: 1.0, tangent: 0.2, nll: 0.05}}\n")
    family_data = str(family_model / "data.h5")
    tuned = {}
    for name, data in (("family", [family_data]), ("both", [family_data,
                                                            str(tmp_path / "fixed_test.h5")])):
        tuned[name] = str(tmp_path / f"{name}.pt")
        assert main(["train", str(stage), "--init", str(family_model / "model.pt"), "--data",
                     *data, "--out", tuned[name], "--quiet"]) == 0
    both, family = error(tuned["both"]), error(tuned["family"])
    assert both < family, (both, family)
    outside = dict(fixed["test"], fibre={"E": 600.0, "nu": 0.2})  # contrast 200
    outside["microstructure"] = outside["microstructure"][:1]
    outside["microstructure"][0] = dict(outside["microstructure"][0], count=2)
    generate(outside, tmp_path / "outside.h5", MPI.COMM_SELF, progress=False)
    capsys.readouterr()
    assert main(["train", str(stage), "--init", str(family_model / "model.pt"), "--data",
                 family_data, str(tmp_path / "outside.h5"), "--out", tuned["both"],
                 "--quiet"]) == 2
    assert "contrast 200 outside" in capsys.readouterr().err


def test_family_model_is_calibrated_per_contrast_band(family_model, tmp_path, capsys):
    """`calibrate --groups` groups a family model by E_f/E_m too (by default), `evaluate`
    names those groups; ``--contrast-bands none`` keeps kind and load band alone, and a model
    of one material refuses contrast bands."""
    model, data = str(family_model / "model.pt"), str(family_model / "calibration.h5")
    grouped, plain = str(tmp_path / "grouped.pt"), str(tmp_path / "plain.pt")
    assert main(["calibrate", "--model", model, "--data", data, "--groups", "--out",
                 grouped]) == 0
    assert Calibration.from_dict(load_operator(grouped).calibration).contrast_bands == (
        CONTRAST_BANDS)
    capsys.readouterr()
    assert main(["evaluate", "--model", grouped, "--data", data, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["calibration"] == "group-wise"
    assert all("E_f/E_m" in name for name in metrics["groups"])
    assert sum(g["n_samples"] for g in metrics["groups"].values()) == metrics["n_samples"]
    assert main(["calibrate", "--model", model, "--data", data, "--groups",
                 "--contrast-bands", "none", "--out", plain]) == 0
    assert not Calibration.from_dict(load_operator(plain).calibration).contrast_bands
    capsys.readouterr()
    assert main(["calibrate", "--model", "examples/models/fe2_composite.pt", "--data", data,
                 "--groups", "--contrast-bands", "3,10", "--out", plain]) == 2
    assert "one material" in capsys.readouterr().err


def test_family_model_learns_an_outside_material_online_with_consent(family_model, tmp_path):
    """Phases outside the ranges, run with the user's consent: every point falls back until
    an online retraining on the run's own fine solves (the replay data carry the run's phases)
    is calibrated on enough held-out ones; then the operator's bound decides point by point."""
    from neuroscale_couple.evaluation import calibrate_model
    from neuroscale_couple.retraining import RetrainConfig
    from neuroscale_couple.training import TrainingData

    model = load_operator(family_model / "model.pt").double()
    calibrate_model(model, TrainingData.from_h5(family_model / "calibration.h5",
                                                model.input_resolution, material_inputs=True),
                    bands=LOAD_BANDS, contrast_bands=CONTRAST_BANDS)
    outside = material(3.0, 0.35, 600.0, 0.2)  # contrast 200
    cells = [random_fibres(0.15 + 0.3 * (k % 5) / 4, 1 + k % 4, seed=100 + k) for k in range(40)]
    c = Coupler(model, lambda s: rve_from_config(outside, s), family=outside,
                policy=Policy(rtol=float("inf"), outside_material="fallback"),
                comm=MPI.COMM_SELF, replay_dir=tmp_path / "replay",
                retrain=RetrainConfig(epochs=3, min_new=8, calibration_fraction=0.5))
    ids = np.arange(len(cells))
    loads = F[ids % 2]
    c.register(ids, cells)
    c.begin_step(0)
    assert np.all(c.evaluate(loads, ids).source == FINE) and c.material_outside is not None
    c.end_step(steps_left=1)
    assert c.version == 1 and c.material_outside is None
    assert c.model.card["run_calibration"] == 20 and c.model.calibration["n_calibration"] == 20
    recalibrated = Calibration.from_dict(c.model.calibration)  # group-wise, as before
    assert recalibrated.contrast_bands == CONTRAST_BANDS and recalibrated.bands == LOAD_BANDS
    c.begin_step(1)
    r = c.evaluate(1.01 * loads, ids)
    assert np.all(r.source == OPERATOR) and np.all(np.isfinite(r.stress))
    c.close()
