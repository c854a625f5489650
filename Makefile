# brainlm: `make demo` runs the main job end to end on the embedded defaults, `make test` the test suite.
# Both create .venv when it is missing. torch==2.13.0 goes in first: an unpinned torch pulls a multi-GB CUDA build.
# Without an NVIDIA GPU it comes from PyTorch's CPU index when that answers (PyPI's torch is the CUDA build);
# where the index cannot be reached (an offline machine with a local wheel, as CI's), from the configured indexes.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_DIR ?= demo
# Test processes: whole files per process (--dist loadfile), so a file's module fixtures (a trained model, a shard
# set) are built once. 2 on the 2-core CI machine: the suite's many subprocesses (ranks, servers, CLIs) wait on I/O
# and start-up often enough that two files side by side finish in 0.67x the time of one after the other.
TEST_WORKERS ?= 2

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1 && $(PY) -c "import urllib.request as u; \
	    u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" >/dev/null 2>&1; then \
	  echo "$(PY) -m pip install -q $(TORCH) --index-url $(TORCH_CPU_INDEX)"; \
	  $(PY) -m pip install -q $(TORCH) --index-url $(TORCH_CPU_INDEX); \
	else \
	  echo "$(PY) -m pip install -q $(TORCH)"; \
	  $(PY) -m pip install -q $(TORCH); \
	fi
	$(PY) -m pip install -q -e '.[all,dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" DEMO_DIR="$(DEMO_DIR)" bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

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
