"""Database fault scenarios: the app's PostgreSQL restarted, cut off, down and killed while tasks
flow through real workers and a real beat runs a schedule every second.

A scenario breaks the very database the app keeps its ledger in, so it cannot run in a process
whose Django uses pytest-django's test database. It runs in a process of its own
(``python -m benchmarks.db_faults``, which calls ``run_scenario()`` here) that starts, before
``django.setup()``, a private PostgreSQL cluster (``PostgresServer``) and a private
``redis-server``, points ``DATABASE_URL`` and ``REDIS_URL`` at them, migrates, and then starts
two workers (prefork, concurrency 2) and one beat of the example project against the same two
servers. Beat runs the sweeper itself (its ``reliable_tasks.sweep`` entry, every
``SWEEP_INTERVAL``); nothing here sweeps.

Body runs are counted outside the database, which is what is being broken: ``demo.log_run``
(a ``ReliableTask``) and ``demo.plain_log_run`` (a plain Celery task, its result stored by
django-celery-results) append one line per run, ``<task id> <token> <pid> <time>``, to a file
with one ``O_APPEND`` write.

A producer thread dispatches ``tasks`` tasks at ``rate`` per second as a web request would: each
call runs between ``close_old_connections()`` calls, and a call that raised is counted
(``raised``) and tried again a moment later, until the task is accepted. Meanwhile the fault is
injected, then the runner waits (bounded) until every accepted task has run and, for
reliable_tasks, every ledger row of the scenario has finished, and counts:

- **dispatched**, **raised** (calls that raised; each was tried again), **max dispatch s**;
- **lost**: accepted tasks whose body never ran; **run twice**: task ids whose body ran more than
  once (flow tasks and periodic runs); **extra**: tasks recorded by a call that raised (the row
  was committed, the caller saw an error and dispatched again);
- **states**: reliable_tasks, the ledger rows of the scenario's tasks by state (every one should
  be ``SUCCESS``); plain Celery, django-celery-results' ``TaskResult`` rows of the accepted tasks
  by status, and ``results missing``: accepted tasks without one (both variants report those);
- **beat slots** of the 1 s schedule: recorded (reliable_tasks: ledger rows, one per slot;
  plain: inferred from the runs' times), missed (no run although the catch-up policy keeps the
  slot: ``MISSED_RUN_GRACE`` back from when the database came back, and every slot after),
  skipped by the policy, doubled (a second row or a second run of a slot), recorded but never
  run; and whether beat was still alive and dispatching at the end;
- **probe**: exit status of ``manage.py check_tasks_health`` (a subprocess with the same
  environment) before the fault, during the outage (the database refuses connections) and once
  everything settled after it;
- **recovery s**: from the end of the fault until work caught up: every task accepted before
  it, the first one accepted after it and every periodic slot due before it had run.

Beat's schedule is watched for at least ``observe_seconds`` after the fault before beat is
stopped, so that a beat that never records again after the database came back shows as missed
slots.

Scenarios (``SCENARIOS``):

- ``pg_restart_fast``, ``pg_restart_immediate``: the cluster is shut down (``pg_ctl -m fast``:
  transactions rolled back and clients disconnected; ``-m immediate``: no checkpoint, crash
  recovery at the next start) a quarter into the flow, and started again once the probe has
  seen it down (about 2 s: the probe is a ``manage.py`` process).
- ``pg_backends_terminated``: every client backend is terminated every second for
  ``terminate_seconds``: workers, beat and the producer lose their connections mid-flow and
  mid-statement, while the database itself stays up.
- ``pg_down``: the cluster is stopped for ``down_seconds`` (30 s at full scale, ten leases).
- ``pg_idle_connection_killed``: between tasks, every backend is terminated, then one task
  arrives at once; ``idle_cycles`` times. Each must run once and end ``SUCCESS``.
- ``pg_killed``: the tasks are dispatched at once, and while the workers drain that backlog the
  whole cluster is SIGKILLed (a crash), then started again once the probe has seen it down
  (crash recovery). Nothing but the workers (and beat, once a second) commits meanwhile.
- ``pg_killed_async_commit``: the same with ``RELIABLE_TASKS_WORKER_SYNCHRONOUS_COMMIT = False``
  on the workers: their commits do not wait for the WAL to reach the disk, and the crash undoes
  those not yet written (PostgreSQL's WAL writer writes them within ``3 x wal_writer_delay``,
  600 ms, and any synchronous commit writes all before it). The counts measure what that
  setting loses; plain Celery runs the same crash without the setting.

Variants: ``reliable`` (``dispatch("demo.log_run")``, ``ReliableRedBeatScheduler`` with a
``PeriodicSchedule``) and ``plain`` (``demo.plain_log_run.apply_async``, plain
``redbeat.RedBeatScheduler`` with a RedBeat entry, ``RELIABLE_TASKS_ADOPT = false`` everywhere:
plain Celery whose only database is django-celery-results' result store).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from example_project.devservers import (
    REPO_ROOT,
    CeleryProcess,
    PostgresServer,
    RedisServer,
)

T = TypeVar("T")
Variant = Literal["reliable", "plain"]

SCENARIOS: tuple[str, ...] = (
    "pg_restart_fast",
    "pg_restart_immediate",
    "pg_backends_terminated",
    "pg_down",
    "pg_idle_connection_killed",
    "pg_killed",
    "pg_killed_async_commit",
)
#: Scenarios whose fault hits while the workers drain a backlog (no flow of new tasks).
DRAINS = frozenset({"pg_killed", "pg_killed_async_commit"})
#: How each scenario is printed.
TITLES: dict[str, str] = {
    "pg_restart_fast": "PostgreSQL restarted (fast shutdown)",
    "pg_restart_immediate": "PostgreSQL restarted (immediate shutdown)",
    "pg_backends_terminated": "backends terminated every 1 s",
    "pg_down": "PostgreSQL down",
    "pg_idle_connection_killed": "idle connections killed, then a task",
    "pg_killed": "PostgreSQL SIGKILLed while workers drain a backlog",
    "pg_killed_async_commit": "the same, WORKER_SYNCHRONOUS_COMMIT = False",
}
VARIANTS: tuple[Variant, ...] = ("plain", "reliable")
VARIANT_NAMES: dict[str, str] = {"reliable": "reliable_tasks", "plain": "plain Celery"}

SETTINGS_MODULE = "example_project.settings"
#: Settings of every process of a scenario (the runner, workers, beat, the probe): short leases,
#: frequent heartbeats and sweeps, so that a scenario takes seconds, not minutes.
SCENARIO_SETTINGS: dict[str, str] = {
    "RELIABLE_TASKS_LEASE_TIMEOUT": "3",
    "RELIABLE_TASKS_HEARTBEAT_INTERVAL": "0.5",
    "RELIABLE_TASKS_SWEEP_INTERVAL": "1",
    "RELIABLE_TASKS_PUBLISH_GRACE": "1",
    "RELIABLE_TASKS_PUBLISH_TIMEOUT": "2",
}
#: Added for plain Celery: nothing of the app records anything.
PLAIN_SETTINGS: dict[str, str] = {"RELIABLE_TASKS_ADOPT": "false"}
#: Added to the reliable workers of ``pg_killed_async_commit``.
ASYNC_COMMIT_SETTINGS: dict[str, str] = {"RELIABLE_TASKS_WORKER_SYNCHRONOUS_COMMIT": "false"}

WORKERS = 2
WORKER_CONCURRENCY = 2
#: Seconds between the periodic schedule's runs.
SCHEDULE_INTERVAL = 1
#: The token of the periodic runs in the runs file.
BEAT_TOKEN = "beat"
#: Pause of the producer before it tries a call that raised again.
RETRY_PAUSE = 0.25
#: The producer gives a task up after trying it for this long.
GIVE_UP_SECONDS = 180.0
#: A probe that has not answered within this many seconds counts as failed (exit status 124).
PROBE_TIMEOUT = 60.0


# --- scale ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DbScale:
    """How big each scenario is: ``default`` for the test suite, ``full`` for the issue's."""

    name: str
    tasks: int
    rate: float
    down_seconds: float
    terminate_seconds: int
    idle_cycles: int
    settle_seconds: float
    quiet_seconds: float
    observe_seconds: float


