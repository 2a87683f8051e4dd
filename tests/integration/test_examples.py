"""Examples double as regression tests: each one ends by checking itself."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.dolfinx, pytest.mark.skip_in_parallel]


def test_rve_demo_runs_and_checks_itself(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "examples" / "rve_demo.py"), "--out", str(tmp_path),
                    "--steps", "4", "--resolution", "48"], check=True)
    response = json.loads((tmp_path / "response.json").read_text())
    assert len(response["stress"]) == 5
    assert (tmp_path / "rve_demo.png").stat().st_size > 10_000
