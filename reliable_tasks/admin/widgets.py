"""HTML fragments of the admin pages: badges, JSON, tracebacks, durations, attempt history.

Every function returns a ``SafeString`` built with ``format_html`` (or ``format_html_join``), so
whatever the data holds (a task argument, an error message, a worker name) is escaped: a value
that contains ``<script>`` is shown as text, never run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone
from django.utils.dateformat import format as date_format
from django.utils.dateparse import parse_datetime
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext as _

from reliable_tasks.states import TaskState

#: Background colour of each state's badge; the text is white on all of them.
STATE_COLORS: Mapping[str, str] = {
    TaskState.PENDING: "#6c757d",
    TaskState.QUEUED: "#5a6d8c",
    TaskState.STARTED: "#1f6fb2",
    TaskState.RETRY: "#b36b00",
    TaskState.SUCCESS: "#2e7d32",
    TaskState.FAILURE: "#c62828",
    TaskState.LOST: "#7b1fa2",
    TaskState.REVOKED: "#455a64",
    TaskState.EXPIRED: "#8d6e63",
    TaskState.REPLACED: "#00695c",
    TaskState.WAITING: "#7a5c00",
}
_UNKNOWN_COLOR = "#9e9e9e"
_ALIVE_COLOR = STATE_COLORS[TaskState.SUCCESS]
_DEAD_COLOR = STATE_COLORS[TaskState.FAILURE]

_BADGE = (
    '<span class="rt-badge" data-state="{}" title="{}" style="display:inline-block;'
    "padding:1px 8px;border-radius:10px;background:{};color:#fff;font-size:0.75rem;"
    'font-weight:600;letter-spacing:0.3px;white-space:nowrap">{}</span>'
)
_PRE = (
    '<pre class="rt-pre" style="margin:0;white-space:pre-wrap;word-break:break-word;'
    'max-height:40em;overflow:auto">{}</pre>'
)


def badge(text: str, color: str, *, key: str = "", title: str = "") -> SafeString:
    """A coloured pill holding ``text`` (``key`` goes into ``data-state`` for scripts and tests)."""
    return format_html(_BADGE, key or text, title or text, color, text)


def state_badge(state: str, detail: str = "") -> SafeString:
    """The badge of a task state, coloured by state (an unknown value is shown grey, as is);
    ``detail`` (why a task waits, say) is its tooltip, else the state's label."""
    label = TaskState(state).label if state in TaskState.values else state
    return badge(state, STATE_COLORS.get(state, _UNKNOWN_COLOR), title=detail or label)


def alive_badge(alive: bool) -> SafeString:
    """A green "alive" or red "dead" badge for a worker."""
    if alive:
        return badge(_("alive"), _ALIVE_COLOR, key="alive")
    return badge(_("dead"), _DEAD_COLOR, key="dead")


def preformatted(text: str) -> SafeString:
    """``text`` in a wrapping ``<pre>`` block, escaped."""
    return format_html(_PRE, text)


def pretty_json(value: Any) -> SafeString:
    """``value`` as indented JSON in a ``<pre>`` block, escaped (non-ASCII kept readable)."""
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    return preformatted(text)


def time_ago(moment: datetime, now: datetime | None = None) -> str:
    """``4.2 s ago``: how long before ``now`` (default: the current time) ``moment`` was."""
    elapsed = (now or timezone.now()) - moment
    return _("%(duration)s ago") % {"duration": format_duration(elapsed)}


def moment(value: datetime) -> str:
    """``value`` to the second, in the current time zone: ``2026-05-10 12:00:03``."""
    return date_format(timezone.localtime(value) if timezone.is_aware(value) else value,
                       "Y-m-d H:i:s")


def time_from_now(value: datetime, now: datetime | None = None) -> str:
    """``in 2.500 s`` for a moment ahead, ``4.2 s ago`` for one past."""
    ahead = value - (now or timezone.now())
    if ahead.total_seconds() >= 0:
        return _("in %(duration)s") % {"duration": format_duration(ahead)}
    return time_ago(value, now)


def format_duration(duration: timedelta) -> str:
    """A short reading of a run time: ``0.042 s``, ``12.5 s``, ``3 min 07 s``, ``2 h 05 min``."""
    seconds = duration.total_seconds()
    if seconds < 10:  # also a negative one (clock skew between hosts), shown as it is
        return _("%(seconds).3f s") % {"seconds": seconds}
    if seconds < 60:
        return _("%(seconds).1f s") % {"seconds": seconds}
    whole = int(seconds)
    if whole < 3600:
        return _("%(minutes)d min %(seconds)02d s") % {
            "minutes": whole // 60, "seconds": whole % 60}
    return _("%(hours)d h %(minutes)02d min") % {
        "hours": whole // 3600, "minutes": whole % 3600 // 60}


def run_time(started_at: datetime | None, finished_at: datetime | None) -> str | None:
    """How long the last attempt ran, or None when it has not both started and finished."""
    if started_at is None or finished_at is None:
        return None
    return format_duration(finished_at - started_at)


def _parse_moment(value: Any) -> datetime | None:
    """A datetime from an ISO timestamp of the history, None when absent or unreadable."""
    try:
        return parse_datetime(str(value)) if value else None
    except ValueError:  # well formed but impossible, like a 13th month
        return None


def _moment(value: Any) -> str:
    """An ISO timestamp from the history, to the second, in the current time zone."""
    parsed = _parse_moment(value) if isinstance(value, str) else None
    if parsed is None:
        return str(value or "")
    return moment(parsed)


def _entry_run_time(entry: Mapping[str, Any]) -> str:
    """How long one attempt ran, from its timestamps (empty when one is missing or unreadable)."""
    try:
        started = _parse_moment(entry.get("started_at"))
        finished = _parse_moment(entry.get("finished_at"))
        return run_time(started, finished) or ""
    except (TypeError, ValueError):  # unreadable, or one aware and one naive
        return ""


def _history_row(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    """The seven cells of one history entry: an attempt, or a manual retry."""
    if entry.get("manual_retry"):
        by = entry.get("by") or _("unknown")
        return (
            _("manual retry"), by, _moment(entry.get("at")), "", "",
            format_html("{} &rarr; {}", entry.get("from_state", ""), TaskState.PENDING), "",
        )
    outcome = str(entry.get("outcome") or "")
    return (
        entry.get("attempt", ""), entry.get("worker", ""), _moment(entry.get("started_at")),
        _moment(entry.get("finished_at")), _entry_run_time(entry),
        state_badge(outcome) if outcome else "", entry.get("error", ""),
    )


def history_table(history: Sequence[Mapping[str, Any]] | None) -> SafeString:
    """The attempt history (oldest first) as a table; manual retries are rows of their own."""
    entries = [entry for entry in history or () if isinstance(entry, Mapping)]
    if not entries:
        return format_html("<p>{}</p>", _("No attempt yet."))
    head = format_html_join(
        "", "<th>{}</th>",
        ((title,) for title in (_("Attempt"), _("Worker"), _("Started"), _("Finished"),
                                _("Run time"), _("Outcome"), _("Error"))),
    )
    body = format_html_join(
        "\n",
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
        '<td style="white-space:pre-wrap;word-break:break-word">{}</td></tr>',
        (_history_row(entry) for entry in entries),
    )
    return format_html(
        '<table class="rt-history"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>',
        head, body)