DEFAULT_SCALE = DbScale(name="default", tasks=200, rate=20, down_seconds=8, terminate_seconds=5,
                        idle_cycles=4, settle_seconds=60, quiet_seconds=15, observe_seconds=5)
FULL_SCALE = DbScale(name="full", tasks=1000, rate=50, down_seconds=30, terminate_seconds=10,
                     idle_cycles=10, settle_seconds=180, quiet_seconds=20, observe_seconds=10)
SCALES = {scale.name: scale for scale in (DEFAULT_SCALE, FULL_SCALE)}


def scale_from_env() -> DbScale:
    """``FULL_SCALE`` when ``FAULTS_SCALE=full`` (as for the Redis scenarios), else the default."""
    return FULL_SCALE if os.environ.get("FAULTS_SCALE", "").lower() == "full" else DEFAULT_SCALE


# --- outcome --------------------------------------------------------------------------------------


@dataclass
class DbOutcome:
    """What one run of one scenario counted (``as_dict()`` is the runner's JSON)."""

    scenario: str
    variant: str
    scale: str
    dispatched: int = 0
    raised: int = 0
    gave_up: int = 0
    lost: int = 0
    run_twice: int = 0
    extra: int = 0
    states: dict[str, int] = field(default_factory=dict)
    not_success: int = 0
    results_missing: int = 0
    result_states: dict[str, int] = field(default_factory=dict)
    adopted_states: dict[str, int] = field(default_factory=dict)
    slots: int = 0
    slots_missed: int = 0
    slots_skipped_by_policy: int = 0
    slots_doubled: int = 0
    slots_not_run: int = 0
    latest_slot_run_seconds: float = 0.0
    beat_alive: bool = False
    workers_alive: int = 0
    probe_before: int | None = None
    probe_during: int | None = None
    probe_after: int | None = None
    fault_seconds: float | None = None
    recovery_seconds: float | None = None
    max_dispatch_seconds: float = 0.0
    log_problems: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    work_dir: str = ""

    @property
    def title(self) -> str:
        """The scenario as printed."""
        return TITLES.get(self.scenario, self.scenario)

    @property
    def variant_name(self) -> str:
        """The variant as printed."""
        return VARIANT_NAMES.get(self.variant, self.variant)

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for ``--json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DbOutcome:
        """The outcome ``as_dict()`` gave (unknown keys are ignored)."""
        names = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in data.items() if key in names})

    def summary(self) -> str:
        """One line for logs and assertion messages."""
        recovery = "-" if self.recovery_seconds is None else f"{self.recovery_seconds:.1f}s"
        return (f"{self.scenario} [{self.variant_name}, {self.scale}]: "
                f"dispatched={self.dispatched} raised={self.raised} gave_up={self.gave_up} "
                f"lost={self.lost} run_twice={self.run_twice} extra={self.extra} "
                f"states={self.states} results_missing={self.results_missing} "
                f"slots={self.slots} missed={self.slots_missed} "
                f"skipped={self.slots_skipped_by_policy} doubled={self.slots_doubled} "
                f"not_run={self.slots_not_run} beat_alive={self.beat_alive} "
                f"workers_alive={self.workers_alive} probe={self.probe_before}/"
                f"{self.probe_during}/{self.probe_after} recovery={recovery} "
                f"max_dispatch={self.max_dispatch_seconds:.2f}s log={self.log_problems} "
                f"notes={self.notes} work_dir={self.work_dir}")


