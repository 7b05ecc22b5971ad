"""The sweeper: repairs what went wrong, in bounded batches, safely from many processes at once.

One pass:
1. turns expired leases (their worker stopped heartbeating) into RETRY or LOST (always LOST
   for a row adopted from a delivery sent around the outbox: nothing to publish again), unless
   the database was unreachable less than a lease ago (``reliable_tasks.pulse``);
2. notices a broker that lost its data (the Redis server's run id changed) and makes the
   QUEUED rows published before the change due for re-publishing, resuming on later passes
   until all are (the cutoff is kept in the database); and, at most once per
   ``QUEUE_AUDIT_AGE``, looks up QUEUED rows older than that in the broker's queues and makes
   those whose message is gone due too (a purge, ``FLUSHDB``, an eviction keep the run id);
3. publishes due rows: PENDING past the publish grace or their held delay, RETRY past their
   backoff. Concurrent sweepers never publish the same row twice: where the database has
   ``SKIP LOCKED``, a batch is locked with ``SELECT ... FOR UPDATE SKIP LOCKED`` and stays
   locked until it is published and marked in the same transaction (other passes skip it, and
   a pass that dies lets it go at once), and a backlog is published by two such loops at once;
   elsewhere a batch is taken with one conditional UPDATE stamped with the pass's token, which
   also pushes the rows' next attempt past the grace; before that, wakes rows that a
   concurrency limit deferred where their key has free slots, and those a rate limit deferred
   whose start is due (``reliable_tasks.limits``);
4. pushes schedules whose last change did not reach RedBeat;
5. prunes finished rows older than ``RETENTION``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, connections, transaction

from reliable_tasks import limits
from reliable_tasks.broker_audit import messages_present, queue_names
from reliable_tasks.broker_epoch import (
    EpochCheck,
    audit_again_soon,
    check_broker_epoch,
    requeue_done,
    start_audit,
)
from reliable_tasks.celery_app import find_task, get_celery_app, reliable_task_names
from reliable_tasks.clock import database_now
from reliable_tasks.conf import app_settings
from reliable_tasks.metrics import observe_sweep
from reliable_tasks.models import TaskRecord
from reliable_tasks.outbox import publish_records, publishing_transaction
from reliable_tasks.publisher import PublishRow, close_publisher
from reliable_tasks.pulse import leases_may_expire, touch
from reliable_tasks.querysets import TaskRecordQuerySet
from reliable_tasks.states import TaskState
from reliable_tasks.sync import push_marked

logger = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What one sweeper pass did."""

    expired_leases_retried: int = 0
    expired_leases_lost: int = 0
    leases_held_after_outage: bool = False
    broker_changed: bool = False
    requeued_after_broker_loss: int = 0
    requeued_missing_messages: int = 0
    woken_for_concurrency: int = 0
    woken_for_rate: int = 0
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
    """Run one sweeper pass and return what it did. Safe to run from many processes at once.

    ``now`` defaults to the database's clock, which every time the pass compares was written
    with (leases, published times) or is close to (due times: see ``reliable_tasks.clock``).
    """
    started = time.monotonic()
    now = now or database_now()
    budget = _Budget(time_budget if time_budget is not None
                     else max(app_settings.SWEEP_INTERVAL * 0.8, 1.0))
    batch_size = app_settings.SWEEP_BATCH_SIZE
    report = SweepReport()
    if leases_may_expire(now, touch(now)):
        report.expired_leases_retried, report.expired_leases_lost = expire_leases(
            now, batch_size, budget)
    else:
        report.leases_held_after_outage = True
        logger.info("sweep: the ledger was unreachable less than a lease ago; no lease is "
                    "judged until the workers' heartbeats had a whole lease to resume")
    epoch = check_broker_epoch(now)
    report.broker_changed = epoch.changed
    if epoch.requeue_before is not None:
        report.requeued_after_broker_loss = requeue_after_broker_loss(
            epoch, now, batch_size, budget)
    report.requeued_missing_messages = requeue_missing_messages(epoch, now, batch_size, budget)
    report.woken_for_concurrency, report.woken_for_rate = wake_waiters(now, batch_size, budget)
    report.published, report.publish_failed = publish_due_rows(now, batch_size, budget)
    report.schedules_pushed = push_marked(batch_size).pushed if budget.left() else 0
    report.pruned = prune_finished(now, batch_size, budget)
    report.seconds = time.monotonic() - started
    observe_sweep(report)
    counts = report.as_dict()
    if any(value for key, value in counts.items() if key != "seconds"):
        logger.info("sweep: %s", counts)
    return report


