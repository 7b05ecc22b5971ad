"""``manage.py prune_tasks``: delete finished ledger rows older than a cutoff, in batches.

The sweeper already prunes per ``RELIABLE_TASKS_RETENTION``; this command is for a one-off
clean-up (a shorter horizon for some states, a backlog after retention was lowered) or for
projects that prune from cron. Only finished rows (``SUCCESS``, ``FAILURE``, ``LOST``,
``REVOKED``, ``EXPIRED``) are ever deleted, and every ``DELETE`` re-checks the state and the age,
so a row retried meanwhile is kept.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from django.db.models import Count
from django.utils import timezone

from reliable_tasks.conf import app_settings
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import FINISHED_STATES, TaskState

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Finished states in the order the command reports them.
PRUNABLE_STATES = tuple(state for state in TaskState if state in FINISHED_STATES)


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number of seconds, or a number with ``s``, ``m``, ``h``, ``d``
    or ``w`` (``90``, ``45m``, ``12h``, ``7d``, ``1.5w``). Raises ``ValueError`` otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: give seconds, or a number followed by "
                         f"s, m, h, d or w (e.g. 3600, 12h, 7d)")
    return float(match[1]) * _UNIT_SECONDS[match[2].lower()]


def parse_states(names: list[str] | None) -> list[TaskState]:
    """The finished states named (any case); all of them if none. Raises ``ValueError``."""
    if not names:
        return list(PRUNABLE_STATES)
    states: list[TaskState] = []
    for name in names:
        try:
            state = TaskState(name.strip().upper())
        except ValueError:
            raise ValueError(f"{name!r} is not a task state") from None
        if state not in FINISHED_STATES:
            raise ValueError(f"{state} rows are not finished and are never pruned")
        if state not in states:
            states.append(state)
    return states


class Command(BaseCommand):
    """Delete finished task records older than ``--older-than``, in batches."""

    help = ("Delete finished task records (SUCCESS, FAILURE, LOST, REVOKED, EXPIRED) that "
            "finished more than --older-than ago, in batches. Unfinished rows are never "
            "deleted.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than", metavar="AGE",
            help="delete rows that finished longer ago than this: seconds, or a number with "
                 "s, m, h, d or w, e.g. 12h or 7d (default: RELIABLE_TASKS_RETENTION)")
        parser.add_argument(
            "--state", action="append", metavar="STATE", dest="states",
            help="a finished state to prune; repeat for several (default: all finished "
                 f"states: {', '.join(PRUNABLE_STATES)})")
        parser.add_argument("--dry-run", action="store_true",
                            help="count what would be deleted; delete nothing")
        parser.add_argument(
            "--batch-size", type=int, metavar="N",
            help="rows per DELETE (default: RELIABLE_TASKS_SWEEP_BATCH_SIZE)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            age = (parse_duration(options["older_than"]) if options["older_than"] is not None
                   else app_settings.RETENTION)
            states = parse_states(options["states"])
        except ValueError as exc:
            raise CommandError(f"{exc}.") from exc
        batch_size = options["batch_size"] or app_settings.SWEEP_BATCH_SIZE
        if options["batch_size"] is not None and options["batch_size"] < 1:
            raise CommandError(f"--batch-size must be at least 1, not {options['batch_size']}.")
        cutoff = timezone.now() - timedelta(seconds=age)
        verbosity: int = options["verbosity"]
        try:
            if options["dry_run"]:
                counts = self._count(states, cutoff)
            else:
                counts = {state: self._delete(state, cutoff, batch_size, verbosity)
                          for state in states}
        except DatabaseError as exc:
            raise CommandError(f"The database failed: {exc}.") from exc
        if verbosity >= 1:
            self._report(counts, cutoff, options["dry_run"])

    def _count(self, states: list[TaskState], cutoff: datetime) -> dict[TaskState, int]:
        rows = (TaskRecord.objects.filter(state__in=states, finished_at__lt=cutoff)
                .order_by().values("state").annotate(row_count=Count("pk")))
        found = {row["state"]: row["row_count"] for row in rows}
        return {state: found.get(state, 0) for state in states}

    def _delete(self, state: TaskState, cutoff: datetime, batch_size: int,
                verbosity: int) -> int:
        """Delete the rows of one state, a batch at a time (no ORDER BY: no sort, no scan)."""
        deleted = 0
        while True:
            batch = TaskRecord.objects.filter(state=state, finished_at__lt=cutoff).order_by()
            ids = list(batch.values_list("pk", flat=True)[:batch_size])
            if not ids:
                break
            _, per_model = batch.filter(pk__in=ids).delete()
            deleted += per_model.get(TaskRecord._meta.label, 0)
            if verbosity >= 2:
                self.stdout.write(f"  {state}: deleted {deleted} so far")
            if len(ids) < batch_size:
                break
        return deleted

    def _report(self, counts: dict[TaskState, int], cutoff: datetime, dry_run: bool) -> None:
        total = sum(counts.values())
        detail = ", ".join(f"{state}: {number}" for state, number in counts.items())
        noun = "task record" if total == 1 else "task records"
        horizon = f"finished before {cutoff.isoformat(timespec='seconds')}"
        if dry_run:
            self.stdout.write(self.style.WARNING(
                f"Dry run: would delete {total} {noun} {horizon} ({detail}). "
                f"Nothing was deleted."))
        else:
            self.stdout.write(self.style.SUCCESS(
                f"Deleted {total} {noun} {horizon} ({detail})."))
