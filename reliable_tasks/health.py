"""What an operator needs first: is beat running and recording its runs, is RedBeat in line with
the database, can Redis drop keys (or, behind Sentinel, published tasks), are workers alive, is
anything stuck, how busy are the limit keys.

``report()`` gathers it into a ``HealthReport``. Each probe that fails (Redis down, a database
error) becomes a ``Problem`` of the report, never an exception, so the admin page renders when
Redis is down. Nothing here writes: RedBeat's lock and entries are only read, the schedule diff is
a dry run. URLs are shown without their passwords, and so are error messages.

``hourly_activity()`` counts the tasks that finished in each of the last hours, for the admin's
chart, in one aggregate query.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from django.db.models import Count, F, Q
from django.db.models.functions import TruncHour
from django.utils import timezone

from reliable_tasks import redbeat_store
from reliable_tasks.celery_app import get_celery_app
from reliable_tasks.conf import app_settings
from reliable_tasks.metrics import LimitLoad, concurrency_key_rows, limit_load
from reliable_tasks.models import PeriodicSchedule, TaskRecord, WaitReason, WorkerHeartbeat
from reliable_tasks.publisher import producer_for, shortest_safe_down_after
from reliable_tasks.reconcile import reconcile_schedules
from reliable_tasks.sentinel import down_after_seconds, sanitize_url
from reliable_tasks.states import FINISHED_STATES, TaskState

ERROR = "error"
WARNING = "warning"
#: The only ``maxmemory-policy`` under which Redis never drops a key to free memory.
SAFE_POLICY = "noeviction"
#: Drifted entry names listed per action (create, update, remove); the counts are complete.
NAMES_SHOWN = 20
#: Dead workers listed (the most recently seen first).
DEAD_WORKERS_SHOWN = 20
#: A worker that stopped beating without a clean shutdown is a problem for this long.
RECENTLY_LOST = timedelta(hours=24)
#: A schedule's run is overdue once RedBeat has had it due for this many seconds, measured on
#: RedBeat's Redis clock. Beat wakes at least every 5 s, retries a failed tick after 1 s, and a
#: dead beat's lock expires after 20 s, when a standby takes over and runs what is due at once:
#: a run this late while a beat holds the lock means that beat is alive but cannot record it.
#: It does not depend on ``MISSED_RUN_GRACE``, which decides what beat does with a late run.
OVERDUE_AFTER = 60.0
#: Concurrency keys and rate keys listed (each kind, those with the most waiting tasks first).
KEYS_SHOWN = 20
#: Broker URL schemes served by kombu's Redis transports.
_REDIS_SCHEMES = frozenset({"redis", "rediss", "sentinel", "redis+socket"})
_URL_IN_TEXT = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """Something an operator should act on: ``severity`` is ``"error"`` or ``"warning"``."""

    severity: str
    topic: str
    message: str


@dataclass(frozen=True)
class BeatLock:
    """RedBeat's beat lock: its token is opaque, so only whether it is held and for how long."""

    key: str
    held: bool
    #: Seconds left before the lock expires; None when it is not held or has no expiry.
    ttl_seconds: float | None


@dataclass(frozen=True)
class OverdueRuns:
    """The app's RedBeat entries due more than ``OVERDUE_AFTER`` seconds ago."""

    count: int
    #: How late the oldest is, in seconds (0 when none is).
    oldest_seconds: float
    #: Entry names, the oldest first, at most ``NAMES_SHOWN``.
    names: list[str]
    #: The grace a run had before it counted (``OVERDUE_AFTER``).
    after_seconds: float = OVERDUE_AFTER

    def describe(self) -> str:
        """What is overdue and what it means, for a report."""
        return (f"{self.count} schedule run(s) are overdue, the oldest by "
                f"{self.oldest_seconds:.0f} s: beat cannot record or advance them (can it reach "
                f"the database, does RedBeat's Redis accept writes? Its log says which)")


@dataclass(frozen=True)
class RedisMemory:
    """The ``maxmemory-policy`` of one Redis server, read with ``CONFIG GET`` or ``INFO``."""

    role: str
    url: str
    policy: str | None = None
    source: str = ""
    error: str = ""

    @property
    def safe(self) -> bool:
        """Whether the server never evicts keys (unknown counts as not safe)."""
        return self.policy == SAFE_POLICY


