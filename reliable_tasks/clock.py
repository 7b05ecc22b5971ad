"""One clock for the times that different hosts compare: the database's.

A lease written by a worker is read by a sweeper on another host; a due time written by one
process is compared by another. Each host's ``timezone.now()`` would make a fast sweeper expire
every live lease, or a slow one skip rows. So leases, due times and cutoffs are computed from the
database's clock: inside the statement where it is on a hot path (``now_sql``, ``later_sql``),
or read once per unit of work (``database_now``).

SQLite is a file on one host: every process that opens it shares that host's clock, so there the
process' own clock is the database's.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connections, router
from django.utils import timezone

from reliable_tasks.models import TaskRecord

#: The current time as the database stores it, per vendor; SQLite uses the process' clock.
_NOW_SQL = {
    "postgresql": "STATEMENT_TIMESTAMP()",
    "mysql": "UTC_TIMESTAMP(6)",
}


def _alias(alias: str | None) -> str:
    return alias or router.db_for_write(TaskRecord)


def now_sql(alias: str | None = None) -> tuple[str, list[Any]]:
    """SQL of the database's current time, and its parameters."""
    alias = _alias(alias)
    connection = connections[alias]
    if connection.vendor in _NOW_SQL:
        return _NOW_SQL[connection.vendor], []
    return "%s", [connection.ops.adapt_datetimefield_value(timezone.now())]


def later_sql(seconds: float, alias: str | None = None) -> tuple[str, list[Any]]:
    """SQL of the database's current time plus ``seconds``, and its parameters."""
    alias = _alias(alias)
    connection = connections[alias]
    if connection.vendor == "postgresql":
        return f"{_NOW_SQL['postgresql']} + %s * INTERVAL '1 second'", [float(seconds)]
    if connection.vendor == "mysql":
        return (f"DATE_ADD({_NOW_SQL['mysql']}, INTERVAL %s MICROSECOND)",
                [round(seconds * 1_000_000)])
    moment = timezone.now() + timedelta(seconds=seconds)
    return "%s", [connection.ops.adapt_datetimefield_value(moment)]


def database_now(alias: str | None = None) -> datetime:
    """The database's current time, as an aware datetime (one query, except on SQLite)."""
    alias = _alias(alias)
    connection = connections[alias]
    if connection.vendor not in _NOW_SQL:
        return timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {_NOW_SQL[connection.vendor]}")
        value: datetime = cursor.fetchone()[0]
    if timezone.is_naive(value):
        value = value.replace(tzinfo=UTC)
    return value
