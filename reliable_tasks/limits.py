"""Concurrency and rate limits, enforced by the ledger at the claim.

A limited row names its ``concurrency_key`` (with ``concurrency_limit``) and/or its
``rate_key`` (with ``rate_limit``, ``"100/m"``). Its claim is one short transaction that first
locks the key's ``TaskLimiter`` row, so that the claims of one key take turns on every
database, then decides:

- **Concurrency**: the claim wins while fewer than the limit rows of the key are STARTED,
  counting as taken the slots promised to older rows that waited (woken, not yet started), so
  waiting rows start in dispatch order. A refused delivery turns its row WAITING (no message
  left in the broker). When a limited run ends, its worker wakes the oldest waiting rows that
  fit the free slots (``wake``): WAITING -> PENDING, published at once. A dead worker's row
  counts until the sweeper ends its lease, which then wakes the waiters too.
- **Rate**: a GCRA bucket of burst one (the pacing of Celery's own per-worker ``rate_limit``):
  a start is allowed one interval (period / count) after the previous one, by the database's
  clock, so that no window of one period holds more than count starts. A refused delivery is
  promised the next free start (``reserved_until``), turns WAITING and is sent again with that
  countdown (or, further ahead than ``DELAY_THRESHOLD``, by the sweeper when due).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from django.db import connections, router, transaction
from django.db.models import F, Q
from django.utils import timezone

from reliable_tasks.clock import database_now
from reliable_tasks.conf import app_settings
from reliable_tasks.exceptions import DispatchError
from reliable_tasks.models import (
    RATE_LIMIT_MAX_LENGTH,
    UNIQUE_KEY_MAX_LENGTH,
    TaskLimiter,
    TaskRecord,
    WaitReason,
)
from reliable_tasks.states import CLAIMABLE_STATES, TaskState

_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*([smhd])\s*$")
#: Prefixes of a key's ``TaskLimiter`` row: a concurrency key and a rate key of the same
#: name are different limits.
CONCURRENCY_PREFIX = "c:"
RATE_PREFIX = "r:"
#: The message header of a row with limits (``request.reliable_limited`` on the worker).
LIMITED_HEADER = "reliable_limited"
#: States of a woken row (its slot is promised until it starts).
_WOKEN_STATES = (TaskState.PENDING, TaskState.QUEUED)


@dataclass(frozen=True)
class Rate:
    """A rate limit: ``count`` starts per ``period`` seconds."""

    count: int
    period: float

    @property
    def interval(self) -> timedelta:
        """The spacing of starts."""
        return timedelta(seconds=self.period / self.count)


def parse_rate(value: str) -> Rate:
    """``"100/m"`` (also ``/s``, ``/h``, ``/d``, and ``"5/30s"``) as a ``Rate``; raise
    ``DispatchError`` for anything else."""
    found = _RATE.match(value) if isinstance(value, str) else None
    count = int(found.group(1)) if found else 0
    multiple = float(found.group(2) or 1) if found else 0.0
    if not found or count < 1 or multiple <= 0 or len(value) > RATE_LIMIT_MAX_LENGTH:
        raise DispatchError(
            f"rate_limit must be a count per period such as '100/m', '10/s', '5/h' or "
            f"'20/30s' (a positive count), not {value!r}")
    return Rate(count, multiple * _PERIODS[found.group(3)])


# -- the options of a call -----------------------------------------------------------------


def task_default(task_type: Any, attribute: str) -> Any:
    """A ``ReliableTask`` attribute as set on the class, never bound to the task: a function
    given as a task option (``@shared_task(unique_key=lambda args, kwargs: ...)``) becomes a
    class attribute, which plain attribute access would turn into a method."""
    value = inspect.getattr_static(task_type, attribute, None)
    return value.__func__ if isinstance(value, staticmethod) else value


def _key(value: Any, source: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    if callable(value):
        value, source = value(tuple(args), dict(kwargs)), f"{source}(args, kwargs)"
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise DispatchError(f"{source} must be a non-empty string or None, not {value!r}")
    if len(value) > UNIQUE_KEY_MAX_LENGTH:
        raise DispatchError(f"{source} is {len(value)} characters long, more than the "
                            f"ledger's {UNIQUE_KEY_MAX_LENGTH}: {value[:40]!r}...")
    return value


def call_limits(task_type: Any, name: str, args: Sequence[Any], kwargs: Mapping[str, Any],
                options: Mapping[str, Any]) -> dict[str, Any]:
    """The limit columns of a call: its options, else the task's attributes
    (``concurrency_key``, ``concurrency_limit``, ``global_rate_limit``, ``rate_key``; keys may
    be functions of args and kwargs); raise ``DispatchError`` for a limit the ledger cannot
    enforce. A limit without a key limits the task by its name."""
    def pick(option: str, attribute: str) -> tuple[Any, str]:
        if option in options:
            return options[option], option
        return task_default(task_type, attribute), f"{name}.{attribute}"

    limit, limit_source = pick("concurrency_limit", "concurrency_limit")
    key, key_source = pick("concurrency_key", "concurrency_key")
    rate, rate_source = pick("rate_limit", "global_rate_limit")
    rate_key, rate_key_source = pick("rate_key", "rate_key")
    columns: dict[str, Any] = {"concurrency_key": None, "concurrency_limit": None,
                               "rate_key": None, "rate_limit": ""}
    concurrency_key = _key(key, key_source, args, kwargs)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise DispatchError(f"{limit_source} must be a positive integer, not {limit!r}")
        columns.update(concurrency_key=concurrency_key or name, concurrency_limit=limit)
    elif concurrency_key is not None:
        raise DispatchError(f"{key_source} needs a concurrency_limit (how many tasks with the "
                            f"key may run at once)")
    keyed_rate = _key(rate_key, rate_key_source, args, kwargs)
    if rate is not None:
        parse_rate(rate)
        columns.update(rate_key=keyed_rate or name, rate_limit="".join(rate.split()))
    elif keyed_rate is not None:
        raise DispatchError(f"{rate_key_source} needs a rate_limit (such as '100/m')")
    return columns


# -- the claim ---------------------------------------------------------------------------


@dataclass
class Decision:
    """What the limited claim decided: won, or deferred (``waiting_for``) until ``due``
    (a rate deferral; None for a concurrency one, woken when a slot frees), or neither
    (the row was not claimable: the caller says why)."""

    won: bool = False
    waiting_for: str = ""
    due: datetime | None = None
    reason: str = ""


def _alias() -> str:
    return router.db_for_write(TaskRecord)


def lock_key(alias: str, key: str) -> None:
    """Lock ``key`` (a prefixed key) until the transaction ends.

    PostgreSQL: an advisory lock of the key's hash (no write; two keys of one hash merely
    take turns), the lock migration 0010's claim function takes too. Elsewhere the key's
    ``TaskLimiter`` row, made if new: a write, which also takes SQLite's one write lock.
    """
    connection = connections[alias]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [key])
        return
    table = connection.ops.quote_name(TaskLimiter._meta.db_table)
    column = connection.ops.quote_name("key")
    if connection.vendor == "mysql":
        sql = (f"INSERT INTO {table} ({column}) VALUES (%s) "
               f"ON DUPLICATE KEY UPDATE {column} = {column}")
    else:
        sql = (f"INSERT INTO {table} ({column}) VALUES (%s) "
               f"ON CONFLICT ({column}) DO UPDATE SET {column} = excluded.{column}")
    with connection.cursor() as cursor:
        cursor.execute(sql, [key])


def _bucket(alias: str, key: str) -> dict[str, Any]:
    """The rate bucket of ``key`` (a prefixed key, locked by ``lock_key``), made if new."""
    bucket, _created = TaskLimiter.objects.using(alias).get_or_create(key=key)
    return {"allowed_at": bucket.allowed_at, "reserved_until": bucket.reserved_until}


@lru_cache(maxsize=8)
def _claim_sql(alias: str, counted: bool) -> str:
    """The limited claim: STARTED from a claimable state, while the key has a free slot
    (``counted``: the running and promised slots are counted in the statement)."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    table = quote(TaskRecord._meta.db_table)
    states = ", ".join(["%s"] * len(CLAIMABLE_STATES))
    slots = (f" AND ({slots_taken_sql(alias)}) < %s" if counted else "")
    return (f"UPDATE {table} SET {quote('state')} = %s, {quote('attempts')} = "
            f"{quote('attempts')} + 1, {quote('worker')} = %s, {quote('started_at')} = %s, "
            f"{quote('lease_expires_at')} = %s, {quote('next_attempt_at')} = NULL, "
            f"{quote('waiting_for')} = '' "
            f"WHERE {quote('id')} = %s AND {quote('task_name')} = %s "
            f"AND {quote('state')} IN ({states}) "
            f"AND ({quote('expires_at')} IS NULL OR {quote('expires_at')} >= %s){slots}")


