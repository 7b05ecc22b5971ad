"""Celery's own behaviours on ``ReliableTask``: call-time checks, eager runs, reused ids and,
against a real worker, replace, Reject, retries, links, children and chords on both result
backends. Each ends with no ledger row left running."""

from __future__ import annotations

import gc
import json
import uuid
from collections.abc import Iterator

import pytest
from celery import Task, chord
from celery.canvas import StampingVisitor
from celery.result import AsyncResult, EagerResult
from pydantic import BaseModel

from example_project.celery import app as celery_app
from example_project.demo.models import Execution
from example_project.demo.tasks import (
    add,
    boom,
    gives_up,
    noop,
    plain_replaced,
    record,
    reject_once,
    replaced,
    retries_by_default,
    retries_five,
    retries_once,
    spawn,
    total,
)
from example_project.devservers import RedisServer, celery_app_using
from reliable_tasks import ReliableTask
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState
from tests.test_execution import state_of, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


class Point(BaseModel):
    """A pydantic argument."""

    x: int
    y: int


@celery_app.task(base=ReliableTask, name="tests.point_sum", pydantic=True)
def point_sum(point: Point) -> int:
    """Add a point's coordinates (Celery validates and dumps the model)."""
    return point.x + point.y


@celery_app.task(base=ReliableTask, name="tests.bad_limits", soft_time_limit=10, time_limit=5)
def bad_limits() -> None:
    """A task whose soft time limit is above its hard one."""


class ColourStamp(StampingVisitor):
    """Stamps every signature it visits with ``colour=blue``."""

    def on_signature(self, sig: object, **headers: object) -> dict[str, str]:
        return {"colour": "blue"}


def messages(server: RedisServer) -> list[dict[str, object]]:
    return [json.loads(raw) for raw in server.client().lrange("celery", 0, -1)]


def running_rows() -> list[tuple[str, str]]:
    """Rows a finished test must not leave behind: running, or waiting for a replacement."""
    return list(TaskRecord.objects.filter(state__in=[TaskState.STARTED, TaskState.REPLACED])
                .values_list("task_name", "state"))


# --- call-time checks, as Task.apply_async makes them ----------------------------------------


def test_arguments_that_do_not_fit_the_signature_raise_type_error(redis_server):
    with pytest.raises(TypeError):
        add.delay(5)
    assert TaskRecord.objects.count() == 0
    assert messages(redis_server) == []


def test_a_soft_time_limit_above_the_hard_one_is_refused(redis_server):
    with pytest.raises(ValueError, match="soft_time_limit"):
        bad_limits.delay()
    assert TaskRecord.objects.count() == 0


@pytest.mark.skipif(not hasattr(Task, "_dump_pydantic_arguments"),
                    reason="Celery < 5.7 does not dump pydantic arguments at call time")
def test_pydantic_arguments_are_dumped_before_they_are_recorded(redis_server):
    result = point_sum.delay(Point(x=1, y=2))

    assert TaskRecord.objects.get(pk=result.id).args == [{"x": 1, "y": 2}]
    assert messages(redis_server)[0]["body"] is not None


def test_results_are_marked_ignored_as_celery_marks_them(redis_server):
    assert noop.delay().ignored is True
    assert add.delay(1, 1).ignored is False
    assert add.apply_async((1, 1), ignore_result=True).ignored is True


def test_stamps_travel_as_headers_never_as_message_properties(redis_server):
    signature = add.s(1, 2)
    signature.stamp(ColourStamp())
    signature.apply_async()

    [message] = messages(redis_server)
    headers, properties = message["headers"], message["properties"]
    assert isinstance(headers, dict) and isinstance(properties, dict)
    assert headers["stamps"] == {"colour": ["blue"]} or headers["stamps"] == {"colour": "blue"}
    assert "colour" in headers["stamped_headers"]
    assert "colour" not in properties and "stamped_headers" not in properties


# --- eager runs ---------------------------------------------------------------------------------


