# The README's two commands are `make run` and `make test`; everything they
# need is installed from here so a fresh machine needs nothing but the repo.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
POLICY ?= policies/default.yaml
HELM_VERSION := v3.22.0
TOOLS  := $(CURDIR)/.tools
export PATH := $(TOOLS)/bin:$(PATH)

.PHONY: run test lint bench tools redis-server clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed pyproject.toml
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/llm-sidecar serve --policy $(POLICY)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || scripts/apt-install.sh redis-server

tools: redis-server
	@scripts/ensure-helm.sh $(HELM_VERSION) $(TOOLS)

test: $(BIN)/.installed-test tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(BIN)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format .
	$(BIN)/mypy

bench: $(BIN)/.installed-test
	@command -v nginx >/dev/null 2>&1 || scripts/apt-install.sh nginx
	@command -v wrk >/dev/null 2>&1 || scripts/apt-install.sh wrk
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
