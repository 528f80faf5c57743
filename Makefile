# The two commands a newcomer runs (see README):
#   make run   install, start Redis if needed, migrate, seed, serve on :8000 with one worker, run a demo job
#   make test  install the test dependencies and run the whole suite on SQLite, then its database tests on PostgreSQL
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv

.PHONY: run test lint bench-p1 venv venv-dev clean

venv:
	@PYTHON=$(PYTHON) VENV=$(VENV) bash tools/venv.sh requirements.txt
	@PYTHON=$(PYTHON) VENV=$(VENV) bash tools/venv.sh requirements-client.txt

venv-dev:
	@PYTHON=$(PYTHON) VENV=$(VENV) bash tools/venv.sh requirements-dev.txt

run: venv
	@VENV=$(VENV) bash tools/run.sh

test: venv-dev
	@PYTHON=$(PYTHON) VENV=$(VENV) bash tools/venv.sh requirements-gpu.txt
	@VENV=$(VENV) bash tools/test.sh

lint: venv-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python tests/test_import_cycles.py

bench-p1: venv
	$(VENV)/bin/python bench/p1_submit.py

clean:
	rm -rf $(VENV) staticfiles .pytest_cache .ruff_cache
