"""The transactional outbox against a real Redis: record in the transaction, publish on commit."""

from __future__ import annotations

import time

import pytest
from django.db import transaction

from example_project.demo.tasks import add, record
from reliable_tasks import dispatch, dispatch_many
from reliable_tasks.exceptions import (
    DispatchError,
    NotReliableTaskError,
    PayloadError,
    UnknownTaskError,
)
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep

pytestmark = pytest.mark.django_db(transaction=True)


def queue_length(redis_server) -> int:
    return redis_server.client().llen("celery")


def test_rolled_back_transaction_records_and_publishes_nothing(redis_server):
    with pytest.raises(RuntimeError), transaction.atomic():
        dispatch(add, (1, 2))
        dispatch(add, (3, 4))
        raise RuntimeError("roll back")

    assert TaskRecord.objects.count() == 0
    assert queue_length(redis_server) == 0


def test_rolled_back_savepoint_publishes_only_the_committed_tasks(redis_server):
    with transaction.atomic():
        kept = dispatch(add, (1, 2))
        with pytest.raises(RuntimeError), transaction.atomic():
            dispatch(add, (3, 4))
            raise RuntimeError("roll back the savepoint only")
        assert queue_length(redis_server) == 0, "nothing is published before commit"

    assert list(TaskRecord.objects.values_list("id", flat=True)) == [kept.id]
    assert queue_length(redis_server) == 1
    assert TaskRecord.objects.get().state == TaskState.QUEUED


def test_commit_publishes_every_task_of_the_transaction_once(redis_server):
    with transaction.atomic():
        records = [dispatch(add, (i, i)) for i in range(25)]

    assert queue_length(redis_server) == 25
    states = set(TaskRecord.objects.filter(id__in=[r.id for r in records])
                 .values_list("state", flat=True))
    assert states == {TaskState.QUEUED}
    assert set(TaskRecord.objects.values_list("publish_attempts", flat=True)) == {1}


def test_dispatch_many_records_and_publishes_in_one_batch(redis_server):
    records = dispatch_many([add.s(i, 1) for i in range(100)] + [("demo.add", (1, 2))])

    assert len(records) == 101
    assert TaskRecord.objects.filter(state=TaskState.QUEUED).count() == 101
    assert queue_length(redis_server) == 101


def test_dispatch_many_stores_exactly_what_dispatch_stores(redis_server):
    import datetime
    import decimal
    import uuid

    parent = uuid.uuid4()
    args = ([datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
             decimal.Decimal("1.10"), "é"],)
    options = {"queue": "celery", "countdown": 30, "expires": 600, "priority": 3,
               "headers": {"origin": "test"}, "max_attempts": 4, "parent_id": parent,
               "root_id": parent}
    single = dispatch(record, args, {"note": None}, **options)
    [bulk] = dispatch_many([(record, args, {"note": None}, options)])

    timed = {"eta", "expires_at", "created_at", "published_at"}
    rows = {row["id"]: row for row in TaskRecord.objects.values()}
    stored_single, stored_bulk = rows[single.id], rows[bulk.id]
    for name in timed:
        assert abs(stored_single[name] - stored_bulk[name]) < datetime.timedelta(seconds=5)
    untimed = set(stored_single) - timed - {"id"}
    assert {name: stored_bulk[name] for name in untimed} == {
        name: stored_single[name] for name in untimed}
    assert stored_bulk["state"] == TaskState.QUEUED
    assert stored_bulk["parent_id"] == parent and stored_bulk["max_attempts"] == 4
    assert not bulk._state.adding, "the returned records are saved instances"


def test_delay_goes_through_the_outbox(redis_server):
    result = add.delay(2, 3)

    row = TaskRecord.objects.get(pk=result.id)
    assert (row.task_name, row.args, row.state, row.adopted) == (
        "demo.add", [2, 3], TaskState.QUEUED, False)


def test_delay_on_commit_records_in_the_callers_transaction(redis_server):
    with pytest.raises(RuntimeError), transaction.atomic():
        add.delay_on_commit(1, 1)
        assert TaskRecord.objects.count() == 1
        raise RuntimeError("roll back")

    assert TaskRecord.objects.count() == 0
    assert queue_length(redis_server) == 0


def test_dispatch_with_redis_stopped_returns_within_the_bound_and_stays_pending(
        redis_server, settings):
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 1.0
    redis_server.stop()

    started = time.monotonic()
    row = dispatch(add, (1, 2))
    elapsed = time.monotonic() - started

    assert elapsed < 1.0 + 1.0
    row.refresh_from_db()
    assert row.state == TaskState.PENDING
    assert row.publish_attempts == 1
    assert row.publish_error


def test_dispatch_with_redis_hung_returns_within_the_bound(redis_server, settings):
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 1.0
    dispatch(add, (0, 0))  # warm the publisher connection, so the hang hits a live socket
    pause = redis_server.pause(4)
    try:
        started = time.monotonic()
        row = dispatch(add, (1, 2))
        elapsed = time.monotonic() - started
    finally:
        pause.wait()

    assert elapsed < 1.0 + 1.0
    row.refresh_from_db()
    assert row.state == TaskState.PENDING


def test_pending_rows_are_published_once_redis_is_back(redis_server, settings):
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 0.5
    settings.RELIABLE_TASKS_PUBLISH_GRACE = 0
    redis_server.stop()
    rows = [dispatch(add, (i, i)) for i in range(5)]
    assert TaskRecord.objects.filter(state=TaskState.PENDING).count() == 5

    redis_server.start()
    published = sweep().published

    assert published == 5
    assert queue_length(redis_server) == 5
    assert set(TaskRecord.objects.filter(id__in=[r.id for r in rows])
               .values_list("state", flat=True)) == {TaskState.QUEUED}
    assert sweep().published == 0, "published rows are not published again"


def test_rows_within_the_publish_grace_are_left_to_their_own_publish(redis_server, settings):
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 0.5
    settings.RELIABLE_TASKS_PUBLISH_GRACE = 60
    redis_server.stop()
    dispatch(add, (1, 1))
    redis_server.start()

    assert sweep().published == 0
    assert queue_length(redis_server) == 0


def test_unknown_task_name_is_refused_and_nothing_recorded(redis_server):
    with pytest.raises(UnknownTaskError, match="nope.missing"):
        dispatch("nope.missing", (1,))

    assert TaskRecord.objects.count() == 0
    assert queue_length(redis_server) == 0


@pytest.mark.parametrize("task", ["demo.plain_record", "demo.plain_noop"])
def test_a_plain_celery_task_is_refused_and_nothing_recorded(redis_server, task):
    """Issue 16, item 1: nothing claims a plain task's row when it runs, so a re-publish (a
    broker restart that kept the message, then a sweep) ran its body twice."""
    with pytest.raises(NotReliableTaskError, match=f"{task}.*base=ReliableTask"):
        dispatch(task, ("x",))
    with pytest.raises(NotReliableTaskError):
        dispatch_many([add.s(1, 1), (task, ())])

    assert TaskRecord.objects.count() == 0
    assert queue_length(redis_server) == 0


@pytest.mark.parametrize("args, kwargs, message", [
    ((object(),), None, "args of demo.add must be JSON-serializable"),
    ((), {"x": {1, 2}}, "kwargs of demo.add must be JSON-serializable"),
    ("12", None, "args of demo.add must be a list or tuple"),
    ((), ["x"], "kwargs of demo.add must be a mapping"),
])
def test_arguments_that_are_not_json_are_refused(redis_server, args, kwargs, message):
    with pytest.raises(PayloadError, match=message):
        dispatch(add, args, kwargs)

    assert TaskRecord.objects.count() == 0
    assert queue_length(redis_server) == 0


def test_arguments_larger_than_the_limit_are_refused(redis_server, settings):
    settings.RELIABLE_TASKS_MAX_PAYLOAD_BYTES = 1000

    with pytest.raises(PayloadError, match="more than RELIABLE_TASKS_MAX_PAYLOAD_BYTES"):
        dispatch(record, ("x" * 2000,))

    assert TaskRecord.objects.count() == 0
    assert queue_length(redis_server) == 0


def test_dispatch_many_refuses_the_whole_batch_when_one_call_is_invalid(redis_server):
    with pytest.raises(UnknownTaskError):
        dispatch_many([add.s(1, 1), ("nope.missing", ())])

    assert TaskRecord.objects.count() == 0
    assert queue_length(redis_server) == 0


def test_a_reused_task_id_keeps_its_one_row_and_sends_another_message(redis_server):
    first = dispatch(add, (1, 1))

    with transaction.atomic():
        again = dispatch(add, (2, 2), task_id=str(first.id))
        later = dispatch(add, (3, 3))  # the caller's transaction goes on
        assert queue_length(redis_server) == 1  # nothing before the commit

    assert str(again.pk) == str(first.pk)
    assert TaskRecord.objects.count() == 2
    assert TaskRecord.objects.get(pk=first.pk).args == [1, 1]
    assert queue_length(redis_server) == 3
    assert TaskRecord.objects.get(pk=later.pk).state == TaskState.QUEUED


def test_tasks_dispatched_with_their_own_ids_in_one_transaction_all_publish_at_commit(
        redis_server):
    import uuid

    ids = [str(uuid.uuid4()) for _ in range(3)]
    with transaction.atomic():
        for task_id in ids:
            dispatch(add, (1, 1), task_id=task_id)

    assert queue_length(redis_server) == 3
    assert TaskRecord.objects.filter(state=TaskState.QUEUED).count() == 3


def test_a_task_id_that_is_not_a_uuid_is_refused(redis_server):
    with pytest.raises(DispatchError, match="task_id must be a UUID"):
        dispatch(add, (1, 1), task_id="report-42")
    assert TaskRecord.objects.count() == 0


def test_datetimes_and_decimals_round_trip_through_the_ledger(redis_server):
    import datetime
    import decimal
    import uuid

    from reliable_tasks.payload import from_stored

    value = [datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
             decimal.Decimal("1.10"), uuid.UUID(int=7)]
    row = dispatch(record, (value,))
    row.refresh_from_db()

    assert from_stored(row.args) == [value]


def test_long_countdowns_are_held_in_the_database_not_in_redis(redis_server, settings):
    settings.RELIABLE_TASKS_DELAY_THRESHOLD = 60

    held = dispatch(add, (1, 1), countdown=7200)
    soon = dispatch(add, (2, 2), countdown=5)

    held.refresh_from_db()
    soon.refresh_from_db()
    assert held.state == TaskState.PENDING and held.next_attempt_at == held.eta
    assert soon.state == TaskState.QUEUED
    assert queue_length(redis_server) == 1, "only the short countdown went to Redis"


def test_a_transactions_tasks_are_published_in_one_batch_and_marked_in_one_update(
        redis_server):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries, transaction.atomic():
        for i in range(10):
            dispatch(add, (i, i))
        with pytest.raises(RuntimeError), transaction.atomic():
            dispatch(add, (99, 99))
            raise RuntimeError("this savepoint rolls back")

    updates = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert len(updates) == 1, updates
    assert queue_length(redis_server) == 10
    assert TaskRecord.objects.filter(state=TaskState.QUEUED).count() == 10


def test_eager_mode_runs_the_task_after_commit_through_its_claim(redis_server):
    from example_project.celery import app
    from example_project.demo.models import Execution

    app.conf.task_always_eager = True
    try:
        with transaction.atomic():
            row = dispatch(record, ("eager",))
            assert Execution.objects.count() == 0, "not before commit"
    finally:
        app.conf.task_always_eager = False

    row.refresh_from_db()
    assert row.state == TaskState.SUCCESS
    assert Execution.objects.filter(token="eager").count() == 1
    assert queue_length(redis_server) == 0


def test_the_message_carries_the_tasks_ignore_result(redis_server):
    """A task that ignores its result must not have it stored by the worker's result backend."""
    import json

    from example_project.demo.tasks import noop

    dispatch(noop)
    dispatch(add, (1, 2))

    messages = [json.loads(raw) for raw in redis_server.client().lrange("celery", 0, -1)]
    flags = {message["headers"]["task"]: message["headers"]["ignore_result"]
             for message in messages}
    assert flags == {"demo.noop": True, "demo.add": False}


def test_a_late_queued_mark_leaves_a_retry_stored_meanwhile_alone(shared_redis):
    from datetime import timedelta

    from reliable_tasks import ledger
    from reliable_tasks.clock import database_now
    from reliable_tasks.outbox import publish_records

    row = TaskRecord.objects.create(task_name="demo.record", args=["late-mark"])
    as_published = TaskRecord.objects.get(pk=row.pk)  # what the publisher read: 0 attempts
    claimed = ledger.claim(str(row.pk), task_name="demo.record", worker="w1",
                           rerun_after_lost=False)
    held_until = database_now() + timedelta(seconds=900)
    assert ledger.record_retry(str(row.pk), claimed, ValueError("later"), held_until)

    assert publish_records([as_published]) == 1  # its mark arrives after the RETRY

    stored = TaskRecord.objects.get(pk=row.pk)
    assert (stored.state, stored.attempts, stored.next_attempt_at) == (
        TaskState.RETRY, 1, held_until)
