"""``ReliableCeleryBackend``: Django's task framework (``django.tasks``) on the ledger.

One class serves ``django.tasks`` (Django 6.0+) and the ``django_tasks`` backport (Django 5.2),
whichever is installed (``django.tasks`` first)::

    TASKS = {"default": {
        "BACKEND": "reliable_tasks.backend.ReliableCeleryBackend",
        "QUEUES": ["default", "emails"],
        "OPTIONS": {"max_attempts": 3, "retry_for": ["myapp.errors.Flaky"]},
    }}

``enqueue`` records the call with ``dispatch()`` in the caller's transaction (published after
commit; a rolled-back enqueue never runs) as a run of one Celery task, ``RUNNER_NAME``, whose
arguments are ``[module path of the task, args, kwargs]`` and whose keyword arguments name the
backend alias, queue name and priority the task was enqueued with. The ``TaskResult`` id is
the ledger row's id; ``get_result`` reads the row (``STATUS_BY_STATE`` maps its state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from django.db import transaction
from django.utils.dateparse import parse_datetime
from django.utils.module_loading import import_string

from reliable_tasks.celery_app import get_celery_app
from reliable_tasks.models import TaskRecord
from reliable_tasks.outbox import dispatch
from reliable_tasks.runner import RUNNER_NAME
from reliable_tasks.states import TaskState

if TYPE_CHECKING:
    from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import DEFAULT_TASK_QUEUE_NAME, TaskError
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json
else:
    try:  # Django 6.0+
        from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus, task_backends
        from django.tasks.backends.base import BaseTaskBackend
        from django.tasks.base import DEFAULT_TASK_QUEUE_NAME, TaskError
        from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
        from django.tasks.signals import task_enqueued, task_finished, task_started
        from django.utils.json import normalize_json
    except ImportError:  # Django 5.2 with the django-tasks backport
        from django_tasks import TaskContext, TaskResult, TaskResultStatus, task_backends
        from django_tasks.backends.base import BaseTaskBackend
        from django_tasks.base import DEFAULT_TASK_QUEUE_NAME, Task, TaskError
        from django_tasks.exceptions import InvalidTaskError as InvalidTask
        from django_tasks.exceptions import TaskResultDoesNotExist
        from django_tasks.signals import task_enqueued, task_finished, task_started
        from django_tasks.utils import normalize_json

__all__ = [
    "OPTION_NAMES",
    "STATUS_BY_STATE",
    "InvalidTask",
    "ReliableCeleryBackend",
    "TaskContext",
    "TaskResultDoesNotExist",
    "celery_priority",
    "celery_queue",
    "normalize_json",
    "task_backends",
    "task_finished",
    "task_started",
]

#: ``OPTIONS`` the backend knows, each the ``ReliableTask`` attribute of the same name.
OPTION_NAMES = frozenset({"max_attempts", "retry_for", "retry_backoff", "retry_backoff_max",
                          "retry_on_lost"})

#: The framework's status of a task in each ledger state.
STATUS_BY_STATE: Mapping[str, TaskResultStatus] = {
    TaskState.PENDING: TaskResultStatus.READY,  # recorded, publish not yet confirmed
    TaskState.QUEUED: TaskResultStatus.READY,  # in the broker
    TaskState.RETRY: TaskResultStatus.READY,  # failed, runs again at next_attempt_at
    TaskState.REPLACED: TaskResultStatus.READY,  # handed over to a replacement that will run
    TaskState.STARTED: TaskResultStatus.RUNNING,
    TaskState.SUCCESS: TaskResultStatus.SUCCESSFUL,
    TaskState.FAILURE: TaskResultStatus.FAILED,  # raised, or its attempts are used up
    TaskState.LOST: TaskResultStatus.FAILED,  # its worker died; a manual retry runs it again
    TaskState.REVOKED: TaskResultStatus.FAILED,  # cancelled: unable to start
    TaskState.EXPIRED: TaskResultStatus.FAILED,  # its expiry passed before it ran
}


def celery_priority(priority: int) -> int:
    """The Celery priority of a framework priority, for the Redis transport.

    The framework's -100..100 (higher runs sooner) maps linearly onto Redis' 0..9 (0 runs
    first): 100 -> 0, 0 -> 4, -100 -> 9. Kombu's default ``priority_steps`` group them into four
    lists: 34..100 -> 0, -33..33 -> 3, -77..-34 -> 6, -100..-78 -> 9 (and 0 is also where
    messages without a priority go).
    """
    return (100 - priority) * 9 // 200


def celery_queue(queue_name: str) -> str:
    """The Celery queue of a framework queue name: the app's default queue for the
    framework's default (``"default"``), else the queue of that name."""
    if queue_name == DEFAULT_TASK_QUEUE_NAME:
        return str(get_celery_app().conf.task_default_queue)
    return queue_name


