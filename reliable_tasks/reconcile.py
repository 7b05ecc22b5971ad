"""The startup reconciliation: diff the database against RedBeat, repair only what differs.

It replaces "clear Redis and reload the schedule": it reads the app's own entries (pipelined),
creates the missing, updates the drifted (keeping ``last_run_at``), removes owned orphans, and
then runs one sweeper pass. It never writes or deletes RedBeat's lock, its statics, entries
outside the app's prefix, or any other key. The diff takes no lock and writes nothing; only a
drifted state is repaired, and repairs serialize on a short lock of the app's own
(``<ENTRY_PREFIX>reconcile:lock``, outside RedBeat's prefix).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import Max
from django.utils import timezone

from reliable_tasks import redbeat_store
from reliable_tasks.celery_app import get_celery_app
from reliable_tasks.conf import app_settings
from reliable_tasks.metrics import observe_reconcile
from reliable_tasks.models import PeriodicSchedule, TaskRecord
from reliable_tasks.sweeper import SweepReport, sweep
from reliable_tasks.sync import SPEC_FIELDS, mark_synced, spec_from_values

#: Entries read or written per pipelined round trip.
CHUNK = 1000
#: How long the reconcile lock lives if its holder dies mid-run.
LOCK_TIMEOUT = 120

Progress = Callable[[str], None]


@dataclass
class SchedulePlan:
    """What a reconciliation changes in RedBeat: entry names per action."""

    create: list[str] = field(default_factory=list)
    update: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    unchanged: int = 0

    @property
    def drifted(self) -> bool:
        """Whether RedBeat differs from the database."""
        return bool(self.create or self.update or self.remove)


@dataclass
class ReconcileReport:
    """The outcome of one run (``--json`` prints it)."""

    dry_run: bool
    created: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    plan: SchedulePlan | None = None
    sweep: SweepReport | None = None
    skipped_busy: bool = False
    seconds: float = 0.0

    @property
    def drifted(self) -> bool:
        """Whether the schedules had drifted (before this run repaired them)."""
        return self.plan is not None and self.plan.drifted

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data."""
        data = asdict(self)
        data["drifted"] = self.drifted
        return data


def _chunks(items: list[Any], size: int = CHUNK) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class _State:
    specs: dict[str, redbeat_store.ScheduleSpec]
    #: ``(pk, revision)`` of enabled schedules whose revision was not marked as pushed. Once
    #: the plan is applied RedBeat holds them all (pushed now, or already matching).
    unsynced: list[tuple[int, int]]
    #: Entries as read for the diff: definition and score, no meta.
    stored: dict[str, redbeat_store.StoredEntry] = field(default_factory=dict)


def _read_database() -> _State:
    """The enabled schedules as specs; read first, so a database that is down fails early."""
    specs: dict[str, redbeat_store.ScheduleSpec] = {}
    unsynced: list[tuple[int, int]] = []
    rows = PeriodicSchedule.objects.enabled().values(*SPEC_FIELDS, "synced_revision")
    for row in rows.iterator(chunk_size=CHUNK * 5):
        spec = spec_from_values(row)
        specs[spec.name] = spec
        if row["synced_revision"] < row["revision"]:
            unsynced.append((row["pk"], row["revision"]))
    return _State(specs=specs, unsynced=unsynced)


def _read_redis(state: _State, progress: Progress) -> None:
    """Read the app's entries (and the ones the database expects) into ``state.stored``."""
    app = get_celery_app()
    names = sorted(set(state.specs) | set(redbeat_store.owned_entry_names(app)))
    state.stored = {}
    for index, chunk in enumerate(_chunks(names)):
        state.stored.update(redbeat_store.read_entries(app, chunk, with_meta=False))
        progress(f"read {min((index + 1) * CHUNK, len(names))}/{len(names)} entries")


def _stored_revision(entry: redbeat_store.StoredEntry) -> int | None:
    """The schedule revision an entry was pushed from, if it says."""
    try:
        options = redbeat_store.decode_definition(entry.definition or "").get("options")
    except ValueError:
        return None
    meta = options.get(redbeat_store.META_OPTION) if isinstance(options, dict) else None
    revision = meta.get("revision") if isinstance(meta, dict) else None
    return revision if isinstance(revision, int) else None


def plan_schedules(state: _State) -> SchedulePlan:
    """Compare the database's schedules with the app's RedBeat entries."""
    plan = SchedulePlan()
    sweep_entry = redbeat_store.sweep_entry_name()
    for name, spec in state.specs.items():
        entry = state.stored.get(name)
        if entry is None or entry.definition is None:
            plan.create.append(name)
        elif entry.definition != spec.definition_json or entry.score is None:
            plan.update.append(name)
        else:
            plan.unchanged += 1
    plan.remove = sorted(name for name in state.stored
                         if name not in state.specs and name != sweep_entry)
    return plan


def _refresh_specs(state: _State, names: list[str]) -> None:
    """Re-read the schedules behind ``names`` from the database into ``state.specs``."""
    ids = [state.specs[name].schedule_id for name in names]
    for row in PeriodicSchedule.objects.enabled().filter(pk__in=ids).values(*SPEC_FIELDS):
        spec = spec_from_values(row)
        state.specs[spec.name] = spec


