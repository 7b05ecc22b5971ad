"""Publishing after commit from the background thread (``PUBLISH_IN_BACKGROUND``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
from django.db import connection, transaction

from example_project.demo.models import Execution
from example_project.demo.tasks import add
from reliable_tasks import background, dispatch, dispatch_many
from reliable_tasks.background import BackgroundPublisher
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep
from tests.conftest import REPO_ROOT


def queue_length(redis_server) -> int:
    return redis_server.client().llen("celery")


@pytest.fixture
def in_background(settings):
    settings.RELIABLE_TASKS_PUBLISH_IN_BACKGROUND = True
    yield
    assert background.flush(timeout=30), "a test left background publishes unfinished"
    assert background.close_connections(timeout=10), "the test database is dropped later"


def states_of(records) -> list[str]:
    return list(TaskRecord.objects.filter(id__in=[r.id for r in records])
                .values_list("state", flat=True))


@pytest.mark.django_db(transaction=True)
def test_autocommit_dispatches_are_published_and_marked_queued(redis_server, in_background):
    records = [dispatch(add, (i, i)) for i in range(40)]

    assert background.flush(timeout=10)
    assert queue_length(redis_server) == 40
    assert states_of(records) == [TaskState.QUEUED] * 40
    assert set(TaskRecord.objects.values_list("publish_attempts", flat=True)) == {1}


@pytest.mark.django_db(transaction=True)
def test_a_transaction_and_dispatch_many_are_published_once(redis_server, in_background):
    with transaction.atomic():
        in_transaction = [dispatch(add, (i, 1)) for i in range(10)]
    bulk = dispatch_many([add.s(i, 2) for i in range(30)])

    assert background.flush(timeout=10)
    assert queue_length(redis_server) == 40
    assert states_of(in_transaction + bulk) == [TaskState.QUEUED] * 40


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_transaction_hands_nothing_over(redis_server, in_background):
    with pytest.raises(RuntimeError), transaction.atomic():
        dispatch(add, (1, 2))
        raise RuntimeError("roll back")

    assert background.flush(timeout=10)
    assert TaskRecord.objects.count() == 0
    assert queue_length(redis_server) == 0


@pytest.mark.django_db(transaction=True)
def test_redis_down_costs_the_caller_nothing_and_the_sweeper_publishes_later(
        redis_server, in_background, settings):
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 1.0
    settings.RELIABLE_TASKS_PUBLISH_GRACE = 0
    redis_server.stop()

    started = time.monotonic()
    records = [dispatch(add, (i, i)) for i in range(5)]
    elapsed = time.monotonic() - started
    assert background.flush(timeout=10)

    assert elapsed < 1.0, "the caller never waits for the publish attempt"
    rows = TaskRecord.objects.filter(id__in=[r.id for r in records])
    assert set(rows.values_list("state", flat=True)) == {TaskState.PENDING}
    assert set(rows.values_list("publish_attempts", flat=True)) == {1}
    assert all(rows.values_list("publish_error", flat=True))

    redis_server.start()
    assert sweep().published == 5
    assert queue_length(redis_server) == 5
    assert states_of(records) == [TaskState.QUEUED] * 5


@pytest.mark.django_db(transaction=True)
def test_a_process_exiting_right_after_dispatching_publishes_everything(
        redis_server, worker_env):
    script = (
        "import django; django.setup()\n"
        "from reliable_tasks import dispatch\n"
        "for i in range(50):\n"
        "    dispatch('demo.add', (i, i))\n"
    )
    env = {**os.environ, **worker_env(redis_server), "RELIABLE_TASKS_PUBLISH_IN_BACKGROUND": "true"}

    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert queue_length(redis_server) == 50
    rows = TaskRecord.objects.filter(task_name="demo.add")
    assert rows.count() == 50
    assert set(rows.values_list("state", flat=True)) == {TaskState.QUEUED}


@pytest.mark.django_db(transaction=True)
def test_a_process_killed_with_publishes_queued_loses_nothing_and_runs_nothing_twice(
        redis_server, worker_env, celery_worker, settings):
    """SIGKILL right after the last commit: what the thread had not published (or published but
    not marked) is published by the sweeper, and every body runs exactly once."""
    settings.RELIABLE_TASKS_PUBLISH_GRACE = 0
    tasks = 300
    script = (
        "import os, signal, django; django.setup()\n"
        "from reliable_tasks import dispatch\n"
        f"for i in range({tasks}):\n"
        "    dispatch('demo.record', ('killed-publisher',))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, **worker_env(redis_server), "RELIABLE_TASKS_PUBLISH_IN_BACKGROUND": "true"}

    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == -signal.SIGKILL, result.stderr
    rows = TaskRecord.objects.filter(task_name="demo.record")
    assert rows.count() == tasks, "every committed dispatch has its row"
    left_pending = rows.filter(state=TaskState.PENDING).count()
    assert rows.filter(state=TaskState.QUEUED).count() + left_pending == tasks

    celery_worker(redis_server)
    deadline = time.monotonic() + 90
    while rows.exclude(state=TaskState.SUCCESS).exists():
        assert time.monotonic() < deadline, (
            f"{left_pending} left PENDING by the kill; not finished: "
            f"{list(rows.exclude(state=TaskState.SUCCESS).values_list('state', flat=True))}")
        sweep()
        time.sleep(0.5)

    executions = Execution.objects.filter(token="killed-publisher")
    assert executions.count() == tasks, f"{left_pending} were left PENDING by the kill"
    assert executions.values("task_id").distinct().count() == tasks


# --- the queue itself -----------------------------------------------------------------------------


class GatedPublish:
    """A batch function that records its batches and waits for ``gate`` before returning."""

    def __init__(self, fail_first: bool = False) -> None:
        self.gate = threading.Event()
        self.batches: list[list[int]] = []
        self.fail_first = fail_first

    def __call__(self, batch: list[int]) -> None:
        self.gate.wait(10)
        self.batches.append(batch)
        if self.fail_first and len(self.batches) == 1:
            raise RuntimeError("the first batch fails")


def test_waiting_records_go_out_together_in_one_batch():
    publish = GatedPublish()
    publisher = BackgroundPublisher(publish)
    publisher.submit([1])
    time.sleep(0.2)  # the thread holds [1] at the gate
    for item in range(2, 6):
        publisher.submit([item])

    assert not publisher.flush(timeout=0.2), "flush waits for the batches to be handled"
    publish.gate.set()
    assert publisher.flush(timeout=10)
    assert publish.batches == [[1], [2, 3, 4, 5]]


def test_a_full_queue_refuses_records_instead_of_blocking():
    publish = GatedPublish()
    publisher = BackgroundPublisher(publish, max_waiting=3)
    publisher.submit([1])
    time.sleep(0.2)
    publisher.submit([2, 3])

    started = time.monotonic()
    publisher.submit([4, 5])
    assert time.monotonic() - started < 0.1
    assert publisher.dropped == 2

    publish.gate.set()
    assert publisher.flush(timeout=10)
    assert [item for batch in publish.batches for item in batch] == [1, 2, 3]


def test_a_failing_batch_is_logged_and_the_thread_goes_on(caplog):
    publish = GatedPublish(fail_first=True)
    publish.gate.set()
    publisher = BackgroundPublisher(publish)
    publisher.submit([1])
    assert publisher.flush(timeout=10)
    publisher.submit([2])

    assert publisher.flush(timeout=10)
    assert publish.batches == [[1], [2]]
    assert "background publishing of 1 task(s) failed" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_the_thread_closes_its_database_connections_when_asked_and_when_idle():
    connection_open: list[bool] = []

    def publish(batch: list[str]) -> None:
        if batch == ["open"]:
            connection.ensure_connection()
        connection_open.append(connection.connection is not None)

    publisher = BackgroundPublisher(publish, idle_close_after=0.5)
    assert publisher.close_connections(timeout=1), "no thread yet: nothing to close"
    for item in ("open", "look"):
        publisher.submit([item])
        assert publisher.flush(timeout=5)
    assert publisher.close_connections(timeout=5)
    publisher.submit(["look"])
    assert publisher.flush(timeout=5)
    publisher.submit(["open"])
    assert publisher.flush(timeout=5)
    time.sleep(1.5)
    publisher.submit(["look"])
    assert publisher.flush(timeout=5)

    assert connection_open == [True, True, False, True, False]


def test_batches_are_capped():
    publish = GatedPublish()
    publisher = BackgroundPublisher(publish, max_batch=2)
    publisher.submit([0])
    time.sleep(0.2)
    publisher.submit([1, 2, 3, 4, 5])
    publish.gate.set()

    assert publisher.flush(timeout=10)
    assert publish.batches == [[0], [1, 2], [3, 4], [5]]


def test_a_forked_child_starts_with_an_empty_queue_of_its_own(monkeypatch):
    monkeypatch.setattr(background, "_instance", None)  # the process's own publisher is kept
    parent_publish = GatedPublish()
    parent = background.shared_publisher(parent_publish)
    parent.submit([1])
    time.sleep(0.2)
    parent.submit([2])  # waiting in the parent's queue when the child is forked
    read_end, write_end = os.pipe()

    with warnings.catch_warnings():  # Python 3.12+ warns that a threaded process forks
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report what it sees, publish one record, and leave
        try:
            child_batches: list[list[int]] = []
            child = background.shared_publisher(child_batches.append)
            child.submit([3])
            flushed = child.flush(timeout=5)
            os.write(write_end, repr((child is parent, flushed, child_batches)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        child_report = pipe.read()

    parent_publish.gate.set()
    assert parent.flush(timeout=10)
    assert status == 0
    assert child_report == repr((False, True, [[3]]))
    assert parent_publish.batches == [[1], [2]]
