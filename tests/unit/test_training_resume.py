"""Training resumes from its per-epoch checkpoint (a work folder) to the weights and history of
an uninterrupted run, bit for bit; `neuroscale train` refuses a work folder of another run."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest
import torch
import yaml

from neuroscale_couple.cli import main
from neuroscale_couple.errors import InputError
from neuroscale_couple.operators.base import load_operator
from neuroscale_couple.operators.sano import SANO, SANOConfig
from neuroscale_couple.store import WorkCheckpoint
from neuroscale_couple.training import TrainConfig, TrainingData, train

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"
CELLS = MODELS / "fe2_composite.anchor.h5"
CRYSTAL = MODELS / "hmm_cu.anchor.h5"
SMALL = SANOConfig(resolution=16, width=8, modes=4, levels=2, heads=2, latent=12, hidden=16,
                   members=3)
# augment and symmetry draw from the batch generator, the ensemble trains 3 members
CFG = TrainConfig(epochs=4, batch_size=24, augment=True, physics_fraction=0.25, patience=100,
                  weights={"stress": 1.0, "tangent": 0.2, "nll": 0.05, "symmetry": 0.1})


@pytest.fixture(scope="module")
def cells() -> TrainingData:
    """8 cells of the shipped anchor set, 12 loads each."""
    data = TrainingData.from_h5(CELLS, SMALL.resolution)
    return data.subset(np.flatnonzero(data.micro_index.numpy() < 8))


def run(data: TrainingData, work: Path, seed: int = 0, cfg: TrainConfig = CFG,
        **kwargs) -> tuple[SANO, dict]:
    """A model drawn from ``seed`` trained with checkpoints in ``work``."""
    torch.manual_seed(seed)
    model = SANO(SMALL)
    history = train(model, data, cfg, comm=MPI.COMM_SELF, progress=False,
                    checkpoint=WorkCheckpoint(work, {"test": 1}), **kwargs)
    return model, history


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("weighting", ["fixed", "gradnorm"])
def test_a_training_stopped_after_an_epoch_resumes_to_the_uninterrupted_model(weighting, cells,
                                                                             tmp_path):
    cfg = dataclasses.replace(CFG, weighting=weighting)  # GradNorm: its weights resume too
    whole, history = run(cells, tmp_path / "whole", cfg=cfg)
    paused, _ = run(cells, tmp_path / "paused", cfg=cfg, stop_after_epoch=2)
    saved = torch.load(tmp_path / "paused" / "checkpoint.pt", weights_only=True)["state"]
    assert saved["epoch"] == 2 and len(saved["history"]["train"]) == 2
    assert not same_weights(paused.state_dict(), whole.state_dict())
    # another initial draw: the resumed run's weights come from the checkpoint
    resumed, history_resumed = run(cells, tmp_path / "paused", seed=1, cfg=cfg)
    assert same_weights(resumed.state_dict(), whole.state_dict())
    for key in ("train", "val", "best_epoch", "best_val_rel_l2_stress", "loss_weights"):
        assert history_resumed[key] == history[key], key
    assert len(history["train"]) == CFG.epochs


def test_a_finished_training_found_again_only_restores_its_best_model(cells, tmp_path):
    whole, history = run(cells, tmp_path / "w")
    again, history_again = run(cells, tmp_path / "w", seed=3)
    assert same_weights(again.state_dict(), whole.state_dict())
    assert history_again["train"] == history["train"]


def test_a_cancelled_training_returns_before_its_next_epoch(cells):
    """``cancel`` (a cold start's background training at the end of the run) stops a training
    on one process at the next epoch; a data-parallel one is refused the flag."""
    cancel = threading.Event()
    cancel.set()
    torch.manual_seed(0)
    model = SANO(SMALL)
    before = {k: v.clone() for k, v in model.named_parameters()}
    history = train(model, cells, CFG, comm=MPI.COMM_SELF, progress=False, cancel=cancel)
    assert history["cancelled"] and history["train"] == []
    assert same_weights(dict(model.named_parameters()), before)  # scales set, nothing learnt
    assert not train(SANO(SMALL), cells, dataclasses.replace(CFG, epochs=1), comm=MPI.COMM_SELF,
                     progress=False, cancel=threading.Event())["cancelled"]
    with pytest.raises(InputError, match="one process"):
        train(model, cells, CFG, comm=FakeComm(), progress=False, cancel=cancel)


class FakeComm:
    """What ``train`` asks of a communicator before its first collective: its size."""

    size, rank = 2, 0


def write_config(path: Path, **training) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"latent": 4, "hidden": 8, "members": 2},
        "training": {"epochs": 3, "batch_size": 64, "val_fraction": 0.3,
                     "weights": {"stress": 1.0, "tangent": 0.2, "nll": 0.1}, **training}}))
    return path


def test_the_train_command_refuses_another_runs_work_folder_and_starts_over_with_fresh(
        tmp_path, capsys):
    cfg, out, work = write_config(tmp_path / "t.yaml"), tmp_path / "m.pt", tmp_path / "m.train"
    args = ["train", str(cfg), "--data", str(CRYSTAL), "--out", str(out), "--quiet"]
    assert main([*args, "--keep-work"]) == 0
    assert (work / "checkpoint.pt").is_file()
    first = load_operator(out).state_dict()
    # a rerun of the same command finds every epoch done: it only calibrates again
    assert main(args) == 0
    assert same_weights(load_operator(out).state_dict(), first)
    assert not work.exists()  # removed after success (no --keep-work)
    assert main([*args, "--keep-work"]) == 0
    capsys.readouterr()
    write_config(cfg, lr=1e-3)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"work folder {work}" in err and "other config" in err and "--fresh" in err
    data = tmp_path / "d.h5"
    data.write_bytes(CRYSTAL.read_bytes())
    assert main([*args[:3], str(data), *args[4:], "--work", str(work)]) == 2
    assert "other config, data" in capsys.readouterr().err
    # --fresh starts over: the model of a run of the new config in an empty folder
    assert main([*args, "--fresh"]) == 0
    assert not work.exists()
    assert main([*args[:5], str(tmp_path / "n.pt"), "--quiet"]) == 0
    fresh, new = load_operator(out).state_dict(), load_operator(tmp_path / "n.pt").state_dict()
    assert same_weights(fresh, new) and not same_weights(fresh, first)


def test_recorded_random_generators_draw_again_what_they_drew_after_the_record():
    import random

    from neuroscale_couple.store import rng_states, set_rng_states

    def draws() -> tuple:
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(),  # noqa: NPY002
                [random.random() for _ in range(3)])

    states = rng_states()
    before = draws()
    set_rng_states(torch.load(_saved(states), weights_only=True))
    assert draws() == before


def _saved(obj: object):
    """``obj`` through torch.save, as a checkpoint holds it."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_a_work_folder_given_by_the_user_loses_only_the_checkpoint(tmp_path):
    (tmp_path / "data.h5").write_bytes(b"kept")
    work = WorkCheckpoint(tmp_path, {"a": 1})
    work.save({"epoch": 1})
    assert work.load() == {"epoch": 1}
    work.remove()
    assert [p.name for p in tmp_path.iterdir()] == ["data.h5"]
    alone = WorkCheckpoint(tmp_path / "w", {"a": 1})
    alone.save({"epoch": 1})
    alone.remove()
    assert not alone.work.exists()


def test_an_unreadable_checkpoint_is_refused_with_the_fix(tmp_path):
    from neuroscale_couple.errors import CheckpointError

    (tmp_path / "checkpoint.pt").write_text("cut short")
    with pytest.raises(CheckpointError, match=f"{tmp_path} holds an unreadable .*--fresh"):
        WorkCheckpoint(tmp_path, {"a": 1}).load()
