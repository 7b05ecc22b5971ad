"""Demo tasks of Django's task framework, run by ``ReliableCeleryBackend`` (``TASKS``).

``django.tasks`` on Django 6.0+, the ``django_tasks`` backport on Django 5.2. The framework's
signals are recorded as ``Execution`` rows (``signal:<name>:<status>``, with the result id), so
tests can see them fire in the worker.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from example_project.demo.models import Execution
from reliable_tasks.backend import task_options

try:
    from django.tasks import TaskContext, TaskResult, task
    from django.tasks.signals import task_enqueued, task_finished, task_started
except ImportError:
    from django_tasks import TaskContext, TaskResult, task
    from django_tasks.signals import task_enqueued, task_finished, task_started


class FlakyError(Exception):
    """Raised on purpose; the ``retrying`` backend retries it."""


@task
def add(x: int, y: int) -> int:
    """Succeed at once."""
    return x + y


@task
def record(token: str) -> str:
    """Log one run under ``token``."""
    Execution.objects.create(token=token, pid=os.getpid())
    return token


@task
def fails(message: str) -> None:
    """Fail every time."""
    raise ValueError(message)


@task
def returns_a_set() -> Any:
    """Return what JSON cannot hold: the run fails."""
    return {1, 2}


@task
def returns_a_tuple() -> Any:
    """Return a tuple, which JSON holds as a list."""
    return (1, "two", {"three": 3.0})


@task(takes_context=True)
def describe(context: TaskContext, label: str) -> dict[str, Any]:
    """Return what the context says of this run."""
    return {"label": label, "attempt": context.attempt, "id": context.task_result.id,
            "status": str(context.task_result.status)}


@task(takes_context=True, backend="retrying")
def flaky(context: TaskContext, failures: int) -> int:
    """Fail the first ``failures`` attempts, then return the attempt that succeeded."""
    if context.attempt <= failures:
        raise FlakyError(f"attempt {context.attempt} fails on purpose")
    return context.attempt


@task
async def async_add(x: int, y: int) -> int:
    """A coroutine task."""
    await asyncio.sleep(0)
    return x + y


@task(queue_name="emails", priority=50)
def send_email(to: str) -> str:
    """A task on another queue, with a priority."""
    return f"sent to {to}"


@task
@task_options(unique_key=lambda args, kwargs: f"report:{args[0]}")
def rebuild_report(report_id: int) -> int:
    """One rebuild of a report at a time: enqueueing it again while it has not finished
    returns the unfinished one's result (``on_conflict="return_existing"``)."""
    return report_id


@task
@task_options(unique_key=lambda args, kwargs: f"invoice:{kwargs['number']}", on_conflict="raise")
def send_invoice(*, number: int) -> str:
    """An invoice is sent once at a time: enqueueing it again raises ``DuplicateTask``."""
    return f"invoice {number}"


@task
@task_options(concurrency_limit=1, concurrency_key=lambda args, kwargs: f"export:{args[0]}")
def export(customer: int, seconds: float = 0.0) -> int:
    """One export of a customer at a time, across all workers."""
    time.sleep(seconds)
    return customer


@task
@task_options(rate_limit="2/s")
def call_api() -> None:
    """At most two starts a second, keyed by the task's module path."""


def _log_signal(name: str) -> Any:
    def receiver(sender: Any, task_result: TaskResult, **kwargs: Any) -> None:
        Execution.objects.create(token=f"signal:{name}:{task_result.status}",
                                 task_id=task_result.id, pid=os.getpid())

    return receiver


task_enqueued.connect(_log_signal("enqueued"), weak=False, dispatch_uid="demo.enqueued")
task_started.connect(_log_signal("started"), weak=False, dispatch_uid="demo.started")
task_finished.connect(_log_signal("finished"), weak=False, dispatch_uid="demo.finished")
