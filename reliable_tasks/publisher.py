"""Publishing ledger rows to the broker over one bounded, pipelined producer connection.

The connection is the app's own (one per thread and process), with socket timeouts and no
connection retries, so a publish to a down or hung Redis fails within ``PUBLISH_TIMEOUT``
instead of blocking the caller. Messages of one batch go out in one Redis pipeline: kombu's
``Producer.batch`` where kombu has it (5.7 and later), the same pipeline made here before.

Each message is built and sent by Celery itself (``amqp.create_task_message`` and
``amqp.send_task_message``: protocol 2, the publish signals, the queue declaration). What is the
same for every message of a batch is worked out once per batch: the task's registration and
defaults, the routing of each distinct set of options (when no ``task_routes`` could look at the
arguments), Celery settings that are slow to read, and the ``origin`` field.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

from celery import Celery
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from kombu import Connection, Producer
from kombu.utils.json import dumps
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.sentinel import SentinelConnectionPool

from reliable_tasks.celery_app import bounded_broker_connection, find_task
from reliable_tasks.conf import app_settings
from reliable_tasks.models import TaskRecord
from reliable_tasks.payload import from_stored

logger = logging.getLogger(__name__)

#: Options Celery takes as arguments of the task message rather than as publish properties.
_MESSAGE_ARGUMENTS = (
    "group_id", "group_index", "chord", "link", "link_error", "chain",
    "time_limit", "soft_time_limit", "ignore_result", "shadow", "retries",
    "replaced_task_nesting", "stamped_headers",
)


#: Seconds a publisher connection may stay idle before, behind Sentinel, the master it talks to
#: is checked again with the sentinels: a master that hung meanwhile and was replaced by a
#: failover still accepts writes until the sentinels demote it, and loses them then.
SENTINEL_RECHECK_AFTER = 1.0


def shortest_safe_down_after() -> float:
    """Seconds above which Sentinel's ``down-after-milliseconds`` must lie for publishing.

    A publish gives up on a hung master after ``PUBLISH_TIMEOUT``, and an idle publisher asks
    the sentinels for the master again after ``SENTINEL_RECHECK_AFTER``; a master failed over
    sooner can take a publish after it was replaced, and lose it when it is demoted.
    """
    return app_settings.PUBLISH_TIMEOUT + SENTINEL_RECHECK_AFTER


class _ThreadPublisher(threading.local):
    connection: Connection | None = None
    producer: Producer | None = None
    pid: int = 0
    broker_url: str = ""
    last_used: float = 0.0


_local = _ThreadPublisher()


def _reset_local() -> None:
    connection = _local.connection
    _local.connection = None
    _local.producer = None
    if connection is not None:
        try:
            connection.release()
        except Exception:  # noqa: BLE001 - the connection is being thrown away anyway
            logger.debug("closing a broken publisher connection failed", exc_info=True)


@contextmanager
def producer_for(app: Celery) -> Iterator[Producer]:
    """Yield this thread's producer; drop its connection if anything fails inside."""
    if _local.pid != os.getpid() or _local.broker_url != app.conf.broker_url:
        # A forked child must not share its parent's socket; a new broker URL needs a new one.
        _local.connection = None
        _local.producer = None
        _local.pid = os.getpid()
        _local.broker_url = app.conf.broker_url
    if _local.producer is None:
        connection = bounded_broker_connection(app)
        _local.connection = connection
        _local.producer = app.amqp.Producer(connection, auto_declare=False)
    elif time.monotonic() - _local.last_used > SENTINEL_RECHECK_AFTER:
        _recheck_sentinel_master(_local.producer)
    try:
        yield _local.producer
    except BaseException:
        _reset_local()
        raise
    finally:
        _local.last_used = time.monotonic()


def _recheck_sentinel_master(producer: Producer) -> None:
    """Behind Sentinel, ask the sentinels for the master; on a change, drop the old sockets.

    redis-py's ``SentinelConnectionPool.get_master_address()`` disconnects the pool's idle
    connections when the master moved, so the publish that follows goes to the new one. A
    failure (no master during a failover) drops this thread's connection.
    """
    pool = getattr(producer.channel, "pool", None)
    if not isinstance(pool, SentinelConnectionPool):
        return
    try:
        pool.get_master_address()
    except Exception:
        _reset_local()
        raise


def close_publisher() -> None:
    """Close this thread's publisher connection (tests, process shutdown)."""
    _reset_local()


