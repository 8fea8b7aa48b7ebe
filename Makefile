# i3node: the two set-up commands are `make demo` and `make test`.
# Each one installs what it needs (virtualenv, the package and its dependencies,
# Debian tools for the tests) and is a no-op install on the second run.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.i3node-installed
APT_TEST_PACKAGES := dcmtk dicom3tools systemd
export TCP_NODELAY := 1
export PYTHONUNBUFFERED := 1

.PHONY: test demo bench venv test-tools clean help

help:
	@echo "make demo   - run the whole i3node loop on loopback with tiny local models"
	@echo "make test   - run the test suite (installs DCMTK and dicom3tools if missing)"
	@echo "make bench  - run the benchmarks (ratios against side-by-side baselines)"

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    echo "python3 -m venv failed; installing python3-venv"; \
	    rm -rf $(VENV); \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && \
	    $(PYTHON) -m venv $(VENV); }; \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar off -e '.[test,bench]'
	@touch $@

venv: $(STAMP)

test-tools:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

test: $(STAMP) test-tools
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/i3node demo

bench: $(STAMP) test-tools
	$(PY) -m benchmarks.receive --variants all
	$(PY) -m benchmarks.seg
	$(PY) -m benchmarks.memory
	$(PY) -m benchmarks.inference
	$(PY) -m benchmarks.loop

clean:
	rm -rf $(VENV) var .cache .pytest_cache
