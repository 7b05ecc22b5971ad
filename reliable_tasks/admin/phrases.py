"""Schedules' timing in words: "every 5 minutes", "02:30 daily, Europe/Berlin", "at 09:00 on
Mon-Fri, UTC", "once at 2026-12-01 10:00 UTC"; crontabs without a short phrase show as
"cron EXPR, ZONE"."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from django.conf import settings
from django.utils import timezone
from django.utils.dateformat import format as date_format
from django.utils.dates import WEEKDAYS_ABBR
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from reliable_tasks.models import PeriodicSchedule
from reliable_tasks.timing import Crontab, ScheduleSpecError, parse_crontab


def _every(seconds: int) -> str:
    if seconds % 86400 == 0:
        days = seconds // 86400
        return ngettext("every day", "every %(count)d days", days) % {"count": days}
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return ngettext("every hour", "every %(count)d hours", hours) % {"count": hours}
    if seconds % 60 == 0:
        minutes = seconds // 60
        return ngettext("every minute", "every %(count)d minutes", minutes) % {"count": minutes}
    return ngettext("every second", "every %(count)d seconds", seconds) % {"count": seconds}


def _step(values: Iterable[int], size: int) -> int | None:
    """N when ``values`` are exactly 0, N, 2N, ... below ``size`` (N > 1 dividing it)."""
    values = sorted(values)
    if len(values) < 2 or values[0] != 0:
        return None
    step = values[1]
    return step if size % step == 0 and values == list(range(0, size, step)) else None


def _weekdays(cron_days: frozenset[int]) -> str:
    """``Mon-Fri``, ``Sat, Sun``, ``Mon, Wed, Fri``: cron's 0 is Sunday; weeks start on Monday."""
    positions = sorted((day - 1) % 7 for day in cron_days)  # Python's weekday(): Monday is 0
    runs: list[list[int]] = []
    for position in positions:
        if runs and position == runs[-1][-1] + 1:
            runs[-1].append(position)
        else:
            runs.append([position])
    parts: list[str] = []
    for run in runs:
        if len(run) >= 3:
            parts.append(f"{WEEKDAYS_ABBR[run[0]]}-{WEEKDAYS_ABBR[run[-1]]}")
        else:
            parts.extend(str(WEEKDAYS_ABBR[position]) for position in run)
    return ", ".join(parts)


def _describe_crontab(cron: Crontab, zone: str) -> str | None:
    """The crontab in words, or None when it has no short phrase."""
    every_day = cron.any_day_of_month and cron.any_day_of_week and len(cron.months) == 12
    minutes, hours = cron.minutes, cron.hours
    if every_day and len(hours) == 24:
        if len(minutes) == 60:
            return _("every minute")
        minute_step = _step(minutes, 60)
        if minute_step:
            return _every(minute_step * 60)
        if len(minutes) == 1:
            return _("every hour at :%(minute)02d, %(zone)s") % {
                "minute": minutes[0], "zone": zone}
    if len(minutes) != 1:
        return None
    hour_step = _step(hours, 24)
    if every_day and hour_step:
        return _("every %(count)d hours at :%(minute)02d, %(zone)s") % {
            "count": hour_step, "minute": minutes[0], "zone": zone}
    if len(hours) > 4:
        return None
    times = ", ".join(f"{hour:02d}:{minutes[0]:02d}" for hour in hours)
    if every_day:
        return _("%(times)s daily, %(zone)s") % {"times": times, "zone": zone}
    if len(cron.months) != 12:
        return None
    if cron.any_day_of_month:
        return _("at %(times)s on %(days)s, %(zone)s") % {
            "times": times, "days": _weekdays(cron.days_of_week), "zone": zone}
    if cron.any_day_of_week and len(cron.days_of_month) == 1:
        return _("at %(times)s on day %(day)d of the month, %(zone)s") % {
            "times": times, "day": min(cron.days_of_month), "zone": zone}
    return None


def describe_timing(*, interval_seconds: int | None = None, crontab: str = "",
                    zone: str = "", run_at: datetime | None = None) -> str:
    """A schedule's timing in words; a crontab without a short phrase is shown as it is.

    ``zone`` is the crontab's time zone (default: the project's); a one-off time is shown in
    the current time zone.
    """
    if interval_seconds is not None:
        return _every(interval_seconds)
    if crontab:
        zone = zone or settings.TIME_ZONE
        try:
            phrase = _describe_crontab(parse_crontab(crontab, zone), zone)
        except ScheduleSpecError:
            phrase = None
        return phrase or _("cron %(expression)s, %(zone)s") % {
            "expression": " ".join(crontab.split()), "zone": zone}
    if run_at is not None:
        local = timezone.localtime(run_at)
        moment = date_format(local, "Y-m-d H:i:s" if local.second else "Y-m-d H:i")
        return _("once at %(moment)s %(zone)s") % {
            "moment": moment, "zone": timezone.get_current_timezone_name()}
    return ""


def describe_schedule(schedule: PeriodicSchedule) -> str:
    """``describe_timing`` of a schedule."""
    return describe_timing(interval_seconds=schedule.interval_seconds, crontab=schedule.crontab,
                           zone=schedule.zone_name, run_at=schedule.run_at)
