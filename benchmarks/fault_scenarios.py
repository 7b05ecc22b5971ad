"""Fault scenarios shared by ``tests/faults`` (which assert on them) and ``make faults`` (which
prints them side by side for plain Celery and reliable_tasks).

Every scenario breaks Redis (or a worker, or both) while tasks are dispatched, then counts, from
the database, what happened to each task it tried to dispatch:

- **dispatched**: calls made (``reliable_tasks.dispatch("demo.record", ...)``, or for plain
  Celery ``demo.plain_record.apply_async(...)`` with adoption off);
- **raised**: calls that raised in the caller (a web request that failed);
- **lost**: calls that returned normally but whose task never ran;
- **run twice**: tasks whose body ran more than once (``demo.*record`` writes an ``Execution``
  row per body run);
- **recovery s**: seconds from the end of the fault (the new master elected, the hung master
  demoted, Redis back) until every task accepted before then had run; empty when some never
  ran;
- **max dispatch s**: the longest a single call blocked its caller.

The test process plays the sweeper (a thread running ``reliable_tasks.sweeper.sweep()`` every
``SWEEP_INTERVAL``) and a supervisor: a worker or beat that exited is started again, and
workers that stopped consuming (the queue on the current master is not empty and no task ran
for ``STALL_SECONDS``) are restarted, as systemd or Kubernetes would (after a failed liveness
probe); restarts are counted.

The scenarios run against what a ``Rig`` provides (workers and beats of the example project
pointed at a ``SentinelTopology`` or a ``RedisServer``), with the Celery app of this process
already pointed at the same broker: the pytest fixtures do that for the tests, and
``benchmarks.faults`` for the table. ``FAULTS_SCALE=full`` selects the full scale.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

import redis
from django.db import connections
from django.db.models import Count, Min
from django.test import override_settings
from django.utils import timezone

from example_project.devservers import (
    REPO_ROOT,
    CeleryProcess,
    RedisServer,
    SentinelTopology,
    TopologyRedisServer,
)

logger = logging.getLogger(__name__)

Variant = Literal["reliable", "plain"]
Broker = SentinelTopology | RedisServer

#: Printed names of the variants.
VARIANT_NAMES: dict[str, str] = {"reliable": "reliable_tasks", "plain": "plain Celery"}

#: Settings of this process (the dispatcher, the sweeper) during a scenario.
SWEEP_INTERVAL = 1.0
PUBLISH_GRACE = 1.0
PUBLISH_TIMEOUT = 2.0
LEASE_TIMEOUT = 3.0
#: Environment of the reliable variant's workers: short leases, frequent heartbeats.
RELIABLE_WORKER_ENV = {"RELIABLE_TASKS_LEASE_TIMEOUT": "3",
                       "RELIABLE_TASKS_HEARTBEAT_INTERVAL": "0.5"}
#: Environment of the plain variant's workers: plain Celery, nothing recorded.
PLAIN_WORKER_ENV = {"RELIABLE_TASKS_ADOPT": "false"}
#: The supervisor restarts a worker that ran nothing for this long while its queue was not empty.
STALL_SECONDS = 8.0
#: What the supervisor gives a stalled worker to stop before it is killed.
WORKER_STOP_TIMEOUT = 5.0
#: How long a Celery worker takes to reconnect after losing its broker, at most, when the
#: failover is over within a few seconds: kombu retries at once, then after 2 s and 4 s more.
CELERY_RECONNECT_SECONDS = 6.0
#: How long starting a worker of the example project takes here, at most.
WORKER_START_SECONDS = 10.0


# --- scale ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """How big each scenario is: small by default (the test suite), large with ``full``."""

    name: str
    kill_tasks: int
    kill_rate: float
    hang_seconds: tuple[float, ...]
    hang_rate: float
    outage_seconds: float
    outage_rate: float
    outage_backlog: int
    worker_kill_tasks: int
    beat_schedules: int
    beat_seconds_after_failover: float
    reconcile_processes: int
    reconcile_schedules: int


DEFAULT_SCALE = Scale(
    name="default", kill_tasks=200, kill_rate=50, hang_seconds=(5.0,), hang_rate=20,
    outage_seconds=5, outage_rate=20, outage_backlog=100, worker_kill_tasks=100,
    beat_schedules=2, beat_seconds_after_failover=8, reconcile_processes=5,
    reconcile_schedules=10,
)
FULL_SCALE = Scale(
    name="full", kill_tasks=2000, kill_rate=100, hang_seconds=(5.0, 30.0), hang_rate=50,
    outage_seconds=30, outage_rate=50, outage_backlog=1000, worker_kill_tasks=500,
    beat_schedules=5, beat_seconds_after_failover=40, reconcile_processes=5,
    reconcile_schedules=20,
)


def scale_from_env() -> Scale:
    """``FULL_SCALE`` when ``FAULTS_SCALE=full``, else ``DEFAULT_SCALE``."""
    return FULL_SCALE if os.environ.get("FAULTS_SCALE", "").lower() == "full" else DEFAULT_SCALE


# --- outcome --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one scenario run counted."""

    scenario: str
    variant: str
    dispatched: int = 0
    raised: int = 0
    lost: int = 0
    run_twice: int = 0
    recovery_seconds: float | None = None
    max_dispatch_seconds: float = 0.0
    worker_restarts: int = 0
    fault_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def variant_name(self) -> str:
        """The variant as printed."""
        return VARIANT_NAMES.get(self.variant, self.variant)

    def summary(self) -> str:
        """One line for logs and assertion messages."""
        recovery = "-" if self.recovery_seconds is None else f"{self.recovery_seconds:.1f}s"
        return (f"{self.scenario} [{self.variant_name}]: dispatched={self.dispatched} "
                f"raised={self.raised} lost={self.lost} run_twice={self.run_twice} "
                f"recovery={recovery} max_dispatch={self.max_dispatch_seconds:.2f}s "
                f"restarts={self.worker_restarts} notes={self.notes}")


