# pgderive — make targets. Everything installs and starts what it needs (see scripts/services.sh).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: services services-down status venv demo test test-unit chaos bench clean

$(BIN)/pgderive: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/pgderive

services:
	scripts/services.sh up

services-down:
	scripts/services.sh down

status:
	scripts/services.sh status

demo: services venv
	$(BIN)/python scripts/demo.py

test: services venv
	$(BIN)/pytest -q tests

test-unit: venv
	$(BIN)/pytest -q -m 'not slow' tests/unit

clean:
	-scripts/services.sh down
	rm -rf .services $(VENV) *.egg-info .pytest_cache
