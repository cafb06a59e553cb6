# cmpagl: the two commands of a fresh clone are `make book` and `make test` (see README.md).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
EXECUTED := $(patsubst notebooks/%,executed/%,$(NOTEBOOKS))

# Offline by default: nothing is fetched from a model hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PYTHONHASHSEED := 0

.PHONY: book test setup data notebooks lab lint clean ablations
.DELETE_ON_ERROR:

## book: set up, generate the default data, execute every notebook, build the HTML book (-W)
book: notebooks
	$(VENV)/bin/jupyter-book build . --builder html -W --keep-going
	@echo "book: open _build/html/index.html"

## test: set up, then run the test suite
test: setup
	$(PY) -m pytest

## setup: the virtual environment with the pinned requirements and the package (editable)
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "cmpagl needs Python 3.11, found " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

## data: the embedded synthetic dataset (idempotent; ~1 min the first time)
data: setup
	$(VENV)/bin/cmpagl data synthetic data/synthetic

## notebooks: execute every notebook with papermill into executed/ (what the book renders)
notebooks: data $(EXECUTED)

executed/%.ipynb: notebooks/%.ipynb $(VENV)/.installed $(wildcard cmpagl/*.py cmpagl/*/*.py cmpagl/*/*/*.py)
	@mkdir -p executed
	$(VENV)/bin/papermill --kernel python3 --cwd notebooks $< $@

# The seeds tables are read from results/ (written by experiments/seeds_table.py), not recomputed.
executed/04_seed_tables.ipynb: $(wildcard results/*/summary.json)

# In this order: the UCM study takes each system's settings from the tuning sweep's records.
SWEEPS := experiments/sweeps/ucm_tuning.yaml experiments/sweeps/ucm_ablations.yaml \
	experiments/sweeps/synthetic_arch.yaml

## ablations: run every committed sweep spec (experiments/sweeps/*.yaml); hours on 2 CPU cores.
## Resumable: run it again after an interruption. Records go to results/<sweep>/, runs to runs/.
ablations: data
	$(VENV)/bin/cmpagl sweep $(SWEEPS)

## lab: open the notebooks in JupyterLab
lab: setup
	$(VENV)/bin/jupyter lab notebooks/

lint: setup
	$(VENV)/bin/ruff check cmpagl tests notebooks

clean:
	rm -rf _build executed
