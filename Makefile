# Entry points: `make train` (the main job), `make test` (the whole suite), `make online`, `make demo`.
# Each creates .venv on first use. torch is pinned so a CPU machine never pulls
# a multi-GB CUDA build; on a GPU machine install your own torch first and run
# `pip install -e .[test]` instead.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

.PHONY: install train online demo test
install: $(BIN)/.installed

train: install
	$(BIN)/prefops train

online: install
	$(BIN)/prefops train training/configs/online.yaml

demo: install
	$(BIN)/python -m prefops.tools.demo

test: install
	$(BIN)/python -m pytest -q
