"""Write docs/benchmarks.md from the benchmark records in bench/results/*.json.

Every figure on that page comes from a JSON record (or the shipped model card
examples/models/fe2_composite.json); nothing is typed in. Each table names the command that
produced it, its date and machine where the record holds them — records that do not say so are
marked "not recorded", with the settings they do hold and the record file's last commit date.
The PNGs in bench/results (and the model's reliability diagram) are copied into
docs/img/bench/, which this script owns (stale copies are removed), so `mkdocs build --strict`
finds them.

Run: ``.venv/bin/python scripts/benchmarks_doc.py`` (``make docs`` runs it before mkdocs).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL_CARD = ROOT / "examples" / "models" / "fe2_composite.json"
MODEL_PLOTS = [ROOT / "examples" / "models" / "fe2_composite.reliability.png",
               ROOT / "examples" / "models" / "hmm_cu_thermal.reliability.png"]
DOCS = ROOT / "docs"
IMAGES = "img/bench"  # relative to docs/

# Keys a record may carry to say where it came from (none of today's records do).
FAST_MODEL = ROOT / "examples" / "models" / "fe2_composite_fast.pt"
"""The shipped distilled encoder (`make fast-model`), whose card holds its accuracy."""
PROVENANCE = {"command": ("command", "cmd", "argv"),
              "date": ("date", "timestamp", "time", "created"),
              "machine": ("machine", "host", "hostname", "platform", "cpu")}

RUN_LABELS = {
    "reference": "fine solver at every point (`--reference`)",
    "operator": "operator + fallback + online retraining",
    "background": "same, background retraining (`--background-retrain`)",
    "cost_aware": "same, retraining when it pays (`--cost-aware-retrain`)",
    "no_retrain": "operator + fallback, frozen (`--no-retrain`)",
    "operator_only": "operator only (`--rtol inf`)",
    "audit": "the product run again with `--audit` (timings not compared)",
}

# What each coupled benchmark is; the figures come from the record.
COUPLED_INTRO = {
    "fe2_speedup": (
        "FE² of the graded fibre-composite plate with a hole (`examples/fe2_composite.py`) at "
        "the default loading, where every point stays inside the shipped operator's training "
        "loads |F̄ − I| ≤ 0.3."),
    "fe2_speedup_beyond": (
        "The same FE² problem loaded further, so that the points around the hole leave the "
        "operator's training loads."),
    "fe2_speedup_rtol002": (
        "The default FE² problem at a strict tolerance, rtol 0.02 with atol 0.001 GPa, and "
        "with an audit run: what the bound's false-negative rate costs in speed."),
    "fe2_speedup_412": (
        "A bigger FE² macro problem (finer macro mesh)."),
    "hmm_speedup": (
        "HMM of the copper plate with a hole (`examples/hmm_atomistic.py`): a Cauchy–Born "
        "crystal (EMT Cu, 31 atoms, relaxed) at every quadrature point, 0 K."),
    "hmm_speedup_300K_202": (
        "The same HMM problem at 300 K: the fine solves are Langevin NVT averages, the operator "
        "is the thermal model, and the policy bounds the model error only "
        "(`Policy(exclude_noise=True)`)."),
    "hmm_speedup_300K": (
        "A smaller HMM problem at 300 K, the finite-temperature half of a side-by-side "
        "comparison with `hmm_speedup_0K_small`."),
    "hmm_speedup_0K_small": (
        "The 0 K twin of `hmm_speedup_300K`: same mesh, steps, loading and tolerance."),
    "fe2_speedup_3d": (
        "3D FE² of the particle-composite open-hole coupon (`examples/fe2_composite_3d.py`, an "
        "eighth of it): a random-sphere cell at every quadrature point, the shipped 3D operator "
        "(`examples/models/fe2_composite_3d.pt`) with fallback to the 3D periodic RVE solver, "
        "here on a coarser RVE mesh than the model's training data (`--rve-mesh-size 0.25`, "
        "training 0.1) so that the classic reference runs in minutes."),
}
COUPLED_SCRIPTS = {"fe2_speedup_3d": "bench/fe2_speedup_3d.py"}
"""Benchmarks not named after their script's ``bench/<example>_speedup.py``."""
# Targets of the product run, from the benchmark scripts' docstrings: total and micro speed-up,
# displacement and stress error (None: no target), for the records they were set for.
# How to read a record's figures (no numbers: those come from the record).
COUPLED_NOTES = {
    "fe2_speedup": (
        "At this size the total is bounded by fixed costs that the reference pays as well "
        "(imports of torch and DOLFINx, building the macro problem) plus loading the model, so "
        "the total speed-up stays well below the micro one. With fallback, the micro part is "
        "the one-off encoding and the RVE solves of the few fallback points; a point's first "
        "solve (meshing, building the RVE, Newton from w = 0) costs several warm ones. The "
        "fallback points of the first step are cells of high fibre fraction with several "
        "fibres, the operator's least certain; from the next step on their cell fits serve "
        "them. Where a step sent 5 % of the points to the fine solver a retraining followed; "
        "the fallback modes then differ in when it ran."),
    "fe2_speedup_beyond": (
        "The first step's fallback is the default loading's; in the last steps the hole "
        "points leave the training loads and fall back; the operator alone stays within the "
        "error targets but the bound sends them to the RVE solver."),
    "fe2_speedup_rtol002": (
        "At this tolerance the network's bound exceeds the tolerance everywhere at the first "
        "step (the stresses are small, so 0.001 GPa + 2 % of ‖P̄‖ is tiny): every point falls "
        "back. The census at that step's end scores the cell fits at the next step's "
        "extrapolated loads, so from the next step on each point is served by its own cell "
        "fit until its bound exceeds the tolerance (the audit line gives how often the bound "
        "covered the true error). On this 5-step run the step in which every point is solved "
        "caps the gain."),
    "fe2_speedup_412": (
        "Encoding is paid once per run (counted as micro time, as an RVE build is in classic "
        "FE²), so the micro ratio grows with the load steps and Newton iterations the latents "
        "serve; the last column shows the ratio without it. See the encoding record for where "
        "that time goes. Background retraining is meant for ranks whose operator runs on a GPU "
        "while the fine solver uses the CPU; on shared CPU cores the training thread competes "
        "with the fine solves."),
    "hmm_speedup": (
        "The fallback points are solved once per step: `Policy.reuse` serves their later "
        "Newton iterates, and the next step's first iterate, from the linearisation at the "
        "last solve. Encoding a crystal is one descriptor, so it costs next to nothing."),
    "hmm_speedup_300K_202": (
        "Every point is noise-limited at this tolerance with 400-step MD averages, so the "
        "stress error against the reference is of the size of the reference's own MD noise "
        "(the operator-only run is as far from it); the displacement error is the figure to "
        "judge. Classic coupling needs more Newton iterations here because the MD noise "
        "perturbs each iterate."),
    "hmm_speedup_300K": (
        "An MD solve costs several relaxed 0 K solves, but classic coupling re-solves a noisy "
        "point only once F̄ has moved by more than `Policy.noisy_reuse`, so its reference is "
        "less than proportionally slower; the operator gains more at 300 K."),
    "fe2_speedup_3d": (
        "The speed-up and stress targets are missed (the displacement one is met). A coupled "
        "run can be at most 1/(fallback rate) times faster than classic FE² in its micro "
        "part. At the first step the loads are small and the 3D "
        "operator's calibrated bound lies above atol + rtol·‖P̄‖ at every point, so every point "
        "goes to the RVE solver, as in classic FE²; the retraining on those solves then "
        "narrows the bound so that the second step keeps almost every point on the operator, "
        "but the retraining costs about what it saves, and the total stays near classic FE². "
        "Frozen, the operator keeps its wide bound and nearly every point falls back at every "
        "step. The operator alone is fast (its row) but its stress error, the model's test "
        "error, is above the targets. 1000× with a stress error ≤ 1 % needs a sharper 3D "
        "operator (trained on more cells and loads) whose bound sits below the tolerance "
        "almost everywhere from the first step, not a looser policy."),
}
COUPLED_TARGETS = {"fe2_speedup": (100.0, 1000.0, 0.01, 0.02),
                   "fe2_speedup_beyond": (100.0, 1000.0, 0.01, 0.02),
                   "fe2_speedup_412": (100.0, 1000.0, 0.01, 0.02),
                   "hmm_speedup": (100.0, None, 0.01, None),
                   "fe2_speedup_3d": (1000.0, None, 0.005, 0.01)}
# Records of one problem at 0 K and at 300 K ("more speed-up at finite temperature").
TEMPERATURE_PAIRS = (("hmm_speedup", "hmm_speedup_300K_202"),
                     ("hmm_speedup_0K_small", "hmm_speedup_300K"))


