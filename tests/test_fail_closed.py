"""Fail closed on the database: statements retried on a new connection, claims that find their
own earlier win, workers that reconnect by themselves, leases held after an outage.

Connections are broken for real: the server ends the backend (``pg_terminate_backend`` on
PostgreSQL, ``KILL`` on MariaDB). SQLite has no server that could drop a connection, so those
tests run on the other two. Whole-cluster faults (restart, kill -9, down for longer than a
lease) are in ``tests/faults/test_database_faults.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from django.db import IntegrityError, OperationalError, connection, transaction

from example_project.demo.models import Execution
from reliable_tasks import db_retry, dispatch, ledger
from reliable_tasks.clock import database_now
from reliable_tasks.heartbeat import beat
from reliable_tasks.models import LedgerPulse, TaskRecord
from reliable_tasks.pulse import PULSE_NAME, gap_allowed, touch
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep

pytestmark = pytest.mark.django_db(transaction=True)

needs_server = pytest.mark.skipif(connection.vendor == "sqlite",
                                  reason="SQLite has no server that could drop a connection")


@pytest.fixture(autouse=True)
def _fresh_connection_after(transactional_db: None) -> Iterator[None]:
    """Drop a connection a test broke before the database is flushed for the next test."""
    yield
    db_retry.drop_connections()


def server_session_id() -> int:
    """The server's id of this thread's connection (opening it if needed)."""
    query = "SELECT pg_backend_pid()" if connection.vendor == "postgresql" else (
        "SELECT CONNECTION_ID()")
    with connection.cursor() as cursor:
        cursor.execute(query)
        return int(cursor.fetchone()[0])


def end_sessions(session_ids: list[int]) -> None:
    """Have the server end the sessions ``session_ids``, from a connection of its own."""
    other = connection.get_new_connection(connection.get_connection_params())
    try:
        other.autocommit = True if connection.vendor == "postgresql" else other.autocommit
        cursor = other.cursor()
        for session_id in session_ids:
            if connection.vendor == "postgresql":
                cursor.execute("SELECT pg_terminate_backend(%s)", [session_id])
            else:
                cursor.execute(f"KILL {int(session_id)}")
    finally:
        other.close()


def sessions_of_others() -> list[int]:
    """Server sessions on the test database other than this connection's."""
    if connection.vendor == "postgresql":
        query = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                 "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
    else:
        query = ("SELECT id FROM information_schema.processlist WHERE db = DATABASE() "
                 "AND id <> CONNECTION_ID()")
    with connection.cursor() as cursor:
        cursor.execute(query)
        return [int(row[0]) for row in cursor.fetchall()]


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


# --- db_retry -------------------------------------------------------------------------------------


@needs_server
@pytest.mark.parametrize("retry", [
    lambda statement: db_retry.within(statement, 5, what="test"),
    lambda statement: db_retry.until_done(statement, what="test"),
], ids=["within", "until_done"])
def test_a_statement_whose_session_the_server_ended_runs_again_on_a_new_connection(retry):
    TaskRecord.objects.create(task_name="demo.add")
    before = server_session_id()
    end_sessions([before])

    assert retry(lambda: TaskRecord.objects.count()) == 1
    assert server_session_id() != before


@needs_server
def test_without_retry_the_ended_session_fails_the_statement():
    end_sessions([server_session_id()])

    with pytest.raises(OperationalError):
        TaskRecord.objects.count()


@needs_server
def test_inside_a_transaction_nothing_is_retried():
    tries = []

    def statement() -> int:
        tries.append(1)
        return TaskRecord.objects.count()

    with pytest.raises(OperationalError), transaction.atomic():
        end_sessions([server_session_id()])
        db_retry.until_done(statement, what="test")
    assert len(tries) == 1


def test_an_error_that_a_new_connection_cannot_cure_is_raised_at_once():
    row = TaskRecord.objects.create(task_name="demo.add")
    tries = []

    def statement() -> None:
        tries.append(1)
        with transaction.atomic():
            TaskRecord.objects.create(id=row.id, task_name="demo.add")

    with pytest.raises(IntegrityError):
        db_retry.until_done(statement, what="test")
    assert len(tries) == 1


