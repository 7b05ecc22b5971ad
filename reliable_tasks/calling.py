"""Celery's call-time work for a ``ReliableTask`` call, with the ledger where Celery publishes.

``Task.apply_async`` checks a call before it sends it: a soft time limit above the hard one, the
arguments against the task's signature (``typing``), and it dumps pydantic models for a
``pydantic=True`` task. ``app.send_task`` then tells the result backend a task is on its way
(``on_task_call``), marks the result ignored or not, and adds it to the children of the task
that sent it (``add_to_parent``). A ``ReliableTask`` call does all of it, with Celery's own
methods and in the same order; where Celery would publish, it records the task with
``dispatch()``, and the outbox publishes it after commit.
"""

from __future__ import annotations

from typing import Any

from celery.result import AsyncResult

from reliable_tasks.outbox import dispatch

#: Options of ``apply_async`` that only make sense for an immediate publish; the outbox
#: publishes later over its own connection, so it drops them.
_RUNTIME_ONLY_OPTIONS = ("producer", "connection", "router", "result_cls", "publisher",
                         "retry", "retry_policy")


def check_call(task: Any, args: Any, kwargs: Any) -> None:
    """Raise as ``Task.apply_async`` does for a call it would refuse.

    ``ValueError`` for a soft time limit above the hard one, ``TypeError`` for arguments that
    do not fit the task's signature (unless the task has ``typing=False``).
    """
    if task.soft_time_limit and task.time_limit and task.soft_time_limit > task.time_limit:
        raise ValueError("soft_time_limit must be less than or equal to time_limit")
    if task.typing:
        check_arguments = getattr(task, "__header__", None)
        if check_arguments is not None:
            check_arguments(*(args or ()), **(kwargs or {}))


def record_call(task: Any, args: Any, kwargs: Any, task_id: str | None, producer: Any,
                link: Any, link_error: Any, shadow: Any, options: dict[str, Any]) -> AsyncResult:
    """Check and record one ``apply_async`` call of ``task``; return its result, as Celery's.

    Raises what Celery raises for a call it refuses, and ``DispatchError`` for one the ledger
    cannot record (``dispatch()``).
    """
    check_call(task, args, kwargs)
    shadow = shadow or task.shadow_name(args, kwargs, options)
    serializer = options.get("serializer") or task.serializer
    dump_pydantic = getattr(task, "_dump_pydantic_arguments", None)
    if dump_pydantic is not None and serializer != "pickle":
        args, kwargs = dump_pydantic(args, kwargs)
    ignore_result = bool(options.get("ignore_result", task.ignore_result))
    add_to_parent = options.pop("add_to_parent", True)
    for key in _RUNTIME_ONLY_OPTIONS:
        options.pop(key, None)
    extra = {"link": link, "link_error": link_error, "shadow": shadow}
    options.update({key: value for key, value in extra.items() if value is not None})
    record = dispatch(task, args, kwargs, task_id=task_id, **options)
    task_id = str(record.pk)
    app = task.app
    if not ignore_result:
        app.backend.on_task_call(producer, task_id)
    result: AsyncResult = task.AsyncResult(task_id)
    result.ignored = ignore_result
    if add_to_parent:
        parent = app.current_worker_task
        if parent is not None:
            parent.add_trail(result)
    return result