# ---------------------------------------------------------------------------------- formatting
def num(x: float | None, digits: int = 3) -> str:
    """A measured number with ``digits`` significant digits (integers as they are)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}".replace(",", " ")
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:.1f}" if abs(x) < 1e5 else sci(x)
    if abs(x) < 1e-4:
        return sci(x)
    return f"{x:.{digits}g}"


def sci(x: float, digits: int = 2) -> str:
    """``x`` as mantissa × power of ten, e.g. 2.6e5."""
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def ratio(x: float | None) -> str:
    """A speed-up factor."""
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.0f}×" if x >= 10 else f"{x:.1f}×"


def err(x: float | None) -> str:
    return "–" if x is None else f"{x:.1e}"


def pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*out, ""]


# ---------------------------------------------------------------------------------- provenance
def committed(path: Path) -> str:
    """Date of the last commit that touched ``path`` (ISO), or a note saying why there is none."""
    try:
        day = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(path)], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "git history unavailable"
    if not day:
        return "not yet committed"
    return f"last committed {day}" + (", changed since" if dirty else "")


def provenance(record: dict, path: Path, settings: str, equivalent: str | None) -> list[str]:
    """The command/date/machine lines of a record: its own fields where present, else
    "not recorded" with what the record does hold."""
    found = {what: next((record[k] for k in keys if record.get(k) not in (None, "")), None)
             for what, keys in PROVENANCE.items()}
    rel = path.relative_to(ROOT)
    lines = [f"Record: `{rel}`.", ""]
    if found["command"] is not None:
        cmd = found["command"]
        cmd = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
        lines.append(f"- Command: `{cmd}`")
    else:
        lines.append(f"- Command: not recorded. The record holds {settings}"
                     + (f"; the equivalent command is `{equivalent}`." if equivalent else "."))
    lines.append(f"- Date: {found['date']}" if found["date"] is not None else
                 f"- Date: not recorded (record file {committed(path)}).")
    lines.append(f"- Machine: {found['machine']}" if found["machine"] is not None else
                 "- Machine: not recorded.")
    return [*lines, ""]


# ---------------------------------------------------------------------------------- sections
def figure(name: str, caption: str, images: dict[str, tuple[str, str]]) -> list[str]:
    """Markdown embedding the copied PNG ``name`` (if it exists) with a caption."""
    if name not in images:
        return []
    copy, source = images[name]
    return [f"![{caption}]({copy})", "", f"*{caption}* (`{source}`)", ""]


def rve_section(record: dict, path: Path, images: dict[str, tuple[str, str]]) -> list[str]:
    out = ["## The periodic RVE solver", "",
           "Time per Neo-Hookean RVE solve against the number of dofs, for P1 and P2 "
           "fluctuations, one core per solve: cold (from w = 0, stress only), cold with the "
           "consistent tangent, and warm (the same point after a small load increment, with "
           "tangent). Then the throughput of `neuroscale generate` on 1 and 2 ranks.", ""]
    out += provenance(record, path, "the solves and the generate runs below",
                      ".venv/bin/python bench/rve_solve.py")
    rows = [(f"P{s['degree']}", num(s["mesh_size"]), num(s["dofs"]), num(s["setup_s"]),
             num(s["cold_s"]), num(s["cold_tangent_s"]), num(s["warm_tangent_s"]),
             f"{s['newton_cold']} / {s['newton_warm']}") for s in record.get("solves", [])]
    out += table(("element", "mesh size", "dofs", "set-up s", "cold, stress only s",
                  "cold + tangent s", "warm + tangent s", "Newton cold / warm"), rows)
    target = record.get("target_10k")
    if target:
        out += [f"Target: an RVE of ~10k dofs solved with tangent in under "
                f"{num(target['target_s'])} s on one core. Measured at {num(target['dofs'])} "
                f"dofs: {num(target['cold_tangent_s'])} s — "
                f"{'met' if target.get('met') else 'not met'}.", ""]
    gen = record.get("generate")
    if gen:
        out += table(("`neuroscale generate` ranks", "samples", "wall s", "samples/s"),
                     [(g["ranks"], g["samples"], num(g["wall_s"]), num(g["samples_per_s"]))
                      for g in gen])
        if "generate_speedup_2_ranks" in record:
            out += [f"Speed-up on 2 ranks: {ratio(record['generate_speedup_2_ranks'])}.", ""]
    return out


def rve_live_section(record: dict, path: Path) -> list[str]:
    st = record["stages"]
    out = ["## Live RVEs on one rank", "",
           f"What a periodic RVE of mesh size {num(st['mesh_size'])} ({num(st['dofs'])} dofs, "
           "P1, Neo-Hookean) holds through its life on one rank — MPI communicators counted "
           "with MPI (context ids left before and after, over "
           f"{num(st['count'])} RVEs) and as the RVE reports them, resident memory (VmRSS "
           "growth) and its own estimate `memory_bytes()` — and how many RVEs a rank keeps "
           "live.", ""]
    out += provenance(record, path, "the fields below", ".venv/bin/python bench/rve_live.py")
    comms, told = st["communicators_measured"], st["communicators_reported"]
    rss, est = st["resident_bytes"], st["memory_bytes_estimate"]
    rows = [(stage.replace("_", " "), num(held), num(told.get(stage)),
             num(rss[stage] / 1e6) if stage in rss else "–",
             num(est[stage] / 1e6) if stage in est else "–") for stage, held in comms.items()]
    out += table(("stage", "communicators (MPI)", "communicators()", "RSS MB per RVE",
                  "memory_bytes() MB"), rows)
    parts = record["components"]
    out += [f"By component, one RVE: mesh and tags {parts['mesh_and_tags']}, function spaces "
            f"{parts['function_spaces']}, PETSc {parts['petsc']}, MUMPS {parts['mumps']}. "
            f"Warm-start states: {num(st['warm_states_bytes_per_rve'] / 1e6)} MB per RVE "
            "(two points; counted in the RSS above, not in `memory_bytes()`).", ""]
    out += table(("seconds per RVE", "value"),
                 [(k.removesuffix("_s").replace("_", " "), num(v))
                  for k, v in st["seconds_per_rve"].items()])
    lu = {k: v for k, v in record.get("lu_packages", {}).items() if v.get("available")}
    if lu:
        out += ["LU packages of this PETSc for a serial RVE (the RVE's communicators in all, "
                "one of them shared by all RVEs; P̄ and ∂P̄/∂F̄ against MUMPS's, relative to its "
                "largest entry):", ""]
        out += table(("LU", "communicators", "cold solve s", "warm solve s", "ΔP̄", "ΔA"),
                     [(k, num(v["communicators"]), num(v["solve_cold_s"]),
                       num(v["solve_warm_s"]), err(v["stress_difference"]),
                       err(v["tangent_difference"])) for k, v in lu.items()])
    refused = record["max_awake_without_hibernation"]
    reason = refused["reason"].strip().splitlines()
    out += [f"Awake RVEs (mesh size 0.1, solved) one process held before MPI failed: "
            f"{num(refused['awake_rves_solved'])} ({refused['error']}"
            + (f": `{reason[-1][:120]}`" if reason else "") + ").", ""]
    cache = record["cache"]
    out += table(("cache", "value"), [
        ("live RVEs (capacity)", f"{num(cache['live_rves'])} ({num(cache['capacity'])})"),
        ("awake at the end", num(cache["awake"])),
        ("communicator budget / held / left", f"{num(cache['communicator_budget'])} / "
         f"{num(cache['communicators_held'])} / {num(cache['communicators_left'])}"),
        ("memory budget / estimate / RSS growth, MB",
         f"{num(cache['memory_budget_bytes'] / 1e6)} / "
         f"{num(cache['memory_bytes_estimate'] / 1e6)} / "
         f"{num(cache['resident_growth_bytes'] / 1e6)}"),
        *[(f"pass {i + 1}: s per RVE, builds, hibernations, closed",
           f"{num(p['seconds_per_rve'])}, {num(p['builds'])}, {num(p['hibernations'])}, "
           f"{num(p['closed'])}") for i, p in enumerate(cache["passes"])],
        ("results identical to fresh RVEs", num(cache["identical_to_fresh_rves"]))])
    return out


def operator_section(record: dict, path: Path, images: dict[str, tuple[str, str]]) -> list[str]:
    targets = record.get("targets", {})
    out = ["## The operator on held-out data", "",
           "The shipped operator scored on microstructures and loads it has not seen (other "
           "seeds, the training families and ranges; `examples/models/fe2_composite.test.yaml`), "
           "out-of-distribution loads 0.3 ≤ ‖F̄ − I‖ ≤ 0.4 for the AUROC "
           "(`fe2_composite.ood.yaml`), and the throughput of `predict` with cached latents.", ""]
    model = record.get("model", "?")
    out += provenance(record, path, f"the model path `{Path(model).name}`",
                      ".venv/bin/python bench/operator.py")

    def target(key: str, fmt: Callable[[float], str], sense: str = "≤") -> str:
        return f"{sense} {fmt(targets[key])}" if key in targets else ""

    cov = record.get("coverage", {})
    bcov = record.get("bound_coverage", {})
    levels = sorted(cov, key=float)
    thr = record.get("throughput_points_per_s", {})
    rows = [
        ("test samples / OOD samples", f"{num(record.get('test_samples'))} / "
                                       f"{num(record.get('ood_samples'))}", ""),
        ("rel. L2 error of P̄", num(record.get("rel_l2_stress")),
         target("rel_l2_stress", num)),
        ("rel. L2 error of the tangent", num(record.get("rel_l2_tangent")),
         target("rel_l2_tangent", num)),
        (f"coverage of the {' / '.join(f'{float(p):.0%}' for p in levels)} regions",
         " / ".join(num(cov[p]) for p in levels), "nominal"),
        ("coverage of the fallback policy's error bound, same levels",
         " / ".join(num(bcov[p]) for p in sorted(bcov, key=float)), "nominal"),
        ("ECE of the per-component intervals", num(record.get("ece")), target("ece", num)),
        ("OOD AUROC", num(record.get("ood_auroc")), target("ood_auroc", num, "≥")),
    ]
    if thr:
        rows.append(("points/s, stress + tangent + Σ, cached latents, float32 / float64",
                     f"{sci(thr.get('float32', math.nan))} / {sci(thr.get('float64', math.nan))}",
                     f"≥ {sci(targets['points_per_s'], 1)}" if "points_per_s" in targets else ""))
        rows.append(("encoder ms per microstructure, float32 / float64",
                     f"{num(thr.get('encoder_ms_per_microstructure_float32'))} / "
                     f"{num(thr.get('encoder_ms_per_microstructure_float64'))}", ""))
    out += table(("metric", "measured", "target"), rows)
    if "scale_weights" in record:
        w = record["scale_weights"]
        out += ["Learned scale weights of the wavelet scales (finest first): "
                + ", ".join(num(x) for x in w) + ".", ""]
    out += figure("operator_reliability.png", "Reliability diagram of the shipped operator",
                  images)
    out += figure("operator_scale_weights.png", "Learned scale weights", images)
    return out


def model_card_section(images: dict[str, tuple[str, str]]) -> list[str]:
    if not MODEL_CARD.exists():
        return []
    card = json.loads(MODEL_CARD.read_text())
    rel = MODEL_CARD.relative_to(ROOT)
    out = ["## Model card of the shipped FE² operator", "",
           f"From `{rel}`, written by `neuroscale evaluate --card` in `make model`.", ""]
    data = card.get("data_config", {})
    micro = data.get("microstructure", [])
    micro = micro if isinstance(micro, list) else [micro]
    loads = data.get("loads", {})
    per = loads.get("per_microstructure", "?")
    rows = []
    for fam in micro:
        ball = dict(loads, **fam.get("loads", {}))
        shell = (f"{num(ball.get('min_radius', 0.0))} ≤ ‖F̄ − I‖ ≤ {num(ball.get('radius'))}")
        v = fam.get("volume_fraction")
        rows.append((fam.get("kind"), num(fam.get("count")),
                     "–".join(num(x) for x in v) if isinstance(v, list) else num(v),
                     "–".join(num(x) for x in fam["n_fibres"]) if isinstance(
                         fam.get("n_fibres"), list) else fam.get("n_fibres", "default"), shell))
    if rows:
        phases = ", ".join(f"{name} E = {num(data[name]['E'])}, ν = {num(data[name]['nu'])}"
                           for name in ("matrix", "fibre") if name in data)
        out += [f"Training data: {per} loads per microstructure, law `{data.get('law')}` "
                f"({phases}; stresses in the unit of E), RVE mesh size "
                f"{num((data.get('mesh') or {}).get('size'))}.", ""]
        out += table(("family", "cells", "fibre fraction", "fibres", "loads"), rows)
    mc = card.get("model_config", {})
    if mc:
        out += ["Architecture: " + ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in mc.items()
                                             if k not in ("matrix", "fibre", "law")) + ".", ""]
    stages = []
    if "init" in card:
        stages.append(("first stage", card["init"]))
    stages.append(("last stage", card))
    rows = []
    for label, stage in stages:
        tr, hist = stage.get("training", {}), stage.get("history", {})
        rows.append((label, num(tr.get("epochs")), num(tr.get("lr")), num(tr.get("lr_final")),
                     num(hist.get("best_epoch")),
                     num(hist.get("time_s") / 60) if "time_s" in hist else "–"))
    out += table(("training", "epochs", "lr", "final lr", "best epoch", "minutes"), rows)
    test = card.get("test_metrics", {})
    if test:
        cov = test.get("coverage", {})
        out += table(("on the test set", "value"), [
            ("samples", num(test.get("n_samples"))),
            ("rel. L2 error of P̄ / tangent", f"{num(test.get('rel_l2_stress'))} / "
                                              f"{num(test.get('rel_l2_tangent'))}"),
            ("coverage " + " / ".join(f"{float(p):.0%}" for p in cov),
             " / ".join(num(c) for c in cov.values())),
            ("ECE", num(test.get("ece"))), ("OOD AUROC", num(test.get("ood_auroc"))),
            ("calibration points", num(card.get("calibration_points")))])
    out += figure("fe2_composite.reliability.png", "Reliability diagram from the model card",
                  images)
    return out


def coupled_section(record: dict, path: Path, images: dict[str, tuple[str, str]]) -> list[str]:
    name = record.get("name", path.stem)
    example = "hmm" if name.startswith("hmm") else "fe2"
    script = COUPLED_SCRIPTS.get(name, f"bench/{example}_speedup.py")
    n_qp = record.get("quadrature_points", 0)
    out = [f"## `{name}`", "", COUPLED_INTRO.get(name, f"A coupled benchmark (`{script}`)."), ""]
    flags = record.get("example_flags", [])
    settings = (f"{record.get('ranks')} ranks, macro mesh size {record.get('mesh_size')} "
                f"({num(record.get('dofs'))} dofs, {num(n_qp)} quadrature points), "
                f"{record.get('steps')} load steps to stretch {record.get('stretch')}, "
                f"{tolerance_text(record)}"
                + (f", example flags `{' '.join(flags)}`" if flags else "")
                + (", the reference run reused from an earlier run of the same settings"
                   + (f" (settings hash `{record['reference_config_hash'][:12]}`; its time is "
                      "the one it took then)" if "reference_config_hash" in record else "")
                   if record.get("reference_reused") else ""))
    cmd = (f".venv/bin/python {script} --np {record.get('ranks')} --mesh-size "
           f"{record.get('mesh_size')} --steps {record.get('steps')} --stretch "
           f"{record.get('stretch')} {tolerance_flags(record)} --name {name}"
           + (f" {' '.join(flags)}" if flags else "") + f" --out out/bench_{name}")
    out += provenance(record, path, settings, cmd)
    runs = record.get("runs", {})
    ref = runs.get("reference", {})
    encode = any("encode_time_s" in r for r in runs.values())
    per_step = record.get("fallback_per_step", {})
    header = ["run", "total s", "micro s"] + (["of it encoding s"] if encode else []) + [
        "fine s", "retraining s", "fallback points per step", "error u", "error P̄",
        "Newton/step", "speed-up total", "speed-up micro"] + (
        ["micro without encoding"] if encode else [])
    rows = []
    for key, r in runs.items():
        is_ref = key == "reference"
        counts = " ".join(str(round(f * n_qp)) for f in per_step.get(key, []))
        enc = r.get("encode_time_s")
        row = [RUN_LABELS.get(key, key), num(r["total_time_s"]), num(r["micro_time_s"])]
        if encode:
            row.append("–" if is_ref or enc is None else num(enc))
        row += [num(r.get("fine_time_s")), "–" if is_ref else num(r.get("retrain_time_s")),
                "all" if is_ref else counts, err(r.get("rel_l2_displacement")),
                err(r.get("rel_l2_stress")),
                " ".join(str(n) for n in r.get("newton_iterations", [])),
                "–" if is_ref else ratio(ref["total_time_s"] / r["total_time_s"]),
                "–" if is_ref else ratio(ref["micro_time_s"] / r["micro_time_s"])]
        if encode:
            rest = r["micro_time_s"] - (enc or 0.0)
            row.append("–" if is_ref or rest <= 0 else ratio(ref["micro_time_s"] / rest))
        rows.append(row)
    out += table(header, rows)
    out += ["Errors are relative L2 norms over all dofs (u) and quadrature points (P̄) against "
            "the reference run; micro time is the fine solves, the operator and (where "
            "recorded) the one-off encoding of the points' structures.", ""]
    if name in COUPLED_NOTES:
        out += [COUPLED_NOTES[name], ""]
    out += targets_line(record)
    out += audit_lines(record)
    out += figure(f"{name}_fallback.png", f"Fallback rate per load step, {name}", images)
    return out


def tolerance_text(record: dict) -> str:
    """The run's fallback tolerances in words."""
    if "rtol" in record:
        return (f"fallback where the bound exceeds {num(record['atol'])} "
                f"{record.get('stress_unit', '')} + {record['rtol']}·‖P̄‖")
    return (f"tol {record.get('tol')} (recorded before rtol/atol: fallback where the bound "
            "exceeded tol·max(‖P̄‖, the model's stress scale))")


