"""The messages the publisher sends, read back from a real Redis, one batch at a time."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from kombu import Producer
from kombu.exceptions import EncodeError

from example_project.celery import app
from example_project.demo.tasks import add, plain_noop
from reliable_tasks import dispatch
from reliable_tasks.models import TaskRecord
from reliable_tasks.publisher import send_records

pytestmark = pytest.mark.django_db(transaction=True)

ETA = datetime(2031, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
EXPIRES = datetime(2031, 2, 4, tzinfo=UTC)
OTHER = {"queue": "other", "priority": 3, "headers": {"x-trace": "t1"}, "time_limit": 30}


def sent_messages(redis_server) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every task message waiting in Redis, by task id: (its Redis key, the decoded message)."""
    client = redis_server.client()
    found = {}
    for key in client.keys("*"):
        if key.startswith("_kombu") or client.type(key) != "list":
            continue
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            message["body"] = json.loads(base64.b64decode(message["body"]))
            found[message["headers"]["id"]] = (key, message)
    return found


@pytest.fixture(params=["installed-kombu", "without-Producer.batch"])
def kombu_batching(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Publishing as the installed kombu allows, then as kombu before 5.7 (no ``batch``) does.

    kombu 5.7's ``Producer.batch`` is taken away for the second run, so that the pipeline
    the publisher makes by hand for older kombu is tested whatever kombu is installed.
    """
    if request.param == "without-Producer.batch":
        monkeypatch.delattr(Producer, "batch", raising=False)
    return str(request.param)


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` without what differs between two sends of one task: ids and delivery tag."""
    headers = {key: value for key, value in message["headers"].items()
               if key not in ("id", "root_id")}
    properties = {key: value for key, value in message["properties"].items()
                  if key not in ("correlation_id", "delivery_tag")}
    return {**message, "headers": headers, "properties": properties}


@pytest.fixture
def routed_by_first_argument() -> Iterator[None]:
    """``task_routes`` that send ``demo.add`` to the queue ``q<first argument>``."""

    def route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None,
              **_: Any) -> dict[str, str] | None:
        return {"queue": f"q{args[0]}"} if name == "demo.add" else None

    app.conf.update(task_routes=(route,))
    try:
        yield
    finally:
        app.conf.update(task_routes=None)


def test_each_message_of_a_batch_carries_its_own_rows_options_and_arguments(redis_server):
    lineage = {"parent_id": uuid.uuid4(), "root_id": uuid.uuid4()}
    rows = [
        TaskRecord(id=uuid.uuid4(), task_name="demo.add", args=[1, 2], options=dict(OTHER)),
        TaskRecord(id=uuid.uuid4(), task_name="demo.add", args=[3, 4], options=dict(OTHER)),
        TaskRecord(id=uuid.uuid4(), task_name="demo.add", args=[5, 6], options={"priority": 1},
                   attempts=2, eta=ETA, expires_at=EXPIRES, **lineage),
        TaskRecord(id=uuid.uuid4(), task_name="demo.record", args=["secret"],
                   kwargs={"sleep": 0.0}, options={"argsrepr": "('***',)"}),
        TaskRecord(id=uuid.uuid4(), task_name="demo.noop"),
    ]

    send_records(app, rows)

    sent = sent_messages(redis_server)
    assert set(sent) == {str(row.id) for row in rows}
    for row in rows:
        key, message = sent[str(row.id)]
        headers, properties = message["headers"], message["properties"]
        assert (headers["lang"], headers["task"]) == ("py", row.task_name), "protocol 2"
        assert message["body"][:2] == [row.args, row.kwargs]
        assert headers["retries"] == row.attempts
        assert headers["ignore_result"] is (row.task_name == "demo.noop"), "the task's own"
        assert headers["origin"] == anon_nodename()
        assert properties["correlation_id"] == str(row.id)
        if row.task_name == "demo.add" and row.options == OTHER:
            assert key.startswith("other")
            assert properties["delivery_info"]["routing_key"] == "other"
            assert properties["priority"] == 3
            assert headers["x-trace"] == "t1"
            assert headers["timelimit"] == [30, None]
            assert headers["argsrepr"] == saferepr(row.args)
            assert headers["root_id"] == str(row.id) and headers["parent_id"] is None
        else:
            assert key == "celery"
            assert "x-trace" not in headers
    _, delayed = sent[str(rows[2].id)]
    assert (delayed["headers"]["eta"], delayed["headers"]["expires"]) == (
        ETA.isoformat(), EXPIRES.isoformat())
    assert delayed["headers"]["parent_id"] == str(lineage["parent_id"])
    assert delayed["headers"]["root_id"] == str(lineage["root_id"])
    assert delayed["properties"]["priority"] == 1
    assert sent[str(rows[3].id)][1]["headers"]["argsrepr"] == "('***',)", "given, kept"
    assert sent[str(rows[3].id)][1]["headers"]["kwargsrepr"] == saferepr({"sleep": 0.0})
    noop = sent[str(rows[4].id)][1]["headers"]
    assert (noop["argsrepr"], noop["kwargsrepr"]) == ("()", "{}"), "as Celery shows no arguments"


