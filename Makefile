# mcpd — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# The PostgreSQL + Redis half of the suite (and the multi-process tests) use these.
MCPD_TEST_PG_URL ?= postgres://postgres@127.0.0.1:5432/mcpd
MCPD_TEST_REDIS_URL ?= redis://127.0.0.1:6379/0
export MCPD_TEST_PG_URL MCPD_TEST_REDIS_URL

.PHONY: help venv run test lint types migrations-check pytest pytest-embedded pytest-services bench bench-quick bench-pool bench-metrics soak fuzz clean

help:
	@echo "make run    - install, migrate, print dev tokens, serve on http://$(HOST):$(PORT)"
	@echo "make test   - lint, types, migrations check and the whole test suite"
	@echo "make bench  - benchmarks (not part of make test); make bench-quick, make soak, make bench-metrics"
	@echo "make fuzz   - the fuzz test's long run (HYPOTHESIS_PROFILE=soak; part of make soak)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

run: venv
	@DJANGO_DEBUG=1 $(PY) manage.py migrate --verbosity 0
	@DJANGO_DEBUG=1 $(PY) manage.py devtokens
	DJANGO_DEBUG=1 $(PY) manage.py serve --bind $(HOST) --port $(PORT)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The app is checked with --strict; the tests and the bench with the project's settings.
types: venv
	$(VENV)/bin/mypy .
	$(VENV)/bin/mypy --strict mcpd_site virtual_llms

migrations-check: venv
	DJANGO_DEBUG=1 $(PY) manage.py makemigrations --check --dry-run

# The suite runs twice: embedded (SQLite, in-memory layer) and on PostgreSQL + Redis.
# The second run, and the multi-process tests in the first, need the services: without
# them they are skipped and said so, except under CI=true, where that fails. The fuzz tests
# start a broker of their own whatever the run's database: they run in the first run only.
pytest: pytest-embedded pytest-services

# PYTEST_WORKERS=2: the first run on two xdist workers, the tests that start processes on
# one, one after another (tests/conftest.py), the in-process tests on the other: 6.5 min
# instead of 8.5 on two cores, but the process tests' timings then share a core, and two of
# three such runs had a timing flake (a revocation broadcast later than the next request).
# So by default one process.
PYTEST_WORKERS ?= 0
pytest-embedded: venv
	$(PY) -m pytest $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS)

pytest-services: venv
	@if $(PY) tests/services_up.py; then \
	  DATABASE_URL=$(MCPD_TEST_PG_URL) REDIS_URL=$(MCPD_TEST_REDIS_URL) \
	    $(PY) -m pytest -m "not multiproc and not browser and not fuzz" $(PYTEST_ARGS); \
	elif [ "$$CI" = "true" ]; then \
	  echo "CI: PostgreSQL or Redis is unreachable; the services suite must run." >&2; exit 1; \
	else \
	  echo "SKIPPED: the PostgreSQL + Redis run of the suite (services unreachable)."; \
	fi

test: lint types migrations-check pytest

# The bench's optional dependencies, installed once per change of pyproject.toml (as venv).
$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	@touch $@

bench: $(VENV)/.installed-bench
	$(PY) -m bench.run

bench-quick: $(VENV)/.installed-bench
	$(PY) -m bench.run --quick

# A pool of three backends on three workers: spread, queue wait at 2x capacity, failover.
bench-pool: $(VENV)/.installed-bench
	$(PY) -m bench.pool

# How long a scrape of /metrics takes with 500 backends (issue 23: under 50 ms).
bench-metrics: $(VENV)/.installed-bench
	$(PY) -m bench.metrics_scrape

# tests/test_fuzz.py with 40 times the inputs of make test (about 75,000; the count is printed).
fuzz: venv
	HYPOTHESIS_PROFILE=soak $(PY) -m pytest -p no:cacheprovider -o timeout=0 tests/test_fuzz.py

# Sustained load, then: nothing failed, nothing left behind, RSS and threads flat (~22 min);
# then the long fuzz run.
soak: $(VENV)/.installed-bench
	$(PY) -m bench.run --soak
	$(MAKE) fuzz

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .test-db.sqlite3* staticfiles
