# flasht5 — every user-facing target sets itself up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On a machine with an NVIDIA GPU the venv sees the system's CUDA torch and gets no CPU pins; elsewhere the CPU pins
# (torch +cpu, triton, numpy<2.4, transformers) keep pip from pulling a multi-GB CUDA build.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS ?= $(if $(HAS_GPU),,.ci/constraints-cpu.txt)
VENV_FLAGS := $(if $(HAS_GPU),--system-site-packages,)

.PHONY: install test test-gpu lint demo clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# fetch_upstream.py: transformers' own test harness (tests/ of its source release, not in its wheel) for
# tests/hf_suite, into .venv/hf-tests once (never committed); offline it warns and the suite skips itself.
test: $(STAMP)
	$(BIN)/python tests/hf_suite/fetch_upstream.py
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