def slots_taken_sql(alias: str, row: str | None = None) -> str:
    """SQL counting the slots of a concurrency key taken for a row: the key's STARTED rows and
    the rows that waited before it (older in dispatch order) and were woken or wait still.
    Parameters: the key twice, the row's created_at twice and its id; or none, with ``row``
    (the quoted name of the table being updated, in a correlated subquery), whose columns are
    the row's.

    Two counts, each answered by an index: ``rt_task_concurrency`` (key, state) for the
    running rows, ``rt_task_waiters`` for the others (partial where the database has them: the
    rows that waited, by key and age; on MySQL and MariaDB by key, state, reason and age).
    SQLite, without statistics, would count the waiters through the first (reading every
    PENDING row of the key): there the second is named (``INDEXED BY``).
    """
    connection = connections[alias]
    quote = connection.ops.quote_name
    table = quote(TaskRecord._meta.db_table)
    waiters_index = (f" INDEXED BY {quote('rt_task_waiters')}"
                     if connection.vendor == "sqlite" else "")
    key_column, state, waiting, created_column, pk_column = (quote(name) for name in (
        "concurrency_key", "state", "waiting_for", "created_at", "id"))
    key, created, pk = ((f"{row}.{key_column}", f"{row}.{created_column}", f"{row}.{pk_column}")
                        if row else ("%s", "%s", "%s"))
    waiters = ", ".join(f"'{state_}'" for state_ in (TaskState.WAITING, *_WOKEN_STATES))
    running = (f"SELECT COUNT(*) FROM {table} other WHERE other.{key_column} = {key} "
               f"AND other.{state} = '{TaskState.STARTED.value}'")
    ahead = (f"SELECT COUNT(*) FROM {table} other{waiters_index} "
             f"WHERE other.{key_column} = {key} "
             f"AND other.{waiting} = '{WaitReason.CONCURRENCY.value}' "
             f"AND other.{state} IN ({waiters}) "
             f"AND (other.{created_column} < {created} OR (other.{created_column} = {created} "
             f"AND other.{pk_column} < {pk}))")
    return f"({running}) + ({ahead})"