def tolerance_flags(record: dict) -> str:
    if "rtol" in record:
        return f"--rtol {record['rtol']}" + (
            f" --atol {record['atol']}" if record.get("atol_given") else "")
    return f"--tol {record.get('tol')}"


def audit_lines(record: dict) -> list[str]:
    """The audit run's check of the bound against the fine solver at every point-step."""
    a = record.get("audit")
    if not a:
        return []
    return [f"Audit (every point also solved by the fine solver at its own F̄ after every load "
            f"step): the bound covered {a['coverage']:.1%} of {a['operator_point_steps']} "
            f"operator point-steps; false negatives (true error above the run's tolerance, left "
            f"on the operator) {a['false_negative_rate']:.2%} of {a['point_steps']} point-steps "
            f"({a['false_negative_rate_relative']:.2%} against rtol·‖P̄‖ alone, each point's own "
            f"stress); largest relative error on the operator "
            f"{a['max_relative_error']:.1%}.", ""]


def targets_line(record: dict) -> list[str]:
    """The product run against the targets set for this record, if any."""
    if record.get("name") not in COUPLED_TARGETS:
        return []
    total_t, micro_t, u_t, p_t = COUPLED_TARGETS[record["name"]]
    checks = [f"total ≥ {total_t:.0f}×: {ratio(record['speedup_total'])}"]
    if micro_t is not None:
        checks.append(f"micro part ≥ {micro_t:.0f}×: {ratio(record['speedup_micro'])}")
    checks.append(f"displacement error ≤ {100 * u_t:g}%: "
                  f"{err(record['rel_l2_displacement'])}")
    if p_t is not None:
        checks.append(f"stress error ≤ {100 * p_t:g}%: {err(record['rel_l2_stress'])}")
    checks.append("Newton iterations per step within ±1 of the reference: "
                  + ("yes" if record.get("newton_within_one") else "no"))
    return ["Targets of the product run (operator + fallback + online retraining): "
            + "; ".join(checks) + ".", ""]


def temperature_section(records: dict[str, dict]) -> list[str]:
    """Speed-up per run mode of one problem at 0 K and at 300 K, from pairs of records."""
    out = []
    for cold, hot in TEMPERATURE_PAIRS:
        if cold not in records or hot not in records:
            continue
        a, b = records[cold], records[hot]
        if not out:
            out = ["## 0 K against 300 K", "",
                   "The same HMM problem with static (0 K) and Langevin MD (300 K) fine solves: "
                   "total speed-up of each run mode against its own reference. The two records "
                   "of a pair may come from different machines or days (see their dates): the "
                   "ratios, not the seconds, compare.", ""]
        ra, rb = a["runs"], b["runs"]
        rows = [(RUN_LABELS.get(k, k),
                 ratio(ra["reference"]["total_time_s"] / ra[k]["total_time_s"]),
                 ratio(rb["reference"]["total_time_s"] / rb[k]["total_time_s"]))
                for k in ra if k != "reference" and k in rb]
        out += [f"`{cold}` against `{hot}` ({num(a.get('quadrature_points'))} points):", ""]
        out += table(("run", "0 K", "300 K"), rows)
    return out


def md_noise_section(record: dict, path: Path, images: dict[str, tuple[str, str]]
                     ) -> list[str]:
    out = ["## MD noise of the thermal crystal operator", "",
           "The finite-temperature crystal operator's covariance head is trained to reproduce "
           "the measured standard errors of its MD training stresses (the `noise` loss term). "
           "On held-out samples its predicted aleatoric standard deviation is set against the "
           "measured standard error of each MD average (`hmm_cu_thermal.test.yaml`; stresses in "
           "GPa). Written by `bench/hmm_speedup.py` into every HMM record (shown once where "
           "records agree to the digits shown); from "
           f"`{path.relative_to(ROOT)}`.", ""]
    out += md_noise_rows(record["md_noise"])
    return out + figure("hmm_cu_thermal.reliability.png",
                        "Reliability diagram of the thermal crystal operator", images)


