"""``ReliableCeleryBackend``: Django's task framework on the ledger, against a real worker.

The example project's ``TASKS`` configures the backend (``default``, and ``retrying`` whose
tasks retry ``FlakyError``); its tasks are in ``example_project.demo.django_tasks``.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from example_project.demo import django_tasks as demo
from example_project.demo.models import Execution
from example_project.demo.tasks import add as celery_add
from example_project.devservers import RedisServer
from reliable_tasks import ledger, limits
from reliable_tasks.backend import (
    STATUS_BY_STATE,
    InvalidTask,
    ReliableCeleryBackend,
    TaskResultDoesNotExist,
    celery_priority,
    celery_queue,
    task_options,
)
from reliable_tasks.exceptions import DispatchError, DuplicateTask
from reliable_tasks.models import TaskRecord, WaitReason
from reliable_tasks.outbox import dispatch
from reliable_tasks.runner import RUNNER_NAME
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep
from reliable_tasks.testing import run_at_commit
from tests.test_execution import state_of, wait_for

try:
    from django.tasks import TaskResultStatus, default_task_backend, task, task_backends
except ImportError:
    from django_tasks import TaskResultStatus, default_task_backend, task, task_backends

pytestmark = pytest.mark.django_db(transaction=True)


def plain_function() -> None:
    """A module-level function that is not a Task at its module path."""


def takes_no_context() -> None:
    """A function without a ``context`` argument."""


def run_as_a_script() -> None:
    """A function as if defined in a script run with ``python script.py``."""


run_as_a_script.__module__ = "__main__"


@task
@task_options(unique_key=lambda args, kwargs: args[0])
def keyed_by_its_argument(key: object) -> None:
    """Keyed by its argument, whatever it is (never run: no worker imports the tests)."""


def finished(result_id: str) -> bool:
    return default_task_backend.get_result(result_id).is_finished


def tokens(result_id: str) -> list[str]:
    return sorted(Execution.objects.filter(task_id=result_id).values_list("token", flat=True))


def queued_messages(server: RedisServer) -> dict[str, list[dict[str, object]]]:
    """Every message waiting in the broker, by Redis list (priority lists included)."""
    client = server.client()
    found = {}
    for key in client.keys("*"):
        if client.type(key) == "list":
            found[key] = [json.loads(raw) for raw in client.lrange(key, 0, -1)]
    return found


@pytest.fixture
def worker(redis_server, celery_worker):
    return celery_worker(redis_server)


# --- the backend ------------------------------------------------------------------------------


def test_the_backend_supports_defer_results_async_tasks_and_priorities():
    backend = task_backends["default"]

    assert isinstance(backend, ReliableCeleryBackend)
    assert (backend.supports_defer, backend.supports_get_result, backend.supports_async_task,
            backend.supports_priority) == (True, True, True, True)


@pytest.mark.parametrize("state", list(TaskState))
def test_every_ledger_state_has_a_status(state):
    row = TaskRecord.objects.create(
        task_name=RUNNER_NAME, state=state,
        args=[demo.add.module_path, [1, 2], {}], kwargs={"backend": "default"})

    status = default_task_backend.get_result(str(row.pk)).status

    assert status == STATUS_BY_STATE[state]
    expected = {TaskState.STARTED: TaskResultStatus.RUNNING,
                TaskState.SUCCESS: TaskResultStatus.SUCCESSFUL}.get(state)
    if expected is None:
        expected = (TaskResultStatus.READY if state in (
            TaskState.PENDING, TaskState.QUEUED, TaskState.RETRY, TaskState.REPLACED,
            TaskState.WAITING) else TaskResultStatus.FAILED)
    assert status == expected


def test_an_unknown_result_id_does_not_exist(redis_server):
    other = dispatch(celery_add, (1, 2))  # a ledger row, but not of a django.tasks task

    for result_id in (str(uuid.uuid4()), "not-a-uuid", str(other.pk)):
        with pytest.raises(TaskResultDoesNotExist):
            default_task_backend.get_result(result_id)
        with pytest.raises(TaskResultDoesNotExist):
            async_to_sync(default_task_backend.aget_result)(result_id)


def test_priorities_map_onto_redis_priorities_highest_first():
    mapped = [celery_priority(priority) for priority in range(-100, 101)]

    assert (celery_priority(100), celery_priority(0), celery_priority(-100)) == (0, 4, 9)
    assert mapped == sorted(mapped, reverse=True)
    assert set(mapped) == set(range(10))


def test_the_default_queue_is_celery_s_and_others_keep_their_name():
    assert celery_queue("default") == "celery"
    assert celery_queue("emails") == "emails"


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "error"), [
    (lambda: task(priority=101)(plain_function), "priority"),
    (lambda: task(priority=-101)(plain_function), "priority"),
    (lambda: task(queue_name="unknown")(plain_function), "Queue 'unknown'"),
    (lambda: task(takes_context=True)(takes_no_context), "context"),
    (lambda: task(lambda: None), "module level"),
    (lambda: task(run_as_a_script), "__main__"),
    (lambda: task(plain_function).using(run_after=timezone.now().replace(tzinfo=None)),
     "aware"),
])
def test_tasks_the_framework_refuses_are_refused(make, error):
    with pytest.raises(InvalidTask, match=error):
        make()


def test_a_task_a_worker_cannot_find_by_its_path_is_refused_at_enqueue(redis_server):
    renamed = task(plain_function)  # the path names the function, not this Task

    with pytest.raises(InvalidTask, match="plain_function"):
        renamed.enqueue()
    assert TaskRecord.objects.count() == 0


@pytest.mark.parametrize(("args", "kwargs", "error"), [
    ((object(), 1), {}, TypeError),
    ((1,), {"y": b"\xff"}, ValueError),
    ((1,), {"y": {1, 2}}, TypeError),
])
def test_arguments_that_are_not_json_are_refused_with_nothing_recorded(
        redis_server, args, kwargs, error):
    with pytest.raises(error, match="of task example_project.demo.django_tasks.add must be JSON"):
        demo.add.enqueue(*args, **kwargs)
    assert TaskRecord.objects.count() == 0


# --- enqueue: the outbox ----------------------------------------------------------------------


def test_an_enqueue_rolled_back_never_runs(worker):
    with pytest.raises(RuntimeError), transaction.atomic():
        demo.record.enqueue("rolled-back")
        raise RuntimeError("roll back")
    later = demo.record.enqueue("committed")

    wait_for(lambda: finished(later.id), what="the committed task")
    assert TaskRecord.objects.count() == 1
    assert not Execution.objects.filter(token="rolled-back").exists()


def test_an_enqueue_is_recorded_in_the_transaction_and_runs_after_commit(worker):
    with transaction.atomic():
        result = demo.add.enqueue(2, 3)
        row = TaskRecord.objects.get(pk=result.id)
        assert (row.state, result.status) == (TaskState.PENDING, TaskResultStatus.READY)

    wait_for(lambda: finished(result.id), what="the run")
    done = demo.add.get_result(result.id)
    assert (done.status, done.return_value, done.attempts) == (TaskResultStatus.SUCCESSFUL, 5, 1)
    assert (done.args, done.kwargs, done.errors) == ([2, 3], {}, [])
    [worker_id] = done.worker_ids
    assert worker_id.startswith(worker.hostname.split("@")[0] + "@")
    assert done.enqueued_at <= done.started_at <= done.finished_at
    assert done.last_attempted_at == done.started_at
    result.refresh()
    assert result.return_value == 5
    assert f"{demo.add.module_path}[{result.id}]" in worker.log_text(), "the worker log names it"


def test_an_async_enqueue_and_result_and_a_coroutine_task(worker):
    result = async_to_sync(demo.async_add.aenqueue)(3, 4)

    wait_for(lambda: finished(result.id), what="the run")
    done = async_to_sync(demo.async_add.aget_result)(result.id)
    assert (done.status, done.return_value) == (TaskResultStatus.SUCCESSFUL, 7)


# --- results ----------------------------------------------------------------------------------


def test_return_values_are_normalised_to_json(worker):
    result = demo.returns_a_tuple.enqueue()

    wait_for(lambda: finished(result.id), what="the run")
    assert demo.returns_a_tuple.get_result(result.id).return_value == [1, "two", {"three": 3.0}]
    assert TaskRecord.objects.get(pk=result.id).return_value == [1, "two", {"three": 3.0}]


def test_a_return_value_that_is_not_json_fails_the_task(worker):
    result = demo.returns_a_set.enqueue()

    wait_for(lambda: finished(result.id), what="the run")
    done = demo.returns_a_set.get_result(result.id)
    assert done.status == TaskResultStatus.FAILED
    assert [error.exception_class for error in done.errors] == [TypeError]


def test_a_failing_task_is_failed_with_its_error(worker):
    result = demo.fails.enqueue("it broke")

    wait_for(lambda: finished(result.id), what="the run")
    done = demo.fails.get_result(result.id)
    assert (done.status, done.attempts) == (TaskResultStatus.FAILED, 1)
    [error] = done.errors
    assert error.exception_class_path == "builtins.ValueError"
    assert error.exception_class is ValueError
    assert "Traceback" in error.traceback and "it broke" in error.traceback
    with pytest.raises(ValueError, match="failed"):
        done.return_value  # noqa: B018 - the framework raises for a failed task
    assert state_of(result.id) == TaskState.FAILURE


def test_retries_are_attempts_each_with_its_worker_and_error(worker):
    result = demo.flaky.enqueue(2)

    wait_for(lambda: finished(result.id), what="the third attempt")
    done = demo.flaky.get_result(result.id)
    assert (done.status, done.return_value, done.attempts) == (TaskResultStatus.SUCCESSFUL, 3, 3)
    assert len(done.worker_ids) == 3 and all(done.worker_ids)
    assert [error.exception_class for error in done.errors] == [demo.FlakyError] * 2
    assert done.started_at < done.last_attempted_at


def test_a_task_whose_attempts_are_used_up_is_failed_with_every_error(worker):
    result = demo.flaky.enqueue(5)

    wait_for(lambda: finished(result.id), what="the last attempt")
    done = demo.flaky.get_result(result.id)
    assert (done.status, done.attempts) == (TaskResultStatus.FAILED, 3)
    assert [error.exception_class for error in done.errors] == [demo.FlakyError] * 3
    assert "attempt 1 fails" in done.errors[0].traceback
    last = done.errors[-1].traceback
    assert "Traceback" in last and "attempt 3 fails" in last


def test_a_task_that_takes_context_gets_its_result_and_attempt(worker):
    result = demo.describe.enqueue("ctx")

    wait_for(lambda: finished(result.id), what="the run")
    assert demo.describe.get_result(result.id).return_value == {
        "label": "ctx", "attempt": 1, "id": result.id, "status": "RUNNING"}


def test_the_framework_s_signals_fire(worker):
    succeeds, fails = demo.add.enqueue(1, 1), demo.fails.enqueue("signal")

    wait_for(lambda: len(tokens(succeeds.id)) == 3 and len(tokens(fails.id)) == 3,
             what="three signals of each task")
    assert tokens(succeeds.id) == ["signal:enqueued:READY", "signal:finished:SUCCESSFUL",
                                   "signal:started:RUNNING"]
    assert tokens(fails.id) == ["signal:enqueued:READY", "signal:finished:FAILED",
                                "signal:started:RUNNING"]


def test_task_enqueued_fires_at_commit_only(redis_server):
    with transaction.atomic():
        result = demo.add.enqueue(1, 1)
        assert tokens(result.id) == []
    assert tokens(result.id) == ["signal:enqueued:READY"]


# --- run_after, priorities and queues ---------------------------------------------------------


def test_run_after_far_ahead_is_held_in_the_database(redis_server):
    run_after = timezone.now() + timedelta(hours=1)

    result = demo.add.using(run_after=run_after).enqueue(1, 2)

    row = TaskRecord.objects.get(pk=result.id)
    assert (row.state, row.eta, row.next_attempt_at) == (TaskState.PENDING, run_after, run_after)
    assert queued_messages(redis_server) == {}
    assert default_task_backend.get_result(result.id).task.run_after == run_after


def test_a_held_task_is_published_by_the_sweeper_when_due_and_runs(worker, redis_server):
    with override_settings(RELIABLE_TASKS_DELAY_THRESHOLD=1):
        result = demo.add.using(run_after=timezone.now() + timedelta(seconds=2)).enqueue(2, 2)
        assert state_of(result.id) == TaskState.PENDING
        sweep()
        assert state_of(result.id) == TaskState.PENDING, "not due yet"
        wait_for(lambda: sweep().as_dict() and state_of(result.id) != TaskState.PENDING,
                 what="the sweeper's publish when due")

    wait_for(lambda: finished(result.id), what="the run")
    assert demo.add.get_result(result.id).return_value == 4


@pytest.mark.parametrize(("backend", "becomes"), [
    ("retrying", TaskState.QUEUED),  # OPTIONS: retry_on_lost; published again in the same pass
    ("default", TaskState.LOST),
])
def test_a_run_whose_worker_died_runs_again_only_where_the_backend_says(
        redis_server, backend, becomes):
    result = demo.record.using(backend=backend).enqueue(f"lost-{backend}")
    started = timezone.now() - timedelta(minutes=5)
    TaskRecord.objects.filter(pk=result.id).update(  # a dead worker's claim, lease run out
        state=TaskState.STARTED, attempts=1, worker="dead@host", started_at=started,
        lease_expires_at=started + timedelta(seconds=30))

    sweep()

    assert state_of(result.id) == becomes


def test_priority_and_queue_name_map_onto_the_message(redis_server):
    urgent = demo.send_email.enqueue("ops@example.com")
    ordinary = demo.add.enqueue(1, 1)
    unimportant = demo.add.using(priority=-100).enqueue(1, 1)

    by_id = {message["headers"]["id"]: (key, message)
             for key, messages in queued_messages(redis_server).items() for message in messages}
    key, message = by_id[urgent.id]
    assert (key, message["properties"]["priority"]) == ("emails", 2)
    assert message["headers"]["shadow"] == demo.send_email.module_path
    assert message["headers"]["task"] == RUNNER_NAME
    assert by_id[ordinary.id][0].startswith("celery") and by_id[ordinary.id][0] != "celery"
    assert by_id[ordinary.id][1]["properties"]["priority"] == 4
    assert by_id[unimportant.id][1]["properties"]["priority"] == 9
    assert TaskRecord.objects.get(pk=urgent.id).queue == "emails"


def test_a_worker_of_the_mapped_queue_runs_its_tasks(redis_server, celery_worker):
    celery_worker(redis_server, extra_args=["--queues=emails"])

    result = demo.send_email.enqueue("ops@example.com")

    wait_for(lambda: finished(result.id), what="the run on the emails queue")
    assert demo.send_email.get_result(result.id).return_value == "sent to ops@example.com"


def test_reliable_tasks_testing_runs_framework_tasks_in_process(redis_server):
    with run_at_commit() as runs, transaction.atomic():
        result = demo.add.enqueue(2, 3)
        with contextlib.suppress(RuntimeError), transaction.atomic():
            demo.add.enqueue(4, 4)
            raise RuntimeError("this savepoint rolls back")

    assert [(run.record.pk, run.state) for run in runs] == [
        (uuid.UUID(result.id), TaskState.SUCCESS)]
    assert demo.add.get_result(result.id).return_value == 5


# --- keys and limits: task_options ------------------------------------------------------------


def test_a_second_enqueue_while_the_key_is_held_returns_the_first_s_result(redis_server):
    with transaction.atomic():
        first = demo.rebuild_report.enqueue(7)
        again = demo.rebuild_report.enqueue(7)
        other = demo.rebuild_report.enqueue(8)
    later = demo.rebuild_report.enqueue(7)  # after the commit too

    assert again.id == first.id == later.id != other.id
    assert (again.args, again.status, again.task.func) == (
        [7], TaskResultStatus.READY, demo.rebuild_report.func)
    assert TaskRecord.objects.get(pk=first.id).unique_key == "report:7", "the user's args"
    assert TaskRecord.objects.count() == 2
    assert tokens(first.id) == ["signal:enqueued:READY"], "nothing else was enqueued"


def test_a_finished_holder_frees_the_key(redis_server):
    first = demo.rebuild_report.enqueue(7)
    TaskRecord.objects.filter(pk=first.id).update(state=TaskState.SUCCESS)

    assert demo.rebuild_report.enqueue(7).id != first.id


def test_a_key_held_with_on_conflict_raise_raises_duplicate_task(redis_server):
    with transaction.atomic():
        first = demo.send_invoice.enqueue(number=3)
        with pytest.raises(DuplicateTask, match="'invoice:3'") as raised:
            demo.send_invoice.enqueue(number=3)
        other = demo.send_invoice.enqueue(number=4)  # the transaction goes on

    assert str(raised.value.existing.pk) == first.id
    assert sorted(TaskRecord.objects.values_list("unique_key", flat=True)) == [
        "invoice:3", "invoice:4"]
    assert tokens(other.id) == ["signal:enqueued:READY"]


def test_a_key_held_by_a_celery_task_has_no_task_result_to_return(redis_server):
    holder = dispatch(celery_add, (1, 2), unique_key="report:9")

    with pytest.raises(DuplicateTask, match="not a django.tasks task") as raised:
        demo.rebuild_report.enqueue(9)

    assert raised.value.existing.pk == holder.pk
    assert TaskRecord.objects.count() == 1


@pytest.mark.parametrize(("key", "error"), [
    (5, "keyed_by_its_argument must return a non-empty string or None, not 5"),
    ("", "must return a non-empty string or None, not ''"),
    ("k" * 256, "256 characters long"),
])
def test_a_key_function_returning_what_the_ledger_cannot_hold_is_refused_at_enqueue(
        redis_server, key, error):
    with pytest.raises(DispatchError, match=error):
        keyed_by_its_argument.enqueue(key)
    assert TaskRecord.objects.count() == 0


def test_a_key_function_returning_none_means_no_key(redis_server):
    result = keyed_by_its_argument.enqueue(None)

    assert TaskRecord.objects.get(pk=result.id).unique_key is None
    assert keyed_by_its_argument.enqueue(None).id != result.id


@pytest.mark.parametrize(("options", "error"), [
    ({"uniqe_key": "k"}, r"unknown option\(s\) uniqe_key: it takes concurrency_key, "),
    ({"max_attempts": 3}, "unknown option"),  # a backend OPTION, not a task option
    ({"unique_key": 5}, "unique_key must be a string of 1 to 255 characters or a function"),
    ({"unique_key": ""}, "unique_key must be a string"),
    ({"rate_key": "k" * 256, "rate_limit": "1/s"}, "rate_key must be a string"),
    ({"on_conflict": "raise"}, "on_conflict needs a unique_key"),
    ({"unique_key": "k", "on_conflict": "ignore"}, "on_conflict must be 'return_existing'"),
    ({"concurrency_limit": 0}, "concurrency_limit must be a positive integer"),
    ({"concurrency_limit": True}, "concurrency_limit must be a positive integer"),
    ({"concurrency_key": lambda args, kwargs: "k"}, "needs a concurrency_limit"),
    ({"rate_limit": "10/y"}, "rate_limit must be a count per period"),
    ({"rate_key": "api"}, "needs a rate_limit"),
])
def test_task_options_the_ledger_cannot_hold_are_refused_when_declared(options, error):
    with pytest.raises(InvalidTask, match=error):
        task_options(**options)


def test_task_options_goes_under_task_on_the_function():
    with pytest.raises(InvalidTask, match="goes under @task"):
        task_options(unique_key="k")(task(plain_function))


def test_a_call_s_limits_are_keyed_by_its_arguments_or_else_by_the_task_s_path(redis_server):
    export = TaskRecord.objects.get(pk=demo.export.enqueue(42).id)
    api = TaskRecord.objects.get(pk=demo.call_api.enqueue().id)

    assert (export.concurrency_key, export.concurrency_limit) == ("export:42", 1)
    assert (api.rate_key, api.rate_limit) == (demo.call_api.module_path, "2/s")
    assert (export.unique_key, api.concurrency_key, export.rate_key) == (None, None, None)


def test_a_concurrency_limited_task_is_deferred_by_the_claim_and_ready_while_waiting(
        redis_server):
    first, second, other = (demo.export.enqueue(1), demo.export.enqueue(1),
                            demo.export.enqueue(2))

    def claim(result_id: str, worker: str) -> ledger.Claim:
        # As the runner claims: DjangoTaskRunner has no limits of its own (limited=False), so
        # the row's limits decide.
        return ledger.claim(result_id, task_name=RUNNER_NAME, worker=worker,
                            rerun_after_lost=False, limited=False)

    claims = [claim(first.id, "w1"), claim(second.id, "w2"), claim(other.id, "w3")]

    assert [claimed.won for claimed in claims] == [True, False, True]
    assert claims[1].waiting_for == WaitReason.CONCURRENCY
    assert state_of(second.id) == TaskState.WAITING
    assert [demo.export.get_result(result.id).status for result in (first, second, other)] == [
        TaskResultStatus.RUNNING, TaskResultStatus.READY, TaskResultStatus.RUNNING]
    assert ledger.record_success(first.id, claims[0], 1)
    assert [str(row.pk) for row in limits.wake("export:1")] == [second.id]
    assert claim(second.id, "w2").won


def test_a_concurrency_limited_task_runs_one_at_a_time_on_a_real_worker(worker):
    results = [demo.export.enqueue(5, 0.5), demo.export.enqueue(5, 0.5)]

    wait_for(lambda: all(finished(result.id) for result in results), what="both exports")
    done = sorted((demo.export.get_result(result.id) for result in results),
                  key=lambda result: result.started_at)
    assert [result.status for result in done] == [TaskResultStatus.SUCCESSFUL] * 2
    assert done[0].finished_at <= done[1].started_at
    deferrals = TaskRecord.objects.filter(pk__in=[result.id for result in results]).values_list(
        "deferrals", flat=True)
    assert sorted(deferrals) == [0, 1], "the claim deferred the second (two pool processes)"
