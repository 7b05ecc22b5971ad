"""``make faults``: every fault scenario, plain Celery and reliable_tasks side by side, two tables.

Runs the scenarios of ``benchmarks.fault_scenarios`` (the ones ``tests/faults`` asserts on) at
full scale by default, each variant against its own fresh Sentinel topology (a master, a replica
and three sentinels) or ``redis-server``, with real workers and beats of the example project;
then the database scenarios of ``benchmarks.db_fault_scenarios`` (``benchmarks.db_faults``),
each variant in a process of its own with its own PostgreSQL cluster and Redis:

    .venv/bin/python -m benchmarks.faults [--scale default] [--only kill hang5 pg_down ...]

What it needs: a database, ``DATABASE_URL`` if set, else the PostgreSQL database
``reliable_tasks_faults`` on 127.0.0.1:5432 (created if missing). Its ledger, schedules and
demo tables are emptied before every run: never point it at data you want to keep. Redis
servers are started on free loopback ports and stopped by PID; the machine's own Redis is never
used (``REDIS_URL`` points at a loopback port that refuses connections).

The database scenarios need PostgreSQL's server binaries (they are skipped, saying why, where
there are none) and never touch ``DATABASE_URL``'s database.

Progress goes to stderr, the tables to stdout. The exit status is 1 when reliable_tasks raised,
lost or ran twice anything in a Redis scenario (a retry_on_lost task killed mid-body may run
twice: reported, not failed), or broke a promise in a database scenario
(``benchmarks.db_faults.problems_of``), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from benchmarks import db_faults
from benchmarks.common import ensure_postgres_database, log, print_markdown_table
from benchmarks.fault_scenarios import (
    Broker,
    Outcome,
    Scale,
    Variant,
    beat_through_failover,
    broker_environment,
    hang_master_during_dispatch,
    kill_master_during_dispatch,
    kill_worker_and_master,
    reconcile_while_beat_runs,
    redis_outage,
    scale_from_env,
)
from example_project.devservers import (
    LOOPBACK,
    REPO_ROOT,
    CeleryProcess,
    RedisServer,
    SentinelTopology,
    celery_app_using,
    postgres_unavailable,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/reliable_tasks_faults"
SETTINGS_MODULE = "example_project.settings"
VARIANTS: tuple[Variant, ...] = ("plain", "reliable")


# --- processes ------------------------------------------------------------------------------------


class ProcessRig:
    """A ``Rig`` of plain ``CeleryProcess`` objects, logging under ``log_dir``."""

    def __init__(self, log_dir: Path, database_url: str) -> None:
        """Start processes that log under ``log_dir`` and use ``database_url``."""
        self.log_dir = log_dir
        self.database_url = database_url
        self.started: list[CeleryProcess] = []

    def environment(self, broker: Broker, **extra: str) -> dict[str, str]:
        """The environment of a subprocess using ``broker`` and the faults database."""
        return {
            **broker_environment(broker),
            "DATABASE_URL": self.database_url,
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
            "DJANGO_DEBUG": "0",
            "PYTHONPATH": str(REPO_ROOT),
            **extra,
        }

    def worker(self, broker: Broker, *, env: Mapping[str, str] | None = None,
               concurrency: int = 2) -> CeleryProcess:
        """A started worker using ``broker``."""
        process = CeleryProcess("worker", self.environment(broker, **(env or {})),
                                concurrency=concurrency, log_dir=self.log_dir)
        self.started.append(process)
        return process.start()

    def beat(self, broker: Broker, *, env: Mapping[str, str] | None = None,
             extra_args: Sequence[str] = ()) -> CeleryProcess:
        """A started beat using ``broker``."""
        process = CeleryProcess("beat", self.environment(broker, **(env or {})),
                                extra_args=extra_args, log_dir=self.log_dir)
        self.started.append(process)
        return process.start()

    def stop_all(self) -> None:
        """Stop every process started, newest first."""
        for process in reversed(self.started):
            process.stop()
        self.started.clear()


# --- the environment ------------------------------------------------------------------------------


@contextlib.contextmanager
def faults_environment() -> Iterator[str]:
    """Set Django up on the faults database (migrated); yield its URL."""
    from django.conf import settings

    if settings.configured:
        raise RuntimeError("Django settings were loaded before the faults environment")
    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    ensure_postgres_database(database_url)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as refused:
        refused.bind((LOOPBACK, 0))  # bound, never listening: connections are refused
        os.environ["REDIS_URL"] = f"redis://{LOOPBACK}:{refused.getsockname()[1]}/0"
        os.environ.pop("REDIS_SENTINELS", None)
        os.environ["DATABASE_URL"] = database_url
        os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
        os.environ["DJANGO_DEBUG"] = "0"
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0, interactive=False)
        import example_project.demo.tasks  # noqa: F401 - registers the demo tasks

        try:
            yield database_url
        finally:
            from django.db import connections

            connections.close_all()


def reset_database() -> None:
    """Empty the tables of the ledger, the schedules, the demo runs and the stored results."""
    from django.apps import apps
    from django.core.management.color import no_style
    from django.db import connection

    models = [model for label in ("reliable_tasks", "demo", "django_celery_results")
              for model in apps.get_app_config(label).get_models()]
    tables = [model._meta.db_table for model in models]
    with connection.cursor() as cursor:
        for statement in connection.ops.sql_flush(no_style(), tables):
            cursor.execute(statement)


@contextlib.contextmanager
def pointed_at(broker: Broker) -> Iterator[None]:
    """Point this process' Celery app and Django settings at ``broker`` for the block."""
    from django.test import override_settings

    from example_project.celery import app
    from reliable_tasks.publisher import close_publisher
    from reliable_tasks.sentinel import as_django_settings

    if isinstance(broker, SentinelTopology):
        conf = broker.celery_settings()
        names: dict[str, Any] = {"REDIS_SENTINELS": broker.sentinels_text,
                                 "REDIS_MASTER_NAME": broker.master_name,
                                 **as_django_settings(conf)}
    else:
        conf = {"broker_url": broker.url, "redbeat_redis_url": broker.url}
        names = {"REDIS_URL": broker.url, **as_django_settings(conf)}
    close_publisher()
    try:
        with override_settings(**names), celery_app_using(app, conf):
            yield
    finally:
        close_publisher()


