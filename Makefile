PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow lint bench coverage install clean

$(BIN)/compress: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/compress

demo: install
	$(BIN)/compress run recipes/quickstart.yaml --force

test: install
	$(BIN)/pytest

test-slow: install
	$(BIN)/pytest -m slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy compress_cli

bench: install
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