def md_noise_rows(noise: dict) -> list[str]:
    """The table of an ``md_noise`` record."""
    q = noise.get("ratio_quartiles", [math.nan, math.nan])
    comp = noise.get("ratio_median_per_component", [])
    return table(("quantity", "value"), [
        ("held-out samples at 300 K / 0 K",
         f"{noise.get('samples_300K')} / {noise.get('samples_0K')}"),
        ("measured standard error, median (GPa)", num(noise.get("measured_stderr_median_gpa"))),
        ("predicted aleatoric σ, median (GPa)", num(noise.get("predicted_std_median_gpa"))),
        ("ratio σ / standard error: median, quartiles",
         f"{num(noise.get('ratio_median'))}, {num(q[0])}–{num(q[1])}"),
        ("median ratio per stress component", ", ".join(num(c) for c in comp)),
        ("RMS residual of the mean at 300 K (GPa)", num(noise.get("residual_rms_gpa"))),
        ("predicted σ at 0 K, median (GPa)", num(noise.get("predicted_std_median_0K_gpa"))),
    ])


def encode_section(record: dict, path: Path, images: dict[str, tuple[str, str]]) -> list[str]:
    out = ["## The one-off encoding of microstructures", "",
           "The Coupler encodes each point's microstructure once per run (render the cell "
           "image, run the encoder through a float32 copy in batches) and counts it as micro "
           "time. This splits it by stage for one rank's share of the FE² example's cells, for "
           "the shipped SANO and for its distilled encoder where the record has it (`neuroscale "
           "distill`: a few strided convolutions trained against SANO through the same heads"
           + ("; accuracy [below](#distilled-encoder)" if FAST_MODEL.exists() else "")
           + ").", ""]
    out += provenance(record, path,
                      f"{record.get('cells')} cells, {record.get('threads')} thread(s), batch "
                      f"{record.get('batch')}", ".venv/bin/python bench/encode.py")
    cells = record.get("cells", 1)
    models = record.get("models") or {"fe2_composite": record}  # older records: one model
    clock = record.get("clock", "wall")
    for name, m in models.items():
        rows = [("rendering the images", num(m.get("render_s")),
                 num(1e3 * m.get("render_s", math.nan) / cells))]
        rows += [(f"encoder: {k}", num(v), num(1e3 * v / cells))
                 for k, v in m.get("stages_s", {}).items()]
        rows += [("total (`latents()`)", num(m.get("latents_s")), num(m.get("ms_per_cell")))]
        out += [f"`{name}` ({clock} clock):", ""]
        out += table(("stage", f"s for {cells} cells", "ms per cell"), rows)
    if clock == "cpu":
        out += ["CPU clock: the benchmark's own CPU time, for a machine shared with other jobs "
                "(wall time there counts waiting for a core).", ""]
    if len(models) > 1:
        first, *others = models
        for other in others:
            ratio = models[first]["ms_per_cell"] / models[other]["ms_per_cell"]
            out += [f"`{other}` encodes {num(ratio)}× faster than `{first}` (same process, "
                    "same cells).", ""]
    need = record.get("ms_per_cell_for_1000x_micro_412")
    if need is not None:
        measured = ", ".join(f"{n} {num(m.get('ms_per_cell'))} ms" for n, m in models.items())
        out += [f"Encoding per cell under which the 412-point FE² run's micro part would reach "
                f"1000×: {num(need)} ms (measured: {measured}).", ""]
    return out


def distilled_section(images: dict[str, tuple[str, str]]) -> list[str]:
    """The accuracy record in the distilled model's card (teacher and student on the same
    held-out fine solves), if that model is shipped."""
    model = FAST_MODEL
    if not model.exists():
        return []
    import torch

    card = json.loads(torch.load(model, weights_only=True)["card"])
    test, d = card.get("test") or {}, card.get("distillation") or {}
    out = ["## Distilled encoder", "",
           f"`{model.relative_to(ROOT)}`: a student of `{card['distilled_from']['model']}` "
           f"(SHA-256 `{card['distilled_from']['digest'][:16]}…`), convolutions "
           f"{d.get('channels')}, trained on {num(d.get('cells'))} cells drawn like the "
           f"teacher's data ({num(d.get('epochs'))} epochs, {num(d.get('loads'))} loads per "
           "cell and batch; best epoch by the stress error against the teacher on held-out "
           f"cells: {pct(d.get('best_val_rel_l2_stress', math.nan))}). Its bound is calibrated "
           f"afresh on {num(card.get('calibration_points'))} fine solves (the teacher's "
           "calibration set). Both models on the same held-out fine solves "
           f"(`{test.get('data')}`, the teacher's test set; `make fast-model`):", ""]
    rows = []
    for who in ("teacher", "student"):
        m = test.get(who) or {}
        rows.append((who, num(m.get("n_samples")), pct(m.get("rel_l2_stress", math.nan)),
                     pct(m.get("rel_l2_tangent", math.nan)),
                     pct((m.get("bound_coverage") or {}).get("0.95", math.nan)),
                     pct((m.get("coverage") or {}).get("0.95", math.nan)),
                     num(m.get("ece"))))
    out += table(("model", "samples", "P̄ error (rel. L2)", "tangent error",
                  "95 % bound covers", "95 % ellipsoid covers", "ECE"), rows)
    return out


def region_section(record: dict, path: Path, images: dict[str, tuple[str, str]]) -> list[str]:
    out = ["## Training region", "",
           "The shipped operator's calibrated 95 % bound along uniaxial tension, compression "
           "and simple shear, inside the training region (‖U − I‖ ≤ "
           f"{num(record.get('trained_stretch'))}) and beyond it, on held-out fibre cells against "
           "the true periodic RVE. Points outside are sent to the fine solver by the default "
           "policy (`outside: fallback`); this shows why.", ""]
    out += provenance(record, path, f"{record.get('cells')} cells, "
                      f"{len(record.get('magnitudes', []))} magnitudes per path",
                      ".venv/bin/python " + record.get("command", "bench/region.py")
                      .removeprefix("python "))
    rows = []
    for direction, parts in record.get("summary", {}).items():
        for where, s in parts.items():
            rows.append((direction, where, num(s["points"]), num(s["solved"]),
                         "–" if s["coverage"] is None else pct(s["coverage"]),
                         "–" if s["max_relative_error"] is None
                         else pct(s["max_relative_error"])))
    out += table(("path", "region", "points", "RVE solved", "bound covered the error",
                  "largest relative error"), rows)
    out += figure("region.png", "Relative error (solid) and bound (dashed) per cell along "
                  "each path; the vertical line is the trained stretch", images)
    return out


# How to read a transfer record's figures (no numbers: those come from the record).
TRANSFER_NOTES = {
    "transfer": (
        "Both modes validate on a tenth of the N solves and keep the best epoch: at N = 10 that "
        "is one solve, and a run can keep an early epoch (`best_epoch` in the record), so the "
        "spread between seeds is large at N ≤ 30 — compare the ranges, not the means, there. "
        "From N = 100 on, the fine-tuned model is the more accurate one in every run."),
    "transfer_laminate": (
        "The pool holds six laminates with 50 loads each, and batches hold whole structures: "
        "from N = 100 on a batch is one laminate, and validation on the one held-out laminate "
        "picks an early epoch (`best_epoch` in the record), so the error rises with N. A "
        "cell-family case wants many cells with a few loads each, as the stiff pool has."),
}


def transfer_section(record: dict, path: Path, images: dict[str, tuple[str, str]]) -> list[str]:
    budget = record.get("budget", {})
    title = "Few-shot transfer" + ("" if path.stem == "transfer" else f": `{path.stem}`")
    seen = (f"take about {num(budget['steps'])} optimiser steps per run" if budget.get("steps")
            else f"see about {num(budget.get('passes'))} samples per run (so a larger N gets "
            "fewer optimiser steps)")
    out = [f"## {title}", "",
           "The shipped operator fine-tuned to a material or a cell family outside its "
           "training (`neuroscale train --init … --new-material`) against the same "
           "architecture trained from scratch with the same settings, on the same N fine "
           "solves of the new case (nested subsets of one pool), each calibrated on a held-out "
           "calibration set of that case and tested on its test set. Errors are relative L2 "
           "over the test set; coverage is the share of test points inside the calibrated 95 % "
           "bound. Fine solves: the RVE solver's time for the N samples (meshing excluded); "
           f"training: the training loop. Both modes {seen} (at least "
           f"{num(budget.get('min_epochs'))} epochs, batches of {num(budget.get('batch_size'))}); "
           "mean over seeds, range in brackets.", ""]
    if MODEL_CARD.exists():  # what the same model reaches on its own material, for scale
        card = json.loads(MODEL_CARD.read_text())
        data = card.get("data_config", {})
        solves = (sum(g.get("count", 0) for g in data.get("microstructure", []))
                  * data.get("loads", {}).get("per_microstructure", 0))
        out += [f"For scale: the shipped model, trained on {num(solves)} fine solves of its own "
                f"material, has a test error of P̄ of "
                f"{pct(card.get('test_metrics', {}).get('rel_l2_stress', math.nan))} there.", ""]
    if record.get("partial"):
        out += ["!!! warning \"Partial record\"",
                "    Not every (N, mode, seed) run has finished: rerun the command to complete "
                "it (finished runs are kept).", ""]
    out += provenance(record, path, "the runs below", None)

    def cell(s: dict, key: str, fmt: Callable[[float], str]) -> str:
        v = s[key]
        spread = f" [{fmt(v['min'])}–{fmt(v['max'])}]" if s["seeds"] > 1 else ""
        return fmt(v["mean"]) + spread

    for case, modes in record.get("summary", {}).items():
        sets = record.get("cases", {}).get(case, {})
        m = sets.get("material")
        phases = "" if m is None else (f"matrix (E, ν) = ({num(m['matrix']['E'])}, "
                                       f"{num(m['matrix']['nu'])}), fibre "
                                       f"({num(m['fibre']['E'])}, {num(m['fibre']['nu'])}); ")
        pool = sets.get("pool", {})
        made = ("" if pool.get("generate_wall_s") is None else
                f"; `neuroscale generate` made its pool of {num(pool.get('samples'))} solves in "
                f"{num(pool['generate_wall_s'])} s on {num(pool.get('ranks'))} ranks, meshing "
                "included")
        out += [f"Case `{case}` (`{Path(pool.get('config', '')).name}`: {phases}test set "
                f"{num(sets.get('test', {}).get('samples'))} samples, calibration set "
                f"{num(sets.get('calibration', {}).get('samples'))}{made}):", ""]
        rows = [(num(int(n)), mode, num(s["seeds"]), cell(s, "rel_l2_stress", pct),
                 cell(s, "rel_l2_tangent", pct), cell(s, "coverage_95", pct),
                 cell(s, "ece", lambda x: f"{x:.3f}"), num(s["solve_s"]["mean"]),
                 num(s["train_s"]["mean"]))
                for mode, by_n in modes.items() for n, s in by_n.items()]
        rows.sort(key=lambda r: (int(r[0].replace(" ", "")), r[1]))
        shot = sets.get("zero_shot")
        if shot:  # a case of the model's own material: the model as shipped, calibrated anew
            rows.insert(0, ("0", "shipped model", "–", pct(shot["rel_l2_stress"]),
                            pct(shot["rel_l2_tangent"]), pct(shot["coverage_95"]),
                            f"{shot['ece']:.3f}", "0", "0"))
        out += table(("N", "mode", "seeds", "P̄ error", "tangent error", "95 % bound covers",
                      "ECE", "fine solves (s)", "training (s)"), rows)
    if path.stem in TRANSFER_NOTES:
        out += [TRANSFER_NOTES[path.stem], ""]
    out += figure(f"{path.stem}.png", "Test error of P̄ and coverage of the calibrated 95 % bound "
                  "against N, fine-tuned and from scratch (bars: range over seeds)", images)
    return out