def _plan(state: _State, prune: bool) -> SchedulePlan:
    """``plan_schedules()``, with the entries a save hook pushed meanwhile re-checked.

    An entry pushed from a newer revision than the one read here means the schedule was saved
    (and pushed) after this run read the database: those schedules are read again, so this
    run never writes an older definition over a newer one.
    """
    plan = plan_schedules(state)
    newer = [name for name in plan.update
             if (_stored_revision(state.stored[name]) or 0) > state.specs[name].revision]
    if newer:
        _refresh_specs(state, newer)
        plan = plan_schedules(state)
    if not prune:
        plan.remove = []
    return plan


def _last_slots(schedule_ids: list[int]) -> dict[int, datetime]:
    """The ledger's latest run of each schedule: a recreated entry continues from it.

    Queried by the range of ids (an index range scan with two parameters, where a list of a
    thousand ids costs more to send than to look up), then narrowed to the ones asked for.
    """
    wanted = set(schedule_ids)
    rows = (TaskRecord.objects
            .filter(schedule_id__gte=min(wanted), schedule_id__lte=max(wanted))
            .values("schedule_id").annotate(last=Max("scheduled_for")))
    return {row["schedule_id"]: row["last"] for row in rows
            if row["last"] and row["schedule_id"] in wanted}


def apply_plan(state: _State, plan: SchedulePlan, progress: Progress) -> None:
    """Write the plan to RedBeat, in pipelined chunks, and record what was pushed.

    An entry that did not exist when the state was read is created from the ledger's last run
    of its schedule; one that did is re-read with its meta by ``push()``, so its
    ``last_run_at`` is kept.
    """
    app = get_celery_app()
    now = timezone.now()
    to_push = plan.create + plan.update
    for index, chunk in enumerate(_chunks(to_push)):
        specs = [state.specs[name] for name in chunk]
        absent = [spec for spec in specs if spec.name not in state.stored]
        present = [spec for spec in specs if spec.name in state.stored]
        if absent:
            redbeat_store.push(app, absent, now, existing={},
                               last_slots=_last_slots([spec.schedule_id for spec in absent]))
        redbeat_store.push(app, present, now)
        progress(f"pushed {min((index + 1) * CHUNK, len(to_push))}/{len(to_push)} entries")
    for chunk in _chunks(plan.remove):
        redbeat_store.remove(app, chunk)
    mark_synced(state.unsynced)


def reconcile_schedules(*, dry_run: bool, prune: bool = True,
                        progress: Progress = lambda message: None) -> SchedulePlan:
    """Diff and (unless ``dry_run``) repair the schedules, without the lock; return the plan.

    ``reconcile()`` is the entry point that serializes concurrent repairs.
    """
    state, plan = _diff(prune, progress)
    if not dry_run:
        apply_plan(state, plan, progress)
    return plan


def _diff(prune: bool, progress: Progress) -> tuple[_State, SchedulePlan]:
    """Read the database, then Redis, and plan; writes nothing."""
    state = _read_database()
    _read_redis(state, progress)
    return state, _plan(state, prune)


def _repair_schedules(*, prune: bool, wait: float,
                      progress: Progress) -> tuple[SchedulePlan | None, bool]:
    """Diff without a lock; repair under the app's lock only if something drifted.

    Many pods starting at once with nothing to repair never touch the lock and write nothing
    to Redis. A drifted state takes the lock, re-reads Redis (another run may have repaired it
    meanwhile) and applies what still differs. Returns the plan applied (None if the lock
    stayed busy for ``wait`` seconds) and whether the run was skipped as busy.
    """
    state, plan = _diff(prune, progress)
    if not plan.drifted:
        mark_synced(state.unsynced)
        return plan, False
    lock = _lock(wait)
    if not lock.acquire():
        return None, True
    try:
        _read_redis(state, progress)
        plan = _plan(state, prune)
        apply_plan(state, plan, progress)
    finally:
        if lock.owned():
            lock.release()
    return plan, False


def _lock(wait: float) -> Any:
    client = redbeat_store.client(get_celery_app())
    return client.lock(f"{app_settings.ENTRY_PREFIX}reconcile:lock", timeout=LOCK_TIMEOUT,
                       blocking_timeout=wait, thread_local=False)


def reconcile(*, dry_run: bool = False, schedules: bool = True, ledger: bool = True,
              prune: bool = True, wait: float = 30.0,
              progress: Progress = lambda message: None) -> ReconcileReport:
    """The whole reconciliation; safe to run from many processes at once.

    The schedules are diffed without a lock; only a drifted state is repaired, under the app's
    reconcile lock, waiting up to ``wait`` seconds for a concurrent repair. If that run still
    holds it, this one skips the schedules (``skipped_busy``): that run is doing the same work.
    The sweeper pass needs no lock (concurrent passes never publish a row twice). A dry run
    takes no lock and writes nothing.
    """
    started = time.monotonic()
    report = ReconcileReport(dry_run=dry_run)
    if schedules:
        if dry_run:
            plan: SchedulePlan | None = reconcile_schedules(dry_run=True, prune=prune,
                                                            progress=progress)
        else:
            plan, report.skipped_busy = _repair_schedules(prune=prune, wait=wait,
                                                          progress=progress)
        if plan is not None:
            report.plan = plan
            report.created, report.updated = len(plan.create), len(plan.update)
            report.removed, report.unchanged = len(plan.remove), plan.unchanged
    if ledger and not dry_run and not report.skipped_busy:
        report.sweep = sweep(time_budget=max(wait, 30.0))
    report.seconds = time.monotonic() - started
    if not dry_run:
        observe_reconcile(report)
    return report
