# Two commands do all set-up: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test unit integration lint bench clean system

# Debian packages the tests need (the overlay, the sandbox, separate-host namespaces, the
# browser that drives the pages), installed through apt-get when missing; without root or
# apt-get the tests that need one skip and say which.
SYSTEM_TOOLS := wireguard-go:wireguard-go wg:wireguard-tools nft:nftables bwrap:bubblewrap ip:iproute2 chromium:chromium

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[ml,test]"
	@touch $(STAMP)

system:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing:$$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; } || \
		echo "warning: could not install$$missing; the tests that need them will skip"; \
	else echo "note:$$missing missing and not installable here (needs root and apt-get); the tests that need them will skip"; fi

demo: $(STAMP) system
	$(BIN)/dgpt demo

test: $(STAMP) system
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=40 tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

integration: $(STAMP) system
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/integration tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check dgpt autoscaler deployments benchmarks tests
	$(BIN)/mypy dgpt autoscaler

bench: $(STAMP)
	$(BIN)/python -m benchmarks.fleet_sim --quick

clean:
	rm -rf $(VENV) *.egg-info
