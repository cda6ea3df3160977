# flasht5 — every user-facing target sets itself up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU pins (torch +cpu, triton, numpy<2.4, transformers) unless a CUDA torch is already present.
CONSTRAINTS ?= .ci/constraints-cpu.txt

.PHONY: install test test-gpu lint demo clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

test-gpu:
	PYTHONPATH=src python3 -m pytest -q -m gpu tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

demo: $(STAMP)
	$(BIN)/flasht5 train configs/pretrain/demo.yaml

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
