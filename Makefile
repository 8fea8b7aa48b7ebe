# i3node: the two set-up commands are `make demo` and `make test`.
# Each one installs what it needs (virtualenv, the package and its dependencies,
# Debian tools for the tests) and is a no-op install on the second run.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.i3node-installed
APT_TEST_PACKAGES := dcmtk dicom3tools systemd postgresql
export TCP_NODELAY := 1
export PYTHONUNBUFFERED := 1

.PHONY: test demo bench eval venv test-tools clean help install-service

help:
	@echo "make demo   - run the whole i3node loop on loopback with tiny local models"
	@echo "make test   - run the test suite (installs DCMTK and dicom3tools if missing)"
	@echo "make bench  - run the benchmarks (ratios against side-by-side baselines)"
	@echo "make eval   - i3node evaluate on 8 held-out phantoms with the demo models (report in var/evaluate)"

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
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The tiny demo models are trained once (cached in .cache/demo-models) before the tests,
# with progress, so that no test's time limit includes model training.
# ruff and mypy (configured in pyproject.toml) run first: a lint or type error fails early.
test: $(STAMP) test-tools
	$(VENV)/bin/ruff check node dicom models tests benchmarks
	$(PY) -m mypy
	$(VENV)/bin/i3node train demo-models
	$(PY) -m pytest -q --durations=15

demo: $(STAMP)
	$(VENV)/bin/i3node demo

# The simulated radiologist over 8 held-out phantoms: every selection x planes x refiner
# (about 5 minutes on 2 cores once the demo models are cached); report in var/evaluate.
eval: $(STAMP)
	$(VENV)/bin/i3node evaluate --cases 8 --out var/evaluate

bench: $(STAMP) test-tools
	$(PY) -m benchmarks.receive --variants all
	$(PY) -m benchmarks.seg
	$(PY) -m benchmarks.memory
	$(PY) -m benchmarks.inference
	$(PY) -m benchmarks.loop

clean:
	rm -rf $(VENV) var .cache .pytest_cache

# Install as a systemd service (as root): dedicated user, code + venv under /opt/i3node,
# config in /etc/i3node, the hardened unit. DESTDIR=/some/dir stages the layout without
# touching the system (no user, no systemctl); GPU=1 adds the NVIDIA drop-in.
PREFIX ?= /opt/i3node
DESTDIR ?=
install-service:
	@set -e; \
	if [ -z "$(DESTDIR)" ]; then \
	  id -u i3node >/dev/null 2>&1 || useradd --system --user-group --home-dir /var/lib/i3node \
	    --no-create-home --shell /usr/sbin/nologin i3node; \
	fi; \
	install -d -m 0755 $(DESTDIR)$(PREFIX)/src $(DESTDIR)/etc/i3node $(DESTDIR)/etc/systemd/system; \
	git ls-files -z | xargs -0 -I{} install -D -m 0644 {} $(DESTDIR)$(PREFIX)/src/{}; \
	install -m 0644 systemd/i3node.service $(DESTDIR)/etc/systemd/system/i3node.service; \
	if [ "$(GPU)" = "1" ]; then install -D -m 0644 systemd/gpu.conf $(DESTDIR)/etc/systemd/system/i3node.service.d/gpu.conf; fi; \
	if [ ! -e $(DESTDIR)/etc/i3node/i3node.toml ]; then \
	  sed 's|^state_dir = "var"|state_dir = "/var/lib/i3node"|; s|^cache_dir = ".cache/demo-models"|cache_dir = "/var/cache/i3node/demo-models"|' \
	    config/i3node.example.toml > $(DESTDIR)/etc/i3node/i3node.toml; \
	  chmod 0640 $(DESTDIR)/etc/i3node/i3node.toml; \
	fi; \
	if [ -z "$(DESTDIR)" ]; then \
	  chgrp i3node /etc/i3node/i3node.toml; \
	  test -x $(PREFIX)/.venv/bin/python || $(PYTHON) -m venv $(PREFIX)/.venv; \
	  $(PREFIX)/.venv/bin/pip install --quiet --upgrade pip; \
	  $(PREFIX)/.venv/bin/pip install --quiet $(PREFIX)/src; \
	  systemctl daemon-reload; \
	  echo "installed: edit /etc/i3node/i3node.toml, then: systemctl enable --now i3node"; \
	else \
	  echo "staged under $(DESTDIR)"; \
	fi
