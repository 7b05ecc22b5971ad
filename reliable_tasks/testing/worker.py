"""One delivery of a ledger row, run in this process the way a worker runs it.

The request is built from the row, as the publisher builds the message (the call's stored
arguments and options, ``retries`` = the attempts made so far, its lineage, links and headers),
and Celery's tracer runs the task: ``ReliableTask.__call__`` claims the row, runs the body and
writes the outcome, and a retry goes through the task's ``retry()`` and the outbox, all as on a
worker. Results are not stored in the result backend (as under Celery's eager mode: a test needs
no result store; the ledger records the outcome), and time limits are not enforced (there is no
pool process to interrupt).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.app.trace import build_tracer
from celery.exceptions import Retry
from django.db import connections

if TYPE_CHECKING:
    from reliable_tasks.models import TaskRecord

#: The worker name the claim records for deliveries run in-process.
WORKER = "inline@reliable_tasks.testing"


@dataclass(frozen=True)
class Run:
    """One delivery run in-process: the ledger row as the run left it, and what the body did.

    ``result`` is what the body returned (None when it raised); ``exception`` what it raised
    (for a retry, the error that caused it), or None.
    """

    record: TaskRecord
    result: Any = None
    exception: BaseException | None = None

    @property
    def state(self) -> str:
        """The row's state after this run (``TaskState`` value)."""
        return self.record.state


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    return list(value) if isinstance(value, list | tuple) else [value]


def _request(record: TaskRecord, task: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The request a worker builds from this row's message."""
    stamped = _as_list(options.get("stamped_headers")) or []
    request: dict[str, Any] = {
        **(options.get("headers") or {}),
        "id": str(record.pk),
        "task": record.task_name,
        "retries": record.attempts,
        "root_id": str(record.root_id or record.pk),
        "parent_id": str(record.parent_id) if record.parent_id else None,
        "group": str(record.group_id) if record.group_id else None,
        "group_index": options.get("group_index"),
        "callbacks": _as_list(options.get("link")),
        "errbacks": _as_list(options.get("link_error")),
        "chain": options.get("chain"),
        "chord": options.get("chord"),
        "shadow": options.get("shadow"),
        "eta": record.eta.isoformat() if record.eta else None,
        "expires": record.expires_at.isoformat() if record.expires_at else None,
        "timelimit": [options.get("time_limit", task.time_limit),
                      options.get("soft_time_limit", task.soft_time_limit)],
        "ignore_result": options.get("ignore_result", task.ignore_result),
        "hostname": WORKER,
        "is_eager": False,
        "correlation_id": str(record.pk),
        "reply_to": options.get("reply_to"),
        "delivery_info": {
            "exchange": options.get("exchange") or "",
            "routing_key": record.queue or options.get("routing_key"),
            "priority": options.get("priority"),
            "redelivered": False,
        },
    }
    if stamped:
        request["stamped_headers"] = stamped
        request["stamps"] = {name: _as_list(options.get(name)) or [] for name in stamped}
    return request


#: This app's receivers that close old connections around a task, as Django's request cycle does.
_CLOSING_RECEIVERS = ((signals.task_prerun, "reliable_tasks.on_task_prerun"),
                      (signals.task_postrun, "reliable_tasks.on_task_postrun"))


@contextmanager
def _connections_kept() -> Iterator[None]:
    """Inside a transaction (a TestCase's), keep the connections open around a delivery.

    This app's ``task_prerun`` and ``task_postrun`` receivers close connections that look
    broken, and one inside a transaction does: closing it would end the test's transaction.
    They are left out for the delivery and put back as they were, in their places, as Django's
    test client leaves out ``close_old_connections`` around a request.
    """
    if not any(conn.in_atomic_block for conn in connections.all(initialized_only=True)):
        yield
        return
    saved = [(signal, list(signal.receivers)) for signal, _ in _CLOSING_RECEIVERS]
    for signal, uid in _CLOSING_RECEIVERS:
        signal.disconnect(dispatch_uid=uid)
    try:
        yield
    finally:
        for signal, receivers in saved:  # neither signal caches its receivers per sender
            signal.receivers[:] = receivers


def deliver(record: TaskRecord) -> Run:
    """Run one delivery of ``record``'s task here and now, as a worker would; return the run.

    The claim decides, as on a worker: a delivery of a finished or running task is skipped
    (``exception`` is Celery's ``Ignore``). Raises ``UnknownTaskError`` when the row's task is
    not registered with the project's Celery app.
    """
    from reliable_tasks.celery_app import find_task, get_celery_app
    from reliable_tasks.exceptions import UnknownTaskError
    from reliable_tasks.payload import from_stored

    app = get_celery_app()
    task = find_task(app, record.task_name)
    if task is None:
        raise UnknownTaskError(
            f"{record.task_name}[{record.pk}]: the task is not registered with the Celery app "
            f"{app.main!r}, so it cannot run")
    args, kwargs = from_stored(record.args) or [], from_stored(record.kwargs) or {}
    request = _request(record, task, dict(from_stored(record.options) or {}))
    # Eager tracing keeps results out of the result backend; the request says "not eager", so
    # the task claims, retries and records exactly as on a worker.
    trace = build_tracer(task.name, task, app=app, eager=True, propagate=False,
                         hostname=WORKER)
    with _connections_kept():
        traced = trace(str(record.pk), list(args), dict(kwargs), request)
    record.refresh_from_db()
    if traced.info is None:
        return Run(record, result=traced.retval)
    raised = traced.info.retval
    if isinstance(raised, Retry) and raised.exc is not None:
        raised = raised.exc
    return Run(record, exception=raised if isinstance(raised, BaseException) else None)
