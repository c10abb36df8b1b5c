# Two entry points on a fresh machine: `make repro` (the pipeline) and `make test`
# (the fast tier; `make test-full` adds the end-to-end and real-server tests, as CI runs).
# Both create .venv and install the pinned requirements first if needed.
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup repro lint test test-full exp-show

$(INSTALLED): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -e .
	touch $@

setup: $(INSTALLED)

# brainmri check first: it names what in ingest.source DVC's hashing would block or fail on.
repro: $(INSTALLED)
	PATH="$(CURDIR)/$(BIN):$$PATH" brainmri check && PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest -m "not slow and not pipeline"

test-full: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest

# `dvc exp show` with the params that differ and the headline metrics only:
# every metrics key as a column is far wider than a terminal.
HEADLINE := ^(.*:)?(macro_f1|macro_f1_ci_low|macro_f1_ci_high|annotated\.pointing_game)$$
PARAM_SECTIONS := ^(?!(ingest|dedup|split|balance|train|evaluate|gradcam|export)\.)
exp-show:
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc exp show --no-pager --only-changed \
		--keep '^Experiment$$' --keep '$(HEADLINE)' --drop '$(PARAM_SECTIONS)'