class PublishRow(NamedTuple):
    """The columns of a ledger row that publishing reads, loaded without a model instance.

    The names are ``TaskRecord``'s fields: ``values_list(*PublishRow._fields)`` loads them.
    """

    id: UUID
    task_name: str
    args: Any
    kwargs: Any
    options: Any
    attempts: int
    eta: datetime | None
    expires_at: datetime | None
    root_id: UUID | None
    parent_id: UUID | None


#: What publishing takes: ledger rows as model instances, or just the columns it reads.
Publishable = TaskRecord | PublishRow


class _Route(NamedTuple):
    """What the messages of one task sent with the same stored options share."""

    options: dict[str, Any]  # publish options, routed by Celery
    arguments: dict[str, Any]  # task-message arguments: time limits, group, links, ...


def _options_key(stored: Any) -> str:
    """A key equal for equal stored options (plain JSON)."""
    return json.dumps(stored, sort_keys=True, separators=(",", ":")) if stored else ""


class _BatchContext:
    """What one batch works out once: tasks, routes, slow Celery settings, declared queues."""

    def __init__(self, app: Celery) -> None:
        amqp = app.amqp
        self.app = app
        self.create_message = amqp.create_task_message
        self.send_message = amqp.send_task_message
        self.router = amqp.router
        # Without task_routes, a route depends on the task and its options, never on arguments.
        self.reuse_routes = not self.router.routes  # type: ignore[attr-defined]
        self.tasks: dict[str, tuple[Any, dict[str, Any]]] = {}
        self.routes: dict[tuple[str, str], _Route] = {}
        self.declared: set[str] = set()
        self.reply_to = app.thread_oid
        self.sent_event = app.conf.task_send_sent_event
        # Celery 5.7's setting; before it, Celery used saferepr's default depth of 3.
        self.repr_maxlevels = app.conf.get("task_repr_maxlevels", 3)
        self.argsrepr_maxsize = amqp.argsrepr_maxsize
        self.kwargsrepr_maxsize = amqp.kwargsrepr_maxsize
        self.origin = anon_nodename()

    def task(self, name: str) -> tuple[Any, dict[str, Any]]:
        """The task registered as ``name`` and its non-empty execution options."""
        if name not in self.tasks:
            task_type = find_task(self.app, name)
            defaults = {} if task_type is None else {
                key: value for key, value in task_type._get_exec_options().items()
                if value is not None}
            self.tasks[name] = (task_type, defaults)
        return self.tasks[name]

    def route(self, row: Publishable, args: Any, kwargs: Any) -> _Route:
        """``row``'s publish options and message arguments, as new dicts the caller may change."""
        if not self.reuse_routes:
            return self._route(row, args, kwargs)
        key = (row.task_name, _options_key(row.options))
        found = self.routes.get(key)
        if found is None:
            found = self.routes[key] = self._route(row, args, kwargs)
        return _Route(dict(found.options), dict(found.arguments))

    def _route(self, row: Publishable, args: Any, kwargs: Any) -> _Route:
        # A copy: Celery's routing changes the dict it is given, and the row's own must not.
        options: dict[str, Any] = dict(from_stored(row.options)) if row.options else {}
        task_type, defaults = self.task(row.task_name)
        arguments = {key: options.pop(key) for key in _MESSAGE_ARGUMENTS if key in options}
        if task_type is not None:
            for key, value in defaults.items():
                options.setdefault(key, value)
            options.pop("expires", None)
            arguments.setdefault("time_limit", options.pop("time_limit", None))
            arguments.setdefault("soft_time_limit", options.pop("soft_time_limit", None))
            # As apply_async does: the worker reads it from the message, not from the task.
            # (Celery < 5.7's apply_async without options leaves it in the task's cached
            # execution options, read above: a message argument, never a publish option.)
            ignore_result = options.pop("ignore_result", task_type.ignore_result)
            arguments.setdefault("ignore_result", ignore_result)
        options = self.router.route(options, row.task_name, args, kwargs, task_type)
        return _Route(options, arguments)

    def computed_fields(self, options: dict[str, Any], args: Any,
                        kwargs: Any) -> dict[str, Any]:
        """The fields Celery would compute for the message (reprs, origin) unless given.

        Computed here with the batch's settings, as Celery does: ``saferepr`` of the
        arguments (``()`` and ``{}`` when there are none) and this process' node name.
        """
        fields: dict[str, Any] = {}
        if "argsrepr" not in options:
            fields["argsrepr"] = saferepr(args, self.argsrepr_maxsize,
                                          maxlevels=self.repr_maxlevels) if args else "()"
        if "kwargsrepr" not in options:
            fields["kwargsrepr"] = saferepr(kwargs, self.kwargsrepr_maxsize,
                                            maxlevels=self.repr_maxlevels) if kwargs else "{}"
        if "origin" not in options:
            fields["origin"] = self.origin
        return fields

    def declare_once(self, options: dict[str, Any]) -> None:
        """Let Celery declare a queue for the first message of the batch that uses it only."""
        queue = options.get("queue")
        name = getattr(queue, "name", queue)
        if name in self.declared:
            options["declare"] = []
        elif name:
            self.declared.add(name)


