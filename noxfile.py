"""Test sessions across the supported Python, Django and Celery versions (``pip install nox``).

``nox -l`` lists the sessions; ``nox`` runs the default one (the newest combination, as CI
does); ``nox -s tests`` runs the whole matrix; ``nox -s "tests-3.12(django='4.2', celery='5.5')"``
one of them. Arguments after ``--`` go to pytest: ``nox -s tests -- -k outbox -x``.

Every test session runs the suite on SQLite (``DATABASE_URL`` is set for it, whatever the
shell has), against the real ``redis-server`` processes the suite starts itself; each session
has its own database file. Interpreters are looked up on ``PATH``: with pyenv, make several
visible at once, e.g. ``PYENV_VERSION=3.11.7:3.12.1 nox -s tests``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False

HERE = Path(__file__).resolve().parent
PYTHONS = ["3.11", "3.12"]
#: Django 5.2 LTS only: the models use CheckConstraint(condition=...), which needs Django 5.1
#: (5.1 is out of support); add 6.x here when the project supports it.
DJANGOS = ["5.2"]
#: Celery 5.7 (with kombu 5.7) only: the publisher batches with kombu's Producer.batch(),
#: new in kombu 5.7; add "5.5" and "5.6" here if the publisher gains a fallback.
CELERIES = ["5.7"]
#: The newest combination: the default session.
DEFAULT = f"tests-{PYTHONS[-1]}(django='{DJANGOS[-1]}', celery='{CELERIES[-1]}')"

nox.options.sessions = [DEFAULT]


def _sqlite_url(session: nox.Session) -> str:
    """A SQLite file of this session's own under ``var/`` (the settings add ``.test-<pid>``)."""
    var = HERE / "var"
    var.mkdir(exist_ok=True)
    name = "".join(c if c.isalnum() else "-" for c in session.name).strip("-")
    return f"sqlite:///{var / f'nox-{name}.sqlite3'}"


@nox.session(python=PYTHONS)
@nox.parametrize("celery", CELERIES)
@nox.parametrize("django", DJANGOS)
def tests(session: nox.Session, django: str, celery: str) -> None:
    """The test suite with warnings as errors, on SQLite, for one Django x Celery pair."""
    # One resolver pass, so kombu and the rest follow the pinned Celery.
    session.install("-e", ".[test,metrics]", f"django~={django}.0", f"celery~={celery}.0")
    session.run("python", "-m", "pip", "list", "--format=freeze")
    env = {"DATABASE_URL": _sqlite_url(session), "PYTHONDONTWRITEBYTECODE": "1"}
    session.run("python", "-m", "pytest", "-W", "error", *session.posargs, env=env)


@nox.session(python=PYTHONS[-1])
def lint(session: nox.Session) -> None:
    """Ruff, the import-linter contracts (setup.cfg) and mypy (mypy.ini)."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", "reliable_tasks", "tests", "example_project", "benchmarks")
    session.run("lint-imports")
    session.run("mypy", env={"DJANGO_SETTINGS_MODULE": os.environ.get(
        "DJANGO_SETTINGS_MODULE", "example_project.settings")})
