# Two commands: `make demo` runs the example on SQLite; `make test` runs every check.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	scripts/system-deps
	$(BIN)/pip install --quiet -e . --group dev
	touch $@

demo: $(VENV)/.demo
	cd example && ../$(BIN)/python manage.py migrate --no-input --verbosity 0
	cd example && ../$(BIN)/python manage.py demo

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests example bench
	$(BIN)/ruff format --check src tests example bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python tests/manage.py makemigrations --check --dry-run conveyor

test: lint
	$(BIN)/pytest

bench: $(VENV)/.dev
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) example/db.sqlite3*
