"""RedBeat entries of the app's schedules: the only module that imports ``redbeat``.

Layout (RedBeat's own, with its configurable key prefix, ``redbeat:`` by default):

- ``<redbeat prefix><ENTRY_PREFIX><pk>`` (e.g. ``redbeat:reliable_tasks:42``): a hash with
  ``definition`` (task, args, kwargs, options, schedule; JSON) and ``meta`` (``last_run_at``,
  ``total_run_count``), one per enabled ``PeriodicSchedule``, named from its primary key;
- its member of RedBeat's sorted set ``<redbeat prefix>:schedule``, scored with the next run.

The schedule's own timing (time zone, catch-up policy, revision) travels in the definition's
``options["reliable_tasks"]``, which ``ReliableRedBeatScheduler`` reads. Nothing else under
RedBeat's prefix is written or deleted here: not the lock, not the statics, not foreign entries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property, lru_cache
from typing import Any

from celery import Celery
from celery.schedules import crontab as celery_crontab
from celery.schedules import schedule as celery_interval
from redbeat.decoder import RedBeatJSONDecoder, RedBeatJSONEncoder, to_timestamp
from redbeat.schedulers import RedBeatSchedulerEntry, ensure_conf, get_redis
from redbeat.schedules import rrule

from reliable_tasks.conf import app_settings
from reliable_tasks.timing import Timing, parse_crontab

#: Key inside ``options`` that carries the schedule's own metadata.
META_OPTION = "reliable_tasks"
#: Name suffix of the sweeper's own entry (installed by the beat scheduler).
SWEEP_ENTRY_SUFFIX = "sweep"


@dataclass(frozen=True)
class ScheduleSpec:
    """What a ``PeriodicSchedule`` looks like to RedBeat: everything a push writes."""

    schedule_id: int
    revision: int
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    interval_seconds: int | None
    crontab: str
    timezone: str
    run_at: datetime | None
    catch_up: str

    def timing(self) -> Timing:
        """The timing, parsed (crontabs with their time zone)."""
        if self.interval_seconds is not None:
            return Timing(interval_seconds=float(self.interval_seconds))
        if self.crontab:
            return Timing(crontab=parse_crontab(self.crontab, self.timezone))
        return Timing(run_at=self.run_at)

    def celery_schedule(self) -> Any:
        """The nearest RedBeat-encodable schedule object (for RedBeat's own tooling)."""
        return _celery_schedule(self.interval_seconds, self.crontab, self.run_at)

    def meta_option(self) -> dict[str, Any]:
        """The schedule's own metadata, stored in the entry's options."""
        return {
            "schedule_id": self.schedule_id,
            "revision": self.revision,
            "interval_seconds": self.interval_seconds,
            "crontab": self.crontab,
            "timezone": self.timezone,
            "run_at": self.run_at.isoformat() if self.run_at else None,
            "catch_up": self.catch_up,
        }

    @cached_property
    def name(self) -> str:
        """The RedBeat entry name of this schedule."""
        return entry_name(self.schedule_id)

    @cached_property
    def definition_json(self) -> str:
        """The ``definition`` field exactly as RedBeat stores it (computed once per spec)."""
        return json.dumps({
            "name": self.name,
            "task": self.task,
            "args": self.args,
            "kwargs": self.kwargs,
            "options": {**self.options, META_OPTION: self.meta_option()},
            "schedule": _encoded_schedule(self.interval_seconds, self.crontab, self.run_at),
            "enabled": True,
        }, cls=RedBeatJSONEncoder, sort_keys=True)

    @cached_property
    def parsed_timing(self) -> Timing:
        """``timing()``, parsed once per spec."""
        return self.timing()


@lru_cache(maxsize=4096)
def _celery_schedule(interval_seconds: int | None, crontab: str, run_at: datetime | None) -> Any:
    if interval_seconds is not None:
        return celery_interval(run_every=timedelta(seconds=interval_seconds))
    if crontab:
        minute, hour, day_of_month, month_of_year, day_of_week = crontab.split()
        return celery_crontab(minute=minute, hour=hour, day_of_month=day_of_month,
                              month_of_year=month_of_year, day_of_week=day_of_week)
    return rrule("SECONDLY", dtstart=run_at, count=1)


@lru_cache(maxsize=4096)
def _encoded_schedule(interval_seconds: int | None, crontab: str,
                      run_at: datetime | None) -> dict[str, Any]:
    """RedBeat's JSON form of a timing; most schedules share a few timings, so it is cached."""
    encoded: dict[str, Any] = RedBeatJSONEncoder().default(
        _celery_schedule(interval_seconds, crontab, run_at))
    return encoded


def spec_from_options(task: str, options: dict[str, Any]) -> ScheduleSpec | None:
    """Rebuild the spec from an entry's options; None for entries that are not schedules."""
    meta = options.get(META_OPTION)
    if not isinstance(meta, dict) or "schedule_id" not in meta:
        return None
    run_at = datetime.fromisoformat(meta["run_at"]) if meta.get("run_at") else None
    return ScheduleSpec(
        schedule_id=int(meta["schedule_id"]), revision=int(meta.get("revision", 0)),
        task=task, args=[], kwargs={},
        options={k: v for k, v in options.items() if k != META_OPTION},
        interval_seconds=meta.get("interval_seconds"), crontab=meta.get("crontab") or "",
        timezone=meta.get("timezone") or "UTC", run_at=run_at,
        catch_up=meta.get("catch_up") or "skip",
    )


@dataclass(frozen=True)
class StoredEntry:
    """An owned entry as read from Redis (its meta is decoded on first use)."""

    name: str
    definition: str | None
    meta: str | None
    score: float | None

    @property
    def last_run_at(self) -> datetime | None:
        """The entry's last run (slot), or None."""
        return decode_meta(self.meta)[0]

    @property
    def total_run_count(self) -> int:
        """How many runs RedBeat counted."""
        return decode_meta(self.meta)[1]


def entry_name(schedule_id: int) -> str:
    """RedBeat entry name of a schedule: the prefix and the immutable primary key."""
    return f"{app_settings.ENTRY_PREFIX}{schedule_id}"


def sweep_entry_name() -> str:
    """RedBeat entry name of the sweeper's periodic pass."""
    return f"{app_settings.ENTRY_PREFIX}{SWEEP_ENTRY_SUFFIX}"


def schedule_id_of(name: str) -> int | None:
    """The schedule's primary key from an entry name, or None for other entries."""
    prefix = app_settings.ENTRY_PREFIX
    suffix = name[len(prefix):] if name.startswith(prefix) else ""
    return int(suffix) if suffix.isdigit() else None


def _key(app: Celery, name: str) -> str:
    return ensure_conf(app).key_prefix + name


def _schedule_key(app: Celery) -> str:
    return ensure_conf(app).schedule_key


def client(app: Celery) -> Any:
    """RedBeat's Redis client for ``app``."""
    return get_redis(app)


def decode_meta(raw: str | None) -> tuple[datetime | None, int]:
    """``last_run_at`` and ``total_run_count`` of a ``meta`` field."""
    if not raw:
        return None, 0
    meta = json.loads(raw, cls=RedBeatJSONDecoder)
    last = meta.get("last_run_at")
    if isinstance(last, datetime) and last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    return last, int(meta.get("total_run_count") or 0)


@lru_cache(maxsize=1024)
def encode_meta(last_run_at: datetime, total_run_count: int) -> str:
    """A ``meta`` field (cached: the entries created by one push mostly share their start)."""
    return json.dumps({"last_run_at": last_run_at.astimezone(UTC),
                       "total_run_count": total_run_count}, cls=RedBeatJSONEncoder)


def decode_definition(raw: str) -> dict[str, Any]:
    """A ``definition`` field, decoded."""
    return json.loads(raw, cls=RedBeatJSONDecoder)


def read_entries(app: Celery, names: Sequence[str], *,
                 with_meta: bool = True) -> dict[str, StoredEntry]:
    """Read many entries in one pipelined round trip; missing ones are left out.

    ``with_meta=False`` reads only the definition and the score (what a diff compares); the
    entries then carry no ``meta`` and must not be given to ``push()`` as ``existing``.
    """
    if not names:
        return {}
    redis = client(app)
    keys = [_key(app, name) for name in names]
    with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            if with_meta:
                pipe.hmget(key, "definition", "meta")
            else:
                pipe.hget(key, "definition")
        pipe.zmscore(_schedule_key(app), keys)
        *fields, scores = pipe.execute()
    entries: dict[str, StoredEntry] = {}
    for name, values, score in zip(names, fields, scores, strict=True):
        definition, meta = values if with_meta else (values, None)
        if definition is None and meta is None and score is None:
            continue
        entries[name] = StoredEntry(name=name, definition=definition, meta=meta, score=score)
    return entries


def owned_entry_names(app: Celery) -> list[str]:
    """Names of every entry under the app's prefix (schedules and the sweeper's), by SCAN."""
    key_prefix = ensure_conf(app).key_prefix
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", key_prefix + app_settings.ENTRY_PREFIX) + "*"
    names = {key[len(key_prefix):] for key in client(app).scan_iter(match=pattern, count=1000)}
    return sorted(names)


def redis_now(app: Celery) -> datetime:
    """The clock of RedBeat's Redis (``TIME``), the same for every host that asks."""
    seconds, microseconds = client(app).time()
    return datetime.fromtimestamp(seconds + microseconds / 1_000_000, tz=UTC)


def entries_due_before(app: Celery, moment: datetime) -> dict[str, datetime]:
    """The app's entries (by name) whose next run RedBeat has due before ``moment``, oldest first.

    Reads RedBeat's schedule (a sorted set scored with each entry's due time); entries outside
    the app's prefix are left out.
    """
    key_prefix = ensure_conf(app).key_prefix
    owned = key_prefix + app_settings.ENTRY_PREFIX
    members = client(app).zrangebyscore(_schedule_key(app), "-inf", f"({moment.timestamp()}",
                                         withscores=True)
    return {key[len(key_prefix):]: datetime.fromtimestamp(score, tz=UTC)
            for key, score in members if key.startswith(owned)}


def next_due(spec: ScheduleSpec, last_slot: datetime) -> datetime | None:
    """The first slot after ``last_slot``."""
    return spec.parsed_timing.next_after(last_slot)


def initial_last_slot(spec: ScheduleSpec, now: datetime) -> datetime:
    """``last_run_at`` of a new entry: its first run is the first slot after now.

    A one-off whose time has passed runs at once.
    """
    if spec.run_at is not None and spec.run_at <= now:
        return spec.run_at - timedelta(microseconds=1)
    return now


def push(app: Celery, specs: Iterable[ScheduleSpec], now: datetime,
         existing: dict[str, StoredEntry] | None = None,
         last_slots: dict[int, datetime] | None = None) -> int:
    """Create or update entries, keeping ``last_run_at`` and ``total_run_count``.

    Reads the current entries in one round trip (unless given), then writes all in one
    pipeline: the meta only where there is none (a beat advancing the entry meanwhile is never
    undone), the definition, and last the schedule scores from the last run (one ZADD), so a
    changed timing is rescheduled from it. The pipeline is not a MULTI: each key is written by
    atomic commands in that order, and beat only reads an entry once its score is set, so it
    never runs a half-written one; skipping MULTI halves the replies to parse. A new entry starts
    from ``last_slots`` (the ledger's latest run of the schedule) when given, else from now.
    Returns how many entries were written.
    """
    specs = list(specs)
    if not specs:
        return 0
    names = [spec.name for spec in specs]
    if existing is None:
        existing = read_entries(app, names)
    last_slots = last_slots or {}
    redis = client(app)
    schedule_key = _schedule_key(app)
    scores: dict[str, float] = {}
    unscheduled: list[str] = []
    with redis.pipeline(transaction=False) as pipe:
        for name, spec in zip(names, specs, strict=True):
            stored = existing.get(name)
            last_slot = stored.last_run_at if stored else None
            key = _key(app, name)
            if last_slot is None:
                last_slot = last_slots.get(spec.schedule_id) or initial_last_slot(spec, now)
                pipe.hsetnx(key, "meta", encode_meta(last_slot, 0))
            pipe.hset(key, "definition", spec.definition_json)
            due = next_due(spec, last_slot)
            if due is None:
                unscheduled.append(key)
            else:
                scores[key] = to_timestamp(due)
        if scores:
            pipe.zadd(schedule_key, scores)
        if unscheduled:
            pipe.zrem(schedule_key, *unscheduled)
        pipe.execute()
    return len(specs)


def advance(app: Celery, name: str, last_slot: datetime, total_run_count: int,
            due: datetime | None) -> None:
    """Record that the entry ran up to ``last_slot`` and when it is due next."""
    key = _key(app, name)
    with client(app).pipeline(transaction=True) as pipe:
        pipe.hset(key, "meta", encode_meta(last_slot, total_run_count))
        if due is None:
            pipe.zrem(_schedule_key(app), key)
        else:
            pipe.zadd(_schedule_key(app), {key: to_timestamp(due)})
        pipe.execute()


def remove(app: Celery, names: Iterable[str]) -> int:
    """Delete owned entries (hash and schedule member) in one round trip."""
    names = [name for name in names if name.startswith(app_settings.ENTRY_PREFIX)]
    if not names:
        return 0
    with client(app).pipeline(transaction=True) as pipe:
        for name in names:
            pipe.zrem(_schedule_key(app), _key(app, name))
            pipe.delete(_key(app, name))
        pipe.execute()
    return len(names)


def entry_class() -> type[RedBeatSchedulerEntry]:
    """RedBeat's entry class (for the beat scheduler)."""
    return RedBeatSchedulerEntry


def lock_key(app: Celery) -> str:
    """The key of RedBeat's beat lock (read only: this app never writes or deletes it)."""
    return str(ensure_conf(app).lock_key)