@dataclass(frozen=True)
class Drift:
    """How RedBeat differs from the database (``reconcile_tasks --dry-run``)."""

    create: int
    update: int
    remove: int
    unchanged: int
    #: Entry names per action, at most ``NAMES_SHOWN`` each.
    names: dict[str, list[str]]

    @property
    def drifted(self) -> bool:
        """Whether anything differs."""
        return bool(self.create or self.update or self.remove)


@dataclass(frozen=True)
class Worker:
    """One worker's last heartbeat."""

    hostname: str
    pid: int
    running: int
    last_seen_at: datetime
    stopped_at: datetime | None
    alive: bool


@dataclass(frozen=True)
class StuckWait:
    """A concurrency key whose tasks wait for a slot it has free, longer than the sweeper
    takes to wake them (``stuck_wait_after()``)."""

    key: str
    limit: int
    running: int
    woken: int
    waiting: int
    #: The last publish (else the creation) of its longest-waiting task.
    waiting_since: datetime

    @property
    def free(self) -> int:
        """Slots neither running nor promised to a woken task."""
        return self.limit - self.running - self.woken


@dataclass
class HealthReport:
    """Everything ``report()`` found; ``problems`` says what needs attention, errors first."""

    generated_at: datetime
    beat_lock: BeatLock | None = None
    #: Runs overdue while a beat holds the lock (None: not checked, as no beat holds it).
    overdue: OverdueRuns | None = None
    #: The last run of the sweeper's entry, which beat runs every ``SWEEP_INTERVAL``.
    last_beat_at: datetime | None = None
    drift: Drift | None = None
    #: Schedules whose latest revision RedBeat has not seen, and how many of them failed.
    unsynced_schedules: int | None = None
    sync_errors: int | None = None
    redis: list[RedisMemory] = field(default_factory=list)
    workers_alive: list[Worker] = field(default_factory=list)
    workers_dead: list[Worker] = field(default_factory=list)
    #: Since when the oldest task due for publishing has waited (None: nothing waits).
    oldest_pending_since: datetime | None = None
    state_counts: dict[str, int] = field(default_factory=dict)
    #: The busiest concurrency and rate keys (at most ``KEYS_SHOWN`` of each), the others summed.
    limits: LimitLoad | None = None
    #: Concurrency keys whose tasks wait for a free slot longer than the sweeper should take.
    stuck_waits: list[StuckWait] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errors(self) -> list[Problem]:
        """The problems of severity ``error``."""
        return [problem for problem in self.problems if problem.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        """The problems of severity ``warning``."""
        return [problem for problem in self.problems if problem.severity == WARNING]

    @property
    def ok(self) -> bool:
        """Whether no check found an error."""
        return not self.errors

    @property
    def oldest_pending_age(self) -> timedelta | None:
        """How long the oldest task due for publishing has waited."""
        if self.oldest_pending_since is None:
            return None
        return self.generated_at - self.oldest_pending_since

    def add(self, severity: str, topic: str, message: str) -> None:
        """Record a problem."""
        self.problems.append(Problem(severity=severity, topic=topic, message=message))

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (datetimes as ISO 8601 strings)."""
        data = _plain(asdict(self))
        data["ok"] = self.ok
        age = self.oldest_pending_age
        data["oldest_pending_age_seconds"] = None if age is None else age.total_seconds()
        return data


def _plain(value: Any) -> Any:
    """``value`` with every datetime turned into an ISO 8601 string."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def sanitize(text: str) -> str:
    """``text`` with the password of every URL in it masked, in ``;``-separated lists too."""
    return _URL_IN_TEXT.sub(lambda match: sanitize_url(match.group(0)), text)


def _describe(exc: BaseException) -> str:
    return sanitize(f"{type(exc).__name__}: {exc}")[:500]


def _probe(health: HealthReport, topic: str, what: str, check: Callable[[], None]) -> bool:
    """Run one check; its failure becomes an error of the report. True when it ran."""
    try:
        check()
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none is raised
        health.add(ERROR, topic, f"{what} failed: {_describe(exc)}")
        return False
    return True


# --- the report ----------------------------------------------------------------------------------


def report(now: datetime | None = None) -> HealthReport:
    """Look at beat, RedBeat, Redis, the workers and the ledger; never raises."""
    started = time.monotonic()
    result = HealthReport(generated_at=now or timezone.now())
    app = get_celery_app()
    redbeat_url = _url(app.conf.get("redbeat_redis_url") or app.conf.broker_url)
    redbeat_up = _probe(result, "redbeat", f"Reading RedBeat's Redis ({redbeat_url})",
                        lambda: _check_beat(result, app))
    if redbeat_up:
        _probe(result, "schedules", "Comparing the schedules with RedBeat",
               lambda: _check_drift(result))
    _probe(result, "schedules", "Counting unsynced schedules", lambda: _check_unsynced(result))
    _check_memory_policies(result, app, redbeat_up)
    if _broker_scheme(app) == "sentinel":
        _probe(result, "redis", "Asking the broker's sentinels for their failover delay",
               lambda: _check_failover_delay(result, app))
    _probe(result, "workers", "Reading the worker heartbeats", lambda: _check_workers(result))
    _probe(result, "tasks", "Finding the oldest pending task", lambda: _check_pending(result))
    _probe(result, "tasks", "Counting tasks per state", lambda: _count_states(result))
    _probe(result, "limits", "Reading the load of the limit keys", lambda: _check_limits(result))
    result.problems.sort(key=lambda problem: problem.severity != ERROR)
    result.seconds = time.monotonic() - started
    return result


def _url(value: Any) -> str:
    """A broker or Redis URL for display, without its password."""
    if isinstance(value, list | tuple):
        value = ";".join(str(item) for item in value)
    return sanitize_url(str(value or ""))


def overdue_runs(app: Any) -> OverdueRuns:
    """The app's schedule runs that RedBeat has had due for more than ``OVERDUE_AFTER`` s.

    Read only, on RedBeat's Redis and its clock. A beat that holds the lock advances an entry
    as soon as it recorded the run, so an overdue entry while the lock is held is a beat that
    keeps its lock but cannot record runs (a standby cannot take over).
    """
    now = redbeat_store.redis_now(app)
    due = redbeat_store.entries_due_before(app, now - timedelta(seconds=OVERDUE_AFTER))
    oldest = next(iter(due.values()), now)
    return OverdueRuns(count=len(due), oldest_seconds=(now - oldest).total_seconds(),
                       names=list(due)[:NAMES_SHOWN])


def _check_beat(health: HealthReport, app: Any) -> None:
    """RedBeat's lock (held? for how long?), the sweeper entry's last run (beat's last tick),
    and, while the lock is held, runs that are overdue."""
    key = redbeat_store.lock_key(app)
    pttl = int(redbeat_store.client(app).pttl(key))
    health.beat_lock = BeatLock(key=key, held=pttl != -2,
                                ttl_seconds=pttl / 1000 if pttl >= 0 else None)
    sweep_name = redbeat_store.sweep_entry_name()
    sweep_entry = redbeat_store.read_entries(app, [sweep_name]).get(sweep_name)
    health.last_beat_at = sweep_entry.last_run_at if sweep_entry else None
    if pttl == -2:
        health.add(ERROR, "beat", (
            f"No beat holds RedBeat's lock ({key}): periodic tasks and the sweeper do not run. "
            "Start celery beat with -S reliable_tasks.beat:ReliableRedBeatScheduler."))
    elif pttl == -1:
        health.add(WARNING, "beat", (
            f"RedBeat's lock ({key}) has no expiry: if its beat dies, no other beat can take "
            "over until the key is removed."))
    if pttl != -2:
        health.overdue = overdue_runs(app)
        if health.overdue.count:
            health.add(WARNING, "beat",
                       f"Beat holds RedBeat's lock but {health.overdue.describe()}.")
    stale_after = sweeper_late_after()
    if health.last_beat_at is None:
        if pttl != -2:
            health.add(WARNING, "beat", (
                "Beat holds the lock but the sweeper's entry has not run yet: beat may have "
                "just started."))
    elif (health.generated_at - health.last_beat_at).total_seconds() > stale_after:
        health.add(WARNING, "beat", (
            f"Beat last ran the sweeper at {health.last_beat_at:%Y-%m-%d %H:%M:%S %Z}, more than "
            f"{stale_after:g} s ago although it runs every {app_settings.SWEEP_INTERVAL:g} s: "
            "beat may be stuck or stopped."))


def _check_drift(health: HealthReport) -> None:
    """The dry-run plan of ``reconcile_tasks``: entries to create, update and remove."""
    plan = reconcile_schedules(dry_run=True)
    health.drift = Drift(
        create=len(plan.create), update=len(plan.update), remove=len(plan.remove),
        unchanged=plan.unchanged,
        names={"create": plan.create[:NAMES_SHOWN], "update": plan.update[:NAMES_SHOWN],
               "remove": plan.remove[:NAMES_SHOWN]},
    )
    if health.drift.drifted:
        total = health.drift.create + health.drift.update + health.drift.remove
        health.add(WARNING, "schedules", (
            f"{total} RedBeat entr{'y differs' if total == 1 else 'ies differ'} from the "
            f"database ({health.drift.create} to create, {health.drift.update} to update, "
            f"{health.drift.remove} to remove): reconcile to repair."))


def _check_unsynced(health: HealthReport) -> None:
    """Schedules changed since their last push, and those whose push failed."""
    counts = PeriodicSchedule.objects.needing_sync().aggregate(
        unsynced=Count("pk"), errors=Count("pk", filter=~Q(sync_error="")))
    health.unsynced_schedules, health.sync_errors = counts["unsynced"], counts["errors"]
    if health.sync_errors:
        health.add(WARNING, "schedules", (
            f"{health.sync_errors} schedule(s) could not be pushed to RedBeat; the sweeper "
            "retries (see their sync state)."))


def _check_memory_policies(health: HealthReport, app: Any, redbeat_up: bool) -> None:
    """``maxmemory-policy`` of the broker's Redis and of RedBeat's (once if they are one)."""
    broker_url = _url(app.conf.broker_url)
    redbeat_url = _url(app.conf.get("redbeat_redis_url") or app.conf.broker_url)
    if broker_url != redbeat_url and _broker_scheme(app) in _REDIS_SCHEMES:
        health.redis.append(_memory_policy(health, "broker", broker_url,
                                           lambda: _broker_policy(app)))
    role = "broker and RedBeat" if broker_url == redbeat_url else "RedBeat"
    if redbeat_up:
        health.redis.append(_memory_policy(
            health, role, redbeat_url, lambda: read_memory_policy(redbeat_store.client(app))))
    else:  # its failure is reported already
        health.redis.append(RedisMemory(role=role, url=redbeat_url, error="unreachable"))


def _broker_scheme(app: Any) -> str:
    return urlsplit(_url(app.conf.broker_url).split(";")[0]).scheme


def _check_failover_delay(health: HealthReport, app: Any) -> None:
    """Behind Sentinel: a failover sooner than a publish gives up can lose published tasks."""
    with producer_for(app) as producer:
        down_after = down_after_seconds(getattr(producer.channel, "pool", None))
    shortest = shortest_safe_down_after()
    if down_after is not None and down_after <= shortest:
        health.add(WARNING, "redis", (
            f"The broker's sentinels fail a silent master over after {down_after:g} s: a "
            f"publish that waits on a hung master (up to RELIABLE_TASKS_PUBLISH_TIMEOUT) can "
            f"succeed on it after it was replaced, and the demoted master loses the task. Raise "
            f"down-after-milliseconds above {shortest * 1000:g} (check reliable_tasks.W007)."))


def _broker_policy(app: Any) -> tuple[str | None, str]:
    """The broker's policy, through the publisher's bounded connection (kombu's client)."""
    with producer_for(app) as producer:
        connection: Any = producer.connection
        return read_memory_policy(connection.default_channel.client)


def _memory_policy(health: HealthReport, role: str, url: str,
                   read: Callable[[], tuple[str | None, str]]) -> RedisMemory:
    """Read one server's policy; warn unless it is ``noeviction``."""
    try:
        policy, source = read()
    except Exception as exc:  # noqa: BLE001 - reported, never raised
        error = _describe(exc)
        health.add(ERROR, "redis", f"Reading the {role} Redis ({url}) failed: {error}")
        return RedisMemory(role=role, url=url, error=error)
    if policy is None:
        health.add(WARNING, "redis", (
            f"Could not read the maxmemory-policy of the {role} Redis ({url}): CONFIG and INFO "
            f"are both unavailable. Make sure it is {SAFE_POLICY}."))
    elif policy != SAFE_POLICY:
        health.add(WARNING, "redis", (
            f"The {role} Redis ({url}) has maxmemory-policy {policy}: when it is full it "
            f"silently evicts keys (queued tasks, RedBeat entries). Set it to {SAFE_POLICY}."))
    return RedisMemory(role=role, url=url, policy=policy, source=source)


def read_memory_policy(client: Any) -> tuple[str | None, str]:
    """``(policy, source)``: from ``CONFIG GET``, else from ``INFO memory`` (managed Redis
    services often disable CONFIG); ``(None, "")`` when neither answers."""
    from redis.exceptions import ResponseError

    try:
        value = client.config_get("maxmemory-policy").get("maxmemory-policy")
        if value:
            return _text(value), "CONFIG GET"
    except ResponseError:
        pass  # CONFIG is disabled or renamed
    try:
        value = client.info("memory").get("maxmemory_policy")
    except ResponseError:
        return None, ""
    return (_text(value), "INFO memory") if value else (None, "")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _worker(row: WorkerHeartbeat, now: datetime) -> Worker:
    return Worker(hostname=row.hostname, pid=row.pid, running=row.running,
                  last_seen_at=row.last_seen_at, stopped_at=row.stopped_at,
                  alive=row.is_alive(now))


def _check_workers(health: HealthReport) -> None:
    """Live workers (all of them) and the most recently seen dead ones."""
    now = health.generated_at
    fresh_since = now - timedelta(seconds=app_settings.LEASE_TIMEOUT)
    alive = Q(stopped_at__isnull=True, last_seen_at__gt=fresh_since)
    health.workers_alive = [_worker(row, now) for row in
                            WorkerHeartbeat.objects.filter(alive).order_by("hostname")]
    health.workers_dead = [_worker(row, now) for row in WorkerHeartbeat.objects.exclude(alive)
                           .order_by("-last_seen_at")[:DEAD_WORKERS_SHOWN]]
    if not health.workers_alive:
        health.add(ERROR, "workers", "No live worker: queued tasks wait until one starts.")
    lost = [worker for worker in health.workers_dead
            if worker.stopped_at is None and now - worker.last_seen_at < RECENTLY_LOST]
    for worker in lost:
        health.add(WARNING, "workers", (
            f"Worker {worker.hostname} stopped heartbeating at "
            f"{worker.last_seen_at:%Y-%m-%d %H:%M:%S %Z} without shutting down: its running "
            "tasks are retried or marked LOST when their leases expire."))


def _check_pending(health: HealthReport) -> None:
    """The oldest PENDING task that is due for publishing (held delayed tasks are not late)."""
    now = health.generated_at
    row = (TaskRecord.objects.filter(state=TaskState.PENDING)
           .filter(Q(next_attempt_at__lte=now) | Q(next_attempt_at__isnull=True))
           .order_by("created_at").values("created_at", "eta").first())
    if row is None:
        return
    since = max(row["created_at"], row["eta"]) if row["eta"] else row["created_at"]
    health.oldest_pending_since = since
    late_after = app_settings.PUBLISH_GRACE + 3 * app_settings.SWEEP_INTERVAL + 60
    waited = (now - since).total_seconds()
    if waited > late_after:
        health.add(WARNING, "tasks", (
            f"The oldest pending task has waited {waited:.0f} s to be published (the sweeper "
            f"publishes after {app_settings.PUBLISH_GRACE:g} s): is beat running the sweeper, "
            "and is the broker reachable?"))


def _count_states(health: HealthReport) -> None:
    """Tasks per state, in one GROUP BY; every state is listed, zeros included."""
    counts = dict.fromkeys(TaskState.values, 0)
    for row in TaskRecord.objects.order_by().values("state").annotate(count=Count("pk")):
        counts[row["state"]] = row["count"]
    health.state_counts = counts


def sweeper_late_after() -> float:
    """Seconds after which work the sweeper does on every pass is late: three passes
    (``3 x SWEEP_INTERVAL``) and 30 s for beat, which runs the sweeper, to be late itself."""
    return 3 * app_settings.SWEEP_INTERVAL + 30


def stuck_wait_after() -> float:
    """Seconds a task may wait for a slot its concurrency key has free: a finishing run wakes
    its key's waiters at once, and the sweeper wakes on each pass those none woke (a slot
    freed by an expired lease, a revoke, a worker killed before its wake-up). Past
    ``sweeper_late_after()`` (60 s by default), the sweeper missed three passes."""
    return sweeper_late_after()


def _check_limits(health: HealthReport) -> None:
    """The busiest limit keys, and the concurrency keys whose tasks wait for a free slot
    longer than ``stuck_wait_after()``: one grouped aggregate (its HAVING finds the keys
    that may have a free slot, at most ``NAMES_SHOWN``), then each one's oldest waiter, whose
    limit the wake-up respects."""
    health.limits = limit_load(KEYS_SHOWN)
    bound = stuck_wait_after()
    cutoff = health.generated_at - timedelta(seconds=bound)
    candidates = (concurrency_key_rows()
                  .filter(waiting__gt=0, waiting_since__lt=cutoff,
                          limit_max__gt=F("running") + F("woken"))
                  .order_by("waiting_since", "key")[:NAMES_SHOWN])
    for row in candidates:
        head = (TaskRecord.objects.filter(
            concurrency_key=row["key"], state=TaskState.WAITING,
            waiting_for=WaitReason.CONCURRENCY).order_by("created_at", "id")
            .values_list("concurrency_limit", flat=True).first())
        stuck = StuckWait(key=row["key"], limit=head or 1, running=row["running"],
                          woken=row["woken"], waiting=row["waiting"],
                          waiting_since=row["waiting_since"])
        if stuck.free <= 0:
            continue
        health.stuck_waits.append(stuck)
        waited = (health.generated_at - stuck.waiting_since).total_seconds()
        health.add(WARNING, "limits", (
            f"Tasks of concurrency key {stuck.key!r} wait for a slot although {stuck.free} of "
            f"its {stuck.limit} are free ({stuck.running} running, {stuck.woken} woken): "
            f"{stuck.waiting} wait, the longest for {waited:.0f} s, more than the {bound:g} s "
            f"in which the sweeper (every {app_settings.SWEEP_INTERVAL:g} s) wakes them. Is "
            "beat running the sweeper, and do its passes finish?"))


# --- activity per hour ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HourActivity:
    """Tasks that finished within one hour (``hour`` is its start, in the current time zone).

    ``succeeded`` and ``failed`` count the tasks that finished as SUCCESS and FAILURE.
    ``retried`` counts the tasks that finished, whatever their outcome, after more than one
    attempt (``attempts > 1``: Celery retries, sweeper re-runs after a lost worker, manual
    retries). A task counts once however many attempts it took, so a task that failed twice
    and then succeeded counts in both ``succeeded`` and ``retried``.
    """

    hour: datetime
    succeeded: int = 0
    failed: int = 0
    retried: int = 0


def hourly_activity(hours: int = 24, now: datetime | None = None) -> list[HourActivity]:
    """The last ``hours`` hours, oldest first, the current one last; one aggregate query."""
    zone = timezone.get_current_timezone()
    current = timezone.localtime(now or timezone.now(), zone).replace(
        minute=0, second=0, microsecond=0)
    first = current.astimezone(UTC) - timedelta(hours=hours - 1)
    rows = (TaskRecord.objects.filter(finished_at__gte=first,
                                      state__in=list(FINISHED_STATES))
            .annotate(hour=TruncHour("finished_at", tzinfo=zone))
            .order_by().values("hour")
            .annotate(succeeded=Count("pk", filter=Q(state=TaskState.SUCCESS)),
                      failed=Count("pk", filter=Q(state=TaskState.FAILURE)),
                      retried=Count("pk", filter=Q(attempts__gt=1))))
    found: dict[datetime, dict[str, Any]] = {row["hour"].astimezone(UTC): dict(row)
                                             for row in rows}
    buckets = []
    for index in range(hours):
        start = first + timedelta(hours=index)
        row = found.get(start, {})
        buckets.append(HourActivity(
            hour=start.astimezone(zone), succeeded=row.get("succeeded", 0),
            failed=row.get("failed", 0), retried=row.get("retried", 0)))
    return buckets
