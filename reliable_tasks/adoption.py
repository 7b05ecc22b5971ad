"""Adopted tasks: rows for tasks sent with plain Celery, written from Celery's signals.

Every write is an upsert by task id that never moves a row backwards, wrapped in its own
savepoint so a failure can never break the caller's transaction. These rows carry no outbox
guarantee (``adopted=True``): the ledger shows them, the sweeper does not re-publish them. The
signals write adopted rows only: once a ``ReliableTask`` call takes a row over
(``ledger.take_over``), plain Celery's events for that id no longer move it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any
from uuid import UUID

from django.db import DatabaseError, transaction
from django.utils import timezone

from reliable_tasks.models import TaskRecord
from reliable_tasks.payload import to_stored
from reliable_tasks.states import FINISHED_STATES, TaskState

logger = logging.getLogger(__name__)

_UNFINISHED = (TaskState.PENDING, TaskState.QUEUED, TaskState.STARTED, TaskState.RETRY)


def _valid_id(task_id: Any) -> str | None:
    try:
        return str(UUID(str(task_id)))
    except (TypeError, ValueError):
        return None


def _guarded(write: Callable[[], None], what: str) -> None:
    try:
        with transaction.atomic():
            write()
    except DatabaseError:
        logger.warning("adopting a plain Celery task into the ledger failed (%s)", what,
                       exc_info=True)


def _stored_or_empty(value: Any, empty: Any) -> Any:
    try:
        return to_stored(value, "payload")
    except ValueError:
        return empty


def _upsert(task_id: str, task_name: str, state: str, from_states: Iterable[str],
            **fields: Any) -> None:
    """Move an adopted row on, or insert it; a ``ReliableTask``'s row is never written."""
    changed = TaskRecord.objects.filter(id=task_id, adopted=True).transition(
        from_states, state=state, task_name=task_name, **fields)
    if changed:
        return
    TaskRecord.objects.bulk_create(
        [TaskRecord(id=task_id, task_name=task_name, state=state, adopted=True, **fields)],
        ignore_conflicts=True,
    )


def adopt_published(task_id: Any, task_name: str, args: Any, kwargs: Any, queue: str) -> None:
    """A plain task was published: record it QUEUED (unless a worker already got further)."""
    valid_id = _valid_id(task_id)
    if valid_id is None:
        return
    now = timezone.now()

    def write() -> None:
        TaskRecord.objects.bulk_create([TaskRecord(
            id=valid_id, task_name=task_name, state=TaskState.QUEUED, adopted=True,
            args=_stored_or_empty(list(args or ()), []),
            kwargs=_stored_or_empty(dict(kwargs or {}), {}),
            queue=queue, created_at=now, published_at=now, publish_attempts=1,
        )], ignore_conflicts=True)

    _guarded(write, f"published {task_name}[{valid_id}]")


def adopt_started(task_id: Any, task_name: str, worker: str) -> None:
    """A plain task started on a worker (a plain replacement takes its REPLACED row over,
    which is adopted from then on)."""
    valid_id = _valid_id(task_id)
    if valid_id is None:
        return
    now = timezone.now()

    def write() -> None:
        if TaskRecord.objects.filter(id=valid_id).transition(
                (TaskState.REPLACED,), state=TaskState.STARTED, task_name=task_name,
                started_at=now, worker=worker, adopted=True):
            return
        _upsert(valid_id, task_name, TaskState.STARTED,
                (TaskState.PENDING, TaskState.QUEUED, TaskState.RETRY),
                started_at=now, worker=worker)

    _guarded(write, f"started {task_name}[{valid_id}]")


def adopt_finished(task_id: Any, task_name: str, state: str, error: BaseException | None = None,
                   traceback: str = "") -> None:
    """A plain task finished (SUCCESS, FAILURE) or will be retried (RETRY)."""
    valid_id = _valid_id(task_id)
    if valid_id is None:
        return
    fields: dict[str, Any] = {}
    if state in FINISHED_STATES:
        fields["finished_at"] = timezone.now()
    if error is not None:
        fields.update(
            error_type=f"{type(error).__module__}.{type(error).__qualname__}"[:255],
            error_message=str(error)[:4000], traceback=traceback[-20000:])
    _guarded(lambda: _upsert(valid_id, task_name, state, _UNFINISHED, **fields),
             f"{state} {task_name}[{valid_id}]")
