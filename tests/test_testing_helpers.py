"""reliable_tasks.testing: tasks run in-process at commit, captured dispatches, draining the
ledger, and the pytest plugin, against the real database (no broker, no worker)."""

from __future__ import annotations

import os
import textwrap
from urllib.parse import urlsplit, urlunsplit

import pytest
from celery.signals import task_postrun, task_prerun
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.test import TestCase

from example_project.celery import app as celery_app
from example_project.demo.models import Execution
from example_project.demo.tasks import FlakyError, add, always_fails, boom, flaky, record, spawn
from reliable_tasks import dispatch, outbox, publisher
from reliable_tasks.exceptions import UnknownTaskError
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState
from reliable_tasks.testing import (
    WORKER,
    TooManyRuns,
    capture_dispatches,
    drain,
    run_at_commit,
)

pytest_plugins = ["pytester"]

transactional = pytest.mark.django_db(transaction=True)


def executions(token: str) -> int:
    return Execution.objects.filter(token=token).count()


def assert_outbox_talks_to_the_broker() -> None:
    """The outbox's own publishing functions are in place (no in-process broker)."""
    assert outbox.send_records is publisher.send_records
    assert outbox.publish_committed.__module__ == "reliable_tasks.outbox"


# --- run_at_commit ---------------------------------------------------------------------------


@transactional
def test_a_committed_task_runs_at_commit_through_its_claim_and_outcome():
    with run_at_commit() as runs:
        with transaction.atomic():
            dispatched = record.delay("at-commit")
            assert runs == [] and executions("at-commit") == 0, "nothing runs before commit"
        assert [str(run.record.pk) for run in runs] == [dispatched.id]

    row = TaskRecord.objects.get(pk=dispatched.id)
    assert (row.state, row.attempts, row.worker) == (TaskState.SUCCESS, 1, WORKER)
    assert row.published_at is not None and row.publish_attempts == 1, "published, then run"
    assert row.started_at is not None and row.finished_at is not None
    assert runs[0].result == "at-commit" and runs[0].exception is None
    assert executions("at-commit") == 1


@transactional
def test_a_rolled_back_transaction_runs_nothing():
    with run_at_commit() as runs, pytest.raises(RuntimeError), transaction.atomic():
        record.delay("rolled-back")
        raise RuntimeError("roll back")
    assert runs == []
    assert not TaskRecord.objects.exists()
    assert executions("rolled-back") == 0


@transactional
def test_a_rolled_back_savepoint_runs_only_the_committed_tasks():
    with run_at_commit() as runs, transaction.atomic():
        kept = record.delay("kept")
        with pytest.raises(RuntimeError), transaction.atomic():
            record.delay("savepoint")
            raise RuntimeError("roll back the savepoint")
    assert [str(run.record.pk) for run in runs] == [kept.id]
    assert (executions("kept"), executions("savepoint")) == (1, 0)


@transactional
def test_a_failing_task_is_recorded_not_raised():
    with run_at_commit() as runs:
        boom.delay()
    [run] = runs
    assert run.state == TaskState.FAILURE and isinstance(run.exception, ValueError)
    assert run.record.error_type == "builtins.ValueError"
    assert run.record.attempts == 1


@transactional
def test_a_retry_waits_for_its_backoff_and_drain_advance_runs_it():
    with run_at_commit() as runs:
        task_id = flaky.delay(1).id
    [first] = runs
    assert isinstance(first.exception, FlakyError)
    assert first.state == TaskState.QUEUED, "published again with the backoff as its ETA"
    assert first.record.eta is not None and first.record.attempts == 1
    assert first.record.history[-1]["outcome"] == TaskState.RETRY

    [second] = drain(advance=True)
    row = TaskRecord.objects.get(pk=task_id)
    assert second.result == "succeeded after 1 failures"
    assert (row.state, row.attempts) == (TaskState.SUCCESS, 2)


@transactional
def test_what_a_task_dispatches_runs_after_it():
    with run_at_commit() as runs:
        parent_id = spawn.delay(4).id
    assert [run.record.task_name for run in runs] == ["demo.spawn", "demo.add"]
    parent, child = (run.record for run in runs)
    assert str(child.pk) == runs[0].result
    assert str(child.parent_id) == parent_id and child.state == TaskState.SUCCESS
    assert child.started_at >= parent.finished_at, "the child ran after its parent finished"
    assert runs[1].result == 8