# --- what a scenario needs from its surroundings --------------------------------------------------


class Rig(Protocol):
    """Starts Celery processes of the example project against a broker, and stops them later."""

    def worker(self, broker: Broker, *, env: Mapping[str, str] | None = None,
               concurrency: int = 2) -> CeleryProcess:
        """A started (ready) worker using ``broker`` and the database of this process."""
        ...

    def beat(self, broker: Broker, *, env: Mapping[str, str] | None = None,
             extra_args: Sequence[str] = ()) -> CeleryProcess:
        """A started beat using ``broker``."""
        ...

    def environment(self, broker: Broker, **extra: str) -> dict[str, str]:
        """The environment of a subprocess using ``broker`` and this process' database."""
        ...


def broker_environment(broker: Broker) -> dict[str, str]:
    """The variables that point the example project at ``broker``."""
    if isinstance(broker, SentinelTopology):
        return broker.env()
    return {"REDIS_URL": broker.url}


def _master_client(broker: Broker) -> redis.Redis:
    server = broker.master() if isinstance(broker, SentinelTopology) else broker
    return server.client(timeout=0.5)


def queue_depth(broker: Broker) -> int | None:
    """Messages waiting in the default queue of the current master; None if it cannot be asked."""
    try:
        with _master_client(broker) as client:
            return int(client.llen("celery"))
    except (redis.RedisError, RuntimeError, LookupError):
        return None


# --- counting -------------------------------------------------------------------------------------


def executions_by_token(prefix: str) -> dict[str, tuple[int, datetime]]:
    """``{token: (body runs, first run's time)}`` of the tokens starting with ``prefix``."""
    from example_project.demo.models import Execution

    rows = (Execution.objects.filter(token__startswith=prefix).values("token")
            .annotate(runs=Count("id"), first=Min("created_at")))
    return {row["token"]: (row["runs"], row["first"]) for row in rows}


def executed_count(prefix: str) -> int:
    """Body runs of the tokens starting with ``prefix`` so far."""
    from example_project.demo.models import Execution

    return Execution.objects.filter(token__startswith=prefix).count()


def count_outcome(outcome: Outcome, log: DispatchLog, prefix: str,
                  fault_over_at: datetime) -> None:
    """Fill ``lost``, ``run_twice`` and ``recovery_seconds`` from the ``Execution`` rows.

    Recovery: from ``fault_over_at`` until the last first run of the tasks accepted before it.
    """
    runs = executions_by_token(prefix)
    outcome.lost = sum(1 for token in log.accepted if token not in runs)
    outcome.run_twice = sum(1 for count, _ in runs.values() if count > 1)
    before = [token for token, at in zip(log.accepted, log.accepted_at, strict=True)
              if at <= fault_over_at]
    if outcome.lost or not before:
        outcome.recovery_seconds = None
        return
    last_first_run = max(runs[token][1] for token in before)
    outcome.recovery_seconds = max((last_first_run - fault_over_at).total_seconds(), 0.0)


def new_prefix(name: str, variant: Variant) -> str:
    """A token prefix unique to one run."""
    return f"{name}-{variant}-{uuid.uuid4().hex[:8]}-"


# --- dispatching ----------------------------------------------------------------------------------


def dispatcher(variant: Variant) -> Callable[[str], None]:
    """The call of one variant: ``dispatch("demo.record")`` or ``plain_record.apply_async``.

    The demo tasks are imported here, before callers in several threads look them up:
    ``reliable_tasks.celery_app.find_task`` imports the task modules on a first miss, and a
    second thread missing at the same time gets ``UnknownTaskError``.
    """
    import example_project.demo.tasks  # noqa: F401 - registers the demo tasks

    if variant == "reliable":
        from reliable_tasks import dispatch

        def send_reliable(token: str) -> None:
            dispatch("demo.record", (token,))

        return send_reliable

    from example_project.demo.tasks import plain_record

    def send_plain(token: str) -> None:
        plain_record.apply_async((token,))

    return send_plain


