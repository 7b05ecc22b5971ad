"""When periodic runs are due: intervals, five-field crontabs in a time zone, one-off runs.

Crontabs are evaluated on the wall clock of their own time zone (``zoneinfo``), so they are
correct across daylight-saving changes:

- a wall-clock time that does not exist on a spring-forward day (02:30 in Europe/Berlin on the
  last Sunday of March) runs once, shifted forward by the length of the gap (03:30 local);
- a wall-clock time that happens twice on a fall-back day (02:30 on the last Sunday of October)
  runs once, at its first occurrence (02:30 summer time).

Every run has a *slot*: the exact instant it was scheduled for, computed from the last run's
slot, so that every beat computes the same slots and the ledger can keep one row per slot.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celery.schedules import crontab_parser

#: How far ahead a crontab is searched for its next run (a Feb 29 schedule needs years).
_SEARCH_DAYS = 366 * 8


class ScheduleSpecError(ValueError):
    """A schedule's timing is invalid; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Crontab:
    """A parsed five-field crontab (minute hour day-of-month month day-of-week) in a zone."""

    expression: str
    zone: ZoneInfo
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days_of_month: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]  # 0 = Sunday, as in cron
    any_day_of_month: bool
    any_day_of_week: bool

    def day_matches(self, day: date) -> bool:
        """Cron's rule: when both day fields are restricted, either one matching is enough."""
        if day.month not in self.months:
            return False
        cron_weekday = (day.weekday() + 1) % 7
        by_month_day = day.day in self.days_of_month
        by_week_day = cron_weekday in self.days_of_week
        if self.any_day_of_month and self.any_day_of_week:
            return True
        if self.any_day_of_month:
            return by_week_day
        if self.any_day_of_week:
            return by_month_day
        return by_month_day or by_week_day

    def local_times(self, earliest: datetime) -> Iterator[datetime]:
        """Wall-clock run times not before the naive local time ``earliest``, in order.

        They are aware datetimes in the zone, first occurrence (fold=0).
        """
        first_day = earliest.date()
        for offset in range(_SEARCH_DAYS):
            day = first_day + timedelta(days=offset)
            if not self.day_matches(day):
                continue
            for hour in self.hours:
                if offset == 0 and hour < earliest.hour:
                    continue
                for minute in self.minutes:
                    if offset == 0 and (hour, minute) < (earliest.hour, earliest.minute):
                        continue
                    yield datetime.combine(day, time(hour, minute), tzinfo=self.zone)

    def next_after(self, instant: datetime) -> datetime | None:
        """The first run strictly after ``instant`` (UTC), or None if there is none."""
        # Wall-clock times more than two hours before the local time of ``instant`` cannot be
        # later than it, whatever a daylight-saving change does.
        earliest = instant.astimezone(self.zone).replace(tzinfo=None) - timedelta(hours=2)
        for wall_clock in self.local_times(earliest):
            # A nonexistent wall-clock time maps (fold=0) to the instant shifted by the gap.
            slot = wall_clock.astimezone(UTC)
            if slot > instant:
                return slot
        return None


def parse_timezone(name: str) -> ZoneInfo:
    """The zone named ``name``; ``ScheduleSpecError`` on ``timezone`` if it does not exist."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ScheduleSpecError("timezone", f"Unknown time zone {name!r}.") from exc


_FIELDS = (
    ("minute", 60, 0),
    ("hour", 24, 0),
    ("day of month", 31, 1),
    ("month", 12, 1),
    ("day of week", 7, 0),
)


def parse_crontab(expression: str, zone_name: str) -> Crontab:
    """Parse a five-field crontab; ``ScheduleSpecError`` on ``crontab`` names the bad field."""
    parts = expression.split()
    if len(parts) != 5:
        raise ScheduleSpecError(
            "crontab", f"A crontab has five fields (minute hour day-of-month month "
            f"day-of-week), {expression!r} has {len(parts)}.")
    values: list[set[int]] = []
    for text, (label, size, minimum) in zip(parts, _FIELDS, strict=True):
        try:
            parsed = crontab_parser(size, minimum).parse(text)
        except ValueError as exc:
            raise ScheduleSpecError(
                "crontab", f"Invalid {label} {text!r} in crontab {expression!r}: {exc}") from exc
        out_of_range = [v for v in parsed if not minimum <= v < minimum + size]
        if out_of_range or not parsed:
            raise ScheduleSpecError(
                "crontab", f"Invalid {label} {text!r} in crontab {expression!r}: values must "
                f"be {minimum} to {minimum + size - 1}.")
        values.append(parsed)
    minutes, hours, days_of_month, months, days_of_week = values
    return Crontab(
        expression=expression, zone=parse_timezone(zone_name),
        minutes=tuple(sorted(minutes)), hours=tuple(sorted(hours)),
        days_of_month=frozenset(days_of_month), months=frozenset(months),
        days_of_week=frozenset(days_of_week),
        any_day_of_month=parts[2] == "*", any_day_of_week=parts[4] == "*",
    )


@dataclass(frozen=True)
class Timing:
    """One schedule's timing: exactly one of interval, crontab and one-off time."""

    interval_seconds: float | None = None
    crontab: Crontab | None = None
    run_at: datetime | None = None

    def next_after(self, instant: datetime) -> datetime | None:
        """The first slot strictly after ``instant``; None when there will be no more."""
        if self.interval_seconds is not None:
            return instant + timedelta(seconds=self.interval_seconds)
        if self.crontab is not None:
            return self.crontab.next_after(instant)
        assert self.run_at is not None
        return self.run_at if self.run_at > instant else None


