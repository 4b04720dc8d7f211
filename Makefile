# Developer entry points. `make install fit` trains the default CNN; `make test` is what CI runs.
PYTHON ?= python3
# Pinned for this project's CI machines; on your own machine any torch >= 2.4 with its torchvision works.
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
# Optional extras to install with cnntrain (CI adds onnx,optuna,joblib,slurm to test those paths too).
EXTRAS ?= dev

.PHONY: install fit smoke test test-fast lint format tensorboard bench gpu-check wheel clean

install:  ## install torch, then cnntrain (editable) with the dev tools (EXTRAS=dev,onnx,...)
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e '.[$(EXTRAS)]'

fit:  ## train with the default config (add overrides with ARGS="model=resnet8 trainer.epochs=20")
	cnntrain fit $(ARGS)

smoke:  ## a tiny end-to-end run (seconds)
	cnntrain fit experiment=smoke $(ARGS)

test:  ## the whole suite, slow tests included (this is what CI runs), one worker per core
	$(PYTHON) -m pytest -q -n auto --dist loadscope

test-fast:  ## skip the slow tests
	$(PYTHON) -m pytest -q -m "not slow" -n auto --dist loadscope

lint:  ## ruff, and the layering contracts (import-linter: see [tool.importlinter] in pyproject.toml)
	$(PYTHON) -m ruff check cnntrain tests benchmarks scripts
	lint-imports

format:
	$(PYTHON) -m ruff format cnntrain tests benchmarks scripts

tensorboard:  ## browse every run under runs/
	tensorboard --logdir runs

bench:  ## throughput benchmarks; figures and the machine they ran on go to benchmarks/RESULTS.md
	$(PYTHON) benchmarks/run.py

gpu-check:  ## every CUDA path (bf16, fp16, compile, resume, evaluate/predict/export, DDP, images/s) in a few minutes; says so and passes without a GPU
	$(PYTHON) benchmarks/gpu_check.py

wheel:  ## build the wheel into dist/
	$(PYTHON) -m pip wheel --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
