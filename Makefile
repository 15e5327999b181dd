# Quick start:  make demo   then   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test test-slow bench cluster-demo venv clean

venv: $(STAMP)

# keras-hub for the zoo's keras-hub scenarios, without its declared dependencies: its
# tensorflow-text requirement would install `tensorflow` over `tensorflow-cpu` (same version,
# other build), and backbones/classifiers do not need it; tokenizers is what it imports.
KERAS_HUB := keras-hub==0.32.0 tokenizers==0.23.3

# Re-install whenever pyproject.toml (or this recipe) changes; pip is quick when nothing changed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[cpu,test]'
	$(BIN)/python -m pip install --quiet --no-deps $(KERAS_HUB)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/harness run scenarios/sweeps/quickstart.yaml --out runs/quickstart

# The multi-host rig (root, Linux network namespaces): a Ray head and three worker hosts that
# share no disk, S3 on the bridge; runs tests/multihost/matrix.yaml across them, prints the
# matrix with each cell's host, tears everything down. See README "Running on a Ray cluster".
cluster-demo: $(STAMP)
	$(BIN)/python tests/multihost/rig.py demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs .harness .pytest_cache
