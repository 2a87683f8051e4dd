"""bench/transfer.py on a tiny case: nested subsets, both modes trained, calibrated and tested
on the new material's sets, the record complete and resumed; the fine-tune path it runs
(`neuroscale train --init --new-material`, `neuroscale subset --samples`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from neuroscale_couple.cli import main
from neuroscale_couple.store import load_rve_dataset, write_dataset

ROOT = Path(__file__).resolve().parents[2]
ANCHOR = ROOT / "examples" / "models" / "fe2_composite.anchor"
STIFFER = 7.0
"""The toy new material: the shipped material's data with stresses this many times larger and
the matrix relabelled (E 21.0) — data of another material to the fine-tune path."""


def load_bench():
    spec = importlib.util.spec_from_file_location("transfer_bench", ROOT / "bench" /
                                                  "transfer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def new_material(src: Path, dst: Path, *, one_load: bool) -> int:
    """``src`` as data of the toy material (``one_load``: the first load of each cell only)."""
    d = load_rve_dataset(src)
    index = d["samples/micro_index"]
    keep = (np.unique(index, return_index=True)[1] if one_load else np.arange(len(index)))
    micro = {k.split("/", 1)[1]: v for k, v in d.items() if k.startswith("micro/")}
    samples = {k.split("/", 1)[1]: v[keep] for k, v in d.items()
               if k.startswith("samples/") and not k.startswith("samples/fields/")}
    samples["P"] = samples["P"] * STIFFER
    samples["A"] = samples["A"] * STIFFER
    config = dict(d["config"], matrix={"E": 3.0 * STIFFER, "nu": 0.3})
    write_dataset(dst, config, micro, samples)
    return len(keep)


@pytest.fixture
def case(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    bench = load_bench()
    new_material(Path(f"{ANCHOR}.h5"), work / "toy.pool.h5", one_load=True)
    new_material(Path(f"{ANCHOR}_calibration.h5"), work / "toy.calibration.h5", one_load=False)
    new_material(Path(f"{ANCHOR}_calibration.h5"), work / "toy.test.h5", one_load=True)
    return bench, bench.Case("toy", {s: work / f"toy.{s}.yaml" for s in bench.SETS}), work


def test_transfer_bench_trains_both_modes_on_nested_subsets_and_resumes(case, tmp_path,
                                                                         monkeypatch):
    from neuroscale_couple.operators.base import load_operator

    bench, toy, work = case
    out = tmp_path / "transfer.json"
    record = bench.run([toy], [2, 4], [0], bench.Budget(passes=4, min_epochs=1, batch_size=4),
                       work, out, "test", ranks=1)
    assert not record["partial"]
    assert set(record["runs"]) == {f"toy/{m}/N{n}/seed0" for m in ("finetune", "scratch")
                                   for n in (2, 4)}
    assert record["cases"]["toy"]["material"]["matrix"] == {"E": 3.0 * STIFFER, "nu": 0.3}
    assert record["cases"]["toy"]["zero_shot"] is None  # the shipped model knows other phases
    n_test = record["cases"]["toy"]["test"]["samples"]
    for key, r in record["runs"].items():
        assert r["test_samples"] == n_test, key  # every model evaluated on the whole test set
        assert np.isfinite([r["rel_l2_stress"], r["rel_l2_tangent"], r["ece"]]).all(), key
        assert 0.0 <= r["coverage_95"] <= 1.0 and r["train_s"] > 0 and r["solve_s"] > 0, key
    small, large = (load_rve_dataset(work / f"toy.pool.seed0.n{n}.h5")["samples/F"]
                    for n in (2, 4))
    assert len(small) == 2 and len(large) == 4
    assert all(any(np.array_equal(F, G) for G in large) for F in small)  # nested
    assert record["summary"]["toy"]["finetune"]["4"]["seeds"] == 1
    tuned = load_operator(work / "toy.pool.seed0.n4.finetune.pt")
    assert tuned.config.matrix == (3.0 * STIFFER, 0.3)  # the model took the new material
    assert tuned.card["init"]["transfer_from"]["matrix"] == [3.0, 0.35]
    assert tuned.calibration and tuned.card["model_config"]["matrix"] == [3.0 * STIFFER, 0.3]
    assert json.loads(out.read_text())["runs"] == record["runs"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(bench, "run_one", no_training)  # a rerun skips what the record has
    again = bench.run([toy], [2, 4], [0], bench.Budget(passes=4, min_epochs=1, batch_size=4),
                      work, out, "test", ranks=1)
    assert again["runs"] == record["runs"]


def test_fine_tuning_to_another_material_asks_for_the_flag(case, tmp_path, capsys):
    bench, _, work = case
    steps = bench.Budget(min_epochs=1, batch_size=32, steps=150)
    assert (steps.epochs(10), steps.epochs(300)) == (150, 15)  # ~150 steps at any N
    assert bench.Budget(passes=2000, min_epochs=10).epochs(300) == 10
    config = bench.train_config("finetune", 1, 4, 0, tmp_path / "ft.yaml")
    argv = ["train", str(config), "--data", str(work / "toy.pool.h5"), "--out",
            str(tmp_path / "m.pt"), "--init", str(bench.MODEL), "--quiet"]
    assert main(argv) == 2
    assert "add --new-material" in capsys.readouterr().err
    assert main([*argv[:-3], "--new-material"]) == 2  # no checkpoint to fine-tune
    assert "give it with --init" in capsys.readouterr().err
    assert main(["subset", str(work / "toy.pool.h5"), "--samples", "0", "--out", "x.h5"]) == 2
    assert "--samples 0: give the number of samples" in capsys.readouterr().err
