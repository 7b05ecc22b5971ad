"""The pytest plugin's fixtures (``pytest_plugins = ["reliable_tasks.testing"]`` or
``-p reliable_tasks.testing``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reliable_tasks.testing.broker import in_process
from reliable_tasks.testing.capture import Dispatches, capture_dispatches
from reliable_tasks.testing.worker import Run


@pytest.fixture
def reliable_tasks_inline() -> Iterator[list[Run]]:
    """For the whole test, tasks run in this process when their transaction commits
    (``run_at_commit()``); the fixture's value is the list of runs.

    In a ``django_db(transaction=True)`` test every commit runs its tasks. In a
    non-transactional ``django_db`` test the test's transaction never commits: wrap the code in
    ``with run_at_commit():`` (its end stands in for the commit), or run the callbacks with
    pytest-django's ``django_capture_on_commit_callbacks(execute=True)``.
    """
    with in_process("run") as scope:
        yield scope.runs


@pytest.fixture
def reliable_tasks_captured() -> Iterator[Dispatches]:
    """For the whole test, what is dispatched is captured and held, not sent or run
    (``capture_dispatches()``); the fixture's value is the ``Dispatches``. ``drain()`` runs
    what it holds."""
    with capture_dispatches() as captured:
        yield captured
