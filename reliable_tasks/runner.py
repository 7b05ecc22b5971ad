"""The Celery task that runs every ``django.tasks`` task enqueued through the ledger.

``reliable_tasks.run_django_task`` is a ``ReliableTask``: its claim, lease, outcome, retries,
the sweeper, the admin and the metrics treat these tasks as any other. Its arguments are
``[module path of the task, args, kwargs]``, its keyword arguments ``backend``, ``queue_name``
and ``priority`` (what the task was enqueued with). The function is found by its module path
(the ``@task``-decorated name); its return value is normalised to JSON as the framework
requires and kept in the ledger row by the UPDATE that marks it SUCCESS.

The ``OPTIONS`` of the task's backend give the run its ``retry_for``, ``retry_backoff`` and
``retry_backoff_max`` (``max_attempts`` is the row's, given at enqueue). The framework's
``task_started`` signal is sent before the function runs, ``task_finished`` once the ledger
has stored an outcome that ends the task (SUCCESSFUL or FAILED; an attempt that will be
retried ends READY and sends nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import shared_task
from django.utils.module_loading import import_string

from reliable_tasks.conf import app_settings
from reliable_tasks.execution import ReliableTask

if TYPE_CHECKING:
    from reliable_tasks.backend import ReliableCeleryBackend

#: The task's registered name (``ReliableCeleryBackend`` dispatches it).
RUNNER_NAME = "reliable_tasks.run_django_task"


def _backend(alias: str) -> ReliableCeleryBackend:
    """The backend ``alias`` of ``TASKS``; the framework is imported only when a task runs, so
    that projects without it can register this task."""
    from reliable_tasks.backend import ReliableCeleryBackend, task_backends

    backend = task_backends[alias]
    if not isinstance(backend, ReliableCeleryBackend):
        raise TypeError(f"TASKS[{alias!r}] is not a ReliableCeleryBackend: {backend!r}")
    return backend


def exception_classes(names: Any) -> tuple[type[BaseException], ...]:
    """The exception classes of a ``retry_for`` option: classes, or their dotted paths."""
    found = tuple(import_string(name) if isinstance(name, str) else name
                  for name in names or ())
    for item in found:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"retry_for must name exception classes, not {item!r}")
    return found


class DjangoTaskRunner(ReliableTask):
    """``ReliableTask`` for ``django.tasks`` tasks; options come from the task's backend."""

    def _options(self, kwargs: Any = None) -> dict[str, Any]:
        """The ``OPTIONS`` of the backend a run (its ``kwargs``, else this request's) names."""
        run_kwargs = kwargs if kwargs is not None else self.request.kwargs
        alias = (run_kwargs or {}).get("backend")
        return dict(_backend(alias).options) if alias else {}

    def reruns_after_lost(self, kwargs: Any) -> bool:
        """The backend's ``retry_on_lost`` option (off by default)."""
        return bool(self._options(kwargs).get("retry_on_lost", False))

    def _retry_for_classes(self) -> tuple[type[BaseException], ...]:
        return exception_classes(self._options().get("retry_for"))

    @property
    def retry_backoff(self) -> float:
        return float(self._options().get("retry_backoff", app_settings.RETRY_BACKOFF))

    @property
    def retry_backoff_max(self) -> float:
        return float(self._options().get("retry_backoff_max", app_settings.RETRY_BACKOFF_MAX))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request: Any = self.request
        request.django_task_result = None
        try:
            retval = super().__call__(*args, **kwargs)
        except Exception:
            self._announce_finish(request)
            raise
        self._announce_finish(request)
        return retval

    def kept_return_value(self, retval: Any) -> Any:
        """The ledger keeps the (JSON) return value: ``get_result`` returns it."""
        return retval

    def _announce_finish(self, request: Any) -> None:
        """``task_finished``, when the function ran and the ledger says the task ended."""
        started = request.django_task_result
        if started is None:
            return
        from reliable_tasks.backend import task_finished

        backend = _backend(started.backend)
        result = self._store(backend.get_result, started.id)
        if result.is_finished:
            task_finished.send(type(backend), task_result=result)


@shared_task(bind=True, base=DjangoTaskRunner, name=RUNNER_NAME, ignore_result=True)
def run_django_task(self: DjangoTaskRunner, module_path: str, args: list[Any],
                    kwargs: dict[str, Any], backend: str, queue_name: str = "",
                    priority: int = 0) -> Any:
    """Run the ``django.tasks`` task at ``module_path`` (see the module's docstring)."""
    from reliable_tasks.backend import TaskContext, normalize_json, task_started

    request: Any = self.request
    task_backend = _backend(backend)
    result = self._store(task_backend.get_result, request.id)  # RUNNING, with this attempt
    request.django_task_result = result
    task_started.send(type(task_backend), task_result=result)
    task = result.task
    if task.takes_context:
        value = task.call(TaskContext(task_result=result), *args, **kwargs)
    else:
        value = task.call(*args, **kwargs)
    return normalize_json(value)