@needs_server
def test_within_gives_up_after_its_time_and_raises_the_error():
    def statement() -> int:
        end_sessions([server_session_id()])
        return TaskRecord.objects.count()

    started = time.monotonic()
    with pytest.raises(OperationalError):
        db_retry.within(statement, 0.5, what="test")
    assert time.monotonic() - started < 3


# --- the claim ---------------------------------------------------------------------------------


def test_a_claim_tried_again_with_its_token_finds_its_own_win(shared_redis):
    row = dispatch("demo.record", ("token",))
    token = database_now()

    first = ledger.claim(str(row.id), task_name="demo.record", worker="w1",
                         rerun_after_lost=False, started_at=token)
    again = ledger.claim(str(row.id), task_name="demo.record", worker="w1",
                         rerun_after_lost=False, started_at=token)
    other = ledger.claim(str(row.id), task_name="demo.record", worker="w1",
                         rerun_after_lost=False, started_at=token + timedelta(microseconds=1))

    assert first.won and again.won, "the second try is the same claim, not a duplicate"
    assert not other.won and other.reason == "running under a live lease"
    stored = TaskRecord.objects.get(pk=row.id)
    assert (stored.state, stored.attempts, stored.duplicate_deliveries) == (
        TaskState.STARTED, 1, 1)


def test_a_lease_is_the_database_s_time_plus_the_lease_timeout(shared_redis, settings):
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = 30
    row = dispatch("demo.record", ("lease",))
    before = database_now()

    ledger.claim(str(row.id), task_name="demo.record", worker="w1", rerun_after_lost=False)

    lease = TaskRecord.objects.get(pk=row.id).lease_expires_at
    assert before + timedelta(seconds=29) < lease < database_now() + timedelta(seconds=31)


# --- workers reconnect -------------------------------------------------------------------------


@needs_server
def test_a_worker_whose_idle_connections_were_ended_runs_the_next_task_once(
        redis_server, celery_worker):
    celery_worker(redis_server, concurrency=1)
    first = dispatch("demo.db_session", ("idle-1",))
    wait_for(lambda: TaskRecord.objects.get(pk=first.id).state == TaskState.SUCCESS,
             what="the first task")

    end_sessions(sessions_of_others())  # the pool process's, the main process', the heartbeat's
    second = dispatch("demo.record", ("idle-2",))

    wait_for(lambda: TaskRecord.objects.get(pk=second.id).state == TaskState.SUCCESS,
             what="the task after the sessions were ended")
    assert Execution.objects.filter(token="idle-2").count() == 1
    assert TaskRecord.objects.get(pk=second.id).attempts == 1


# --- leases after an outage ---------------------------------------------------------------------


def expired_lease_row() -> TaskRecord:
    return TaskRecord.objects.create(
        task_name="demo.record", state=TaskState.STARTED, worker="w1",
        started_at=database_now() - timedelta(minutes=5),
        lease_expires_at=database_now() - timedelta(seconds=5))


def test_no_lease_expires_until_a_whole_lease_after_the_ledger_was_unreachable(
        shared_redis, settings):
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = 30
    row = expired_lease_row()
    now = database_now()
    touch(now - timedelta(minutes=10))  # the last touch before the outage
    LedgerPulse.objects.filter(name=PULSE_NAME).update(
        last_seen_at=now - timedelta(minutes=10), steady_since=now - timedelta(hours=1))

    report = sweep(now)

    assert report.leases_held_after_outage
    assert report.expired_leases_lost == 0
    assert TaskRecord.objects.get(pk=row.pk).state == TaskState.STARTED

    # Heartbeats and passes touch the pulse without a gap for a whole lease: then it expires.
    step = gap_allowed() / 2
    moment = now
    while moment < now + timedelta(seconds=30):
        moment += step
        touch(moment)
    later = sweep(now + timedelta(seconds=30, milliseconds=1))

    assert not later.leases_held_after_outage
    assert later.expired_leases_lost == 1
    assert TaskRecord.objects.get(pk=row.pk).state == TaskState.LOST


