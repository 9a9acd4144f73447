# Sightline's two commands:  `make serve`  (the embedded default)  and  `make test`  (the whole suite).
# Both build the virtual environment first when pyproject.toml changed since it was last built.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
TEST_REDIS_URL ?= redis://127.0.0.1:6379/0
# With DATABASE_URL set and DEBUG off, settings want a strong SECRET_KEY (a deployment). The suite's
# own, for tests only: pytest's environment passes it to every process the tests start.
TEST_SECRET_KEY ?= sightline-test-suite-key-not-for-production-0123456789abcdef

.PHONY: install serve test lint bench-e2e cluster

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Sightline needs Python 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[worker,dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# The embedded default: SQLite, in-memory channel layer, one in-process worker thread, the tiny
# random model (its answers are noise). Prints a ready curl line, then serves on $(HOST):$(PORT).
serve: install
	$(PY) manage.py build_tiny_model
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo --if-empty
	$(PY) manage.py quickstart --host $(HOST) --port $(PORT)
	$(PY) manage.py serve --host $(HOST) --port $(PORT)

# The whole suite, against the local Postgres and Redis (started when they are down).
test: install
	$(VENV)/bin/ruff check .
	scripts/ensure-services
	scripts/ensure-chromium
	scripts/ensure-haproxy
	SECRET_KEY=$(TEST_SECRET_KEY) DATABASE_URL=$(TEST_DATABASE_URL) TEST_REDIS_URL=$(TEST_REDIS_URL) \
		$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The production topology on this machine, without containers, on the tiny model: two web processes
# behind HAProxy (Debian's package, installed when missing), two Celery workers, PostgreSQL and Redis.
# Serves on 127.0.0.1:$(CLUSTER_PORT) until Ctrl-C.
CLUSTER_PORT ?= 8800
cluster: install
	$(PY) platform/cluster --setup --port $(CLUSTER_PORT)
