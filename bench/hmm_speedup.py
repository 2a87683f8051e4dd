"""HMM speed-up: examples/hmm_atomistic.py with the Cauchy–Born crystal at every point
(`--reference`) and with the crystal operator (EMT Cu, 0 K); then the calibration of the
finite-temperature operator's aleatoric Σ against the measured MD noise.

See bench/coupled_speedup.py for the runs and the record (``bench/results/hmm_speedup.json``);
the record gains ``md_noise``: on held-out 300 K samples (``hmm_cu_thermal.test.yaml``, made with
the Cauchy–Born solver if missing) the predicted aleatoric standard deviation of each stress
component against the statistical error of its MD average. ``--skip-runs`` measures only that.
``--temperature T`` runs the example at T (Langevin MD fine solves, the thermal operator); give
it its own ``--name`` and ``--out``, e.g. ``--temperature 300 --mesh-size 0.3 --steps 2
--stretch 0.04 --rtol 0.05 --name hmm_speedup_300K --out out/bench_hmm_300K_s04``, and its 0 K
twin without ``--temperature`` (``--name hmm_speedup_0K_small --out out/bench_hmm_0K_small``).
Targets (issue 5): total ≥ 100× with EMT at 0 K, more at finite temperature, displacement
error ≤ 1 %.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from coupled_speedup import RESULTS, main

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"


def md_noise(out: Path) -> dict:
    """Predicted aleatoric σ of the thermal model vs measured MD standard errors (GPa)."""
    import torch

    from neuroscale_couple.operators.base import load_operator
    from neuroscale_couple.store import load_rve_dataset
    from neuroscale_couple.training import TrainingData

    test = out / "thermal_test.h5"
    if not test.exists():
        subprocess.run([str(Path(sys.executable).parent / "neuroscale"), "generate",
                        str(MODELS / "hmm_cu_thermal.test.yaml"), "--out", str(test)],
                       check=True)
    model = load_operator(MODELS / "hmm_cu_thermal.pt").double().eval()
    data = TrainingData.from_h5(test, None, torch.float64)
    stderr = load_rve_dataset(test)["samples/stress_stderr"].reshape(-1, 4)
    hot = (data.images[data.micro_index, 0] > 0).numpy()
    with torch.no_grad():
        z = model.encode(data.images)[0][data.micro_index]
        r = model.members_response(z, data.F, tangent=False)
        alea = (model.sigma_ref**2 * (r["chol"] @ r["chol"].transpose(-1, -2)).mean(0)).numpy()
        mean = r["stress"].mean(0).reshape(-1, 4).numpy()
    std = np.sqrt(np.diagonal(alea, axis1=-2, axis2=-1))
    ratio = std[hot] / stderr[hot]
    resid = (data.P.reshape(-1, 4).numpy() - mean)[hot]
    return {
        "samples_300K": int(hot.sum()), "samples_0K": int((~hot).sum()),
        "measured_stderr_median_gpa": float(np.median(stderr[hot])),
        "predicted_std_median_gpa": float(np.median(std[hot])),
        "ratio_median": float(np.median(ratio)),
        "ratio_quartiles": [float(q) for q in np.quantile(ratio, [0.25, 0.75])],
        "ratio_median_per_component": [float(v) for v in np.median(ratio, axis=0)],
        "residual_rms_gpa": float(np.sqrt((resid**2).mean())),
        "predicted_std_median_0K_gpa": float(np.median(std[~hot])),
    }


if __name__ == "__main__":
    skip = "--skip-runs" in sys.argv
    if skip:
        sys.argv.remove("--skip-runs")
        path = RESULTS / "hmm_speedup.json"
        record = json.loads(path.read_text()) if path.exists() else {}
    else:
        record = main("hmm_atomistic", "hmm_speedup", "HMM", __doc__.splitlines()[0],
                      mesh_size="0.15", stretch=0.04, rtol=0.03, options={"--temperature": float})
    out = ROOT / "out" / "bench_hmm_atomistic"
    out.mkdir(parents=True, exist_ok=True)
    record["md_noise"] = noise = md_noise(out)
    (RESULTS / f"{record.get('name', 'hmm_speedup')}.json").write_text(json.dumps(record, indent=1))
    print(f"MD noise at 300 K ({noise['samples_300K']} held-out samples): measured standard error "
          f"{noise['measured_stderr_median_gpa']:.4f} GPa, predicted aleatoric σ "
          f"{noise['predicted_std_median_gpa']:.4f} GPa (median ratio {noise['ratio_median']:.2f}"
          f", quartiles {noise['ratio_quartiles'][0]:.2f}–{noise['ratio_quartiles'][1]:.2f}); "
          f"at 0 K σ {noise['predicted_std_median_0K_gpa']:.2e} GPa")