@transactional
def test_a_task_delayed_beyond_the_threshold_is_held_until_drained_with_advance():
    with run_at_commit() as runs:
        held = dispatch(add, (1, 2), countdown=3600)
    assert runs == []
    row = TaskRecord.objects.get(pk=held.pk)
    assert (row.state, row.published_at) == (TaskState.PENDING, None)

    assert drain() == [], "not due yet"
    [run] = drain(advance=True)
    assert (run.record.pk, run.state, run.result) == (held.pk, TaskState.SUCCESS, 3)


@transactional
def test_run_at_commit_refuses_to_end_before_the_transaction_commits():
    with pytest.raises(RuntimeError, match="has not committed"), transaction.atomic(), (
            run_at_commit()):
        add.delay(1, 2)
    assert not TaskRecord.objects.exists(), "the error rolled the transaction back"
    assert_outbox_talks_to_the_broker()


@transactional
def test_nothing_is_left_in_place_after_a_block():
    with run_at_commit(), capture_dispatches():
        add.delay(1, 2)
    assert_outbox_talks_to_the_broker()

    after = record.delay("after-the-block")
    row = TaskRecord.objects.get(pk=after.id)
    # The real publish ran, to the test's broker, which refuses connections.
    assert (row.state, row.publish_attempts) == (TaskState.PENDING, 1)
    assert row.publish_error
    assert executions("after-the-block") == 0


@transactional
def test_task_always_eager_is_refused_with_a_clear_error():
    celery_app.conf.task_always_eager = True
    try:
        with pytest.raises(ImproperlyConfigured, match="task_always_eager"), run_at_commit():
            pass  # pragma: no cover - never entered
        with pytest.raises(ImproperlyConfigured, match="task_always_eager"):
            drain()
    finally:
        celery_app.conf.task_always_eager = False
    assert_outbox_talks_to_the_broker()


# --- capture_dispatches ----------------------------------------------------------------------


@transactional
def test_captured_dispatches_are_recorded_held_and_asserted():
    with capture_dispatches() as captured:
        add.delay(1, 2)
        record.apply_async(("captured",), countdown=5)
        dispatch(add, kwargs={"x": 3, "y": 4})

    assert captured.names == ["demo.add", "demo.record", "demo.add"]
    assert len(captured.assert_dispatched(add)) == 2
    assert len(captured.assert_dispatched("demo.add", (1, 2), count=1)) == 1
    captured.assert_dispatched(add, kwargs={"x": 3, "y": 4})
    captured.assert_dispatched(record, ["captured"])
    rows = list(captured)
    assert {row.state for row in rows} == {TaskState.PENDING}
    assert {row.publish_attempts for row in rows} == {0}, "nothing was sent"
    assert executions("captured") == 0


@transactional
def test_a_rolled_back_block_dispatches_nothing():
    with capture_dispatches() as captured, pytest.raises(RuntimeError), transaction.atomic():
        add.delay(1, 2)
        raise RuntimeError("roll back")
    captured.assert_nothing_dispatched()
    assert len(captured) == 0


@transactional
def test_a_capture_ends_with_its_block():
    with capture_dispatches() as captured:
        add.delay(1, 2)
    add.delay(5, 6)
    assert captured.names == ["demo.add"]
    captured.assert_dispatched(add, (1, 2), count=1)


@transactional
def test_failed_assertions_say_what_was_dispatched():
    with capture_dispatches() as captured:
        add.delay(1, 2)
    expected = r"(?s)expected demo.add args=\[9, 9\].*demo.add\(args=\[1, 2\]"
    with pytest.raises(AssertionError, match=expected):
        captured.assert_dispatched(add, (9, 9))
    with pytest.raises(AssertionError, match="2 time"):
        captured.assert_dispatched(add, count=2)
    with pytest.raises(AssertionError, match=r"expected nothing dispatched"):
        captured.assert_nothing_dispatched()