def scaling_section(record: dict, path: Path, images: dict[str, tuple[str, str]]) -> list[str]:
    out = ["## Scaling", "",
           "The FE² example (`examples/fe2_composite.py`, no retraining) against the size of the "
           "macro problem and the number of ranks, and the single-scale limit: the same plate, "
           "mesh and load steps with a closed-form Neo-Hookean law (`--single-scale`, Voigt "
           "mixture of the phases). `limit_ratio` is the FE² run's total time over that one's. "
           "Per step: operator, fine work (the busiest rank's own RVE solves), fine wait + "
           "communication (the fallback stage's wall time beyond a rank's own solves: waiting "
           "for the busiest rank and the exchanges), macro (the rest: assembly, linear solve, "
           "checkpoints).", ""]
    out += provenance(record, path, "", None)
    out += ["`rerun` is the operator-only run once more on its own output folder: the latents "
            "are persisted beside the replay store, so it encodes nothing (a rerun of the same "
            "problem, or a restart).", ""]
    out += ["The full sweep (~400 to ~10⁵ points, ranks 1–8) is `make bench-scaling` "
            "(`.venv/bin/python bench/scaling.py`): resumable, each run's summary is kept in "
            "`out/bench_scaling/` and reused while its command is unchanged.", ""]
    if record.get("note"):
        out += [f"Note: {record['note']}.", ""]
    where = (f" at mesh sizes {', '.join(record['fallback_sizes'])}"
             if "fallback_sizes" in record else "")
    out += [f"Fallback runs{where}: `--rtol {record.get('fallback_rtol')}`; fallback-heavy "
            f"rank runs: `--rtol {record.get('heavy_rtol')}`; {record.get('steps')} load "
            "steps.", ""]

    def rows(runs: list[dict]) -> list[tuple]:
        return [(r["mode"], num(r["ranks"]), num(r["points"]), num(r["dofs"]), num(r["setup_s"]),
                 num(r["step_s"]), num(r["operator_s_per_step"]), num(r["fine_work_s_per_step"]),
                 num(r["fine_wait_comm_s_per_step"]), num(r["macro_s_per_step"]),
                 num(r["fallback_rate"]), num(r["fine_balance"]),
                 num(max(r["rss_mib_per_rank"]))) for r in runs]

    head = ("run", "ranks", "points", "dofs", "set-up s", "s/step", "operator s", "fine work s",
            "fine wait + comm. s", "macro s", "fallback rate", "fine max/mean",
            "peak RSS MiB/rank")
    out += ["### Size sweep (1 rank)", "", *table(head, rows(record.get("sweep", [])))]
    limit = record.get("limit_ratio", {})
    by_points: dict[int, dict] = {}
    for mode, runs in limit.items():
        for r in runs:
            by_points.setdefault(r["points"], {})[mode] = r
    modes = [m for m in ("operator", "rerun", "fallback") if m in limit]
    named = {"operator": "operator only", "rerun": "rerun (latents persisted)",
             "fallback": "with fallback"}
    out += table(("points", *(f"limit_ratio, {named[m]}" for m in modes),
                  *(f"per step, {named[m]}" for m in modes)),
                 [(num(n), *(ratio(d.get(m, {}).get(key)) for key in ("limit_ratio",
                                                                       "steps_ratio")
                             for m in modes)) for n, d in sorted(by_points.items())])
    out += [f"Target: limit_ratio ≤ {ratio(record.get('target_limit_ratio'))}.", ""]
    firsts = [r for r in record.get("sweep", []) if r["mode"] == "operator"]
    if firsts:  # what separates a first run from a rerun at the largest size
        big = max(firsts, key=lambda r: r["points"])
        single = next((r for r in record["sweep"] if r["mode"] == "single"
                       and r["points"] == big["points"]), None)
        if single:
            out += [f"At {num(big['points'])} points a first run encodes its distinct cells in "
                    f"{num(big['encode_s'])} s ({num(1e3 * big['encode_s'] / big['points'])} ms "
                    f"a cell), {ratio(big['encode_s'] / single['total_s'])} the whole "
                    "single-scale run; a rerun or a restart reads them from the latent cache "
                    "beside the replay store.", ""]
    out += ["### Ranks", "", *table(head, rows(record.get("ranks", [])))]
    out += [f"Target for the fallback-heavy runs: fine work max/mean over ranks ≤ "
            f"{record.get('target_balance')}.", ""]
    out += ["### Model for more ranks", "", "Assumptions:", ""]
    out += [f"- {a}" for a in record.get("assumptions", [])] + [""]
    out += table(("points", "ranks", "s/step", "operator s", "fine s", "macro s",
                  "communication s", "MiB per rank", "GiB all ranks"),
                 [(num(m["points"]), num(m["ranks"]), num(m["step_s"]), num(m["operator_s"]),
                   num(m["fine_s"]), num(m["macro_s"]), num(m["communication_s"]),
                   num(m["rss_mib_per_rank"]), num(m["rss_gib_all_ranks"]))
                  for m in record.get("model", [])])
    out += figure("scaling.png", "Time per load step against the macro size, limit_ratio, and "
                  "the split of a step over ranks", images)
    return out


def memory_section(record: dict, path: Path) -> list[str]:
    """bench/memory.py: a rank's memory per stage and per point, its growth over a long run,
    and the operator stage in the loop; the record's ``baseline`` side by side."""
    out = ["## Memory of a rank and the operator in the loop", "",
           "One rank of the FE² plate (`examples/plate_with_hole.py`, its own random fibre cell "
           "per point as in `examples/fe2_composite.py`) with every point on the operator "
           "(`rtol = inf`, no RVE built), in a fresh process per macro mesh: resident memory "
           "after each stage; a point's cost is the slope between the smallest and largest "
           "run. The in-loop rate is `Coupler.evaluate` (stress, tangent, calibrated bound, "
           "policy) per CPU second of one thread, beside the bare model's `predict` on the "
           "same points.", ""]
    out += provenance(record, path, "the fields below", ".venv/bin/python bench/memory.py")
    mb = 2**20
    out += table(("points", "imports MB", "+ operator MB", "+ macro problem, latents MB",
                  "after the steps MB", "peak MB"),
                 [(num(r["points"]), num(r["stages"]["imports"] / mb),
                   num(r["stages"]["operator"] / mb), num(r["stages"]["registered"] / mb),
                   num(r["after_step"][-1] / mb), num(r["peak"] / mb))
                  for r in record.get("runs", [])])
    base = record.get("baseline")
    cols = [("this record", record)] + ([(base["label"], base)] if base else [])
    long = {name: r.get("long_run", {}) for name, r in cols}
    speed = {name: r.get("in_loop_points_per_cpu_s", {}) for name, r in cols}
    rows = [("KB per point, registered", *(num(r.get("kb_per_point_registered")) for _, r in cols)),
            ("KB per point, after the steps",
             *(num(r.get("kb_per_point_after_steps")) for _, r in cols)),
            ("KB per point, peak", *(num(r.get("kb_per_point_peak")) for _, r in cols)),
            ("RSS growth, step 10 → last", *(pct(v["growth"]) if "growth" in v else "–"
                                              for v in long.values())),
            ("live RVE (mesh 0.02), MB", *(num(r.get("rve_mb")) for _, r in cols)),
            ("`Coupler.evaluate`, points per CPU s",
             *(sci(v["coupler_evaluate"]) for v in speed.values())),
            ("the same, a structure per point",
             *(sci(v["coupler_evaluate_own_structures"]) if "own_structures" in v else "–"
               for v in speed.values())),
            ("model `predict` float64, points per CPU s",
             *(sci(v["model_predict_float64"]) for v in speed.values())),
            ("model `predict` float32, points per CPU s",
             *(sci(v["model_predict_float32"]) for v in speed.values()))]
    out += table(("", *(name for name, _ in cols)), rows)
    if "in_loop_command" in record:
        out += [f"The in-loop rates of this record were rerun on {record['in_loop_date']} "
                f"(`{record['in_loop_command']}`); the rest is from its first run.", ""]
    by_model = {"`examples/models/fe2_composite.pt`": record.get("in_loop_points_per_cpu_s"),
                **{f"`{name}`": v for name, v in record.get("in_loop_by_model", {}).items()}}
    if len(by_model) > 1:
        out += ["In the same run, model by model, points per CPU s"
                + (f" ({record['in_loop_note']})" if record.get("in_loop_note") else "") + ":",
                ""]
        out += table(("model", "`Coupler.evaluate`", "a structure per point"),
                     [(name, sci(v["coupler_evaluate"]),
                       sci(v["coupler_evaluate_own_structures"]))
                      for name, v in by_model.items()])
    steps = record.get("long_run", {})
    out += [f"Growth run: {num(steps.get('steps'))} load steps on {num(steps.get('points'))} "
            f"points; targets: a few KB per point, growth ≤ 5 %, ≥ 1e6 points/s per core "
            "in the loop.", ""]
    return out