#: What becomes of a row whose lease expired, and the error it records.
_LEASE_OUTCOMES: dict[str, tuple[TaskState, str]] = {
    "retry": (TaskState.RETRY, "The worker stopped heartbeating while running it."),
    "lost": (TaskState.LOST, "The worker stopped heartbeating while running it; the task does "
                             "not allow re-running (retry_on_lost)."),
    "used_up": (TaskState.LOST, "The worker stopped heartbeating while running its last "
                                "allowed attempt (max_attempts)."),
}


def _lease_outcome(task_name: str, adopted: bool, attempts: int,
                   max_attempts: int | None, kwargs: Any) -> str:
    """``retry`` for a task that may run again and has attempts left, else why it is lost.

    An adopted row (sent around the outbox) has no arguments to publish again. A task decides
    with ``reruns_after_lost(kwargs)`` (``ReliableTask``), else its ``retry_on_lost``.
    """
    task = find_task(get_celery_app(), task_name)
    decide = getattr(task, "reruns_after_lost", None)
    reruns = decide(kwargs) if decide is not None else getattr(task, "retry_on_lost", False)
    if adopted or not reruns:
        return "lost"
    limit = max_attempts or getattr(task, "max_attempts", None) or app_settings.MAX_ATTEMPTS
    return "retry" if attempts < int(limit) else "used_up"


def expire_leases(now: datetime, batch_size: int, budget: _Budget) -> tuple[int, int]:
    """STARTED rows whose lease ran out become RETRY (``retry_on_lost``, recorded through the
    outbox, attempts left) or LOST; return (retried, lost)."""
    retried = lost = 0
    while budget.left():
        rows = list(TaskRecord.objects.lease_expired(now)
                    .order_by("lease_expires_at")
                    .values_list("id", "task_name", "adopted", "attempts",
                                 "max_attempts", "kwargs")[:batch_size])
        if not rows:
            break
        # Each UPDATE names the attempt its outcome was judged on: a redelivery that took the
        # row over meanwhile (attempts + 1, a new lease) is left alone.
        by_outcome: dict[tuple[str, int], list[Any]] = {}
        for task_id, task_name, adopted, attempts, max_attempts, kwargs in rows:
            outcome = _lease_outcome(task_name, adopted, attempts, max_attempts, kwargs)
            by_outcome.setdefault((outcome, attempts), []).append(task_id)
        for (outcome, attempts), ids in by_outcome.items():
            state, message = _LEASE_OUTCOMES[outcome]
            ending = ({"next_attempt_at": now} if state == TaskState.RETRY
                      else {"finished_at": now})
            changed = TaskRecord.objects.filter(
                id__in=ids, attempts=attempts).lease_expired(now).update(
                state=state, lease_expires_at=None, error_type="reliable_tasks.WorkerLost",
                error_message=message, **ending)
            if state == TaskState.RETRY:
                retried += changed
            else:
                lost += changed
        if len(rows) < batch_size:
            break
    return retried, lost


def _queued_rows(cutoff: datetime, task_names: list[str]) -> TaskRecordQuerySet:
    """QUEUED rows published by the outbox up to ``cutoff``, of ``task_names`` (this app's
    reliable tasks: a ledger shared with another app holds rows this app's broker never saw)."""
    return TaskRecord.objects.filter(
        state=TaskState.QUEUED, adopted=False, published_at__lte=cutoff,
        task_name__in=task_names)


def _make_due(rows: list[tuple[Any, int]], cutoff: datetime, now: datetime) -> int:
    """QUEUED to PENDING (due now) for ``rows`` (id, attempts), each only while it is still
    QUEUED at that attempt and published up to ``cutoff``: a row published again since, or
    claimed, is left alone."""
    by_attempt: dict[int, list[Any]] = {}
    for task_id, attempts in rows:
        by_attempt.setdefault(attempts, []).append(task_id)
    return sum(
        TaskRecord.objects.filter(id__in=ids, attempts=attempts, published_at__lte=cutoff)
        .transition((TaskState.QUEUED,), state=TaskState.PENDING, next_attempt_at=now)
        for attempts, ids in by_attempt.items())


