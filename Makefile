# NeuroScale: `make demo` runs the main job, `make test` the test suites. Both create .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
MPIRUN := $(VENV)/bin/mpiexec
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
NP     ?= 2
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: system-packages capi venv demo demo-hmm test test-fast test-serial test-mpi lint docs bench baselines-data bench-baselines bench-ablations bench-scaling model model-3d fast-model family-model hmm-model clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || "$$(scripts/find-python)" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all]"
	@# DOLFINx needs the venv's MPICH loaded first: this lets a script start with `import dolfinx`
	cp scripts/neuroscale-libmpi.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	@# the C ABI's library (include/neuroscale.h), embedding this venv's python
	$(PY) -m neuroscale_couple.capi.build --out build/capi
	@rm -f $(VENV)/.installed-* && touch $@

# System packages the venv cannot hold: gfortran, for the Fortran hosts of the C ABI (.ci/run
# calls this first; root or sudo).
system-packages:
	@command -v gfortran >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO apt-get install -y gfortran; }

# The C ABI: build/capi/libneuroscale.so (include/neuroscale.h; docs/c_api.md), built again.
# `make venv` builds it; the tests rebuild it when missing or stale, and build the C and Fortran
# host demos next to it.
capi: $(STAMP)
	$(PY) -m neuroscale_couple.capi.build --out build/capi

demo: $(STAMP)
	$(PY) examples/rve_demo.py --out out/rve_demo
	$(MPIRUN) -n $(NP) $(PY) examples/fe2_composite.py --out out/fe2_composite

demo-hmm: $(STAMP)
	$(MPIRUN) -n $(NP) $(PY) examples/hmm_atomistic.py --out out/hmm_atomistic

test: test-serial test-mpi

# The inner loop: unit tests and light integration tests (no `slow` marker), a few minutes.
test-fast: $(STAMP)
	$(PYTEST) tests -q -m "not slow"

test-serial: $(STAMP)
	$(PYTEST) tests -q

test-mpi: $(STAMP)
	$(MPIRUN) -n $(NP) $(PY) -m pytest -p no:cacheprovider tests -q -m mpi

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The user's guide as HTML in out/site (tables of docs/benchmarks.md made from bench/results).
docs: $(STAMP)
	$(PY) scripts/benchmarks_doc.py
	$(VENV)/bin/mkdocs build --strict --site-dir out/site

bench: $(STAMP)
	$(PY) bench/rve_solve.py
	$(PY) bench/rve_live.py
	$(PY) bench/operator.py
	$(PY) bench/fe2_speedup.py --np $(NP)
	$(PY) bench/encode.py
	$(PY) bench/hmm_speedup.py --np $(NP)

# Baselines (FNO, EquiNO-, PIPNO-, PPI-NO-style, descriptor MLP) against SANO at the same
# CPU-second budget (bench/baselines.py; data ≈ 20 min, the bench ≈ 35 min on 2 shared cores),
# and the ablations of SANO over 3 seeds on the same data (bench/ablations.py, ≈ 50 min). The
# FNO needs the optional neuraloperator, installed here into out/pydeps (the `baselines` extra
# elsewhere).
BASELINE_DATA = --train out/baselines.train.h5 --calibration out/baselines.calibration.h5 \
  --test out/baselines.test.h5 --budget-cpu-s 300
baselines-data: $(STAMP)
	for set in train calibration test; do \
	  $(MPIRUN) -n $(NP) $(VENV)/bin/neuroscale generate bench/configs/baselines.$$set.yaml \
	    --out out/baselines.$$set.h5 || exit 1; \
	done
bench-baselines: baselines-data
	$(PY) -c "import neuralop" 2>/dev/null || PYTHONPATH=out/pydeps $(PY) -c "import neuralop" \
	  2>/dev/null || $(PY) -m pip install -q --target out/pydeps --no-deps neuraloperator==2.0.0 \
	  tensorly tensorly-torch opt-einsum requests urllib3 idna certifi
	PYTHONPATH=$(CURDIR):$(CURDIR)/out/pydeps $(PY) bench/baselines.py $(BASELINE_DATA) --parallel $(NP)
bench-ablations: baselines-data
	PYTHONPATH=$(CURDIR) $(PY) bench/ablations.py $(BASELINE_DATA) --seeds 0 1 2 --parallel $(NP)

# Scaling with macro size (to ~1e5 points) and ranks (1-8), and the model for 64 and 1024 ranks:
# hours on 2 cores; resumable (finished runs in out/bench_scaling are reused).
bench-scaling: $(STAMP)
	$(PY) bench/scaling.py --model examples/models/fe2_composite_fast.pt

