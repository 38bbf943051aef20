# Everything sets itself up: the first target that needs the virtual environment creates it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

export MUJOCO_GL ?= egl

.PHONY: setup demo test test-slow lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@bash scripts/system-deps.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing gato-like and its dependencies into $(VENV) (first time: ~2-3 min)"
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gato-like demo

test: $(STAMP)
	$(BIN)/pytest

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/typecheck.py  # mypy over the installed layout (package-dir), not folder by folder

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
