# meshd: `make demo` and `make test` work on a fresh Debian machine as root.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages `make test` needs (installed only when missing): python3-venv for the
# venv on a bare Debian python3; nftables for the packet-loss gossip test
# (tests/integration/test_gossip.py drops UDP in a network namespace with `nft`).
# dnsutils for `dig` in the DNS integration test (tests/integration/test_dns.py).
# wireguard-go, wireguard-tools, iproute2 and iputils-ping for the WireGuard backend tests
# (tests/integration/test_wg_uapi.py: real wireguard-go interfaces in network namespaces)
# and for `make demo` (namespaces, wireguard-go when there is no kernel module, ping, dig);
# curl because the demo tells the user to reach the debug endpoints with it.
DEB_PACKAGES := python3-venv nftables dnsutils wireguard-go wireguard-tools iproute2 iputils-ping curl
# Debian packages only `make bench` needs (installed only when missing, like the above):
# serf, for the side-by-side benchmark `python -m benchmarks.run --only vs_serf`;
# dnsperf and dnsmasq-base for `python -m benchmarks.dns` (meshd's DNS next to dnsmasq);
# iperf3 for `python -m benchmarks.run --only wg_iperf` (meshd's overlay next to a hand-made one).
BENCH_DEB_PACKAGES := serf dnsperf dnsmasq-base iperf3

# Install the Debian packages named in $(1) that are missing (as root), or name them and fail.
define install_missing
missing=""; for p in $(1); do \
  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
if [ -n "$$missing" ]; then \
  if [ "$$(id -u)" = 0 ]; then \
    echo "installing Debian packages:$$missing"; \
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
  else echo "missing Debian packages:$$missing (run as root to install)"; exit 1; fi; \
fi
endef

.PHONY: setup deps bench-deps demo test test-fast lint bench bench-wg sim clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

deps:
	@$(call install_missing,$(DEB_PACKAGES))

bench-deps:
	@$(call install_missing,$(BENCH_DEB_PACKAGES))

demo: deps setup
	$(BIN)/meshd demo --nodes $${NODES:-5} $${DURATION:+--duration $$DURATION}

lint: setup
	$(BIN)/ruff check meshd tests benchmarks simulations
	$(BIN)/ruff format --check meshd tests benchmarks simulations
	$(BIN)/mypy --strict meshd/core
	$(BIN)/mypy meshd

test: deps setup lint
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow and not integration"

bench: bench-deps setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# The WireGuard benchmarks (root: network namespaces, wireguard-go, iperf3), about 15 min.
bench-wg: deps bench-deps setup
	$(BIN)/python -m benchmarks.run --only wg $(BENCH_ARGS)

# The standard simulation scenarios (simulations/README.md). The 10,000-node one needs
# about 9 GB of memory: where it is not available it is skipped, the others still run,
# and the exit status says so. matplotlib (the `sim` extra) draws the PNGs.
sim: setup
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install --quiet -e '.[sim]'
	$(BIN)/python -m simulations.run --all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis benchmarks/results
