# brainlm: `make demo` runs the main job end to end on the embedded defaults, `make test` the test suite.
# Both create .venv when it is missing. torch==2.13.0 goes in first: an unpinned torch pulls a multi-GB CUDA build.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" DEMO_DIR="$(DEMO_DIR)" bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash benchmarks/run_all.sh

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
