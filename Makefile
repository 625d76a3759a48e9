# The development loop in one place; docs/development.md says what each target needs.
# `make` alone lists the targets. Extra pytest arguments go in ARGS, e.g.
#   make test ARGS="tests/test_ids.py -k uuid"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUF := tools/node_modules/.bin/buf
BENCH_OUT ?= docs/benchmarks
ARGS ?=

# Written once the pinned Python packages and buf are in: the other targets install first when
# it is missing or older than the pins.
INSTALLED := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install fmt lint test test-all stubs docs bench

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-9s %s\n", $$1, $$2}' \
		$(MAKEFILE_LIST)

$(INSTALLED): pyproject.toml constraints.txt tools/package.json tools/package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	npm install --prefix tools --no-save --no-audit --no-fund --loglevel=error
	touch $@

install: ## the pinned Python packages into .venv; buf and grpc-js into tools/node_modules
	rm -f $(INSTALLED)
	$(MAKE) --no-print-directory $(INSTALLED)

fmt: $(INSTALLED) ## fix what can be fixed: ruff's autofixes, then ruff format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

lint: $(INSTALLED) ## ruff, ruff format --check, mypy, buf lint and buf format (no changes)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(BUF) lint
	$(BUF) format -d --exit-code

test: $(INSTALLED) ## the fast tier: every test not marked slow
	$(VENV)/bin/pytest -m "not slow" $(ARGS)

test-all: ## exactly what CI runs (.ci/run): installs, lints, and runs every test
	bash tests/run $(ARGS)

stubs: $(INSTALLED) ## regenerate clients/python/healthagent/v1 from protos/
	$(PY) clients/python/generate_stubs.py

docs: $(INSTALLED) ## regenerate docs/configuration.md from the settings models
	$(PY) -m healthagent_service.config_docs > docs/configuration.md

bench: $(INSTALLED) ## instructions counted under callgrind (bench.instructions) into BENCH_OUT
	$(PY) -m bench.instructions --out $(BENCH_OUT)
