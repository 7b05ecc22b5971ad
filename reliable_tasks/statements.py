"""The ledger's hot statements as hand-written SQL: the claim, the success, the QUEUED mark and
the bulk INSERT of new rows.

Every task run costs a claim and an outcome, and every dispatch a mark once published. Built
through the ORM, each of these UPDATEs spends about a millisecond compiling (lookups,
expressions, query clones) on top of its round trip: more than the statement itself. Here each
is written once per connection, quoted and with its values adapted by Django's own backend
operations, so the caller pays only the round trip. They mean exactly what the ORM versions
meant; the ledger and outbox tests exercise them on every database.

``bulk_create`` spends more time preparing each value of each row in Python than PostgreSQL
spends inserting them; ``insert_records`` sends one array per column there instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from django.db import connections, models, router, transaction
from django.utils import timezone

from reliable_tasks import limits
from reliable_tasks.clock import later_sql, now_sql
from reliable_tasks.models import TaskLimiter, TaskRecord, WaitReason
from reliable_tasks.states import CLAIMABLE_STATES, TaskState

#: States a successful run may finish from (its own STARTED, or a row a sweeper moved on
#: meanwhile while this attempt still held it).
SUCCESS_FROM_STATES = (TaskState.STARTED, TaskState.RETRY, TaskState.LOST, TaskState.QUEUED)


def _alias() -> str:
    return router.db_for_write(TaskRecord)


def _quoted(alias: str, *fields: str) -> list[str]:
    """The ledger's table name, then the column of each of ``fields``, quoted for ``alias``."""
    quote = connections[alias].ops.quote_name
    found: list[Any] = [TaskRecord._meta.get_field(name) for name in fields]
    return [quote(TaskRecord._meta.db_table), *(quote(str(field.column)) for field in found)]


@lru_cache(maxsize=8)
def _claim_sql(alias: str) -> str:
    (table, state, attempts, worker, started, lease, next_attempt, expires, pk, name,
     concurrency_key, rate_key) = _quoted(
        alias, "state", "attempts", "worker", "started_at", "lease_expires_at",
        "next_attempt_at", "expires_at", "id", "task_name", "concurrency_key", "rate_key")
    states = ", ".join(["%s"] * len(CLAIMABLE_STATES))
    # The lease and the expiry are the database's time: another host compares them. A row
    # with a limit is claimed by ``limits.claim`` instead.
    return (f"UPDATE {table} SET {state} = %s, {attempts} = {attempts} + 1, {worker} = %s, "
            f"{started} = %s, {lease} = {later_sql(0, alias)[0]}, {next_attempt} = NULL "
            f"WHERE {pk} = %s AND {name} = %s AND {state} IN ({states}) "
            f"AND ({expires} IS NULL OR {expires} >= {now_sql(alias)[0]}) "
            f"AND {concurrency_key} IS NULL AND {rate_key} IS NULL")


@lru_cache(maxsize=8)
def _success_sql(alias: str) -> str:
    table, state, finished, lease, next_attempt, pk, worker, started = _quoted(
        alias, "state", "finished_at", "lease_expires_at", "next_attempt_at", "id", "worker",
        "started_at")
    states = ", ".join(["%s"] * len(SUCCESS_FROM_STATES))
    return (f"UPDATE {table} SET {state} = %s, {finished} = %s, {lease} = NULL, "
            f"{next_attempt} = NULL "
            f"WHERE {pk} = %s AND {worker} = %s AND {started} = %s AND {state} IN ({states})")


@lru_cache(maxsize=64)
def _queued_sql(alias: str, count: int) -> str:
    table, state, published, next_attempt, publishes, error, pk, attempts = _quoted(
        alias, "state", "published_at", "next_attempt_at", "publish_attempts", "publish_error",
        "id", "attempts")
    ids = ", ".join(["%s"] * count)
    # published_at is the database's time: the requeue after a broker loss compares it.
    return (f"UPDATE {table} SET {state} = %s, {published} = {now_sql(alias)[0]}, "
            f"{next_attempt} = NULL, "
            f"{publishes} = {publishes} + 1, {error} = '' "
            f"WHERE {pk} IN ({ids}) "
            f"AND CASE WHEN {state} IN (%s, %s) AND {attempts} = %s THEN 1 ELSE 0 END = 1")


def _execute(sql: str, params: Iterable[Any], alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, list(params))
        return int(cursor.rowcount)