def test_apply_runs_the_body_every_time_and_the_ledger_keeps_the_first_run(redis_server):
    task_id = str(uuid.uuid4())

    assert record.apply(("eager",), task_id=task_id).get() == "eager"
    assert record.apply(("eager",), task_id=task_id).get() == "eager"

    assert Execution.objects.filter(token="eager").count() == 2
    row = TaskRecord.objects.get(pk=task_id)
    assert (row.state, row.attempts) == (TaskState.SUCCESS, 1)


def test_eager_retries_run_in_one_row_that_ends_with_the_last_run(redis_server):
    assert retries_once.apply(("eager-retry",)).get() == 1
    failed = retries_by_default.apply(("eager-retries",))

    assert failed.failed()
    assert Execution.objects.filter(token="eager-retry").count() == 2
    assert Execution.objects.filter(token="eager-retries").count() == 4
    rows = {row.task_name: row for row in TaskRecord.objects.all()}
    assert (rows["demo.retries_once"].state, rows["demo.retries_once"].attempts) == (
        TaskState.SUCCESS, 2)
    assert (rows["demo.retries_by_default"].state,
            rows["demo.retries_by_default"].attempts) == (TaskState.FAILURE, 4)
    assert running_rows() == []


def test_always_eager_calls_return_celery_s_eager_result(redis_server):
    celery_app.conf.task_always_eager = True
    try:
        result = add.delay(1, 2)
        chained = (add.s(1, 1) | add.s(3)).delay()
    finally:
        celery_app.conf.task_always_eager = False

    assert isinstance(result, EagerResult)
    assert result.get() == 3
    assert chained.get() == 5
    assert messages(redis_server) == []
    assert running_rows() == []


# --- against a worker ---------------------------------------------------------------------------


@pytest.fixture
def worker(redis_server, celery_worker) -> RedisServer:
    celery_worker(redis_server)
    return redis_server


def test_a_signature_applied_twice_keeps_one_row_and_runs_once(worker):
    signature = record.s("reused")
    signature.freeze()

    first, second = signature.apply_async(), signature.apply_async()

    assert first.id == second.id
    wait_for(lambda: TaskRecord.objects.get(pk=first.id).duplicate_deliveries == 1,
             what="the second message skipped")
    assert state_of(first.id) == TaskState.SUCCESS
    assert Execution.objects.filter(token="reused").count() == 1


def test_a_finished_task_sent_again_runs_again_in_its_one_row(worker):
    signature = record.s("sent-again")
    signature.freeze()
    first = signature.apply_async()
    wait_for(lambda: state_of(first.id) == TaskState.SUCCESS, what="the first run")

    signature.apply_async()  # as Celery does, a finished task id sent again runs again

    wait_for(lambda: Execution.objects.filter(token="sent-again").count() == 2,
             what="the second run")
    wait_for(lambda: state_of(first.id) == TaskState.SUCCESS, what="the second outcome")
    assert TaskRecord.objects.filter(pk=first.id).count() == 1
    assert TaskRecord.objects.get(pk=first.id).attempts == 1


@pytest.mark.parametrize(("shape", "expected", "ends_as"), [
    ("task", 6, "demo.add"),
    ("chain", 16, "demo.add"),
    ("group", [6, 7], "celery.accumulate"),
    ("chord", 13, "demo.total"),
])
def test_a_replaced_task_ends_with_its_replacement_s_outcome(worker, shape, expected, ends_as):
    result = replaced.delay(shape, 5)

    assert result.get(timeout=60) == expected
    wait_for(lambda: state_of(result.id) == TaskState.SUCCESS, what="the row's outcome")
    row = TaskRecord.objects.get(pk=result.id)
    assert row.task_name == ends_as
    [handed_over] = [entry for entry in row.history if entry["outcome"] == TaskState.REPLACED]
    assert handed_over["replaced_by"]
    wait_for(lambda: running_rows() == [], what="no row left running")


def test_a_plain_task_replaced_by_a_reliable_one_hands_its_row_over(worker):
    result = plain_replaced.delay(5)

    assert result.get(timeout=60) == 6
    wait_for(lambda: state_of(result.id) == TaskState.SUCCESS, what="the replacement's outcome")
    row = TaskRecord.objects.get(pk=result.id)
    assert (row.task_name, row.adopted, row.attempts) == ("demo.add", False, 1)
    wait_for(lambda: running_rows() == [], what="no row left running")


