# Two entry points, both from a fresh clone:
#   make demo   create .venv, install Tessera, train the Shakespeare demo, sample from it
#   make test   create .venv, install Tessera with test extras, run the whole suite
# torch is pinned through constraints.txt to the CPU wheel on the build machines'
# local disk; pyproject.toml keeps the wide range users need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=
DEMO_RUN ?= runs/demo

.PHONY: demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files: reinstall only when the package metadata or the pins change.
$(VENV)/.core-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.core-installed
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,mlflow]"
	touch $@

demo: $(VENV)/.core-installed
	$(BIN)/tessera train recipes/shakespeare.yaml --run-dir $(DEMO_RUN)
	$(BIN)/tessera sample $(DEMO_RUN) --prompt "ROMEO:" --tokens 400

# pytest exits 5 when it collects nothing; make treats that as the failure it is.
test: $(VENV)/.test-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.test-installed
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