def _id(task_id: str, alias: str) -> Any:
    pk_field: Any = TaskRecord._meta.pk
    return pk_field.get_db_prep_value(task_id, connections[alias])


def _moment(value: datetime, alias: str) -> Any:
    return connections[alias].ops.adapt_datetimefield_value(value)


def claim(task_id: str, *, task_name: str, worker: str, started_at: datetime,
          lease_seconds: float) -> int:
    """STARTED for ``worker`` from a claimable state, if the task has not expired, the row
    is still of ``task_name`` (a replacement may have taken it over) and it has no limit.

    ``started_at`` is the claim's token (its outcome write names it); the lease runs for
    ``lease_seconds`` from the database's current time. Returns the number of rows changed
    (1: the claim won).
    """
    alias = _alias()
    return _execute(_claim_sql(alias), [
        TaskState.STARTED.value, worker, _moment(started_at, alias),
        *later_sql(lease_seconds, alias)[1],
        _id(task_id, alias), task_name, *(state.value for state in CLAIMABLE_STATES),
        *now_sql(alias)[1],
    ], alias)


def claims_within_limits_at_once(alias: str) -> bool:
    """Whether ``claim_within_limits`` can run on ``alias``: PostgreSQL, MySQL, MariaDB, and
    SQLite from 3.35 (``UPDATE ... RETURNING``)."""
    connection = connections[alias]
    return connection.vendor in ("postgresql", "mysql") or limits.sqlite_returns_rows(connection)


def claim_within_limits(task_id: str, *, task_name: str, worker: str, started_at: datetime,
                        lease_seconds: float) -> str | None:
    """``claim`` for a row with limits, when they let it start now (``limits.claim`` decides
    the same) without reading the row first: the function ``rt_claim_within_limits`` of
    migration 0010 on PostgreSQL (which keeps its plans, where the same SQL sent as a query
    would be planned on every claim), the procedure of migration 0011 on MySQL and MariaDB, one
    ``UPDATE`` on SQLite (``_claim_within_limits_on_sqlite``). Returns the row's concurrency
    key (``""`` without one) when it won, else None: the caller reads the row to decide (and
    defer)."""
    alias = _alias()
    connection = connections[alias]
    if connection.vendor == "sqlite":
        return _claim_within_limits_on_sqlite(alias, task_id, task_name=task_name, worker=worker,
                                              started_at=started_at, lease_seconds=lease_seconds)
    params = [_id(task_id, alias), task_name, worker, _moment(started_at, alias)]
    with connection.cursor() as cursor:
        if connection.vendor == "mysql":
            cursor.execute("CALL rt_claim_within_limits(%s, %s, %s, %s, %s)",
                           [*params, round(lease_seconds * 1_000_000)])
            found = cursor.fetchone()
            while cursor.nextset():  # the CALL's own status comes after the result
                pass
        else:
            cursor.execute("SELECT rt_claim_within_limits(%s, %s, %s, %s, %s)",
                           [*params, float(lease_seconds)])
            found = cursor.fetchone()
    return None if found is None or found[0] is None else str(found[0])


def _claim_within_limits_on_sqlite(alias: str, task_id: str, *, task_name: str, worker: str,
                                   started_at: datetime, lease_seconds: float) -> str | None:
    """SQLite: the claim within limits as one ``UPDATE`` that counts the key's slots and looks
    at the rate bucket itself, then, for a rate key, the bucket's next allowed start: one
    transaction. SQLite runs one writer at a time and an ``UPDATE`` holds the write lock from
    its first read, so the count it makes stays true until it commits (what the key's lock
    does elsewhere)."""
    connection = connections[alias]
    now = timezone.now()
    claimed_sql, bucket_sql = sqlite_limited_claim_sql(alias)
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        cursor.execute(claimed_sql, [
            TaskState.STARTED.value, worker, _moment(started_at, alias),
            _moment(now + timedelta(seconds=lease_seconds), alias), _id(task_id, alias),
            task_name, *(state.value for state in CLAIMABLE_STATES), _moment(now, alias),
            _moment(now, alias), _moment(now, alias)])
        found = cursor.fetchone()
        if found is None:
            return None
        concurrency_key, rate_key, rate_limit = found
        if rate_key is not None:
            allowed_at = now + limits.parse_rate(rate_limit).interval
            cursor.execute(bucket_sql, [limits.RATE_PREFIX + rate_key, _moment(allowed_at, alias)])
    return concurrency_key or ""


