"""Shared parts of the benchmarks: the environment, timing, and the result table.

``bench_environment()`` starts a private ``redis-server`` on a free loopback port, points the
example project at it and at the benchmark database (``DATABASE_URL``, else a PostgreSQL database
``reliable_tasks_bench`` on 127.0.0.1:5432, created if missing), sets Django up, migrates quietly,
and stops the server at the end. The environment variables are set before ``django.setup()``
because the example project reads them when its settings module is imported.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TextIO

from example_project.devservers import REPO_ROOT, RedisServer, database_url_for

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/reliable_tasks_bench"
SETTINGS_MODULE = "example_project.settings"
#: The Redis list of Celery's default queue and kombu's hash of delivered, unacked messages.
QUEUE_KEY = "celery"
UNACKED_KEY = "unacked"


# --- the environment ------------------------------------------------------------------------------


def ensure_postgres_database(url: str) -> None:
    """Create the PostgreSQL database named by ``url`` if it does not exist (no-op otherwise)."""
    import dj_database_url
    import psycopg
    from psycopg import sql

    config = dj_database_url.parse(url)
    if config["ENGINE"] != "django.db.backends.postgresql":
        return
    params = {
        "host": config.get("HOST") or None,
        "port": config.get("PORT") or None,
        "user": config.get("USER") or None,
        "password": config.get("PASSWORD") or None,
    }
    name = str(config["NAME"])
    with psycopg.connect(
        dbname="postgres",
        autocommit=True,
        connect_timeout=5,
        **{key: value for key, value in params.items() if value is not None},
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


@dataclass
class BenchEnvironment:
    """A started private Redis server and a migrated benchmark database, Django set up."""

    redis: RedisServer
    database_url: str
    problems: list[str] = field(default_factory=list)

    def worker_env(self, **extra: str) -> dict[str, str]:
        """Environment of a Celery subprocess using this Redis and database; ``extra`` last."""
        from django.db import connections

        return {
            "REDIS_URL": self.redis.url,
            "DATABASE_URL": database_url_for(connections["default"].settings_dict),
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
            "DJANGO_DEBUG": "0",
            "PYTHONPATH": str(REPO_ROOT),
            **extra,
        }

    def reset(self) -> None:
        """Empty the ledger and the stored results, and flush Redis."""
        from django.core.management.color import no_style
        from django.db import connection
        from django_celery_results.models import GroupResult, TaskResult

        from reliable_tasks.models import TaskRecord

        tables = [model._meta.db_table for model in (TaskRecord, TaskResult, GroupResult)]
        with connection.cursor() as cursor:
            for statement in connection.ops.sql_flush(no_style(), tables):
                cursor.execute(statement)
        self.redis.flush()

    def problem(self, message: str) -> None:
        """Record something that looked wrong; it is printed at once and after the table."""
        self.problems.append(message)
        log(f"PROBLEM: {message}")


def _check_pointed_at(redis_url: str) -> None:
    """Refuse to go on unless the settings and the Celery app use the private Redis server."""
    from django.conf import settings

    from example_project.celery import app

    used = {
        "settings.REDIS_URL": settings.REDIS_URL,
        "settings.CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "celery broker_url": app.conf.broker_url,
    }
    wrong = {name: url for name, url in used.items() if url != redis_url}
    if wrong:
        raise RuntimeError(f"not pointed at the private Redis {redis_url}: {wrong}")


def _check_migrations_complete() -> None:
    """Refuse to go on when a model changed without a migration (the tables would not match)."""
    from django.core.management import call_command

    try:
        call_command("makemigrations", check=True, dry_run=True, verbosity=0)
    except SystemExit as exc:
        raise RuntimeError(
            "models have changes that no migration covers (`manage.py makemigrations --check`"
            " fails): the benchmark database cannot match them") from exc


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises ``SystemExit`` here, so that a benchmark stopped with ``kill`` unwinds and
    stops the Redis server and workers it started (the default SIGTERM skips that)."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def bench_environment() -> Iterator[BenchEnvironment]:
    """Start Redis, set Django up on the benchmark database, migrate; stop Redis at the end."""
    from django.conf import settings

    if settings.configured:
        raise RuntimeError("Django settings were loaded before the benchmark environment")
    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    ensure_postgres_database(database_url)
    with _sigterm_as_exit(), RedisServer() as server:
        os.environ["REDIS_URL"] = server.url
        os.environ["DATABASE_URL"] = database_url
        os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
        os.environ["DJANGO_DEBUG"] = "0"  # DEBUG keeps every query in memory: not measured
        import django
        from django.core.management import call_command

        django.setup()
        _check_pointed_at(server.url)
        _check_migrations_complete()
        call_command("migrate", verbosity=0, interactive=False)
        import example_project.demo.tasks  # noqa: F401 - registers the demo tasks

        env = BenchEnvironment(redis=server, database_url=database_url)
        try:
            yield env
        finally:
            _close_client_connections()


def _close_client_connections() -> None:
    """Close this process' broker and database connections before Redis goes away."""
    from django.db import connections
    from kombu import pools

    from reliable_tasks.publisher import close_publisher

    close_publisher()
    pools.reset()
    connections.close_all()


