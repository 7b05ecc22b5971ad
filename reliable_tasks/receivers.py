"""Celery signal receivers, connected once from ``AppConfig.ready()``.

They translate Celery's signals into calls of the ledger services: plain Celery tasks are
adopted, revocations are recorded for every task, a ``ReliableTask`` killed at its hard time
limit is recorded from the worker's main process, and worker processes keep their database
connection between tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.exceptions import TimeLimitExceeded
from celery.utils.dispatch import Signal
from django.db import close_old_connections

from reliable_tasks import adoption, db_retry, ledger
from reliable_tasks.celery_app import claims_its_row
from reliable_tasks.conf import app_settings
from reliable_tasks.states import TaskState

logger = logging.getLogger(__name__)


#: The app's own tasks: the sweeper is not a task of the project's, and recording each of its
#: passes would fill the ledger with a row per ``SWEEP_INTERVAL``.
OWN_TASK_PREFIX = "reliable_tasks."


def _is_reliable(task: Any) -> bool:
    """Whether nobody records the task here: it records itself (a ``ReliableTask``), it is the
    app's own, or adoption is off."""
    from reliable_tasks.execution import ReliableTask

    return (isinstance(task, ReliableTask) or not app_settings.ADOPT
            or str(getattr(task, "name", "")).startswith(OWN_TASK_PREFIX))


def _registered_reliable(task_name: str) -> bool:
    from reliable_tasks.celery_app import find_task, get_celery_app

    if task_name.startswith(OWN_TASK_PREFIX):
        return True
    return _is_reliable(find_task(get_celery_app(), task_name))


def on_after_task_publish(sender: str | None = None, headers: dict[str, Any] | None = None,
                          body: Any = None, routing_key: str = "", **_: Any) -> None:
    """Adopt a task published with plain Celery."""
    headers = headers or {}
    task_name = sender or headers.get("task") or ""
    if not task_name or _registered_reliable(task_name):
        return
    args, kwargs = (body[0], body[1]) if isinstance(body, list | tuple) and len(body) >= 2 else (
        (), {})
    adoption.adopt_published(headers.get("id"), task_name, args, kwargs, routing_key or "")


def on_task_prerun(sender: Any = None, task_id: str | None = None, task: Any = None,
                   **_: Any) -> None:
    """Check the connections as Django's request cycle does; adopt a plain task starting."""
    task = task or sender
    if task is None or task.request.called_directly or task.request.is_eager:
        return
    close_old_connections()
    if _is_reliable(task):
        return
    adoption.adopt_started(task_id, task.name, task.request.hostname or "")


def on_task_success(sender: Any = None, **_: Any) -> None:
    """Record a plain task's success."""
    if sender is None or _is_reliable(sender) or sender.request.called_directly:
        return
    adoption.adopt_finished(sender.request.id, sender.name, TaskState.SUCCESS)


def on_task_failure(sender: Any = None, task_id: str | None = None,
                    exception: BaseException | None = None, einfo: Any = None,
                    **_: Any) -> None:
    """Record a plain task's failure, and a ``ReliableTask`` killed by its hard time limit."""
    if sender is None:
        return
    if isinstance(exception, TimeLimitExceeded) and claims_its_row(sender) and task_id:
        _record_time_limit(sender, task_id, exception, getattr(einfo, "traceback", "") or "")
        return
    if _is_reliable(sender) or sender.request.called_directly:
        return
    adoption.adopt_finished(task_id, sender.name, TaskState.FAILURE, exception,
                            getattr(einfo, "traceback", "") or "")


def on_task_retry(sender: Any = None, request: Any = None, reason: Any = None,
                  **_: Any) -> None:
    """Record that a plain task will be retried."""
    if sender is None or _is_reliable(sender) or request is None:
        return
    error = reason if isinstance(reason, BaseException) else None
    adoption.adopt_finished(request.id, sender.name, TaskState.RETRY, error)


def _record_time_limit(task: Any, task_id: str, exc: TimeLimitExceeded, tb: str) -> None:
    """The pool process running ``task_id`` was killed at its hard time limit.

    Celery reports it from the worker's main process, where the claim is unknown: the row is
    found by its id and this worker's name, and ends RETRY or FAILURE by the task's own
    policy (``retry_for``, ``max_attempts``).
    """
    thread = _heartbeat.get("thread")
    worker = getattr(thread, "hostname", "") or str(getattr(task.request, "hostname", "") or "")
    logger.warning("%s[%s]: killed at its hard time limit; recording it", task.name, task_id)

    def delay(attempt: int, max_attempts: int | None) -> float | None:
        return task.retry_delay(exc, attempt, max_attempts)

    _write_from_main_process(lambda: ledger.record_time_limit(
        task_id, worker=worker, exc=exc, tb=tb, retry_delay=delay),
        f"the time limit of {task_id}")


