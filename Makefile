# datamodels_ml: every stage of the workflow is a target; `make help` lists them.
# The defaults run the built-in digits example on this machine's CPU cores.

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
# The CPU wheel by default; GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"
TORCH_SPEC  ?= torch==2.13.0
STAMP       := $(VENV)/.setup-done
DEB_PKGS    := libopencv-dev libturbojpeg0-dev pkg-config

N       ?= 1500
GPUS    ?= 0
JOBS    ?= 0
SPEC    ?= configs/digits_spec.json
MAIN    ?= datamodels_ml.examples.digits
CONFIG  ?= configs/reg.yaml
DEMO    ?= configs/demo.yaml
FORMAT  ?= npz
ARGS    ?=
# Every path of a run comes from one name: data/<NAME>/store, .../reg_data.beton, .../reg_results,
# .../evaluate. STORE elsewhere (STORE=/scratch/me/store) moves the others beside it.
NAME    ?= digits
STORE   ?= data/$(NAME)/store
DATA     = $(patsubst %/,%,$(dir $(STORE)))
BETON   ?= $(DATA)/reg_data.beton
RESULTS ?= $(DATA)/reg_results
EVAL    ?= $(DATA)/evaluate
# Scaling out (README "Scaling out"): a running Dask scheduler, or a dask-jobqueue cluster YAML
SCHEDULER ?=
CLUSTER   ?=
# make ui: the port of the UI on the local store (make server's is SERVER_PORT)
UI_PORT ?= 5000
# make server: an MLflow tracking server for several users and machines
BACKEND_STORE_URI ?= sqlite:///mlflow-server.db
ARTIFACTS_DESTINATION ?= ./mlartifacts
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5000
TEST_JOBS ?= 0

DM := $(PY) -m datamodels_ml

.PHONY: help setup test test-fast demo init train status write_dataset regress evaluate export_lds budget compare bench bench-regression bench-paper bench-scale gpu-check ui ui-setup ui-check server lint clean distclean

help: ## list the targets and the variables they take (colours only on a terminal)
	@if [ -t 1 ]; then on='\033[36m'; off='\033[0m'; else on=; off=; fi; \
	echo "usage: make <target> [VARIABLE=value ...]"; echo; echo "targets:"; \
	grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -v on="$$on" -v off="$$off" 'BEGIN {FS = ":.*?## "}; {printf "  %s%-14s%s %s\n", on, $$1, off, $$2}'; \
	echo; echo "variables (now):"; \
	printf '  %-36s %s\n' \
	  "N=$(N)" "models to train (train, demo uses DEMO's n)" \
	  "GPUS=$(GPUS)" "GPUs for train (0: CPU slots)" \
	  "JOBS=$(JOBS)" "slots for train (0: one per core, or per GPU)" \
	  "SPEC=$(SPEC)" "spec of the store (init, train)" \
	  "MAIN=$(MAIN)" "training script module or .py file (train)" \
	  "CONFIG=$(CONFIG)" "regression config (regress)" \
	  "DEMO=$(DEMO)" "demo config (demo)" \
	  "NAME=$(NAME)" "names the data folder: data/NAME/..." \
	  "STORE=$(STORE)" "the store (init, train, status, write_dataset, evaluate, demo)" \
	  "BETON=$(BETON)" "FFCV file beside the store (write_dataset, regress, demo)" \
	  "RESULTS=$(RESULTS)" "regression output beside the store (regress, evaluate, demo)" \
	  "EVAL=$(EVAL)" "evaluate's CSV and plots beside the store (evaluate, demo)" \
	  "FORMAT=$(FORMAT)" "layout of export_lds's ground truth: npz, trak, kronfluence, dattri" \
	  "ARGS=$(ARGS)" "more key=value for the command (args.NAME=VALUE reach main)" \
	  "SCHEDULER=$(SCHEDULER)" "train on a running Dask scheduler (tcp://HOST:8786)" \
	  "CLUSTER=$(CLUSTER)" "train on a dask-jobqueue cluster YAML" \
	  "UI_PORT=$(UI_PORT)" "port of make ui" \
	  "BACKEND_STORE_URI=$(BACKEND_STORE_URI)" "make server's store" \
	  "ARTIFACTS_DESTINATION=$(ARTIFACTS_DESTINATION)" "make server's artifacts" \
	  "SERVER_HOST=$(SERVER_HOST)" "make server's address" \
	  "SERVER_PORT=$(SERVER_PORT)" "make server's port" \
	  "TEST_JOBS=$(TEST_JOBS)" "pytest workers of make test (0: one per CPU allotted, at most 4)" \
	  "TORCH_SPEC=$(TORCH_SPEC)" "torch for make setup (a CUDA build: add --index-url URL)" \
	  "VENV=$(VENV)" "the virtual environment" \
	  "PYTHON_BOOT=$(PYTHON_BOOT)" "the python that creates VENV"

