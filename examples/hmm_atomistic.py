"""HMM of a copper plate with a hole: the stress at each quadrature point from a Cauchy–Born cell.

It illustrates how to:

- use an atomistic fine solver (ASE's EMT, or LAMMPS) as the Coupler's true solver;
- give every quadrature point the same crystal, and let the crystal operator answer;
- run at a finite temperature, where the fine solve is a noisy molecular-dynamics average.

Macro problem (plane strain, quarter of a square plate of width 2 with a central hole of radius
0.3, symmetry on x = 0 and y = 0, u_x = δ(t) on x = 1; lengths in any unit, stresses in GPa):

    ∫ P̄(F̄) : ∇v dx = 0,   F̄ = I + ∇u,

where P̄(F̄) at every quadrature point is the first Piola–Kirchhoff stress of a periodic fcc Cu
crystal cell deformed by F̄ (Cauchy–Born): a 2×2×2 supercell with one vacancy (31 atoms), its
atoms relaxed at fixed cell to 1e-7 eV/Å, with the EMT potential (``--calculator lammps``:
LAMMPS EAM Cu_u3) or at ``--temperature`` T > 0 by Langevin molecular dynamics. The Coupler
answers with the trained crystal operator (examples/models/hmm_cu.pt, trained on
‖F̄ − I‖ ≤ 0.05) and falls back to the atomistic solver wherever its calibrated error bound
exceeds --atol + --rtol·|P̄|; the strain concentration at the hole leaves the training region
in the last load steps, so fallback and online retraining are seen working.

Run: ``mpiexec -n 2 python examples/hmm_atomistic.py --out out/hmm``; ``--reference`` solves the
crystal at every point. Outputs as in examples/fe2_composite.py (summary.json, fields.npz,
displacement.bp, micro_fields.xdmf, fields.png, steps.png, checkpoint/, replay/).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mpi4py import MPI

from plate_with_hole import (
    CoupledRun,
    coupled_arguments,
    main_guard,
    prepare,
    quarter_plate,
    retrain_config,
    run_example,
)

MODELS = Path(__file__).parent / "models"
CRYSTAL = {"element": "Cu", "lattice": "fcc", "supercell": [2, 2, 2], "vacancies": 1,
           "fmax": 1e-7}
# relaxed stresses carry ~1e-7 GPa of relaxation noise (fmax 1e-7 eV/Å): Newton stops at a
# relative residual of 1e-7 instead of the continuum default 1e-9
NEWTON = {"snes_rtol": 1e-7, "snes_atol": 1e-10}
CALCULATORS = {"emt": "emt",
               "lammps": {"name": "lammps", "pair_style": "eam", "pair_coeff": "* * Cu_u3.eam"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = coupled_arguments(__doc__.splitlines()[0], out="out/hmm_atomistic", model=None,
                          stretch=0.04, rtol=0.03, stress_unit="GPa")
    p.add_argument("--calculator", choices=sorted(CALCULATORS), default="emt",
                   help="interatomic potential of the fine solver")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="K; > 0: Langevin NVT virial averages instead of static relaxation")
    p.add_argument("--md-steps", type=int, default=400, help="MD production steps per solve")
    p.add_argument("--noise-in-bound", action="store_true",
                   help="at T > 0 let the MD noise count towards the fallback bound (default: "
                   "only the operator's model error, which a fallback can remove)")
    args = p.parse_args(argv)
    if not 0 <= args.temperature < float("inf"):
        p.error(f"--temperature {args.temperature}: give a finite temperature ≥ 0 K")
    if args.md_steps < 1:
        p.error(f"--md-steps {args.md_steps}: give at least one MD production step")
    args.exclude_noise = args.temperature > 0 and not args.noise_in_bound
    if args.model is None:  # the shipped model of the fine solver's temperature
        args.model = str(MODELS / ("hmm_cu_thermal.pt" if args.temperature > 0 else "hmm_cu.pt"))
    return args


def crystal_config(args: argparse.Namespace) -> dict:
    """The Cauchy–Born config of every point, with its equilibrium lattice constant."""
    from neuroscale_couple.solvers.cauchy_born import cauchy_born_from_config

    cfg = dict(CRYSTAL, calculator=CALCULATORS[args.calculator])
    cfg["a0"] = cauchy_born_from_config(cfg)[1]
    if args.temperature > 0:  # as in hmm_cu_thermal.data.yaml
        cfg.update(temperature=args.temperature, md_steps=args.md_steps,
                   equilibration_steps=100)
    return cfg


def build(args: argparse.Namespace, comm: MPI.Comm) -> CoupledRun:
    """Macro problem and Coupler; all input is checked before collective work."""
    from neuroscale_couple.coupler import Coupler
    from neuroscale_couple.solvers.cauchy_born import Crystal

    policy, model_path, model = prepare(args)
    crystal = Crystal(crystal_config(args))
    coupler = Coupler(model, Crystal.solver, family=crystal.config, policy=policy, comm=comm,
                      replay_dir=Path(args.out) / "replay",
                      retrain=retrain_config(args),
                      model_path=model_path, audit=args.audit)
    if comm.rank == 0:
        logging.getLogger("hmm_atomistic").info(
            "crystal: %s", json.dumps(crystal.config, sort_keys=True))
    problem, set_load, right = quarter_plate(args, coupler, lambda x, ids: [crystal] * len(ids),
                                             comm, petsc_options=NEWTON)
    return CoupledRun(problem, coupler, set_load, right, "GPa")


def main(argv: list[str] | None = None) -> dict:
    return run_example(parse_args(argv), build)


if __name__ == "__main__":
    main_guard(main, "hmm_atomistic")
