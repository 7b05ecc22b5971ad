"""Periodic runs in the ledger: one ``TaskRecord`` per schedule and slot.

``(schedule, scheduled_for)`` is unique, so a second beat, a repeated tick or a tick replayed
after a crash can never create a second run of the same slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from django.db import IntegrityError, transaction
from django.utils import timezone

from reliable_tasks.celery_app import get_celery_app
from reliable_tasks.models import PeriodicSchedule, TaskRecord
from reliable_tasks.outbox import build_record


class ScheduleGone(Exception):
    """The schedule behind a RedBeat entry was deleted or disabled in the database."""


def record_runs(schedule_id: int, slots: Sequence[datetime]) -> list[TaskRecord]:
    """Record a run per slot, from the schedule as the database has it now.

    Returns the rows created; slots already recorded are skipped. Raises ``ScheduleGone`` when
    the schedule no longer exists or is disabled, and database errors as they come: the caller
    leaves the entry due and tries again.
    """
    schedule = PeriodicSchedule.objects.filter(pk=schedule_id, enabled=True).first()
    if schedule is None:
        raise ScheduleGone(schedule_id)
    app = get_celery_app()
    now = timezone.now()
    created: list[TaskRecord] = []
    for slot in slots:
        record = build_record(app, schedule.task, schedule.args, schedule.kwargs,
                              dict(schedule.options or {}), now)
        record.schedule_id = schedule.pk
        record.scheduled_for = slot
        try:
            with transaction.atomic():
                record.save(force_insert=True)
        except IntegrityError:
            continue  # this slot was recorded before: by another beat, or a replayed tick
        created.append(record)
    return created


def disable_one_off(schedule_id: int) -> None:
    """A one-off schedule ran: disable it (its entry is removed by the push that follows)."""
    PeriodicSchedule.objects.filter(pk=schedule_id, enabled=True).update(enabled=False)
