"""Helpers and a pytest plugin for testing code that dispatches reliable tasks.

Nothing here needs Redis or a worker. While one of them is active, the outbox publishes to an
in-process stand-in for the broker, and tasks run in the test's own process through their claim
and their outcome, so the ledger (``TaskRecord``) ends as it would in production:

- ``run_at_commit()``: a context manager; the tasks dispatched in it run when their
  transaction commits. Yields the list of ``Run``\\ s.
- ``capture_dispatches()``: a context manager; what the block dispatches is recorded and held
  (neither sent nor run). Yields ``Dispatches``, with ``assert_dispatched()``.
- ``drain(advance=False, max_runs=1000)``: run every due task of the ledger until none is left;
  ``advance=True`` skips countdowns and retry backoffs.

Loaded as a pytest plugin (``pytest_plugins = ["reliable_tasks.testing"]`` in a conftest, or
``pytest -p reliable_tasks.testing``), it adds the fixtures ``reliable_tasks_inline`` and
``reliable_tasks_captured``: the same for a whole test. Everything is put back when the block or
the test ends. Turn Celery's ``task_always_eager`` off in these tests: it runs tasks at the call,
around the outbox.
"""

from __future__ import annotations

from importlib.util import find_spec

from reliable_tasks.testing.broker import MAX_RUNS, TooManyRuns
from reliable_tasks.testing.capture import Dispatches, capture_dispatches
from reliable_tasks.testing.inline import drain, run_at_commit
from reliable_tasks.testing.worker import WORKER, Run

__all__ = ["MAX_RUNS", "WORKER", "Dispatches", "Run", "TooManyRuns", "capture_dispatches",
           "drain", "run_at_commit"]

if find_spec("pytest") is not None:  # the plugin's fixtures; the helpers work without pytest
    from reliable_tasks.testing.fixtures import reliable_tasks_captured, reliable_tasks_inline

    __all__ += ["reliable_tasks_captured", "reliable_tasks_inline"]
