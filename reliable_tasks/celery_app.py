"""Resolve the project's Celery app lazily (the library never creates one)."""

from __future__ import annotations

from celery import Celery, current_app
from django.utils.module_loading import import_string

from reliable_tasks.conf import app_settings


def get_celery_app() -> Celery:
    """Return ``RELIABLE_TASKS_CELERY_APP`` if set, else Celery's current app."""
    path = app_settings.CELERY_APP
    if path:
        return import_string(path)
    return current_app._get_current_object()
