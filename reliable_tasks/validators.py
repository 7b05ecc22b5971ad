"""Validation of periodic schedules: task names, timings, JSON arguments and options."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError

from reliable_tasks.celery_app import claims_its_row, find_task, get_celery_app
from reliable_tasks.timing import ScheduleSpecError, parse_crontab, parse_timezone

#: The publish options a schedule may carry.
SCHEDULE_OPTIONS = frozenset({"queue", "priority", "expires"})


def validate_registered_task(name: str) -> None:
    """The task must be a ``ReliableTask`` registered with the project's Celery app: each run
    goes through the ledger, and only a ``ReliableTask`` claims its row when it runs."""
    task = find_task(get_celery_app(), name) if name else None
    if task is None:
        raise ValidationError(
            "Unknown task %(name)s: it is not registered with the Celery app.",
            code="unknown_task", params={"name": repr(name)})
    if not claims_its_row(task):
        raise ValidationError(
            "Task %(name)s is a plain Celery task: a schedule's runs go through the ledger, "
            "and only a ReliableTask claims its run when it starts (declare it with "
            "base=ReliableTask).", code="not_reliable_task", params={"name": repr(name)})


def validate_args(value: Any) -> None:
    """Positional arguments are a JSON list."""
    if not isinstance(value, list):
        raise ValidationError("Arguments must be a JSON list, e.g. [1, \"a\"].", code="not_list")


def validate_kwargs(value: Any) -> None:
    """Keyword arguments are a JSON object."""
    if not isinstance(value, dict):
        raise ValidationError("Keyword arguments must be a JSON object, e.g. {\"x\": 1}.",
                              code="not_object")


def validate_options(value: Any) -> None:
    """Options are a JSON object with only queue, priority and expires."""
    if not isinstance(value, dict):
        raise ValidationError("Options must be a JSON object.", code="not_object")
    unknown = sorted(set(value) - SCHEDULE_OPTIONS)
    if unknown:
        raise ValidationError(
            "Unknown option(s) %(unknown)s; allowed: %(allowed)s.", code="unknown_option",
            params={"unknown": ", ".join(unknown), "allowed": ", ".join(sorted(SCHEDULE_OPTIONS))})


def validate_timezone(name: str) -> None:
    """The name of an existing IANA time zone."""
    try:
        parse_timezone(name)
    except ScheduleSpecError as exc:
        raise ValidationError(str(exc), code="unknown_timezone") from exc


def crontab_errors(expression: str, zone_name: str) -> dict[str, str]:
    """Field name -> message for an invalid crontab or time zone; empty when both are valid."""
    try:
        parse_crontab(expression, zone_name)
    except ScheduleSpecError as exc:
        return {exc.field: str(exc)}
    return {}
