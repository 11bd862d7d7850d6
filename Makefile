# Two commands on a fresh machine: `make train` and `make test` (each bootstraps .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

# Offline machines: use a data folder checked out beside the repository if there is one
# (see docs/streams.md, "Data"). An explicit LIFELONG_DATA_DIR wins.
ifneq ($(wildcard ../shared/data/MNIST),)
LIFELONG_DATA_DIR ?= $(abspath ../shared/data)
export LIFELONG_DATA_DIR
endif

.PHONY: install train test test-all lint format bench docs gpu-check gpu-wheels clean

install: $(STAMP)

# --no-cache-dir: without a CPU build on the index, torch comes with its CUDA packages (about 6 GB installed);
# pip's cache would keep another copy of the downloaded wheels, which filled a CI machine's disk once.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install --no-cache-dir -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)  ## the default experiment: EWC on permuted MNIST
	$(BIN)/python train.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint  ## lint, then the test suite (without the `slow` runs; it builds the docs and runs their notebook)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: lint  ## everything, `slow` runs included
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link or reference, and the
# tutorial notebook is executed (LIFELONG_DOCS_EXECUTE=false skips that, to preview prose quickly)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)  ## speed and memory targets (docs/performance.md)
	$(BIN)/python scripts/benchmark.py $(ARGS)

# On a GPU machine: a fresh environment, the gpu-marked tests, the runs (CPU against GPU, mixed precision, DDP)
# and the CUDA benchmark, one report (docs/performance.md, "On a GPU"). WHEELS=DIR: offline, on PYTHON's own torch.
gpu-check:
	WHEELS=$(WHEELS) REPORT=$(REPORT) PYTHON=$(PYTHON) scripts/gpu_check.sh $(ARGS)

# Here, with the package index: the wheels an offline GPU machine with its own PyTorch lacks, for WHEELS=.whl
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip wheel -q --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3

clean:
	rm -rf $(VENV) .venv-gpu .venv-gpu-site outputs multirun site .pytest_cache .ruff_cache .mypy_cache