def _send_one(batch: _BatchContext, producer: Producer, row: Publishable) -> None:
    args, kwargs = from_stored(row.args), from_stored(row.kwargs)
    options, arguments = batch.route(row, args, kwargs)
    # Celery's request.retries counts the runs before this one, whoever re-published it.
    arguments["retries"] = row.attempts
    batch.declare_once(options)
    link = arguments.pop("link", None)
    link_error = arguments.pop("link_error", None)
    message = batch.create_message(
        str(row.id), row.task_name, args, kwargs,
        eta=row.eta, expires=row.expires_at,
        callbacks=_as_list(link), errbacks=_as_list(link_error),
        reply_to=options.pop("reply_to", None) or batch.reply_to,
        create_sent_event=batch.sent_event,
        root_id=str(row.root_id) if row.root_id else None,
        parent_id=str(row.parent_id) if row.parent_id else None,
        **batch.computed_fields(options, args, kwargs),
        **arguments,
        **options,
    )
    # Stamps are message headers (Celery read them from the options above), never properties.
    for stamp in arguments.get("stamped_headers") or ():
        options.pop(stamp, None)
    batch.send_message(producer, row.task_name, message, retry=False, **options)


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    return list(value) if isinstance(value, list | tuple) else [value]


def send_records(app: Celery, records: Sequence[Publishable]) -> None:
    """Publish ``records`` in one pipelined batch; raise if the batch did not go out.

    When this raises, delivery of the batch is uncertain: some messages may have reached Redis.
    Callers leave such rows PENDING; the worker's claim makes a second delivery harmless.
    """
    batch = _BatchContext(app)
    with producer_for(app) as producer, _pipelined(producer, len(records)):
        for record in records:
            _send_one(batch, producer, record)


def _pipelined(producer: Producer, size: int) -> AbstractContextManager[Any]:
    """A block whose publishes through ``producer`` go to Redis together, at its end.

    Nothing is sent if the block raises. kombu 5.7 and later do it with ``Producer.batch``;
    before, ``_pipelined_puts`` does what that batch does on the Redis transport.
    """
    batch = getattr(producer, "batch", None)
    if batch is not None:
        return batch(max_size=max(size, 1))
    return _pipelined_puts(producer.channel)


@contextmanager
def _pipelined_puts(channel: Any) -> Iterator[None]:
    """Buffer a kombu (< 5.7) Redis channel's message puts in one pipeline, sent at the end.

    kombu's Redis ``Channel._put`` LPUSHes each message, JSON as ``kombu.utils.json.dumps``
    writes it, onto the list of its queue and priority (``_q_for_pri``: the queue's name, with
    a suffix for a priority step above 0), one round trip per message. Here the channel's
    ``_put`` pushes the same value onto the same key in a pipeline instead, for this block
    only; exchange lookups and queue declarations still go straight to Redis, as in kombu's
    batch. The pipeline is not a transaction and is never replayed (the publisher's
    connections do not retry). A transport other than Redis publishes each message as sent.
    """
    if not hasattr(channel, "_q_for_pri"):
        yield
        return
    with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:

        def put(queue: str, message: dict[str, Any], **_: Any) -> None:
            priority = channel._get_message_priority(message, reverse=False)
            pipe.lpush(channel._q_for_pri(queue, priority), dumps(message))

        channel._put = put
        try:
            yield
        finally:
            del channel._put
        pipe.execute()


def broker_run_id(app: Celery) -> str:
    """The run id of the Redis master behind the broker (changes on restart and failover).

    A connection that reaches a replica (a master demoted by a failover: it keeps its run id)
    is dropped and the question asked again over a new one, which finds the current master.
    """
    for _ in range(2):
        with producer_for(app) as producer:
            client = producer.connection.default_channel.client  # type: ignore[union-attr]
            run_id = str(client.info("server")["run_id"])
            if client.info("replication").get("role") == "master":
                return run_id
        _reset_local()
    raise RedisConnectionError("the broker connection reaches a replica, not the master")