@dataclass
class DispatchLog:
    """What a steady stream of dispatches did."""

    accepted: list[str] = field(default_factory=list)
    accepted_at: list[datetime] = field(default_factory=list)
    raised: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    longest: float = 0.0
    ended_at: datetime | None = None

    @property
    def dispatched(self) -> int:
        """Calls made."""
        return len(self.accepted) + len(self.raised)

    def merge(self, other: DispatchLog) -> None:
        """Add the calls of ``other`` (another caller of the same run)."""
        self.accepted += other.accepted
        self.accepted_at += other.accepted_at
        self.raised += other.raised
        self.errors.update(other.errors)
        self.longest = max(self.longest, other.longest)


def dispatch_steadily(send: Callable[[str], None], prefix: str, count: int, rate: float,
                      log: DispatchLog | None = None) -> DispatchLog:
    """Call ``send`` ``count`` times, ``rate`` per second (late calls go at once)."""
    log = log or DispatchLog()
    started = time.monotonic()
    for index in range(count):
        delay = started + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        token = f"{prefix}{len(log.accepted) + len(log.raised)}"
        call_started = time.monotonic()
        try:
            send(token)
        except Exception as exc:  # noqa: BLE001 - counted: this is what the caller would see
            log.raised.append(token)
            log.errors[type(exc).__name__] += 1
        else:
            log.accepted.append(token)
            log.accepted_at.append(timezone.now())
        log.longest = max(log.longest, time.monotonic() - call_started)
    log.ended_at = timezone.now()
    return log


def dispatch_for(send: Callable[[str], None], prefix: str, seconds: float, rate: float,
                 log: DispatchLog) -> DispatchLog:
    """Dispatch ``rate`` per second for ``seconds`` (slow calls lower the count)."""
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    index = 0
    while time.monotonic() < deadline:
        delay = started + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        index += 1
        dispatch_steadily(send, prefix, 1, rate, log)
    return log


#: Calls of the idle caller after the old master woke up.
IDLE_CALLS = 10


class IdleCaller(threading.Thread):
    """A second caller, idle while the master hangs: one call before the fault, then ``count``
    calls every ``interval`` once ``awake`` is set, over the connection it kept."""

    def __init__(self, send: Callable[[str], None], prefix: str, count: int,
                 interval: float) -> None:
        super().__init__(name="fault-idle-caller", daemon=True)
        self.send = send
        self.prefix = prefix
        self.count = count
        self.interval = interval
        self.awake = threading.Event()
        self.log = DispatchLog()

    def run(self) -> None:
        try:
            dispatch_steadily(self.send, self.prefix, 1, 1.0, self.log)
            if not self.awake.wait(120):
                return
            dispatch_steadily(self.send, self.prefix, self.count, 1 / self.interval, self.log)
        finally:
            from reliable_tasks.publisher import close_publisher

            close_publisher()
            connections.close_all()


# --- the helpers running beside a scenario --------------------------------------------------------


