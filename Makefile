# The two set-up commands are `make demo` and `make test`; both install what is missing first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?=
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-slow demo data pretrain sft clean

install: $(STAMP)

# torch first, pinned, so that no dependency range pulls a CUDA build onto a CPU machine;
# on a GPU machine the same pin resolves to the CUDA wheel.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
		|| $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e .[dev]
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

data: install
	$(BIN)/align data toyworld --out $(or $(OUT),runs/data/toyworld)

pretrain: install
	$(BIN)/align pretrain --recipe $(or $(RECIPE),recipes/tiny/pretrain.yaml)

sft: install
	$(BIN)/align sft --recipe $(or $(RECIPE),recipes/tiny/sft.yaml)

clean:
	rm -rf runs
