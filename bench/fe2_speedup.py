"""FE² speed-up: examples/fe2_composite.py as classic FE² (`--reference`) and with the operator.

See bench/coupled_speedup.py for the runs and the record (``bench/results/fe2_speedup.json``).
Targets (issue 4): total ≥ 100×, micro part ≥ 1000×, displacement error ≤ 1 %, stress ≤ 2 %,
Newton iterations per step within ±1 of the reference.
"""

from coupled_speedup import main

if __name__ == "__main__":
    main("fe2_composite", "fe2_speedup", "FE²", __doc__.splitlines()[0],
         mesh_size="0.15", stretch=0.08, options={"--rve-cache": int})