@lru_cache(maxsize=4)
def sqlite_limited_claim_sql(alias: str) -> tuple[str, str]:
    """The SQL of ``_claim_within_limits_on_sqlite``: the claim, and the bucket's upsert (for
    EXPLAIN in tests)."""
    quote = connections[alias].ops.quote_name
    table, state, attempts, worker, started, lease, next_attempt, waiting, pk, name, expires = (
        _quoted(alias, "state", "attempts", "worker", "started_at", "lease_expires_at",
                "next_attempt_at", "waiting_for", "id", "task_name", "expires_at"))
    key, limit, rate_key, rate_limit = _quoted(
        alias, "concurrency_key", "concurrency_limit", "rate_key", "rate_limit")[1:]
    limiter = quote(TaskLimiter._meta.db_table)
    states = ", ".join(["%s"] * len(CLAIMABLE_STATES))
    slots = limits.slots_taken_sql(alias, row=table)
    bucket_refuses = (
        f"SELECT 1 FROM {limiter} bucket WHERE bucket.{quote('key')} = "
        f"'{limits.RATE_PREFIX}' || {table}.{rate_key} AND (bucket.{quote('allowed_at')} > %s "
        f"OR ({table}.{waiting} <> '{WaitReason.RATE.value}' "
        f"AND bucket.{quote('reserved_until')} > %s))")
    claimed = (
        f"UPDATE {table} SET {state} = %s, {attempts} = {attempts} + 1, {worker} = %s, "
        f"{started} = %s, {lease} = %s, {next_attempt} = NULL, {waiting} = '' "
        f"WHERE {pk} = %s AND {name} = %s AND {state} IN ({states}) "
        f"AND ({expires} IS NULL OR {expires} >= %s) "
        f"AND ({key} IS NOT NULL OR {rate_key} IS NOT NULL) "
        f"AND ({key} IS NULL OR {slots} < {table}.{limit}) "
        f"AND ({rate_key} IS NULL OR NOT EXISTS ({bucket_refuses})) "
        f"RETURNING {key}, {rate_key}, {rate_limit}")
    bucket = (f"INSERT INTO {limiter} ({quote('key')}, {quote('allowed_at')}) VALUES (%s, %s) "
              f"ON CONFLICT ({quote('key')}) DO UPDATE SET "
              f"{quote('allowed_at')} = excluded.{quote('allowed_at')}")
    return claimed, bucket


def succeed(task_id: str, *, worker: str, started_at: datetime, now: datetime) -> int:
    """SUCCESS, if the claim of ``worker`` started at ``started_at`` still holds the row.

    Returns the number of rows changed.
    """
    alias = _alias()
    return _execute(_success_sql(alias), [
        TaskState.SUCCESS.value, _moment(now, alias), _id(task_id, alias), worker,
        _moment(started_at, alias), *(state.value for state in SUCCESS_FROM_STATES),
    ], alias)


def mark_queued(task_ids: list[Any], attempts: int) -> int:
    """QUEUED for published rows still PENDING or RETRY at ``attempts`` attempts, the count
    they had when they were published; returns the number of rows changed.

    Naming the attempt keeps a late mark off a row that a worker claimed and put back in RETRY
    meanwhile (its attempts went up): that RETRY waits for the sweeper, which a QUEUED row
    would never get. The state is compared inside a ``CASE``, so that the rows are found by
    their primary key and never through an index on ``state`` (``querysets.state_still_in``
    says why).
    """
    alias = _alias()
    return _execute(*queued_statement(task_ids, attempts, alias=alias), alias)


def queued_statement(task_ids: list[Any], attempts: int, *,
                     alias: str) -> tuple[str, list[Any]]:
    """The SQL and parameters of ``mark_queued`` on ``alias`` (for EXPLAIN in tests)."""
    return _queued_sql(alias, len(task_ids)), [
        TaskState.QUEUED.value, *now_sql(alias)[1], *(_id(str(pk), alias) for pk in task_ids),
        TaskState.PENDING.value, TaskState.RETRY.value, attempts,
    ]


#: Rows one INSERT writes at most.
INSERT_BATCH = 2000


