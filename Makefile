# jaxfit: the two commands of the README.
#   make demo   installs the runtime requirements and trains the CLIP demo (CPU, minutes)
#   make test   installs the test requirements and runs lint + the whole test suite
#   make test-fast   the quick loop: lint + every test not marked slow (no install)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
WORKDIR ?= runs/clip_demo

.PHONY: install install-dev demo test test-fast lint format

install:
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .

install-dev:
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps -e .

demo: install
	$(PYTHON) -m jaxfit.train --config configs/clip_coco.py:demo --workdir $(WORKDIR)

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

test: install-dev lint
	$(PYTHON) -m pytest -q -n 2 --durations=15

test-fast: lint
	$(PYTHON) -m pytest -q -n 2 -m "not slow" --durations=10