# --- timing ---------------------------------------------------------------------------------------


def timed(action: Callable[[], object]) -> float:
    """Return the wall-clock seconds ``action()`` took (after a garbage collection)."""
    gc.collect()
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (at least one)."""
    return float(statistics.median(values))


def rotated(items: Sequence[str], by: int) -> list[str]:
    """``items`` rotated left by ``by`` (interleaved rounds vary which variant runs first)."""
    if not items:
        return []
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


def log(message: str) -> None:
    """Progress to stderr, so stdout holds the tables only."""
    print(message, file=sys.stderr, flush=True)


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One measured variant of one scenario.

    ``ratio`` is baseline seconds / variant seconds (relative throughput, > 1 is faster);
    ``goal`` is the ratio the variant must reach, ``reference`` a ratio measured elsewhere.
    """

    scenario: str
    variant: str
    seconds: list[float]
    tasks: int
    ratio: float | None = None
    goal: float | None = None
    reference: float | None = None
    baseline: bool = False

    @property
    def median_seconds(self) -> float:
        """Median of the runs."""
        return median(self.seconds)

    @property
    def tasks_per_second(self) -> float:
        """Tasks per second at the median."""
        return self.tasks / self.median_seconds if self.median_seconds > 0 else float("inf")

    @property
    def ratio_text(self) -> str:
        """The ratio to the baseline, as printed."""
        if self.baseline:
            return "1.00x base"
        return f"{self.ratio:.2f}x" if self.ratio is not None else "-"

    @property
    def goal_text(self) -> str:
        """The goal (or the reference measured elsewhere), as printed."""
        if self.goal is not None:
            return f">= {self.goal:g}x"
        if self.reference is not None:
            return f"(ref {self.reference:g}x)"
        return ""

    @property
    def met_text(self) -> str:
        """``yes``/``NO`` when the row has a goal, else empty."""
        if self.goal is None or self.ratio is None:
            return ""
        return "yes" if self.ratio >= self.goal else "NO"


def rows_against(baseline: Row, others: Sequence[Row]) -> list[Row]:
    """``baseline`` marked as such, then ``others`` with their ratio to it (ratio of medians)."""
    base_seconds = baseline.median_seconds
    marked = [replace(baseline, baseline=True, ratio=1.0)]
    for row in others:
        ratio = base_seconds / row.median_seconds if row.median_seconds > 0 else None
        marked.append(replace(row, ratio=ratio))
    return marked


_HEADERS = ("scenario", "variant", "median s", "min-max s", "tasks/s", "ratio", "goal", "met")


def print_table(rows: Sequence[Row], title: str = "", out: TextIO | None = None) -> None:
    """Print ``rows`` as a plain, aligned text table."""
    out = out or sys.stdout
    cells = [
        (
            row.scenario,
            row.variant,
            f"{row.median_seconds:.4f}",
            f"{min(row.seconds):.4f}-{max(row.seconds):.4f}",
            f"{row.tasks_per_second:,.0f}",
            row.ratio_text,
            row.goal_text,
            row.met_text,
        )
        for row in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(_HEADERS)]
    numeric = {2, 3, 4}

    def line(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if i in numeric else value.ljust(width)
            for i, (value, width) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    if title:
        print(title, file=out)
    print(line(_HEADERS), file=out)
    print(line(["-" * width for width in widths]), file=out)
    previous = None
    for row, values in zip(rows, cells, strict=True):
        shown = list(values)
        if row.scenario == previous:
            shown[0] = ""
        previous = row.scenario
        print(line(shown), file=out)
    out.flush()


def print_markdown_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]],
                         out: TextIO) -> None:
    """Print ``title``, a blank line, the Markdown table of ``rows`` and a blank line."""
    print(title, file=out)
    print(file=out)
    for line in markdown_table(headers, rows):
        print(line, file=out)
    print(file=out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table of ``rows`` under ``headers``, columns padded alike."""
    widths = [max(len(header), *(len(row[i]) for row in rows))
              for i, header in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(value.ljust(width) for value, width in
                                 zip(values, widths, strict=True)) + " |"

    return [line(headers), "| " + " | ".join("-" * width for width in widths) + " |",
            *(line(row) for row in rows)]


def print_problems(problems: Sequence[str], out: TextIO | None = None) -> None:
    """Print what looked wrong during the runs (or that nothing did)."""
    out = out or sys.stdout
    if not problems:
        print("\nNo problems seen: every check after every run passed.", file=out)
        return
    print(f"\n{len(problems)} problem(s) seen:", file=out)
    for problem in problems:
        print(f"  - {problem}", file=out)
