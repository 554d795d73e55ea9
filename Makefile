# The README's commands. `make setup && make demo` runs the main job; `make test` runs the tests.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all test-distributed lint format bench docker clean

setup: $(VENV)/.installed

# CPU torch is pinned first (the wheel on disk); an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,serve,cpu-index]'
	touch $@

demo: setup
	$(BIN)/rlalign demo --out reports/demo

test: setup
	$(BIN)/pytest -q

test-all: setup
	$(BIN)/pytest -q -m "not gpu"

test-distributed: setup
	$(BIN)/pytest -q -m distributed

lint: setup
	$(BIN)/ruff check rlalign tests
	$(BIN)/ruff format --check rlalign tests

format: setup
	$(BIN)/ruff format rlalign tests
	$(BIN)/ruff check --fix rlalign tests

bench: setup
	$(BIN)/rlalign bench cider

docker:
	docker build -f docker/Dockerfile -t rlalign:latest .

clean:
	rm -rf runs reports .pytest_cache
