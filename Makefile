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
# Bytecode: each module is compiled on its first import and cached (in .venv and here), which
# costs a fraction of compiling every installed file at set-up (the book and the tests import
# about a quarter of them). With PYTHONDONTWRITEBYTECODE set, every process would compile its
# imports anew (torch, timm and transformers: about 30 s a process), so make's commands run
# without it.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: book test setup data notebooks lab lint clean ablations bench
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
	@# no compiling of all ~18,000 installed files (pip would, on one core): see the bytecode note
	$(PY) -m pip install --quiet --no-compile -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

## data: the embedded synthetic dataset (idempotent; ~30 s the first time on 2 cores)
data: setup
	$(VENV)/bin/cmpagl data synthetic data/synthetic

## notebooks: execute every notebook with papermill into executed/ (what the book renders)
## The training chapter runs alone (it keeps both cores busy); the others BOOK_JOBS at a time:
## most of their time is one core's (imports, plotting), so two at a time take about half.
BOOK_JOBS ?= 2
notebooks: data
	@$(MAKE) --no-print-directory --jobs=$(BOOK_JOBS) $(EXECUTED)

executed/%.ipynb: notebooks/%.ipynb $(VENV)/.installed $(wildcard cmpagl/*.py cmpagl/*/*.py cmpagl/*/*/*.py)
	@mkdir -p executed
	$(VENV)/bin/papermill --engine cmpagl --kernel python3 --cwd notebooks $< $@ $(PARAMS)

# The book's model. The training chapter (05) trains it into runs/book_model on the real UCM
# subset where the shared data is (CMPAGL_DATA, default ../shared/data), else on the synthetic
# default; executed again it finds the finished run and only reads it back. The chapters that
# show a trained model load it, so they run after the training chapter.
CMPAGL_DATA ?= ../shared/data
BOOK_MODEL := runs/book_model
BOOK_CONFIG := $(if $(wildcard $(CMPAGL_DATA)/ucm_captions_subset16/dataset.json),configs/ucm_book.yaml,configs/synthetic_tiny.yaml)

# A changed book config (or the config it is based on) re-executes the training chapter and the
# chapters that show the model; a runs/book_model of the old config is refused, never overwritten.
executed/05_train.ipynb: notebooks/05_train.ipynb $(VENV)/.installed $(BOOK_CONFIG) configs/ucm_cpu.yaml \
		$(wildcard cmpagl/*.py cmpagl/*/*.py cmpagl/*/*/*.py)
	@mkdir -p executed
	@echo "the book's model: $(BOOK_CONFIG) -> $(BOOK_MODEL) (trained once, then reused)"
	$(VENV)/bin/papermill --engine cmpagl --kernel python3 --cwd notebooks $< $@ \
		-p config $(BOOK_CONFIG) -p max_steps 0 -p log_every 10 -p output_dir $(BOOK_MODEL)

executed/02_gswin_and_model.ipynb executed/03_train_and_retrieve.ipynb \
executed/06_text_fusion.ipynb executed/07_losses.ipynb: executed/05_train.ipynb
# The others wait for it too (order only: a retrained model does not re-execute them).
$(filter-out executed/05_train.ipynb,$(EXECUTED)): | executed/05_train.ipynb

# The instructor's page reads every other chapter's run time, so it runs last; it says how many
# chapters ran at once (their run times include that sharing of the cores).
executed/08_course.ipynb: $(filter-out executed/08_course.ipynb,$(EXECUTED))
executed/08_course.ipynb: private PARAMS = -p chapters_at_once $(BOOK_JOBS)

# The speed appendix reads the benchmark records (make bench writes them).
executed/09_benchmarks.ipynb: $(wildcard results/bench/*.json)

# The ablation tables are read from results/ (the sweeps' records), not recomputed; the
# reproduction chapter shows each sweep's progress and the decisions' validation evidence.
executed/04_seed_tables.ipynb: $(wildcard results/*/summary.json results/*/*/seed*.json)
executed/10_reproduce.ipynb: $(wildcard results/*/*/seed*.json results/decisions/*.json)

# In this order: the UCM study takes each system's settings from the tuning sweep's records.
SWEEPS := experiments/sweeps/ucm_tuning.yaml experiments/sweeps/ucm_ablations.yaml \
	experiments/sweeps/synthetic_arch.yaml

## ablations: run every committed sweep spec (experiments/sweeps/*.yaml); hours on 2 CPU cores.
## Resumable: run it again after an interruption. Records go to results/<sweep>/, runs to runs/.
## SWEEP_FLAGS=--commit commits each run's record as it lands (see the README).
SWEEP_FLAGS ?=
ablations: data
	$(VENV)/bin/cmpagl sweep $(SWEEP_FLAGS) $(SWEEPS)

## bench: the benchmarks, each writing its record (machine, commit, date) to results/bench/:
## SMR and GaLR against their dense references side by side, evaluation time against test-set
## size with each stage's cost model fitted, training samples/s and peak memory against batch
## size (tiny config), one Gswin block against timm's Swin block, sweep runners side by side
## (1 with 2 threads, 1 with 1, 2 with 1 each). 132 s on 2 idle cores, and 4 min for the runners.
BENCH := results/bench
# torch's profiler (kineto) logs a spurious "gpuGetDeviceCount failed" ERROR and USDT start/stop
# lines on a machine without a GPU; level 6 keeps them out (make bench KINETO_LOG_LEVEL=0: all).
bench: export KINETO_LOG_LEVEL ?= 6
bench: setup
	@start=$$(date +%s); \
	$(PY) benchmarks/rerank_speed.py --out $(BENCH)/rerank_speed_cpu.json && \
	$(PY) benchmarks/eval_scaling.py --out $(BENCH)/eval_scaling_cpu.json && \
	$(PY) benchmarks/train_scaling.py --config configs/synthetic_tiny.yaml \
		--out $(BENCH)/train_scaling_tiny_cpu.json && \
	$(PY) benchmarks/gswin_block.py --repeats 5 --threads 1 --out $(BENCH)/gswin_block_cpu.json && \
	$(PY) benchmarks/runner_scaling.py --config configs/synthetic_tiny.yaml \
		--out $(BENCH)/runner_scaling_tiny_cpu.json && \
	echo "bench: $$(( $$(date +%s) - start )) s; records in $(BENCH)/"

## lab: open the notebooks in JupyterLab
lab: setup
	$(VENV)/bin/jupyter lab notebooks/

lint: setup
	$(VENV)/bin/ruff check cmpagl tests notebooks

clean:
	rm -rf _build executed