def test_task_routes_that_read_the_arguments_route_each_message_by_its_own(
        redis_server, routed_by_first_argument):
    rows = [TaskRecord(id=uuid.uuid4(), task_name="demo.add", args=[n, 0]) for n in (1, 2, 1)]

    send_records(app, rows)

    sent = sent_messages(redis_server)
    assert [sent[str(row.id)][0] for row in rows] == ["q1", "q2", "q1"]


def test_publishing_leaves_the_records_options_as_they_were_recorded(redis_server):
    options = {"queue": "other", "priority": 3, "time_limit": 30, "headers": {"x-trace": "t2"}}

    row = dispatch(add, (1, 2), **options)

    assert row.options == options
    assert TaskRecord.objects.get(pk=row.pk).options == options
    assert str(row.id) in sent_messages(redis_server)


@pytest.mark.parametrize("options", [
    {}, {"priority": 5}, {"priority": 9}, {"queue": "other", "priority": 3},
], ids=["default", "priority-5", "priority-9", "other-queue-priority-3"])
def test_a_batch_puts_each_message_where_and_as_plain_celery_puts_it(
        redis_server, kombu_batching, options):
    # kombu's Redis transport keeps each priority step of a queue in a list of its own.
    # ignore_result as the task's apply_async would give it (send_task knows no task).
    plain_id = app.send_task("demo.add", args=[1, 2], ignore_result=False, **options).id
    row = TaskRecord(id=uuid.uuid4(), task_name="demo.add", args=[1, 2], options=options)

    send_records(app, [row])

    sent = sent_messages(redis_server)
    plain_key, plain = sent[plain_id]
    key, message = sent[str(row.id)]
    assert key == plain_key
    assert key.startswith(options.get("queue", "celery"))
    assert key.endswith("\x06\x163") is (options.get("priority") in (3, 5))
    assert without_ids(message) == without_ids(plain)


def test_nothing_of_a_batch_reaches_redis_when_one_of_its_messages_fails(
        redis_server, kombu_batching):
    rows = [TaskRecord(id=uuid.uuid4(), task_name="demo.add", args=[n, n]) for n in range(3)]
    unencodable = TaskRecord(id=uuid.uuid4(), task_name="demo.add", args=[object(), 0])

    with pytest.raises(EncodeError):
        send_records(app, [*rows, unencodable])

    assert sent_messages(redis_server) == {}, "the first three were held back with the last"
    send_records(app, rows)
    # LPUSHed in order: the head of the list is the last one, workers pop from the tail.
    assert list(sent_messages(redis_server)) == [str(row.id) for row in reversed(rows)]


def test_a_task_plain_celery_sent_before_without_options_still_publishes(redis_server):
    # Celery before 5.7 keeps ignore_result in the task's cached execution options then.
    plain_noop.apply_async()
    row = TaskRecord(id=uuid.uuid4(), task_name=plain_noop.name)

    send_records(app, [row])

    assert sent_messages(redis_server)[str(row.id)][1]["headers"]["ignore_result"] is True
