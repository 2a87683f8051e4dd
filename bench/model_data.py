"""The shipped composite operator's data sets for the benchmarks that measure it
(bench/operator.py, bench/error_budget.py): made with the project's own RVE solver when missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"


def ensure_data(name: str, out_dir: Path) -> Path:
    """``out_dir/name.h5`` from ``examples/models/fe2_composite.<name>.yaml`` (made on 2 ranks
    if missing)."""
    path = out_dir / f"{name}.h5"
    if not path.exists():
        mpiexec = Path(sys.executable).parent / "mpiexec"
        subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "neuroscale_couple.cli",
                        "generate", str(MODELS / f"fe2_composite.{name}.yaml"), "--out",
                        str(path)], check=True)
    return path