def _claim_update(alias: str, row: Mapping[str, Any], *, worker: str, started_at: datetime,
                  lease_until: datetime, now: datetime, limit: int | None) -> int:
    """Run the limited claim UPDATE (``limit``: the concurrency limit to respect, or None).

    On MySQL and MariaDB, which refuse an UPDATE reading its own table, the slots are counted
    first; the key's lock keeps the count true until the transaction ends.
    """
    connection = connections[alias]
    ops = connection.ops
    pk = TaskRecord._meta.pk
    assert pk is not None
    task_id = pk.get_db_prep_value(row["id"], connection)
    slot_params: list[Any] = []
    if limit is not None:
        slot_params = [row["concurrency_key"], row["concurrency_key"],
                       ops.adapt_datetimefield_value(row["created_at"]),
                       ops.adapt_datetimefield_value(row["created_at"]), task_id]
    counted = limit is not None and connection.vendor != "mysql"
    if limit is not None and not counted:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {slots_taken_sql(alias)}", slot_params)
            if int(cursor.fetchone()[0]) >= limit:
                return 0
    params = [TaskState.STARTED.value, worker, ops.adapt_datetimefield_value(started_at),
              ops.adapt_datetimefield_value(lease_until), task_id, row["task_name"],
              *(state.value for state in CLAIMABLE_STATES), ops.adapt_datetimefield_value(now)]
    if counted:
        params += [*slot_params, limit]
    with connection.cursor() as cursor:
        cursor.execute(_claim_sql(alias, counted), params)
        return int(cursor.rowcount)


