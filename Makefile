# The README's two commands are `make run` and `make test`; everything they
# need is installed from here so a fresh machine needs nothing but the repo.
#
# Python packages come from the lock files in requirements/ (exact versions
# and hashes, installed with uv from PyPI as they are); pyproject.toml keeps
# the ranges a library user gets. `make lock` re-resolves the locks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV     := $(BIN)/uv
UV_VERSION := 0.13.8
POLICY ?= policies/default.yaml
HELM_VERSION := v3.22.0
TOOLS  := $(CURDIR)/.tools
export PATH := $(TOOLS)/bin:$(PATH)
# The venv and uv's cache are often on different filesystems; copying is
# what uv falls back to anyway, minus the warning.
export UV_LINK_MODE := copy
# Some CI runners start without $HOME; uv's cache then lives in the clone.
ifeq ($(strip $(HOME)),)
export UV_CACHE_DIR ?= $(TOOLS)/uv-cache
endif
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --quiet \
	--custom-compile-command "make lock" $(if $(UPGRADE),--upgrade,)

.PHONY: run test deps tools redis-server lint lock bench clean

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check uv==$(UV_VERSION)

# `uv pip install -r` (not `sync`): sync would uninstall uv itself.
$(BIN)/.installed: requirements/run.txt pyproject.toml | $(UV)
	$(UV) pip install -q --python $(BIN)/python --require-hashes -r requirements/run.txt
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

$(BIN)/.installed-test: requirements/dev.txt $(BIN)/.installed
	$(UV) pip install -q --python $(BIN)/python --require-hashes -r requirements/dev.txt
	touch $@

run: $(BIN)/.installed
	$(BIN)/llm-sidecar serve --policy $(POLICY)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || scripts/apt-install.sh redis-server

# helm is built from source the first time (several minutes, see README).
tools: redis-server
	@scripts/ensure-helm.sh $(HELM_VERSION) $(TOOLS)

# The Python installs and the tool build are independent: a sub-make runs
# them side by side, so a first run costs the slower of the two, not both.
deps:
	@$(MAKE) --no-print-directory -j2 $(BIN)/.installed-test tools

test: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(BIN)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format .
	$(BIN)/mypy

# `make lock` keeps every pin that still satisfies pyproject.toml (so adding
# a dependency moves nothing else); `make lock UPGRADE=1` takes the newest.
lock: | $(UV)
	$(UV) pip compile $(LOCK_FLAGS) pyproject.toml -o requirements/run.txt
	$(UV) pip compile $(LOCK_FLAGS) --extra test --extra bench pyproject.toml \
		-o requirements/dev.txt

# A quick run writes to bench/results/quick/ (git-ignored); only a full run
# replaces the committed report in bench/results/.
bench: $(BIN)/.installed-test
	@command -v nginx >/dev/null 2>&1 || scripts/apt-install.sh nginx
	@command -v wrk >/dev/null 2>&1 || scripts/apt-install.sh wrk
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
