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
STORE   ?= data/digits/store
SPEC    ?= configs/digits_spec.json
MAIN    ?= datamodels_ml.examples.digits
CONFIG  ?= configs/reg.yaml
BETON   ?= data/digits/reg_data.beton
RESULTS ?= data/digits/reg_results
DEMO    ?= configs/demo.yaml
FORMAT  ?= npz
ARGS    ?=
# Scaling out (README "Scaling out"): a running Dask scheduler, or a dask-jobqueue cluster YAML
SCHEDULER ?=
CLUSTER   ?=
# make server: an MLflow tracking server for several users and machines
BACKEND_STORE_URI ?= sqlite:///mlflow-server.db
ARTIFACTS_DESTINATION ?= ./mlartifacts
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5000

DM := $(PY) -m datamodels_ml

.PHONY: help setup test test-fast demo init train status write_dataset regress evaluate export_lds budget compare bench bench-regression bench-paper bench-scale gpu-check ui ui-setup ui-check server lint clean distclean

help: ## list the targets and the variables they take
	@echo "usage: make <target> [N=$(N)] [GPUS=$(GPUS)] [JOBS=$(JOBS)] [STORE=$(STORE)] [SPEC=$(SPEC)] [MAIN=$(MAIN)] [CONFIG=$(CONFIG)]"
	@echo "       make train [SCHEDULER=tcp://HOST:8786 | CLUSTER=configs/cluster/slurm.yaml]   (train on Dask)"
	@echo
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

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

test: setup ## run the test suite (what CI runs)
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup ## the whole workflow on the digits example: train, write_dataset, regress, evaluate
	$(DM) demo config=$(DEMO) $(ARGS)

init: setup ## create the store from the spec (STORE, SPEC)
	$(DM) init spec=$(SPEC) store=$(STORE)

train: setup ## train N models over GPUS GPUs (or JOBS CPU slots, or Dask: SCHEDULER/CLUSTER) into STORE; resumes
	$(DM) train store=$(STORE) spec=$(SPEC) main=$(MAIN) n=$(N) gpus=$(GPUS) jobs=$(JOBS) \
	  $(if $(SCHEDULER),scheduler=$(SCHEDULER)) $(if $(CLUSTER),cluster=$(CLUSTER)) $(ARGS)

status: setup ## completed/missing models and failures of the last train in STORE
	$(DM) status store=$(STORE)

write_dataset: setup ## write STORE's completed models to the FFCV file BETON
	$(DM) write_dataset store=$(STORE) out=$(BETON) x_name=masks y_name=margins $(ARGS)

regress: setup ## fit the datamodels with CONFIG (lasso paths, tracked in MLflow)
	$(DM) regress config=$(CONFIG) $(ARGS)

evaluate: setup ## LDS and correlations of RESULTS on the held-out models of STORE
	$(DM) evaluate datamodels=$(RESULTS)/datamodels.pt store=$(STORE) out=data/digits/evaluate $(ARGS)

export_lds: setup ## held-out models' masks and outputs as LDS ground truth for other tools (FORMAT=npz|trak|kronfluence|dattri)
	$(DM) export_lds store=$(STORE) out=data/digits/ground_truth_$(FORMAT) format=$(FORMAT) datamodels=$(RESULTS)/datamodels.pt $(ARGS)

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

ui: setup ## open the MLflow UI on the local tracking store (http://127.0.0.1:5000)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

ui-setup: setup ## optional, for ui-check: Debian's chromium (apt, as root) and the playwright package (no browser download)
	@test -x /usr/bin/chromium || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq chromium >/dev/null; \
	  else echo "error: ui-check drives /usr/bin/chromium: install Debian's chromium package as root"; exit 1; fi; }
	@$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q playwright

ui-check: ui-setup ## headless Chromium checks that the MLflow UI overlays two regression paths (screenshots: data/ui-check)
	$(PY) benchmarks/ui_check.py --out data/ui-check

server: setup ## MLflow tracking server: BACKEND_STORE_URI (sqlite/postgresql), ARTIFACTS_DESTINATION, SERVER_HOST/PORT
	$(VENV)/bin/mlflow server --backend-store-uri $(BACKEND_STORE_URI) --artifacts-destination $(ARTIFACTS_DESTINATION) \
	  --host $(SERVER_HOST) --port $(SERVER_PORT)

lint: setup ## byte-compile every module (syntax check)
	$(PY) -m compileall -q datamodels_ml tests benchmarks

clean: ## remove the example's data and caches (keeps .venv and mlflow.db)
	rm -rf data/digits .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## also remove .venv, mlflow.db and mlruns
	rm -rf $(VENV) mlflow.db mlflow.db.lock mlflow.db-wal mlflow.db-shm mlruns