def claim(row: Mapping[str, Any], *, worker: str, started_at: datetime, lease_seconds: float,
          enforce: bool = True) -> Decision:
    """Claim the limited ``row`` (its id, task_name, created_at, state, waiting_for and limit
    columns, as read by the caller) for ``worker``, or defer it.

    One transaction: lock the keys' rows (concurrency first, then rate: one order for every
    claim), then claim within the limits, or turn the row WAITING with the reason. Without
    ``enforce`` (eager runs) the row is claimed whatever the limits say.
    """
    alias = _alias()
    concurrency_key, rate_key = row["concurrency_key"], row["rate_key"]
    limit = row["concurrency_limit"] if enforce and concurrency_key else None
    rate = parse_rate(row["rate_limit"]) if enforce and rate_key and row["rate_limit"] else None
    with transaction.atomic(using=alias):
        if limit is not None:
            lock_key(alias, CONCURRENCY_PREFIX + concurrency_key)
        bucket: dict[str, Any] | None = None
        if rate is not None:
            lock_key(alias, RATE_PREFIX + rate_key)
            bucket = _bucket(alias, RATE_PREFIX + rate_key)
        now = database_now(alias)
        if bucket is not None and rate is not None:
            refused = _rate_refusal(row, bucket, now)
            if refused is not None:
                return _defer_for_rate(alias, row, rate, bucket, now, refused)
        lease_until = now + timedelta(seconds=lease_seconds)
        if _claim_update(alias, row, worker=worker, started_at=started_at,
                         lease_until=lease_until, now=now, limit=limit):
            if bucket is not None and rate is not None:
                TaskLimiter.objects.using(alias).filter(key=RATE_PREFIX + rate_key).update(
                    allowed_at=now + rate.interval)
            return Decision(won=True)
        if limit is None or row["state"] not in CLAIMABLE_STATES:
            return Decision(reason="not claimable")
        changed = TaskRecord.objects.using(alias).filter(id=row["id"]).transition(
            CLAIMABLE_STATES,
            state=TaskState.WAITING, waiting_for=WaitReason.CONCURRENCY, next_attempt_at=None,
            deferrals=F("deferrals") + 1)
        if not changed:
            return Decision(reason="not claimable")
        return Decision(waiting_for=WaitReason.CONCURRENCY)


def _rate_refusal(row: Mapping[str, Any], bucket: Mapping[str, Any],
                  now: datetime) -> datetime | None:
    """When the next start of the rate key is allowed, if not now.

    A row promised a start (it waited for the rate) starts as soon as the bucket allows;
    another waits behind the promises too (``reserved_until``), so promised rows go first.
    """
    allowed_at = bucket["allowed_at"]
    if allowed_at is not None and allowed_at > now:
        return allowed_at
    promised = row["waiting_for"] == WaitReason.RATE
    reserved_until = bucket["reserved_until"]
    if not promised and reserved_until is not None and reserved_until > now:
        return reserved_until
    return None


