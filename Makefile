# One entry point. `make run` and `make test` are the README's two commands.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin

# The venv's python is the `python` that dvc.yaml's commands run.
export PATH := $(BIN):$(PATH)
# Both tools phone home unless told not to.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1

.PHONY: setup lock run test test-fast check-params preset sweep bench bench-sweep ui clean \
        team-up team-down team-env team-status bench-team

# requirements.lock (README: Dependencies): every package '.[dev,team,cluster]' needs but torch,
# with hashes. uv, pinned and hash-checked in the lock, installs it (much faster than pip); torch
# comes from its pin in pyproject.toml through pip. On Linux without an NVIDIA driver (no
# nvidia-smi), from PyTorch's CPU index: PyPI's Linux torch is the CUDA build, several GB. pip's
# own config still applies (a local wheel folder, say).
# Override: make setup TORCH_PIP_ARGS=   (PyPI's torch)
# Last, the compiled time loop of the rnn, gru and lstm cells (rnnlab/kernels/native.py) is built
# with the system's C++ compiler into rnnlab's cache folder (~/.cache/rnnlab unless
# RNNLAB_CACHE_DIR or XDG_CACHE_HOME moves it); without a compiler it says why and the
# pure-PyTorch path runs.
LOCK           := requirements.lock
CPU_ONLY_LINUX := $(and $(filter Linux,$(shell uname -s)),$(if $(shell command -v nvidia-smi),,yes))
TORCH_PIP_ARGS ?= $(if $(CPU_ONLY_LINUX),--index-url https://download.pytorch.org/whl/cpu)

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	awk '/^[^ #]/ { keep = /^uv==/ } keep' $(LOCK) > $(VENV)/uv-requirement.txt
	$(BIN)/pip install -q --require-hashes --no-deps -r $(VENV)/uv-requirement.txt
	$(BIN)/uv pip install -q --python $(BIN)/python --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) $$(grep -o '"torch==[^"]*' pyproject.toml | tr -d '"')
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	$(BIN)/python -m rnnlab.kernels.native build
	touch $@

setup: $(VENV)/.installed             ## create .venv from requirements.lock (hashes checked) and torch's pin

lock:                                 ## refresh requirements.lock from pyproject.toml (tools/lock.py), then: make setup
	$(PYTHON) tools/lock.py

run: setup                            ## run the whole pipeline on params.yaml
	$(BIN)/dvc repro
	@echo
	@echo "Report: metrics/report.md   plots: metrics/plots/   compare: dvc exp show   UI: make ui"

# Both run on every core (pytest-xdist: tests that share a server stay on one worker) and end with
# the 10 slowest tests, so that whoever adds the next slow one sees it. PYTEST_ARGS: more options.
# Bytecode is cached even where PYTHONDONTWRITEBYTECODE is set: each worker would otherwise compile
# and rewrite every module again (about 4 CPU-s a worker).
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -n auto --dist loadgroup --durations=10 $(PYTEST_ARGS)

# The browser check's npm packages (tests/ui/package-lock.json pins them), where npm is installed;
# without npm that one test is skipped, and says so.
UI_PACKAGES := tests/ui/node_modules/.package-lock.json
$(UI_PACKAGES): tests/ui/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix tests/ui --no-audit --no-fund; \
	else echo "npm not found: the browser check (tests/ui/test_ui.py) will be skipped"; fi

test: setup $(UI_PACKAGES)            ## the whole test suite, end-to-end tests included (what CI runs)
	$(PYTEST)

test-fast: setup                      ## the fast tests only (half a minute)
	$(PYTEST) -m "not slow"

check-params: setup                   ## validate params.yaml without running anything
	$(BIN)/python -m rnnlab.config params.yaml

clean:                                ## remove pipeline outputs (not the venv, not mlflow.db)
	rm -rf data/raw data/tokens models checkpoints metrics/variants metrics/curves metrics/samples metrics/plots metrics/report.md

preset: setup                         ## run presets/$(NAME).yaml as the DVC experiment $(NAME); extra: ARGS="-S key=value"
	$(BIN)/python -m rnnlab.cli.presets $(NAME) $(ARGS)

sweep: setup                          ## a parallel sweep: ARGS="-S train.lr=0.001,0.002" JOBS=2 (README: Sweeps)
	$(BIN)/dvc repro tokenize
	$(BIN)/dvc exp run --queue $(ARGS)
	$(BIN)/dvc exp run --run-all -j $(or $(JOBS),2)
	$(BIN)/dvc queue status

bench: setup                          ## our training step against the book's, in one run (docs/benchmark.md)
	$(BIN)/python -m bench.benchmark

profile-run: setup                    ## where a fresh clone's `dvc repro` spends its time, stage by stage (bench/run_profile.py)
	$(BIN)/python -m bench.run_profile

bench-sweep: setup                    ## 4 queued experiments with -j 1, then -j 2 (bench/sweep.py)
	$(BIN)/python -m bench.sweep

UI_PORT ?= 5000
ui: setup                             ## the MLflow UI on the local store (http://127.0.0.1:$(UI_PORT)); UI_PORT=5001: another
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(UI_PORT) --workers 1

team-up: setup                        ## the local team stack (docs/team.md): PostgreSQL, S3, MLflow with auth; eval "$$(make -s team-up)"
	@$(BIN)/python -m deploy.stack up

team-down:                            ## stop the team stack; its data stays in .team/
	@$(BIN)/python -m deploy.stack down

team-env:                             ## print the team stack's `export` lines again: eval "$$(make -s team-env)"
	@$(BIN)/python -m deploy.stack env

team-status:                          ## what of the team stack runs
	@$(BIN)/python -m deploy.stack status

bench-team: setup                     ## 8 tracked trainings at once (and 1): team server vs SQLite (bench/team_load.py)
	$(BIN)/python -m bench.team_load