class ReliableCeleryBackend(BaseTaskBackend):
    """A ``django.tasks`` backend whose tasks are recorded in the ledger and run by Celery.

    ``OPTIONS``: ``max_attempts`` (runs before FAILED, first included), ``retry_for`` (exception
    classes, or their dotted paths, whose attempts are retried with backoff while attempts are
    left), ``retry_backoff`` and ``retry_backoff_max`` (seconds), ``retry_on_lost`` (a run whose
    worker died runs again by itself), as on ``ReliableTask``.
    """

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def validate_task(self, task: Task[..., Any]) -> None:
        """The framework's checks, and a function a worker can import (not ``__main__``)."""
        super().validate_task(task)
        if task.func.__module__ == "__main__":
            raise InvalidTask(
                f"Task {task.name} is defined in __main__, which a worker cannot import: "
                f"define it in a module.")

    def enqueue(self, task: Task[Any, Any], args: Sequence[Any],
                kwargs: Mapping[str, Any]) -> TaskResult[Any, Any]:
        """Record the call in the current transaction; it is published after commit.

        Raises ``InvalidTask`` for a task the backend refuses or a worker could not find by its
        module path, and ``TypeError``/``ValueError`` for arguments that are not JSON; nothing
        is recorded then. ``task_enqueued`` is sent when the transaction commits.
        """
        self.validate_task(task)
        _require_importable(task)
        stored_args = _normalized(args, "args", task)
        stored_kwargs = _normalized(kwargs, "kwargs", task)
        options: dict[str, Any] = {
            "queue": celery_queue(task.queue_name),
            "priority": celery_priority(task.priority),
            "shadow": task.module_path,  # worker logs name the function
        }
        if task.run_after is not None:
            options["eta"] = task.run_after  # held in the database when far ahead
        if self.options.get("max_attempts") is not None:
            options["max_attempts"] = self.options["max_attempts"]
        record = dispatch(
            RUNNER_NAME, [task.module_path, stored_args, stored_kwargs],
            {"backend": self.alias, "queue_name": task.queue_name, "priority": task.priority},
            **options)
        result = self.result_from_record(record, task)
        transaction.on_commit(
            lambda: task_enqueued.send(type(self), task_result=result))
        return result

    def get_result(self, result_id: str) -> TaskResult[Any, Any]:
        """The task result of ledger row ``result_id``; ``TaskResultDoesNotExist`` if there is
        no such row of a task enqueued through a ``ReliableCeleryBackend`` (all of whose
        aliases share the ledger: the result names the one it was enqueued on)."""
        try:
            key = UUID(str(result_id))
        except ValueError:
            raise TaskResultDoesNotExist(result_id) from None
        record = TaskRecord.objects.filter(pk=key, task_name=RUNNER_NAME).first()
        if record is None:
            raise TaskResultDoesNotExist(result_id)
        return self.result_from_record(record)

    def result_from_record(self, record: TaskRecord,
                           task: Task[Any, Any] | None = None) -> TaskResult[Any, Any]:
        """The framework's view of a ledger row of ``RUNNER_NAME``."""
        module_path, args, kwargs = record.args
        if task is None:
            task = _enqueued_task(module_path, record)
        result: TaskResult[Any, Any] = TaskResult(
            task=task,
            id=str(record.pk),
            status=STATUS_BY_STATE[record.state],
            enqueued_at=record.created_at,
            started_at=_first_start(record),
            finished_at=record.finished_at,
            last_attempted_at=record.started_at or _last_history_start(record),
            args=args,
            kwargs=kwargs,
            backend=task.backend,
            errors=_errors(record),
            worker_ids=_worker_ids(record),
        )
        if record.state == TaskState.SUCCESS:
            object.__setattr__(result, "_return_value", record.return_value)
        return result