def requeue_after_broker_loss(epoch: EpochCheck, now: datetime, batch_size: int,
                              budget: _Budget) -> int:
    """QUEUED rows published before the broker changed may be gone: make them due now.

    Goes on from pass to pass until none published up to the change (``requeue_before``, kept
    in the database) is left, then clears the cutoff; rows published after the new server
    answered are safe. The claim makes the copies that did survive harmless.
    """
    cutoff = epoch.requeue_before
    assert cutoff is not None, "only called while a requeue is pending"
    task_names = reliable_task_names(get_celery_app())
    requeued = 0
    while budget.left():
        rows = list(_queued_rows(cutoff, task_names).values_list("id", "attempts")[:batch_size])
        if not rows:
            requeue_done(epoch.name, cutoff)
            break
        requeued += _make_due(rows, cutoff, now)
    if requeued:
        logger.warning("broker lost its data (new Redis run id at %s): %d queued task(s) will "
                       "be published again", cutoff.isoformat(), requeued)
    return requeued


#: Rows one look for missing messages checks at most, in batches of ``SWEEP_BATCH_SIZE``.
_AUDIT_BATCHES = 20


def requeue_missing_messages(epoch: EpochCheck, now: datetime, batch_size: int,
                             budget: _Budget) -> int:
    """QUEUED rows older than ``QUEUE_AUDIT_AGE`` whose message the broker no longer holds
    (neither in a queue nor delivered to a worker) become due now; returns how many.

    Runs at most once per ``QUEUE_AUDIT_AGE`` per broker, and at once again on the next pass
    while a look left rows unchecked. A broker that cannot be listed (not Redis) or cannot be
    reached changes nothing.
    """
    age = app_settings.QUEUE_AUDIT_AGE
    if not age or not budget.left():
        return 0
    if epoch.audited_at is not None and epoch.audited_at > now - timedelta(seconds=age):
        return 0  # looked lately, as the epoch row read this pass says: no UPDATE needed
    broker = epoch.name
    if not start_audit(broker, now, age):
        return 0
    cutoff = now - timedelta(seconds=age)
    limit = batch_size * _AUDIT_BATCHES
    app = get_celery_app()
    rows = _load_rows(_queued_rows(cutoff, reliable_task_names(app))
                      .order_by("published_at")[:limit])
    if not rows:
        return 0
    try:
        present = messages_present(app, {str(row.id) for row in rows}, queue_names(app, rows))
    except Exception as exc:  # noqa: BLE001 - a broker that cannot be read changes nothing
        logger.warning("sweep: could not look up queued messages in the broker: %r", exc)
        return 0
    if present is None:
        return 0
    if len(rows) == limit:
        audit_again_soon(broker, now)
    missing = [(row.id, row.attempts) for row in rows if str(row.id) not in present]
    requeued = _make_due(missing, cutoff, now) if missing else 0
    if requeued:
        logger.warning("sweep: %d queued task(s) had no message left in the broker (purged, "
                       "flushed or evicted); they will be published again", requeued)
    return requeued


def _due_rows(now: datetime) -> TaskRecordQuerySet:
    return (TaskRecord.objects.due_for_publish(now).filter(adopted=False)
            .order_by("next_attempt_at"))


def _load_rows(rows: TaskRecordQuerySet) -> list[PublishRow]:
    """The columns publishing reads, as tuples: no model instance per row."""
    return [PublishRow._make(values) for values in rows.values_list(*PublishRow._fields)]


def _publish_locked_batch(now: datetime, batch_size: int) -> tuple[int, int]:
    """Lock up to ``batch_size`` due rows, publish and mark them; return (taken, published).

    The rows stay locked until the transaction that marks them commits: concurrent passes skip
    them meanwhile, and find them QUEUED afterwards. A failed publish is recorded in the same
    transaction and makes the rows due again after the grace.
    """
    retry_at = now + timedelta(seconds=app_settings.PUBLISH_GRACE)
    with publishing_transaction():
        rows = _load_rows(_due_rows(now).select_for_update(skip_locked=True)[:batch_size])
        return len(rows), publish_records(rows, retry_at=retry_at)