# --- the runs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One scenario of the table: a key for ``--only``, its broker kind, and how to run it."""

    key: str
    sentinel: bool
    variants: tuple[Variant, ...]
    run: Callable[[ProcessRig, Any, Variant, Scale], Outcome]


def _reconcile(rig: ProcessRig, broker: Any, variant: Variant, scale: Scale) -> Outcome:
    outcome, beat_log, outputs = reconcile_while_beat_runs(rig, broker, scale)
    if "LockNotOwnedError" in beat_log or "lost RedBeat's lock" in beat_log:
        outcome.notes.append("beat lost its lock")
    if outcome.raised:
        outcome.notes.append("failed runs: " + " | ".join(out[-300:] for out in outputs))
    return outcome


def runs_for(scale: Scale) -> list[Run]:
    """The scenarios of the table, in order."""
    runs = [Run("kill", True, VARIANTS, kill_master_during_dispatch)]
    for seconds in scale.hang_seconds:
        runs.append(Run(f"hang{seconds:g}", True, VARIANTS, _hang_runner(seconds)))
    runs += [
        Run("outage", False, VARIANTS, redis_outage),
        Run("worker", True, VARIANTS, kill_worker_and_master),
        Run("beat", True, VARIANTS, beat_through_failover),
        Run("reconcile", True, ("reliable",), _reconcile),
    ]
    return runs


def _hang_runner(seconds: float) -> Callable[[ProcessRig, Any, Variant, Scale], Outcome]:
    def run(rig: ProcessRig, broker: Any, variant: Variant, scale: Scale) -> Outcome:
        return hang_master_during_dispatch(rig, broker, variant, seconds, scale.hang_rate)

    return run


def run_one(run: Run, variant: Variant, scale: Scale, database_url: str,
            work_dir: Path) -> Outcome:
    """Run one scenario for one variant on a fresh broker; a crash becomes a noted outcome."""
    reset_database()
    run_dir = work_dir / f"{run.key}-{variant}"
    rig = ProcessRig(run_dir / "celery", database_url)
    broker: Broker = (SentinelTopology(base_dir=run_dir / "sentinel", password="faults-pass")
                      if run.sentinel else RedisServer(data_dir=run_dir / "redis"))
    started = time.monotonic()
    try:
        with broker, pointed_at(broker):
            try:
                return run.run(rig, broker, variant, scale)
            finally:
                rig.stop_all()
    except Exception as exc:  # noqa: BLE001 - one broken run must not lose the whole table
        failed = Outcome(run.key, variant)
        failed.notes.append(f"run failed: {exc!r}; logs in {run_dir}")
        log(traceback.format_exc())
        return failed
    finally:
        log(f"  {run.key} [{variant}] took {time.monotonic() - started:.0f}s")


