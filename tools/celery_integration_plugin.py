"""Pytest plugin loaded into Celery's own integration tests by ``tools.celery_integration``.

Loaded with ``-p tools.celery_integration_plugin`` after ``-p celery.contrib.pytest``, it

- configures Django (``example_project.settings``, the run's ``DATABASE_URL``) before any Celery
  app is created, so Celery's Django fix-up and the ``reliable_tasks`` receivers are in place;
- overrides Celery's ``celery_parameters`` session fixture: ``task_cls`` is
  ``CELERY_IT_TASK_CLS`` when that is set (the ``reliable`` run), Celery's default otherwise;
- starts Celery's session worker before the first test, whatever ``-k`` selects;
- appends one JSON object a line to ``CELERY_IT_RESULTS``: the collected tests, the task class
  chain of the session app, and every test report as it comes, so a killed run still leaves its
  results behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

TASK_CLS_ENV = "CELERY_IT_TASK_CLS"
RESULTS_ENV = "CELERY_IT_RESULTS"
SETTINGS_MODULE = "example_project.settings"


def _write(record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to the results file (if one was given)."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    with Path(path).open("a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


def _crash_message(report: pytest.TestReport) -> str:
    """The first line of a failed (or rerun) report's error (``AssertionError: ...``...)."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = getattr(crash, "message", None) or report.longreprtext or ""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _class_chain(cls: type) -> list[str]:
    """``module.QualName`` of ``cls`` and of every class in its MRO."""
    return [f"{klass.__module__}.{klass.__qualname__}" for klass in cls.__mro__]


def pytest_configure(config: pytest.Config) -> None:
    """Set up Django before the first Celery app (and its Django fix-up) is created."""
    if not os.environ.get("DATABASE_URL"):
        raise pytest.UsageError("tools.celery_integration_plugin needs DATABASE_URL")
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    import django

    django.setup()


@pytest.fixture(scope="session")
def celery_parameters() -> dict[str, Any]:
    """Init parameters of the test Celery apps: ``task_cls`` from ``CELERY_IT_TASK_CLS``."""
    task_cls = os.environ.get(TASK_CLS_ENV)
    return {"task_cls": task_cls} if task_cls else {}


@pytest.fixture(scope="session", autouse=True)
def _celery_it_session(celery_session_app: Any, celery_session_worker: Any) -> None:
    """Start the session worker before the first test and record the session app's task class
    chain (the harness checks it per run).

    In a full run the first test starts the worker anyway; with ``-k`` a selection of tests
    that call tasks without asking for the worker (``test_trace_log_arguments``) needs it too.
    """
    _write({"kind": "meta", "task_class_chain": _class_chain(celery_session_app.Task)})


def pytest_collection_finish(session: pytest.Session) -> None:
    """Record the node ids of the collected tests."""
    _write({"kind": "collected", "nodeids": [item.nodeid for item in session.items]})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Record one report (setup, call or teardown; a subtest or a rerun attempt too)."""
    _write({
        "kind": "report",
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "wasxfail": hasattr(report, "wasxfail"),
        "subtest": type(report).__name__ == "SubtestReport",
        "duration": round(report.duration, 3),
        "message": _crash_message(report) if report.outcome in ("failed", "rerun") else "",
    })
