"""The ``neuroscale`` command line.

    neuroscale rve CONFIG.yaml [--json]                  one RVE solve (2D or 3D cell):
                                                         homogenized P̄ and tangent A
    neuroscale generate CONFIG.yaml --out D.h5           RVE/crystal training data (MPI, resumable)
    neuroscale train CONFIG.yaml --data D.h5 [D2.h5 …] --out M.pt [--init M0.pt [--new-material]]
                     [--work DIR] [--fresh] [--keep-work]
                                                         train + calibrate the operator (MPI,
                                                         resumable after every epoch)
    neuroscale calibrate --model M.pt --data D.h5 [--groups [--contrast-bands C]]
                                                         split-conformal recalibration
    neuroscale evaluate --model M.pt --data D.h5 [--ood O.h5] [--json] [--plot R.png]
    neuroscale subset D.h5 (--micro M | --samples N) [--seed S] --out D_part.h5
    neuroscale distill --model M.pt --out M_fast.pt --cells N --epochs E
                       [--calibration C.h5] [--test T.h5]   a slim encoder trained against M
    neuroscale distill-covariance --model M.pt --out M2.pt --calibration C.h5 [--test T.h5]
                                                         its error-bar head quadratic in the strain
    neuroscale explain --model M.pt --config CELLS.yaml --out DIR   scales and attention as PNGs
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from neuroscale_couple.calibration import CONTRAST_BANDS, LOAD_BANDS
from neuroscale_couple.config import check_keys, load_yaml
from neuroscale_couple.errors import InputError, NeuroScaleError

if TYPE_CHECKING:
    from neuroscale_couple.store import WorkCheckpoint
    from neuroscale_couple.training import TrainingData


def cmd_rve(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    from neuroscale_couple.solvers.phase_cell import RVE_CONFIG_KEYS
    from neuroscale_couple.solvers.rve_fenicsx import rve_from_config
    from neuroscale_couple.structures import from_config

    cfg = load_yaml(args.config)
    check_keys(cfg, (*RVE_CONFIG_KEYS, "microstructure", "F"), str(args.config))
    if "F" not in cfg:
        raise InputError(f"{args.config}: key F (the macro deformation gradient: 2×2 for a 2D "
                         "cell, 3×3 for a 3D one) is missing")
    rve = rve_from_config(cfg, from_config(cfg.get("microstructure") or {}), MPI.COMM_WORLD)
    res = rve.solve(np.asarray(cfg["F"], dtype=float))
    out = {
        "stress": res.stress[0].tolist(),
        "tangent": res.tangent[0].tolist(),
        "dofs": rve.dofs,
        "newton_iterations": int(res.info["iterations"][0]),
        "time_s": float(res.info["time_s"][0]),
    }
    if MPI.COMM_WORLD.rank != 0:
        return
    if args.json:
        print(json.dumps(out, indent=2))
        return
    np.set_printoptions(precision=6, suppress=True)
    print(f"RVE: {rve.microstructure.kind}, v = {rve.microstructure.volume_fraction:.3f}, "
          f"law {rve.law}, {rve.bc} bc, P{rve.degree}, {rve.dofs} dofs")
    print(f"Newton iterations {out['newton_iterations']}, solve + tangent {out['time_s']:.3f} s")
    print("homogenized first Piola–Kirchhoff stress P̄:\n", res.stress[0])
    dd = rve.dim**2
    print(f"homogenized tangent A = ∂P̄/∂F̄ as a {dd}×{dd} matrix (rows ij, columns kl):\n",
          res.tangent[0].reshape(dd, dd))


def cmd_generate(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    from neuroscale_couple.datagen import generate

    generate(load_yaml(args.config), args.out, MPI.COMM_WORLD, progress=not args.quiet)


def training_data(paths: list[str], resolution: int | None, material_inputs: bool = False
                  ) -> tuple[TrainingData, list[dict]]:
    """One :class:`TrainingData` of the data sets at ``paths`` and each set's material family
    config (its structure family's ``family_config``: for cells every generate key but
    ``microstructure`` and ``loads``). The sets must share that family, the first one's config
    standing for all; for a family operator (``material_inputs``,
    :meth:`TrainingData.from_arrays`) all but their phases
    (:data:`~neuroscale_couple.phases.PHASE_KEYS`: data of one material may join data that
    draws its phases; the caller checks each set's phases against the operator's ranges)."""
    from neuroscale_couple.phases import PHASE_KEYS
    from neuroscale_couple.training import TrainingData

    parts = [TrainingData.from_h5(path, resolution, material_inputs=material_inputs)
             for path in paths]
    families = [part.structure.family_config(part.config) for part in parts]
    ignored = PHASE_KEYS if material_inputs else ()

    def shared(family: dict) -> dict:
        return {k: v for k, v in family.items() if k not in ignored}

    first = shared(families[0])
    for path, other in zip(paths[1:], families[1:], strict=True):
        then = shared(other)
        if then != first:
            keys = sorted(k for k in first.keys() | then.keys() if first.get(k) != then.get(k))
            raise InputError(f"--data {path} is of another material family than {paths[0]} "
                             f"(they differ in {', '.join(keys)}): train together only data sets "
                             "of one family")
    return (parts[0] if len(parts) == 1 else TrainingData.concat(parts)), families


TRAIN_KEYS = ("model", "training")
"""Top-level keys of a `neuroscale train` config (a fine-tuning config with --init: training)."""


def cmd_train(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    from neuroscale_couple.calibration import MIN_CALIBRATION_POINTS
    from neuroscale_couple.evaluation import calibrate_model
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.operators.sano import SANOConfig
    from neuroscale_couple.training import TrainConfig, relative_errors, train
    from neuroscale_couple.weighting import CARD_KEYS as LOSS_WEIGHTINGS

    cfg = load_yaml(args.config)
    check_keys(cfg, TRAIN_KEYS, str(args.config))
    comm = MPI.COMM_WORLD
    tcfg = TrainConfig.from_dict(cfg.get("training") or {})
    mcfg = dict(cfg.get("model") or {})
    init = earlier = transfer = None
    if args.new_material and args.init is None:
        raise InputError("--new-material fine-tunes a checkpoint: give it with --init M.pt")
    if args.init is not None:  # fine-tuning: the checkpoint's architecture and scales stay
        if mcfg:
            raise InputError(f"{args.config}: a `model:` mapping with --init {args.init}; the "
                             "checkpoint fixes the architecture, so remove the mapping")
        init = load_operator(args.init)
        mcfg = dict(init.card.get("model_config") or {})
        kept = ("data", "training", "history", "init")  # the earlier stage's provenance
        earlier = {"checkpoint": str(args.init),
                   **{k: v for k, v in init.card.items() if k in kept}}
    resolution = init.input_resolution if init is not None else int(
        mcfg.get("resolution", SANOConfig.resolution))
    data, families = training_data(args.data, resolution,
                                   init is not None and init.takes_material)
    import torch

    from neuroscale_couple.parallel import device_for_rank

    torch.manual_seed(tcfg.seed)
    device = device_for_rank(comm)
    logging.getLogger(__name__).info("rank %d trains on %s", comm.rank, device)
    if init is not None:  # the data must be of the family the checkpoint learnt, or adopted
        family = families[0]
        transfer = init.adopt_material(family) if args.new_material else None
        try:
            for each in families:
                init.check_family(each)
        except InputError as err:
            raise InputError(f"{err} (to fine-tune the model to the data's material, add "
                             "--new-material)") from None
        if transfer is not None:  # its stresses are of another size: rescale, keep the rest
            mcfg.update({k: list(getattr(init.config, k)) for k in transfer})
            earlier["transfer_from"] = transfer
        model = init.to(device)
    else:  # the structures' family picks the operator (cell images: SANO; crystals: descriptors)
        model, mcfg = data.structure.new_operator(mcfg, data)
        model = model.to(device)
    fit, held_out = data.split(tcfg.val_fraction, tcfg.seed)
    if not len(held_out):
        raise InputError(f"training.val_fraction={tcfg.val_fraction} holds out no data: the "
                         "held-out part validates and calibrates the model; use e.g. 0.1")
    if transfer is not None:
        model.set_stress_scales(fit.P, fit.A)
    work = train_checkpoint(args, cfg, None if init is None else init.weights_digest())
    if args.fresh and comm.rank == 0:
        work.remove()
    comm.barrier()
    history = train(model, fit, tcfg, comm=comm, validation=held_out, normalise=init is None,
                    progress=not args.quiet, checkpoint=work)
    n_cal = 0  # calibration redone by a run resumed after the last epoch
    if len(held_out) >= MIN_CALIBRATION_POINTS:
        n_cal = calibrate_model(model, held_out).n_calibration
    else:  # few-shot data: an earlier stage's calibration would not hold for the new model
        model.calibration = {}
        logging.getLogger(__name__).warning(
            "%d held-out samples are too few to calibrate the bound (at least %d): calibrate "
            "on held-out fine solves with `neuroscale calibrate --model %s --data C.h5`",
            len(held_out), MIN_CALIBRATION_POINTS, args.out)
    learned = {k: model.card[k] for k in LOSS_WEIGHTINGS.values() if k in model.card}
    model.card = {"data": ", ".join(args.data), "data_config": data.config,
                  "model_config": mcfg,
                  "training": cfg.get("training") or {}, "seed": tcfg.seed,
                  "history": {k: history[k] for k in ("best_epoch", "time_s")},
                  "validation": relative_errors(model, held_out),
                  "calibration_points": n_cal}
    model.card.update(learned)  # learned loss weights (training.weighting)
    region = data.region  # a fine-tuned model keeps the region of its first stage too
    if region is not None and init is not None and init.region is not None:
        region = region.union(init.region)
    if region is not None:
        model.card["region"] = region.to_dict()
    if earlier is not None:
        model.card["init"] = earlier
    if comm.rank == 0:
        model.float().cpu().save(args.out)  # trained in float32: store it so (half the size)
        if not args.keep_work:
            work.remove()
        print(json.dumps({"out": str(args.out), **model.card["validation"],
                          "best_epoch": history["best_epoch"],
                          "time_s": round(history["time_s"], 1)}, indent=2))


def train_checkpoint(args: argparse.Namespace, cfg: dict, init_digest: str | None
                     ) -> WorkCheckpoint:
    """The work folder of a `neuroscale train` run (``--work``, default OUT with suffix
    .train) and the key a rerun must match to resume from it: the parsed config, the data files
    and the --init model.

    Data files are known by path, size and modification time, not by a hash of their content:
    data sets run to gigabytes (hashing them would cost minutes at every start) and `neuroscale
    generate` writes and extends them in place or by rename, which changes size or mtime. The
    --init model is known by its weights digest (it is loaded anyway): a first stage retrained
    to the same weights lets its second stage resume.
    """
    from neuroscale_couple.store import WorkCheckpoint, file_identity

    work = Path(args.work) if args.work else Path(args.out).with_suffix(".train")
    key = {"config": cfg, "data": [file_identity(p) for p in args.data], "init": init_digest}
    return WorkCheckpoint(work, key)


def _band_edges(text: str, flag: str, quantity: str, example: str) -> tuple[float, ...]:
    """Band edges (sorted) of a comma-separated option ``flag`` in ``quantity``."""
    try:
        edges = tuple(sorted(float(b) for b in text.split(",") if b.strip()))
    except ValueError:
        raise InputError(f"{flag} {text}: give band edges in {quantity} separated by commas, "
                         f"e.g. {example}") from None
    if not all(0 < b < np.inf for b in edges):
        raise InputError(f"{flag} {text}: edges must be positive and finite")
    return edges


def cmd_calibrate(args: argparse.Namespace) -> None:
    from neuroscale_couple.evaluation import calibrate_model
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.training import TrainingData

    model = load_operator(args.model)
    bands, contrast_bands = None, ()
    if args.groups:
        bands = _band_edges(args.load_bands, "--load-bands", "‖U − I‖", "0.1,0.2")
        given = args.contrast_bands
        if given is not None and given != "none" and not model.takes_material:
            raise InputError(f"--contrast-bands {given}: {args.model} is a model of one "
                             "material, whose data have one contrast; leave the option out")
        if model.takes_material and given != "none":
            contrast_bands = _band_edges(given or ",".join(f"{c:g}" for c in CONTRAST_BANDS),
                                         "--contrast-bands", "E_f/E_m", "3,10,30")
    dtype = next(model.parameters()).dtype
    cal = calibrate_model(model, TrainingData.from_h5(args.data, model.input_resolution,
                                                      material_inputs=model.takes_material),
                          bands=bands, contrast_bands=contrast_bands)
    model.to(dtype).save(args.out or args.model)
    print(json.dumps(cal.to_dict(), indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from neuroscale_couple.evaluation import evaluate
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.training import TrainingData

    model = load_operator(args.model)
    n, phases = model.input_resolution, model.takes_material
    ood = TrainingData.from_h5(args.ood, n, material_inputs=phases) if args.ood else None
    metrics = evaluate(model, TrainingData.from_h5(args.data, n, material_inputs=phases),
                       ood=ood, plot=args.plot)
    if args.card:
        card = {"model": str(args.model), **model.card, "test_data": str(args.data),
                "ood_data": args.ood, "test_metrics": metrics}
        Path(args.card).write_text(json.dumps(card, indent=1))
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    for key, value in metrics.items():
        print(f"{key:>16}: {value}")


def cmd_explain(args: argparse.Namespace) -> None:
    from neuroscale_couple.explain import run

    record = run(args.model, load_yaml(args.config), args.out)
    for cell in record["cells"]:
        shares = " ".join(f"{e:.0%}" for e in cell["energy_share"])
        print(f"{args.out}/{cell['png']}: {cell['name']}, fibre fraction "
              f"{cell['fibre_fraction']:.2f}, energy per scale {shares}")


def cmd_distill(args: argparse.Namespace) -> None:
    import torch

    from neuroscale_couple.distillation import Distillation, DistillConfig
    from neuroscale_couple.evaluation import calibrate_model, evaluate
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.training import TrainingData

    out = Path(args.out)
    if out.suffix != ".pt" or out.resolve() == Path(args.model).resolve():
        raise InputError(f"--out {args.out}: give a new model file ending in .pt (not --model)")
    for flag, path in (("--calibration", args.calibration), ("--test", args.test)):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{flag} {path} does not exist: make it with `neuroscale generate`")
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise InputError(f"--channels {args.channels}: give widths separated by commas, e.g. "
                         "32,64,64,64") from None
    cfg = DistillConfig(cells=args.cells, epochs=args.epochs, loads=args.loads,
                        batch_size=args.batch, channels=channels, lr=args.lr, seed=args.seed)
    teacher = load_operator(args.model)
    if teacher.takes_material:
        raise InputError(f"--model {args.model} is a family operator (phases as inputs): "
                         "distilling one is not built yet; distil a model of one material")
    digest = teacher.weights_digest(calibration=False)
    work = Path(args.work) if args.work else out.with_suffix(".distill")
    student, history = Distillation(teacher, cfg, work).run(progress=not args.quiet)
    student.card |= {"distilled_from": {"model": str(args.model), "digest": digest},
                     "distillation": {**Distillation.settings(cfg), **history}}
    if args.calibration is not None:
        cal = calibrate_model(student, TrainingData.from_h5(args.calibration,
                                                            student.input_resolution))
        student.card["calibration_points"] = cal.n_calibration
    if args.test is not None:
        test = TrainingData.from_h5(args.test, student.input_resolution)
        student.card["test"] = {"data": str(args.test),
                                "teacher": evaluate(load_operator(args.model), test),
                                "student": evaluate(student, test)}
    student.to(torch.float32).save(out)
    print(json.dumps({"out": str(out), "best_val_rel_l2_stress":
                      history["best_val_rel_l2_stress"],
                      **{k: {m: v["rel_l2_stress"] for m, v in student.card["test"].items()
                             if m != "data"} for k in ("test",) if k in student.card}}, indent=2))


def cmd_distill_covariance(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from neuroscale_couple.covariance_distillation import (
        CovarianceDistillation,
        CovarianceDistillConfig,
    )
    from neuroscale_couple.evaluation import calibrate_model, evaluate
    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.training import TrainingData

    out = Path(args.out)
    if out.suffix != ".pt":
        raise InputError(f"--out {args.out}: give a model file ending in .pt")
    if not Path(args.calibration).is_file():
        raise InputError(f"--calibration {args.calibration} does not exist: make it with "
                         "`neuroscale generate`")
    if args.test is not None and not Path(args.test).is_file():
        raise InputError(f"--test {args.test} does not exist: make it with `neuroscale generate`")
    cfg = CovarianceDistillConfig(cells=args.cells, epochs=args.epochs, loads=args.loads,
                                  lr=args.lr, seed=args.seed)
    model = load_operator(args.model)
    digest, before = model.weights_digest(), None
    if args.test is not None:
        test = TrainingData.from_h5(args.test, model.input_resolution)
        before = evaluate(model, test)
    work = Path(args.work) if args.work else out.with_suffix(".covariance")
    new, history = CovarianceDistillation(model, cfg, work).run(progress=not args.quiet)
    cal = calibrate_model(new, TrainingData.from_h5(args.calibration, new.input_resolution))
    new.card |= {"covariance_distilled_from": {"model": str(args.model), "digest": digest},
                 "covariance_distillation": {**dataclasses.asdict(cfg), **history},
                 "calibration_points": cal.n_calibration}
    if args.test is not None:
        new.card["covariance_test"] = {"data": str(args.test), "network": before,
                                       "quadratic": evaluate(new, test)}
    new.to(torch.float32).save(out)
    keys = ("rel_l2_stress", "ece", "bound_coverage", "bound_width")
    print(json.dumps({"out": str(out), "best_val_rel_trace": history["best_val_rel_trace"],
                      **{k: {m: v[k] for m, v in new.card["covariance_test"].items()
                             if m != "data"} for k in keys if "covariance_test" in new.card}},
                     indent=2))


def cmd_cauchy_born(args: argparse.Namespace) -> None:
    import time

    from neuroscale_couple.solvers.cauchy_born import cauchy_born_from_config
    from neuroscale_couple.solvers.crystal import CONFIG_SCHEMA

    cfg = load_yaml(args.config)
    check_keys(cfg, (*CONFIG_SCHEMA, "F"), str(args.config))
    F = np.asarray(cfg.get("F", np.eye(3)), dtype=float)
    if F.shape != (3, 3):
        raise InputError(f"F has shape {F.shape}: give a 3×3 deformation gradient")
    t0 = time.perf_counter()
    cb, a0 = cauchy_born_from_config(cfg)
    res = cb.solve(F)
    out = {"stress": res.stress[0].tolist(), "tangent": res.tangent[0].tolist(),
           "cauchy": (res.stress[0] @ F.T / np.linalg.det(F)).tolist(), "natoms": cb.natoms,
           "a0": a0,
           "time_s": time.perf_counter() - t0}
    if "stress_stderr" in res.info:
        out["stress_stderr"] = res.info["stress_stderr"][0].tolist()
    if args.json:
        print(json.dumps(out))
        return
    np.set_printoptions(precision=4, suppress=True)
    print(f"Cauchy–Born: {cfg['element']} {cfg.get('lattice', 'fcc')}, {cb.natoms} atoms, "
          f"relax {cb.relax}, {out['time_s']:.2f} s")
    print("first Piola–Kirchhoff stress P̄ (GPa):\n", res.stress[0])
    print("Cauchy stress σ (GPa):\n", np.asarray(out["cauchy"]))
    if "stress_stderr" in out:
        print(f"standard error of P̄ at {cb.temperature:g} K (GPa):\n",
              np.asarray(out["stress_stderr"]))
    print("tangent ∂P̄/∂F̄ as a 9×9 matrix (GPa):\n", res.tangent[0].reshape(9, 9))


def cmd_subset(args: argparse.Namespace) -> None:
    from neuroscale_couple.store import subset_dataset

    for flag, value in (("--micro", args.micro), ("--samples", args.samples)):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: give the number of "
                             f"{'microstructures' if flag == '--micro' else 'samples'} to copy, "
                             "at least 1")
    if args.seed < 0:
        raise InputError(f"--seed {args.seed}: give a seed ≥ 0")
    n = subset_dataset(args.data, args.out, args.micro, args.seed, n_samples=args.samples)
    what = f"{args.micro} microstructures" if args.micro is not None else "nested subset"
    print(f"{args.out}: {what}, {n} samples")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuroscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rve", help="solve one periodic RVE for one macro F̄")
    p.add_argument("config", help="YAML config (microstructure, law, matrix, fibre, F, mesh, bc)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_rve)
    p = sub.add_parser("generate", help="make a training data set (HDF5) with the RVE or "
                       "Cauchy–Born solver")
    p.add_argument("config", help="YAML config (see neuroscale_couple.datagen)")
    p.add_argument("--out", required=True, help="output HDF5 file; an unfinished one is resumed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("train", help="train the operator on a data set, then calibrate it; "
                       "resumable")
    p.add_argument("config", help="YAML config with `model:` and `training:` mappings")
    p.add_argument("--data", required=True, nargs="+", help="HDF5 data set(s) from `neuroscale "
                   "generate` (several: of one material family, trained on together)")
    p.add_argument("--out", required=True, help="model checkpoint to write (.pt)")
    p.add_argument("--init", help="checkpoint to go on training (fine-tuning: config without "
                   "`model:`)")
    p.add_argument("--new-material", action="store_true", help="with --init: fine-tune a "
                   "model of one material to the data's other phases (few-shot transfer; the "
                   "model takes them and rescales its stresses)")
    p.add_argument("--work", help="folder of the per-epoch checkpoint (default OUT with suffix "
                   ".train); a rerun of the same command resumes from it")
    p.add_argument("--fresh", action="store_true", help="start over: discard the checkpoint "
                   "in the work folder")
    p.add_argument("--keep-work", action="store_true", help="keep the checkpoint after "
                   "success (default: deleted once OUT is written, with the folder if empty)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("calibrate", help="split-conformal calibration on held-out data")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="held-out calibration data (HDF5)")
    p.add_argument("--out", help="write the calibrated model here (default: in place)")
    p.add_argument("--groups", action="store_true", help="group-wise (Mondrian) calibration: "
                   "scale and quantiles per structure kind and load band, so the bound holds "
                   "in each group whatever a macro problem's mix")
    p.add_argument("--load-bands", default=",".join(f"{b:g}" for b in LOAD_BANDS),
                   help="band edges in ‖U − I‖ for --groups, comma-separated (default "
                   "%(default)s)")
    p.add_argument("--contrast-bands", help="band edges in E_f/E_m for --groups of a family "
                   "operator, comma-separated (default "
                   f"{','.join(f'{c:g}' for c in CONTRAST_BANDS)}; none: no contrast bands)")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("evaluate", help="accuracy, coverage, ECE, OOD AUROC of a model")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="held-out test data (HDF5)")
    p.add_argument("--ood", help="out-of-distribution data (HDF5) for the AUROC")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="write a reliability diagram (PNG) here")
    p.add_argument("--card", help="write the model card (training record + metrics) here")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("distill", help="train a slim encoder against a SANO model (teacher) "
                       "through its heads; resumable")
    p.add_argument("--model", required=True, help="the teacher (a SANO model file)")
    p.add_argument("--out", required=True, help="the distilled model file to write (.pt)")
    p.add_argument("--cells", type=int, default=8000, help="cells drawn like the teacher's data")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--loads", type=int, default=4, help="loads F̄ per cell and batch")
    p.add_argument("--batch", type=int, default=128, help="cells per batch")
    p.add_argument("--channels", default="32,64,64,64", help="widths of the strided convolutions")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="folder of the teacher data and per-epoch checkpoint (default "
                   "OUT with suffix .distill); a rerun resumes from it")
    p.add_argument("--calibration", help="fine solves (HDF5) to calibrate the student's bound")
    p.add_argument("--test", help="held-out fine solves (HDF5): teacher and student accuracy "
                   "recorded in the card")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("distill-covariance", help="replace a model's aleatoric network by a "
                       "head quadratic in the strain (a cheaper error bound in the loop), "
                       "trained against it and calibrated afresh; resumable")
    p.add_argument("--model", required=True, help="a model of fibre cells (SANO or distilled)")
    p.add_argument("--out", required=True, help="the model file to write (.pt; may be --model)")
    p.add_argument("--calibration", required=True,
                   help="fine solves (HDF5) to calibrate the new bound")
    p.add_argument("--test", help="held-out fine solves (HDF5): both heads' accuracy and "
                   "calibration recorded in the card")
    p.add_argument("--cells", type=int, default=4000, help="cells drawn like the model's data")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--loads", type=int, default=8, help="loads F̄ per cell and batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="folder of the cells' latents and per-epoch checkpoint "
                   "(default OUT with suffix .covariance); a rerun resumes from it")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    p.set_defaults(func=cmd_distill_covariance)
    p = sub.add_parser("explain", help="pictures of what a SANO model's encoder sees of cells: "
                       "wavelet scales, cross-scale attention, scale weights")
    p.add_argument("--model", required=True, help="a SANO model file")
    p.add_argument("--config", required=True, help="YAML with `microstructure` groups as in a "
                   "generate config (and `matrix`, `fibre` for a family operator)")
    p.add_argument("--out", required=True, help="folder for cell_NNN.png and explain.json")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("cauchy-born", help="one Cauchy–Born crystal solve (stress, tangent)")
    p.add_argument("config", help="YAML config (element, lattice, a0, supercell, vacancies, "
                   "calculator, F, temperature, relax)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_cauchy_born)
    p = sub.add_parser("subset", help="copy N random microstructures or samples of a data set "
                       "(e.g. the anchor data that online retraining mixes in, few-shot sets)")
    p.add_argument("data", help="HDF5 data set from `neuroscale generate`")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--micro", type=int, help="number of microstructures (all their samples)")
    size.add_argument("--samples", type=int, help="number of samples (fine solves); nested: "
                      "for one --seed a smaller subset lies inside a larger one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_subset)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except NeuroScaleError as err:
        print(f"neuroscale {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
