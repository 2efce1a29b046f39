# Two commands do all set-up: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test unit integration lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[ml,test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dgpt demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/integration tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check dgpt autoscaler deployments benchmarks tests
	$(BIN)/mypy dgpt autoscaler

bench: $(STAMP)
	$(BIN)/python -m benchmarks.fleet_sim --quick

clean:
	rm -rf $(VENV) *.egg-info
