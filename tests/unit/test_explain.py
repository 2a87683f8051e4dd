"""`neuroscale explain`: the encoder's wavelet scales, cross-scale attention and scale weights."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuroscale_couple.errors import InputError
from neuroscale_couple.explain import cells_from_config, explain_cells
from neuroscale_couple.operators.sano import SANO, SANOConfig
from neuroscale_couple.solvers.microstructure import random_fibres

MODEL = Path(__file__).resolve().parents[2] / "examples" / "models" / "fe2_composite.pt"
SMALL = SANOConfig(resolution=16, width=8, modes=4, levels=2, heads=2, latent=16, hidden=16,
                   members=2)
CELLS = {"microstructure": [
    {"kind": "random_fibres", "volume_fraction": [0.2, 0.4], "n_fibres": [1, 4], "count": 2,
     "seed": 3},
    {"kind": "fibre_chain", "volume_fraction": [0.22, 0.36], "n_fibres": 2, "count": 1,
     "seed": 4}]}


@pytest.mark.parametrize("cross", [True, False])
def test_explain_shows_scales_that_add_up_and_attention_shares(cross):
    """The scales' energies add up to the feature map's (the Haar transform is orthonormal),
    each token's attention shares over the scales sum to one, and without cross-scale
    attention (the ablation) every scale attends to itself alone."""
    torch.manual_seed(0)
    model = SANO(dataclasses.replace(SMALL, cross_scale=cross)).eval()
    x = model.structure_inputs([random_fibres(0.3, 3, 1), random_fibres(0.4, 2, 2)])
    seen = model.explain(x)
    _, h = model.encode(x)
    total = sum(e.sum((-1, -2)) for e in seen["scale_energy"])
    torch.testing.assert_close(total, h.square().sum((1, 2, 3)), rtol=1e-5, atol=0)
    assert len(seen["scale_energy"]) == SMALL.levels + 1
    for block in seen["attention"]:
        for s, a in enumerate(block):
            torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
            if not cross:
                assert torch.equal(a[..., s], torch.ones(a.shape[:-1]))
    assert torch.isclose(seen["scale_weights"].sum(), torch.tensor(1.0))
    torch.testing.assert_close(model.encode(x)[0], model.latents(
        [random_fibres(0.3, 3, 1), random_fibres(0.4, 2, 2)]))  # explain changes nothing


def test_explain_writes_a_png_per_cell_and_the_numbers(tmp_path):
    torch.manual_seed(1)
    structures, names = cells_from_config(CELLS)
    assert names == ["random_fibres #0", "random_fibres #1", "fibre_chain #2"]
    record = explain_cells(SANO(SMALL), structures, names, tmp_path)
    assert json.loads((tmp_path / "explain.json").read_text()) == record
    for cell in record["cells"]:
        png = tmp_path / cell["png"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert abs(sum(cell["energy_share"]) - 1) < 1e-6
        for matrix in cell["attention_between_scales"]:
            assert all(abs(sum(row) - 1) < 1e-5 for row in matrix)


def test_explain_refuses_what_it_cannot_show(tmp_path):
    with pytest.raises(InputError, match="nearest|microstructure"):
        cells_from_config({"microstucture": CELLS["microstructure"]})
    with pytest.raises(InputError, match="takes a SANO model"):
        explain_cells(torch.nn.Linear(1, 1), [random_fibres(0.3, 3, 1)], ["c"], tmp_path)


def test_the_cli_explains_the_shipped_model(tmp_path):
    cfg = tmp_path / "cells.yaml"
    cfg.write_text("microstructure:\n  - {kind: random_fibres, volume_fraction: 0.3, "
                   "n_fibres: 3, count: 1, seed: 5}\n")
    out = subprocess.run([sys.executable, "-m", "neuroscale_couple.cli", "explain", "--model",
                          str(MODEL), "--config", str(cfg), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "x" / "cell_000.png").is_file() and "energy per scale" in out.stdout
