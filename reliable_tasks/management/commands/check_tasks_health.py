"""``manage.py check_tasks_health``: a health probe for containers and monitoring.

Exit status: ``0`` healthy, ``1`` degraded or unhealthy, ``2`` the probe could not check (bad
arguments, a Celery app that does not load, or a check that could not run while nothing failed).

Checks (``--skip NAME`` leaves one out, e.g. the workers in a web container's probe):

- ``database``: a ``SELECT 1`` on the default database;
- ``broker``: ``PING`` to the broker's Redis, bounded by ``--timeout``;
- ``beat``: someone holds RedBeat's lock (``EXISTS``/``PTTL`` of its key), and no run of the
  app's schedules is overdue by more than ``reliable_tasks.health.OVERDUE_AFTER`` (60 s) while it
  does (RedBeat's schedule, on its Redis clock): a beat that keeps the lock but cannot record its
  runs (its database is down) is degraded; bounded by ``--timeout`` too;
- ``schedules``: no schedule drifted from RedBeat (``synced_revision < revision``);
- ``workers``: at least ``--min-workers`` workers with a fresh heartbeat;
- ``pending``: the oldest publishable PENDING task waits less than ``--max-pending-age``.

A failed database or broker, or no beat, fails (unhealthy); drift, a slow outbox and overdue
runs are ``warn`` (degraded: someone should look; beat's log says why it cannot record). Checks
that need the database are ``unknown`` when it is down.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from celery import Celery
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import Error as DjangoDatabaseError
from django.db import connection
from django.utils import timezone

from reliable_tasks import redbeat_store
from reliable_tasks.celery_app import get_celery_app
from reliable_tasks.health import OverdueRuns, overdue_runs
from reliable_tasks.management.commands.prune_tasks import parse_duration
from reliable_tasks.metrics import broker_redis, drifted_schedules, live_workers, oldest_pending_age

T = TypeVar("T")

CHECKS = ("database", "broker", "beat", "schedules", "workers", "pending")
#: Checks that read the database.
NEEDS_DATABASE = frozenset({"schedules", "workers", "pending"})

OK, WARN, FAIL, SKIPPED, UNKNOWN = "ok", "warn", "fail", "skipped", "unknown"
HEALTHY, DEGRADED, UNHEALTHY, CANNOT_CHECK = "healthy", "degraded", "unhealthy", "unknown"
EXIT_CODES = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 1, CANNOT_CHECK: 2}


@dataclass
class Result:
    """The outcome of one check."""

    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Health:
    """The whole probe: an overall status and each check's result."""

    checks: dict[str, Result]
    checked_at: str = field(default_factory=lambda: timezone.now().isoformat())

    @property
    def status(self) -> str:
        """``unhealthy`` if a check failed, ``degraded`` if one warned, ``unknown`` if one
        could not run (and nothing failed or warned), else ``healthy``."""
        statuses = {result.status for result in self.checks.values()}
        if FAIL in statuses:
            return UNHEALTHY
        if WARN in statuses:
            return DEGRADED
        if UNKNOWN in statuses:
            return CANNOT_CHECK
        return HEALTHY

    @property
    def exit_code(self) -> int:
        """The command's exit status."""
        return EXIT_CODES[self.status]

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data (``--json``)."""
        return {"status": self.status, "exit_code": self.exit_code,
                "checked_at": self.checked_at,
                "checks": {name: asdict(result) for name, result in self.checks.items()}}


def within(seconds: float, call: Callable[[], T]) -> T:
    """``call()`` in a daemon thread; ``TimeoutError`` if it has not returned in ``seconds``.

    For clients this app does not configure (RedBeat's, cached on the Celery app, possibly
    without socket timeouts or retrying for minutes): a hung Redis must not hang the probe.
    """
    outcome: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="check-tasks-health", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g}s")
    if errors:
        raise errors[0]
    return outcome[0]


def _error(exc: BaseException) -> str:
    """``Type: message`` of an exception, without a trailing period (callers add theirs)."""
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":.")


class Command(BaseCommand):
    """Probe the database, the broker, beat, schedules, workers and the outbox."""

    help = ("Health probe for containers and monitoring. Exit status 0: healthy; 1: degraded "
            "or unhealthy; 2: could not check. --json prints a machine-readable report.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print a JSON report")
        parser.add_argument(
            "--skip", action="append", default=[], metavar="CHECK",
            help=f"leave a check out; repeat for several ({', '.join(CHECKS)})")
        parser.add_argument(
            "--timeout", default="2", metavar="SECONDS",
            help="bound of each Redis round trip (default 2)")
        parser.add_argument(
            "--max-pending-age", default="300", metavar="AGE",
            help="longest a publishable PENDING task may wait: seconds, or with s, m, h or d "
                 "(default 300)")
        parser.add_argument(
            "--min-workers", type=int, default=1, metavar="N",
            help="live workers needed (default 1)")

    def handle(self, *args: Any, **options: Any) -> None:
        skip = set(options["skip"])
        unknown = skip - set(CHECKS)
        if unknown:
            raise CommandError(f"Unknown check(s) to skip: {', '.join(sorted(unknown))}; "
                               f"choose from {', '.join(CHECKS)}.", returncode=2)
        try:
            self.timeout = parse_duration(options["timeout"])
            self.max_pending_age = parse_duration(options["max_pending_age"])
        except ValueError as exc:
            raise CommandError(f"{exc}.", returncode=2) from exc
        if self.timeout <= 0:
            raise CommandError("--timeout must be more than 0 seconds.", returncode=2)
        self.min_workers: int = options["min_workers"]
        try:
            self.app = get_celery_app()
        except (ImportError, AttributeError, ValueError) as exc:
            raise CommandError(f"The Celery app could not be loaded: {_error(exc)}.",
                               returncode=2) from exc
        health = self.probe(skip)
        if options["json"]:
            self.stdout.write(json.dumps(health.as_dict(), indent=2))
        elif options["verbosity"] >= 1:
            self._print(health)
        if health.exit_code:
            failing = [name for name, result in health.checks.items()
                       if result.status in (FAIL, WARN, UNKNOWN)]
            raise CommandError(f"{health.status}: {', '.join(failing)}",
                               returncode=health.exit_code)

    # -- the checks --------------------------------------------------------------------------

    def probe(self, skip: set[str]) -> Health:
        """Run every check not in ``skip``; a check that raises is ``unknown``."""
        results: dict[str, Result] = {}
        probes: dict[str, Callable[[], Result]] = {
            "database": self.check_database, "broker": self.check_broker,
            "beat": self.check_beat, "schedules": self.check_schedules,
            "workers": self.check_workers, "pending": self.check_pending,
        }
        for name in CHECKS:
            if name in skip:
                results[name] = Result(SKIPPED, "skipped (--skip)")
                continue
            database = results.get("database")
            if name in NEEDS_DATABASE and database is not None and database.status == FAIL:
                results[name] = Result(UNKNOWN, "not checked: the database is unreachable")
                continue
            try:
                results[name] = probes[name]()
            except Exception as exc:  # noqa: BLE001 - the probe reports, never crashes
                results[name] = Result(UNKNOWN, f"could not check: {_error(exc)}")
        return Health(results)

    def check_database(self) -> Result:
        """``SELECT 1`` on the default database."""
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
        except DjangoDatabaseError as exc:
            connection.close()
            return Result(FAIL, f"unreachable: {_error(exc)}")
        return Result(OK, f"reachable ({connection.vendor})")

    def check_broker(self) -> Result:
        """``PING`` to the broker's Redis over a connection bounded by ``--timeout``."""
        try:
            with broker_redis(self.app, self.timeout) as client:
                client.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means unreachable
            return Result(FAIL, f"unreachable: {_error(exc)}")
        return Result(OK, "reachable")

    def check_beat(self) -> Result:
        """Someone holds RedBeat's lock, and records the runs that are due (the lock's token is
        never shown)."""
        if _lock_disabled(self.app):
            return Result(OK, "RedBeat runs without a lock (redbeat_lock_key = None)")
        key = redbeat_store.lock_key(self.app)

        def read() -> tuple[int, OverdueRuns | None]:
            """The lock's PTTL, and the overdue runs while it is held (else None)."""
            client = redbeat_store.client(self.app)
            exists, pttl = int(client.exists(key)), int(client.pttl(key))
            return pttl, overdue_runs(self.app) if exists else None

        try:
            pttl, overdue = within(self.timeout, read)
        except Exception as exc:  # noqa: BLE001 - RedBeat's Redis did not answer
            return Result(FAIL, f"RedBeat's Redis did not answer: {_error(exc)}",
                          {"lock_key": key})
        if overdue is None:
            return Result(FAIL, f"no beat holds RedBeat's lock ({key}): periodic schedules "
                                f"and the sweeper's entry do not run", {"lock_key": key})
        ttl = pttl / 1000 if pttl >= 0 else None
        held = (f"a beat holds the lock (expires in {ttl:g}s)" if ttl is not None
                else "a beat holds the lock (no expiry)")
        data = {"lock_key": key, "ttl_seconds": ttl, "overdue_runs": overdue.count,
                "oldest_overdue_seconds": overdue.oldest_seconds}
        if overdue.count:
            return Result(WARN, f"{held} but {overdue.describe()}", data)
        return Result(OK, held, data)

    def check_schedules(self) -> Result:
        """No schedule revision waits for its push to RedBeat."""
        drifted = drifted_schedules()
        if drifted:
            return Result(WARN, f"{drifted} schedule(s) not pushed to RedBeat yet (the sweeper "
                                f"retries; `manage.py reconcile_tasks` repairs now)",
                          {"drifted": drifted})
        return Result(OK, "in sync with RedBeat", {"drifted": 0})

    def check_workers(self) -> Result:
        """At least ``--min-workers`` workers beat recently."""
        alive = live_workers()
        data = {"alive": alive, "required": self.min_workers}
        if alive < self.min_workers:
            return Result(FAIL, f"{alive} live worker(s), {self.min_workers} needed", data)
        return Result(OK, f"{alive} live worker(s)", data)

    def check_pending(self) -> Result:
        """The outbox keeps up: no publishable PENDING task waits too long."""
        age = oldest_pending_age()
        data = {"oldest_seconds": age, "max_seconds": self.max_pending_age}
        if age is not None and age > self.max_pending_age:
            return Result(WARN, f"the oldest pending task has waited {age:.0f}s "
                                f"(more than {self.max_pending_age:g}s): is the broker or the "
                                f"sweeper down?", data)
        if age is None:
            return Result(OK, "no task waits to be published", data)
        return Result(OK, f"the oldest pending task has waited {age:.0f}s", data)

    # -- output ------------------------------------------------------------------------------

    def _print(self, health: Health) -> None:
        styles = {OK: self.style.SUCCESS, WARN: self.style.WARNING, FAIL: self.style.ERROR,
                  UNKNOWN: self.style.ERROR, SKIPPED: self.style.NOTICE}
        for name, result in health.checks.items():
            label = styles[result.status](f"{result.status.upper():7}")
            self.stdout.write(f"{label} {name:10} {result.detail}")
        overall = {HEALTHY: self.style.SUCCESS, DEGRADED: self.style.WARNING}.get(
            health.status, self.style.ERROR)
        self.stdout.write(overall(health.status))


def _lock_disabled(app: Celery) -> bool:
    """Whether RedBeat was configured to run without its lock (``redbeat_lock_key = None``)."""
    return "redbeat_lock_key" in app.conf and app.conf.get("redbeat_lock_key") is None
