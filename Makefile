# pgderive — make targets. Everything installs and starts what it needs (see scripts/services.sh).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: services services-down status venv demo demo-store test test-unit typecheck chaos bench clean

$(BIN)/pgderive: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
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

# The widget store (scripts/store.py, config/store.yaml): load, stream a random workload,
# `pgderive verify` every view, then `pgderive explain` one order and one category aggregate.
# PGDERIVE_STORE_SCALE / _SECONDS / _SEED override the defaults.
demo-store: services venv
	$(BIN)/python scripts/demo_store.py

test: services venv
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest -q tests

test-unit: venv
	$(BIN)/pytest -q -m 'not slow' tests/unit

# mypy over every package ([tool.mypy] in pyproject.toml); `make test` runs it before the tests.
typecheck: venv
	$(BIN)/mypy cdc sinks views pgderive

test: typecheck

# Crash harness, long variant: the CI test (tests/chaos/test_chaos.py, 20 kills) scaled up. Every
# PGDERIVE_CHAOS_* variable may be overridden from the environment, e.g.
# `PGDERIVE_CHAOS_SEED=42 make chaos` to replay a failure (see tests/chaos/harness.py).
chaos: services venv
	PGDERIVE_CHAOS_KILLS=$${PGDERIVE_CHAOS_KILLS:-100} \
	PGDERIVE_CHAOS_BOOT_KILLS=$${PGDERIVE_CHAOS_BOOT_KILLS:-6} \
	PGDERIVE_CHAOS_RESNAPSHOTS=$${PGDERIVE_CHAOS_RESNAPSHOTS:-3} \
	PGDERIVE_CHAOS_ROWS=$${PGDERIVE_CHAOS_ROWS:-60000} \
	PGDERIVE_CHAOS_TPS=$${PGDERIVE_CHAOS_TPS:-300} \
	PGDERIVE_CHAOS_BIG_TX=$${PGDERIVE_CHAOS_BIG_TX:-15} \
	PGDERIVE_CHAOS_TRUNCATES=$${PGDERIVE_CHAOS_TRUNCATES:-12} \
	PGDERIVE_CHAOS_TIMEOUT=$${PGDERIVE_CHAOS_TIMEOUT:-600} \
	$(BIN)/pytest -q tests/chaos/test_chaos.py

# Benchmarks against same-run baselines (bench/, see bench/settings.py for PGDERIVE_BENCH_*):
# writes bench/report.md and bench/plot.png; logs and raw results under bench/out/.
# PGDERIVE_BENCH_QUICK=1 is the < 2 min smoke run (report under bench/out/quick/).
bench: services venv
	$(BIN)/python -m bench

clean:
	-scripts/services.sh down
	rm -rf .services $(VENV) *.egg-info .pytest_cache
