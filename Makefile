# Every target builds what it needs: a fresh clone runs `make demo` or `make test` and nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINTED := src tests bench .ci

.PHONY: demo test bench lint venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tokenworks demo $(if $(DURATION),--duration $(DURATION),)

# Lint, format, types, then the tests with line coverage (printed per package; no threshold yet).
# `make test COV=` skips coverage: line tracing costs about a third more CPU on Python 3.11.
COV ?= --cov --cov-report=
# Test processes: most tests wait on sockets and subprocesses, so 4 share 2 cores well
# (the suite's wall time about halves); `make test JOBS=0` runs them in this process.
JOBS ?= 4
test: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(PY) -m mypy
	$(PY) -m pytest -q -n $(JOBS) $(COV)
	$(if $(COV),$(PY) .ci/coverage_summary.py)

bench: $(STAMP)
	$(PY) bench/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .coverage
