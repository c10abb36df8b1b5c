# Two entry points on a fresh machine: `make repro` (the pipeline) and `make test`.
# Both create .venv and install the pinned requirements first if needed.
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup repro lint test

$(INSTALLED): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -e .
	touch $@

setup: $(INSTALLED)

repro: $(INSTALLED)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest
