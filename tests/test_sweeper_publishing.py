"""The sweeper publishing due rows against a real Redis and database: once each, in batches."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from celery import signals
from django.db import connection, connections
from django.utils import timezone

from reliable_tasks.conf import app_settings
from reliable_tasks.models import TaskRecord
from reliable_tasks.publisher import close_publisher
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import SweepReport, sweep

pytestmark = pytest.mark.django_db(transaction=True)


def due_rows(count: int) -> None:
    due = timezone.now() - timedelta(seconds=1)
    TaskRecord.objects.bulk_create(
        [TaskRecord(task_name="demo.noop", state=TaskState.PENDING, next_attempt_at=due)
         for _ in range(count)])


def database_sessions(at_most: int | None = None) -> int:
    """Sessions open on the test database (PostgreSQL), given a few seconds to get down to
    ``at_most`` (a server process goes a moment after its client closed the connection)."""
    deadline = time.monotonic() + 5
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
            count = int(cursor.fetchone()[0])
        if at_most is None or count <= at_most or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def test_a_failed_publish_records_the_error_and_waits_out_the_grace(redis_server, settings):
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 0.5
    now = timezone.now()
    grace = timedelta(seconds=app_settings.PUBLISH_GRACE)
    due_rows(3)
    redis_server.stop()

    report = sweep(now=now)

    assert (report.published, report.publish_failed) == (0, 3)
    for row in TaskRecord.objects.all():
        assert row.state == TaskState.PENDING
        assert row.publish_attempts == 1
        assert row.publish_error
        assert row.next_attempt_at == now + grace
    redis_server.start()
    assert sweep(now=now).published == 0, "not again before the grace is over"
    assert sweep(now=now + grace).published == 3
    assert redis_server.client().llen("celery") == 3
    assert set(TaskRecord.objects.values_list("state", "publish_attempts", "publish_error")) == {
        (TaskState.QUEUED, 2, "")}


def test_a_pass_that_starts_while_another_publishes_takes_none_of_its_rows(redis_server):
    due_rows(20)
    meanwhile: list[SweepReport] = []
    started = threading.Event()

    def sweep_in_another_thread() -> None:
        try:
            meanwhile.append(sweep())
        finally:
            close_publisher()
            connections.close_all()

    def on_first_publish(**_: Any) -> None:
        if not started.is_set():
            started.set()
            other = threading.Thread(target=sweep_in_another_thread)
            other.start()
            other.join()

    signals.before_task_publish.connect(on_first_publish, weak=False)
    try:
        report = sweep()
    finally:
        signals.before_task_publish.disconnect(on_first_publish)

    assert meanwhile[0].published == 0
    assert report.published == 20
    assert redis_server.client().llen("celery") == 20
    assert set(TaskRecord.objects.values_list("state", "publish_attempts")) == {
        (TaskState.QUEUED, 1)}


def test_one_pass_publishes_a_backlog_of_many_batches_once_and_leaves_nothing_open(
        redis_server, settings):
    settings.RELIABLE_TASKS_SWEEP_BATCH_SIZE = 50
    due_rows(1_000)
    threads = set(threading.enumerate())
    sessions = database_sessions() if connection.vendor == "postgresql" else 0

    report = sweep()

    assert (report.published, report.publish_failed) == (1_000, 0)
    assert redis_server.client().llen("celery") == 1_000
    assert set(TaskRecord.objects.values_list("state", "publish_attempts")) == {
        (TaskState.QUEUED, 1)}
    assert set(threading.enumerate()) <= threads, "no thread of the pass is left running"
    if connection.vendor == "postgresql":
        assert database_sessions(at_most=sessions) <= sessions, "its connections are closed"
