"""Slots of intervals, crontabs in a time zone (across DST changes) and one-off runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from reliable_tasks.timing import ScheduleSpecError, Timing, parse_crontab, plan_runs

BERLIN_0230 = parse_crontab("30 2 * * *", "Europe/Berlin")


def local_runs(crontab, start: datetime, count: int) -> list[str]:
    runs, instant = [], start
    for _ in range(count):
        instant = crontab.next_after(instant)
        runs.append(instant.astimezone(crontab.zone).isoformat())
    return runs


def test_0230_berlin_on_the_spring_forward_day_runs_once_shifted_by_the_gap():
    runs = local_runs(BERLIN_0230, datetime(2026, 3, 27, 12, tzinfo=UTC), 3)

    assert runs == ["2026-03-28T02:30:00+01:00",
                    "2026-03-29T03:30:00+02:00",  # 02:30 does not exist that day
                    "2026-03-30T02:30:00+02:00"]


def test_0230_berlin_on_the_fall_back_day_runs_once_at_the_first_occurrence():
    runs = local_runs(BERLIN_0230, datetime(2026, 10, 23, 12, tzinfo=UTC), 3)

    assert runs == ["2026-10-24T02:30:00+02:00",
                    "2026-10-25T02:30:00+02:00",  # 02:30 happens twice; only the first runs
                    "2026-10-26T02:30:00+01:00"]


def test_day_of_month_and_day_of_week_combine_as_in_cron():
    first_or_monday = parse_crontab("0 9 1 * mon", "UTC")

    runs = local_runs(first_or_monday, datetime(2026, 6, 1, 10, tzinfo=UTC), 3)

    assert runs == ["2026-06-08T09:00:00+00:00", "2026-06-15T09:00:00+00:00",
                    "2026-06-22T09:00:00+00:00"]


@pytest.mark.parametrize("expression, message", [
    ("61 * * * *", "Invalid minute '61'"),
    ("* 24 * * *", "Invalid hour '24'"),
    ("* * 0 * *", "Invalid day of month '0'"),
    ("* * * 13 *", "Invalid month '13'"),
    ("* * *", "has 3"),
])
def test_an_invalid_crontab_names_the_field(expression, message):
    with pytest.raises(ScheduleSpecError, match=message) as error:
        parse_crontab(expression, "UTC")
    assert error.value.field == "crontab"


def test_an_unknown_time_zone_is_refused():
    with pytest.raises(ScheduleSpecError, match="Mars/Olympus") as error:
        parse_crontab("* * * * *", "Mars/Olympus")
    assert error.value.field == "timezone"


START = datetime(2026, 1, 1, tzinfo=UTC)


def test_one_due_slot_runs():
    plan = plan_runs(Timing(interval_seconds=5), START, START + timedelta(seconds=5.2),
                     catch_up="skip", missed_after=60)

    assert plan.to_run == (START + timedelta(seconds=5),)
    assert plan.next_due == START + timedelta(seconds=10)


def test_ten_missed_slots_with_skip_run_none():
    plan = plan_runs(Timing(interval_seconds=1), START, START + timedelta(seconds=10.5),
                     catch_up="skip", missed_after=0.2)

    assert plan.to_run == ()
    assert plan.skipped == 10
    assert plan.advance_to == START + timedelta(seconds=10)


def test_ten_missed_slots_with_latest_run_the_latest_once():
    plan = plan_runs(Timing(interval_seconds=1), START, START + timedelta(seconds=10.5),
                     catch_up="latest", missed_after=0.2)

    assert plan.to_run == (START + timedelta(seconds=10),)
    assert plan.skipped == 9


def test_a_month_long_outage_of_a_minutely_crontab_is_planned_quickly():
    minutely = Timing(crontab=parse_crontab("* * * * *", "UTC"))

    plan = plan_runs(minutely, START, START + timedelta(days=31), catch_up="latest",
                     missed_after=30)

    assert plan.to_run == (START + timedelta(days=31),)
    assert plan.advance_to == START + timedelta(days=31)


def test_a_one_off_runs_once():
    run_at = START + timedelta(minutes=1)
    once = Timing(run_at=run_at)

    plan = plan_runs(once, START, START + timedelta(hours=1), catch_up="skip",
                     missed_after=float("inf"))

    assert plan.to_run == (run_at,)
    assert plan.next_due is None
