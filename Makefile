# jaxfit: the two commands of the README.
#   make demo   installs the runtime requirements and trains the CLIP demo (CPU, minutes)
#   make test   installs the test requirements and runs lint + the whole test suite
#   make test-fast   the quick loop: lint + every test not marked slow
# Everything runs in a fresh virtualenv ($(VENV), made with `python3 -m venv`), so nothing
# the system Python imports at start-up can hide a failure. It is built once and reused;
# a change to a requirements file or pyproject.toml reinstalls (stamp files in $(VENV)).
BASE_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
WORKDIR ?= runs/clip_demo

.PHONY: install install-dev sandbox-tool demo test test-fast lint format

$(VENV)/bin/python:
	$(BASE_PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python requirements.txt pyproject.toml
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# bubblewrap isolates evaluate_code's samples (docs/evaluate-code.md). Installed
# with apt-get when missing and this is root; never fatal (the tests then cover the fallback).
sandbox-tool:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1; } \
	  || echo "warning: bubblewrap (bwrap) is not installed and could not be; evaluate_code falls back to a weaker sandbox"

demo: install
	$(PYTHON) -m jaxfit.train --config configs/clip_coco.py:demo --workdir $(WORKDIR)

lint: install-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install-dev
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

test: install-dev sandbox-tool lint
	$(PYTHON) -m pytest -q -n 2 --durations=15

test-fast: install-dev lint
	$(PYTHON) -m pytest -q -n 2 -m "not slow" --durations=10
