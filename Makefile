# Two-command quickstart: `make train` and `make test` (each builds .venv when missing).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv train test test-all lint bench probe clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/sysopt-train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check sysopt tests bench
	$(BIN)/ruff format --check sysopt tests bench

bench: $(STAMP)
	$(BIN)/sysopt-bench $(SUITE)

bench-deps: $(STAMP)
	$(BIN)/python -m pip install -c constraints.txt deepspeed torchao ninja

probe: $(STAMP)
	$(BIN)/sysopt-probe

clean:
	rm -rf $(VENV) bench/results/*.tmp outputs multirun
