"""Test sessions across the supported Python, Django and Celery versions (``pip install nox``).

``nox -l`` lists the sessions; ``nox`` runs the default one (the newest combination, as CI
does); ``nox -s tests`` runs the whole matrix (Python 3.11 to 3.13 x Django 5.2, 6.0, 6.1 x
Celery 5.5, 5.6, 5.7, less Django 6 on Python 3.11, which it does not support: 21 sessions);
``nox -s "tests(python='3.11', django='5.2', celery='5.5')"`` one of them. Arguments after
``--`` go to pytest: ``nox -s tests -- -k outbox -x``; ``-- -m "not faults"`` leaves out the
slow fault scenarios (tests/faults/).

Every test session runs the suite on SQLite (``DATABASE_URL`` is set for it, whatever the
shell has), against the real ``redis-server`` processes the suite starts itself; each session
has its own database file. Interpreters are looked up on ``PATH``: with pyenv, make several
visible at once, e.g. ``PYENV_VERSION=3.11.7:3.12.1:3.13.0 nox -s tests``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False

HERE = Path(__file__).resolve().parent
#: Python versions each supported Django runs on: Django 6.0 and 6.1 need Python 3.12.
#: Django 5.2 LTS is the oldest: the models use CheckConstraint(condition=...), new in 5.1.
PYTHONS_OF_DJANGO = {
    "5.2": ["3.11", "3.12", "3.13"],
    "6.0": ["3.12", "3.13"],
    "6.1": ["3.12", "3.13"],
}
#: Celery 5.5 and 5.6 publish batches through the publisher's own Redis pipeline, 5.7 through
#: kombu 5.7's Producer.batch (reliable_tasks/publisher.py).
CELERIES = ["5.5", "5.6", "5.7"]
#: Every possible (Python, Django) pair.
PAIRS = [(python, django) for django, pythons in PYTHONS_OF_DJANGO.items() for python in pythons]
PYTHONS = sorted({python for python, _ in PAIRS})
#: The newest combination: the default session.
NEWEST_DJANGO = list(PYTHONS_OF_DJANGO)[-1]
DEFAULT = f"tests(python='{PYTHONS[-1]}', django='{NEWEST_DJANGO}', celery='{CELERIES[-1]}')"

nox.options.sessions = [DEFAULT]


def _sqlite_url(session: nox.Session) -> str:
    """A SQLite file of this session's own under ``var/`` (the settings add ``.test-<pid>``)."""
    var = HERE / "var"
    var.mkdir(exist_ok=True)
    name = "".join(c if c.isalnum() else "-" for c in session.name).strip("-")
    return f"sqlite:///{var / f'nox-{name}.sqlite3'}"


@nox.session
@nox.parametrize("celery", CELERIES)
@nox.parametrize(("python", "django"), PAIRS)
def tests(session: nox.Session, django: str, celery: str) -> None:
    """The test suite with warnings as errors, on SQLite, for one Python, Django and Celery."""
    # One resolver pass, so kombu and the rest follow the pinned Celery.
    session.install("-e", ".[test,metrics]", f"django~={django}.0", f"celery~={celery}.0")
    session.run("python", "-m", "pip", "list", "--format=freeze")
    env = {"DATABASE_URL": _sqlite_url(session), "PYTHONDONTWRITEBYTECODE": "1"}
    session.run("python", "-m", "pytest", "-W", "error", *session.posargs, env=env)


@nox.session(python=PYTHONS[-1])
def lint(session: nox.Session) -> None:
    """Ruff, the import-linter contracts (setup.cfg) and mypy (mypy.ini)."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", "reliable_tasks", "tests", "example_project", "benchmarks",
                "noxfile.py")
    session.run("lint-imports")
    session.run("mypy", env={"DJANGO_SETTINGS_MODULE": os.environ.get(
        "DJANGO_SETTINGS_MODULE", "example_project.settings")})
