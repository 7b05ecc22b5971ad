"""The worker side against a real worker subprocess: claim, duplicates, outcomes, adoption."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from django.db import connection, transaction

from example_project.demo.models import Execution
from example_project.demo.tasks import add, always_fails, db_session, flaky, plain_record, record
from reliable_tasks import dispatch, retry
from reliable_tasks.celery_app import get_celery_app
from reliable_tasks.exceptions import RetryNotAllowed
from reliable_tasks.models import TaskRecord
from reliable_tasks.publisher import send_records
from reliable_tasks.states import TaskState

pytestmark = pytest.mark.django_db(transaction=True)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


def state_of(task_id) -> str:
    return TaskRecord.objects.values_list("state", flat=True).get(pk=task_id)


def test_committed_dispatch_runs_exactly_once(redis_server, celery_worker):
    celery_worker(redis_server)
    with transaction.atomic():
        row = dispatch(record, ("once",))

    wait_for(lambda: state_of(row.id) == TaskState.SUCCESS, what="SUCCESS")
    time.sleep(0.5)
    assert Execution.objects.filter(token="once").count() == 1
    row.refresh_from_db()
    assert row.attempts == 1
    assert row.worker.startswith("w")
    assert row.history == [], "a first-time success leaves no failed attempts in the history"
    assert row.started_at <= row.finished_at


def test_a_duplicate_delivery_of_a_finished_task_does_not_run_the_body(
        redis_server, celery_worker):
    celery_worker(redis_server)
    row = dispatch(record, ("dup",))
    wait_for(lambda: state_of(row.id) == TaskState.SUCCESS, what="first run")

    send_records(get_celery_app(), [TaskRecord.objects.get(pk=row.id)])
    send_records(get_celery_app(), [TaskRecord.objects.get(pk=row.id)])
    wait_for(lambda: TaskRecord.objects.get(pk=row.id).duplicate_deliveries == 2,
             what="both duplicates seen")

    assert Execution.objects.filter(token="dup").count() == 1
    assert state_of(row.id) == TaskState.SUCCESS


def test_the_same_message_delivered_twice_at_once_runs_the_body_once(
        redis_server, celery_worker):
    celery_worker(redis_server, concurrency=2)
    row = dispatch(record, ("twice", 1.0))
    send_records(get_celery_app(), [TaskRecord.objects.get(pk=row.id)])

    wait_for(lambda: state_of(row.id) == TaskState.SUCCESS, what="SUCCESS")
    wait_for(lambda: TaskRecord.objects.get(pk=row.id).duplicate_deliveries == 1,
             what="the duplicate seen")
    assert Execution.objects.filter(token="twice").count() == 1


def test_a_plain_celery_task_is_adopted(redis_server, celery_worker):
    result = plain_record.delay("plain")
    row = TaskRecord.objects.get(pk=result.id)
    assert (row.adopted, row.state, row.args) == (True, TaskState.QUEUED, ["plain"])

    celery_worker(redis_server)
    wait_for(lambda: state_of(result.id) == TaskState.SUCCESS, what="adopted SUCCESS")
    assert Execution.objects.filter(token="plain").count() == 1


def test_a_task_that_fails_with_a_retryable_error_succeeds_on_a_later_attempt(
        redis_server, celery_worker):
    celery_worker(redis_server)
    result = flaky.delay(failures=2)

    wait_for(lambda: state_of(result.id) == TaskState.SUCCESS, what="SUCCESS", timeout=40)
    row = TaskRecord.objects.get(pk=result.id)
    assert row.attempts == 3
    assert [entry["outcome"] for entry in row.history] == ["RETRY", "RETRY"]
    assert [entry["attempt"] for entry in row.history] == [1, 2]


def test_a_task_that_always_fails_ends_as_failure_after_max_attempts(
        redis_server, celery_worker):
    celery_worker(redis_server)
    result = always_fails.delay()

    wait_for(lambda: state_of(result.id) == TaskState.FAILURE, what="FAILURE", timeout=40)
    row = TaskRecord.objects.get(pk=result.id)
    assert row.attempts == 3
    assert row.error_type.endswith("FlakyError")
    assert "always fails" in row.error_message
    assert "Traceback" in row.traceback


def test_manual_retry_of_a_failed_task_runs_it_again(redis_server, celery_worker):
    celery_worker(redis_server)
    result = always_fails.delay()
    wait_for(lambda: state_of(result.id) == TaskState.FAILURE, what="FAILURE", timeout=40)

    retried = retry(result.id, by="operator")

    assert retried.state == TaskState.PENDING
    wait_for(lambda: TaskRecord.objects.get(pk=result.id).attempts == 6, timeout=40,
             what="three more attempts")
    wait_for(lambda: state_of(result.id) == TaskState.FAILURE, what="FAILURE again")
    history = TaskRecord.objects.get(pk=result.id).history
    assert any(entry.get("manual_retry") and entry["by"] == "operator" for entry in history)


def test_manual_retry_is_refused_while_the_task_is_queued(redis_server):
    row = dispatch(add, (1, 1))

    with pytest.raises(RetryNotAllowed, match="QUEUED"):
        retry(row)
    assert state_of(row.id) == TaskState.QUEUED


def test_manual_retry_of_a_success_needs_force(redis_server, celery_worker):
    celery_worker(redis_server)
    row = dispatch(record, ("forced",))
    wait_for(lambda: state_of(row.id) == TaskState.SUCCESS, what="SUCCESS")

    with pytest.raises(RetryNotAllowed, match="force=True"):
        retry(row)
    retry(row, force=True)

    wait_for(lambda: Execution.objects.filter(token="forced").count() == 2, what="second run")
    wait_for(lambda: state_of(row.id) == TaskState.SUCCESS, what="SUCCESS again")


def test_chain_members_are_linked_by_parent_and_root_ids(redis_server, celery_worker):
    from celery import chain

    celery_worker(redis_server)
    result = chain(add.s(1, 1), add.s(2), add.s(3)).apply_async()

    wait_for(lambda: TaskRecord.objects.filter(
        task_name="demo.add", state=TaskState.SUCCESS).count() == 3, what="the whole chain")
    first = TaskRecord.objects.get(pk=result.parent.parent.id)
    second = TaskRecord.objects.get(pk=result.parent.id)
    third = TaskRecord.objects.get(pk=result.id)
    assert (second.parent_id, second.root_id) == (first.id, first.id)
    assert (third.parent_id, third.root_id) == (second.id, first.id)
    assert third.args == [4, 3]


@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite has no server sessions")
def test_workers_keep_their_database_connection_between_tasks(redis_server, celery_worker):
    celery_worker(redis_server, concurrency=2)

    rows = [dispatch(db_session, (f"session-{i}",)) for i in range(40)]
    wait_for(lambda: TaskRecord.objects.filter(
        id__in=[r.id for r in rows], state=TaskState.SUCCESS).count() == 40, what="40 tasks")

    server_sessions = set(Execution.objects.filter(token__startswith="session-")
                          .values_list("pid", flat=True))
    assert len(server_sessions) <= 2, f"{len(server_sessions)} connections for 40 tasks"


@pytest.mark.skipif(connection.vendor != "postgresql", reason="a PostgreSQL setting")
@pytest.mark.parametrize("env, expected", [
    ({}, "on"),
    ({"RELIABLE_TASKS_WORKER_SYNCHRONOUS_COMMIT": "false"}, "off"),
])
def test_workers_commit_ledger_writes_without_waiting_for_the_disk_only_when_asked(
        redis_server, celery_worker, env, expected):
    celery_worker(redis_server, env=env)

    row = dispatch("demo.db_setting", ("commit", "synchronous_commit"))
    wait_for(lambda: state_of(row.id) == TaskState.SUCCESS, what="SUCCESS")

    assert Execution.objects.filter(token=f"commit:{expected}").count() == 1
