"""`neuroscale explain`: what a SANO operator's encoder sees of given cells, as pictures.

Per cell one PNG: the fibre-fraction image; the energy of the feature map's Haar coefficients on
each wavelet scale (where in the cell each scale carries information, and its share of the
whole); per scale of the last cross-scale attention block, the share of each token's attention
that goes to the *other* scales (the scale transitions), with the mean shares between scales as
a matrix; and the learned weights with which the scales are pooled into the latent. The numbers
behind the pictures go to ``explain.json`` in the same folder.

The cells come from a config with the ``microstructure`` groups of a generate config (see
:mod:`neuroscale_couple.structures`), e.g. ``{kind: random_fibres, volume_fraction: [0.1,
0.5], n_fibres: [1, 8], count: 4, seed: 7}``; a family operator also needs the ``matrix`` and
``fibre`` phases.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from neuroscale_couple.config import check_keys
from neuroscale_couple.errors import InputError
from neuroscale_couple.structures import config_groups, family

CONFIG_KEYS = ("microstructure", "matrix", "fibre")
"""Keys of an explain config."""


def cells_from_config(config: dict) -> tuple[list, list[str]]:
    """The structures a config's ``microstructure`` groups draw, and a name for each
    (``kind #i``)."""
    check_keys(config, CONFIG_KEYS, "the explain config")
    structures, names = [], []
    for g, group in enumerate(config_groups(config)):
        cls = family(group.get("kind"), f"microstructure[{g}]")
        for structure in cls.plan(cls.resolve(group), f"microstructure[{g}]"):
            names.append(f"{structure.kind} #{len(structures)}")
            structures.append(structure)
    if not structures:
        raise InputError("the explain config draws no cell: give `microstructure` groups with "
                         "count ≥ 1")
    return structures, names


def explain_cells(model, structures: list, names: list[str], out: str | Path) -> dict:
    """Write ``cell_NNN.png`` per structure and ``explain.json`` into ``out``; returns the
    JSON record (per cell: name, mean fibre fraction, energy share per scale, mean attention
    shares between scales per block; the scale weights)."""
    if not hasattr(model, "explain"):
        raise InputError(f"{type(model).__name__} has no wavelet scales or attention to show: "
                         "`neuroscale explain` takes a SANO model (not a distilled or crystal "
                         "operator)")
    if model.dim != 2:
        raise InputError("`neuroscale explain` draws 2D cells: a 3D operator's scales and "
                         "attention are returned by model.explain(inputs), not pictured")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    seen = model.explain(model.structure_inputs(structures))
    weights = seen["scale_weights"].cpu().numpy()
    sizes = np.array([e.shape[-1] ** 2 for e in seen["scale_energy"]], dtype=float)
    record = {"scale_weights": weights.tolist(), "scales": _scale_names(len(sizes)),
              "uniform_attention_share": (sizes / sizes.sum()).tolist(), "cells": []}
    for i, name in enumerate(names):
        energy = [e[i].cpu().numpy() for e in seen["scale_energy"]]
        total = sum(float(e.sum()) for e in energy)
        attention = [[a[i].cpu().numpy() for a in block] for block in seen["attention"]]
        matrices = [np.array([a.reshape(-1, a.shape[-1]).mean(0) for a in block])
                    for block in attention]
        record["cells"].append({
            "name": name, "png": f"cell_{i:03d}.png",
            "fibre_fraction": float(seen["fraction"][i].mean()),
            "energy_share": [float(e.sum()) / total for e in energy],
            "attention_between_scales": [m.tolist() for m in matrices]})
        _plot_cell(out / f"cell_{i:03d}.png", name, seen["fraction"][i].cpu().numpy(), energy,
                   attention[-1] if attention else [], matrices[-1] if matrices else None,
                   weights)
    (out / "explain.json").write_text(json.dumps(record, indent=1))
    return record


def _scale_names(n_scales: int) -> list[str]:
    """Finest detail first, approximation last."""
    return [f"detail {s + 1}" for s in range(n_scales - 1)] + ["approximation"]


def _plot_cell(path: Path, name: str, fraction: np.ndarray, energy: list[np.ndarray],
               attention: list[np.ndarray], matrix: np.ndarray | None,
               weights: np.ndarray) -> None:
    """One cell's figure (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S = len(energy)
    labels = _scale_names(S)
    fig, axes = plt.subplots(2, S + 1, figsize=(2.6 * (S + 1), 5.6))
    axes[0, 0].imshow(fraction, cmap="Greys", vmin=0, vmax=1, origin="lower")
    axes[0, 0].set_title(f"{name}\nfibre fraction {fraction.mean():.2f}", fontsize=9)
    total = sum(float(e.sum()) for e in energy)
    for s, e in enumerate(energy):
        ax = axes[0, s + 1]
        ax.imshow(e, cmap="magma", origin="lower")
        ax.set_title(f"{labels[s]} ({e.shape[0]}²)\n{e.sum() / total:.0%} of the energy",
                     fontsize=9)
    for s, a in enumerate(attention):
        ax = axes[1, s]
        ax.imshow(1.0 - a[..., s], cmap="viridis", vmin=0, vmax=1, origin="lower")
        ax.set_title(f"{labels[s]}: attention\non other scales {1 - a[..., s].mean():.0%}",
                     fontsize=9)
    if matrix is not None:
        ax = axes[1, S]
        ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
        for (q, k), v in np.ndenumerate(matrix):
            ax.text(k, q, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.5 else "black")
        ax.set_yticks(np.arange(S), [f"{n} (w {w:.2f})" for n, w in zip(labels, weights,
                                                                        strict=True)],
                      fontsize=7)
        ax.set_xticks(np.arange(S), [str(s + 1) for s in range(S)], fontsize=7)
        sizes = np.array([e.size for e in energy], dtype=float)
        uniform = " ".join(f"{u:.2f}" for u in sizes / sizes.sum())
        ax.set_xlabel(f"key scale\n(uniform attention: {uniform})", fontsize=7)
        ax.set_title("attention shares between\nscales; w: pooling weight", fontsize=9)
    for ax in axes.flat:
        if not ax.images:
            ax.axis("off")
        elif ax is not axes[1, S]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bind_phases(model, config: dict) -> None:
    """Give a family operator the config's phases (its inputs); a fixed-material model needs
    none."""
    if getattr(model, "takes_material", False):
        if "matrix" not in config or "fibre" not in config:
            raise InputError("a family operator takes the phases as inputs: give `matrix: {E, "
                             "nu}` and `fibre: {E, nu}` in the explain config")
        model.bind_material({"matrix": config["matrix"], "fibre": config["fibre"]})


def run(model_path: str | Path, config: dict, out: str | Path) -> dict:
    """Load the model, draw the config's cells, write the pictures (the CLI's work)."""
    from neuroscale_couple.operators.base import load_operator

    model = load_operator(model_path)
    structures, names = cells_from_config(config)
    bind_phases(model, config)
    with torch.no_grad():
        return explain_cells(model, structures, names, out)
