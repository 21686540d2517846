# Two entry points: `make test` (ruff, then pytest) and `make demo`; both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2
DEMO_DIR ?= runs/demo
# the tested versions (see its header); `make install CONSTRAINTS=` installs from the ranges only
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
EXTRAS ?= dev,demo,trackers

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, at the constraints' pair: the pair that installs and works on a
	# CPU machine.
	$(PY) -m pip install -q $(PIN) torch torchvision
	$(PY) -m pip install -q $(PIN) -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(PYTEST_WORKERS) --durations=15 tests

demo: $(STAMP)
	$(PY) launch/demo.py --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) runs .pytest_cache