setup: $(STAMP) ## create .venv with every dependency (FFCV's system headers too, on Debian as root)

$(STAMP): pyproject.toml Makefile
	@if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing FFCV's build requirements: $(DEB_PKGS)"; \
	    apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $(DEB_PKGS) >/dev/null || exit 1; \
	  else \
	    echo "error: FFCV needs OpenCV and libjpeg-turbo headers and pkg-config ($(DEB_PKGS) on Debian)."; \
	    echo "       Install them as root, or use the conda environment instead: conda env create -f conda.yaml"; \
	    exit 1; \
	  fi; \
	fi
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	@$(PY) -c "import torch, ffcv, mlflow, omegaconf, joblib, sklearn; from importlib.metadata import version as v; print('setup ok: torch', torch.__version__, '| ffcv', v('ffcv'), '| mlflow', mlflow.__version__)"
	@touch $(STAMP)

# pytest workers (pytest-xdist), each taking whole test files: the module fixtures are built once
PYTEST = $(PY) -m pytest -q -p no:cacheprovider --dist loadfile -n $$($(PY) -c 'import sys; \
  from datamodels_ml.cpus import allotment; n = int(sys.argv[1]); print(n if n > 0 else min(4, allotment()))' $(TEST_JOBS))

test: setup ## run the test suite (what CI runs) on TEST_JOBS pytest workers
	$(PYTEST)

test-fast: setup ## the tests not marked slow, gpu or ui (a quick check while editing)
	$(PYTEST) -m "not slow and not gpu and not ui"

demo: setup ## the whole workflow on the digits example: train, write_dataset, regress, evaluate
	$(DM) demo config=$(DEMO) store=$(STORE) beton=$(BETON) results=$(RESULTS) evaluate_out=$(EVAL) $(ARGS)

init: setup ## create the store from the spec (STORE, SPEC)
	$(DM) init spec=$(SPEC) store=$(STORE)

train: setup ## train N models over GPUS GPUs (or JOBS CPU slots, or Dask: SCHEDULER/CLUSTER) into STORE; resumes
	$(DM) train store=$(STORE) spec=$(SPEC) main=$(MAIN) n=$(N) gpus=$(GPUS) jobs=$(JOBS) \
	  $(if $(SCHEDULER),scheduler=$(SCHEDULER)) $(if $(CLUSTER),cluster=$(CLUSTER)) $(ARGS)

status: setup ## completed/missing models and failures of the last train in STORE
	$(DM) status store=$(STORE)

write_dataset: setup ## write STORE's completed models to the FFCV file BETON
	$(DM) write_dataset store=$(STORE) out=$(BETON) x_name=masks y_name=margins $(ARGS)

regress: setup ## fit the datamodels of BETON with CONFIG into RESULTS (a finished identical fit is reused)
	$(DM) regress config=$(CONFIG) data.data_path=$(BETON) cfg.out_dir=$(RESULTS) $(ARGS)

