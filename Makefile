# The two commands of the quick start:
#   make run    set everything up, then run the main job on the built-in data
#   make test   set everything up, then run every test tier CI runs
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU build from the local wheel here. On a GPU host, e.g.:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# Stage commands in dvc.yaml call `python`: make it the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
# Telemetry is off in every entry point of the project, not here: see pipelines/__init__.py.

.PHONY: setup run test test-fast test-slow lint bench bench-flow bench-serve monitor clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,postgres,monitor]"
	touch $@

# The main job: the `train` flow (dvc.yaml's stages as Prefect task runs) on a temporary local
# Prefect server, unless PREFECT_API_URL names one. Plain `dvc repro` runs the same stages.
run: setup
	$(BIN)/python -m flows.train

test: setup lint
	$(BIN)/python -m pytest -m "not slow" --durations=15
	$(BIN)/python -m pytest -m slow --durations=40

test-fast: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check pipelines flows inference tests benchmarks ops service.py
	$(BIN)/ruff format --check pipelines flows inference tests benchmarks ops service.py
	$(BIN)/mypy
	$(BIN)/mypy ops/mlflow_users.py

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

bench-flow: setup
	$(BIN)/python benchmarks/flow_overhead.py

# `bentoml serve` vs a hand-written FastAPI server under `wrk` load (needs `apt-get install wrk`).
bench-serve: setup
	$(BIN)/python benchmarks/serve_load.py

# Prometheus (Debian's `prometheus` package) scraping `bentoml serve` on 127.0.0.1:3000, with
# the rules in monitoring/rules.yml; its UI and API on http://127.0.0.1:9090 (README: Monitoring).
monitor:
	prometheus --config.file=monitoring/prometheus.yml --storage.tsdb.path=monitoring/data \
	  --web.listen-address=127.0.0.1:9090

clean:
	rm -rf $(VENV)