def _defer_for_rate(alias: str, row: Mapping[str, Any], rate: Rate,
                    bucket: Mapping[str, Any], now: datetime, allowed_at: datetime) -> Decision:
    """WAITING for the rate: a new waiter is promised the next free start (the bucket's
    ``reserved_until`` moves one interval on); a promised one waits for the bucket. The row's
    ``eta`` is that start, ``next_attempt_at`` when the sweeper publishes it if no copy
    came (the copy sent now has the start as its countdown)."""
    due = allowed_at
    if row["waiting_for"] != WaitReason.RATE:
        due = max(allowed_at, bucket["reserved_until"] or now, now)
        TaskLimiter.objects.using(alias).filter(key=RATE_PREFIX + row["rate_key"]).update(
            reserved_until=due + rate.interval)
    resent = (due - now).total_seconds() <= app_settings.DELAY_THRESHOLD
    sweeper_due = due + timedelta(seconds=app_settings.PUBLISH_GRACE) if resent else due
    changed = TaskRecord.objects.using(alias).filter(id=row["id"]).transition(
        CLAIMABLE_STATES,
        state=TaskState.WAITING, waiting_for=WaitReason.RATE, next_attempt_at=sweeper_due,
        eta=due, deferrals=F("deferrals") + 1)
    if not changed:
        return Decision(reason="not claimable")
    return Decision(waiting_for=WaitReason.RATE, due=due if resent else None)


# -- waking waiters ----------------------------------------------------------------------


def wake(concurrency_key: str) -> list[TaskRecord]:
    """Wake the oldest WAITING rows of ``concurrency_key`` that fit its free slots
    (WAITING -> PENDING) and return them, for the caller to publish (``publish_records``).

    Takes the key's lock, so a claim deferring a row meanwhile is either seen here or sees the
    slot free. The limit is the oldest waiter's. Every limited run ends with this call, and
    mostly no row waits: on PostgreSQL it is one statement (migration 0010's function
    ``rt_wake_concurrency_waiters``), on SQLite (3.35+) one ``UPDATE``, on MySQL and MariaDB
    one call of migration 0011's ``rt_free_slots_for_waiters`` when nothing is to wake.
    """
    alias = _alias()
    connection = connections[alias]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT rt_wake_concurrency_waiters(%s, %s)",
                           [concurrency_key, float(app_settings.PUBLISH_GRACE)])
            ids = [row[0] for row in cursor.fetchall()]
    elif sqlite_returns_rows(connection):
        due = timezone.now() + timedelta(seconds=app_settings.PUBLISH_GRACE)
        with connection.cursor() as cursor:
            cursor.execute(_sqlite_wake_sql(alias), [
                connection.ops.adapt_datetimefield_value(due), *[concurrency_key] * 4])
            ids = [row[0] for row in cursor.fetchall()]
    elif connection.vendor == "mysql" and not _free_slots_for_waiters(alias, concurrency_key):
        return []
    else:
        ids = _wake_in_transaction(alias, concurrency_key)
    return list(TaskRecord.objects.using(alias).filter(id__in=ids)) if ids else []


def sqlite_returns_rows(connection: Any) -> bool:
    """Whether ``connection`` is SQLite with ``UPDATE ... RETURNING`` (3.35 and newer; Django
    supports 3.31 on): the one-statement claim and wake-up need it."""
    return bool(connection.vendor == "sqlite"
                and connection.features.can_return_columns_from_insert)


def _free_slots_for_waiters(alias: str, concurrency_key: str) -> int:
    """MySQL and MariaDB: the slots of ``concurrency_key`` free for its WAITING rows, under
    its lock (0 when none waits), in one call of ``rt_free_slots_for_waiters``."""
    with connections[alias].cursor() as cursor:
        cursor.execute("CALL rt_free_slots_for_waiters(%s)", [concurrency_key])
        free = int(cursor.fetchone()[0])
        while cursor.nextset():  # the CALL's own status comes after the result
            pass
    return free


