"""Resolve the project's Celery app and its tasks lazily (the library never creates an app)."""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, current_app
from django.utils.module_loading import import_string
from kombu import Connection

from reliable_tasks.conf import app_settings

_discovered: set[int] = set()
_discovering = threading.Lock()


def get_celery_app() -> Celery:
    """Return ``RELIABLE_TASKS_CELERY_APP`` if set, else Celery's current app."""
    path = app_settings.CELERY_APP
    if path:
        return import_string(path)
    app: Celery = current_app._get_current_object()  # type: ignore[attr-defined]
    return app


def find_task(app: Celery, name: str) -> Any | None:
    """The task registered as ``name``, importing the project's task modules if needed.

    ``app.autodiscover_tasks()`` only imports task modules when a worker or beat starts; a web
    process or a management command knows the tasks its code imported. The first lookup of an
    unknown name imports the rest, as a worker would.
    """
    task = app.tasks.get(name)
    if task is None and id(app) not in _discovered:
        _import_task_modules(app)
        task = app.tasks.get(name)
    return task


def _import_task_modules(app: Celery) -> None:
    """Import the project's task modules once per app, as a worker does when it starts."""
    with _discovering:  # another thread's first lookup waits for the import to finish
        if id(app) not in _discovered:
            app.loader.import_default_modules()
            _discovered.add(id(app))


def bounded_broker_connection(app: Celery, timeout: float | None = None) -> Connection:
    """A new, unopened broker connection of ``app`` that never waits longer than ``timeout``.

    Connecting, each command and the whole connection attempt are bounded by ``timeout``
    (default ``RELIABLE_TASKS_PUBLISH_TIMEOUT``), with no retries, so a down or hung Redis
    fails fast. Kombu opens it, so every broker URL kombu understands (``redis://``,
    ``rediss://``, ``sentinel://``, Unix sockets) works, with the app's transport options.
    """
    timeout = app_settings.PUBLISH_TIMEOUT if timeout is None else timeout
    return app.connection_for_write(
        connect_timeout=timeout,
        transport_options={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry_on_timeout": False,
            "max_retries": 0,
        },
    )


def claims_its_row(task: Any) -> bool:
    """Whether ``task`` claims its ledger row when it runs (a ``ReliableTask`` does)."""
    return getattr(task, "claims_its_row", False) is True


def reliable_task_names(app: Celery) -> list[str]:
    """The names of the app's tasks that claim their ledger row (its ``ReliableTask`` tasks),
    after importing the project's task modules as a worker would."""
    if id(app) not in _discovered:
        _import_task_modules(app)
    return sorted(name for name, task in app.tasks.items() if claims_its_row(task))
