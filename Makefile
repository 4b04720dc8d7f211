# Developer entry points. `make install fit` trains the default CNN; `make test` is what CI runs.
# `make help` lists the targets.
#
# Which Python runs everything, in this order:
#   PYTHON=...    an interpreter you name (make install PYTHON=python3.12; any target takes it the same way);
#   $VIRTUAL_ENV  the virtual environment that is active in your shell;
#   .venv         otherwise: the project's own, made by `make install` (a stock Debian/Ubuntu python3 refuses
#                 `pip install` outside a virtual environment, PEP 668).
# Every target runs through the same interpreter, and through the scripts installed beside it.
VENV ?= .venv
ifeq ($(origin PYTHON),undefined)
  ifdef VIRTUAL_ENV
    PYTHON := $(VIRTUAL_ENV)/bin/python
  else
    PYTHON := $(VENV)/bin/python
    OWN_VENV := 1
  endif
endif
# The interpreter that makes .venv: the first python3 on the PATH.
BASE_PYTHON ?= python3
# Pinned for this project's CI machines; on your own machine any torch >= 2.4 with its torchvision works.
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
# Optional extras to install with cnntrain (CI adds onnx,optuna,joblib,slurm to test those paths too).
EXTRAS ?= dev
# The folder of console scripts (cnntrain, lint-imports, tensorboard) that belongs to $(PYTHON).
BIN = $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)

.PHONY: help install venv need-python fit smoke test test-fast lint format tensorboard bench gpu-check wheel clean

help:  ## this list
	@awk -F ':.*## ' '/^[a-z-]+:.*## / { printf "  %-12s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

install: venv  ## install torch, then cnntrain (editable) with the dev tools (EXTRAS=dev,onnx,...)
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e '.[$(EXTRAS)]'
	@echo "installed into $$($(PYTHON) -c 'import sys; print(sys.prefix)')"
ifdef OWN_VENV
	@echo "to get 'cnntrain' on your PATH: . $(VENV)/bin/activate   (make targets use $(VENV) either way)"
endif

venv:  ## make the project's .venv (only when no environment is active and no PYTHON is named)
ifdef OWN_VENV
	@if [ ! -x $(PYTHON) ]; then \
	  command -v $(BASE_PYTHON) >/dev/null 2>&1 || { echo "make: no '$(BASE_PYTHON)' on the PATH: install Python 3.10 or newer, or name one with BASE_PYTHON=..."; exit 1; }; \
	  $(BASE_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "make: cnntrain needs Python 3.10 or newer; '$(BASE_PYTHON)' is $$($(BASE_PYTHON) -V 2>&1): name another with BASE_PYTHON=..."; exit 1; }; \
	  $(BASE_PYTHON) -m venv $(VENV) >/dev/null 2>&1 || { rm -rf $(VENV); echo "make: '$(BASE_PYTHON) -m venv' cannot make $(VENV): on Debian/Ubuntu, 'sudo apt install python3-venv' (or python3.X-venv for your version), then run make install again"; exit 1; }; \
	  echo "made $(VENV) with $$($(BASE_PYTHON) -V 2>&1) ($$(command -v $(BASE_PYTHON)))"; \
	fi
endif

need-python:  # every target but install checks that its interpreter exists
ifdef OWN_VENV
	@[ -x $(PYTHON) ] || { echo "make: no $(VENV) yet: run 'make install' first (or activate your own environment)"; exit 1; }
endif

fit: need-python  ## train with the default config (add overrides with ARGS="model=resnet8 trainer.epochs=20")
	$(PYTHON) -m cnntrain fit $(ARGS)

smoke: need-python  ## a tiny end-to-end run (seconds)
	$(PYTHON) -m cnntrain fit experiment=smoke $(ARGS)

test: need-python  ## the whole suite, slow tests included (this is what CI runs), one worker per core
	$(PYTHON) -m pytest -q -n auto --dist loadscope

test-fast: need-python  ## skip the slow tests
	$(PYTHON) -m pytest -q -m "not slow" -n auto --dist loadscope

lint: need-python  ## ruff (lint and format, pinned), the layering contracts (import-linter) and the type checker (mypy): see pyproject.toml
	$(PYTHON) -m ruff check cnntrain tests benchmarks scripts
	$(PYTHON) -m ruff format --check cnntrain tests benchmarks scripts
	$(BIN)/lint-imports
	$(PYTHON) -m mypy

format: need-python  ## ruff format
	$(PYTHON) -m ruff format cnntrain tests benchmarks scripts

tensorboard: need-python  ## browse every run under runs/
	$(BIN)/tensorboard --logdir runs

bench: need-python  ## throughput benchmarks; figures and the machine they ran on go to benchmarks/RESULTS.md
	$(PYTHON) benchmarks/run.py

gpu-check: need-python  ## every CUDA path (bf16, fp16, compile, resume, evaluate/predict/export, DDP, images/s) in a few minutes; says so and passes without a GPU
	$(PYTHON) benchmarks/gpu_check.py

wheel: need-python  ## build the wheel into dist/
	$(PYTHON) -m pip wheel --no-deps -w dist .

clean:  ## build outputs and caches (not .venv, not runs/)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
