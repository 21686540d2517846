# Two entry points: `make test` (ruff, then pytest) and `make demo`; both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2
DEMO_DIR ?= runs/demo

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned first: the pair that installs and works on a CPU machine.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(PYTEST_WORKERS) --durations=15 tests

demo: $(STAMP)
	$(PY) launch/demo.py --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) runs .pytest_cache