def on_task_revoked(sender: Any = None, request: Any = None, expired: bool = False,
                    **_: Any) -> None:
    """Record a revoked or expired task (any task class)."""
    task_id = getattr(request, "id", None)
    if not task_id:
        return
    _write_from_main_process(lambda: ledger.record_revoked(task_id, expired=bool(expired)),
                             f"the revocation of {task_id}")


def _write_from_main_process(write: Callable[[], object], what: str) -> None:
    """Store ``write`` from the worker's main process, which must not wait for a database
    that is down: a write the database does not take now is handed to the heartbeat thread,
    which stores it at its next beat, or the first one after the database is back."""
    close_old_connections()
    try:
        write()
    except db_retry.TRANSIENT_ERRORS:
        db_retry.drop_connections()
        thread = _heartbeat.get("thread")
        if thread is None:
            raise
        logger.warning("recording %s failed; the heartbeat stores it later", what,
                       exc_info=True)
        thread.defer(write)


_in_worker: dict[str, bool] = {}


def on_connection_created(sender: Any = None, connection: Any = None, **_: Any) -> None:
    """In a worker, honour ``WORKER_SYNCHRONOUS_COMMIT = False`` for each new connection."""
    if (_in_worker.get("worker") and connection is not None
            and connection.vendor == "postgresql"
            and not app_settings.WORKER_SYNCHRONOUS_COMMIT):
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO OFF")


def on_worker_init(sender: Any = None, **_: Any) -> None:
    """Keep database connections between tasks unless the project chose otherwise.

    Celery's Django fixup closes every connection before and after each task unless
    ``CELERY_DB_REUSE_MAX`` is set, ignoring ``CONN_MAX_AGE``: a new connection per task. It
    reads that setting before Django (and so this app) is set up, so this receiver gives the
    fixup's worker part the default instead. Broken or expired connections are still closed
    before and after each task (``on_task_prerun``, ``on_task_postrun``), as Django closes
    them around each request.
    """
    _in_worker["worker"] = True  # inherited by the pool processes forked later
    app = getattr(sender, "app", None)
    for fixup in getattr(app, "_fixups", None) or ():
        worker_fixup = getattr(fixup, "worker_fixup", None)
        if worker_fixup is not None and getattr(worker_fixup, "db_reuse_max", 1) is None:
            worker_fixup.db_reuse_max = 2**31


def on_task_postrun(sender: Any = None, task: Any = None, **_: Any) -> None:
    """Close connections that broke during the task, or outlived ``CONN_MAX_AGE``.

    With ``on_task_prerun`` this is Django's request cycle around every task: a connection is
    reused between tasks until it breaks or ages, and ``CONN_HEALTH_CHECKS`` is honoured.
    """
    task = task or sender
    if task is not None and (task.request.called_directly or task.request.is_eager):
        return
    close_old_connections()


_heartbeat: dict[str, Any] = {}


def _active_task_ids() -> list[str]:
    from celery.worker import state as worker_state

    return [request.id for request in list(worker_state.active_requests)]


def on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Start this worker's heartbeat thread (main process)."""
    from reliable_tasks.heartbeat import HeartbeatThread

    hostname = getattr(sender, "hostname", None)
    if not hostname or "thread" in _heartbeat:
        return
    thread = HeartbeatThread(hostname, _active_task_ids)
    _heartbeat["thread"] = thread
    thread.start()


def on_worker_shutdown(**_: Any) -> None:
    """Stop the heartbeat thread; it records the clean stop."""
    thread = _heartbeat.pop("thread", None)
    if thread is not None:
        thread.stop()


def connect() -> None:
    """Connect every receiver once (``dispatch_uid`` makes this idempotent)."""
    pairs: list[tuple[Signal, Callable[..., Any]]] = [
        (signals.after_task_publish, on_after_task_publish),
        (signals.task_prerun, on_task_prerun),
        (signals.task_success, on_task_success),
        (signals.task_failure, on_task_failure),
        (signals.task_retry, on_task_retry),
        (signals.task_revoked, on_task_revoked),
        (signals.worker_init, on_worker_init),
        (signals.task_postrun, on_task_postrun),
        (signals.worker_ready, on_worker_ready),
        (signals.worker_shutdown, on_worker_shutdown),
    ]
    for signal, receiver in pairs:
        signal.connect(receiver, weak=False, dispatch_uid=f"reliable_tasks.{receiver.__name__}")
    _connect_schedule_hooks()


def _connect_schedule_hooks() -> None:
    from django.db.backends.signals import connection_created
    from django.db.models.signals import post_delete, post_save

    connection_created.connect(on_connection_created,
                               dispatch_uid="reliable_tasks.on_connection_created")
    from reliable_tasks.models import PeriodicSchedule
    from reliable_tasks.sync import on_schedule_deleted, on_schedule_saved

    post_save.connect(on_schedule_saved, sender=PeriodicSchedule,
                      dispatch_uid="reliable_tasks.on_schedule_saved")
    post_delete.connect(on_schedule_deleted, sender=PeriodicSchedule,
                        dispatch_uid="reliable_tasks.on_schedule_deleted")
