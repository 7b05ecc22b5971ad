"""Recovery with real workers: killed workers, a Redis restarted empty, retry spacing.

Each scenario counts what was dispatched, executed and executed twice, and asserts on the counts.
The test plays the sweeper: it runs a pass every ``SWEEP_INTERVAL`` while it waits.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime

import pytest
from django.db.models import Count

from example_project.demo.models import Execution
from reliable_tasks import dispatch, dispatch_many, retry
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.faults]

LEASE_TIMEOUT = 3.0
SWEEP_INTERVAL = 1.0
#: Worker settings that make leases short, so recovery fits in a test.
FAST_LEASES = {"RELIABLE_TASKS_LEASE_TIMEOUT": "3", "RELIABLE_TASKS_HEARTBEAT_INTERVAL": "0.5"}


@pytest.fixture(autouse=True)
def short_leases(settings):
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = LEASE_TIMEOUT
    settings.RELIABLE_TASKS_SWEEP_INTERVAL = SWEEP_INTERVAL
    settings.RELIABLE_TASKS_PUBLISH_GRACE = 2


def sweeping_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Run sweeper passes until ``condition`` holds; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        sweep()
        time.sleep(SWEEP_INTERVAL)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def state_of(task_id) -> str:
    return TaskRecord.objects.values_list("state", flat=True).get(pk=task_id)


def executions(token: str) -> int:
    return Execution.objects.filter(token=token).count()


def wait_started(task_id, timeout: float = 30) -> None:
    sweeping_until(lambda: state_of(task_id) == TaskState.STARTED, timeout, "STARTED")


def test_a_killed_worker_s_resumable_task_completes_exactly_once_more(
        redis_server, celery_worker):
    first = celery_worker(redis_server, env=FAST_LEASES)
    row = dispatch("demo.resumable_record", ("pod-killed", 3.0))
    wait_started(row.id)

    first.kill_all()
    killed_at = time.monotonic()
    celery_worker(redis_server, env=FAST_LEASES)
    took = sweeping_until(lambda: state_of(row.id) == TaskState.SUCCESS,
                          LEASE_TIMEOUT + SWEEP_INTERVAL + 20, "SUCCESS after the kill")

    assert executions("pod-killed") == 1
    recovered = TaskRecord.objects.get(pk=row.id)
    assert recovered.attempts == 2
    assert time.monotonic() - killed_at >= LEASE_TIMEOUT - 0.5, "not before the lease ran out"
    assert took < LEASE_TIMEOUT + SWEEP_INTERVAL + 15


def test_a_killed_worker_s_other_task_is_lost_until_a_human_retries_it(
        redis_server, celery_worker):
    first = celery_worker(redis_server, env=FAST_LEASES)
    row = dispatch("demo.record", ("lost-then-retried", 3.0))
    wait_started(row.id)

    first.kill_all()
    sweeping_until(lambda: state_of(row.id) == TaskState.LOST, LEASE_TIMEOUT + 15, "LOST")
    assert executions("lost-then-retried") == 0

    celery_worker(redis_server, env=FAST_LEASES)
    retry(row.id)
    sweeping_until(lambda: state_of(row.id) == TaskState.SUCCESS, 30, "SUCCESS after retry")
    assert executions("lost-then-retried") == 1


def test_a_killed_pool_process_s_task_is_recovered_by_the_same_worker(
        redis_server, celery_worker):
    worker = celery_worker(redis_server, concurrency=1, env=FAST_LEASES)
    row = dispatch("demo.resumable_record", ("child-killed", 3.0))
    wait_started(row.id)

    worker.kill_pool_child()
    sweeping_until(lambda: state_of(row.id) == TaskState.SUCCESS,
                   LEASE_TIMEOUT + SWEEP_INTERVAL + 20, "SUCCESS after the pool kill")

    assert executions("child-killed") == 1
    assert worker.is_running()


def test_redis_restarted_empty_while_500_tasks_are_queued_runs_each_exactly_once(
        redis_server, celery_worker):
    records = dispatch_many([("demo.record", (f"restart-{i}",)) for i in range(500)])
    assert redis_server.client().llen("celery") == 500
    sweep()  # remembers the broker's run id

    redis_server.restart()
    celery_worker(redis_server, concurrency=2, env=FAST_LEASES)
    ids = [r.id for r in records]
    sweeping_until(lambda: TaskRecord.objects.filter(
        id__in=ids, state=TaskState.SUCCESS).count() == 500, 120, "500 SUCCESS")

    per_token = Counter(dict(Execution.objects.filter(token__startswith="restart-")
                             .values_list("token").annotate(n=Count("id"))))
    assert len(per_token) == 500, "lost tasks"
    assert max(per_token.values()) == 1, "a body ran twice"


def test_retries_are_spaced_by_the_backoff_and_end_in_failure(redis_server, celery_worker):
    celery_worker(redis_server)
    result = dispatch("demo.always_fails")  # max_attempts=3, retry_backoff=1, cap 2
    sweeping_until(lambda: state_of(result.id) == TaskState.FAILURE, 40, "FAILURE")

    row = TaskRecord.objects.get(pk=result.id)
    assert row.attempts == 3
    outcomes = [entry["outcome"] for entry in row.history]
    assert outcomes == ["RETRY", "RETRY", "FAILURE"]
    gaps = [
        (datetime.fromisoformat(later["started_at"])
         - datetime.fromisoformat(earlier["finished_at"])).total_seconds()
        for earlier, later in zip(row.history, row.history[1:], strict=False)
    ]
    # Backoff 1 s then 2 s, with jitter drawn from the upper half; slack for a busy machine.
    assert 0.5 <= gaps[0] <= 1.0 + 1.5
    assert 1.0 <= gaps[1] <= 2.0 + 1.5
