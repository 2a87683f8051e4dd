"""`neuroscale generate` and `neuroscale rve`: rank-count invariance, resume after a kill, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from mpi4py import MPI

import h5py
import numpy as np
import pytest
import yaml

from neuroscale_couple.cli import main
from neuroscale_couple.datagen import generate
from neuroscale_couple.errors import InputError
from neuroscale_couple.store import load_rve_dataset

pytestmark = pytest.mark.dolfinx

CONFIG = {
    "microstructure": {"kind": "random_fibres", "volume_fraction": [0.1, 0.5],
                       "n_fibres": [1, 5], "count": 5, "seed": 3},
    "loads": {"per_microstructure": 3, "radius": 0.15, "seed": 4},
    "law": "neo_hookean",
    "matrix": {"E": 3.0, "nu": 0.35},
    "fibre": {"E": 70.0, "nu": 0.2},
    "mesh": {"size": 0.05, "degree": 1},
    "image_resolution": 32,
    "fields_resolution": 8,
}


@pytest.mark.mpi
def test_data_set_is_the_same_on_one_and_on_all_ranks(mpi_tmp_path):
    comm = MPI.COMM_WORLD
    generate(CONFIG, mpi_tmp_path / "all.h5", comm, progress=False)
    if comm.rank == 0:
        generate(CONFIG, mpi_tmp_path / "one.h5", MPI.COMM_SELF, progress=False)
        every, one = (load_rve_dataset(mpi_tmp_path / f) for f in ("all.h5", "one.h5"))
        assert every["samples/P"].shape == (15, 2, 2)
        assert every["samples/fields/P"].shape == (15, 8, 8, 2, 2)
        for key in ("samples/F", "samples/P", "samples/A", "micro/image", "samples/fields/w"):
            np.testing.assert_allclose(every[key], one[key], rtol=0, atol=1e-12)
        # sanity of the content: P̄(I)-free loads give nonzero stress, symmetric tangents
        A = every["samples/A"].reshape(-1, 4, 4)
        np.testing.assert_allclose(A, A.transpose(0, 2, 1), atol=1e-9)
        assert np.all(np.abs(every["samples/P"]).max(axis=(1, 2)) > 0)


@pytest.mark.skip_in_parallel
def test_resume_solves_only_what_is_missing(tmp_path):
    out = tmp_path / "d.h5"
    generate(CONFIG, out, MPI.COMM_SELF, progress=False)
    before = load_rve_dataset(out)
    with h5py.File(out, "a") as h5:  # pretend the run was killed before units 1 and 3 were saved
        h5["samples/done"][3:6] = 0
        h5["samples/done"][9:12] = 0
        h5["samples/P"][3:6] = np.nan
        h5["samples/time_s"][:] = -1.0
    generate(CONFIG, out, MPI.COMM_SELF, progress=False)
    after = load_rve_dataset(out)
    np.testing.assert_allclose(after["samples/P"], before["samples/P"], rtol=0, atol=1e-12)
    resolved = after["samples/time_s"] > 0
    assert resolved.tolist() == [i in (3, 4, 5, 9, 10, 11) for i in range(15)]


@pytest.mark.skip_in_parallel
def test_a_structure_whose_solve_fails_is_left_out_and_the_run_goes_on(tmp_path, monkeypatch):
    """A SolveError of one structure (a Newton solve that does not converge) flags its
    samples failed and generate finishes the others; the data set as read leaves them out, a
    rerun solves nothing again; any other error still stops the run."""
    from neuroscale_couple.errors import NeuroScaleError, SolveError
    from neuroscale_couple.solvers.rve_fenicsx import PeriodicRVE
    from neuroscale_couple.store import FAILED

    solve, calls = PeriodicRVE.solve, []

    def second_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SolveError("Newton did not converge (injected)")
        return solve(self, *args, **kwargs)

    monkeypatch.setattr(PeriodicRVE, "solve", second_fails)
    cfg = dict(CONFIG, fields_resolution=0)
    out = tmp_path / "d.h5"
    generate(cfg, out, MPI.COMM_SELF, progress=False)
    with h5py.File(out, "r") as h5:
        assert h5["samples/done"][:].tolist() == [1] * 3 + [FAILED] * 3 + [1] * 9
    data = load_rve_dataset(out)
    assert data["samples/P"].shape == (12, 2, 2) and len(data["micro/image"]) == 5
    assert 1 not in data["samples/micro_index"] and np.isfinite(data["samples/P"]).all()
    stamp = os.stat(out).st_mtime_ns
    generate(cfg, out, MPI.COMM_SELF, progress=False)
    assert len(calls) == 5  # the rerun found nothing left to solve
    assert os.stat(out).st_mtime_ns == stamp  # nor wrote to it: a training on it still resumes

    def breaks(self, *args, **kwargs):
        raise ValueError("a bug, not a failed solve")

    monkeypatch.setattr(PeriodicRVE, "solve", breaks)
    with pytest.raises(NeuroScaleError, match="generate stopped.*a bug"):
        generate(cfg, tmp_path / "e.h5", MPI.COMM_SELF, progress=False)


@pytest.mark.slow
@pytest.mark.skip_in_parallel
def test_killed_run_restarts_and_ends_with_the_same_data(tmp_path):
    cfg = dict(CONFIG, microstructure=dict(CONFIG["microstructure"], count=12), fields_resolution=0)
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "neuroscale_couple.cli", "generate", str(tmp_path / "gen.yaml"),
           "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # kill once some units are saved
        try:
            with h5py.File(out, "r", libver="latest", swmr=True) as h5:
                if h5["samples/done"][:].sum() >= 6:
                    break
        except (OSError, KeyError):
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with h5py.File(out, "r", libver="latest", swmr=True) as h5:
        saved = int(h5["samples/done"][:].sum())
    assert 0 < saved < 36, "the kill should land mid-run"
    assert subprocess.run(cmd).returncode == 0
    generate(cfg, tmp_path / "clean.h5", MPI.COMM_SELF, progress=False)
    killed, clean = load_rve_dataset(out), load_rve_dataset(tmp_path / "clean.h5")
    np.testing.assert_allclose(killed["samples/A"], clean["samples/A"], rtol=0, atol=1e-12)


@pytest.mark.skip_in_parallel
def test_existing_file_with_another_config_is_refused(tmp_path):
    out = tmp_path / "d.h5"
    small = dict(CONFIG, microstructure=dict(CONFIG["microstructure"], count=1))
    generate(small, out, MPI.COMM_SELF, progress=False)
    with pytest.raises(InputError, match="different config"):
        generate(dict(small, law="linear"), out, MPI.COMM_SELF, progress=False)


@pytest.mark.skip_in_parallel
def test_cli_rve_json(tmp_path, capsys):
    cfg = {"microstructure": {"kind": "single_fibre", "volume_fraction": 0.3}, "law": "linear",
           "matrix": {"E": 3.0, "nu": 0.35}, "fibre": {"E": 70.0, "nu": 0.2},
           "F": [[1.01, 0.0], [0.0, 1.0]], "mesh": {"size": 0.05}}
    (tmp_path / "rve.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["rve", str(tmp_path / "rve.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"stress", "tangent", "dofs", "newton_iterations", "time_s"}
    A = np.array(out["tangent"])
    # small strain: P̄ = A : (F − I) for the linear law
    np.testing.assert_allclose(out["stress"], np.einsum("ijkl,kl->ij", A, np.diag([0.01, 0])),
                               atol=1e-12)


@pytest.mark.skip_in_parallel
@pytest.mark.parametrize("cfg, match", [
    ({"microstructure": {"kind": "single_fibre", "volume_fraction": 0.3}}, "key F"),
    ({"microstructure": {"kind": "single_fibre", "volume_fraction": 0.3}, "F": [[0, 0], [0, 0]]},
     "det F"),
    ({"microstructure": {"kind": "single_fibre", "volume_fraction": 0.3},
      "matrix": {"E": -3.0, "nu": 0.3}, "F": [[1, 0], [0, 1]]}, "matrix: Young's modulus"),
    ({"microstructure": {"kind": "single_fibre", "volume_fraction": 0.3}, "law": "plastic",
      "F": [[1, 0], [0, 1]]}, "law='plastic'"),
    ({"microstructure": {"kind": "single_fibre", "volume_fraction": 0.3},
      "mesh": {"sise": 0.05}, "F": [[1, 0], [0, 1]]},
     "unknown key 'sise' in mesh: did you mean 'size'?"),
])
def test_cli_bad_config_exits_with_a_clear_message(tmp_path, capsys, cfg, match):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["rve", str(tmp_path / "bad.yaml")]) == 2
    assert match in capsys.readouterr().err
