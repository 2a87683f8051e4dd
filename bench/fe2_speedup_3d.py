"""3D FE² speed-up: examples/fe2_composite_3d.py as classic FE² (`--reference`) and with the 3D
operator with fallback, on the same coupon mesh and load steps.

See bench/coupled_speedup.py for the runs and the record (``bench/results/fe2_speedup_3d.json``);
here four of them: the reference, the operator with online retraining (the product), frozen
(``no_retrain``) and never falling back (``operator_only``). Targets (issue 28): total ≥ 1000×
with fallback, displacement error ≤ 0.5 %, stress ≤ 1 %. The RVE mesh (--rve-mesh-size 0.25,
coarser than the model's training data, 0.1) keeps the classic reference within minutes on two
cores; ``--reuse-reference`` takes it from an earlier run whose settings hash matches.
"""

from coupled_speedup import main

if __name__ == "__main__":
    main("fe2_composite_3d", "fe2_speedup_3d", "3D FE²", __doc__.splitlines()[0],
         mesh_size="0.5", stretch=0.06, rtol=0.15, steps=2,
         runs=("reference", "operator", "no_retrain", "operator_only"),
         options={"--rve-mesh-size": float, "--rve-cache": int})
