# Entry points: `make train` (the main job), `make test` (the whole suite), `make online`, `make demo`,
# `make test-latest` (the suite on the day's releases).
# Each creates its virtual environment on first use. torch is pinned so a CPU machine never
# pulls a multi-GB CUDA build; on a GPU machine install your own torch first and run
# `pip install -e .[test]` instead. .venv takes every other package at the version in
# constraints.txt, the set the suite last passed with, so a new upstream release cannot turn
# CI red between two changes; .venv-latest takes the newest of each.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LATEST_BIN := .venv-latest/bin
TORCH_SPEC ?= torch==2.13.0

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

$(LATEST_BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-latest
	$(LATEST_BIN)/python -m pip install -q --upgrade pip
	$(LATEST_BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST_BIN)/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" "$(TORCH_SPEC)"
	touch $@

.PHONY: install train online demo test test-latest
install: $(BIN)/.installed

train: install
	$(BIN)/prefops train

online: install
	$(BIN)/prefops train training/configs/online.yaml

demo: install
	$(BIN)/python -m prefops.tools.demo

test: install
	$(BIN)/python -m pytest -q

# Whatever the venv holds is upgraded to the newest releases first, then the suite runs.
test-latest: $(LATEST_BIN)/.installed
	$(LATEST_BIN)/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" "$(TORCH_SPEC)"
	$(LATEST_BIN)/python -m pip list --format=freeze | grep -iE "^(torch|triton|transformers|trl|peft|numpy|accelerate|kernels)=="
	$(LATEST_BIN)/python -m pytest -q