def calibration_groups_section(record: dict, path: Path) -> list[str]:
    """bench/calibration_groups.py: global against group-wise calibration, group by group, on
    the test set and (where recorded) on a test set in another mix."""
    contrast = record.get("contrast_bands") or []
    out = ["## Calibration per cell family and load band" + (
               " (family operator)" if contrast else ""), "",
           f"The model `{record['model']}` calibrated on `{record['calibration_data']}` "
           f"({num(record['n_calibration'])} solves) once globally and once per structure kind "
           f"and load band (edges {record['load_bands']} in ‖U − I‖" + (
               f"; and contrast band, edges {contrast} in E_f/E_m" if contrast else "") +
           ")" + (", and as shipped (calibrated on its own calibration set)"
                  if "as shipped" in record["runs"] else "") +
           (f" (the model is shipped with the {record['shipped_as']} calibration)"
            if record.get("shipped_as") else "") +
           f", each evaluated on `{record['test_data']}`: coverage of the policy's 95 % "
           "bound and the ECE of the per-component intervals, per group. Intervals: the "
           "conformal factors t_p of the calibration, and, for comparison, the Gaussian "
           "Φ⁻¹((1 + p)/2) they replace. The target (issue 29) is coverage within 95 ± 2 % in "
           "every group and ECE ≤ 1 % on any mix. In brackets, the 95 % interval of a group's "
           "coverage from resampling its cells: a cell's loads are not independent trials, so "
           "the interval is wider than √(0.05 · 0.95 / n) of n independent samples.", ""]
    out += provenance(record, path, "the fields below", None)
    mix = record.get("mix") or {}
    if mix:
        out += table(("set", *mix["calibration"]), [
            (name, *(pct(shares.get(k, 0.0)) for k in mix["calibration"]))
            for name, shares in mix.items()])
        out += ["*Share of each set's samples per cell family, in the highest load band and, "
                "for a family operator, per contrast band.*", ""]
    out += _calibration_group_table(record["runs"])
    if record.get("shifted_runs"):
        out += [f"On `{record['shifted_data']}`, a test set in another mix:", ""]
        out += _calibration_group_table(record["shifted_runs"])
    return out


def error_budget_section(record: dict, path: Path) -> list[str]:
    """bench/error_budget.py: the operator's P̄ error on the cells it was trained on, its
    validation cells and held-out test cells, against the floor of its energy basis."""
    sets = record["sets"]
    bands = [b["fraction"] for b in sets["test"]["by_fraction"]]
    trained, test = sets["trained"]["rel_l2_stress"], sets["test"]["rel_l2_stress"]
    out = ["## Where the operator's error comes from", "",
           f"The relative L2 error of P̄ of `{record['model']}` on the cells it was trained on, "
           "on its validation cells (the split its training made) and on held-out test cells, "
           "overall and per fibre-fraction band; and the **basis floor**: each cell's own "
           f"least-squares fit of the {record['basis_weights']}-term energy basis the head "
           "predicts, to that cell's solves — the error no encoder reaches below with this "
           "head.", ""]
    out += provenance(record, path, "the fields below", None)
    out += table(("cells", "cells (n)", "operator", *(f"v {a}–{b}" for a, b in bands),
                  "basis floor"),
                 [(name, str(s["n_cells"]), pct(s["rel_l2_stress"]),
                   *(pct(b["rel_l2_stress"]) if b["rel_l2_stress"] is not None else "–"
                     for b in s["by_fraction"]), pct(s["basis_floor"]))
                  for name, s in sets.items()])
    out += [f"On the cells it was trained on the operator is off by {pct(trained)}, on "
            f"held-out cells by {pct(test)} ({test / trained:.2f} times that); the basis "
            f"floor is {pct(sets['test']['basis_floor'])}. Where the first two are close, "
            "more cells of the same kinds lower the error little: it is the operator's fit "
            "to its own data (its capacity and training) that stands above the floor.", ""]
    probes = record.get("head_probe") or []
    if probes:
        out += ["Fresh heads (hidden × depth) trained on the frozen latents of the trained "
                "cells, scored on the three sets — does a larger head on the same latents "
                "lower the held-out error?", ""]
        out += table(("head", *sets), [(f"{h['hidden']} × {h['depth']}",
                                        *(pct(h[k]) for k in sets)) for h in probes])
        best = min(probes, key=lambda h: h["trained"])
        out += [f"The head that fits the trained cells best ({best['hidden']} × "
                f"{best['depth']}: {pct(best['trained'])}) is off by {pct(best['test'])} on "
                "held-out cells" + (": what the latents of an unseen cell say limits the "
                                    "error, not the head that reads them."
                                    if best["test"] >= 0.9 * test else "."), ""]
    return out


def _calibration_group_table(runs: dict) -> list[str]:
    """Rows: all samples, then each group; columns: each calibration's coverage (with its 95 %
    interval over the group's cells, where recorded) / ECE."""
    names = list(runs)
    rows = [("all", num(runs[names[0]]["n_samples"]),
             *(f"{pct(r['bound_coverage']['0.95'])} / {pct(r['ece'])}" for r in runs.values()))]

    def cell(g: dict) -> str:
        lo_hi = g.get("bound_coverage_interval")
        interval = f" [{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]" if lo_hi else ""
        return f"{pct(g['bound_coverage']['0.95'])}{interval} / {pct(g['ece'])}"

    for group, g in runs[names[0]]["groups"].items():
        size = num(g["n_samples"]) + (f" ({num(g['cells'])} cells)" if "cells" in g else "")
        rows.append((group, size, *(cell(r["groups"][group]) for r in runs.values())))
    return table(("group", "test samples", *(f"{n}: coverage / ECE" for n in names)), rows)


UNCERTAINTY_LABELS = {
    "ensemble": "ensemble (4 members), fixed weights",
    "mc_dropout": "MC dropout (one set of heads)",
    "variational": "variational (Bayes by backprop)",
    "uncertainty": "ensemble, learned uncertainty weights",
}


def run_calibration_section(record: dict, path: Path) -> list[str]:
    """bench/run_calibration.py: a family operator's bound with its own calibration and
    recalibrated on the run's census, audited at every point and step."""
    out = ["## Run calibration (family operator)", "",
           f"The FE² composite example with `{record['model']}` ({record['steps']} load steps "
           f"to stretch {record['stretch']}, `--rtol {record['rtol']}`, `--no-retrain "
           "--no-cell-fits --audit`) at each material, once with the model's own bound "
           "(calibrated per contrast band over the band's materials) and once with the bound "
           "recalibrated on a census of the run's own points each step ([run calibration]"
           "(concepts.md#run-calibration-the-bound-at-the-runs-own-material)). Coverage: the "
           "share of the operator's points whose true error (the audit's fine solve at the "
           "same F̄) lay within the 95 % bound, over all steps and per step; factor: the census "
           "quantile q that multiplies the model's bound in the next step; false negatives: "
           "operator points whose true error exceeded the tolerance.", ""]
    out += provenance(record, path, "the fields below", None)
    rows = []
    for text, m in record["materials"].items():
        Em, num_m, Ef, nu_f = (float(v) for v in text.split(","))
        label = f"E {Em:g}/{Ef:g} GPa, ν {num_m:g}/{nu_f:g} (contrast {Ef / Em:.1f})"
        for mode, r in m["runs"].items():
            per = ", ".join(f"{100 * s['coverage']:.1f}" for s in r["steps"]
                            if s["coverage"] is not None)
            factors = ", ".join(f"{s['factor']:.2f}" for s in r["steps"][:-1]
                                if s["factor"] is not None) or "–"
            rows.append((label, "run calibration" if mode == "on" else "model's bound",
                         f"{pct(r['coverage'])} of {num(r['operator_point_steps'])}", per,
                         factors, num(r["false_negatives"]), num(r["fine_solves"])))
    out += table(("material (matrix/fibre)", "bound", "coverage", "per step (%)",
                  "census factors", "false negatives", "fine solves"), rows)
    return out


def uncertainty_options_section(record: dict, path: Path) -> list[str]:
    """bench/uncertainty_options.py: ensemble, MC dropout and variational heads, and fixed
    against learned loss weights, on the same data and training time."""
    d = record["data"]
    out = ["## Uncertainty options and loss weightings", "",
           "The operator's sources of epistemic uncertainty (`model.uncertainty`) and loss "
           "weightings (`training.weighting`), each trained from the same seed on the same "
           f"{num(d['train']['samples'])} solves ({num(d['train']['structures'])} cells; 10 % "
           f"held out for early stopping) for the same training time, {num(record['budget_s'])} "
           + ("CPU s of its process on one thread (a budget the machine's load does not "
              "shrink), " if record.get("clock") == "cpu" else "s of wall time, ") +
           f"calibrated on the same {num(d['calibration']['samples'])} solves and tested on "
           f"{num(d['test']['samples'])} others. NLL: Gaussian negative log-likelihood of P̄ "
           "under the calibrated covariance (nats per sample, stress in GPa); coverage: of the "
           "calibrated 95 % ellipsoid; cost: the coupler's evaluation at fixed latents, per "
           "point. See [Bayesian heads and learned loss weights]"
           "(operator.md#bayesian-heads-and-learned-loss-weights).", ""]
    out += provenance(record, path, "the fields below", None)
    rows = [(UNCERTAINTY_LABELS.get(n, n), pct(r["rel_l2_stress"]), pct(r["rel_l2_tangent"]),
             num(r["nll"]), pct(r["ece"]), pct(r["coverage_95"]), pct(r["bound_coverage_95"]),
             f"{r['epochs']} ({num(r['train_time_s'])} s wall)",
             num(1e6 * r["predict_s_per_point"])) for n, r in record["runs"].items()]
    return out + table(("variant", "rel. L2 P̄", "rel. L2 A", "NLL", "ECE", "95 % coverage",
                        "95 % bound coverage", "epochs (training)", "cost µs/point"), rows)


