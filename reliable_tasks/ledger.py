"""State transitions of the ledger, each one conditional UPDATE (compare-and-set).

The worker's claim names the states it may start from; every outcome write names the state it
expects and the claim it belongs to (worker and start time), so two workers, two sweepers, or a
sweeper and a worker can never both win, and a late or duplicate event never moves a row
backwards.
"""

from __future__ import annotations

import logging
import traceback as traceback_module
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.db import IntegrityError, connections, router, transaction
from django.db.models import Case, CharField, F, Q, When
from django.db.models.expressions import RawSQL
from django.utils import timezone

from reliable_tasks import limits, statements
from reliable_tasks.clock import database_now
from reliable_tasks.conf import app_settings
from reliable_tasks.exceptions import RetryNotAllowed
from reliable_tasks.models import KEY_HOLDING_STATES, LIVE_KEY_COLUMN, TaskRecord, WaitReason
from reliable_tasks.pulse import leases_may_expire, touch
from reliable_tasks.querysets import TaskRecordQuerySet, state_still_in
from reliable_tasks.states import (
    CLAIMABLE_STATES,
    FINISHED_STATES,
    MANUALLY_RETRYABLE_STATES,
    TaskState,
)

logger = logging.getLogger(__name__)

_ERROR_MESSAGE_LIMIT = 4000
_TRACEBACK_LIMIT = 20000


@dataclass
class Claim:
    """A worker's claim on a delivery: who started it when (the token of its outcome write)."""

    won: bool
    reason: str = ""
    #: Why a delivery that did not win was deferred by a limit (``WaitReason``), and for a
    #: rate, when it is to be sent again (None: the row waits to be woken or published).
    waiting_for: str = ""
    due: datetime | None = None
    #: The concurrency key the won claim holds a slot of (its end wakes the key's waiters).
    concurrency_key: str | None = None
    worker: str = ""
    started_at: datetime | None = None
    #: Read lazily (``load_attempt``): the common successful run never needs them.
    attempt: int | None = None
    max_attempts: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _alias() -> str:
    return router.db_for_write(TaskRecord)


def _lease(now: datetime) -> datetime:
    return now + timedelta(seconds=app_settings.LEASE_TIMEOUT)


def claim(task_id: str, *, task_name: str, worker: str, rerun_after_lost: bool,
          started_at: datetime | None = None, max_attempts: int | None = None,
          limited: bool = False, enforce_limits: bool = True) -> Claim:
    """Claim the row of a delivered task for this worker, or say why the body must not run.

    ``started_at`` is the claim's token: the outcome write names it, and a claim retried after
    a dropped connection finds its own earlier win by it (pass the same value on every try).
    The common case is one conditional UPDATE: it wins from PENDING, QUEUED and RETRY while the
    task has not expired. Otherwise the row is read to decide: a STARTED row whose lease expired
    is taken over when the task may re-run after its worker died and has attempts left (the
    row's ``max_attempts``, else ``max_attempts`` given here, else the setting), and becomes
    LOST when it has none, unless the database came back from an outage less than a lease ago
    (``pulse``: the lease may have run out only because its worker could not renew it, and the
    delivery loses as under a live lease); an expired task becomes
    EXPIRED; a row that does not exist (sent around the outbox, or pruned) is recorded as
    started by this delivery; a finished task, or one running under a live lease, loses, and
    the skipped delivery is counted. Leases and expiry are judged by the database's clock.

    A row with a concurrency or rate limit is claimed within it (``limits.claim``; not
    ``enforce_limits``: whatever the limits say), or deferred: the claim does not win and
    says why in ``waiting_for``. ``limited`` (the task has limits of its own) skips the
    UPDATE that claims rows without limits.
    """
    started_at = started_at or timezone.now()
    if not limited and statements.claim(task_id, task_name=task_name, worker=worker,
                                        started_at=started_at,
                                        lease_seconds=app_settings.LEASE_TIMEOUT):
        return Claim(won=True, worker=worker, started_at=started_at)
    if enforce_limits and statements.claims_within_limits_at_once(_alias()):
        key = statements.claim_within_limits(
            task_id, task_name=task_name, worker=worker, started_at=started_at,
            lease_seconds=app_settings.LEASE_TIMEOUT)
        if key is not None:
            return Claim(won=True, worker=worker, started_at=started_at,
                         concurrency_key=key or None)
    claimed = _claim_contended(task_id, task_name, worker, started_at, rerun_after_lost,
                               max_attempts, enforce_limits)
    if not claimed.won and not claimed.waiting_for:
        TaskRecord.objects.filter(id=task_id).update(
            duplicate_deliveries=F("duplicate_deliveries") + 1)
    return claimed


