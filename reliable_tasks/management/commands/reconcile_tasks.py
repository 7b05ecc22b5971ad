"""``manage.py reconcile_tasks``: the non-destructive startup reconciliation."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from redis.exceptions import RedisError

from reliable_tasks.reconcile import ReconcileReport, reconcile


class Command(BaseCommand):
    """Diff the database against RedBeat and the broker; repair only what differs."""

    help = ("Bring RedBeat's entries in line with the database's schedules (create, update, "
            "remove owned orphans) and run one sweeper pass. Never touches RedBeat's lock, its "
            "statics or foreign entries; safe to run from many pods at once.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true",
                            help="print the plan; write nothing")
        parser.add_argument("--check", action="store_true",
                            help="write nothing; exit 1 if anything drifted (deploy gates)")
        parser.add_argument("--json", action="store_true", help="print a JSON report")
        parser.add_argument("--schedules-only", action="store_true",
                            help="reconcile schedules only, no sweeper pass")
        parser.add_argument("--ledger-only", action="store_true",
                            help="run the sweeper pass only")
        parser.add_argument("--no-prune", action="store_true",
                            help="keep owned RedBeat entries that have no schedule")
        parser.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                            help="how long to wait for a concurrent run (default 30)")

    def check(self, *args: Any, **kwargs: Any) -> None:
        """Django's system checks, whose model checks connect to the database on Django 6."""
        try:
            super().check(*args, **kwargs)
        except DatabaseError as exc:
            raise _database_failed(exc) from exc

    def handle(self, *args: Any, **options: Any) -> None:
        if options["schedules_only"] and options["ledger_only"]:
            raise CommandError("--schedules-only and --ledger-only exclude each other.")
        dry_run = options["dry_run"] or options["check"]
        progress = self._progress if options["verbosity"] >= 2 else (lambda message: None)
        try:
            report = reconcile(
                dry_run=dry_run, schedules=not options["ledger_only"],
                ledger=not options["schedules_only"], prune=not options["no_prune"],
                wait=options["wait"], progress=progress)
        except DatabaseError as exc:
            raise _database_failed(exc) from exc
        except RedisError as exc:
            raise CommandError(f"Redis is unreachable or failed: {exc}.") from exc
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), default=str, indent=2))
        else:
            self._print(report, options["verbosity"])
        if options["check"] and report.drifted:
            raise CommandError("RedBeat has drifted from the database.", returncode=1)

    def _progress(self, message: str) -> None:
        self.stdout.write(f"  {message}")

    def _print(self, report: ReconcileReport, verbosity: int) -> None:
        if report.skipped_busy:
            self.stdout.write(self.style.WARNING(
                "Another reconcile_tasks run holds the lock; nothing to do here."))
            return
        verb = "would be" if report.dry_run else "were"
        if report.plan is not None:
            self.stdout.write(
                f"Schedules: {report.created} {verb} created, {report.updated} {verb} updated, "
                f"{report.removed} {verb} removed, {report.unchanged} unchanged.")
            if verbosity >= 2 or report.dry_run:
                for action, names in (("create", report.plan.create),
                                      ("update", report.plan.update),
                                      ("remove", report.plan.remove)):
                    for name in names:
                        self.stdout.write(f"  {action} {name}")
        if report.sweep is not None:
            swept = report.sweep
            self.stdout.write(
                f"Ledger: {swept.published} republished, "
                f"{swept.expired_leases_retried + swept.expired_leases_lost} recovered from "
                f"dead workers, {swept.requeued_after_broker_loss} requeued after a broker "
                f"loss, {swept.requeued_missing_messages} requeued for a message gone from the "
                f"broker, {swept.pruned} pruned.")
        self.stdout.write(self.style.SUCCESS(f"Done in {report.seconds:.2f}s."))


def _database_failed(exc: DatabaseError) -> CommandError:
    return CommandError(f"The database is unreachable or failed: {exc}. Nothing was changed "
                        f"in Redis.")