# --- the runs file --------------------------------------------------------------------------------


@dataclass
class Runs:
    """Body runs read from the runs file: per task id, its token and the times it ran."""

    times: dict[str, list[float]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)

    def count(self, task_id: str) -> int:
        """How often the body of ``task_id`` ran."""
        return len(self.times.get(task_id, ()))

    def first(self, task_id: str) -> float:
        """When the body of ``task_id`` first ran (it must have)."""
        return min(self.times[task_id])

    def of_token(self, token: str) -> dict[str, list[float]]:
        """The runs of the tasks dispatched with ``token``."""
        return {task_id: times for task_id, times in self.times.items()
                if self.tokens[task_id] == token}


def read_runs(path: Path) -> Runs:
    """Parse the lines ``demo.log_run`` and ``demo.plain_log_run`` appended to ``path``."""
    runs = Runs()
    if not path.exists():
        return runs
    for line in path.read_text().splitlines():
        task_id, token, _pid, at = line.split()
        runs.times.setdefault(task_id, []).append(float(at))
        runs.tokens[task_id] = token
    return runs


# --- the producer ---------------------------------------------------------------------------------


@dataclass
class Accepted:
    """A task the producer's call returned normally for."""

    task_id: str
    token: str
    at: float


class Producer(threading.Thread):
    """Dispatches ``count`` tasks, ``rate`` per second, as web requests would.

    Each call runs between two ``close_old_connections()`` (Django's request cycle). A call that
    raised is counted and tried again after ``RETRY_PAUSE``, for up to ``GIVE_UP_SECONDS``.
    """

    def __init__(self, send: Callable[[str], str], prefix: str, count: int,
                 rate: float) -> None:
        super().__init__(name="db-faults-producer", daemon=True)
        self.send = send
        self.prefix = prefix
        self.count = count
        self.rate = rate
        self.accepted: list[Accepted] = []
        self.raised = 0
        self.gave_up: list[str] = []
        self.errors: Counter[str] = Counter()
        self.longest = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        from django.db import connections

        started = time.monotonic()
        try:
            for index in range(self.count):
                delay = started + index / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.call(f"{self.prefix}{index}")
        except BaseException as exc:  # noqa: BLE001 - reported by the scenario
            self.error = exc
        finally:
            connections.close_all()

    def call(self, token: str) -> str | None:
        """Send one task as a request would, trying again while it raises; return its id.

        None if it was given up.
        """
        from django.db import close_old_connections

        first_try = time.monotonic()
        while True:
            close_old_connections()
            call_started = time.monotonic()
            try:
                task_id = self.send(token)
            except Exception as exc:  # noqa: BLE001 - counted: what the web request would see
                self.raised += 1
                self.errors[_where(exc)] += 1
                self.longest = max(self.longest, time.monotonic() - call_started)
                close_old_connections()
                if time.monotonic() - first_try > GIVE_UP_SECONDS:
                    self.gave_up.append(token)
                    return None
                time.sleep(RETRY_PAUSE)
                continue
            self.longest = max(self.longest, time.monotonic() - call_started)
            self.accepted.append(Accepted(task_id, token, time.time()))
            close_old_connections()
            return task_id


