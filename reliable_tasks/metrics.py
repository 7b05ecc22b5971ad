"""Prometheus metrics of the ledger, the schedules, the sweeper and the reconciliation.

Numbers come from two places, chosen for a deployment of many processes on many hosts:

- **Counts and ages are read from the database at scrape time** (``LedgerCollector``). The
  database is the shared truth: every web process answers the same, whichever worker did the
  work, and nothing has to be aggregated across processes.
- **Durations of sweeper passes and reconciliations** happen in whatever process ran them (a
  worker's pool process, a beat, a ``manage.py`` run in a job). ``observe_sweep()`` and
  ``observe_reconcile()`` add each one to a small hash in the broker's Redis
  (``<ENTRY_PREFIX>metrics:sweep`` and ``<ENTRY_PREFIX>metrics:reconcile``), which every
  scrape reads. Prometheus' multiprocess mode would not do: it aggregates the processes of one
  host that share a directory, while the sweeper runs on the worker hosts and ``/metrics`` is
  served by the web hosts. These are observations, not truth: if Redis loses them the counters
  restart from zero, which Prometheus' ``rate()`` handles as a counter reset.

Recording never fails or blocks its caller for long: one pipelined round trip over a fresh
connection bounded by ``RELIABLE_TASKS_PUBLISH_TIMEOUT``; an error is logged and dropped.

``prometheus-client`` (the ``metrics`` extra) is needed only to expose the numbers; recording
works without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, cast

from celery import Celery
from django.db.models import Count, F, Max, Min, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from reliable_tasks.celery_app import bounded_broker_connection, get_celery_app
from reliable_tasks.conf import app_settings
from reliable_tasks.models import PeriodicSchedule, TaskRecord, WaitReason, WorkerHeartbeat
from reliable_tasks.states import TaskState

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry

logger = logging.getLogger(__name__)

#: How long the durations' hashes outlive their last update (a removed app leaves nothing).
STORE_TTL = 30 * 24 * 3600
SWEEP_KEY = "metrics:sweep"
RECONCILE_KEY = "metrics:reconcile"
#: Actions of a reconciliation plan, as labels of ``reliable_tasks_reconcile_last_drift``.
DRIFT_ACTIONS = ("create", "update", "remove")


# --- a bounded client of the broker's Redis -----------------------------------------------------


@contextmanager
def broker_redis(app: Celery | None = None, timeout: float | None = None) -> Iterator[Any]:
    """Yield a Redis client of the broker over a fresh connection; close it afterwards.

    See ``bounded_broker_connection`` for the bounds (``timeout``, default
    ``RELIABLE_TASKS_PUBLISH_TIMEOUT``) and the URLs it understands.
    """
    connection = bounded_broker_connection(app or get_celery_app(), timeout)
    try:
        channel: Any = connection.default_channel  # kombu's Redis channel (typed as StdChannel)
        yield channel.client
    finally:
        try:
            connection.release()
        except Exception:  # noqa: BLE001 - the connection is thrown away anyway
            logger.debug("closing a probe connection to the broker failed", exc_info=True)


def _key(name: str) -> str:
    return f"{app_settings.ENTRY_PREFIX}{name}"


# --- recording durations (called by the sweeper and the reconciliation) -------------------------


class SweepOutcome(Protocol):
    """What ``observe_sweep`` reads of a ``reliable_tasks.sweeper.SweepReport``."""

    @property
    def seconds(self) -> float: ...

    def as_dict(self) -> dict[str, Any]: ...


class ReconcileOutcome(Protocol):
    """What ``observe_reconcile`` reads of a ``reliable_tasks.reconcile.ReconcileReport``."""

    @property
    def dry_run(self) -> bool: ...

    @property
    def skipped_busy(self) -> bool: ...

    @property
    def seconds(self) -> float: ...

    @property
    def created(self) -> int: ...

    @property
    def updated(self) -> int: ...

    @property
    def removed(self) -> int: ...

    @property
    def plan(self) -> object | None: ...


def _record(key: str, increments: Mapping[str, float], values: Mapping[str, float]) -> None:
    """Add ``increments`` to and set ``values`` in the hash ``key``; log and drop any error."""
    try:
        with broker_redis() as client, client.pipeline(transaction=True) as pipe:
            for name, amount in increments.items():
                if isinstance(amount, int):
                    pipe.hincrby(key, name, amount)
                else:
                    pipe.hincrbyfloat(key, name, amount)
            if values:
                pipe.hset(key, mapping=dict(values))
            pipe.expire(key, STORE_TTL)
            pipe.execute()
    except Exception as exc:  # noqa: BLE001 - metrics must never fail the work they measure
        logger.warning("could not record metrics in the broker's Redis (%s): %r", key, exc)


def observe_sweep(report: SweepOutcome) -> None:
    """Record one sweeper pass: its duration, and the rows each step handled (counters)."""
    increments: dict[str, float] = {"count": 1, "seconds_sum": float(report.seconds)}
    for name, value in report.as_dict().items():
        if isinstance(value, bool):
            increments[f"events:{name}"] = int(value)
        elif isinstance(value, int):
            increments[f"rows:{name}"] = value
    _record(_key(SWEEP_KEY), increments,
            {"last_seconds": float(report.seconds), "last_at": time.time()})


def observe_reconcile(report: ReconcileOutcome) -> None:
    """Record one real reconciliation: its duration, and the drift it found and repaired.

    Dry runs (``--dry-run``, ``--check``, the admin's preview) write nothing anywhere, this
    included; a run skipped because another one held the lock did nothing.
    """
    if report.dry_run or report.skipped_busy:
        return
    now = time.time()
    values: dict[str, float] = {"last_seconds": float(report.seconds), "last_at": now}
    if report.plan is not None:
        values.update({"drift:create": report.created, "drift:update": report.updated,
                       "drift:remove": report.removed, "drift_at": now})
    _record(_key(RECONCILE_KEY), {"count": 1, "seconds_sum": float(report.seconds)}, values)


def _decode(raw: Mapping[Any, Any]) -> dict[str, float]:
    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    return {text(name): float(text(value)) for name, value in raw.items()}


def read_observations() -> tuple[dict[str, float], dict[str, float]] | None:
    """The sweep and reconcile hashes, or None if the broker's Redis did not answer."""
    try:
        with broker_redis() as client, client.pipeline(transaction=False) as pipe:
            pipe.hgetall(_key(SWEEP_KEY))
            pipe.hgetall(_key(RECONCILE_KEY))
            sweep, reconcile = pipe.execute()
    except Exception as exc:  # noqa: BLE001 - the scrape goes on without them
        logger.warning("could not read the sweeper's metrics from the broker's Redis: %r", exc)
        return None
    return _decode(sweep), _decode(reconcile)


# --- reading the database ----------------------------------------------------------------------


def oldest_pending_age(now: datetime | None = None) -> float | None:
    """Seconds the longest-waiting PENDING task has been publishable, or None if none is.

    A task waits from its creation, or from its ETA when it was held in the database for a
    long delay; a held task whose ETA is still ahead is not waiting. Served by the
    ``(state, created_at)`` index: only PENDING rows are read.
    """
    now = now or timezone.now()
    since = (TaskRecord.objects.filter(state=TaskState.PENDING)
             .filter(Q(eta__isnull=True) | Q(eta__lte=now))
             .order_by()
             .aggregate(since=Min(Greatest("created_at", Coalesce("eta", "created_at"))))
             ["since"])
    return max((now - since).total_seconds(), 0.0) if since is not None else None


def drifted_schedules() -> int:
    """Schedules whose latest revision RedBeat has not seen (``synced_revision < revision``)."""
    return PeriodicSchedule.objects.needing_sync().order_by().count()


def live_workers(now: datetime | None = None) -> int:
    """Workers whose heartbeat is fresh (``WorkerHeartbeat.is_alive()``, in one query)."""
    now = now or timezone.now()
    fresh_since = now - timedelta(seconds=app_settings.LEASE_TIMEOUT)
    return WorkerHeartbeat.objects.filter(
        stopped_at__isnull=True, last_seen_at__gt=fresh_since).order_by().count()


@dataclass
class TaskCounts:
    """Per task name and state: rows; per task name: retries (runs after the first),
    duplicate deliveries, deliveries deferred by a limit."""

    rows: dict[tuple[str, str], int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    deferrals: dict[str, int] = field(default_factory=dict)


def task_counts() -> TaskCounts:
    """One grouped aggregate over the ledger (the rows kept per ``RETENTION``)."""
    counts = TaskCounts()
    rows = (TaskRecord.objects.order_by().values("task_name", "state")
            .annotate(row_count=Count("pk"), attempt_sum=Sum("attempts"),
                      ran_count=Count("pk", filter=Q(attempts__gte=1)),
                      duplicate_sum=Sum("duplicate_deliveries"),
                      deferral_sum=Sum("deferrals")))
    for row in rows:
        name = row["task_name"]
        counts.rows[(name, row["state"])] = row["row_count"]
        # A row that ran n times was retried n - 1 times; subtracting in Python keeps the
        # SQL free of unsigned arithmetic (MySQL's PositiveIntegerField).
        retries = (row["attempt_sum"] or 0) - row["ran_count"]
        counts.retries[name] = counts.retries.get(name, 0) + retries
        counts.duplicates[name] = counts.duplicates.get(name, 0) + (row["duplicate_sum"] or 0)
        counts.deferrals[name] = counts.deferrals.get(name, 0) + (row["deferral_sum"] or 0)
    return counts


# --- reading the database: the load of the limit keys ------------------------------------------

#: Keys listed one by one (those with the most waiting rows first); the rest are summed.
TOP_KEYS = 20
#: The ``key`` label of the keys not exported one by one (a key of that very name joins them,
#: so that no two samples share their labels).
OTHER_KEY = "other"
#: The rows holding or promised a slot of a concurrency key, and those waiting for one: a woken
#: row (PENDING or QUEUED) keeps its ``waiting_for`` until it starts.
_CONCURRENCY_ROWS = Q(concurrency_key__isnull=False) & (
    Q(state=TaskState.STARTED)
    | Q(state__in=[TaskState.WAITING, TaskState.PENDING, TaskState.QUEUED],
        waiting_for=WaitReason.CONCURRENCY))
_RATE_ROWS = Q(rate_key__isnull=False, state=TaskState.WAITING, waiting_for=WaitReason.RATE)
_WOKEN = Q(state__in=[TaskState.PENDING, TaskState.QUEUED])


@dataclass(frozen=True)
class ConcurrencyKeyLoad:
    """One concurrency key: its running rows, those woken for a slot (not started yet), and
    those WAITING for one."""

    key: str
    running: int
    woken: int
    waiting: int
    #: The largest ``concurrency_limit`` of these rows (the rows of a key normally agree).
    limit: int | None
    #: The last publish (else the creation) of its longest-waiting row: its wait began at a
    #: delivery after it. None when none waits.
    waiting_since: datetime | None

    @property
    def free(self) -> int:
        """Slots neither running nor promised to a woken row (by ``limit``)."""
        return max((self.limit or 0) - self.running - self.woken, 0)


@dataclass(frozen=True)
class RateKeyLoad:
    """One rate key: its rows WAITING for the rate."""

    key: str
    waiting: int
    #: A ``rate_limit`` of these rows (the largest as text, if they differ).
    rate: str
    #: When the first of them is sent again (``next_attempt_at``).
    next_at: datetime | None


@dataclass(frozen=True)
class OtherKeys:
    """The keys not listed one by one, their rows summed."""

    keys: int = 0
    running: int = 0
    woken: int = 0
    waiting: int = 0


@dataclass
class LimitLoad:
    """The busiest concurrency and rate keys (``limit_load``), and the others summed."""

    concurrency: list[ConcurrencyKeyLoad] = field(default_factory=list)
    rate: list[RateKeyLoad] = field(default_factory=list)
    other_concurrency: OtherKeys = field(default_factory=OtherKeys)
    other_rate: OtherKeys = field(default_factory=OtherKeys)


def concurrency_key_rows() -> QuerySet[Any, Any]:
    """Per concurrency key with running, woken or waiting rows: ``key``, ``running``,
    ``woken``, ``waiting``, ``limit_max``, ``waiting_since`` (one grouped aggregate over
    unfinished limited rows; finished rows are never read). The most waiting first."""
    waiting = Q(state=TaskState.WAITING)
    return (TaskRecord.objects.filter(_CONCURRENCY_ROWS).order_by()
            .values(key=F("concurrency_key"))
            .annotate(running=Count("pk", filter=Q(state=TaskState.STARTED)),
                      woken=Count("pk", filter=_WOKEN), waiting=Count("pk", filter=waiting),
                      limit_max=Max("concurrency_limit"),
                      waiting_since=Min(Coalesce("published_at", "created_at"), filter=waiting))
            .order_by("-waiting", "-running", "key"))


def _rate_key_rows() -> QuerySet[Any, Any]:
    return (TaskRecord.objects.filter(_RATE_ROWS).order_by().values(key=F("rate_key"))
            .annotate(waiting=Count("pk"), rate=Max("rate_limit"),
                      next_at=Min("next_attempt_at"))
            .order_by("-waiting", "key"))


def _top(rows: QuerySet[Any, Any], top: int,
         exclude: str | None) -> tuple[list[dict[str, Any]], bool]:
    """The first ``top`` rows but ``exclude``'s, and whether some were left out."""
    fetched = list(rows[: top + 1])
    listed = [row for row in fetched if row["key"] != exclude][:top]
    return listed, len(listed) < len(fetched)


def _totals() -> dict[str, int]:
    """All keys' rows summed: one aggregate over the rows ``limit_load`` groups."""
    concurrency, rate = _CONCURRENCY_ROWS, _RATE_ROWS
    totals = TaskRecord.objects.filter(concurrency | rate).order_by().aggregate(
        concurrency_keys=Count("concurrency_key", distinct=True, filter=concurrency),
        running=Count("pk", filter=concurrency & Q(state=TaskState.STARTED)),
        woken=Count("pk", filter=concurrency & _WOKEN),
        waiting=Count("pk", filter=concurrency & Q(state=TaskState.WAITING)),
        rate_keys=Count("rate_key", distinct=True, filter=rate),
        rate_waiting=Count("pk", filter=rate))
    return {name: int(value or 0) for name, value in totals.items()}


def limit_load(top: int = TOP_KEYS, exclude: str | None = None) -> LimitLoad:
    """The ``top`` concurrency keys and the ``top`` rate keys with the most waiting rows, and
    the other keys (``exclude`` among them) summed.

    Two grouped aggregates over the unfinished limited rows, and a third to sum the keys left
    out when some were; the rows returned are bounded by ``top`` whatever the number of keys.
    """
    if top < 0:
        raise ValueError(f"top must be 0 or more, not {top!r}")
    concurrency, more_concurrency = _top(concurrency_key_rows(), top, exclude)
    rate, more_rate = _top(_rate_key_rows(), top, exclude)
    load = LimitLoad(
        concurrency=[ConcurrencyKeyLoad(
            key=row["key"], running=row["running"], woken=row["woken"], waiting=row["waiting"],
            limit=row["limit_max"], waiting_since=row["waiting_since"]) for row in concurrency],
        rate=[RateKeyLoad(key=row["key"], waiting=row["waiting"], rate=row["rate"],
                          next_at=row["next_at"]) for row in rate])
    if not (more_concurrency or more_rate):
        return load
    totals = _totals()

    def rest(total: str, listed: Sequence[ConcurrencyKeyLoad | RateKeyLoad],
             attribute: str) -> int:
        # Read apart from the grouped rows: a row that changed meanwhile must not go below 0.
        return max(totals[total] - sum(getattr(item, attribute) for item in listed), 0)

    if more_concurrency:
        listed = load.concurrency
        load.other_concurrency = OtherKeys(
            keys=max(totals["concurrency_keys"] - len(listed), 0),
            running=rest("running", listed, "running"), woken=rest("woken", listed, "woken"),
            waiting=rest("waiting", listed, "waiting"))
    if more_rate:
        load.other_rate = OtherKeys(keys=max(totals["rate_keys"] - len(load.rate), 0),
                                    waiting=rest("rate_waiting", load.rate, "waiting"))
    return load


# --- the collector -----------------------------------------------------------------------------


class LedgerCollector:
    """A Prometheus collector that reads the database (and the durations' hashes) per scrape.

    Register it in any ``CollectorRegistry`` (``registry()`` builds one with it alone); a scrape
    runs a handful of queries: one grouped aggregate over the ledger, the oldest pending row
    (PENDING rows only), counts of schedules and workers, the load of the limit keys (two or
    three aggregates over unfinished limited rows), and one Redis round trip. The limit keys
    are labels: ``top_keys`` of each kind, the busiest, and the rest summed under
    ``key="other"``, so that their number stays bounded whatever keys tasks use.
    """

    def __init__(self, now: Callable[[], datetime] = timezone.now,
                 observations: bool = True, top_keys: int = TOP_KEYS) -> None:
        if isinstance(top_keys, bool) or not isinstance(top_keys, int) or top_keys < 0:
            raise ValueError(f"top_keys must be an integer of 0 or more, not {top_keys!r}")
        self._now = now
        self._observations = observations
        self._top_keys = top_keys

    def describe(self) -> list[Metric]:
        """Nothing: registering must not query the database."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Read everything and yield the metric families."""
        now = self._now()
        yield from self._tasks()
        yield from self._limits()
        yield from self._health(now)
        if self._observations:
            yield from self._durations(read_observations())

    def _tasks(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        counts = task_counts()
        rows = GaugeMetricFamily(
            "reliable_tasks_tasks", "Rows in the task ledger, by task name and state.",
            labels=["task", "state"])
        for (name, state), number in sorted(counts.rows.items()):
            rows.add_metric([name, state], number)
        yield rows
        yield GaugeMetricFamily(
            "reliable_tasks_lost_tasks",
            "Tasks in the LOST state: their worker died and they may not re-run by themselves.",
            value=sum(n for (_, state), n in counts.rows.items() if state == TaskState.LOST))
        retries = GaugeMetricFamily(
            "reliable_tasks_task_retries",
            "Runs after the first, summed over the rows kept in the ledger, by task name.",
            labels=["task"])
        duplicates = GaugeMetricFamily(
            "reliable_tasks_duplicate_deliveries",
            "Deliveries suppressed by the claim (the task had finished or was running), "
            "summed over the rows kept in the ledger, by task name.", labels=["task"])
        deferrals = GaugeMetricFamily(
            "reliable_tasks_limit_deferrals",
            "Deliveries deferred by a concurrency or rate limit, summed over the rows kept in "
            "the ledger, by task name (it only grows, until retention prunes rows).",
            labels=["task"])
        for name in sorted(counts.retries):
            retries.add_metric([name], counts.retries[name])
            duplicates.add_metric([name], counts.duplicates[name])
            deferrals.add_metric([name], counts.deferrals[name])
        yield retries
        yield duplicates
        yield deferrals

    def _limits(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        load = limit_load(self._top_keys, exclude=OTHER_KEY)
        running = GaugeMetricFamily(
            "reliable_tasks_limit_running",
            f"Tasks running (STARTED) per concurrency key: the {self._top_keys} keys with the "
            f"most waiting tasks, the others summed under key=\"{OTHER_KEY}\".",
            labels=["key"])
        waiting = GaugeMetricFamily(
            "reliable_tasks_limit_waiting",
            f"Tasks WAITING, per concurrency key (reason=\"concurrency\": for a slot) or rate "
            f"key (reason=\"rate\": for their start): the {self._top_keys} keys of each with "
            f"the most, the others summed under key=\"{OTHER_KEY}\".",
            labels=["key", "reason"])
        for item in load.concurrency:
            running.add_metric([item.key], item.running)
            waiting.add_metric([item.key, WaitReason.CONCURRENCY], item.waiting)
        if load.other_concurrency.keys:
            running.add_metric([OTHER_KEY], load.other_concurrency.running)
            waiting.add_metric([OTHER_KEY, WaitReason.CONCURRENCY],
                               load.other_concurrency.waiting)
        for rated in load.rate:
            waiting.add_metric([rated.key, WaitReason.RATE], rated.waiting)
        if load.other_rate.keys:
            waiting.add_metric([OTHER_KEY, WaitReason.RATE], load.other_rate.waiting)
        yield running
        yield waiting

    def _health(self, now: datetime) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "reliable_tasks_oldest_pending_age_seconds",
            "Seconds the longest-waiting PENDING task has been publishable (0 if none).",
            value=oldest_pending_age(now) or 0.0)
        schedules = PeriodicSchedule.objects.order_by().aggregate(
            enabled_count=Count("pk", filter=Q(enabled=True)),
            disabled_count=Count("pk", filter=Q(enabled=False)),
            drifted_count=Count("pk", filter=Q(synced_revision__lt=F("revision"))))
        family = GaugeMetricFamily("reliable_tasks_schedules", "Periodic schedules.",
                                   labels=["enabled"])
        family.add_metric(["true"], schedules["enabled_count"])
        family.add_metric(["false"], schedules["disabled_count"])
        yield family
        yield GaugeMetricFamily(
            "reliable_tasks_schedules_drifted",
            "Schedules whose latest revision was not pushed to RedBeat yet "
            "(synced_revision < revision); the sweeper and reconcile_tasks repair them.",
            value=schedules["drifted_count"])
        yield GaugeMetricFamily(
            "reliable_tasks_workers_alive", "Workers whose heartbeat is fresh.",
            value=live_workers(now))

    def _durations(self, observed: tuple[dict[str, float], dict[str, float]] | None,
                   ) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "reliable_tasks_metrics_store_up",
            "1 if the sweeper's and reconcile's durations could be read from the broker's "
            "Redis for this scrape.", value=0 if observed is None else 1)
        if observed is None:
            return
        sweep, reconcile = observed
        yield from _run_families("sweep", "sweeper pass", sweep)
        yield from _sweep_counters(sweep)
        yield from _run_families("reconcile", "reconciliation (reconcile_tasks)",
                                 reconcile)
        if "drift_at" in reconcile:
            drift = GaugeMetricFamily(
                "reliable_tasks_reconcile_last_drift",
                "RedBeat entries the latest reconciliation found drifted and created, updated "
                "or removed.", labels=["action"])
            for action in DRIFT_ACTIONS:
                drift.add_metric([action], reconcile.get(f"drift:{action}", 0.0))
            yield drift
            yield GaugeMetricFamily(
                "reliable_tasks_reconcile_last_drift_timestamp_seconds",
                "When the latest reconciliation that compared schedules ran (Unix time).",
                value=reconcile["drift_at"])


def _run_families(name: str, what: str, data: Mapping[str, float]) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily

    yield SummaryMetricFamily(
        f"reliable_tasks_{name}_duration_seconds", f"Duration of each {what}, in seconds.",
        count_value=int(data.get("count", 0)), sum_value=data.get("seconds_sum", 0.0))
    if "last_at" in data:
        yield GaugeMetricFamily(
            f"reliable_tasks_{name}_last_duration_seconds",
            f"Duration of the latest {what}, in seconds.", value=data["last_seconds"])
        yield GaugeMetricFamily(
            f"reliable_tasks_{name}_last_run_timestamp_seconds",
            f"When the latest {what} ended (Unix time).", value=data["last_at"])


def _sweep_counters(data: Mapping[str, float]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily

    rows = CounterMetricFamily(
        "reliable_tasks_sweep_rows",
        "Rows the sweeper handled, by step (published, publish_failed, expired_leases_retried, "
        "expired_leases_lost, requeued_after_broker_loss, requeued_missing_messages, "
        "schedules_pushed, pruned).",
        labels=["step"])
    events = CounterMetricFamily(
        "reliable_tasks_sweep_events", "Sweeper passes that saw an event, by event "
        "(broker_changed: the broker's Redis lost its data).", labels=["event"])
    for name, value in sorted(data.items()):
        kind, _, label = name.partition(":")
        if kind == "rows":
            rows.add_metric([label], value)
        elif kind == "events":
            events.add_metric([label], value)
    yield rows
    yield events


def registry(collector: LedgerCollector | None = None) -> CollectorRegistry:
    """A registry holding the app's collector alone (what the ``/metrics`` view exposes)."""
    from prometheus_client import CollectorRegistry

    result = CollectorRegistry(auto_describe=False)
    # Duck-typed (no subclass of prometheus_client's Collector: importing this module must
    # not need prometheus-client).
    result.register(cast("Collector", collector or LedgerCollector()))
    return result