def _claim_contended(task_id: str, task_name: str, worker: str, started_at: datetime,
                     rerun_after_lost: bool, max_attempts: int | None,
                     enforce_limits: bool = True) -> Claim:
    row = (TaskRecord.objects.filter(id=task_id)
           .values("id", "state", "attempts", "max_attempts", "lease_expires_at", "expires_at",
                   "worker", "started_at", "task_name", "created_at", "waiting_for",
                   "concurrency_key", "concurrency_limit", "rate_key", "rate_limit").first())
    now = database_now()
    if row is None:
        return _claim_unrecorded(task_id, task_name, worker, started_at, now)
    state = row["state"]
    if state == TaskState.STARTED and (row["worker"], row["started_at"]) == (worker, started_at):
        return Claim(won=True, worker=worker, started_at=started_at,  # an earlier try won
                     concurrency_key=row["concurrency_key"])
    if row["task_name"] != task_name:
        return Claim(won=False, reason=f"the task id now runs {row['task_name']} (replaced)")
    if state in CLAIMABLE_STATES and row["expires_at"] is not None and row["expires_at"] < now:
        TaskRecord.objects.filter(id=task_id).transition(
            CLAIMABLE_STATES, state=TaskState.EXPIRED, finished_at=now)
        return Claim(won=False, reason=f"expired at {row['expires_at'].isoformat()}")
    if state in CLAIMABLE_STATES and (row["concurrency_key"] or row["rate_key"]):
        return _claim_limited(row, worker, started_at, enforce_limits)
    lease_expired = row["lease_expires_at"] is not None and row["lease_expires_at"] < now
    if state == TaskState.STARTED and lease_expired and rerun_after_lost and (
            not leases_may_expire(now, touch(now))):
        # The lease may have run out only because the database was away: its worker is
        # probably alive and renews it at its next heartbeat (as the sweeper judges, pulse).
        return Claim(won=False, reason="its lease ran out during a database outage")
    limit = row["max_attempts"] or max_attempts or app_settings.MAX_ATTEMPTS
    if state == TaskState.STARTED and lease_expired and rerun_after_lost and (
            row["attempts"] >= limit):
        TaskRecord.objects.filter(
            id=task_id, state=state, attempts=row["attempts"], lease_expires_at__lt=now,
        ).update(state=TaskState.LOST, finished_at=now, lease_expires_at=None,
                 error_type="reliable_tasks.WorkerLost",
                 error_message="The worker stopped heartbeating while running its last "
                               "allowed attempt (max_attempts).")
        return Claim(won=False, reason=f"lost on its last attempt ({row['attempts']})")
    if state == TaskState.STARTED and lease_expired and rerun_after_lost:
        changed = TaskRecord.objects.filter(
            id=task_id, state=state, attempts=row["attempts"], lease_expires_at__lt=now,
        ).update(attempts=row["attempts"] + 1, worker=worker, started_at=started_at,
                 lease_expires_at=_lease(now))
        if changed:
            return Claim(won=True, worker=worker, started_at=started_at)
        return Claim(won=False, reason="claimed by another delivery")
    if state in CLAIMABLE_STATES:
        return Claim(won=False, reason="claimed by another delivery")
    why = "running under a live lease" if state == TaskState.STARTED else f"already {state}"
    return Claim(won=False, reason=why)


def _claim_limited(row: Mapping[str, Any], worker: str, started_at: datetime,
                   enforce_limits: bool) -> Claim:
    decision = limits.claim(row, worker=worker, started_at=started_at,
                            lease_seconds=app_settings.LEASE_TIMEOUT, enforce=enforce_limits)
    if decision.won:
        return Claim(won=True, worker=worker, started_at=started_at,
                     concurrency_key=row["concurrency_key"])
    if decision.waiting_for:
        why = (f"over the concurrency limit of {row['concurrency_key']!r}"
               if decision.waiting_for == WaitReason.CONCURRENCY
               else f"over the rate limit of {row['rate_key']!r}")
        return Claim(won=False, reason=f"deferred: {why}", waiting_for=decision.waiting_for,
                     due=decision.due)
    return Claim(won=False, reason="claimed by another delivery")