@transactional
def test_assert_dispatched_rejects_bad_input():
    with capture_dispatches() as captured:
        pass
    with pytest.raises(TypeError, match="neither a task nor a task name"):
        captured.assert_dispatched(42)
    with pytest.raises(TypeError, match="args must be a list or tuple"):
        captured.assert_dispatched(add, "12")
    with pytest.raises(TypeError, match="kwargs must be a mapping"):
        captured.assert_dispatched(add, kwargs=[1])
    with pytest.raises(ValueError, match="count must be a non-negative integer"):
        captured.assert_dispatched(add, count=-1)


@transactional
def test_the_innermost_block_decides_between_running_and_holding():
    with run_at_commit() as runs:
        with capture_dispatches() as captured:
            held = add.delay(1, 2)
        assert runs == [] and captured.names == ["demo.add"]
        ran = add.delay(3, 4)
    assert [str(run.record.pk) for run in runs] == [ran.id]
    assert TaskRecord.objects.get(pk=held.id).state == TaskState.PENDING


# --- drain ---------------------------------------------------------------------------------


@transactional
def test_drain_runs_captured_tasks_and_what_they_dispatch():
    with capture_dispatches():
        spawn.delay(2)
        record.delay("drained")
    runs = drain()
    assert sorted(run.record.task_name for run in runs) == ["demo.add", "demo.record",
                                                            "demo.spawn"]
    assert {run.state for run in runs} == {TaskState.SUCCESS}
    assert executions("drained") == 1
    assert drain() == [], "nothing is left"


@transactional
def test_drain_goes_through_the_retries_of_a_failing_task():
    with capture_dispatches():
        task_id = always_fails.delay().id
    runs = drain(advance=True)
    assert [run.state for run in runs] == [TaskState.QUEUED, TaskState.QUEUED,
                                           TaskState.FAILURE]
    assert all(isinstance(run.exception, FlakyError) for run in runs)
    row = TaskRecord.objects.get(pk=task_id)
    assert (row.state, row.attempts) == (TaskState.FAILURE, 3)
    assert [entry["outcome"] for entry in row.history] == ["RETRY", "RETRY", "FAILURE"]


@transactional
def test_drain_with_advance_runs_a_flaky_task_to_success():
    with capture_dispatches():
        task_id = flaky.delay(2).id
    runs = drain(advance=True)
    assert [run.record.attempts for run in runs] == [1, 2, 3]
    assert TaskRecord.objects.get(pk=task_id).state == TaskState.SUCCESS


@transactional
def test_drain_runs_rows_a_failed_publish_left_pending():
    left = record.delay("left-pending")  # no helper: the refusing broker leaves it PENDING
    assert TaskRecord.objects.get(pk=left.id).publish_error
    [run] = drain()
    assert (str(run.record.pk), run.state) == (left.id, TaskState.SUCCESS)
    assert executions("left-pending") == 1


@transactional
def test_drain_stops_at_its_bound():
    with capture_dispatches():
        first = add.delay(1, 1)
        add.delay(2, 2)
    with pytest.raises(TooManyRuns, match="ran 1 deliveries and more are due"):
        drain(max_runs=1)
    states = {str(pk): state for pk, state in TaskRecord.objects.values_list("id", "state")}
    assert sorted(states.values()) == [TaskState.PENDING, TaskState.SUCCESS]
    assert states[first.id] == TaskState.SUCCESS, "the first due ran first"
    assert_outbox_talks_to_the_broker()


@transactional
def test_drain_rejects_bad_input():
    for bad in (0, -1, True, "3"):
        with pytest.raises(ValueError, match="max_runs must be a positive integer"):
            drain(max_runs=bad)


@transactional
def test_drain_names_a_task_that_is_not_registered():
    TaskRecord.objects.create(task_name="nowhere.to_be_found")
    with pytest.raises(UnknownTaskError, match="nowhere.to_be_found"):
        drain()


# --- inside a TestCase's transaction (never committed) ----------------------------------------