@lru_cache(maxsize=8)
def _unnest_insert_sql(alias: str) -> str:
    """``INSERT ... SELECT * FROM UNNEST(column arrays)`` of every concrete field."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    fields = TaskRecord._meta.concrete_fields
    columns = ", ".join(quote(str(field.column)) for field in fields)
    arrays = ", ".join(f"%s::{field.db_type(connection)}[]" for field in fields)
    return (f"INSERT INTO {quote(TaskRecord._meta.db_table)} ({columns}) "
            f"SELECT * FROM UNNEST({arrays})")


def _column(field: Any, records: Sequence[TaskRecord]) -> list[Any]:
    """The values of ``field`` in ``records``, as PostgreSQL takes them (JSON as its text)."""
    values = [getattr(record, field.attname) for record in records]
    if isinstance(field, models.JSONField):
        return [None if value is None else json.dumps(value, cls=field.encoder)
                for value in values]
    return values


def insert_records(records: Sequence[TaskRecord]) -> None:
    """INSERT new ledger rows in batches, in the current transaction.

    On PostgreSQL each batch is one statement with one array per column: the values go as
    they are (UUIDs, aware datetimes, JSON text), which is what Django's PostgreSQL backend
    would send for them too. Elsewhere ``bulk_create``.
    """
    alias = _alias()
    connection = connections[alias]
    if connection.vendor != "postgresql":
        TaskRecord.objects.using(alias).bulk_create(records, batch_size=INSERT_BATCH)
        return
    sql = _unnest_insert_sql(alias)
    fields = TaskRecord._meta.concrete_fields
    with connection.cursor() as cursor:
        for start in range(0, len(records), INSERT_BATCH):
            batch = records[start:start + INSERT_BATCH]
            cursor.execute(sql, [_column(field, batch) for field in fields])
    for record in records:
        record._state.adding = False
        record._state.db = alias


@lru_cache(maxsize=32)
def _values_insert_skipping_conflicts_sql(alias: str, rows: int) -> str:
    """``INSERT ... VALUES`` of ``rows`` rows of every concrete field, skipping conflicts."""
    quote = connections[alias].ops.quote_name
    fields = TaskRecord._meta.concrete_fields
    columns = ", ".join(quote(str(field.column)) for field in fields)
    row = f"({', '.join(['%s'] * len(fields))})"
    return (f"INSERT INTO {quote(TaskRecord._meta.db_table)} ({columns}) VALUES "
            f"{', '.join([row] * rows)} ON CONFLICT DO NOTHING RETURNING {quote('id')}")


def inserts_skipping_conflicts(alias: str) -> bool:
    """Whether ``insert_records_skipping_conflicts`` can run on ``alias``: PostgreSQL, and
    SQLite from 3.35 (``RETURNING``). MySQL's nearest, ``INSERT IGNORE``, would also store
    values it truncated."""
    connection = connections[alias]
    return connection.vendor == "postgresql" or limits.sqlite_returns_rows(connection)


def insert_records_skipping_conflicts(records: Sequence[TaskRecord]) -> set[Any]:
    """INSERT new ledger rows (new ids) in batches, in the current transaction, skipping each
    row that a unique constraint refuses (an unfinished row holds its ``unique_key``, or an
    earlier row of the same call took it); returns the primary keys of the rows inserted.

    ``ON CONFLICT DO NOTHING``, which skips a row that breaks a uniqueness constraint and
    nothing else (a NOT NULL or CHECK error is still raised), and leaves the transaction usable:
    no savepoint is needed. PostgreSQL: ``insert_records``' statement with it (one row: plain
    ``VALUES``, which PostgreSQL plans faster than 45 arrays); SQLite: a multi-row ``VALUES``,
    as ``bulk_create`` sends.
    """
    alias = _alias()
    connection = connections[alias]
    fields = TaskRecord._meta.concrete_fields
    pk: Any = TaskRecord._meta.pk
    inserted: set[Any] = set()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql" and len(records) > 1:
            sql = f"{_unnest_insert_sql(alias)} ON CONFLICT DO NOTHING RETURNING id"
            for start in range(0, len(records), INSERT_BATCH):
                cursor.execute(sql, [_column(field, records[start:start + INSERT_BATCH])
                                     for field in fields])
                inserted.update(row[0] for row in cursor.fetchall())
        else:
            # As many rows per statement as ``bulk_create`` sends (SQLite's parameter limit).
            per_statement = max(1, connection.ops.bulk_batch_size(fields, records))
            for start in range(0, len(records), per_statement):
                batch = records[start:start + per_statement]
                cursor.execute(_values_insert_skipping_conflicts_sql(alias, len(batch)), [
                    field.get_db_prep_save(getattr(record, field.attname), connection)
                    for record in batch for field in fields])
                inserted.update(pk.to_python(row[0]) for row in cursor.fetchall())
    for record in records:
        record._state.adding = record.pk not in inserted
        record._state.db = alias
    return inserted
