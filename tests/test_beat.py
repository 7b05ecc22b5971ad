"""``ReliableRedBeatScheduler`` with a real beat and worker: runs, edits, locks, take-overs.

Every scenario counts ledger rows per slot and body executions, and asserts one of each.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest

from example_project.demo.models import Execution
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
