"""Slots of intervals, crontabs in a time zone (across DST changes) and one-off runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from reliable_tasks.timing import (
    ScheduleSpecError,
    Timing,
    _latest_slot_at_or_before,
    parse_crontab,
    plan_runs,
)

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


def is_slot(timing: Timing, instant: datetime) -> bool:
    return timing.next_after(instant - timedelta(microseconds=1)) == instant


@pytest.mark.parametrize(("expression", "tick"), [
    ("* * * * *", timedelta(seconds=20)),
    ("15 * * * *", timedelta(minutes=5)),
    ("30 2 * * *", timedelta(minutes=30)),
    ("0 9 * * 1", timedelta(hours=2)),
    ("0 0 1 * *", timedelta(hours=6)),
    ("0 0 1 1 *", timedelta(days=3)),
], ids=["minutely", "hourly", "daily", "weekly", "monthly", "yearly"])
@pytest.mark.parametrize("catch_up", ["skip", "latest"])
@pytest.mark.parametrize(("down", "back"), [
    (datetime(2025, 12, 31, tzinfo=UTC), datetime(2026, 4, 10, 7, 7, tzinfo=UTC)),
    (datetime(2026, 8, 1, tzinfo=UTC), datetime(2026, 11, 5, 7, 7, tzinfo=UTC)),
], ids=["over-spring-forward", "over-fall-back"])
def test_every_period_across_a_long_downtime_and_dst_runs_real_slots_once(
        expression, tick, catch_up, down, back):
    """Beat down for months while Berlin's clocks change, then ticking for a few periods."""
    timing = Timing(crontab=parse_crontab(expression, "Europe/Berlin"))
    year_before = timing.next_after(down - timedelta(days=400))
    last = first = _latest_slot_at_or_before(timing, down, year_before)  # the run before
    period = timing.next_after(timing.next_after(last)) - timing.next_after(last)
    end = back + max(3 * period, timedelta(hours=1))
    late = max(60.0, 2 * tick.total_seconds())  # a tick sees every slot before it is missed
    ran: list[datetime] = []
    now = back
    while now <= end:
        plan = plan_runs(timing, last, now, catch_up=catch_up, missed_after=late)
        ran.extend(plan.to_run)
        last = plan.advance_to or last
        now += tick

    assert all(is_slot(timing, slot) for slot in ran), "only the schedule's own slots run"
    assert len(ran) == len(set(ran)), "no slot twice"
    cutoff = back - timedelta(seconds=late)
    missed = [slot for slot in ran if slot < cutoff]
    some_missed = timing.next_after(first) < cutoff
    none_on_time = timing.next_after(cutoff - timedelta(microseconds=1)) > back
    # "latest" runs the latest missed slot once, unless a slot on time runs anyway.
    assert len(missed) == int(catch_up == "latest" and some_missed and none_on_time)
    if missed:
        assert timing.next_after(missed[0]) >= cutoff, "the latest missed slot"
    expected, slot = [], timing.next_after(cutoff - timedelta(microseconds=1))
    while slot <= end - tick:
        expected.append(slot)
        slot = timing.next_after(slot)
    assert [slot for slot in ran if slot not in missed][:len(expected)] == expected
