"""The app's own Celery tasks (found by ``app.autodiscover_tasks()``)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from reliable_tasks.runner import run_django_task  # noqa: F401 - registers the task
from reliable_tasks.sweeper import sweep


@shared_task(name="reliable_tasks.sweep", ignore_result=True)
def sweep_task() -> dict[str, Any]:
    """One sweeper pass (see ``reliable_tasks.sweeper``)."""
    return sweep().as_dict()