# Regenerate the shipped operator from scratch with the project's own RVE solver and trainer
# (data sets ≈ 40 min, training ≈ 75 min on 2 cores; a recipe's optional second stage
# $(MODEL).finetune.yaml goes on from the first stage's checkpoint), calibrated group-wise
# (per cell family and load band) on $(MODEL).calibration_groups.yaml. Rerun after a kill: data
# sets resume where they stopped, the killed training stage at its last epoch (each stage has its
# work folder in $(MODEL_DATA); a finished first stage is trained again, and its second stage
# resumes if that gives the same weights, as a rerun on the same machine does).
MODEL      ?= examples/models/fe2_composite
MODEL_DATA ?= out/model
model: $(STAMP)
	mkdir -p $(MODEL_DATA)
	for set in data calibration calibration_groups test ood; do \
	  $(MPIRUN) -n $(NP) $(VENV)/bin/neuroscale generate $(MODEL).$$set.yaml --out $(MODEL_DATA)/$$set.h5 || exit 1; \
	done
	$(VENV)/bin/neuroscale train $(MODEL).train.yaml --data $(MODEL_DATA)/data.h5 --out $(MODEL).pt \
	  --work $(MODEL_DATA)/stage1.train
	if [ -f $(MODEL).finetune.yaml ]; then $(VENV)/bin/neuroscale train $(MODEL).finetune.yaml \
	  --init $(MODEL).pt --data $(MODEL_DATA)/data.h5 --out $(MODEL).pt \
	  --work $(MODEL_DATA)/finetune.train || exit 1; fi
	$(VENV)/bin/neuroscale calibrate --model $(MODEL).pt --data $(MODEL_DATA)/calibration_groups.h5 --groups
	$(VENV)/bin/neuroscale subset $(MODEL_DATA)/data.h5 --micro 96 --out $(MODEL).anchor.h5
	$(VENV)/bin/neuroscale subset $(MODEL_DATA)/calibration_groups.h5 --micro 96 --out $(MODEL).anchor_calibration.h5
	$(VENV)/bin/neuroscale evaluate --model $(MODEL).pt --data $(MODEL_DATA)/test.h5 \
	  --ood $(MODEL_DATA)/ood.h5 --plot $(MODEL).reliability.png --card $(MODEL).json

# Data sets $(1).{data,calibration,test}.yaml → $(3)/*.h5, training $(1).train.yaml → $(2).pt
# (work folder $(3)/model.train; then $(1).finetune.yaml where it exists, a second stage from the
# first's weights), calibration (flags $(4)): the recipe shared by `make family-model` and
# `make model-3d` (each resumable: finished data sets are kept, a killed training resumes).
define data_train_calibrate
	mkdir -p $(3) $$(dirname $(2))
	for set in data calibration test; do \
	  $(MPIRUN) -n $(NP) $(VENV)/bin/neuroscale generate $(1).$$set.yaml --out $(3)/$$set.h5 || exit 1; \
	done
	$(VENV)/bin/neuroscale train $(1).train.yaml --data $(3)/data.h5 --out $(2).pt --work $(3)/model.train
	if [ -f $(1).finetune.yaml ]; then $(VENV)/bin/neuroscale train $(1).finetune.yaml \
	  --init $(2).pt --data $(3)/data.h5 --out $(2).pt --work $(3)/finetune.train || exit 1; fi
	$(VENV)/bin/neuroscale calibrate --model $(2).pt --data $(3)/calibration.h5 $(4)
endef

# The 3D operator: SANO on voxel images (16³) of 3D sphere cells, F̄ 3×3, trained on data of the
# project's 3D RVE solver (P1 tetrahedra, h = 0.1; docs/rve3d.md). Measured on 2 shared cores:
# data sets 18 + 2.5 + 2 min on 2 ranks, training 7 min.
MODEL3D      ?= examples/models/fe2_composite_3d
MODEL3D_DATA ?= out/model3d
model-3d: $(STAMP)
	$(call data_train_calibrate,$(MODEL3D),$(MODEL3D),$(MODEL3D_DATA))
	$(VENV)/bin/neuroscale evaluate --model $(MODEL3D).pt --data $(MODEL3D_DATA)/test.h5 \
	  --plot $(MODEL3D).reliability.png --card $(MODEL3D).json

