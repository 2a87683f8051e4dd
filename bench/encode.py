"""Where the one-off encoding of microstructures goes, stage by stage.

The Coupler encodes each point's microstructure once per run (``CoarseGrainingOperator.latents``:
render the cell image, then the SANO encoder in float32, batches of 64), and the FE² benchmark
counts that as micro time. This script times it for one rank's share of the FE² example's points
(``microstructures_at`` of examples/fe2_composite.py at random points of the plate) on the threads
a rank gets (default 1: 2 ranks on this 2-core machine), split into rendering and the encoder's
modules (SANO: lift, Fourier blocks, Haar wavelet, token projections, cross-scale attention,
scale mixer, latent head; a distilled encoder: its strided convolutions and latent head; "other"
is the rest of ``encode``), for each model of ``--model`` (default: the shipped composite model
and its distilled encoder, examples/models/fe2_composite_fast.pt). Best of ``--repeat`` runs, on
the wall clock or (``--clock cpu``, on a machine shared with other jobs) this process's CPU time.

With ``bench/results/fe2_speedup_412.json`` present it also prints the encoding time per cell
under which that run's micro part would reach 1000×. Writes ``bench/results/encode.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STAGES = ("lift", "fourier", "wavelet", "tokens", "attention", "mixer", "to_latent")
MODELS = [ROOT / "examples" / "models" / f"fe2_composite{s}.pt" for s in ("", "_fast")]


def cells(n: int, seed: int = 0) -> list:
    """Microstructures of the FE² example at n random points of the plate outside the hole."""
    sys.path.insert(0, str(ROOT / "examples"))
    from fe2_composite import HOLE_RADIUS, microstructures_at

    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (4 * n, 2))
    x = x[np.hypot(x[:, 0], x[:, 1]) > HOLE_RADIUS][:n]
    return microstructures_at(x, np.arange(n))


def timed_stages(encoder: torch.nn.Module, names: list[str], clock) -> dict[str, float]:
    """Forward hooks on the encoder's stages ``names``; the returned dict accumulates each
    one's time (s) on ``clock``."""
    spent = dict.fromkeys(names, 0.0)

    def hooks(name: str):
        started = []

        def pre(*_) -> None:
            started.append(clock())

        def post(*_) -> None:
            spent[name] += clock() - started.pop()

        return pre, post

    for name in names:
        stage = getattr(encoder, name)
        for module in stage if isinstance(stage, torch.nn.ModuleList) else [stage]:
            pre, post = hooks(name)
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)
    return spent


def measure(model, structures: list, batch: int, repeat: int, clock) -> dict:
    """Best of ``repeat`` runs (by ``latents()``) of rendering, the encoder by stage (SANO's
    modules of :data:`STAGES`; the convolutions and latent head of a distilled encoder) and
    ``model.latents`` as a whole, in seconds of ``clock``."""
    encoder = model.float()  # as latents() encodes
    names = [n for n in (*STAGES, "convolutions") if hasattr(encoder, n)]
    spent = timed_stages(encoder, names, clock)
    runs = []
    with torch.inference_mode():
        for _ in range(repeat):
            for name in names:
                spent[name] = 0.0
            t0 = clock()
            images = encoder.structure_inputs(structures)
            t1 = clock()
            for i in range(0, len(images), batch):
                encoder.encode(images[i:i + batch])
            t2 = clock()
            stages = {name: spent[name] for name in names}
            runs.append({"render_s": t1 - t0, "encode_s": t2 - t1, "stages_s": stages
                         | {"other": t2 - t1 - sum(stages.values())}})
            t0 = clock()
            model.latents(structures, batch=batch)
            runs[-1]["latents_s"] = clock() - t0
    best = min(runs, key=lambda r: r["latents_s"])
    return {**best, "ms_per_cell": 1e3 * best["latents_s"] / len(structures)}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=206, help="microstructures (one rank's share)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--model", nargs="+", default=[str(m) for m in MODELS if m.exists()],
                   help="model files to compare (default: the shipped composite model and its "
                   "distilled encoder)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (on a machine shared with "
                   "other jobs)")
    p.add_argument("--out", default=str(RESULTS / "encode.json"))
    args = p.parse_args()
    from neuroscale_couple.operators.base import load_operator

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    structures = cells(args.cells)
    models = {Path(m).stem: load_operator(m).eval() for m in args.model}
    record = {"cells": args.cells, "threads": args.threads, "batch": args.batch,
              "clock": args.clock, "command": "python " + " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "models": {name: measure(model, structures, args.batch, args.repeat, clock)
                         for name, model in models.items()}}
    fe2 = RESULTS / "fe2_speedup_412.json"
    if fe2.exists():
        r = json.loads(fe2.read_text())
        ref, op = r["runs"]["reference"], r["runs"]["operator"]
        budget = ref["micro_time_s"] / 1000 - (op["micro_time_s"] - op["encode_time_s"])
        record["ms_per_cell_for_1000x_micro_412"] = 1e3 * budget / (
            r["quadrature_points"] / r["ranks"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))

    print(f"encoding {args.cells} FE² cells on {args.threads} thread(s), batches of "
          f"{args.batch}, {args.clock} clock")
    for name, m in record["models"].items():
        total = m["render_s"] + m["encode_s"]
        print(name)
        for stage, t in [("render images", m["render_s"]), *m["stages_s"].items()]:
            print(f"  {stage:<14}{t:8.3f} s {100 * t / total:5.1f} %")
        print(f"  {'total':<14}{total:8.3f} s; latents() {m['latents_s']:.3f} s = "
              f"{m['ms_per_cell']:.3f} ms a cell")
    if "ms_per_cell_for_1000x_micro_412" in record:
        print(f"1000x micro on the 412-point FE² record needs ≤ "
              f"{record['ms_per_cell_for_1000x_micro_412']:.2f} ms a cell")
    return record


if __name__ == "__main__":
    main()