@dataclass(frozen=True)
class RunPlan:
    """What a beat tick does with one schedule."""

    to_run: tuple[datetime, ...]
    skipped: int
    advance_to: datetime | None
    next_due: datetime | None


#: Slots further back than this before the missed-run cutoff are not walked one by one.
_WALK_BACK = timedelta(days=2)


def _latest_slot_at_or_before(timing: Timing, instant: datetime,
                              known: datetime) -> datetime:
    """The schedule's latest slot not after ``instant``, given ``known``, a slot before it.

    Looks back from ``instant`` over a reach that doubles until it holds a slot, then walks the
    slots of that reach: a few steps for any period, never the whole way from ``known``.
    """
    reach = timedelta(minutes=1)
    while True:
        floor = instant - reach
        latest = known if floor <= known else timing.next_after(floor)
        if latest is not None and latest <= instant:
            later = timing.next_after(latest)
            while later is not None and later <= instant:
                latest, later = later, timing.next_after(later)
            return latest
        reach *= 2


def _walk_start(timing: Timing, last_slot: datetime, cutoff: datetime) -> datetime:
    """Where to start walking slots: ``last_slot``, or a later slot after a long outage.

    Every slot before the cutoff is missed, so only the latest of them matters: after an
    outage longer than ``_WALK_BACK``, walking starts at the schedule's latest slot at least
    ``_WALK_BACK`` before the cutoff (a real slot of its own, so that it can be the missed run
    that ``catch_up="latest"`` runs), or at ``last_slot`` when there is none after it.
    """
    horizon = cutoff - _WALK_BACK
    if last_slot >= horizon:
        return last_slot
    if timing.interval_seconds is not None:
        whole = (horizon - last_slot).total_seconds() // timing.interval_seconds
        return last_slot + timedelta(seconds=whole * timing.interval_seconds)
    first = timing.next_after(last_slot)
    if first is None or first > horizon:
        return last_slot
    return _latest_slot_at_or_before(timing, horizon, first)


def plan_runs(timing: Timing, last_slot: datetime, now: datetime, *, catch_up: str,
              missed_after: float) -> RunPlan:
    """Slots due at ``now`` since ``last_slot``, and which of them run.

    Slots older than ``missed_after`` seconds are missed (beat or Redis was down): with
    ``catch_up == "skip"`` none of them runs, with ``"latest"`` the latest one runs once.
    ``advance_to`` is the new last slot; ``next_due`` the first slot after it.
    """
    cutoff = now - timedelta(seconds=missed_after) if math.isfinite(missed_after) else last_slot
    start = _walk_start(timing, last_slot, cutoff)
    missed: list[datetime] = [start] if start != last_slot else []
    on_time: list[datetime] = []
    slot = timing.next_after(start)
    while slot is not None and slot <= now:
        (missed if slot < cutoff else on_time).append(slot)
        slot = timing.next_after(slot)
    if not missed and not on_time:
        return RunPlan(to_run=(), skipped=0, advance_to=None, next_due=slot)
    to_run = list(on_time)
    if missed and not on_time and catch_up == "latest":
        to_run = [missed[-1]]
    advance_to = on_time[-1] if on_time else missed[-1]
    return RunPlan(to_run=tuple(to_run), skipped=len(missed) + len(on_time) - len(to_run),
                   advance_to=advance_to, next_due=slot)
