"""Cold start end to end: the FE² example with ``--model none`` on a material no shipped model
knows, against classic FE², on 1 and 2 ranks (real RVE solves, real training); and the cell
fits that serve a trained model's fallback points (the example's default)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from coupled_helpers import kill_after_checkpoint

pytestmark = [pytest.mark.dolfinx, pytest.mark.skip_in_parallel]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "fe2_composite.py")
# the coarsest plate (49 points), an aluminium-like matrix with SiC-like fibres
PROBLEM = ["--mesh-size", "0.5", "--steps", "6", "--matrix", "70", "0.33", "--fibre", "410",
           "0.14", "--quiet"]
# cell fits (the default): every point solved at step 0, and 40 of them besides at step 1's
# extrapolated loads for the fits' calibration (a census); from step 1 on each point is served
# by its own fit where its bound allows
COLD = ["--model", "none", "--rtol", "0.02"]
# the network heads alone: the first operator is trained after step 0 and swapped in after
# step 1; its bound needs 19 held-out solves (5 points of 49 a step): it serves from step 3 on
NETWORK = [*COLD, "--no-cell-fits", "--held-out", "0.1"]
FAMILY_MODEL = ROOT / "examples" / "models" / "fe2_family.pt"  # ν 0.2–0.45: PROBLEM's is out


def run(out: Path, *flags: str, ranks: int = 1, problem: list[str] = PROBLEM) -> dict:
    mpiexec = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)] if ranks > 1 else []
    proc = subprocess.run([*mpiexec, sys.executable, EXAMPLE, *problem, *flags, "--out",
                           str(out)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["cell_fits", "network"])
def test_cold_start_ends_at_classic_fe2_hands_points_over_and_agrees_on_two_ranks(tmp_path,
                                                                                   mode):
    run(tmp_path / "classic", "--reference")
    flags = [*(COLD if mode == "cell_fits" else NETWORK), "--compare", str(tmp_path / "classic")]
    one = run(tmp_path / "one", *flags)
    two = run(tmp_path / "two", *flags, ranks=2)
    for s in (one, two):
        assert s["cold_start"] and s["rel_l2_displacement"] <= 0.005, s["rel_l2_displacement"]
        assert s["rel_l2_stress"] <= 0.01, s["rel_l2_stress"]
    share = [h["operator_share"] for h in one["steps"]]
    versions = [h["model_version"] for h in one["steps"]]
    # classic FE² while no operator is calibrated, then points handed over
    assert share[0] == 0 < share[-1], share
    assert versions[0] == 0 or mode == "cell_fits", versions
    assert versions[-1] >= 1 and versions == sorted(versions), versions
    assert one["training_time_s"] > 0
    if mode == "cell_fits":  # the census at step 0's end: from step 1 on the fits serve, and
        # the audits are solved besides, not as fallbacks
        assert [h["fits_scored"] for h in one["steps"]] == [40] + [0] * 5
        assert min(share[1:]) >= 0.9, share
        audits = sum(h["held_out_points"] for h in one["steps"][1:])
        assert 0 < audits <= sum(h["fine_solves"] for h in one["steps"][1:])
    else:
        assert share[1] == 0, share
    # 2 ranks: the same models and decisions (training is data-parallel over the ranks with
    # all-reduced gradients, the same trajectory to round-off; the cell fits' bound is gathered
    # over the ranks), the same answer to round-off
    assert [h["fallback_points"] for h in two["steps"]] == [h["fallback_points"]
                                                            for h in one["steps"]]
    assert [h["model_version"] for h in two["steps"]] == versions
    with np.load(tmp_path / "one" / "fields.npz") as a, np.load(tmp_path / "two" /
                                                               "fields.npz") as b:
        np.testing.assert_allclose(b["u"], a["u"], rtol=0, atol=1e-6 * np.abs(a["u"]).max())


@pytest.mark.slow
@pytest.mark.mpi
def test_a_killed_cold_start_restarts_with_its_cell_fits(tmp_path):
    """SIGKILL after the checkpoint of step 2 (the fits calibrated, audits drawn), then
    --restart: on the same rank count the same fine solves, versions and end state as the run
    never killed (u to 1e-10, as a restart of a trained run); a 2-rank checkpoint restarted on
    1 rank (each point's solves gathered from the rank that held it) as runs on other rank
    counts agree."""
    clean = run(tmp_path / "clean", *COLD)
    cmd = [sys.executable, EXAMPLE, *PROBLEM, *COLD]
    mpiexec = [str(Path(sys.executable).parent / "mpiexec"), "-n", "2"]
    decisions = ["model_version", "fallback_points", "held_out_points"]
    for name, prefix, rel, same in (("same", [], 1e-10, ["fine_solves", *decisions]),
                                    ("from_two", mpiexec, 1e-6, decisions)):
        out = tmp_path / name
        assert kill_after_checkpoint([*prefix, *cmd, "--out", str(out)], out, 2)["step"] < 5
        again = run(out, *COLD, "--restart")
        for key in same:
            assert [h[key] for h in again["steps"]] == [h[key] for h in clean["steps"]], key
        assert again["displacement_norm"] == pytest.approx(clean["displacement_norm"], rel=rel)
        with np.load(tmp_path / "clean" / "fields.npz") as a, np.load(out / "fields.npz") as b:
            np.testing.assert_allclose(b["u"], a["u"], rtol=0,
                                       atol=rel * np.abs(a["u"]).max())


@pytest.mark.parametrize("flags, message", [
    (["--model", "none", "--no-retrain"], "--model none (a cold start) and --no-retrain"),
    (["--model", "none", "--no-cell-fits", "--restart"],
     "--restart and --no-cell-fits contradict"),
    (["--model", "none", "--held-out", "1.5"], "cold_start held_out=1.5"),
    (["--model", "none", "--cold-encoder", "no/such.pt"], "no such model file"),
    (["--matrix", "70", "0.5"], "Poisson ratio nu=0.5"),
    (["--matrix", "70", "0.33"], "the model was trained for matrix"),
    (["--swap-when-ready"], "--swap-when-ready swaps in a background retraining"),
    (["--swap-when-ready", "--no-retrain"], "--swap-when-ready and --no-retrain contradict"),
    (["--model", str(FAMILY_MODEL)], "fibre_nu 0.14 outside"),
])
def test_cold_start_bad_input_is_refused_before_work(tmp_path, flags, message):
    proc = subprocess.run([sys.executable, EXAMPLE, *PROBLEM, "--out", str(tmp_path), *flags],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.slow
@pytest.mark.mpi
def test_cell_fits_serve_the_fallback_points_of_a_trained_model(tmp_path):
    """The shipped model at its own material, a tight tolerance: the points it sends to the
    fine solver are served by their cell fits from the step after their census on, with the
    classic answer kept as well as without them, and the same decisions on 2 ranks."""
    shipped = ["--mesh-size", "0.5", "--steps", "6", "--quiet"]
    run(tmp_path / "classic", "--reference", problem=shipped)
    flags = ["--rtol", "0.01", "--compare", str(tmp_path / "classic")]
    plain = run(tmp_path / "plain", *flags, "--no-retrain", "--no-cell-fits", problem=shipped)
    fits = run(tmp_path / "fits", *flags, "--no-retrain", problem=shipped)  # the default fits
    # with online retraining on (the example's default): the fallback solves teach the fits,
    # the network is never retrained, and 2 ranks take the same decisions
    two = run(tmp_path / "two", *flags, ranks=2, problem=shipped)
    assert fits["cell_fits"] and not plain["cell_fits"] and two["retrain"]
    assert two["training_time_s"] < 1.0  # fitting only, milliseconds a step
    # the fits' census: the step-0 fits scored at step 1's extrapolated loads (here 12, too
    # few for a bound: 19 at 0.95), then every fitted point falls back and is scored at the
    # converged loads until 19 scores exist (here step 1); then the fits serve: the last
    # steps, where the plain run's bound sends ever more points back, fall back far less
    solves = [sum(h["fine_solves"] for h in s["steps"][3:]) for s in (plain, fits)]
    assert solves[1] < 0.5 * solves[0], solves
    fell_back = [h["fallback_points"] for h in fits["steps"]]
    assert fell_back[0] > 0 and fell_back[1] >= fell_back[0], fell_back
    late = sum(h["fallback_points"] for h in plain["steps"][-2:])
    assert sum(fell_back[-2:]) < 0.5 * late, (fell_back, late)
    for key, limit in (("rel_l2_displacement", 0.005), ("rel_l2_stress", 0.01)):
        assert fits[key] <= max(1.1 * plain[key], 1e-4) and fits[key] <= limit, (key, fits[key])
    assert [h["fallback_points"] for h in two["steps"]] == fell_back
    with np.load(tmp_path / "fits" / "fields.npz") as a, np.load(tmp_path / "two" /
                                                                "fields.npz") as b:
        np.testing.assert_allclose(b["u"], a["u"], rtol=0, atol=1e-6 * np.abs(a["u"]).max())


@pytest.mark.slow
def test_a_family_model_outside_its_ranges_hands_its_fallback_points_to_cell_fits(tmp_path):
    """The shipped family model at phases outside its ranges, with the user's consent: every
    point on the RVE until a bound exists at the run's material; the points that fell back are
    then served by their cell fits (of the run's own solves) as in a cold start."""
    s = run(tmp_path / "consent", "--model", str(FAMILY_MODEL), "--rtol", "0.02",
            "--outside-material", "fallback")
    share = [h["operator_share"] for h in s["steps"]]
    assert share[0] == 0 and min(share[1:]) >= 0.9, share
    assert s["steps"][0]["outside_points"] == s["quadrature_points"]