def test_a_redelivery_does_not_take_over_a_lease_that_ran_out_in_an_outage(settings):
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = 30
    row = expired_lease_row()
    now = database_now()
    LedgerPulse.objects.create(name=PULSE_NAME, last_seen_at=now - timedelta(minutes=10),
                               steady_since=now - timedelta(hours=1))

    held = ledger.claim(str(row.pk), task_name="demo.record", worker="w2",
                        rerun_after_lost=True)

    assert not held.won
    assert "outage" in held.reason
    stored = TaskRecord.objects.get(pk=row.pk)
    assert (stored.state, stored.worker, stored.attempts) == (TaskState.STARTED, "w1", 0)
    # The claim's own touch recorded the gap: the pulse is steady from now on.
    assert LedgerPulse.objects.get(name=PULSE_NAME).steady_since >= now

    # A whole lease later (heartbeats kept touching the pulse), the redelivery takes it over.
    LedgerPulse.objects.filter(name=PULSE_NAME).update(
        last_seen_at=database_now(), steady_since=database_now() - timedelta(seconds=31))
    taken = ledger.claim(str(row.pk), task_name="demo.record", worker="w2",
                         rerun_after_lost=True)

    assert taken.won
    assert TaskRecord.objects.get(pk=row.pk).worker == "w2"


def test_a_steady_ledger_expires_leases_at_once(shared_redis):
    row = expired_lease_row()
    touch(database_now())

    report = sweep()

    assert not report.leases_held_after_outage
    assert report.expired_leases_lost == 1
    assert TaskRecord.objects.get(pk=row.pk).state == TaskState.LOST


def test_a_heartbeat_touches_the_pulse_and_extends_leases_by_the_database_s_clock(settings):
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = 30
    row = expired_lease_row()

    assert beat("w1", [str(row.id)]) == 1

    pulse = LedgerPulse.objects.get(name=PULSE_NAME)
    lease = TaskRecord.objects.get(pk=row.pk).lease_expires_at
    assert abs((pulse.last_seen_at - database_now()).total_seconds()) < 5
    assert abs((lease - pulse.last_seen_at).total_seconds() - 30) < 1


# --- the after-commit publish -------------------------------------------------------------------


@pytest.fixture
def session_ended_by_the_queued_mark() -> Iterator[None]:
    """A trigger that has the server end the session which marks a row QUEUED."""
    table = TaskRecord._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute("""
            CREATE FUNCTION rt_test_end_session() RETURNS trigger AS $$
            BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END
            $$ LANGUAGE plpgsql""")
        cursor.execute(f"""
            CREATE TRIGGER rt_test_end_session BEFORE UPDATE ON {table} FOR EACH ROW
            WHEN (NEW.state = 'QUEUED') EXECUTE FUNCTION rt_test_end_session()""")
    yield
    db_retry.drop_connections()
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TRIGGER rt_test_end_session ON {table}")
        cursor.execute("DROP FUNCTION rt_test_end_session()")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="a PostgreSQL trigger ends it")
def test_a_dispatch_whose_queued_mark_lost_its_session_returns_and_its_row_waits_for_the_claim(
        redis_server, session_ended_by_the_queued_mark):
    row = dispatch("demo.record", ("mark-lost",))  # autocommit: published at once

    assert TaskRecord.objects.get(pk=row.id).state == TaskState.PENDING
    assert redis_server.client().llen("celery") == 1, "published before the mark failed"
    claimed = ledger.claim(str(row.id), task_name="demo.record", worker="w1",
                           rerun_after_lost=False)
    assert claimed.won, "the claim takes a PENDING row"
    assert sweep(database_now() + timedelta(minutes=5)).published == 0, "nothing left to publish"
