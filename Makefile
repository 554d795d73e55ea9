# The README's commands. `make setup && make demo` runs the main job; `make test` runs the tests.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all test-distributed lint format bench docker docker-check lock clean

setup: $(VENV)/.installed

# CPU torch is pinned first (the wheel on disk); an unpinned torch would pull a multi-GB CUDA build.
# Everything installs under constraints.txt, the versions the tests run with (the Docker image uses it too).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,serve,cpu-index]'
	touch $@

demo: setup
	$(BIN)/rlalign demo --out reports/demo

test: setup
	$(BIN)/pytest -q --durations=25

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

docker: docker-check
	docker build -f docker/Dockerfile -t rlalign:latest .

# Lint docker/Dockerfile and check its pins are constraints.txt's (no Docker engine needed).
docker-check:
	$(PY) docker/check.py

# Re-pin constraints.txt from the working venv (after changing pyproject.toml; then run make test).
lock: setup
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^rlalign' | \
	  sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'; grep '^faiss-gpu' constraints.txt; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf runs reports .pytest_cache