class _Background(threading.Thread):
    """A daemon thread that runs ``step`` every ``interval`` until stopped; closes its DB."""

    def __init__(self, name: str, interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self._stopping = threading.Event()
        self.failures: Counter[str] = Counter()

    def step(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self.step()
                except Exception as exc:  # noqa: BLE001 - keep going: faults are the point
                    self.failures[type(exc).__name__] += 1
                    logger.debug("%s: %r", self.name, exc)
                self._stopping.wait(self.interval)
        finally:
            from reliable_tasks.publisher import close_publisher

            close_publisher()
            connections.close_all()

    def stop(self) -> None:
        """Stop after the current step and wait for the thread."""
        self._stopping.set()
        self.join(60)


class Sweeper(_Background):
    """Runs ``reliable_tasks.sweeper.sweep()`` every ``SWEEP_INTERVAL``, as beat would."""

    def __init__(self, interval: float = SWEEP_INTERVAL) -> None:
        super().__init__("fault-sweeper", interval)
        self.passes = 0
        self.broker_changes = 0
        self.requeued = 0

    def step(self) -> None:
        from reliable_tasks.sweeper import sweep

        report = sweep()
        self.passes += 1
        self.broker_changes += int(report.broker_changed)
        self.requeued += report.requeued_after_broker_loss


class Supervisor(_Background):
    """Restarts a worker (or beat) that exited at once (``Restart=always``), and every worker
    when they stopped consuming: the queue is not empty and nothing ran for ``stall_seconds``."""

    def __init__(self, rig: Rig, broker: Broker, workers: list[CeleryProcess],
                 start_worker: Callable[[], CeleryProcess], prefix: str,
                 stall_seconds: float = STALL_SECONDS,
                 beats: list[CeleryProcess] | None = None,
                 start_beat: Callable[[], CeleryProcess] | None = None) -> None:
        super().__init__("fault-supervisor", 0.5)
        self.rig = rig
        self.broker = broker
        self.workers = workers
        self.start_worker = start_worker
        self.beats = beats if beats is not None else []
        self.start_beat = start_beat
        self.beat_restarts = 0
        self.prefix = prefix
        self.stall_seconds = stall_seconds
        self.restarts = 0
        self._last_count = -1
        self._last_progress = time.monotonic()

    def step(self) -> None:
        for index, beat in enumerate(list(self.beats)):
            if not beat.is_running() and self.start_beat is not None:
                logger.warning("supervisor: %r exited; starting another", beat)
                beat.stop()
                self.beats[index] = self.start_beat()
                self.beat_restarts += 1
        for index, worker in enumerate(list(self.workers)):
            if not worker.is_running():
                logger.warning("supervisor: %r exited; starting another", worker)
                worker.stop()
                self.workers[index] = self.start_worker()
                self.restarts += 1
        count = executed_count(self.prefix)
        now = time.monotonic()
        if count != self._last_count:
            self._last_count, self._last_progress = count, now
            return
        depth = queue_depth(self.broker)
        if not depth or now - self._last_progress < self.stall_seconds:
            return
        logger.warning("supervisor: no task ran for %.0fs with %d queued; restarting %d "
                       "worker(s)", now - self._last_progress, depth, len(self.workers))
        for index, worker in enumerate(list(self.workers)):
            worker.stop(timeout=WORKER_STOP_TIMEOUT)
            self.workers[index] = self.start_worker()
        self.restarts += 1
        self._last_progress = time.monotonic()


@contextlib.contextmanager
def running(*threads: _Background) -> Iterator[None]:
    """Run the helper threads for the block."""
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            thread.stop()


class FaultTimer(threading.Thread):
    """Runs ``fault`` after ``delay`` seconds, then ``recover`` (which may block); times both."""

    def __init__(self, delay: float, fault: Callable[[], Any],
                 recover: Callable[[Any], Any]) -> None:
        super().__init__(name="fault-timer", daemon=True)
        self.delay = delay
        self.fault = fault
        self.recover = recover
        self.started_at: datetime | None = None
        self.recovered_at: datetime | None = None
        self.seconds: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        time.sleep(self.delay)
        try:
            began = time.monotonic()
            self.started_at = timezone.now()
            state = self.fault()
            self.recover(state)
            self.seconds = time.monotonic() - began
            self.recovered_at = timezone.now()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the scenario
            self.error = exc

    def finish(self, timeout: float = 120) -> None:
        """Wait for the fault to be over; raise what went wrong in it."""
        self.join(timeout)
        if self.is_alive():
            raise RuntimeError("the fault did not finish in time")
        if self.error is not None:
            raise self.error


def scenario_settings(variant: Variant, **extra: Any) -> override_settings:
    """This process' settings during a scenario (short sweeps and grace; no adoption if plain)."""
    values: dict[str, Any] = {
        "RELIABLE_TASKS_SWEEP_INTERVAL": SWEEP_INTERVAL,
        "RELIABLE_TASKS_PUBLISH_GRACE": PUBLISH_GRACE,
        "RELIABLE_TASKS_PUBLISH_TIMEOUT": PUBLISH_TIMEOUT,
        "RELIABLE_TASKS_LEASE_TIMEOUT": LEASE_TIMEOUT,
        "RELIABLE_TASKS_MISSED_RUN_GRACE": 60,
    }
    if variant == "plain":
        values["RELIABLE_TASKS_ADOPT"] = False
    values.update(extra)
    return override_settings(**values)


def worker_env(variant: Variant) -> dict[str, str]:
    """The environment added to the variant's workers."""
    return dict(RELIABLE_WORKER_ENV if variant == "reliable" else PLAIN_WORKER_ENV)


def wait_until_settled(done: Callable[[], bool], prefix: str, deadline: float,
                       quiet_seconds: float) -> None:
    """Wait until ``done()``, or until no task ran for ``quiet_seconds``, or the deadline."""
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        if done():
            return
        count = executed_count(prefix)
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change >= quiet_seconds:
            return
        time.sleep(0.5)


def ledger_finished() -> bool:
    """A check: is every ledger row finished (none waiting, queued or running)?"""
    from reliable_tasks.models import TaskRecord
    from reliable_tasks.states import FINISHED_STATES

    return not TaskRecord.objects.exclude(state__in=list(FINISHED_STATES)).exists()


def settled_check(prefix: str, accepted: Sequence[str], variant: Variant) -> Callable[[], bool]:
    """A check: has every accepted token run, and, for reliable_tasks, every row finished?

    A body that has run has not necessarily had its outcome written yet.
    """
    ran = all_ran(prefix, accepted)
    return lambda: ran() and (variant != "reliable" or ledger_finished())


def all_ran(prefix: str, accepted: Sequence[str]) -> Callable[[], bool]:
    """A check: has every accepted token run at least once?"""
    wanted = set(accepted)

    def check() -> bool:
        from example_project.demo.models import Execution

        seen = set(Execution.objects.filter(token__startswith=prefix)
                   .values_list("token", flat=True).distinct())
        return wanted <= seen

    return check


# --- scenario 1: master SIGKILL during a steady stream of dispatches ------------------------------


def kill_master_during_dispatch(rig: Rig, topology: SentinelTopology, variant: Variant,
                                scale: Scale) -> Outcome:
    """SIGKILL the master a quarter into ``kill_tasks`` dispatches at ``kill_rate`` per second."""
    outcome = Outcome("master SIGKILL during dispatch", variant)
    prefix = new_prefix("kill", variant)
    send = dispatcher(variant)
    with scenario_settings(variant):
        workers = [rig.worker(topology, env=worker_env(variant))]

        def start_worker() -> CeleryProcess:
            return rig.worker(topology, env=worker_env(variant))

        supervisor = Supervisor(rig, topology, workers, start_worker, prefix)
        helpers: list[_Background] = [supervisor]
        sweeper = Sweeper() if variant == "reliable" else None
        if sweeper is not None:
            helpers.append(sweeper)
        window = scale.kill_tasks / scale.kill_rate
        fault = FaultTimer(window / 4, topology.kill_master, topology.wait_for_new_master)
        with running(*helpers):
            if sweeper is not None:
                time.sleep(SWEEP_INTERVAL * 1.5)  # the sweeper has seen the first master
            fault.start()
            log = dispatch_steadily(send, prefix, scale.kill_tasks, scale.kill_rate)
            fault.finish()
            fault_over_at = fault.recovered_at or timezone.now()
            deadline = time.monotonic() + 60 + STALL_SECONDS * 2 + window
            wait_until_settled(settled_check(prefix, log.accepted, variant), prefix, deadline,
                               quiet_seconds=STALL_SECONDS * 2.5)
        _fill(outcome, log, prefix, fault_over_at, supervisor, fault)
        if sweeper is not None:
            outcome.notes.append(f"sweeper saw {sweeper.broker_changes} broker change(s), "
                                 f"requeued {sweeper.requeued}")
    return outcome


def _fill(outcome: Outcome, log: DispatchLog, prefix: str, fault_over_at: datetime,
          supervisor: Supervisor | None, fault: FaultTimer | None) -> None:
    outcome.dispatched = log.dispatched
    outcome.raised = len(log.raised)
    outcome.max_dispatch_seconds = log.longest
    outcome.worker_restarts = supervisor.restarts if supervisor is not None else 0
    outcome.fault_seconds = fault.seconds if fault is not None else None
    if log.errors:
        outcome.notes.append("raised: " + ", ".join(f"{n} {name}" for name, n in
                                                    log.errors.most_common()))
    count_outcome(outcome, log, prefix, fault_over_at)


# --- scenario 2: master hung, then demoted (split brain) ------------------------------------------


def hang_master_during_dispatch(rig: Rig, topology: SentinelTopology, variant: Variant,
                                hang_seconds: float, rate: float) -> Outcome:
    """Hang the master for ``hang_seconds`` (``DEBUG SLEEP``) while dispatching at ``rate``.

    Sentinel fails over after about a second; the old master wakes up still a master, accepts
    what its clients sent meanwhile, and is demoted some seconds later, dropping those writes
    (the split-brain loss). Besides the steady stream, an ``IdleCaller`` (another web process)
    dispatches once before the hang and then, from the moment the old master answers again,
    over the connection it kept to it. The workers are busy elsewhere (none consumes) until the
    old master has been demoted: what was written only to it is gone by then.
    """
    outcome = Outcome(f"master hung {hang_seconds:g}s", variant)
    prefix = new_prefix(f"hang{hang_seconds:g}", variant)
    send = dispatcher(variant)
    with scenario_settings(variant):
        helpers: list[_Background] = []
        sweeper = Sweeper() if variant == "reliable" else None
        if sweeper is not None:
            helpers.append(sweeper)
        pauses: list[subprocess.Popen[bytes]] = []
        old_master: list[TopologyRedisServer] = []
        idle = IdleCaller(send, f"{prefix}idle-", count=IDLE_CALLS, interval=0.5)

        def hang() -> TopologyRedisServer:
            master, pause = topology.hang_master(hang_seconds)
            pauses.append(pause)
            old_master.append(master)
            return master

        def recover(master: TopologyRedisServer) -> None:
            topology.wait_for_new_master(master, timeout=hang_seconds + 30)
            pauses[0].wait()
            idle.awake.set()

        fault = FaultTimer(2.0, hang, recover)
        log = DispatchLog()
        with running(*helpers):
            if sweeper is not None:
                time.sleep(SWEEP_INTERVAL * 1.5)
            idle.start()
            fault.start()
            dispatch_for(send, prefix, 2.0 + hang_seconds + 3.0, rate, log)
            fault.finish(timeout=hang_seconds + 60)
            idle.join(60)
            log.merge(idle.log)
            log.ended_at = timezone.now()
            # The old master is demoted within about 15 s of waking up: its writes vanish then.
            with contextlib.suppress(RuntimeError):
                topology.wait_replica(old_master[0], timeout=40)
            demoted_at = timezone.now()
            workers = [rig.worker(topology, env=worker_env(variant))]

            def start_worker() -> CeleryProcess:
                return rig.worker(topology, env=worker_env(variant))

            supervisor = Supervisor(rig, topology, workers, start_worker, prefix)
            with running(supervisor):
                deadline = time.monotonic() + 60 + STALL_SECONDS * 2
                wait_until_settled(settled_check(prefix, log.accepted, variant), prefix, deadline,
                                   quiet_seconds=STALL_SECONDS * 2.5)
        _fill(outcome, log, prefix, demoted_at, supervisor, fault)
        if sweeper is not None:
            outcome.notes.append(f"sweeper saw {sweeper.broker_changes} broker change(s), "
                                 f"requeued {sweeper.requeued}")
    return outcome


# --- scenario 3: Redis stopped, then restarted empty ----------------------------------------------


def redis_outage(rig: Rig, server: RedisServer, variant: Variant, scale: Scale) -> Outcome:
    """Redis crashes with ``outage_backlog`` tasks queued, stays down ``outage_seconds`` while
    dispatching goes on, and comes back empty; the worker starts during the outage."""
    outcome = Outcome(f"Redis down {scale.outage_seconds:g}s, back empty", variant)
    prefix = new_prefix("outage", variant)
    send = dispatcher(variant)
    with scenario_settings(variant):
        sweeper = Sweeper() if variant == "reliable" else None
        log = DispatchLog()
        with running(*([sweeper] if sweeper is not None else [])):
            time.sleep(SWEEP_INTERVAL * 1.5)
            dispatch_steadily(send, prefix, scale.outage_backlog, 1000.0, log)
            time.sleep(SWEEP_INTERVAL * 1.5)  # the sweeper has seen the rows queued
            server.kill()
            down_at = time.monotonic()
            # The worker starts during the outage: it is ready once Redis is back.
            failures: list[BaseException] = []

            def start_worker() -> None:
                try:
                    rig.worker(server, env=worker_env(variant))
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    failures.append(exc)

            starting = threading.Thread(target=start_worker, daemon=True)
            starting.start()
            dispatch_for(send, prefix, scale.outage_seconds, scale.outage_rate, log)
            time.sleep(max(scale.outage_seconds - (time.monotonic() - down_at), 0))
            server.restart()
            back_at = timezone.now()
            starting.join(90)
            if failures:
                raise failures[0]
            dispatch_for(send, prefix, 3.0, scale.outage_rate, log)
            log.ended_at = timezone.now()
            supervisor_deadline = time.monotonic() + 60 + STALL_SECONDS
            wait_until_settled(settled_check(prefix, log.accepted, variant), prefix,
                               supervisor_deadline, quiet_seconds=STALL_SECONDS * 2)
        _fill(outcome, log, prefix, back_at, None, None)
        outcome.fault_seconds = scale.outage_seconds
    return outcome


# --- scenario 4: worker SIGKILL mid-task, and a failover ------------------------------------------


def kill_worker_and_master(rig: Rig, topology: SentinelTopology, variant: Variant,
                           scale: Scale) -> Outcome:
    """A worker takes ``worker_kill_tasks`` queued tasks; a third of the way through, the whole
    worker (main process and pool) is SIGKILLed, then the master; a new worker starts.

    reliable_tasks runs ``demo.resumable_record`` (``retry_on_lost``, a 50 ms body), plain
    Celery ``demo.plain_record``.
    """
    outcome = Outcome("worker + master SIGKILL", variant)
    prefix = new_prefix("workerkill", variant)
    if variant == "reliable":
        from reliable_tasks import dispatch

        def send(token: str) -> None:
            dispatch("demo.resumable_record", (token, 0.05))
    else:
        send = dispatcher(variant)
    with scenario_settings(variant):
        sweeper = Sweeper() if variant == "reliable" else None
        with running(*([sweeper] if sweeper is not None else [])):
            time.sleep(SWEEP_INTERVAL * 1.5)
            log = dispatch_steadily(send, prefix, scale.worker_kill_tasks, 1000.0)
            worker = rig.worker(topology, env=worker_env(variant))
            third = scale.worker_kill_tasks // 3
            deadline = time.monotonic() + 120
            while executed_count(prefix) < third and time.monotonic() < deadline:
                time.sleep(0.05)
            worker.kill_all()
            killed_at = time.monotonic()
            old = topology.kill_master()
            topology.wait_for_new_master(old)
            failover_seconds = time.monotonic() - killed_at
            recovered_at = timezone.now()
            workers = [rig.worker(topology, env=worker_env(variant))]

            def start_worker() -> CeleryProcess:
                return rig.worker(topology, env=worker_env(variant))

            supervisor = Supervisor(rig, topology, workers, start_worker, prefix)
            with running(supervisor):
                deadline = time.monotonic() + 90
                # A task killed mid-run may still be re-running once every body ran once.
                wait_until_settled(settled_check(prefix, log.accepted, variant), prefix,
                                   deadline, quiet_seconds=STALL_SECONDS * 2)
        _fill(outcome, log, prefix, recovered_at, supervisor, None)
        outcome.fault_seconds = failover_seconds
    return outcome


# --- scenario 5: beat through a failover ----------------------------------------------------------


@dataclass
class BeatCount:
    """Runs of the periodic schedules of one beat scenario."""

    slots: int = 0
    missed: int = 0
    doubled: int = 0
    not_run: int = 0
    run_twice: int = 0
    latest_seconds: float = 0.0


def count_reliable_beat(schedule_ids: Sequence[int], interval: float,
                        until: datetime) -> BeatCount:
    """Count ledger rows per slot (one), gaps between slots (exact) and body runs (one)."""
    from example_project.demo.models import Execution
    from reliable_tasks.models import TaskRecord

    counted = BeatCount()
    for schedule_id in schedule_ids:
        rows = list(TaskRecord.objects.filter(schedule_id=schedule_id, scheduled_for__lte=until)
                    .order_by("scheduled_for").values_list("id", "scheduled_for"))
        slots = Counter(slot for _, slot in rows)
        counted.slots += len(slots)
        counted.doubled += sum(n - 1 for n in slots.values() if n > 1)
        ordered = sorted(slots)
        for earlier, later in zip(ordered, ordered[1:], strict=False):
            gap = (later - earlier).total_seconds()
            counted.missed += max(round(gap / interval) - 1, 0)
        if ordered:  # slots after the last recorded one (beat stopped recording them)
            counted.missed += max(int((until - ordered[-1]).total_seconds() // interval) - 1, 0)
        runs = dict(Execution.objects.filter(task_id__in=[str(pk) for pk, _ in rows])
                    .values("task_id").annotate(n=Count("id"), first=Min("created_at"))
                    .values_list("task_id", "n"))
        firsts = dict(Execution.objects.filter(task_id__in=[str(pk) for pk, _ in rows])
                      .values("task_id").annotate(first=Min("created_at"))
                      .values_list("task_id", "first"))
        for pk, slot in rows:
            n = runs.get(str(pk), 0)
            counted.not_run += int(n == 0)
            counted.run_twice += int(n > 1)
            if n:
                counted.latest_seconds = max(counted.latest_seconds,
                                             (firsts[str(pk)] - slot).total_seconds())
    return counted


def count_plain_beat(prefix: str, interval: float, started: datetime,
                     until: datetime) -> BeatCount:
    """Plain RedBeat keeps no record of its slots: infer them from the runs' times.

    Two runs less than half an interval apart are one slot run twice; the slots expected are
    those from the first run to ``until`` (one of tolerance for the slot due as beat stopped),
    and those without a run are missed.
    """
    from example_project.demo.models import Execution

    counted = BeatCount()
    by_token: dict[str, list[datetime]] = {}
    for token, created in (Execution.objects.filter(token__startswith=prefix,
                                                    created_at__gte=started,
                                                    created_at__lte=until)
                           .order_by("created_at").values_list("token", "created_at")):
        by_token.setdefault(token, []).append(created)
    for times in by_token.values():
        doubled = sum(1 for earlier, later in zip(times, times[1:], strict=False)
                      if (later - earlier).total_seconds() < interval / 2)
        ran = len(times) - doubled
        expected = int((until - times[0]).total_seconds() // interval) + 1
        counted.slots += ran
        counted.doubled += doubled
        counted.missed += max(expected - ran - 1, 0)
    return counted


def beat_through_failover(rig: Rig, topology: SentinelTopology, variant: Variant,
                          scale: Scale, interval: int = 1) -> Outcome:
    """Schedules every ``interval`` s; beat and a worker run; the master is SIGKILLed.

    reliable_tasks: ``PeriodicSchedule`` rows and ``ReliableRedBeatScheduler``, counted per slot
    in the ledger. Plain Celery: the same entries written to RedBeat directly and
    ``redbeat.RedBeatScheduler``, counted from the runs' times.
    """
    outcome = Outcome("beat through a failover", variant)
    prefix = new_prefix("beat", variant)
    with scenario_settings(variant):
        schedule_ids = _install_schedules(topology, variant, prefix, scale.beat_schedules,
                                          interval)
        workers = [rig.worker(topology, env=worker_env(variant))]
        extra_args = ("--scheduler=redbeat.RedBeatScheduler",) if variant == "plain" else ()

        def start_beat() -> CeleryProcess:
            return rig.beat(topology, env={**worker_env(variant),
                                           "RELIABLE_TASKS_SWEEP_INTERVAL": "1"},
                            extra_args=extra_args)

        def start_worker() -> CeleryProcess:
            return rig.worker(topology, env=worker_env(variant))

        beats = [start_beat()]
        supervisor = Supervisor(rig, topology, workers, start_worker, prefix, beats=beats,
                                start_beat=start_beat)
        with running(supervisor):
            deadline = time.monotonic() + 60
            while executed_count(prefix) < scale.beat_schedules * 3:
                if time.monotonic() > deadline:
                    raise RuntimeError("beat did not run the schedules before the fault")
                time.sleep(0.2)
            started = timezone.now()
            killed = time.monotonic()
            old = topology.kill_master()
            topology.wait_for_new_master(old)
            outcome.fault_seconds = time.monotonic() - killed
            time.sleep(scale.beat_seconds_after_failover)
            supervisor.stop()
            for beat in beats:
                beat.stop()
            until = timezone.now()
            time.sleep(3)  # the last runs finish
        outcome.worker_restarts = supervisor.restarts + supervisor.beat_restarts
        if supervisor.beat_restarts:
            outcome.notes.append(f"beat exited and was restarted {supervisor.beat_restarts}x")
    if variant == "reliable":
        counted = count_reliable_beat(schedule_ids, interval, until)
    else:
        counted = count_plain_beat(prefix, interval, started - timedelta(seconds=5), until)
        outcome.notes.append("plain slots inferred from run times")
    outcome.dispatched = counted.slots + counted.missed
    outcome.lost = counted.missed + counted.not_run
    outcome.run_twice = counted.doubled + counted.run_twice
    outcome.recovery_seconds = counted.latest_seconds if variant == "reliable" else None
    outcome.notes.append(f"slots={counted.slots} missed={counted.missed} "
                         f"doubled={counted.doubled} not_run={counted.not_run} "
                         f"run_twice={counted.run_twice} "
                         f"latest run {counted.latest_seconds:.1f}s after its slot")
    return outcome


def _install_schedules(topology: SentinelTopology, variant: Variant, prefix: str, count: int,
                       interval: int) -> list[int]:
    if variant == "reliable":
        from reliable_tasks.models import PeriodicSchedule

        return [PeriodicSchedule.objects.create(
            name=f"{prefix}{index}", task="demo.record", args=[f"{prefix}{index}"],
            interval_seconds=interval).pk for index in range(count)]
    from celery.schedules import schedule
    from redbeat.schedulers import RedBeatSchedulerEntry

    from example_project.celery import app

    for index in range(count):
        RedBeatSchedulerEntry(f"{prefix}{index}", "demo.plain_record",
                              schedule(run_every=interval), args=[f"{prefix}{index}"],
                              app=app).save()
    return []


# --- scenario 6: reconcile from many processes while beat runs ------------------------------------


def reconcile_while_beat_runs(rig: Rig, topology: SentinelTopology, scale: Scale,
                              interval: int = 2) -> tuple[Outcome, str, list[str]]:
    """``manage.py reconcile_tasks`` twice from each of ``reconcile_processes`` processes at
    once while beat runs schedules every ``interval`` s; returns the outcome, beat's log and the
    outputs of the runs. The lock must stay with beat and every slot must run once.
    """
    from reliable_tasks import redbeat_store
    from reliable_tasks.models import PeriodicSchedule

    outcome = Outcome(f"reconcile x{scale.reconcile_processes} while beat runs", "reliable")
    prefix = new_prefix("reconcile", "reliable")
    with scenario_settings("reliable"):
        ids = [PeriodicSchedule.objects.create(
            name=f"{prefix}{index}", task="demo.add", args=[index, index],
            interval_seconds=interval).pk for index in range(scale.reconcile_schedules)]
        rig.worker(topology, env=worker_env("reliable"))
        # A slot later than the grace is skipped: 5 s keeps a CPU-starved tick from counting.
        beat = rig.beat(topology, env={"RELIABLE_TASKS_MISSED_RUN_GRACE": "5"})
        from example_project.celery import app

        lock_key = redbeat_store.lock_key(app)
        deadline = time.monotonic() + 30
        token = None
        while token is None and time.monotonic() < deadline:
            with _master_client(topology) as client:
                token = client.get(lock_key)
            time.sleep(0.2)
        if token is None:
            raise RuntimeError("beat never took its lock")
        time.sleep(3)
        started = timezone.now()
        env = rig.environment(topology)
        script = (f"for i in 1 2; do {sys.executable} manage.py reconcile_tasks --wait 5 "
                  f"|| exit 1; done")
        runs = [subprocess.Popen(["bash", "-c", script], cwd=REPO_ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(scale.reconcile_processes)]
        outputs = [proc.communicate(timeout=240)[0] for proc in runs]
        time.sleep(interval * 2.5)
        until = timezone.now()
        with _master_client(topology) as client:
            still = client.get(lock_key)
        outcome.dispatched = len(runs) * 2
        outcome.raised = sum(1 for proc in runs if proc.returncode != 0)
        if still != token:
            outcome.notes.append("beat's lock changed hands")
        counted = count_reliable_beat(ids, interval, until)
        from reliable_tasks.models import TaskRecord

        rows_after = TaskRecord.objects.filter(schedule_id__in=ids, scheduled_for__gte=started,
                                               scheduled_for__lte=until).count()
        outcome.lost = counted.missed
        outcome.run_twice = counted.doubled
        outcome.notes.append(f"{rows_after} periodic runs during the reconciles, "
                             f"missed={counted.missed} doubled={counted.doubled}")
        return outcome, beat.log_text(), outputs