def c_api_section(record: dict, path: Path) -> list[str]:
    """bench/c_api.py: an evaluation called from C against the same call from Python."""
    out = ["## The cost of a call from C", "",
           "`ns_evaluate` from a C host (libneuroscale.so runs the Python Coupler in an embedded "
           "interpreter) against `Coupler.evaluate` from Python, on the same points with the "
           "operator alone (no fallback), best of the repeats, as one call of N points and as N "
           "calls of one point; and the C host's N one-point calls against its one call of N "
           "points (what a UMAT-style host calling point by "
           "point pays). See [From C, C++ and Fortran](c_api.md).", ""]
    out += provenance(record, path, "the rows below", None)
    rows = [(str(r["points"]), num(r["python_call_s"] * 1e3), num(r["c_call_s"] * 1e3),
             ratio(r["c_over_python"]), num(r["python_point_call_s"] * 1e3),
             num(r["c_point_call_s"] * 1e3), ratio(r["c_over_python_point"]),
             ratio(r["c_point_by_point_over_batch"])) for r in record["rows"]]
    return out + table(("points N", "Python call (ms)", "C call (ms)", "C / Python",
                        "Python one-point call (ms)", "C one-point call (ms)", "C / Python",
                        "N one-point calls / one call (C)"), rows)


def cold_start_section(record: dict, path: Path) -> list[str]:
    """bench/cold_start.py: classic FE² against a cold start (``--model none``) on a material
    no shipped model knows, per step and in total, against the issue's targets."""
    flags = record.get("cold_flags", "")
    network = "--no-cell-fits" in flags or "cell_fits" not in record  # older records: network
    steps = record["per_step"]
    # the leading steps in which every point was solved (a cell-fit cold start: 1 or 2)
    full = next((k for k, h in enumerate(steps) if h["operator_share"] > 0), len(steps))
    operator = (
        "The operator starts from the shipped model's frozen encoder with fresh heads, trained "
        "in the background on the run's own fine solves; a held-out share of the points stays "
        "on the fine solver and recalibrates the bound after every step." if network else
        "Every point is solved at step 0"
        + (" and again at step 1 (the census that first calibrates the bound)"
           if full > 1 else
           ", and 40 of them besides at step 1's extrapolated loads (the census that first "
           "calibrates the bound, so the fits serve from step 1 on)")
        + "; after every step each solved point's cell fit (the energy basis fitted to "
        "its latest solves, `neuroscale_couple/cell_fits.py`) is refitted and the bound "
        "recalibrated on the solves of points audited at random that step.")
    out = [f"## `{path.stem}`", "",
           "Cold start (`examples/fe2_composite.py --model none`): the FE² plate with a material "
           f"no shipped model was trained for — matrix (E, ν) = {tuple(record['matrix'])}, "
           f"fibre {tuple(record['fibre'])} (GPa) — against classic FE² (`--reference`). "
           f"{operator} The total time counts every second of the run, training included.", ""]
    out += provenance(record, path, "the fields below", None)
    t = record["time_s"]
    targets = record.get("targets", {})

    def met(key: str) -> str:
        return "" if key not in targets else (" (target met)" if targets[key]["met"]
                                              else " (target missed)")

    out += table(("", "classic FE²", "cold start"), [
        ("total s", num(t["reference"]["total"]), num(t["cold_start"]["total"])),
        ("fine solves (s in steps)", f"{num(record['fine_solves']['reference'])} "
         f"({num(t['reference']['fine'])})", f"{num(record['fine_solves']['cold_start'])} "
         f"({num(t['cold_start']['fine'])})"),
        ("training s (background; steps waited)", "–",
         f"{num(t['cold_start']['training_background'])} "
         f"({num(t['cold_start']['waiting_for_training'])})") if network else
        ("fitting s (at the steps' ends)", "–", num(t["cold_start"]["training_background"])),
        ("speed-up, total", "", ratio(record["speedup_total"]) + met("speedup_total")),
        ("displacement error", "", err(record["rel_l2_displacement"])
         + met("rel_l2_displacement")),
        ("stress error", "", err(record["rel_l2_stress"]) + met("rel_l2_stress")),
        ("share of point-steps on the operator", "", pct(record["operator_share"]))])
    totals = record.get("cold_total_times_s", [])
    if len(totals) > 1:
        out += [f"The cold start ran {len(totals)} times: totals "
                f"{', '.join(num(v) for v in totals)} s; the record is the median run.", ""]
    out += [f"{num(record['quadrature_points'])} points, {num(record['steps'])} load steps to "
            f"stretch {record['stretch']}, rtol {record['rtol']}, atol {num(record['atol'])} "
            f"GPa, {record['ranks']} ranks.", ""]
    c, r = t["cold_start"], t["reference"]
    if not network:
        first = sum(h["fine_time_s"] for h in steps[:full])
        rest = steps[full:]
        solved = "step 0" if full == 1 else f"steps 0–{full - 1}"
        out += [f"Where the time goes: the cold start's fine solves took {num(c['fine'])} s "
                f"against classic FE²'s {num(r['fine'])} s: {num(first)} s in {solved}, "
                "where every point is solved (its RVE built, its first solve cold) as in "
                f"classic FE², and {num(c['fine'] - first)} s in the {len(rest)} steps after "
                "them, where the audits and probes are solved, and the points whose fits' "
                "bound sent them back "
                f"({num(sum(h['fine_solves'] for h in rest) / max(len(rest), 1))} solves a step of "
                f"{num(record['quadrature_points'])} points). "
                f"Fitting took {num(sum(h.get('training_s') or 0.0 for h in record['per_step']))}"
                " s in all. Classic FE²'s total is "
                f"{ratio(r['total'] / (first + c['setup']))} the set-up and the fine solves of "
                f"{'that step' if full == 1 else 'those steps'}: the most a cold start of this "
                "run can gain.", "", "Per step:",
                ""]
    per_point = {k: record["fine_solves"][k] / (record["quadrature_points"] * record["steps"])
                 for k in ("reference", "cold_start")}
    waits = ("the cost-aware timing probe and the end-of-step agreement"
             if "--cost-aware-retrain" in flags else "the end-of-step agreement")
    out += [f"Where the time goes: the cold start's fine solves took {num(c['fine'])} s "
            f"against classic FE²'s {num(r['fine'])} s, and its steps waited "
            f"{num(c['waiting_for_training'])} s for background trainings of "
            f"{num(c['training_background'])} s wall time in all. "
            f"Classic FE² solves every point at every Newton iterate "
            f"({per_point['reference']:.2g} solves a point and step); a run with a surrogate "
            f"serves a point's later iterates from its fine solve of the step, linearised while "
            f"F̄ stays within `Policy.reuse` of it ({per_point['cold_start']:.2g} solves a point "
            f"and step): while few points are on the operator, that reuse, not the operator, "
            f"is most of the speed-up. "
            + ("With `--swap-when-ready` a background training is swapped in at the first step "
               f"end after it finished, so the steps do not wait for it; what they wait for is "
               f"{waits}. " if "--swap-when-ready" in flags else
               "A background training is swapped in at a fixed step, so the run waits for one "
               "that has not finished (`--swap-when-ready` does not wait). ")
            + "On CPU cores shared with the fine solves a training's wall time, not its CPU "
            "time, is what counts.", "", "Per step:", ""] if network else []
    out += table(("step", "on the operator", "model version", "fine s", "classic fine s",
                  "training s", "waited s"),
                 [(str(i), pct(h["operator_share"]), str(h["model_version"]),
                   num(h["fine_time_s"]), num(h["reference_fine_time_s"]),
                   num(h.get("training_s") or 0.0), num(h["retrain_time_s"]))
                  for i, h in enumerate(record["per_step"])])
    return out


def cell_fits_section(record: dict, path: Path) -> list[str]:
    """bench/cell_fits.py: the shipped operator with and without cell fits for its fallback
    points, against classic FE², in total and per step."""
    out = [f"## `{path.stem}`", "",
           "The FE² plate with the shipped operator at a tight tolerance, without "
           "(`--no-cell-fits`) and with [cell fits](concepts.md#cell-fits-a-fallback-point-"
           "learnt-from-its-own-solves) (the example's default: a point that fell back is "
           "served in the later steps by its own cell fit where that fit's calibrated bound "
           "allows), against classic FE² (`--reference`). "
           + ("Both runs retrain online, as the example does by default." if record.get(
               "retrain", True) else "Neither run retrains online (`--no-retrain`)."), ""]
    out += provenance(record, path, "the fields below", None)
    r = record["runs"]
    names = ("operator", "cell_fits")
    out += table(("", "classic FE²", "operator", "operator + cell fits"), [
        ("total s", num(record["reference_total_time_s"]),
         *(num(r[n]["total_time_s"]) for n in names)),
        ("speed-up, total", "", *(ratio(r[n]["speedup_total"]) for n in names)),
        ("fine solves", num(record["reference_fine_solves"]),
         *(num(r[n]["fine_solves"]) for n in names)),
        ("displacement error", "", *(err(r[n]["rel_l2_displacement"]) for n in names)),
        ("stress error", "", *(err(r[n]["rel_l2_stress"]) for n in names)),
        ("training s", "", *(num(r[n]["training_time_s"] or 0.0) for n in names)),
        ("model versions", "", *(str(r[n]["model_version"]) for n in names))])
    out += [f"{num(record['quadrature_points'])} points, {num(record['steps'])} load steps to "
            f"stretch {record['stretch']}, rtol {record['rtol']}, atol {num(record['atol'])} "
            f"GPa, {record['ranks']} ranks. Fallback points per step (the cell fits' census "
            "first: every fitted point solved again until their bound exists):", ""]
    out += table(("step", "operator", "operator + cell fits"),
                 [(str(i), str(a), str(b)) for i, (a, b) in enumerate(zip(
                     r["operator"]["fallback_points"], r["cell_fits"]["fallback_points"],
                     strict=True))])
    return out