def _wake_in_transaction(alias: str, concurrency_key: str) -> list[Any]:
    """``wake`` as a transaction of several statements; returns the ids woken."""
    with transaction.atomic(using=alias):
        lock_key(alias, CONCURRENCY_PREFIX + concurrency_key)
        waiting = TaskRecord.objects.using(alias).filter(
            concurrency_key=concurrency_key, state=TaskState.WAITING,
            waiting_for=WaitReason.CONCURRENCY).order_by("created_at", "id")
        head = waiting.values("concurrency_limit").first()
        if head is None:
            return []
        taken = TaskRecord.objects.using(alias).filter(concurrency_key=concurrency_key).filter(
            Q(state=TaskState.STARTED)
            | Q(state__in=_WOKEN_STATES, waiting_for=WaitReason.CONCURRENCY)).count()
        free = int(head["concurrency_limit"] or 1) - taken
        if free <= 0:
            return []
        ids = list(waiting.values_list("id", flat=True)[:free])
        due = database_now(alias) + timedelta(seconds=app_settings.PUBLISH_GRACE)
        TaskRecord.objects.using(alias).filter(id__in=ids).transition(
            (TaskState.WAITING,), state=TaskState.PENDING, next_attempt_at=due)
        return list(TaskRecord.objects.using(alias).filter(
            id__in=ids, state=TaskState.PENDING).values_list("id", flat=True))


@lru_cache(maxsize=4)
def _sqlite_wake_sql(alias: str) -> str:
    """SQLite: ``wake`` as one ``UPDATE ... RETURNING``, which holds SQLite's one write lock
    (every key's lock) from its first read. Parameters: the due time, then the key four
    times."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    table = quote(TaskRecord._meta.db_table)
    key, state, waiting, created, pk, limit, next_attempt = (quote(name) for name in (
        "concurrency_key", "state", "waiting_for", "created_at", "id", "concurrency_limit",
        "next_attempt_at"))
    waiters = f"{table} waiter INDEXED BY {quote('rt_task_waiters')}"
    reason = f"'{WaitReason.CONCURRENCY.value}'"
    woken = ", ".join(f"'{state_}'" for state_ in _WOKEN_STATES)
    head_limit = (f"SELECT waiter.{limit} FROM {waiters} WHERE waiter.{key} = %s "
                  f"AND waiter.{waiting} = {reason} AND waiter.{state} = 'WAITING' "
                  f"ORDER BY waiter.{created}, waiter.{pk} LIMIT 1")
    free = (f"MAX(0, COALESCE(({head_limit}), 1) "
            f"- (SELECT COUNT(*) FROM {table} other WHERE other.{key} = %s "
            f"AND other.{state} = '{TaskState.STARTED.value}') "
            f"- (SELECT COUNT(*) FROM {waiters} WHERE waiter.{key} = %s "
            f"AND waiter.{waiting} = {reason} AND waiter.{state} IN ({woken})))")
    return (f"UPDATE {table} SET {state} = '{TaskState.PENDING.value}', {next_attempt} = %s "
            f"WHERE {state} = '{TaskState.WAITING.value}' AND {pk} IN ("
            f"SELECT waiter.{pk} FROM {waiters} WHERE waiter.{key} = %s "
            f"AND waiter.{waiting} = {reason} AND waiter.{state} = 'WAITING' "
            f"ORDER BY waiter.{created}, waiter.{pk} LIMIT {free}) RETURNING {pk}")


def waiting_concurrency_keys(limit: int) -> list[str]:
    """Concurrency keys with WAITING rows (at most ``limit``), for the sweeper's wake-up."""
    keys = TaskRecord.objects.filter(
        state=TaskState.WAITING, waiting_for=WaitReason.CONCURRENCY,
        concurrency_key__isnull=False).order_by().values_list(
        "concurrency_key", flat=True).distinct()[:limit]
    return [key for key in keys if key is not None]


def wake_due_rate_waiters(now: datetime, limit: int) -> int:
    """Rows WAITING for a rate whose start is due and whose copy did not arrive (or that were
    held in the database): back to PENDING, due now, for the sweeper's publish step."""
    ids = list(TaskRecord.objects.filter(
        state=TaskState.WAITING, waiting_for=WaitReason.RATE, next_attempt_at__lte=now,
    ).order_by("next_attempt_at").values_list("id", flat=True)[:limit])
    if not ids:
        return 0
    return TaskRecord.objects.filter(id__in=ids).transition(
        (TaskState.WAITING,), state=TaskState.PENDING, next_attempt_at=now)
