# modelyard: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup system-deps bench-deps demo test lint unit bench bench-proxy bench-placement clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests drive for real: Chromium for the dashboard tests.
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Chromium for the dashboard tests (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# wrk and nginx for the proxy benchmark.
bench-deps:
	@command -v wrk >/dev/null 2>&1 && command -v nginx >/dev/null 2>&1 || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light; }

# Sets up everything (gateway venv, engine venv with vLLM for CPU, demo models) and serves.
demo: setup
	$(VENV)/bin/modelyard demo

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

# Everything CI runs: lint, types, unit and integration tests, real vLLM engines on CPU
# (the first run builds the engine venv and the demo models under ~/.cache/modelyard).
test: setup system-deps
	$(MAKE) lint
	$(VENV)/bin/modelyard demo --setup-only
	$(PY) -m pytest tests

unit: setup
	$(PY) -m pytest tests -m "not vllm and not chromium and not diffusion and not ray"

bench: bench-proxy bench-placement

bench-proxy: setup bench-deps
	$(PY) -m bench.proxy

bench-placement: setup
	$(PY) -m bench.placement.simulate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