class InsideATestCase(TestCase):
    """The test's transaction never commits: the end of ``run_at_commit()`` stands in for it."""

    def test_the_end_of_the_block_stands_in_for_the_commit(self):
        receivers = [list(signal.receivers) for signal in (task_prerun, task_postrun)]
        with run_at_commit() as runs:
            dispatched = record.delay("testcase")
            self.assertEqual(runs, [])
        self.assertEqual([str(run.record.pk) for run in runs], [dispatched.id])
        self.assertEqual(TaskRecord.objects.get(pk=dispatched.id).state, TaskState.SUCCESS)
        self.assertEqual(executions("testcase"), 1)
        self.assertEqual([list(signal.receivers) for signal in (task_prerun, task_postrun)],
                         receivers, "the receivers left out for the run are back, in order")

    def test_a_rolled_back_savepoint_runs_nothing(self):
        with run_at_commit() as runs, self.assertRaises(RuntimeError), transaction.atomic():
            record.delay("testcase-savepoint")
            raise RuntimeError("roll back the savepoint")
        self.assertEqual(runs, [])
        self.assertEqual(executions("testcase-savepoint"), 0)

    def test_capture_on_commit_callbacks_runs_them_once(self):
        with run_at_commit() as runs:
            with self.captureOnCommitCallbacks(execute=True):
                record.delay("testcase-captured")
            self.assertEqual(len(runs), 1)
        self.assertEqual(len(runs), 1, "the end of the block does not run them again")
        self.assertEqual(executions("testcase-captured"), 1)

    def test_capture_and_drain(self):
        with capture_dispatches() as captured:
            spawn.delay(3)
        captured.assert_dispatched(spawn, [3], count=1)
        runs = drain()
        self.assertEqual([run.record.task_name for run in runs], ["demo.spawn", "demo.add"])
        self.assertEqual([run.state for run in runs], [TaskState.SUCCESS] * 2)


@pytest.mark.django_db
def test_a_non_transactional_django_db_test_is_a_test_case():
    with run_at_commit() as runs:
        record.delay("django-db")
    assert [run.state for run in runs] == [TaskState.SUCCESS]
    assert executions("django-db") == 1


# --- the pytest plugin -----------------------------------------------------------------------


_PLUGIN_TESTS = '''
import pytest
from django.db import transaction

from example_project.demo.models import Execution
from example_project.demo.tasks import record
from reliable_tasks import outbox, publisher
from reliable_tasks.models import TaskRecord
from reliable_tasks.testing import WORKER, drain


@pytest.mark.django_db(transaction=True)
def test_inline_fixture_runs_at_commit(reliable_tasks_inline):
    with transaction.atomic():
        record.delay("inline")
        assert reliable_tasks_inline == []
    [run] = reliable_tasks_inline
    assert (run.state, run.record.worker) == ("SUCCESS", WORKER)
    assert Execution.objects.filter(token="inline").count() == 1


@pytest.mark.django_db(transaction=True)
def test_captured_fixture_holds_until_drained(reliable_tasks_captured):
    record.delay("captured")
    reliable_tasks_captured.assert_dispatched("demo.record", ["captured"], count=1)
    assert TaskRecord.objects.get().state == "PENDING"
    assert not Execution.objects.exists()
    assert [run.state for run in drain()] == ["SUCCESS"]


@pytest.mark.django_db(transaction=True)
def test_nothing_leaks_to_the_next_test():
    assert outbox.send_records is publisher.send_records
    assert outbox.publish_committed.__module__ == "reliable_tasks.outbox"
    record.delay("after")
    row = TaskRecord.objects.get()
    assert (row.state, row.publish_attempts) == ("PENDING", 1)
    assert row.publish_error, "published for real, to a broker that refuses connections"
    assert not Execution.objects.exists()
'''


def _database_url_of_another_session() -> str | None:
    """The database URL for a pytest session inside this one: its own test database."""
    url = os.environ.get("DATABASE_URL")
    if not url or url.startswith("sqlite"):
        return None  # the settings name SQLite test databases after the session's pid
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path + "_plugin"))


def test_the_plugin_fixtures_work_when_loaded_with_p(pytester, monkeypatch):
    pytester.makepyfile(test_plugin=textwrap.dedent(_PLUGIN_TESTS))
    monkeypatch.setenv("PYTHONPATH", str(settings.BASE_DIR), prepend=os.pathsep)
    monkeypatch.setenv("REDIS_URL", settings.REDIS_URL)  # this session's refusing port
    url = _database_url_of_another_session()
    if url is not None:
        monkeypatch.setenv("DATABASE_URL", url)
    result = pytester.runpytest_subprocess(
        "-p", "reliable_tasks.testing", "--ds=example_project.settings", "-W", "error",
        "-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=3)
