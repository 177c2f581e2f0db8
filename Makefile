# Two commands on a fresh machine (Python 3.10+ with venv; run from the repository root):
#
#   make quickstart   # a virtualenv, torch, the harness; then the offline quickstart run (runs/quickstart/)
#   make test         # the same plus DeepSpeed; then lint and the test suite
#
# torch is installed first and alone: a plain `torch` requirement pulled in by another package would take
# whichever build pip picks. Choose the build with TORCH, e.g. a CUDA wheel index:
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# Tests and the quickstart never download anything.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: quickstart test lint

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e ".[dev,deepspeed]"
	$(BIN)/python -c "from harness.distributed import build_deepspeed_cpu_ops; build_deepspeed_cpu_ops()"
	touch $@

quickstart: $(VENV)/.installed-dev
	$(OFFLINE) $(BIN)/accelerate launch --config_file configs/accelerate/default.yaml \
		harness/train.py --config configs/quickstart.yaml overwrite=true

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(OFFLINE) $(BIN)/pytest --durations=25
