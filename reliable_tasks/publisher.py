"""Publishing ledger rows to the broker over one bounded, pipelined producer connection.

The connection is the app's own (one per thread and process), with socket timeouts and no
connection retries, so a publish to a down or hung Redis fails within ``PUBLISH_TIMEOUT``
instead of blocking the caller. Messages of one batch go out in one Redis pipeline
(kombu's ``Producer.batch``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu import Connection, Producer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.sentinel import SentinelConnectionPool

from reliable_tasks.celery_app import find_task
from reliable_tasks.conf import app_settings
from reliable_tasks.payload import from_stored

if TYPE_CHECKING:
    from reliable_tasks.models import TaskRecord

logger = logging.getLogger(__name__)

#: Options Celery takes as arguments of the task message rather than as publish properties.
_MESSAGE_ARGUMENTS = (
    "group_id", "group_index", "chord", "link", "link_error", "chain",
    "time_limit", "soft_time_limit", "ignore_result", "shadow", "retries",
)


#: Seconds a publisher connection may stay idle before, behind Sentinel, the master it talks to
#: is checked again with the sentinels: a master that hung meanwhile and was replaced by a
#: failover still accepts writes until the sentinels demote it, and loses them then.
SENTINEL_RECHECK_AFTER = 1.0


class _ThreadPublisher(threading.local):
    connection: Connection | None = None
    producer: Producer | None = None
    pid: int = 0
    broker_url: str = ""
    last_used: float = 0.0


_local = _ThreadPublisher()


def _bounded_connection(app: Celery) -> Connection:
    timeout = app_settings.PUBLISH_TIMEOUT
    return app.connection_for_write(
        connect_timeout=timeout,
        transport_options={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry_on_timeout": False,
            "max_retries": 0,
        },
    )


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
        connection = _bounded_connection(app)
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


class _BatchContext:
    """What one batch looks up once: each task's registration and defaults, declared queues."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.tasks: dict[str, tuple[Any, dict[str, Any]]] = {}
        self.declared: set[str] = set()
        self.reply_to = app.thread_oid
        self.sent_event = app.conf.task_send_sent_event

    def task(self, name: str) -> tuple[Any, dict[str, Any]]:
        """The task registered as ``name`` and its non-empty execution options."""
        if name not in self.tasks:
            task_type = find_task(self.app, name)
            defaults = {} if task_type is None else {
                key: value for key, value in task_type._get_exec_options().items()
                if value is not None}
            self.tasks[name] = (task_type, defaults)
        return self.tasks[name]

    def declare_once(self, options: dict[str, Any]) -> None:
        """Let Celery declare a queue for the first message of the batch that uses it only."""
        queue = options.get("queue")
        name = getattr(queue, "name", queue)
        if name in self.declared:
            options["declare"] = []
        elif name:
            self.declared.add(name)


def _send_one(batch: _BatchContext, producer: Producer, record: TaskRecord) -> None:
    app = batch.app
    options: dict[str, Any] = from_stored(record.options) if record.options else {}
    task_type, defaults = batch.task(record.task_name)
    message_arguments = {key: options.pop(key) for key in _MESSAGE_ARGUMENTS if key in options}
    # Celery's request.retries counts the runs before this one, whoever re-published it.
    message_arguments["retries"] = record.attempts
    if task_type is not None:
        for key, value in defaults.items():
            options.setdefault(key, value)
        options.pop("expires", None)
        message_arguments.setdefault("time_limit", options.pop("time_limit", None))
        message_arguments.setdefault("soft_time_limit", options.pop("soft_time_limit", None))
    args, kwargs = from_stored(record.args), from_stored(record.kwargs)
    options = app.amqp.router.route(options, record.task_name, args, kwargs, task_type)
    batch.declare_once(options)
    link = message_arguments.pop("link", None)
    link_error = message_arguments.pop("link_error", None)
    message = app.amqp.create_task_message(
        str(record.id), record.task_name, args, kwargs,
        eta=record.eta, expires=record.expires_at,
        callbacks=_as_list(link), errbacks=_as_list(link_error),
        reply_to=options.pop("reply_to", None) or batch.reply_to,
        create_sent_event=batch.sent_event,
        root_id=str(record.root_id) if record.root_id else None,
        parent_id=str(record.parent_id) if record.parent_id else None,
        **message_arguments,
        **options,
    )
    app.amqp.send_task_message(producer, record.task_name, message, retry=False, **options)


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    return list(value) if isinstance(value, list | tuple) else [value]


def send_records(app: Celery, records: Sequence[TaskRecord]) -> None:
    """Publish ``records`` in one pipelined batch; raise if the batch did not go out.

    When this raises, delivery of the batch is uncertain: some messages may have reached Redis.
    Callers leave such rows PENDING; the worker's claim makes a second delivery harmless.
    """
    batch = _BatchContext(app)
    with producer_for(app) as producer, producer.batch(  # type: ignore[attr-defined]
            max_size=max(len(records), 1)):
        for record in records:
            _send_one(batch, producer, record)


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
