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

The ledger's deduplication keys and limits are per task, given with ``task_options`` under
``@task``::

    @task
    @task_options(unique_key=lambda args, kwargs: f"report:{args[0]}",
                  concurrency_limit=2, concurrency_key=lambda args, kwargs: f"db:{args[0]}")
    def rebuild_report(report_id: int) -> None: ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID, uuid4

from django.db import transaction
from django.utils.dateparse import parse_datetime
from django.utils.module_loading import import_string

from reliable_tasks.celery_app import get_celery_app
from reliable_tasks.exceptions import DispatchError, DuplicateTask
from reliable_tasks.limits import call_limits
from reliable_tasks.models import UNIQUE_KEY_MAX_LENGTH, TaskRecord
from reliable_tasks.outbox import dispatch, on_conflict_policy
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
    "TASK_OPTION_NAMES",
    "InvalidTask",
    "ReliableCeleryBackend",
    "TaskContext",
    "TaskResultDoesNotExist",
    "celery_priority",
    "celery_queue",
    "normalize_json",
    "task_backends",
    "task_finished",
    "task_options",
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
    TaskState.WAITING: TaskResultStatus.READY,  # deferred by a limit, has not started
    TaskState.STARTED: TaskResultStatus.RUNNING,
    TaskState.SUCCESS: TaskResultStatus.SUCCESSFUL,
    TaskState.FAILURE: TaskResultStatus.FAILED,  # raised, or its attempts are used up
    TaskState.LOST: TaskResultStatus.FAILED,  # its worker died; a manual retry runs it again
    TaskState.REVOKED: TaskResultStatus.FAILED,  # cancelled: unable to start
    TaskState.EXPIRED: TaskResultStatus.FAILED,  # its expiry passed before it ran
}


#: Options of ``task_options``: the ledger's keys and limits, as ``dispatch()`` takes them.
TASK_OPTION_NAMES = frozenset({"unique_key", "on_conflict", "concurrency_key",
                               "concurrency_limit", "rate_limit", "rate_key"})
#: The ``task_options`` that may be functions of the task's ``(args, kwargs)``.
_KEY_OPTIONS = ("unique_key", "concurrency_key", "rate_key")
#: The attribute of a task's function that ``task_options`` sets.
_OPTIONS_ATTRIBUTE = "reliable_tasks_options"

_Function = TypeVar("_Function", bound=Callable[..., Any])


def task_options(**options: Any) -> Callable[[_Function], _Function]:
    """Give a ``django.tasks`` task the ledger's deduplication key and limits; apply it under
    ``@task``, on the function.

    ``unique_key`` with ``on_conflict`` (``"return_existing"``, the default: ``enqueue``
    returns the result of the unfinished task that holds the key; ``"raise"``:
    ``DuplicateTask``), ``concurrency_limit`` with ``concurrency_key``, ``rate_limit``
    (``"100/m"``) with ``rate_key``, as ``dispatch()`` takes them. A key is a string or a
    function of the task's ``(args, kwargs)``, as the task receives them, returning a string
    or None (no key; a limit is then keyed by the task's module path, as it is without a key).

    Raises ``InvalidTask`` for an unknown option, a value the ledger cannot enforce, or when
    applied to a ``Task`` (above ``@task``). Backends other than ``ReliableCeleryBackend``
    ignore the options.
    """
    _check_task_options(options)
    frozen = MappingProxyType(dict(options))

    def decorate(func: _Function) -> _Function:
        if isinstance(func, Task) or not callable(func):
            raise InvalidTask(
                f"task_options() decorates a task's function and goes under @task (@task "
                f"first, then @task_options(...)), not on {func!r}")
        setattr(func, _OPTIONS_ATTRIBUTE, frozen)
        return func

    return decorate


