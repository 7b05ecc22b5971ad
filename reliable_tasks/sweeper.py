"""The sweeper: repairs what went wrong, in bounded batches, safely from many processes at once.

One pass:
1. turns expired leases (their worker stopped heartbeating) into RETRY or LOST;
2. notices a broker that lost its data (the Redis server's run id changed) and makes the
   QUEUED rows published before the change due for re-publishing;
3. publishes due rows: PENDING past the publish grace or their held delay, RETRY past their
   backoff. Each batch is taken with one conditional UPDATE stamped with the pass's token
   (after ``SELECT ... FOR UPDATE SKIP LOCKED`` where the database has it), so concurrent
   sweepers never publish the same row twice;
4. pushes schedules whose last change did not reach RedBeat;
5. prunes finished rows older than ``RETENTION``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from reliable_tasks.broker_epoch import check_broker_epoch
from reliable_tasks.celery_app import find_task, get_celery_app
from reliable_tasks.conf import app_settings
from reliable_tasks.metrics import observe_sweep
from reliable_tasks.models import TaskRecord
from reliable_tasks.outbox import publish_records
from reliable_tasks.states import TaskState
from reliable_tasks.sync import push_marked

logger = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What one sweeper pass did."""

    expired_leases_retried: int = 0
    expired_leases_lost: int = 0
    broker_changed: bool = False
    requeued_after_broker_loss: int = 0
    published: int = 0
    publish_failed: int = 0
    schedules_pushed: int = 0
    pruned: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The report as a plain dict (JSON output, logs)."""
        return asdict(self)


class _Budget:
    """A wall-clock bound on one pass, so a huge backlog never makes a pass run forever."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> bool:
        return time.monotonic() < self.deadline


def sweep(now: datetime | None = None, *, time_budget: float | None = None) -> SweepReport:
    """Run one sweeper pass and return what it did. Safe to run from many processes at once."""
    started = time.monotonic()
    now = now or timezone.now()
    budget = _Budget(time_budget if time_budget is not None
                     else max(app_settings.SWEEP_INTERVAL * 0.8, 1.0))
    batch_size = app_settings.SWEEP_BATCH_SIZE
    report = SweepReport()
    report.expired_leases_retried, report.expired_leases_lost = expire_leases(
        now, batch_size, budget)
    epoch = check_broker_epoch(now)
    if epoch.changed:
        report.broker_changed = True
        report.requeued_after_broker_loss = requeue_after_broker_loss(
            epoch.previous_since or now, now, batch_size, budget)
    report.published, report.publish_failed = publish_due_rows(now, batch_size, budget)
    report.schedules_pushed = push_marked(batch_size).pushed if budget.left() else 0
    report.pruned = prune_finished(now, batch_size, budget)
    report.seconds = time.monotonic() - started
    observe_sweep(report)
    if any((report.expired_leases_retried, report.expired_leases_lost, report.broker_changed,
            report.published, report.publish_failed, report.schedules_pushed, report.pruned)):
        logger.info("sweep: %s", report.as_dict())
    return report


def _retry_on_lost(task_name: str) -> bool:
    task = find_task(get_celery_app(), task_name)
    return bool(getattr(task, "retry_on_lost", False))


def expire_leases(now: datetime, batch_size: int, budget: _Budget) -> tuple[int, int]:
    """STARTED rows whose lease ran out become RETRY (``retry_on_lost``) or LOST."""
    retried = lost = 0
    while budget.left():
        rows = list(TaskRecord.objects.lease_expired(now)
                    .order_by("lease_expires_at")
                    .values_list("id", "task_name")[:batch_size])
        if not rows:
            break
        by_outcome: dict[bool, list[Any]] = {True: [], False: []}
        for task_id, task_name in rows:
            by_outcome[_retry_on_lost(task_name)].append(task_id)
        if by_outcome[True]:
            retried += TaskRecord.objects.filter(id__in=by_outcome[True]).lease_expired(
                now).update(state=TaskState.RETRY, next_attempt_at=now, lease_expires_at=None,
                            error_type="reliable_tasks.WorkerLost",
                            error_message="The worker stopped heartbeating while running it.")
        if by_outcome[False]:
            lost += TaskRecord.objects.filter(id__in=by_outcome[False]).lease_expired(
                now).update(state=TaskState.LOST, finished_at=now, lease_expires_at=None,
                            error_type="reliable_tasks.WorkerLost",
                            error_message="The worker stopped heartbeating while running it; "
                                          "the task does not allow re-running (retry_on_lost).")
        if len(rows) < batch_size:
            break
    return retried, lost


def requeue_after_broker_loss(since: datetime, now: datetime, batch_size: int,
                              budget: _Budget) -> int:
    """QUEUED rows published before the broker changed may be gone: make them due now.

    ``since`` is the last time the old broker was seen; rows published after the new one
    answered are safe. The claim makes the copies that did survive harmless.
    """
    requeued = 0
    while budget.left():
        ids = list(TaskRecord.objects.filter(state=TaskState.QUEUED, adopted=False,
                                             published_at__lte=now)
                   .values_list("id", flat=True)[:batch_size])
        if not ids:
            break
        requeued += TaskRecord.objects.filter(id__in=ids).transition(
            (TaskState.QUEUED,), state=TaskState.PENDING, next_attempt_at=now)
        if len(ids) < batch_size:
            break
    if requeued:
        logger.warning("broker lost its data (new Redis run id since %s): %d queued task(s) "
                       "will be published again", since.isoformat(), requeued)
    return requeued


def _take_due_batch(now: datetime, batch_size: int) -> list[TaskRecord]:
    """Take up to ``batch_size`` due rows for this pass; no other pass can take them too."""
    token = uuid.uuid4().hex
    grace = timedelta(seconds=app_settings.PUBLISH_GRACE)
    with transaction.atomic():
        candidates = (TaskRecord.objects.due_for_publish(now).filter(adopted=False)
                      .order_by("next_attempt_at"))
        if connection.features.has_select_for_update_skip_locked:
            candidates = candidates.select_for_update(skip_locked=True)
        ids = list(candidates.values_list("id", flat=True)[:batch_size])
        if not ids:
            return []
        TaskRecord.objects.filter(id__in=ids).due_for_publish(now).update(
            publish_claim=token, next_attempt_at=now + grace)
    return list(TaskRecord.objects.filter(id__in=ids, publish_claim=token))


def publish_due_rows(now: datetime, batch_size: int, budget: _Budget) -> tuple[int, int]:
    """Publish due rows in batches; return (published, failed)."""
    published = failed = 0
    while budget.left():
        batch = _take_due_batch(now, batch_size)
        if not batch:
            break
        sent = publish_records(batch)
        published += sent
        if sent < len(batch):
            failed += len(batch) - sent
            break  # the broker is failing: leave the rest for the next pass
    return published, failed


def prune_finished(now: datetime, batch_size: int, budget: _Budget) -> int:
    """Delete finished rows older than ``RETENTION``, a batch at a time."""
    cutoff = now - timedelta(seconds=app_settings.RETENTION)
    pruned = 0
    while budget.left():
        ids = list(TaskRecord.objects.finished_before(cutoff)
                   .values_list("id", flat=True)[:batch_size])
        if not ids:
            break
        pruned += TaskRecord.objects.filter(id__in=ids).delete()[0]
        if len(ids) < batch_size:
            break
    return pruned
