"""Celery's time limits on a ``ReliableTask``, against a real prefork worker.

A soft limit raises ``SoftTimeLimitExceeded`` inside the body: an ordinary exception, recorded
by the attempt itself. A hard limit kills the pool process; Celery reports it from the worker's
main process, which records it by task id (issue 16, item 4: the row stayed STARTED until its
lease expired, then LOST).
"""

from __future__ import annotations

import pytest
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from example_project.demo.models import Execution
from reliable_tasks import dispatch
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep
from tests.test_execution import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

#: Leases far longer than the test: the outcome must come from the time limit, not from expiry.
LONG_LEASE = {"RELIABLE_TASKS_LEASE_TIMEOUT": "300"}


def state_of(row: TaskRecord) -> str:
    return TaskRecord.objects.values_list("state", flat=True).get(pk=row.pk)


def test_a_hard_time_limit_ends_the_row_as_failure_at_once(redis_server, celery_worker,
                                                            worker_env, settings):
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = 300
    celery_worker(redis_server, env=worker_env(redis_server, **LONG_LEASE))
    row = dispatch("demo.overrun", ("hard", 30))

    wait_for(lambda: state_of(row) == TaskState.FAILURE, timeout=20, what="FAILURE")

    row.refresh_from_db()
    assert row.error_type == f"{TimeLimitExceeded.__module__}.TimeLimitExceeded"
    assert (row.attempts, row.lease_expires_at) == (1, None)
    assert row.finished_at is not None
    assert [entry["outcome"] for entry in row.history] == [TaskState.FAILURE]
    assert not Execution.objects.filter(token="hard").exists()


def test_a_hard_time_limit_the_task_retries_runs_its_attempts_then_fails(
        redis_server, celery_worker, worker_env, settings):
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = 300
    celery_worker(redis_server, env=worker_env(redis_server, **LONG_LEASE))
    row = dispatch("demo.overrun_retried", ("hard twice", 30))

    wait_for(lambda: state_of(row) == TaskState.RETRY, timeout=20, what="RETRY")
    assert sweep().published == 1, "the retry is published by the sweeper"
    wait_for(lambda: state_of(row) == TaskState.FAILURE, timeout=20, what="FAILURE")

    row.refresh_from_db()
    assert row.attempts == 2
    assert [entry["outcome"] for entry in row.history] == [TaskState.RETRY, TaskState.FAILURE]
    assert not Execution.objects.filter(token="hard twice").exists()


def test_a_soft_time_limit_is_an_error_of_the_attempt_retried_by_the_task(
        redis_server, celery_worker):
    celery_worker(redis_server)
    row = dispatch("demo.soft_overrun", ("soft", 5))

    wait_for(lambda: state_of(row) == TaskState.FAILURE, timeout=30, what="FAILURE")

    row.refresh_from_db()
    assert row.error_type == f"{SoftTimeLimitExceeded.__module__}.SoftTimeLimitExceeded"
    assert row.attempts == 2
    assert not Execution.objects.filter(token="soft").exists()