def _claim_unrecorded(task_id: str, task_name: str, worker: str, started_at: datetime,
                      now: datetime) -> Claim:
    try:
        with transaction.atomic():
            TaskRecord.objects.create(
                id=task_id, task_name=task_name, state=TaskState.STARTED, attempts=1,
                worker=worker, started_at=started_at, adopted=True,
                lease_expires_at=_lease(now))
    except IntegrityError:
        return Claim(won=False, reason="recorded by another delivery meanwhile")
    return Claim(won=True, worker=worker, started_at=started_at, attempt=1)


def _held_by(task_id: str, claimed: Claim) -> TaskRecordQuerySet:
    """The row, if this claim still holds it (same worker, same start)."""
    return TaskRecord.objects.filter(id=task_id, worker=claimed.worker,
                                     started_at=claimed.started_at)


def load_attempt(task_id: str, claimed: Claim) -> Claim:
    """Fill in the claim's attempt number, the row's attempt limit and its history."""
    if claimed.attempt is None:
        row = TaskRecord.objects.filter(id=task_id).values(
            "attempts", "max_attempts", "history").first()
        if row is not None:
            claimed.attempt = row["attempts"]
            claimed.max_attempts = row["max_attempts"]
            claimed.history = list(row["history"] or [])
    return claimed


def _history_entry(claimed: Claim, outcome: str, now: datetime,
                   error: str = "") -> dict[str, Any]:
    entry = {
        "attempt": claimed.attempt,
        "worker": claimed.worker,
        "started_at": claimed.started_at.isoformat() if claimed.started_at else None,
        "finished_at": now.isoformat(),
        "outcome": outcome,
    }
    if error:
        entry["error"] = error[:500]
    return entry


