"""Phase properties as operator inputs: config ranges, draws, the family SANO's scale-free
response, its range check and its checkpoint (no DOLFINx: cells are rendered, not solved)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroscale_couple.errors import InputError, MaterialOutsideError
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.operators.sano import SANO, SANOConfig
from neuroscale_couple.phases import PhaseRanges
from neuroscale_couple.region import TrainingRegion
from neuroscale_couple.solvers.microstructure import fibre_chain, random_fibres

RANGES = {"contrast": [1.0, 100.0], "matrix_nu": [0.2, 0.45], "fibre_nu": [0.2, 0.45]}
CONFIG = {"law": "neo_hookean", "matrix": {"E": 3.0, "nu": [0.2, 0.45]},
          "fibre": {"E": {"contrast": [1, 100]}, "nu": [0.2, 0.45]}, "phase_seed": 4}


def material(E_m: float, nu_m: float, E_f: float, nu_f: float) -> dict:
    return {"law": "neo_hookean", "matrix": {"E": E_m, "nu": nu_m},
            "fibre": {"E": E_f, "nu": nu_f}}


@pytest.fixture(scope="module")
def family_model() -> SANO:
    torch.manual_seed(0)
    model = SANO(SANOConfig(resolution=16, width=8, modes=4, levels=2, heads=2, latent=16,
                            hidden=16, members=3, energy_correction=False, quartic_basis=True,
                            phase_ranges=RANGES)).double()
    model.card = {"data_config": {"image_resolution": 32}}
    return model


def test_phase_ranges_are_read_strictly_and_drawn_reproducibly():
    ranges = PhaseRanges.from_config(CONFIG)
    assert ranges.descriptor_ranges() == RANGES
    draws = ranges.draw(400)
    contrast = draws["fibre_E"] / draws["matrix_E"]
    assert np.all(draws["matrix_E"] == 3.0) and 1 <= contrast.min() and contrast.max() <= 100
    assert 0.3 < np.mean(np.log(contrast) < np.log(10)) < 0.7  # log-uniform: half below 10
    assert np.array_equal(ranges.draw(3)["fibre_nu"], draws["fibre_nu"][:3])  # keyed on index
    assert PhaseRanges.from_config(material(3.0, 0.35, 70.0, 0.2)) is None  # one material
    for bad, message in (({"fibre": {"E": {"contrst": [1, 9]}, "nu": 0.2}}, "contrast"),
                         ({"matrix": {"E": [1, 3], "nu": 0.3}, "fibre": {"E": 70, "nu": 0.2}},
                          "give the fibre by its"),
                         ({"matrix": {"E": 3.0, "nu": [0.2, 0.5]}}, "matrix.nu"),
                         ({"fibre": {"E": {"contrast": [10, 1]}, "nu": 0.2}}, "low ≤ high")):
        with pytest.raises(InputError, match=message):
            PhaseRanges.from_config({**CONFIG, **bad})


def test_the_training_region_records_the_drawn_phases():
    config = {**CONFIG, "microstructure": {"kind": "random_fibres", "volume_fraction": [0.1, 0.5],
                                           "n_fibres": [1, 4], "count": 40, "seed": 0},
              "loads": {"per_microstructure": 2, "radius": 0.1}}
    region = TrainingRegion.from_config(config)
    assert set(region.phases) == set(RANGES)
    for key, (lo, hi) in region.phases.items():
        assert RANGES[key][0] <= lo < hi <= RANGES[key][1]
    assert TrainingRegion.from_dict(region.to_dict()) == region
    fixed = TrainingRegion.from_config({**config, **material(3.0, 0.35, 70.0, 0.2)})
    assert not fixed.phases and "phases" not in fixed.to_dict()  # a fixed card as before


def test_family_operator_scales_exactly_with_the_matrix_modulus(family_model):
    cells = [random_fibres(0.3, 3, seed=1), fibre_chain(0.3, 2, seed=2)]
    F = torch.tensor([[[1.05, 0.02], [0.0, 0.97]], [[0.98, -0.03], [0.04, 1.08]]],
                     dtype=torch.float64)
    out = {}
    for scale in (1.0, 7.5):
        family_model.bind_material(material(3.0 * scale, 0.3, 60.0 * scale, 0.25))
        out[scale] = family_model.predict(family_model.latents(cells), F)
    for key, power in (("mean", 1), ("tangent", 1), ("energy", 1), ("cov", 2)):
        torch.testing.assert_close(out[7.5][key], 7.5**power * out[1.0][key], rtol=1e-9,
                                   atol=0)
    # another contrast or Poisson ratio is another input, another response
    family_model.bind_material(material(3.0, 0.3, 6.0, 0.25))
    other = family_model.predict(family_model.latents(cells), F)
    assert not torch.allclose(other["mean"], out[1.0]["mean"], rtol=1e-3)


def test_family_operator_accepts_phases_in_its_ranges_and_refuses_others(family_model):
    family_model.check_family(material(3.0, 0.35, 70.0, 0.2))
    family_model.check_family(material(1e4, 0.25, 5e5, 0.4))  # any E_m: contrast 50
    with pytest.raises(MaterialOutsideError, match=r"contrast 500 outside.*outside_material"):
        family_model.check_family(material(1.0, 0.3, 500.0, 0.3))
    with pytest.raises(MaterialOutsideError, match="matrix_nu 0.49 outside"):
        family_model.check_family(material(1.0, 0.49, 5.0, 0.3))
    with pytest.raises(InputError, match="law"):
        family_model.check_family({**material(3.0, 0.35, 70.0, 0.2), "law": "linear"})
    # data whose cells draw their phases (a second training stage): their ranges must lie
    # inside the model's
    family_model.check_family({**CONFIG, "fibre": {"E": {"contrast": [2, 50]}, "nu": 0.3}})
    with pytest.raises(InputError, match=r"contrast range \[1, 300\] leaves"):
        family_model.check_family({**CONFIG, "fibre": {"E": {"contrast": [1, 300]}, "nu": 0.3}})


def test_an_unbound_family_operator_asks_for_the_material(family_model):
    fresh = SANO(family_model.config)
    with pytest.raises(InputError, match="bind the run's material"):
        fresh.latents([random_fibres(0.3, 3, seed=1)])


def test_family_operator_round_trips_through_its_checkpoint(family_model, tmp_path):
    family_model.save(tmp_path / "f.pt")
    loaded = load_operator(tmp_path / "f.pt").double()
    assert loaded.takes_material and loaded.config.phase_ranges == RANGES
    cells = [random_fibres(0.25, 2, seed=3)]
    for model in (family_model, loaded):
        model.bind_material(material(2.0, 0.3, 40.0, 0.3))
    F = torch.eye(2, dtype=torch.float64)[None] * 1.02
    torch.testing.assert_close(loaded.predict(loaded.latents(cells), F)["mean"],
                               family_model.predict(family_model.latents(cells), F)["mean"])


def test_fixed_material_models_record_no_phase_ranges(tmp_path):
    model = SANO(SANOConfig(resolution=16, width=8, modes=4, levels=2, heads=2, latent=16,
                            hidden=16, members=2))
    model.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert "phase_ranges" not in payload["config"] and not model.takes_material
    model.bind_material(material(1e4, 0.3, 2e4, 0.3))  # nothing to take: stays as it was
    assert model.stress_unit == 1.0 and model.material_arrays(3) == {}
