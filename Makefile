# `make demo` and `make test` work on a fresh clone: each creates .venv if missing, installs
# torch==2.13.0 first (a newer torch pulls GBs of CUDA packages), then symzoo with its dev extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/symzoo run studies/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup --timeout=600 -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q -m "not slow"

clean:
	rm -rf $(VENV) zoo-store symzoo.db mlruns mlartifacts runs
