# Two commands on a fresh machine: `make demo` and `make test` (each creates .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow test-all env clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[data,dev,notebooks]"
	touch $@

env: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/d3jax demo --out demo_out

# `make test`: everything but the tests marked slow (end-to-end training, subprocesses, notebooks);
# `make test-slow`: only those; CI runs both; `make test-all`: both in one pytest session.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -m "not slow"

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -m slow

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -n 2

clean:
	rm -rf $(VENV) demo_out .pytest_cache
