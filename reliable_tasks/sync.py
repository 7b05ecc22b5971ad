"""Pushing schedules from the database to RedBeat, and the save/delete hooks that do it.

The database is the truth. Every change bumps a schedule's ``revision`` in the same transaction;
a push records the revision it wrote in ``synced_revision``. A push that fails records the error
and leaves the row behind, so the sweeper (or ``reconcile_tasks``) pushes it again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from reliable_tasks import redbeat_store
from reliable_tasks.celery_app import get_celery_app
from reliable_tasks.conf import app_settings
from reliable_tasks.models import PeriodicSchedule

logger = logging.getLogger(__name__)


#: Rows marked synced per UPDATE (SQLite limits the parameters of one statement).
MARK_CHUNK = 5000
#: The columns a spec is built from; ``spec_from_values()`` takes a ``values()`` row of them.
SPEC_FIELDS = ("pk", "revision", "task", "args", "kwargs", "options", "interval_seconds",
               "crontab", "timezone", "run_at", "catch_up")


def spec_for(schedule: PeriodicSchedule) -> redbeat_store.ScheduleSpec:
    """What RedBeat should hold for ``schedule``."""
    return spec_from_values({name: getattr(schedule, name) for name in SPEC_FIELDS})


def spec_from_values(row: dict[str, Any]) -> redbeat_store.ScheduleSpec:
    """What RedBeat should hold for a schedule read as ``values(*SPEC_FIELDS)``.

    Reading plain values instead of model instances is what keeps a reconcile of many
    schedules fast.
    """
    return redbeat_store.ScheduleSpec(
        schedule_id=row["pk"], revision=row["revision"], task=row["task"],
        args=list(row["args"] or []), kwargs=dict(row["kwargs"] or {}),
        options=dict(row["options"] or {}),
        interval_seconds=row["interval_seconds"], crontab=row["crontab"],
        timezone=row["timezone"] or settings.TIME_ZONE, run_at=row["run_at"],
        catch_up=row["catch_up"],
    )


@dataclass
class PushReport:
    """What one push did."""

    pushed: int = 0
    removed: int = 0
    failed: int = 0


def mark_synced(pushed: Iterable[tuple[int, int]]) -> None:
    """Record that RedBeat holds revision ``r`` of schedule ``pk`` for each ``(pk, r)`` pushed.

    One conditional UPDATE per revision: a row edited meanwhile stays marked for sync.
    """
    by_revision: dict[int, list[int]] = defaultdict(list)
    for pk, revision in pushed:
        by_revision[revision].append(pk)
    now = timezone.now()
    for revision, ids in by_revision.items():
        for start in range(0, len(ids), MARK_CHUNK):
            PeriodicSchedule.objects.filter(
                pk__in=ids[start:start + MARK_CHUNK], revision=revision,
            ).update(synced_revision=revision, synced_at=now, sync_error="")


def push_schedules(ids: Iterable[int]) -> PushReport:
    """Bring RedBeat in line with the database for the schedules ``ids`` (deleted ones too)."""
    ids = list(ids)
    report = PushReport()
    if not ids:
        return report
    schedules = {s.pk: s for s in PeriodicSchedule.objects.filter(pk__in=ids)}
    enabled = [s for s in schedules.values() if s.enabled]
    to_remove = [redbeat_store.entry_name(pk) for pk in ids
                 if pk not in schedules or not schedules[pk].enabled]
    app = get_celery_app()
    try:
        report.pushed = redbeat_store.push(app, [spec_for(s) for s in enabled], timezone.now())
        report.removed = redbeat_store.remove(app, to_remove)
    except Exception as exc:  # noqa: BLE001 - Redis down: the rows stay marked; healed later
        report.failed = len(ids)
        logger.warning("pushing %d schedule(s) to RedBeat failed; they stay marked for sync: "
                       "%r", len(ids), exc)
        PeriodicSchedule.objects.filter(pk__in=ids).update(
            sync_error=f"{type(exc).__name__}: {exc}"[:2000])
        return report
    mark_synced((s.pk, s.revision) for s in schedules.values())
    return report


def push_after_commit(ids: Iterable[int]) -> None:
    """Push the schedules ``ids`` when the current transaction commits (never if it rolls back)."""
    ids = list(ids)
    if ids:
        transaction.on_commit(lambda: push_schedules(ids))


def push_marked(batch_size: int | None = None) -> PushReport:
    """Push the schedules whose last change did not reach RedBeat (the sweeper's step)."""
    batch_size = batch_size or app_settings.SWEEP_BATCH_SIZE
    ids = list(PeriodicSchedule.objects.needing_sync().values_list("pk", flat=True)[:batch_size])
    return push_schedules(ids)


def on_schedule_saved(sender: Any, instance: PeriodicSchedule, **_: Any) -> None:
    """``post_save``: push after commit."""
    push_after_commit([instance.pk])


def on_schedule_deleted(sender: Any, instance: PeriodicSchedule, **_: Any) -> None:
    """``post_delete``: remove the entry after commit."""
    push_after_commit([instance.pk])