def baselines_section(record: dict, path: Path, images: dict[str, tuple[str, str]]
                      ) -> list[str]:
    """bench/baselines.py: SANO against baseline models on the same data, each trained in its
    own process for the same CPU-second budget; the shipped SANO as a separate row."""
    n_train = record["models"][0].get("n_train", "?")
    out = ["## Baselines at the same budget", "",
           f"Each model trained from scratch on the same data ({n_train} training samples), in "
           "its own process on one thread, for at most "
           f"{num(record['budget_cpu_s'])} CPU seconds of that process (validation included; a "
           "CPU-second budget, so that the load of the shared machine does not shorten it), "
           "then scored on the same held-out test set; models with an uncertainty are "
           "conformal-calibrated (global) on the same calibration set. \"-style\" models are "
           "this project's re-implementations. The shipped SANO (trained on the full data, "
           "its card's wall time on its machine) is a separate row, not at the budget. "
           "Objectivity: largest "
           "‖P̄(QF̄) − QP̄(F̄)‖/‖P̄‖ over random rotations Q (any angle; within ±0.1 rad); "
           "symmetry: ‖A_iJkL − A_kLiJ‖/‖A‖; throughput: test samples (stress + tangent from "
           "the cell and the load) per CPU second, one thread. See "
           "[the operator page](operator.md#baselines).", ""]
    out += provenance(record, path, "the fields below", None)
    if record.get("reused"):
        out += [f"Rows of {', '.join(record['reused'])}: per-model records of earlier runs "
                "of this command (the same settings), kept by `--reuse`.", ""]
    rows = []
    for r in record["models"]:
        s = r.get("scores")
        if s is None:
            rows.append((r["label"], *(["–"] * 9), r.get("error", "")))
            continue
        h = r.get("history") or {}
        trained = (f"{num(r['train_cpu_s'])} CPU s, {num(h.get('epochs'))} epochs"
                   if r.get("train_cpu_s") is not None else
                   f"{num(h.get('train_wall_s'))} wall s, {num(h.get('epochs'))} epochs, full "
                   "data (its card)")
        rows.append((r["label"], pct(s["rel_l2_stress"]), pct(s["rel_l2_tangent"]),
                     sci(s["objectivity_any_angle"]), sci(s["objectivity_0.1rad"]),
                     sci(s["major_symmetry"]),
                     pct(s["coverage_95"]) if "coverage_95" in s else "–",
                     num(s["ece"]) if "ece" in s else "–", trained,
                     num(s["throughput_per_cpu_s"]), num(r.get("parameters"))))
    out += table(("model", "P̄ rel. L2", "A rel. L2", "objectivity (any Q)",
                  "objectivity (±0.1 rad)", "A symmetry", "95 % coverage", "ECE",
                  "training", "samples / CPU s", "parameters"), rows)
    floor = next((r["floor"] for r in record["models"] if "floor" in r), None)
    if floor is not None:
        out += [f"EquiNO-style floor: P̄ from the test set's true micro fields projected on the "
                f"{floor['modes']} POD modes of the training fields is off by "
                f"{pct(floor['projected_fields'])}; from the true fields themselves, sampled on "
                f"the pixels, by {pct(floor['true_fields_on_pixels'])}.", ""]
    return out + figure("baselines.png", "Test errors and 95 % coverage of the baselines",
                        images)


def ablations_section(record: dict, path: Path, images: dict[str, tuple[str, str]]
                      ) -> list[str]:
    """bench/ablations.py: variants of SANO over seeds, mean and 95 % t-interval, and the
    difference to the full model paired by seed."""
    seeds = record["seeds"]
    out = ["## Ablations over seeds", "",
           f"Each variant of the shipped architecture trained from scratch with seeds "
           f"{', '.join(map(str, seeds))} on the baselines' data, in its own process on one "
           f"thread, for {record['budget_cpu_s']:.0f} CPU seconds, and scored on the same "
           "test set (global conformal calibration on the calibration set). Mean over the seeds "
           "with its 95 % t-interval; \"vs full\": the difference to the full model paired by "
           "seed (same seed: same batch order and augmentation) with its 95 % t-interval — "
           "**decided** where that interval excludes zero. See "
           "[the operator page](operator.md#ablations).", ""]
    out += provenance(record, path, "the fields below", None)

    def ci(m: dict, fmt: Callable[[float], str]) -> str:
        return f"{fmt(m['mean'])} [{fmt(m['low'])}, {fmt(m['high'])}]" if "mean" in m else "–"

    def vs(m: dict) -> str:
        d = m.get("vs_full")
        if d is None:
            return "–"
        signed = f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] pts"
        return f"**{signed}**" if d["decided"] else signed

    def field(m: dict | None) -> str:
        if m is None or "mean" not in m:
            return "–"
        decided = m.get("vs_full", {}).get("decided")
        return f"**{ci(m, num)}**" if decided else ci(m, num)

    rows = [(r["label"], ci(r["rel_l2_stress"], pct), vs(r["rel_l2_stress"]),
             ci(r["rel_l2_tangent"], pct), vs(r["rel_l2_tangent"]), ci(r["ece"], num),
             ci(r["coverage_95"], pct), field(r.get("equilibrium_h-1")),
             ", ".join(map(str, r["epochs"])) or "–")
            for r in record["variants"]]
    out += table(("variant", "P̄ rel. L2", "vs full (P̄)", "A rel. L2", "vs full (A)", "ECE",
                  "95 % coverage", "decoded field's H⁻¹ equilibrium residual (bold: "
                  "decided vs full)", "epochs per seed"), rows)
    return out + figure("ablations.png", "Ablations: each seed, mean and 95 % interval",
                        images)


def generic_section(record: dict, path: Path) -> list[str]:
    """A record of a kind this script does not know: its scalar fields as they are."""
    out = [f"## `{path.stem}`", ""]
    out += provenance(record, path, "the fields below", None)
    rows = [(f"`{k}`", num(v) if isinstance(v, int | float) else f"`{json.dumps(v)[:80]}`")
            for k, v in record.items()]
    return out + table(("field", "value"), rows)


# ---------------------------------------------------------------------------------- images
def copy_images(docs: Path) -> dict[str, tuple[str, str]]:
    """Copy bench/results/*.png and the model's reliability diagrams into docs/img/bench/
    (only when changed; stale copies removed). Returns {file name: (path relative to docs,
    source path relative to the repository)}."""
    target = docs / IMAGES
    target.mkdir(parents=True, exist_ok=True)
    sources = sorted(RESULTS.glob("*.png")) + [p for p in MODEL_PLOTS if p.exists()]
    names = {}
    for src in sources:
        dst = target / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
        names[src.name] = (f"{IMAGES}/{src.name}", str(src.relative_to(ROOT)))
    for old in target.glob("*.png"):
        if old.name not in names:
            old.unlink()
    return names


# ---------------------------------------------------------------------------------- page
ORDER = ("rve_solve", "rve_solve_3d", "rve_live", "operator", "error_budget", "baselines",
         "ablations",
         "calibration_groups", "calibration_groups_family", "run_calibration",
         "uncertainty_options", "encode", "memory", "region", "transfer", "transfer_laminate",
         "fe2_speedup", "fe2_speedup_rtol002", "fe2_speedup_beyond", "fe2_speedup_412",
         "fe2_speedup_3d", "cold_start", "cold_start_network", "cell_fits", "cell_fits_no_retrain",
         "hmm_speedup",
         "hmm_speedup_300K_202", "hmm_speedup_0K_small", "hmm_speedup_300K", "scaling", "c_api")


def page(docs: Path) -> str:
    images = copy_images(docs)
    records = {p.stem: p for p in sorted(RESULTS.glob("*.json"))}
    order = [n for n in ORDER if n in records] + sorted(set(records) - set(ORDER))
    lines = [
        "<!-- Generated by scripts/benchmarks_doc.py from bench/results/*.json: edit the script "
        "or rerun the benchmarks, not this file. -->",
        "", "# Benchmarks", "",
        "Every figure on this page is read from a benchmark record in `bench/results/` (and "
        "the shipped model card); `make docs` regenerates the page. `make bench` reruns all "
        "benchmarks. Timings depend on the machine and on its load: compare ratios within "
        "one record rather than seconds across records.", "",
        "Records: " + ", ".join(f"[`{n}`](#{n.lower()})" if n.startswith(
            ("fe2", "hmm", "cold", "cell")) else f"`{n}`" for n in order) + ".", "",
    ]
    noise_done: list[str] = []
    loaded = {name: json.loads(records[name].read_text()) for name in order}
    for name in order:
        path, record = records[name], loaded[name]
        if name == "rve_solve":
            lines += rve_section(record, path, images)
        elif name == "operator":
            lines += operator_section(record, path, images)
            lines += model_card_section(images)
        elif name == "rve_live":
            lines += rve_live_section(record, path)
        elif name == "encode":
            lines += encode_section(record, path, images)
            lines += distilled_section(images)
        elif name == "region":
            lines += region_section(record, path, images)
        elif name.startswith("transfer"):
            lines += transfer_section(record, path, images)
        elif name == "scaling":
            lines += scaling_section(record, path, images)
        elif name == "memory":
            lines += memory_section(record, path)
        elif name.startswith("calibration_groups"):
            lines += calibration_groups_section(record, path)
        elif name == "c_api":
            lines += c_api_section(record, path)
        elif name == "uncertainty_options":
            lines += uncertainty_options_section(record, path)
        elif name == "run_calibration":
            lines += run_calibration_section(record, path)
        elif name == "error_budget":
            lines += error_budget_section(record, path)
        elif name == "baselines":
            lines += baselines_section(record, path, images)
        elif name == "ablations":
            lines += ablations_section(record, path, images)

        elif name.startswith("cold_start"):
            lines += cold_start_section(record, path)
        elif name.startswith("cell_fits"):
            lines += cell_fits_section(record, path)
        elif "runs" in record and "reference" in record["runs"]:
            lines += coupled_section(record, path, images)
            key = "\n".join(md_noise_rows(record.get("md_noise") or {}))
            if "md_noise" in record and key not in noise_done:  # as shown: same table once
                noise_done.append(key)
                lines += md_noise_section(record, path, images)
        else:
            lines += generic_section(record, path)
    lines += temperature_section(loaded)
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=Path, default=DOCS, help="docs folder (default: docs/)")
    args = p.parse_args()
    text = page(args.docs)
    out = args.docs / "benchmarks.md"
    if not out.exists() or out.read_text() != text:
        out.write_text(text)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
