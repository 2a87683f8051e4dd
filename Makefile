# NeuroScale: `make demo` runs the main job, `make test` the test suites. Both create .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
MPIRUN := $(VENV)/bin/mpiexec
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
NP     ?= 2
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: venv demo test test-serial test-mpi lint bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || "$$(scripts/find-python)" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all]"
	@rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) examples/rve_demo.py --out out/rve_demo

test: test-serial test-mpi

test-serial: $(STAMP)
	$(PYTEST) tests -q

test-mpi: $(STAMP)
	$(MPIRUN) -n $(NP) $(PY) -m pytest -p no:cacheprovider tests -q -m mpi

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/rve_solve.py

clean:
	rm -rf out .pytest_cache .ruff_cache
