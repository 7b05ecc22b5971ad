# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
comma := ,
# MySQL/MariaDB needs the mysqlclient driver (built against libmariadb); only when asked for.
EXTRAS := dev$(if $(filter mysql%,$(DATABASE_URL)),$(comma)mysql,)
# Requirements installed with the project, e.g. PINS='django~=5.2.0 celery~=5.5.0' for the oldest
# supported combination (give each combination a VENV of its own).
PINS ?=
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))$(if $(PINS),-$(shell printf %s '$(PINS)' | tr -c 'A-Za-z0-9.' '-'))

.PHONY: install demo test faults lint bench clean celery-integration

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]' $(PINS)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m example_project.run_demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest -W error $(PYTEST_ARGS)

# Fault scenarios at full scale, plain Celery vs reliable_tasks: Redis's table (about 10 min),
# then the database's (about 9 min; needs PostgreSQL's server binaries, skipped without them).
# The same scenarios at the test suite's scale: make test PYTEST_ARGS='-m faults'.
faults: install
	$(PY) -m benchmarks.faults $(FAULTS_ARGS)

lint: install
	$(VENV)/bin/ruff check reliable_tasks tests example_project benchmarks noxfile.py
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# Each benchmark prints its table; the million-row ones share a database of their own.
LARGE_BENCH_DB ?= postgres://postgres@127.0.0.1:5432/reliable_tasks_bench_large
bench: install
	$(PY) -m benchmarks.run_all
	$(PY) -m benchmarks.bench_reconcile
	DATABASE_URL=$(LARGE_BENCH_DB) $(PY) -m benchmarks.bench_sweeper
	DATABASE_URL=$(LARGE_BENCH_DB) $(PY) -m benchmarks.bench_admin

# Celery's own integration tests (test_tasks.py, test_canvas.py), with plain Celery and with
# ReliableTask as the app's task_cls, compared test by test (about 20 min per run; needs
# PostgreSQL at 127.0.0.1:5432). Downloads Celery's sdist and makes a venv in var/celery-integration/.
celery-integration: install
	$(PY) -m tools.celery_integration $(CELERY_INTEGRATION_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