def _where(exc: BaseException) -> str:
    """``Type in f > g``: the functions of reliable_tasks the error came through, outermost first.
    """
    path: list[str] = []
    for frame, _line in traceback.walk_tb(exc.__traceback__):
        name = frame.f_code.co_name
        if f"{os.sep}reliable_tasks{os.sep}" in frame.f_code.co_filename and name not in path:
            path.append(name)
    return f"{type(exc).__name__} in {' > '.join(path)}" if path else type(exc).__name__


def sender(variant: Variant, runs_path: Path) -> Callable[[str], str]:
    """The call of a variant: returns the task id of the task it sent."""
    if variant == "reliable":
        from reliable_tasks import dispatch

        def send_reliable(token: str) -> str:
            return str(dispatch("demo.log_run", (str(runs_path), token)).pk)

        return send_reliable

    from example_project.demo.tasks import plain_log_run

    def send_plain(token: str) -> str:
        return str(plain_log_run.apply_async((str(runs_path), token)).id)

    return send_plain


# --- the environment ------------------------------------------------------------------------------


@dataclass
class Servers:
    """The private PostgreSQL cluster and Redis server of one run, and where it writes."""

    postgres: PostgresServer
    redis: RedisServer
    work_dir: Path


def _private_dir(prefix: str) -> Path:
    """A new directory in the system's temporary directory that the ``postgres`` user can reach.

    The cluster lives in it (not in a pytest ``tmp_path``, which it may not be able to reach)
    so that ``stop()`` keeps the data of a cluster that is only stopped for a while.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


@contextlib.contextmanager
def scenario_environment(variant: Variant, work_dir: Path) -> Iterator[Servers]:
    """Start the cluster and Redis, point this process at them, set Django up and migrate.

    Must run before anything loads Django's settings: the example project reads
    ``DATABASE_URL`` and ``REDIS_URL`` when its settings module is imported.
    """
    from django.conf import settings

    if settings.configured:
        raise RuntimeError("Django settings were loaded before the scenario's environment")
    cluster_dir = _private_dir("rt-dbfaults-pg-")
    try:
        with PostgresServer(base_dir=cluster_dir) as postgres, \
                RedisServer(data_dir=work_dir / "redis") as redis_server:
            os.environ.update({
                "DATABASE_URL": postgres.url,
                "REDIS_URL": redis_server.url,
                "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
                "DJANGO_DEBUG": "0",
                "PYTHONPATH": str(REPO_ROOT),
                **SCENARIO_SETTINGS,
                **(PLAIN_SETTINGS if variant == "plain" else {}),
            })
            os.environ.pop("REDIS_SENTINELS", None)
            import django
            from django.core.management import call_command

            django.setup()
            call_command("migrate", verbosity=0, interactive=False)
            import example_project.demo.tasks  # noqa: F401 - registers the demo tasks

            try:
                yield Servers(postgres, redis_server, work_dir)
            finally:
                from django.db import connections

                from reliable_tasks.publisher import close_publisher

                close_publisher()
                with contextlib.suppress(Exception):
                    connections.close_all()
                with contextlib.suppress(OSError):
                    shutil.copy(postgres.log_path, work_dir / "postgres.log")
    finally:
        shutil.rmtree(cluster_dir, ignore_errors=True)


def retrying(read: Callable[[], T], seconds: float = 60.0) -> T:
    """``read()`` on a fresh connection until the database answers (the runner's own reads)."""
    from django.db import DatabaseError, connections

    deadline = time.monotonic() + seconds
    while True:
        try:
            return read()
        except DatabaseError:
            if time.monotonic() > deadline:
                raise
            for connection in connections.all(initialized_only=True):
                with contextlib.suppress(DatabaseError):
                    connection.close()
            time.sleep(0.5)


def probe() -> int:
    """Exit status of ``manage.py check_tasks_health`` run now with this process' environment."""
    try:
        done = subprocess.run(
            [sys.executable, "manage.py", "check_tasks_health", "--verbosity", "0",
             "--timeout", "2"],
            cwd=REPO_ROOT, env=dict(os.environ), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return 124
    return done.returncode


# --- one scenario ---------------------------------------------------------------------------------


class ScenarioRun:
    """One scenario for one variant, from started processes to the counted outcome."""

    def __init__(self, scenario: str, variant: Variant, scale: DbScale,
                 servers: Servers) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
        self.scenario = scenario
        self.variant = variant
        self.scale = scale
        self.servers = servers
        self.work_dir = servers.work_dir
        self.runs_path = self.work_dir / "runs.log"
        self.outcome = DbOutcome(scenario, variant, scale.name, work_dir=str(self.work_dir))
        self.processes: list[CeleryProcess] = []
        self.workers: list[CeleryProcess] = []
        self.beat: CeleryProcess | None = None
        self.schedule_id: int | None = None
        self.fault_over_at: float | None = None
        self.idle_latencies: list[float] = []

    # -- processes -------------------------------------------------------------------------

    def start_processes(self) -> None:
        """Start the workers and beat (in parallel) and wait until each is ready.

        They inherit this process' environment (its database, Redis and settings).
        """
        async_commit = self.scenario == "pg_killed_async_commit" and self.variant == "reliable"
        worker_env = dict(ASYNC_COMMIT_SETTINGS) if async_commit else {}
        log_dir = self.work_dir / "celery"
        self.workers = [CeleryProcess("worker", worker_env, concurrency=WORKER_CONCURRENCY,
                                      log_dir=log_dir) for _ in range(WORKERS)]
        extra_args = ("--scheduler=redbeat.RedBeatScheduler",) if self.variant == "plain" else ()
        self.beat = CeleryProcess("beat", {}, extra_args=extra_args, log_dir=log_dir)
        self.processes = [*self.workers, self.beat]
        for process in self.processes:
            process.start(wait_ready=False)
        for process in self.processes:
            process.wait_ready()

    def stop_processes(self) -> None:
        """Stop beat and the workers (by PID)."""
        for process in reversed(self.processes):
            process.stop()

    def install_schedule(self) -> None:
        """A schedule running the variant's task every ``SCHEDULE_INTERVAL`` s."""
        args = [str(self.runs_path), BEAT_TOKEN]
        if self.variant == "reliable":
            from reliable_tasks.models import PeriodicSchedule

            self.schedule_id = PeriodicSchedule.objects.create(
                name="db faults: every second", task="demo.log_run", args=args,
                interval_seconds=SCHEDULE_INTERVAL).pk
            return
        from celery.schedules import schedule
        from redbeat.schedulers import RedBeatSchedulerEntry

        from example_project.celery import app

        RedBeatSchedulerEntry("db faults: every second", "demo.plain_log_run",
                              schedule(run_every=SCHEDULE_INTERVAL), args=args, app=app).save()

    def wait_steady(self, timeout: float = 60.0) -> None:
        """Wait until beat's schedule has run three times."""
        deadline = time.monotonic() + timeout
        while len(read_runs(self.runs_path).of_token(BEAT_TOKEN)) < 3:
            if time.monotonic() > deadline:
                raise RuntimeError("beat did not run its schedule three times before the fault")
            time.sleep(0.2)

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> DbOutcome:
        """Start everything, run the flow with its fault, count; stop what was started."""
        self.install_schedule()
        try:
            self.start_processes()
            self.wait_steady()
            self.outcome.probe_before = probe()
            if self.scenario == "pg_idle_connection_killed":
                producer = self.idle_cycles()
            elif self.scenario in DRAINS:
                producer = self.drain()
            else:
                producer = self.flow()
            self.settle(producer)
            self.outcome.probe_after = probe()
            if self.fault_over_at is not None:  # beat's slots are watched for a while after it
                time.sleep(max(self.fault_over_at + self.scale.observe_seconds - time.time(), 0))
            until = self.stop_beat()
            time.sleep(2.0)  # the last periodic runs finish
            self.count(producer, until)
        finally:
            self.stop_processes()
            self.outcome.log_problems = self.log_problems()
        return self.outcome

    def flow(self) -> Producer:
        """Dispatch the scale's tasks; inject the fault a quarter of the way through."""
        producer = Producer(sender(self.variant, self.runs_path), "flow-", self.scale.tasks,
                            self.scale.rate)
        producer.start()
        time.sleep(self.scale.tasks / self.scale.rate / 4)
        self.inject()
        producer.join(GIVE_UP_SECONDS + self.scale.tasks / self.scale.rate + 60)
        if producer.is_alive():
            raise RuntimeError("the producer did not finish")
        if producer.error is not None:
            raise producer.error
        return producer

    def drain(self) -> Producer:
        """Dispatch the scale's tasks at once; inject the fault once a quarter of them ran.

        While the workers drain the backlog, nothing else commits: the workers' own writes
        are all that is in flight when the fault hits.
        """
        producer = Producer(sender(self.variant, self.runs_path), "drain-", self.scale.tasks,
                            rate=10_000)
        producer.run()
        if producer.error is not None:
            raise producer.error
        wanted = {accepted.task_id for accepted in producer.accepted}
        deadline = time.monotonic() + 60
        while len(wanted & set(read_runs(self.runs_path).times)) < len(wanted) / 4:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not run a quarter of the backlog in 60 s")
            time.sleep(0.02)
        self.inject()
        return producer

    def inject(self) -> None:
        """The scenario's fault; sets when it began and ended and probes during it."""
        postgres = self.servers.postgres
        began = time.monotonic()
        if self.scenario in ("pg_restart_fast", "pg_restart_immediate"):
            postgres.stop("fast" if self.scenario == "pg_restart_fast" else "immediate")
            self.outcome.probe_during = probe()
            postgres.start()
        elif self.scenario == "pg_down":
            postgres.stop("fast")
            deadline = began + self.scale.down_seconds
            time.sleep(self.scale.down_seconds / 3)
            self.outcome.probe_during = probe()
            time.sleep(max(deadline - time.monotonic(), 0))
            postgres.start()
        elif self.scenario in DRAINS:
            postgres.kill()
            self.outcome.probe_during = probe()
            postgres.start()
        elif self.scenario == "pg_backends_terminated":
            during: list[int] = []
            probing = threading.Thread(target=lambda: during.append(probe()), daemon=True)
            terminated = 0
            for second in range(self.scale.terminate_seconds):
                terminated += postgres.terminate_backends()
                if second == 0:
                    probing.start()
                time.sleep(max(began + second + 1 - time.monotonic(), 0))
            probing.join(PROBE_TIMEOUT)
            self.outcome.probe_during = during[0] if during else None
            self.outcome.notes.append(f"{terminated} backends terminated")
        else:
            raise ValueError(self.scenario)
        self.fault_over_at = time.time()
        self.outcome.fault_seconds = round(time.monotonic() - began, 1)

    def idle_cycles(self) -> Producer:
        """Between tasks, terminate every backend, then send one task at once; repeat."""
        producer = Producer(sender(self.variant, self.runs_path), "idle-",
                            self.scale.idle_cycles, 1.0)
        terminated = 0
        latencies = self.idle_latencies
        for cycle in range(self.scale.idle_cycles):
            time.sleep(1.5)  # every connection idle for a while
            terminated += self.servers.postgres.terminate_backends()
            sent_at = time.time()
            task_id = producer.call(f"idle-{cycle}")
            deadline = time.monotonic() + 30
            while task_id is not None and not read_runs(self.runs_path).count(task_id):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            runs = read_runs(self.runs_path)
            if task_id is not None and runs.count(task_id):
                latencies.append(runs.first(task_id) - sent_at)
        self.fault_over_at = time.time()
        self.outcome.notes.append(f"{terminated} backends terminated; one task after each "
                                  f"of {self.scale.idle_cycles} cuts ran "
                                  f"{', '.join(f'{s:.2f}' for s in latencies)} s after it")
        return producer

    def settle(self, producer: Producer) -> None:
        """Wait until every accepted task ran and (reliable_tasks) every row finished.

        Bounded by the scale's ``settle_seconds``, and by ``quiet_seconds`` without progress.
        """
        wanted = {accepted.task_id for accepted in producer.accepted}
        deadline = time.monotonic() + self.scale.settle_seconds
        last_progress, last_change = None, time.monotonic()
        while time.monotonic() < deadline:
            ran = wanted & set(read_runs(self.runs_path).times)
            unfinished = retrying(self._unfinished_rows)
            if ran == wanted and not unfinished:
                return
            progress = (len(ran), unfinished)
            if progress != last_progress:
                last_progress, last_change = progress, time.monotonic()
            elif time.monotonic() - last_change > self.scale.quiet_seconds:
                self.outcome.notes.append(
                    f"settling stopped: no progress for {self.scale.quiet_seconds:g}s")
                return
            time.sleep(0.5)
        self.outcome.notes.append(f"settling stopped after {self.scale.settle_seconds:g}s")

    def _unfinished_rows(self) -> int:
        """Ledger rows of the scenario not finished (but a periodic run recorded just now)."""
        if self.variant != "reliable":
            return 0
        from django.db.models import Q

        from reliable_tasks.models import TaskRecord
        from reliable_tasks.states import FINISHED_STATES

        recent = datetime.now(UTC) - timedelta(seconds=5)
        return (TaskRecord.objects.filter(adopted=False)
                .filter(Q(schedule__isnull=True) | Q(scheduled_for__lt=recent))
                .exclude(state__in=list(FINISHED_STATES)).count())

    def stop_beat(self) -> float:
        """Note whether beat is alive and still dispatching, stop it; return when."""
        assert self.beat is not None
        alive = self.beat.is_running()
        runs = read_runs(self.runs_path).of_token(BEAT_TOKEN)
        latest = max((max(times) for times in runs.values()), default=0.0)
        self.outcome.beat_alive = alive and time.time() - latest < 3 * SCHEDULE_INTERVAL + 2
        if alive and not self.outcome.beat_alive:
            self.outcome.notes.append(f"beat runs but dispatched nothing for "
                                      f"{time.time() - latest:.0f}s")
        self.outcome.workers_alive = sum(worker.is_running() for worker in self.workers)
        until = time.time()
        self.beat.stop()
        return until

    # -- counting --------------------------------------------------------------------------

    def count(self, producer: Producer, until: float) -> None:
        """Fill the outcome from the runs file, the ledger and the stored results."""
        outcome = self.outcome
        runs = read_runs(self.runs_path)
        outcome.dispatched = len(producer.accepted) + len(producer.gave_up)
        outcome.raised = producer.raised
        outcome.gave_up = len(producer.gave_up)
        outcome.max_dispatch_seconds = round(producer.longest, 3)
        if producer.errors:
            outcome.notes.append(f"errors raised to the producer: {dict(producer.errors)}")
        accepted_ids = [accepted.task_id for accepted in producer.accepted]
        outcome.lost = sum(1 for task_id in accepted_ids if not runs.count(task_id))
        outcome.run_twice = sum(1 for times in runs.times.values() if len(times) > 1)
        flow_ids = {task_id for task_id, token in runs.tokens.items() if token != BEAT_TOKEN}
        outcome.extra = len(flow_ids - set(accepted_ids))
        outcome.results_missing, outcome.result_states = retrying(
            lambda: self._results(accepted_ids))
        if self.variant == "reliable":
            outcome.states, outcome.adopted_states = retrying(self._ledger_states)
        else:
            outcome.states = outcome.result_states
        outcome.not_success = sum(n for state, n in outcome.states.items() if state != "SUCCESS")
        if self.variant == "reliable" and outcome.not_success:
            outcome.notes.append("rows not SUCCESS (id, state, body runs): " + ", ".join(
                f"{task_id} {state} {runs.count(task_id)}"
                for task_id, state in retrying(self._unfinished_examples)))
        if outcome.results_missing:
            outcome.notes.append(f"no result stored for {outcome.results_missing} task(s) "
                                 f"that ran")
        if self.variant == "reliable" and set(outcome.result_states) - {"SUCCESS"}:
            outcome.notes.append(f"django-celery-results' results of the flow's tasks: "
                                 f"{outcome.result_states}")
        slot_rows: list[tuple[Any, datetime]] = []
        if self.variant == "reliable":
            slot_rows = self._count_reliable_slots(runs, until)
        else:
            self._count_plain_slots(runs, until)
        outcome.recovery_seconds = self._recovery(producer, runs, slot_rows)

    def _recovery(self, producer: Producer, runs: Runs,
                  slot_rows: list[tuple[Any, datetime]]) -> float | None:
        """Seconds from the end of the fault until work caught up: every task accepted before
        it, the first one accepted after it and every periodic slot due before it had run.

        None if one of them never ran. For ``pg_idle_connection_killed``: the longest a task
        sent right after a cut took to start.
        """
        if self.scenario == "pg_idle_connection_killed":
            complete = len(self.idle_latencies) == self.scale.idle_cycles
            return round(max(self.idle_latencies), 2) if complete else None
        over = self.fault_over_at
        if over is None:
            return None
        due = [accepted.task_id for accepted in producer.accepted if accepted.at <= over]
        due += [accepted.task_id for accepted in producer.accepted if accepted.at > over][:1]
        due += [str(task_id) for task_id, slot in slot_rows if slot.timestamp() <= over]
        if any(not runs.count(task_id) for task_id in due):
            return None
        ran_at = [runs.first(task_id) for task_id in due]
        if self.variant == "plain":  # plain RedBeat records no slots: its next run after
            ran_at.append(min((min(times) for times in runs.of_token(BEAT_TOKEN).values()
                               if min(times) > over), default=over))
        return round(max(max(ran_at, default=over) - over, 0.0), 1)

    @staticmethod
    def _results(accepted_ids: list[str]) -> tuple[int, dict[str, int]]:
        """Accepted tasks without a stored result, and their results by status."""
        from django_celery_results.models import TaskResult

        statuses = dict(TaskResult.objects.filter(task_id__in=accepted_ids)
                        .values_list("task_id", "status"))
        return (len(set(accepted_ids) - set(statuses)),
                dict(Counter(statuses.values())))

    @staticmethod
    def _unfinished_examples() -> list[tuple[str, str]]:
        """Up to five rows of the scenario that did not end ``SUCCESS``: (id, state)."""
        from reliable_tasks.models import TaskRecord

        rows = (TaskRecord.objects.filter(adopted=False).exclude(state="SUCCESS")
                .values_list("id", "state")[:5])
        return [(str(task_id), str(state)) for task_id, state in rows]

    @staticmethod
    def _ledger_states() -> tuple[dict[str, int], dict[str, int]]:
        """Rows of the scenario's tasks by state, and the adopted rows (sweeps) by state."""
        from django.db.models import Count

        from reliable_tasks.models import TaskRecord

        def by_state(adopted: bool) -> dict[str, int]:
            rows = (TaskRecord.objects.filter(adopted=adopted).values("state")
                    .annotate(n=Count("id")).values_list("state", "n"))
            return {str(state): int(n) for state, n in rows}

        return by_state(False), by_state(True)

    def _slots_back_from(self) -> datetime | None:
        """The oldest slot the catch-up policy keeps: ``MISSED_RUN_GRACE`` before the end of
        the fault (every slot, if it was shorter ago than the run)."""
        from reliable_tasks.conf import app_settings

        if self.fault_over_at is None:
            return None
        over = datetime.fromtimestamp(self.fault_over_at, UTC)
        return over - timedelta(seconds=app_settings.MISSED_RUN_GRACE)

    def _count_reliable_slots(self, runs: Runs, until: float) -> list[tuple[Any, datetime]]:
        """Ledger rows per slot of the schedule; a missing slot is missed or skipped.

        Returns the rows (task id, slot).
        """
        from reliable_tasks.models import TaskRecord

        outcome = self.outcome
        end = datetime.fromtimestamp(until, UTC) - timedelta(seconds=SCHEDULE_INTERVAL)
        rows: list[tuple[Any, datetime]] = [
            (task_id, slot) for task_id, slot in retrying(lambda: list(
                TaskRecord.objects.filter(schedule_id=self.schedule_id, scheduled_for__lte=end)
                .order_by("scheduled_for").values_list("id", "scheduled_for")))
            if slot is not None]
        if not rows:
            outcome.notes.append("beat recorded no slot")
            return rows
        per_slot = Counter(slot for _, slot in rows)
        outcome.slots = len(per_slot)
        outcome.slots_doubled = sum(n - 1 for n in per_slot.values())
        step = timedelta(seconds=SCHEDULE_INTERVAL)
        expected, slot = [], rows[0][1]
        while slot <= end:
            expected.append(slot)
            slot += step
        kept_from = self._slots_back_from()
        for missing in (slot for slot in expected if slot not in per_slot):
            if kept_from is not None and missing < kept_from:
                outcome.slots_skipped_by_policy += 1
            else:
                outcome.slots_missed += 1
        for task_id, slot in rows:
            count = runs.count(str(task_id))
            outcome.slots_not_run += int(count == 0)
            outcome.slots_doubled += int(count > 1)
            if count:
                outcome.latest_slot_run_seconds = round(max(
                    outcome.latest_slot_run_seconds,
                    runs.first(str(task_id)) - slot.timestamp()), 1)
        return rows

    def _count_plain_slots(self, runs: Runs, until: float) -> None:
        """Plain RedBeat keeps no record of its slots: read its sends from beat's log.

        Two sends less than half an interval apart are one slot sent twice; a gap of ``n``
        intervals misses ``n - 1`` slots; a send whose task never ran is a slot not run.
        """
        outcome = self.outcome
        end = until - SCHEDULE_INTERVAL
        every_send = self._beat_sends()
        sends = [at for at in every_send if at <= end]
        if not sends:
            outcome.notes.append("beat sent nothing")
            return
        pairs = list(zip(sends, sends[1:], strict=False))
        outcome.slots_doubled = sum(1 for earlier, later in pairs
                                    if later - earlier < SCHEDULE_INTERVAL / 2)
        outcome.slots = len(sends) - outcome.slots_doubled
        outcome.slots_missed = sum(max(round((later - earlier) / SCHEDULE_INTERVAL) - 1, 0)
                                   for earlier, later in pairs)
        outcome.slots_missed += max(int((end - sends[-1]) // SCHEDULE_INTERVAL), 0)
        outcome.slots_not_run = max(len(every_send) - len(runs.of_token(BEAT_TOKEN)), 0)
        outcome.slots_doubled += sum(1 for times in runs.of_token(BEAT_TOKEN).values()
                                     if len(times) > 1)
        outcome.notes.append("plain slots read from beat's log")

    def _beat_sends(self) -> list[float]:
        """When plain beat sent the schedule's task, from its log (local time, as logged)."""
        assert self.beat is not None
        marker = "Sending due task db faults: every second"
        sends = []
        for line in self.beat.log_text().splitlines():
            if marker in line and line.startswith("["):
                stamp = line[1:line.index(":", 20)]  # "[2026-12-03 12:37:47,169: INFO..."
                sends.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp())
        return sorted(sends)

    def log_problems(self) -> dict[str, int]:
        """Lines in the workers' and beat's logs worth a look, counted by kind."""
        kinds = {
            "Traceback": "tracebacks",
            "CRITICAL": "critical",
            "ERROR/": "errors",
            "did not take the claim": "claims deferred",
            "retrying until it is stored": "outcome writes waiting",
            "could not record": "ticks that recorded nothing (it stays due)",
            "worker heartbeat failed": "heartbeats failed",
        }
        counted: Counter[str] = Counter()
        for process in self.processes:
            for line in process.log_text().splitlines():
                for needle, kind in kinds.items():
                    if needle in line:
                        counted[f"{process.kind} {kind}"] += 1
        return dict(counted)


def run_scenario(scenario: str, variant: Variant, scale: DbScale, work_dir: Path) -> DbOutcome:
    """Run one scenario in this process (Django must not be set up yet); return its outcome."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with scenario_environment(variant, work_dir) as servers:
        return ScenarioRun(scenario, variant, scale, servers).run()


def outcome_json(outcome: DbOutcome) -> str:
    """The outcome as one line of JSON."""
    return json.dumps(outcome.as_dict(), sort_keys=True)
