"""The limited claim without reading the row first (``statements.claim_within_limits``):
PostgreSQL's function (migration 0010), the MySQL and MariaDB procedure (migration 0011), one
``UPDATE`` on SQLite. When it cannot start the row, ``limits.claim`` decides: the rest of the
limits' behaviour is tested in ``tests/test_limits.py``, which goes through both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from reliable_tasks import ledger, limits, statements
from reliable_tasks.models import TaskLimiter, TaskRecord, WaitReason
from reliable_tasks.states import TaskState

pytestmark = pytest.mark.skipif(
    not statements.claims_within_limits_at_once(connection.alias),
    reason="SQLite before 3.35 has no UPDATE ... RETURNING")
#: Transaction control, which SQLite's claim sends as statements of their own.
TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE")


def limited_row(**limits: Any) -> TaskRecord:
    """A PENDING row of demo.add with ``limits`` (written directly: nothing is published)."""
    return TaskRecord.objects.create(task_name="demo.add", args=[1, 2], kwargs={}, **limits)


def claim(row: TaskRecord, worker: str = "w1") -> ledger.Claim:
    return ledger.claim(str(row.pk), task_name=row.task_name, worker=worker,
                        rerun_after_lost=False, limited=True)


def state(row: TaskRecord) -> tuple[str, str, int]:
    row.refresh_from_db()
    return row.state, row.waiting_for, row.attempts


@contextmanager
def key_held_elsewhere(key: str) -> Iterator[None]:
    """Another connection holds the lock of ``key`` (a prefixed limiter key) in an open
    transaction, as a claim of that key in progress does."""
    other = connection.get_new_connection(connection.get_connection_params())
    try:
        cursor = other.cursor()
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [key])
        elif connection.vendor == "sqlite":
            cursor.execute("BEGIN IMMEDIATE")  # SQLite's one write lock holds every key
        else:
            table = connection.ops.quote_name(TaskLimiter._meta.db_table)
            cursor.execute(f"INSERT INTO {table} (`key`) VALUES (%s) "
                           f"ON DUPLICATE KEY UPDATE `key` = `key`", [key])
        yield
    finally:
        other.rollback()
        other.close()


_LOCK_WAIT = {  # vendor: (give up after a second, back to the connection's setting)
    "postgresql": ("SET lock_timeout = '1s'", "RESET lock_timeout"),
    "mysql": ("SET SESSION innodb_lock_wait_timeout = 1",
              "SET SESSION innodb_lock_wait_timeout = DEFAULT"),
    "sqlite": ("PRAGMA busy_timeout = 1000", "PRAGMA busy_timeout = {before}"),
}


@contextmanager
def lock_wait_of_one_second() -> Iterator[None]:
    """This connection gives up waiting for a lock after a second."""
    give_up, restore = _LOCK_WAIT[connection.vendor]
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("PRAGMA busy_timeout")
            restore = restore.format(before=int(cursor.fetchone()[0]))
        cursor.execute(give_up)
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(restore)


def in_transaction() -> bool:
    """Whether this connection has a transaction open on the server."""
    if connection.vendor == "postgresql":
        return connection.connection.info.transaction_status != 0  # psycopg: IDLE is 0
    if connection.vendor == "sqlite":
        return bool(connection.connection.in_transaction)
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@in_transaction")
        return bool(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_a_limited_claim_that_may_start_is_one_round_trip():
    row = limited_row(concurrency_key="k", concurrency_limit=2, rate_key="api",
                      rate_limit="100/s")

    with CaptureQueriesContext(connection) as queries:
        claimed = claim(row)

    assert (claimed.won, claimed.concurrency_key) == (True, "k")
    sent = [query["sql"] for query in queries
            if not query["sql"].upper().startswith(TRANSACTION_CONTROL)]
    if connection.vendor == "sqlite":  # the claim, then the rate bucket's next start
        assert [sql.split()[0] for sql in sent] == ["UPDATE", "INSERT"], sent
    else:
        assert len(queries) == 1, sent
    assert state(row) == (TaskState.STARTED, "", 1)
    bucket = TaskLimiter.objects.get(key="r:api")
    assert bucket.allowed_at is not None and bucket.allowed_at > row.started_at


@pytest.mark.django_db(transaction=True)
def test_the_round_trip_admits_up_to_the_limit_then_the_claim_defers():
    rows = [limited_row(concurrency_key="k", concurrency_limit=2) for _ in range(3)]

    claims = [claim(row, f"w{index}") for index, row in enumerate(rows)]

    assert [claimed.won for claimed in claims] == [True, True, False]
    assert claims[2].waiting_for == WaitReason.CONCURRENCY
    assert state(rows[2]) == (TaskState.WAITING, WaitReason.CONCURRENCY, 0)


@pytest.mark.django_db(transaction=True)
def test_the_round_trip_spaces_a_rate_s_starts():
    rows = [limited_row(rate_key="api", rate_limit="1/m") for _ in range(2)]

    assert claim(rows[0]).won
    deferred = claim(rows[1], "w2")

    assert deferred.waiting_for == WaitReason.RATE
    allowed_at = TaskLimiter.objects.get(key="r:api").allowed_at
    assert allowed_at is not None
    assert 59 <= (allowed_at - timezone.now()).total_seconds() <= 60


@pytest.mark.django_db(transaction=True)
def test_inside_the_caller_s_transaction_the_claim_is_undone_with_it():
    row = limited_row(concurrency_key="k", concurrency_limit=1)

    with pytest.raises(RuntimeError), transaction.atomic():
        assert claim(row).won
        raise RuntimeError("the caller rolls back")

    assert state(row) == (TaskState.PENDING, "", 0)
    assert claim(row).won
    assert state(row) == (TaskState.STARTED, "", 1)


@pytest.mark.django_db(transaction=True)
def test_a_claim_that_cannot_take_its_key_s_lock_raises_and_leaves_nothing_open():
    row = limited_row(concurrency_key="k", concurrency_limit=1)

    with lock_wait_of_one_second(), key_held_elsewhere("c:k"):
        with pytest.raises(OperationalError):
            claim(row)
        assert not in_transaction()

    assert state(row) == (TaskState.PENDING, "", 0)
    assert claim(row).won  # the key is free again: the same claim wins


@pytest.mark.django_db
def test_on_sqlite_the_waiters_ahead_are_counted_through_their_own_index():
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's planner, which has no statistics here")
    claim_sql = statements.sqlite_limited_claim_sql(connection.alias)[0]
    params = ["STARTED", "w1", "", "", "id", "demo.add", "PENDING", "QUEUED", "RETRY",
              "WAITING", "", "", ""]
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN QUERY PLAN {claim_sql}", params)
        searches = [row[3] for row in cursor.fetchall() if row[3].startswith("SEARCH other")]

    assert len(searches) == 2, searches
    assert "rt_task_concurrency" in searches[0]  # the key's running rows
    assert "rt_task_waiters" in searches[1], searches  # not every PENDING row of the key


@pytest.mark.django_db(transaction=True)
def test_the_wake_up_after_a_limited_run_is_one_round_trip_when_no_row_waits():
    row = limited_row(concurrency_key="k", concurrency_limit=1)
    assert claim(row).won

    with CaptureQueriesContext(connection) as queries:
        assert limits.wake("k") == []

    assert len(queries) == 1, [query["sql"] for query in queries]


@pytest.mark.django_db(transaction=True)
def test_the_wake_up_turns_the_oldest_waiters_that_fit_pending_and_returns_them():
    rows = [limited_row(concurrency_key="k", concurrency_limit=2) for _ in range(5)]
    claims = [claim(row, f"w{index}") for index, row in enumerate(rows)]
    assert [claimed.won for claimed in claims] == [True, True, False, False, False]
    for row, claimed in zip(rows[:2], claims[:2], strict=True):
        assert ledger.record_success(str(row.pk), claimed)

    woken = limits.wake("k")

    assert sorted(str(record.pk) for record in woken) == sorted(str(row.pk) for row in rows[2:4])
    assert [state(row)[:2] for row in rows[2:]] == [
        (TaskState.PENDING, WaitReason.CONCURRENCY), (TaskState.PENDING, WaitReason.CONCURRENCY),
        (TaskState.WAITING, WaitReason.CONCURRENCY)]
    assert limits.wake("k") == []  # the woken rows hold both slots until they start


@pytest.mark.django_db(transaction=True)
def test_an_sqlite_without_returning_claims_and_wakes_in_transactions(monkeypatch):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite before 3.35, which Django still supports")
    monkeypatch.setattr(connection.features, "can_return_columns_from_insert", False)
    assert not statements.claims_within_limits_at_once(connection.alias)
    rows = [limited_row(concurrency_key="k", concurrency_limit=1) for _ in range(2)]

    claims = [claim(row, f"w{index}") for index, row in enumerate(rows)]
    assert [claimed.won for claimed in claims] == [True, False]
    assert ledger.record_success(str(rows[0].pk), claims[0])
    woken = limits.wake("k")

    assert [str(record.pk) for record in woken] == [str(rows[1].pk)]
    assert state(rows[1])[:2] == (TaskState.PENDING, WaitReason.CONCURRENCY)