# The shipped distilled encoder: a student of $(MODEL).pt trained on cell images alone
# (`neuroscale distill`, no fine solves), calibrated on the teacher's calibration set and tested
# on its test set (made as in `make model`; a finished set is kept), then its aleatoric network
# replaced by a head quadratic in the strain (`neuroscale distill-covariance`, ≈ 1 min) and
# calibrated afresh. ≈ 30 min on 2 cores; a killed run resumes from $(MODEL_DATA)/fast.distill
# and $(MODEL_DATA)/fast.covariance.
FAST ?= $(MODEL)_fast
fast-model: $(STAMP)
	mkdir -p $(MODEL_DATA)
	for set in calibration test; do \
	  $(MPIRUN) -n $(NP) $(VENV)/bin/neuroscale generate $(MODEL).$$set.yaml --out $(MODEL_DATA)/$$set.h5 || exit 1; \
	done
	$(VENV)/bin/neuroscale distill --model $(MODEL).pt --out $(FAST).pt --cells 10000 --epochs 40 \
	  --work $(MODEL_DATA)/fast.distill --calibration $(MODEL_DATA)/calibration.h5 \
	  --test $(MODEL_DATA)/test.h5
	@# the aleatoric network made quadratic in the strain: a cheaper bound in the loop
	$(VENV)/bin/neuroscale distill-covariance --model $(FAST).pt --out $(FAST).pt --cells 8000 \
	  --epochs 150 --work $(MODEL_DATA)/fast.covariance \
	  --calibration $(MODEL_DATA)/calibration.h5 --test $(MODEL_DATA)/test.h5

# The family operator: phases drawn per cell over ranges (contrast 1–100, ν 0.2–0.45) are its
# inputs, so phases inside them need no training (neuroscale_couple.phases). FAMILY names the
# recipe's configs ($(FAMILY).{data,calibration,test,train,finetune}.yaml): examples/configs/family
# (the full size, measured on 2 cores: ≈ 1 h of data sets, 4.1 h + 32 min of training) or
# family_smoke (≈ 15 s). Calibrated per cell family, load band and contrast band (--groups).
# Where the fixed model's test set $(MODEL_DATA)/test.h5 exists, the family model is evaluated on
# it too ($(FAMILY_OUT).fixed.json): the issue asks ≤ 1.2× the fixed model's error there.
FAMILY      ?= examples/configs/family
FAMILY_OUT  ?= examples/models/fe2_family
FAMILY_DATA ?= out/family_model
family-model: $(STAMP)
	$(call data_train_calibrate,$(FAMILY),$(FAMILY_OUT),$(FAMILY_DATA),--groups)
	$(VENV)/bin/neuroscale evaluate --model $(FAMILY_OUT).pt --data $(FAMILY_DATA)/test.h5 \
	  --card $(FAMILY_OUT).json
	if [ -f $(MODEL_DATA)/test.h5 ]; then $(VENV)/bin/neuroscale evaluate --model $(FAMILY_OUT).pt \
	  --data $(MODEL_DATA)/test.h5 --json > $(FAMILY_OUT).fixed.json || exit 1; fi

# Regenerate the shipped crystal operator (EMT Cu with a vacancy) with the Cauchy–Born solver.
HMM := examples/models/hmm_cu
hmm-model: $(STAMP)
	mkdir -p out/hmm_model
	for set in data calibration; do \
	  $(MPIRUN) -n 1 $(VENV)/bin/neuroscale generate $(HMM).$$set.yaml --out out/hmm_model/$$set.h5 || exit 1; \
	done
	$(VENV)/bin/neuroscale train $(HMM).train.yaml --data out/hmm_model/data.h5 --out $(HMM).pt \
	  --work out/hmm_model/model.train
	$(VENV)/bin/neuroscale calibrate --model $(HMM).pt --data out/hmm_model/calibration.h5
	$(VENV)/bin/neuroscale subset out/hmm_model/data.h5 --micro 1 --out $(HMM).anchor.h5
	$(VENV)/bin/neuroscale subset out/hmm_model/calibration.h5 --micro 1 --out $(HMM).anchor_calibration.h5
	$(MPIRUN) -n 2 $(VENV)/bin/neuroscale generate $(HMM)_thermal.data.yaml --out out/hmm_model/thermal.h5
	$(MPIRUN) -n 2 $(VENV)/bin/neuroscale generate $(HMM)_thermal.calibration.yaml --out out/hmm_model/thermal_calibration.h5
	$(VENV)/bin/neuroscale train $(HMM)_thermal.train.yaml --data out/hmm_model/thermal.h5 --out $(HMM)_thermal.pt \
	  --work out/hmm_model/thermal.train
	$(VENV)/bin/neuroscale calibrate --model $(HMM)_thermal.pt --data out/hmm_model/thermal_calibration.h5
	$(VENV)/bin/neuroscale subset out/hmm_model/thermal.h5 --micro 2 --out $(HMM)_thermal.anchor.h5
	$(VENV)/bin/neuroscale subset out/hmm_model/thermal_calibration.h5 --micro 2 --out $(HMM)_thermal.anchor_calibration.h5

clean:
	rm -rf out .pytest_cache .ruff_cache