def test_reject_with_requeue_runs_the_task_again(worker):
    row_id = reject_once.delay("rejected-once").id

    wait_for(lambda: state_of(row_id) == TaskState.SUCCESS, what="the second delivery's run")
    assert Execution.objects.filter(token="rejected-once:rejected").count() == 1
    assert Execution.objects.filter(token="rejected-once").count() == 1
    assert TaskRecord.objects.get(pk=row_id).attempts == 2


@pytest.mark.parametrize(("how", "ends_as", "error"), [
    ("ignore", TaskState.REVOKED, "celery.exceptions.Ignore"),
    ("reject", TaskState.FAILURE, "celery.exceptions.Reject"),
])
def test_ignore_and_reject_without_requeue_finish_the_row(worker, how, ends_as, error):
    row_id = gives_up.delay(how).id

    wait_for(lambda: state_of(row_id) == ends_as, what=ends_as)
    row = TaskRecord.objects.get(pk=row_id)
    assert (row.error_type, row.attempts) == (error, 1)


@pytest.mark.parametrize(("task", "runs"), [(retries_by_default, 4), (retries_five, 6)])
def test_self_retry_follows_celery_s_max_retries(worker, task, runs):
    token = f"retries-{runs}"
    row_id = task.delay(token).id

    wait_for(lambda: state_of(row_id) == TaskState.FAILURE, what="retries used up")
    assert Execution.objects.filter(token=token).count() == runs
    row = TaskRecord.objects.get(pk=row_id)
    assert row.attempts == runs
    assert row.error_type == "celery.exceptions.MaxRetriesExceededError"


def test_link_and_link_error_run_once(worker):
    succeeded = add.apply_async((1, 1), link=record.si("linked"))
    failed = boom.apply_async(link_error=record.si("errback"))

    wait_for(lambda: Execution.objects.filter(token__in=["linked", "errback"]).count() == 2,
             what="both callbacks")
    assert state_of(succeeded.id) == TaskState.SUCCESS
    assert state_of(failed.id) == TaskState.FAILURE
    wait_for(lambda: running_rows() == [], what="no row left running")
    assert Execution.objects.filter(token="linked").count() == 1
    assert Execution.objects.filter(token="errback").count() == 1


def test_a_task_sent_from_a_task_is_its_child(worker):
    parent = spawn.delay(3)

    child_id = parent.get(timeout=30)
    assert [child.id for child in AsyncResult(parent.id).children] == [child_id]
    assert TaskRecord.objects.get(pk=child_id).parent_id == uuid.UUID(parent.id)
    assert AsyncResult(child_id).get(timeout=30) == 6


#: Before 5.7, Celery's Redis result backend stores a chord's size with SETEX, which redis-py 8
#: deprecates; the worker's side of it is not this process' warning.
_CELERY_SETEX = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")


@pytest.fixture(params=["django-db", pytest.param("redis", marks=_CELERY_SETEX)])
def result_backend(request, redis_server, celery_worker) -> Iterator[str]:
    """A worker and this process on the result backend of the parameter."""
    backend = redis_server.url if request.param == "redis" else "django-db"
    celery_worker(redis_server, env={"CELERY_RESULT_BACKEND": backend})
    celery_app._local.__dict__.pop("backend", None)
    with celery_app_using(celery_app, {"result_backend": backend}):
        yield request.param
        # A result's __del__ unsubscribes from the backend: collect the test's results while
        # their Redis is up, not in a later test (where it retries a dead server for 20 s).
        gc.collect()
    celery_app._local.__dict__.pop("backend", None)


def test_a_chord_runs_its_body_once_on_either_result_backend(result_backend):
    result = chord([add.s(number, number) for number in range(4)], total.s()).delay()

    assert result.get(timeout=60) == 12
    wait_for(lambda: running_rows() == [], what="no row left running")
    body = TaskRecord.objects.get(pk=result.id)
    assert (body.task_name, body.state, body.attempts) == ("demo.total", TaskState.SUCCESS, 1)
    assert TaskRecord.objects.filter(task_name="demo.add", state=TaskState.SUCCESS).count() == 4
