# meshd: `make demo` and `make test` work on a fresh Debian machine as root.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages `make test` needs (installed only when missing): python3-venv for the
# venv on a bare Debian python3. Later stages add wireguard-go, nftables, dnsutils, ...
DEB_PACKAGES := python3-venv

.PHONY: setup deps demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (run as root to install)"; exit 1; fi; \
	fi

demo: deps setup
	$(BIN)/meshd demo --nodes $${NODES:-5} $${DURATION:+--duration $$DURATION}

lint: setup
	$(BIN)/ruff check meshd tests benchmarks simulations
	$(BIN)/ruff format --check meshd tests benchmarks simulations
	$(BIN)/mypy --strict meshd/core

test: deps setup lint
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow and not integration"

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis benchmarks/results