def _bounded(history: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The last ``HISTORY_LIMIT`` entries, and the last manual retry if it fell out of them
    (the next manual retry reads its budget there)."""
    everything = [*history, entry]
    kept = everything[-app_settings.HISTORY_LIMIT:]
    retries = [item for item in everything if item.get("manual_retry")]
    if retries and not any(item.get("manual_retry") for item in kept):
        kept = [retries[-1], *kept]
    return kept


def _error_fields(exc: BaseException, tb: str | None) -> dict[str, str]:
    if tb is None:
        tb = "".join(traceback_module.format_exception(exc))
    return {
        "error_type": f"{type(exc).__module__}.{type(exc).__qualname__}"[:255],
        "error_message": str(exc)[:_ERROR_MESSAGE_LIMIT],
        "traceback": tb[-_TRACEBACK_LIMIT:],
    }


#: ``record_success(return_value=NOT_KEPT)``: the run's return value is not stored.
NOT_KEPT: Any = object()


def record_success(task_id: str, claimed: Claim, return_value: Any = NOT_KEPT) -> bool:
    """SUCCESS, unless another attempt took the row meanwhile (one UPDATE).

    A successful attempt is described by the row itself (worker, started_at, finished_at,
    attempts); the history keeps the attempts that did not succeed. A ``return_value`` (JSON)
    is written to the row by the same UPDATE; ``None`` stores null.
    """
    assert claimed.started_at is not None, "a won claim has its start time"
    now = timezone.now()
    if return_value is NOT_KEPT:
        changed = statements.succeed(task_id, worker=claimed.worker,
                                     started_at=claimed.started_at, now=now)
    else:
        changed = _held_by(task_id, claimed).transition(
            statements.SUCCESS_FROM_STATES, state=TaskState.SUCCESS, finished_at=now,
            lease_expires_at=None, next_attempt_at=None, return_value=return_value)
    return changed == 1 or _already(task_id, claimed, TaskState.SUCCESS)


def _already(task_id: str, claimed: Claim, state: TaskState) -> bool:
    """Whether this claim's row is in ``state`` already: a retried write whose first try was
    stored although its connection broke before the answer came back."""
    return _held_by(task_id, claimed).filter(state=state).exists()


def record_failure(task_id: str, claimed: Claim, exc: BaseException,
                   tb: str | None = None) -> bool:
    """FAILURE (dead, waiting for a human), from this attempt's STARTED only."""
    return _finish(task_id, claimed, TaskState.FAILURE, exc, tb)


def record_retry(task_id: str, claimed: Claim, exc: BaseException | None,
                 next_attempt_at: datetime, tb: str | None = None,
                 **call_changes: Any) -> bool:
    """RETRY at ``next_attempt_at``, from this attempt's STARTED only.

    ``call_changes`` (``eta``, ``args``, ``kwargs``) describe the next attempt's call.
    """
    now = timezone.now()
    load_attempt(task_id, claimed)
    errors = _error_fields(exc, tb) if exc is not None else {}
    summary = f"{errors['error_type']}: {errors['error_message']}" if errors else ""
    entry = _history_entry(claimed, TaskState.RETRY, now, summary)
    return _held_by(task_id, claimed).transition(
        (TaskState.STARTED,),
        state=TaskState.RETRY, next_attempt_at=next_attempt_at, lease_expires_at=None,
        history=_bounded(claimed.history, entry), **errors, **call_changes,
    ) == 1 or _already(task_id, claimed, TaskState.RETRY)


def record_replaced(task_id: str, claimed: Claim, replacement: str) -> bool:
    """REPLACED, from this attempt's STARTED only: the body handed its task id to
    ``replacement`` (``Task.replace``), whose dispatch takes the row over
    (``take_over``). The history entry names the replacement."""
    now = timezone.now()
    load_attempt(task_id, claimed)
    entry = {**_history_entry(claimed, TaskState.REPLACED, now), "replaced_by": replacement[:500]}
    return _held_by(task_id, claimed).transition(
        (TaskState.STARTED,),
        state=TaskState.REPLACED, lease_expires_at=None, next_attempt_at=None,
        history=_bounded(claimed.history, entry),
    ) == 1 or _already(task_id, claimed, TaskState.REPLACED)


def take_over(record: TaskRecord) -> bool:
    """Make the row of ``record``'s id the row of ``record``'s call, as new (PENDING, no
    attempts yet), if that row is REPLACED, finished or plain Celery's; False otherwise.

    A task id sent again is one row: the replacement of a ``replace()`` takes the REPLACED row
    over, and a finished task sent again (a frozen signature or errback applied a second time)
    runs again, as with Celery. A row adopted from plain Celery's signals and claimed by no
    ``ReliableTask`` (no lease) carries no guarantee: the call takes it over whatever its
    state (a plain task replacing itself with a ``ReliableTask``), and plain Celery's signals
    no longer write it. The history of the earlier attempts stays. The claim names the task,
    so a late copy of a replaced task's message never runs the replacement's row.

    The row takes the call's ``unique_key``; a REPLACED row keeps its own when the call has
    none. Raises ``IntegrityError`` when another unfinished row holds the call's key.
    """
    changes: dict[str, Any] = {field: getattr(record, field) for field in _CALL_FIELDS}
    # The call's key; a replacement without one carries on the replaced task's work under its
    # key. The UPDATE raises IntegrityError where another unfinished row holds the call's key
    # (dispatch runs it in a savepoint and treats it as that key's conflict).
    changes["unique_key"] = record.unique_key if record.unique_key is not None else Case(
        When(state=TaskState.REPLACED, then=F("unique_key")), default=None)
    return TaskRecord.objects.filter(pk=record.pk).filter(
        Q(adopted=True, lease_expires_at__isnull=True)
        | Q(state_still_in((TaskState.REPLACED, *FINISHED_STATES))),
    ).update(**changes, state=TaskState.PENDING, attempts=0, worker="", started_at=None,
             lease_expires_at=None, finished_at=None, publish_attempts=0, publish_error="",
             error_type="", error_message="", traceback="", adopted=False,
             waiting_for="") == 1


#: The columns of a row that describe its call (what a replacement brings).
_CALL_FIELDS = ("task_name", "args", "kwargs", "options", "queue", "eta", "expires_at",
                "max_attempts", "next_attempt_at", "parent_id", "root_id", "group_id",
                "created_at", "concurrency_key", "concurrency_limit", "rate_key",
                "rate_limit")


def key_holder(unique_key: str) -> TaskRecord | None:
    """The unfinished row that holds ``unique_key``, if any (read in the current transaction).

    Served by the index that enforces the key: the partial unique index, or on MySQL and
    MariaDB the generated column's, which also compares the key byte for byte as the other
    databases do.
    """
    rows = TaskRecord.objects.filter(state__in=KEY_HOLDING_STATES)
    connection = connections[router.db_for_read(TaskRecord)]
    if connection.vendor == "mysql":
        live = RawSQL(connection.ops.quote_name(LIVE_KEY_COLUMN), (), output_field=CharField())
        rows = rows.alias(live_key=live).filter(live_key=unique_key)
    else:
        rows = rows.filter(unique_key=unique_key)
    return rows.first()


def record_ignored(task_id: str, claimed: Claim, exc: BaseException) -> bool:
    """REVOKED, from this attempt's STARTED only: the body raised Celery's ``Ignore`` (it
    chose not to finish; Celery stores no result). The error names it."""
    return _finish(task_id, claimed, TaskState.REVOKED, exc)


def record_rejected(task_id: str, claimed: Claim, exc: BaseException, requeue: bool) -> bool:
    """The body raised Celery's ``Reject``: with ``requeue``, RETRY at once (the broker
    delivers the message again, or the sweeper publishes it after the grace if it does not);
    without, FAILURE."""
    if not requeue:
        return _finish(task_id, claimed, TaskState.FAILURE, exc)
    due = timezone.now() + timedelta(seconds=app_settings.PUBLISH_GRACE)
    return record_retry(task_id, claimed, exc, due)


def _finish(task_id: str, claimed: Claim, state: TaskState, exc: BaseException,
            tb: str | None = None) -> bool:
    now = timezone.now()
    load_attempt(task_id, claimed)
    errors = _error_fields(exc, tb)
    entry = _history_entry(claimed, state, now,
                           f"{errors['error_type']}: {errors['error_message']}")
    return _held_by(task_id, claimed).transition(
        (TaskState.STARTED,),
        state=state, finished_at=now, lease_expires_at=None, next_attempt_at=None,
        history=_bounded(claimed.history, entry), **errors,
    ) == 1 or _already(task_id, claimed, state)


def record_time_limit(task_id: str, *, worker: str, exc: BaseException, tb: str,
                      retry_delay: Callable[[int, int | None], float | None]) -> bool:
    """A hard time limit killed the attempt ``worker`` was running: RETRY after
    ``retry_delay(attempt, row's max_attempts)`` seconds, or FAILURE when that is None.

    Written by the worker's main process, which does not know the claim's start time: the
    write names the row by id, worker and the attempt it read, from STARTED only.
    """
    row = (TaskRecord.objects.filter(id=task_id, state=TaskState.STARTED, worker=worker)
           .values("attempts", "max_attempts", "history", "started_at").first())
    if row is None:
        return False
    now = timezone.now()
    attempt = Claim(won=True, worker=worker, started_at=row["started_at"],
                    attempt=row["attempts"], history=list(row["history"] or []))
    errors = _error_fields(exc, tb or None)
    delay = retry_delay(row["attempts"], row["max_attempts"])
    state = TaskState.FAILURE if delay is None else TaskState.RETRY
    ending = ({"finished_at": now, "next_attempt_at": None} if delay is None
              else {"next_attempt_at": now + timedelta(seconds=delay)})
    entry = _history_entry(attempt, state, now,
                           f"{errors['error_type']}: {errors['error_message']}")
    return TaskRecord.objects.filter(
        id=task_id, worker=worker, attempts=row["attempts"], started_at=row["started_at"],
    ).transition((TaskState.STARTED,), state=state, lease_expires_at=None,
                 history=_bounded(attempt.history, entry), **errors, **ending) == 1


def record_revoked(task_id: str, *, expired: bool) -> bool:
    """REVOKED (or EXPIRED) from any state in which the task has not finished."""
    now = timezone.now()
    if expired:
        from_states: tuple[TaskState, ...] = (TaskState.PENDING, TaskState.QUEUED,
                                              TaskState.RETRY, TaskState.WAITING)
        new_state = TaskState.EXPIRED
    else:
        from_states = (TaskState.PENDING, TaskState.QUEUED, TaskState.RETRY, TaskState.STARTED,
                       TaskState.WAITING)
        new_state = TaskState.REVOKED
    return TaskRecord.objects.filter(id=task_id).transition(
        from_states, state=new_state, finished_at=now, lease_expires_at=None) == 1


def retry(record_or_id: TaskRecord | UUID | str, *, by: Any = None,
          force: bool = False) -> TaskRecord:
    """Manually retry a task: back to PENDING with a fresh attempt budget, published on commit.

    Allowed from FAILURE, LOST, REVOKED and EXPIRED, and from SUCCESS when ``force`` is set;
    raises ``RetryNotAllowed`` from any other state, and while another unfinished task holds
    the row's ``unique_key``. ``by`` (a user) is recorded in the row's
    history and, for a user, in Django's admin log.
    """
    from reliable_tasks.outbox import publish_on_commit

    record_id = record_or_id.pk if isinstance(record_or_id, TaskRecord) else record_or_id
    allowed = set(MANUALLY_RETRYABLE_STATES) | ({TaskState.SUCCESS} if force else set())
    with transaction.atomic():
        record = TaskRecord.objects.select_for_update().get(pk=record_id)
        if record.state not in allowed:
            hint = " (pass force=True to re-run a successful task)" if (
                record.state == TaskState.SUCCESS) else ""
            raise RetryNotAllowed(
                f"Task {record.task_name}[{record.pk}] is {record.state}: it can be retried "
                f"only from {', '.join(sorted(allowed))}{hint}")
        now = timezone.now()
        budget = _fresh_budget(record)
        entry = {"manual_retry": True, "from_state": record.state, "at": now.isoformat(),
                 "by": str(by) if by is not None else None, "budget": budget}
        previous_state = record.state
        try:
            with transaction.atomic():  # a savepoint: a key conflict leaves the rest intact
                changed = TaskRecord.objects.filter(pk=record.pk).transition(
                    (previous_state,),
                    state=TaskState.PENDING, max_attempts=record.attempts + budget,
                    finished_at=None, lease_expires_at=None, worker="", started_at=None,
                    next_attempt_at=now + timedelta(seconds=app_settings.PUBLISH_GRACE),
                    eta=None, expires_at=None, publish_error="", waiting_for="",
                    history=_bounded(list(record.history or []), entry),
                )
        except IntegrityError:
            holder = key_holder(record.unique_key) if record.unique_key else None
            if holder is None:
                raise
            raise RetryNotAllowed(
                f"Task {record.task_name}[{record.pk}] cannot be retried while "
                f"{holder.task_name}[{holder.pk}] ({holder.state}) holds its unique key "
                f"{record.unique_key!r}: retry it once that task has finished") from None
        if changed != 1:
            raise RetryNotAllowed(f"Task {record.pk} changed state meanwhile; try again")
        record.refresh_from_db()
        _audit_manual_retry(record, by, previous_state)
        publish_on_commit([record])
    return record


def _fresh_budget(record: TaskRecord) -> int:
    """The attempts a manual retry gives: those the task was dispatched with.

    After a manual retry the row's ``max_attempts`` counts the attempts made before it too,
    so the budget is read from the last retry's history entry (or, where the bounded history
    no longer holds it, is the task's own).
    """
    retries = [entry for entry in record.history or [] if entry.get("manual_retry")]
    if not retries:
        return record.max_attempts or _task_max_attempts(record.task_name)
    return int(retries[-1].get("budget") or _task_max_attempts(record.task_name))


def _task_max_attempts(task_name: str) -> int:
    from reliable_tasks.celery_app import find_task, get_celery_app

    task = find_task(get_celery_app(), task_name)
    value = getattr(task, "max_attempts", None)
    return int(value) if value else app_settings.MAX_ATTEMPTS


def _audit_manual_retry(record: TaskRecord, by: Any, previous_state: str) -> None:
    from django.contrib.admin.models import CHANGE, LogEntry
    from django.contrib.auth.models import AbstractBaseUser
    from django.contrib.contenttypes.models import ContentType

    if not isinstance(by, AbstractBaseUser):
        return
    LogEntry.objects.create(
        user_id=by.pk,
        content_type_id=ContentType.objects.get_for_model(TaskRecord).pk,
        object_id=str(record.pk),
        object_repr=str(record)[:200],
        action_flag=CHANGE,
        change_message=f"Retried manually from {previous_state}.",
    )