def _publish_claimed_batch(now: datetime, batch_size: int) -> tuple[int, int]:
    """Claim up to ``batch_size`` due rows with a token, publish them; return (taken, published).

    For databases without ``SKIP LOCKED``: the conditional UPDATE lets one pass claim a row and
    makes it due again only after the grace, so no other pass takes it meanwhile.
    """
    token = uuid.uuid4().hex
    grace = timedelta(seconds=app_settings.PUBLISH_GRACE)
    with transaction.atomic():
        ids = list(_due_rows(now).values_list("id", flat=True)[:batch_size])
        if not ids:
            return 0, 0
        TaskRecord.objects.filter(id__in=ids).due_for_publish(now).update(
            publish_claim=token, next_attempt_at=now + grace)
    rows = _load_rows(TaskRecord.objects.filter(id__in=ids, publish_claim=token))
    return len(rows), publish_records(rows)


class _Publishing:
    """The publishing step of one pass: its counts, shared by its loops; a failure stops all."""

    def __init__(self, now: datetime, batch_size: int, budget: _Budget) -> None:
        self.now = now
        self.batch_size = batch_size
        self.budget = budget
        self.locked = connection.features.has_select_for_update_skip_locked
        self.published = 0
        self.failed = 0
        self.stopped = threading.Event()
        self._counting = threading.Lock()

    def next_batch(self) -> bool:
        """Publish one batch; return whether it was full and went out (more may be due)."""
        publish_batch = _publish_locked_batch if self.locked else _publish_claimed_batch
        taken, sent = publish_batch(self.now, self.batch_size)
        with self._counting:
            self.published += sent
            self.failed += taken - sent
        if sent < taken:
            self.stopped.set()  # the broker is failing: leave the rest for the next pass
        return sent == taken == self.batch_size

    def run(self) -> None:
        """Publish batches until none is full, one fails, or the pass' time is up."""
        while self.budget.left() and not self.stopped.is_set():
            if not self.next_batch():
                return

    def run_in_two_loops(self) -> None:
        """``run()`` in this thread and, at the same time, in a helper thread.

        The helper has its own database and broker connections (closed when it is done), so
        one loop builds and sends messages while the other waits for the database. Its rows
        are its own: the batches of both loops are locked with SKIP LOCKED.
        """
        failures: list[BaseException] = []

        def helper() -> None:
            try:
                self.run()
            except BaseException as exc:  # raised again in the caller's thread below
                self.stopped.set()
                failures.append(exc)
            finally:
                close_publisher()
                connections.close_all()

        thread = threading.Thread(target=helper, name="reliable_tasks.sweep.publish")
        thread.start()
        try:
            self.run()
        except BaseException:
            self.stopped.set()
            raise
        finally:
            thread.join()
        if failures:
            raise failures[0]


def wake_waiters(now: datetime, batch_size: int, budget: _Budget) -> tuple[int, int]:
    """Wake rows that a limit deferred; return (woken for a concurrency slot, for a rate).

    The backstop of the wake-up a finishing run does: a slot freed by an expired lease, a
    revoke or a worker that died before waking anyone. Rows woken for a slot are published
    here; rows whose rate start is due become due PENDING rows for the publish step.
    """
    slots = 0
    for key in limits.waiting_concurrency_keys(batch_size):
        if not budget.left():
            break
        woken = limits.wake(key)
        publish_records(woken)
        slots += len(woken)
    rate = limits.wake_due_rate_waiters(now, batch_size) if budget.left() else 0
    return slots, rate


def publish_due_rows(now: datetime, batch_size: int, budget: _Budget) -> tuple[int, int]:
    """Publish due rows in batches; return (published, failed).

    A backlog (a first batch that comes back full) is published by two loops at once where
    rows are locked with SKIP LOCKED, unless the pass runs inside a transaction: another
    connection would not see the rows that transaction wrote.
    """
    publishing = _Publishing(now, batch_size, budget)
    if budget.left() and publishing.next_batch():
        if publishing.locked and not connection.in_atomic_block:
            publishing.run_in_two_loops()
        else:
            publishing.run()
    return publishing.published, publishing.failed


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