# --- the table ------------------------------------------------------------------------------------

_HEADERS = ("scenario", "variant", "dispatched", "raised", "lost", "run twice", "recovery s",
            "max dispatch s", "restarts")


def _cells(outcome: Outcome) -> tuple[str, ...]:
    recovery = "-" if outcome.recovery_seconds is None else f"{outcome.recovery_seconds:.1f}"
    return (outcome.scenario, outcome.variant_name, str(outcome.dispatched),
            str(outcome.raised), str(outcome.lost), str(outcome.run_twice), recovery,
            f"{outcome.max_dispatch_seconds:.2f}", str(outcome.worker_restarts))


def print_table(outcomes: Sequence[Outcome], title: str, out: TextIO | None = None) -> None:
    """Print the outcomes as a Markdown table, then each row's notes."""
    out = out or sys.stdout
    print_markdown_table(title, _HEADERS, [_cells(outcome) for outcome in outcomes], out)
    for outcome in outcomes:
        if outcome.notes:
            print(f"- {outcome.scenario} [{outcome.variant_name}]: {'; '.join(outcome.notes)}",
                  file=out)
    out.flush()


def problems_of(outcomes: Sequence[Outcome]) -> list[str]:
    """What reliable_tasks must never do: raise, lose, run a plain task twice, crash."""
    problems = []
    for outcome in outcomes:
        if outcome.variant != "reliable":
            continue
        if any(note.startswith("run failed") for note in outcome.notes):
            problems.append(f"{outcome.scenario}: the run failed")
        allowed_twice = 2 if outcome.scenario.startswith("worker") else 0  # retry_on_lost
        if outcome.raised or outcome.lost or outcome.run_twice > allowed_twice:
            problems.append(outcome.summary())
    return problems


def redis_table(runs: Sequence[Run], scale: Scale, work_dir: Path) -> list[str]:
    """Run the Redis scenarios, print their table; return reliable_tasks' problems."""
    outcomes: list[Outcome] = []
    started = time.monotonic()
    with faults_environment() as database_url:
        for run in runs:
            for variant in run.variants:
                log(f"{run.key} [{variant}] ...")
                outcome = run_one(run, variant, scale, database_url, work_dir)
                log(f"  {outcome.summary()}")
                outcomes.append(outcome)
    minutes = (time.monotonic() - started) / 60
    print_table(outcomes, f"Fault scenarios at {scale.name} scale ({minutes:.0f} min); "
                          f"plain Celery = apply_async of demo.plain_record, adoption off")
    return problems_of(outcomes)


def database_table(scenarios: Sequence[str], scale_name: str, work_dir: Path) -> list[str]:
    """Run the database scenarios (each in a process of its own), print their table; return
    reliable_tasks' problems. Skipped, saying why, where PostgreSQL cannot run."""
    reason = postgres_unavailable()
    if reason is not None:
        print(f"Database fault scenarios skipped: {reason}")
        return []
    started = time.monotonic()
    outcomes = db_faults.run_all(scenarios, db_faults.VARIANTS, scale_name, work_dir)
    return db_faults.report(outcomes, scale_name, (time.monotonic() - started) / 60)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("full", "default"), default="full",
                        help="full (the default here) or the test suite's default scale")
    parser.add_argument("--only", nargs="*", default=None, metavar="KEY",
                        help="run only these scenarios: kill, hang5, hang30, outage, worker, "
                             f"beat, reconcile, {', '.join(db_faults.SCENARIOS)}")
    args = parser.parse_args(argv)
    os.environ["FAULTS_SCALE"] = args.scale
    scale = scale_from_env()
    redis_runs = runs_for(scale)
    known = {run.key for run in redis_runs} | set(db_faults.SCENARIOS)
    unknown = set(args.only or ()) - known
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))} at {scale.name} scale")
    redis_runs = [run for run in redis_runs if not args.only or run.key in args.only]
    db_scenarios = [name for name in db_faults.SCENARIOS if not args.only or name in args.only]
    work_dir = Path(tempfile.mkdtemp(prefix="rt-faults-"))
    problems = redis_table(redis_runs, scale, work_dir) if redis_runs else []
    if redis_runs and db_scenarios:
        print()
    if db_scenarios:
        problems += database_table(db_scenarios, scale.name, work_dir / "database")
    if problems:
        print(f"\n{len(problems)} problem(s); logs kept in {work_dir}:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
