"""The distilled encoder: an operator like any other, trained against the shipped SANO through
its frozen heads, saved and loaded as a normal model file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neuroscale_couple.cli import main
from neuroscale_couple.distillation import (
    Distillation,
    DistillConfig,
    distill_loss,
    distillation_cells,
    draw_loads,
)
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.operators.distilled import DistilledSANO
from neuroscale_couple.solvers.microstructure import fibre_chain, random_fibres

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"
TEACHER = MODELS / "fe2_composite.pt"


@pytest.fixture(scope="module")
def teacher():
    return load_operator(TEACHER).eval()


def test_a_student_has_the_operator_interface_and_the_teachers_heads(teacher):
    student = DistilledSANO.student_of(teacher, (8, 16, 16)).double().eval()
    cells = [random_fibres(0.3, 3, seed=1), fibre_chain(0.3, 2, seed=2)]
    z = student.latents(cells)
    F = torch.eye(2, dtype=torch.float64) + 0.05 * torch.randn(2, 2, 2, dtype=torch.float64)
    out = student.predict(z, F)
    assert z.shape == (2, teacher.config.latent)
    assert out["mean"].shape == (2, 2, 2) and out["cov"].shape == (2, 4, 4)
    assert out["tangent"].shape == (2, 2, 2, 2, 2)
    # on the teacher's latent the student answers as the teacher: the heads are the same
    z_t = teacher.double().latents(cells)
    for key in ("mean", "cov", "tangent"):
        torch.testing.assert_close(student.predict(z_t, F)[key], teacher.predict(z_t, F)[key])
    assert student.data_resolution == teacher.data_resolution == 64
    assert student.card["region"] == teacher.card["region"]
    assert not any(p.requires_grad for n, p in student.named_parameters()
                   if n.startswith(("energy.", "covariance.")))
    teacher.float()


def test_a_saved_student_loads_as_itself_and_its_latents_equal_a_fresh_encoding(teacher,
                                                                                tmp_path):
    student = DistilledSANO.student_of(teacher, (8, 16, 16)).eval()
    path = tmp_path / "student.pt"
    student.save(path)
    loaded = load_operator(path)
    assert isinstance(loaded, DistilledSANO) and loaded.weights_digest() == student.weights_digest()
    cells = [random_fibres(0.2, 4, seed=s) for s in range(3)]
    with torch.no_grad():
        fresh = student.encode(student.structure_inputs(cells))[0]
    torch.testing.assert_close(loaded.latents(cells), fresh, rtol=0, atol=0)


def test_distillation_cells_are_drawn_like_the_teachers_data(teacher):
    cells, shells = distillation_cells(teacher, 50, seed=0)
    assert len(cells) == len(shells) == 50
    assert {c.kind for c in cells} == {"random_fibres", "fibre_chain"}
    assert shells.max() == pytest.approx(0.3) and shells[:, 1].min() == pytest.approx(0.15)
    F = draw_loads(torch.as_tensor(shells), 3, torch.Generator().manual_seed(0))
    radius = (F - torch.eye(2, dtype=F.dtype)).flatten(1).norm(dim=1)
    lo, hi = (torch.as_tensor(shells).repeat_interleave(3, 0)[:, j] for j in (0, 1))
    assert F.shape == (150, 2, 2) and torch.all((radius >= lo - 1e-12) & (radius <= hi + 1e-12))


def test_a_short_distillation_lowers_its_loss_and_resumes_without_retraining(teacher,
                                                                            tmp_path):
    cfg = DistillConfig(cells=48, epochs=8, batch_size=8, channels=(8, 16, 16), lr=3e-3,
                        val_fraction=0.25)
    run = Distillation(teacher, cfg, tmp_path)
    data = run.teacher_data()
    F = draw_loads(data["shells"], 2, torch.Generator().manual_seed(5))
    z_var = float(((data["z"] - data["z"].mean(0)) ** 2).sum(-1).mean())

    def loss(student: DistilledSANO) -> float:
        with torch.no_grad():
            z = student.encode(data["images"])[0]
        terms = distill_loss(student, z, data["z"], F, z_var)
        return float(sum(cfg.weights[k] * v.detach() for k, v in terms.items()))

    torch.manual_seed(cfg.seed)  # the initial student of the run
    before = loss(DistilledSANO.student_of(teacher, cfg.channels))
    student, history = run.run(progress=False)
    assert loss(student) < 0.5 * before
    assert [h["epoch"] for h in history["history"]] == list(range(1, 9))
    # a rerun on the same folder finds every epoch done and returns the same student
    again, history_again = Distillation(teacher, cfg, tmp_path).run(progress=False)
    assert history_again == history
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 student.state_dict().values(), strict=True))
    # a run stopped after epoch 3 (as a killed one) goes on to the same student
    Distillation(teacher, cfg, tmp_path / "paused").run(progress=False, stop_after=3)
    resumed, history_resumed = Distillation(teacher, cfg, tmp_path / "paused").run(
        progress=False)
    assert [h["epoch"] for h in history_resumed["history"]] == list(range(1, 9))
    for a, b in zip(resumed.state_dict().values(), student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("args", "match"), [
    (["--out", str(TEACHER)], "give a new model file"),
    (["--out", "student.h5"], "ending in .pt"),
    (["--calibration", "missing.h5"], "--calibration missing.h5 does not exist"),
    (["--channels", "8,a"], "--channels 8,a"),
    (["--cells", "0"], "cells=0"),
    (["--model", str(MODELS / "hmm_cu.pt")], "a student of a SANO model"),
])
def test_the_distill_command_refuses_bad_input_clearly(args, match, tmp_path, capsys):
    flags = {"--model": str(TEACHER), "--out": str(tmp_path / "s.pt"),
             "--work": str(tmp_path / "work"), "--epochs": "1", "--cells": "40"}
    flags.update(zip(args[::2], args[1::2], strict=True))
    argv = ["distill", *(x for pair in flags.items() for x in pair)]
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_a_student_config_refuses_channels_the_resolution_does_not_divide():
    with pytest.raises(InputError, match="divisible"):
        DistilledSANO.CONFIG(resolution=32, channels=(8,) * 6)


def test_the_shipped_student_is_of_the_shipped_teacher_and_answers_as_it_does(teacher):
    """examples/models/fe2_composite_fast.pt (`make fast-model`): distilled from this very
    teacher's weights (its calibration may be redone), calibrated, and on fresh cells within a
    few per cent of its teacher."""
    student = load_operator(MODELS / "fe2_composite_fast.pt")
    assert isinstance(student, DistilledSANO) and student.calibration
    assert student.card["distilled_from"]["digest"] == teacher.weights_digest(calibration=False)
    assert student.card["region"] == teacher.card["region"]
    cells, shells = distillation_cells(teacher, 24, seed=123)  # not the distillation's cells
    F = draw_loads(torch.as_tensor(shells, dtype=torch.float32), 4,
                   torch.Generator().manual_seed(0))
    z_s, z_t = (m.latents(cells).repeat_interleave(4, 0) for m in (student, teacher))
    P_s, P_t = (m.predict(z, F, tangent=False)["mean"] for m, z in ((student, z_s),
                                                                      (teacher, z_t)))
    assert float((P_s - P_t).norm() / P_t.norm()) < 0.03
    with torch.no_grad():
        fresh = student.encode(student.structure_inputs(cells))[0]
    torch.testing.assert_close(student.latents(cells), fresh, rtol=0, atol=0)
