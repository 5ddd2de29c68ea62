# Set-up-and-run targets for a fresh machine: `make demo` and `make test` create .venv, install the
# pinned requirements, build the C++ extension and run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test

$(STAMP): requirements-ci.txt setup.py $(wildcard csrc/*)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-ci.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) examples/quickstart.py

# Two pytest-xdist workers: the CI machine's two cores (WORKERS=0 runs the tests in one process).
WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) tests