def _check_task_options(options: Mapping[str, Any]) -> None:
    """Refuse what ``dispatch()`` would refuse at every enqueue, now (key functions excepted:
    their keys are checked at enqueue)."""
    unknown = sorted(set(options) - TASK_OPTION_NAMES)
    if unknown:
        raise InvalidTask(
            f"task_options() got unknown option(s) {', '.join(unknown)}: it takes "
            f"{', '.join(sorted(TASK_OPTION_NAMES))}")
    for name in _KEY_OPTIONS:
        value = options.get(name)
        if name in options and not callable(value) and not (
                isinstance(value, str) and 0 < len(value) <= UNIQUE_KEY_MAX_LENGTH):
            raise InvalidTask(
                f"task_options(): {name} must be a string of 1 to {UNIQUE_KEY_MAX_LENGTH} "
                f"characters or a function of (args, kwargs), not {value!r}")
    if "on_conflict" in options and "unique_key" not in options:
        raise InvalidTask("task_options(): on_conflict needs a unique_key")
    # dispatch()'s own checks of on_conflict and the limits, with a stand-in for key functions.
    limits = {name: "key" if callable(value) else value for name, value in options.items()
              if name not in ("unique_key", "on_conflict")}
    try:
        on_conflict_policy(None, options)
        call_limits(None, "task_options()", (), {}, limits)
    except DispatchError as exc:
        raise InvalidTask(f"task_options(): {exc}") from exc


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
        module path, ``TypeError``/``ValueError`` for arguments that are not JSON, and
        ``DispatchError`` for a key or limit of ``task_options`` the ledger cannot hold; nothing
        is recorded then. ``task_enqueued`` is sent when the transaction commits.

        While an unfinished task holds the call's ``unique_key``, nothing is recorded or sent:
        with ``on_conflict="return_existing"`` the holder's result is returned (the holder may
        be another task with the same key), with ``"raise"`` ``DuplicateTask`` is raised.
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
        options.update(_call_options(task, stored_args, stored_kwargs))
        if options.get("unique_key") is not None:
            options["task_id"] = uuid4()  # tells this call's new row from the key's holder
        record = dispatch(
            RUNNER_NAME, [task.module_path, stored_args, stored_kwargs],
            {"backend": self.alias, "queue_name": task.queue_name, "priority": task.priority},
            **options)
        if "task_id" in options and record.pk != options["task_id"]:
            return self._holder_result(record, task)
        result = self.result_from_record(record, task)
        transaction.on_commit(
            lambda: task_enqueued.send(type(self), task_result=result))
        return result

    def _holder_result(self, holder: TaskRecord, task: Task[Any, Any]) -> TaskResult[Any, Any]:
        """The result of ``holder``, the unfinished row holding the key of a call of ``task``
        (``on_conflict="return_existing"``); ``DuplicateTask`` if it is not a framework task."""
        if holder.task_name != RUNNER_NAME:
            raise DuplicateTask(
                f"{holder.task_name}[{holder.pk}] ({holder.state}) holds the unique key "
                f"{holder.unique_key!r} and is not a django.tasks task, so there is no "
                f"TaskResult to return: {task.module_path} was not enqueued", holder)
        return self.result_from_record(holder)

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


def _call_options(task: Task[Any, Any], args: Sequence[Any],
                  kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``task_options`` of one call of ``task``: key functions called with its ``args``
    and ``kwargs``, and a limit without a key keyed by the task's module path (``dispatch()``
    would key it by the runner's name, which every framework task shares)."""
    declared: Mapping[str, Any] = getattr(task.func, _OPTIONS_ATTRIBUTE, None) or {}
    options = {name: _key(task, name, value, args, kwargs) if name in _KEY_OPTIONS else value
               for name, value in declared.items()}
    if "concurrency_limit" in options and options.get("concurrency_key") is None:
        options["concurrency_key"] = task.module_path
    if "rate_limit" in options and options.get("rate_key") is None:
        options["rate_key"] = task.module_path
    return options


def _key(task: Task[Any, Any], name: str, value: Any, args: Sequence[Any],
         kwargs: Mapping[str, Any]) -> Any:
    """The key option ``name`` of a call: ``value``, or what the function ``value`` returns
    for the call's arguments (``dispatch()`` checks its length)."""
    if not callable(value):
        return value
    key = value(tuple(args), dict(kwargs))
    if key is not None and not (isinstance(key, str) and key):
        raise DispatchError(
            f"task_options {name}(args, kwargs) of task {task.module_path} must return a "
            f"non-empty string or None, not {key!r}")
    return key


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