# --- enqueue -----------------------------------------------------------------------------------


def _require_importable(task: Task[Any, Any]) -> None:
    """Refuse a task that a worker would not find at its module path."""
    try:
        found = import_string(task.module_path)
    except ImportError:
        found = None
    if not isinstance(found, Task) or found.func is not task.func:
        raise InvalidTask(
            f"Task {task.name} is not found at its module path {task.module_path!r}, where a "
            f"worker looks for it: decorate a module-level function with @task and keep the "
            f"decorated name (not a copy or a rename of the Task).")


def _normalized(value: Any, what: str, task: Task[Any, Any]) -> Any:
    """``value`` as the framework's JSON; the framework's ``TypeError``/``ValueError``, with
    the task named, when it is not."""
    try:
        return normalize_json(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(
            f"{what} of task {task.module_path} must be JSON (str, int, float, bool, None, "
            f"lists and dicts of them): {exc}") from exc


# --- results -----------------------------------------------------------------------------------


def _enqueued_task(module_path: str, record: TaskRecord) -> Task[Any, Any]:
    """The task at ``module_path`` with the options the row was enqueued with."""
    found = import_string(module_path)
    if not isinstance(found, Task):
        raise InvalidTask(f"{module_path} of task result {record.pk} is not a Task")
    return found.using(priority=record.kwargs.get("priority"),
                       queue_name=record.kwargs.get("queue_name"),
                       run_after=record.eta, backend=record.kwargs.get("backend"))


def _attempt_entries(record: TaskRecord) -> list[dict[str, Any]]:
    """History entries of attempts (not of manual retries), oldest first."""
    return [entry for entry in record.history or [] if "outcome" in entry]


def _moment(text: Any) -> datetime | None:
    return parse_datetime(text) if isinstance(text, str) else None


def _first_start(record: TaskRecord) -> datetime | None:
    starts = [_moment(entry.get("started_at")) for entry in _attempt_entries(record)]
    known = [start for start in [*starts, record.started_at] if start is not None]
    return min(known, default=None)


def _last_history_start(record: TaskRecord) -> datetime | None:
    entries = _attempt_entries(record)
    return _moment(entries[-1].get("started_at")) if entries else None


def _worker_ids(record: TaskRecord) -> list[str]:
    """One worker per attempt made (the framework counts attempts as ``len(worker_ids)``); an
    attempt the bounded history no longer names has ``""``."""
    by_attempt = {entry["attempt"]: str(entry.get("worker") or "")
                  for entry in _attempt_entries(record) if isinstance(entry.get("attempt"), int)}
    if record.worker and record.attempts:
        by_attempt[record.attempts] = record.worker
    return [by_attempt.get(attempt, "") for attempt in range(1, record.attempts + 1)]


def _errors(record: TaskRecord) -> list[TaskError]:
    """One error per failed attempt, oldest first: the history keeps each one's exception and
    message, the row the last one's full traceback."""
    errors = []
    for entry in _attempt_entries(record):
        summary = str(entry.get("error") or "")
        if summary:
            errors.append(TaskError(exception_class_path=summary.partition(": ")[0],
                                    traceback=summary))
    if record.error_type:
        last = TaskError(exception_class_path=record.error_type,
                         traceback=record.traceback or record.error_message)
        if errors and errors[-1].exception_class_path == record.error_type:
            errors[-1] = last
        else:
            errors.append(last)
    return errors