evaluate: setup ## LDS and correlations of RESULTS on the held-out models of STORE, files in EVAL
	$(DM) evaluate datamodels=$(RESULTS)/datamodels.pt store=$(STORE) out=$(EVAL) $(ARGS)

export_lds: setup ## held-out models' masks and outputs as LDS ground truth for other tools (FORMAT=npz|trak|kronfluence|dattri)
	$(DM) export_lds store=$(STORE) out=$(DATA)/ground_truth_$(FORMAT) format=$(FORMAT) datamodels=$(RESULTS)/datamodels.pt $(ARGS)

budget: setup ## LDS against the number of models (model-budget curve)
	$(DM) budget config=configs/budget.yaml $(ARGS)

compare: setup ## TRAK (traker, CPU; installs the [compare] extra) vs datamodels on the demo's held-out models: LDS vs compute
	@$(PY) -c "import trak" 2>/dev/null || $(PY) -m pip install -q -e '.[compare]'
	$(DM) compare config=configs/compare.yaml $(ARGS)

bench: setup ## benchmarks (~15 min; each names the CPU and kernels): train overhead, regress vs sklearn (1k and 5k features), kernels, scale at p=5k
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_regression.py --command --load 2
	$(PY) benchmarks/bench_regression.py --size 20000,5000,200,4000 --truth sparse --command --targets-baseline 20
	$(PY) benchmarks/bench_scale.py --sizes 5000
	$(PY) benchmarks/bench_startup.py
	$(PY) benchmarks/bench_blas.py

gpu-check: setup ## on a CUDA machine (setup with a CUDA TORCH_SPEC): GPU tests and GPU benchmarks, < 8 min
	$(PY) -m pytest -q -p no:cacheprovider -m gpu
	$(PY) benchmarks/bench_regression.py --device cuda
	$(PY) benchmarks/bench_scale.py --device cuda --sizes 5000,20000

bench-regression: setup ## regression vs scikit-learn's lasso_path sharing one Gram, time and peak memory
	$(PY) benchmarks/bench_regression.py $(ARGS)

bench-paper: setup ## the CIFAR-10 shape end to end through the CLI, p=50k (mid: ~15 min; ARGS="--shape full": hours, 15 GB disk)
	$(PY) benchmarks/bench_paper_shape.py $(ARGS)

bench-scale: setup ## regression at p=5k..30k features (long; ~10 GB at 30k) and the paper-scale extrapolation
	$(PY) benchmarks/bench_scale.py $(ARGS)

ui: setup ## the MLflow UI on the local store, opened on the datamodels runs table (prints the address)
	$(PY) -m datamodels_ml.tracking.ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(UI_PORT)

ui-setup: setup ## optional, for ui-check: Debian's chromium (apt, as root) and the playwright package (no browser download)
	@test -x /usr/bin/chromium || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq chromium >/dev/null; \
	  else echo "error: ui-check drives /usr/bin/chromium: install Debian's chromium package as root"; exit 1; fi; }
	@$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q playwright

ui-check: ui-setup ## headless Chromium: make ui's address shows the runs table, Compare overlays two paths (data/ui-check)
	$(PY) benchmarks/ui_check.py --out data/ui-check

server: setup ## MLflow tracking server: BACKEND_STORE_URI (sqlite/postgresql), ARTIFACTS_DESTINATION, SERVER_HOST/PORT
	$(VENV)/bin/mlflow server --backend-store-uri $(BACKEND_STORE_URI) --artifacts-destination $(ARTIFACTS_DESTINATION) \
	  --host $(SERVER_HOST) --port $(SERVER_PORT)

lint: setup ## byte-compile every module (syntax check)
	$(PY) -m compileall -q datamodels_ml tests benchmarks

clean: ## remove the data of NAME and caches (keeps .venv and mlflow.db)
	rm -rf data/$(NAME) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## also remove .venv, mlflow.db and mlruns
	rm -rf $(VENV) mlflow.db mlflow.db.lock mlflow.db-wal mlflow.db-shm mlruns
