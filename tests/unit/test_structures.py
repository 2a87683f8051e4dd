"""The Structure protocol: a new family is one class, and configs name families by kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from neuroscale_couple.errors import InputError
from neuroscale_couple.solvers.phase_cell import PhaseCell
from neuroscale_couple.structures import (
    Structure,
    common_family,
    config_groups,
    data_family,
    family,
    from_config,
    register,
    stored_arrays,
    with_groups,
)


@register
@dataclass(frozen=True)
class Checkerboard(PhaseCell):
    """n × n squares, the fibre phase on those with i + j odd: the whole of a new family."""

    kinds: ClassVar[tuple[str, ...]] = ("checkerboard",)
    config_schema: ClassVar[dict[str, Any]] = {**PhaseCell.config_schema, "n": 2}
    drawn: ClassVar[dict[str, bool]] = {"n": True}

    n: int
    kind: str = "checkerboard"

    @property
    def volume_fraction(self) -> float:
        return (self.n**2 // 2) / self.n**2

    @property
    def key(self) -> str:
        return f"checkerboard{self.n}"

    @classmethod
    def from_config(cls, cfg: dict, *, seed: int | None = None) -> Checkerboard:
        return cls(int(cfg.get("n", cls.config_schema["n"])))

    def _fibre_mask(self, s: np.ndarray) -> np.ndarray:
        i = np.floor(np.mod(s, 1.0) * self.n).astype(int)
        return (i[:, None] + i[None, :]) % 2 == 1

    def _gmsh_fibres(self) -> list[int]:
        import gmsh

        occ, h = gmsh.model.occ, 1.0 / self.n
        cell = occ.addRectangle(0, 0, 0, 1, 1)
        squares = [(2, occ.addRectangle(i * h, j * h, 0, h, h))
                   for i in range(self.n) for j in range(self.n) if (i + j) % 2]
        _, children = occ.fragment([(2, cell)], squares)
        return sorted({t for child in children[1:] for _, t in child})


GENERATE = {"microstructure": {"kind": "checkerboard", "n": [2, 4], "count": 3, "seed": 1},
            "loads": {"per_microstructure": 2, "radius": 0.02, "seed": 2},
            "law": "linear", "mesh": {"size": 0.1}, "image_resolution": 16}


def fake_samples(n_structures: int, per: int) -> dict[str, np.ndarray]:
    s = n_structures * per
    return {"micro_index": np.arange(s) // per, "F": np.tile(np.eye(2), (s, 1, 1)),
            "P": np.zeros((s, 2, 2)), "A": np.zeros((s, 2, 2, 2, 2))}


def test_a_new_family_goes_through_data_sets_and_the_operator_inputs(tmp_path):
    from neuroscale_couple.datagen import plan
    from neuroscale_couple.store import load_rve_dataset, write_dataset
    from neuroscale_couple.training import TrainingData

    structures, F = plan(GENERATE)
    assert [type(s) for s in structures] == [Checkerboard] * 3 and F.shape == (6, 2, 2)
    assert {s.n for s in structures} <= {2, 3, 4} and isinstance(structures[0], Structure)
    assert structures[0].image(64).mean() == pytest.approx(structures[0].volume_fraction, abs=1e-2)
    write_dataset(tmp_path / "d.h5", GENERATE, stored_arrays(structures, 16), fake_samples(3, 2))
    d = load_rve_dataset(tmp_path / "d.h5")
    data = TrainingData.from_arrays(d, 8)
    assert data.structure is Checkerboard and data.images.shape == (3, 1, 8, 8)
    assert data.whole_structures  # cells: held out whole
    model, mcfg = data.structure.new_operator({"resolution": 8, "width": 8, "modes": 2,
                                               "levels": 2, "latent": 8, "hidden": 8,
                                               "members": 2}, data)
    assert mcfg["law"] == "linear" and mcfg["matrix"] == (3.0, 0.35)  # the defaults' phases
    model.card = {"data_config": GENERATE}  # images rendered at the data's resolution
    with torch.no_grad():
        from_data = model.encode(data.images)[0]
    torch.testing.assert_close(model.latents(structures), from_data, rtol=0, atol=0)


@pytest.mark.dolfinx
@pytest.mark.skip_in_parallel
def test_a_new_family_is_generated_with_the_rve_solver(tmp_path):
    """`neuroscale generate` of checkerboards (mesh, RVE, data set) with no code but the class:
    a 2 × 2 checkerboard is invariant under a quarter turn, so A_xxxx = A_yyyy."""
    from mpi4py import MPI

    from neuroscale_couple.datagen import generate
    from neuroscale_couple.store import load_rve_dataset

    cfg = dict(GENERATE, microstructure={"kind": "checkerboard", "n": 2},
               loads={"per_microstructure": 1, "radius": 0.01, "seed": 0})
    generate(cfg, tmp_path / "c.h5", MPI.COMM_SELF, progress=False)
    d = load_rve_dataset(tmp_path / "c.h5")
    assert d["micro/kind"].tolist() == [b"checkerboard"]
    A = d["samples/A"][0]
    assert A[0, 0, 0, 0] == pytest.approx(A[1, 1, 1, 1], rel=2e-2)
    assert 3.0 < A[0, 0, 0, 0] < 70.0  # between the phases' stiffnesses


def test_kinds_and_keys_are_checked_with_the_fix_named():
    with pytest.raises(InputError, match=r"kind='hexagon'.*checkerboard.*random_fibres"):
        from_config({"kind": "hexagon"})
    with pytest.raises(InputError, match="did you mean 'volume_fraction'"):
        from_config({"kind": "random_fibres", "volume_fractoin": 0.3})
    with pytest.raises(InputError, match="microstructure.volume_fraction is missing"):
        from_config({"kind": "laminate"})
    with pytest.raises(InputError, match="belongs to Checkerboard already"):
        register(type("Other", (), {"kinds": ("checkerboard",)}))
    assert from_config({"kind": "checkerboard", "n": 3}) == Checkerboard(3)


def test_another_package_adds_a_family_through_an_entry_point(monkeypatch):
    import importlib.metadata

    from neuroscale_couple import structures

    loaded = []

    class Entry:
        def load(self):
            loaded.append(register(type("Hexagon", (), {"kinds": ("hexagon_test",)})))

    def entry_points(*, group, name):
        return [Entry()] if (group, name) == (structures.ENTRY_POINTS, "hexagon_test") else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(structures, "_FAMILIES", dict(structures._FAMILIES))
    assert family("hexagon_test") is loaded[0]


def test_families_that_store_different_arrays_are_not_mixed():
    from neuroscale_couple.solvers.microstructure import FibreCell, laminate, single_fibre

    cells = [single_fibre(0.3), laminate(0.4)]  # a laminate is stored as a fibre cell
    assert common_family(cells) is FibreCell
    assert stored_arrays(cells, 8)["kind"].tolist() == [b"single_fibre", b"laminate"]
    with pytest.raises(InputError, match="checkerboard, single_fibre store different arrays"):
        stored_arrays([single_fibre(0.3), Checkerboard(2)], 8)


def test_the_older_crystal_shape_is_read_as_a_kind_and_written_back_in_its_shape():
    crystal = {"element": "Cu", "supercell": [2, 2, 2], "temperature": [0, 300]}
    old = {"crystal": crystal, "loads": {"per_microstructure": 4}}
    new = {"microstructure": dict(crystal, kind="crystal"), "loads": old["loads"]}
    assert config_groups(old) == config_groups(new) == [dict(crystal, kind="crystal")]
    resolved = [dict(crystal, kind="crystal", a0=3.6)]
    assert with_groups(old, resolved)["crystal"] == dict(crystal, a0=3.6)
    assert with_groups(new, resolved)["microstructure"] == resolved[0]
    assert with_groups(new, config_groups(new)) is new
    assert family("crystal").family_config(old) == family("crystal").family_config(new) == crystal


def test_data_sets_without_stored_kinds_are_read_by_their_config():
    from neuroscale_couple.solvers.crystal import Crystal
    from neuroscale_couple.solvers.microstructure import FibreCell

    assert data_family({"config": {"crystal": {"element": "Cu"}}}) is Crystal
    assert data_family({"config": {"element": "Cu", "image_resolution": 32}}) is Crystal  # replay
    assert data_family({"config": {"microstructure": {"kind": "laminate"}}}) is FibreCell
    assert data_family({"config": {}, "micro/kind": np.array([b"checkerboard"])}) is Checkerboard


def test_crystal_groups_plan_one_structure_per_temperature_in_either_shape():
    pytest.importorskip("ase")
    from neuroscale_couple.datagen import plan

    crystal = {"element": "Cu", "a0": 3.6, "temperature": [0, 300]}
    loads = {"per_microstructure": 3, "seed": 1}
    old, F_old = plan({"crystal": crystal, "loads": loads})
    new, F_new = plan({"microstructure": dict(crystal, kind="crystal"), "loads": loads})
    assert [s.key for s in old] == [s.key for s in new] and len(new) == 2
    assert [s.noisy for s in new] == [False, True]
    np.testing.assert_array_equal(F_old, F_new)
    assert np.linalg.norm((F_new - np.eye(2)).reshape(-1, 4), axis=1).max() <= 0.05  # default
    with pytest.raises(InputError, match="did you mean 'supercell'"):
        plan({"microstructure": dict(crystal, kind="crystal", supercel=[2, 2, 2]),
              "loads": loads})


def test_material_defaults_are_written_once():
    from neuroscale_couple.materials import TwoPhaseMaterial
    from neuroscale_couple.operators.sano import SANOConfig

    m, c = TwoPhaseMaterial(), SANOConfig()
    assert (c.law, c.matrix, c.fibre) == (m.law, (m.matrix.E, m.matrix.nu),
                                          (m.fibre.E, m.fibre.nu))
    assert TwoPhaseMaterial.from_config({"fibre": {"E": 10.0, "nu": 0.3}}).fibre.E == 10.0
    with pytest.raises(InputError, match="law='plastic'"):
        TwoPhaseMaterial.from_config({"law": "plastic"})
