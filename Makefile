# Every target bootstraps .venv with pip (no uv, no poetry).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers for make test: each test runs on one torch thread (tests/conftest.py), so two workers use
# both cores of a 2-core machine (the default suite: about 20 to 25 minutes on one core, 12 to 14 on two).
TEST_WORKERS ?= 2

.PHONY: demo test test-all bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m cli.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m ""

bench: $(STAMP)
	$(BIN)/python benchmarks/plan.py
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/precision.py
	$(BIN)/python benchmarks/precision.py --preset mnist --batch 64 --n 128

clean:
	rm -rf $(VENV) build *.egg-info
