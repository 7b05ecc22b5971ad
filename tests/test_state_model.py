"""A model-based test of the ledger's whole state machine (hypothesis stateful testing).

``LedgerMachine`` drives random interleavings of everything that moves a ``TaskRecord``, against
the real database and a real Redis server of the test (``redis_server``), and keeps a model of
each task: the runs of its body (won claims), what became of each, and the attempt budget it is
owed. Each example starts from empty tables and an empty broker. The rules:

- ``dispatch``: ``reliable_tasks.dispatch`` of ``demo.noop`` (``retry_on_lost`` off) or
  ``demo.resumable_record`` (on), with or without ``max_attempts``, an ``expires`` already past
  or a delay held in the database; its after-commit publish goes out, is refused by the broker,
  or is held back (the process is slow, or died) for ``after_commit_publish``.
- ``after_commit_publish``: a held-back publish runs now (or is refused), however late.
- ``deliver``: a worker takes a message off the broker's queue and claims it (``ledger.claim``
  with its name and a ``started_at`` token, as ``ReliableTask`` does); ``redeliver``: a duplicate
  delivery of an id delivered before (``acks_late``, a second copy).
- ``succeed``, ``fail``, ``raise_retryable``: the outcome of a won claim, written from the claim
  (``ledger.record_success``, ``record_failure``, ``record_retry`` and the retry's publish, by
  ``ReliableTask``'s rule: retry while attempts are left, else FAILURE). A run that never
  reports is a dead worker; one that reports after its lease ran out, a stalled one.
- ``stop_heartbeating``: a worker stops renewing one lease (the lease is moved into the past);
  ``heartbeat``: a worker renews the leases of the runs it really runs (``heartbeat.beat``);
  ``database_outage``: the database was away longer than a lease, so every lease ran out by its
  clock although the workers only waited (the ledger's pulse starts again: ``pulse``).
- ``sweeper_pass``: ``sweeper.sweep(now=...)`` at the database's time plus 0 s, past the publish
  grace, past a lease or past the held delay, its publishes sent or refused.
- ``broker_loses_its_data``: the Redis server restarts empty (a new run id), once per example.
- ``manual_retry``: ``reliable_tasks.retry`` or ``ledger.retry``, with or without ``force``;
  ``revoke``: ``ledger.record_revoked`` of a running task (its run goes on).

Settings: ``HISTORY_LIMIT`` is 2, so that the bounded history drops entries within an example.

Time. Leases are written with the database's clock and last ``LEASE`` (120 s), far longer than
an example, so no lease runs out by itself: it runs out when a worker stops heartbeating, in an
outage, or for a sweeper pass that runs ``jump`` seconds ahead (as if that much time had passed
without heartbeats). The pulse row is set before each pass as live heartbeats would keep it
(steady since the example began, or since the last outage), so a pass judges leases exactly
when ``pulse.leases_may_expire`` allows.

Checked after every step (and, for what a step must do, within it):

- a finished row (SUCCESS, FAILURE, LOST, REVOKED, EXPIRED) never moves except by a manual retry,
  or from LOST to SUCCESS by the late success of the very attempt taken for lost (the README's
  state table allows that one);
- a body never runs twice: every won claim is a new attempt, and no claim wins while an earlier
  run of the task (since its last manual retry) has neither failed and had its retry recorded,
  nor lost its lease for good (expired, not after an outage) in a task with ``retry_on_lost``;
- an outcome moves the row only for the attempt that holds it (or held it last: a stalled one),
  never after a later claim or a manual retry;
- every unfinished row is reachable by the sweeper: PENDING and RETRY have ``next_attempt_at``,
  STARTED has a lease and a known claim, QUEUED has its message in the broker or the broker's
  run id changed since the ledger saw it (the next pass requeues it);
- attempts equal the won claims and never exceed the budget: ``max_attempts``, and after a
  manual retry the attempts made before it plus a fresh budget of the task's;
- a claim wins exactly when the contract says it must (it takes over an expired lease only a
  whole lease after the last outage, as the sweeper does); a pass expires the leases it may judge
  (RETRY for ``retry_on_lost`` with attempts left, else LOST) and publishes every due row;
  a late publish marks QUEUED only the rows still at the attempt it published.

Running it. ``make test`` runs 25 examples of up to 30 steps (about 20 s on SQLite, 30 s on
PostgreSQL or MariaDB). For a longer run set ``STATE_MODEL_EXAMPLES`` (and ``STATE_MODEL_STEPS``,
the steps per example), e.g. ``STATE_MODEL_EXAMPLES=2000 make test
PYTEST_ARGS=tests/test_state_model.py``. A failure is reported as found, its steps printed;
``STATE_MODEL_SHRINK=1`` shrinks it to a minimal sequence first (slow: up to five minutes), and
``--hypothesis-seed=N`` repeats a run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast
from unittest import mock

import pytest
from django.test import override_settings
from django.utils import timezone
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import reliable_tasks
from example_project.celery import app as celery_app
from example_project.devservers import RedisServer
from reliable_tasks import ledger, outbox
from reliable_tasks.clock import database_now
from reliable_tasks.exceptions import RetryNotAllowed
from reliable_tasks.heartbeat import beat
from reliable_tasks.models import BrokerEpoch, LedgerPulse, TaskRecord, WorkerHeartbeat
from reliable_tasks.publisher import close_publisher
from reliable_tasks.pulse import PULSE_NAME
from reliable_tasks.states import (
    CLAIMABLE_STATES,
    FINISHED_STATES,
    MANUALLY_RETRYABLE_STATES,
    TaskState,
)
from reliable_tasks.sweeper import sweep

pytestmark = pytest.mark.django_db(transaction=True)

EXAMPLES = int(os.environ.get("STATE_MODEL_EXAMPLES", "25"))
STEPS = int(os.environ.get("STATE_MODEL_STEPS", "30"))
#: Shrinking a failing example to a minimal one re-runs it hundreds of times (up to 5 minutes):
#: only when asked for. Without it, the failing example is reported as it was found.
SHRINK = os.environ.get("STATE_MODEL_SHRINK", "") == "1"

#: ``LEASE_TIMEOUT`` and ``PUBLISH_GRACE`` of the test. Every time the model compares (a due
#: time or a lease against a pass ``jump`` seconds ahead) differs from the next such boundary by
#: at least 30 s, so the wall-clock time an example takes never decides anything: its replays
#: behave the same (hypothesis needs that).
LEASE = 120.0
GRACE = 30.0
#: A delay longer than ``DELAY_THRESHOLD`` (300 s): held in the database, not in Redis.
HELD_DELAY = 600.0
#: How far ahead of the database's clock a sweeper pass runs: now, past the publish grace,
#: past a lease, past a held delay.
JUMPS = (0.0, GRACE + 1, LEASE + 1, HELD_DELAY + 1)
WORKERS = ("w1@model", "w2@model")
MAX_TASKS = 2
#: Restarts of the broker per example (each costs about 0.1 s).
MAX_RESTARTS = 1
QUEUE = "celery"
#: The task of a row by whether it may re-run after its worker died (``retry_on_lost``).
TASK_NAMES = {False: "demo.noop", True: "demo.resumable_record"}
TASK_ARGS = {False: (), True: ("model",)}

#: How a publish goes: sent, refused by the broker, or not tried yet (held back).
SENT, REFUSED, HELD_BACK = "sent", "refused", "held back"

#: What a dispatch draws: ``max_attempts`` (None: the task's), how its after-commit publish
#: goes, whether its ``expires`` has passed already, whether its delay is held in the database.
MAX_ATTEMPTS = st.sampled_from([None, 1, 2, 3])
PUBLISH = st.sampled_from([SENT, SENT, REFUSED, HELD_BACK])
EXPIRED = st.sampled_from([False] * 7 + [True])
HELD = st.sampled_from([False, False, False, True])


def task_budget(name: str) -> int:
    """The ``max_attempts`` of the task registered as ``name``."""
    task: Any = celery_app.tasks[name]
    return int(task.max_attempts)


class Row(NamedTuple):
    """The columns of a ledger row that the model looks at."""

    state: str
    attempts: int
    max_attempts: int | None
    next_attempt_at: datetime | None
    lease_expires_at: datetime | None
    expires_at: datetime | None
    worker: str
    started_at: datetime | None


ROW_FIELDS = Row._fields


@dataclass(eq=False)
class Run:
    """One won claim: a run of the task's body, and what became of it."""

    #: Its name in the steps hypothesis prints (``run<n>``).
    label: str
    task: ModelTask
    worker: str
    started_at: datetime
    attempt: int
    generation: int
    claim: ledger.Claim
    #: ``success``, ``failure`` or ``retry`` once the run reported; None while it runs.
    outcome: str | None = None
    #: Whether the ledger took the outcome.
    recorded: bool = False
    #: The worker stopped renewing the lease (it died, or stalled and may report late).
    stalled: bool = False
    #: The lease ran out in a way the ledger may take for a dead worker.
    lease_expired: bool = False

    def __repr__(self) -> str:
        return (f"{self.label} ({self.task.label} attempt {self.attempt} on {self.worker}"
                f"{', stalled' if self.stalled else ''})")

    def holds(self, row: Row) -> bool:
        """Whether the row is STARTED under this run's claim."""
        return row.state == TaskState.STARTED and (row.worker, row.started_at) == (
            self.worker, self.started_at)


@dataclass(eq=False)
class ModelTask:
    """What the model knows of one dispatched task."""

    id: str
    label: str
    retry_on_lost: bool
    #: The attempts one budget allows: ``max_attempts`` of the dispatch, else the task's.
    budget: int
    #: The attempts allowed so far: the budget, counted afresh from each manual retry.
    limit: int
    #: Manual retries so far: runs of an earlier generation were re-run on purpose.
    generation: int = 0
    runs: list[Run] = field(default_factory=list)
    delivered: bool = False
    #: Set for the invariants of one step: the row may leave a finished state (a manual retry,
    #: or the late success of the attempt that was taken for lost).
    may_leave_finished: bool = False

    def __repr__(self) -> str:
        return self.label


class LedgerMachine(RuleBasedStateMachine):
    """The ledger, the broker, workers and sweepers as one state machine (see the module).

    Tasks and runs are drawn by label (``task0``, ``run0``), not kept in bundles: hypothesis
    ranks the rules that fill a bundle last, which starved dispatches and claims.
    """

    @classmethod
    def on(cls, server: RedisServer) -> type[LedgerMachine]:
        """This machine, its examples run against ``server``."""
        return type(cls.__name__, (cls,), {"server_of_test": server})

    #: The Redis server of the test (set by ``on``).
    server_of_test: RedisServer

    def __init__(self) -> None:
        """Start every example from an empty ledger and an empty broker whose run id is known."""
        super().__init__()
        self.server = server = self.server_of_test
        for model in (TaskRecord, LedgerPulse, BrokerEpoch, WorkerHeartbeat):
            model.objects.all().delete()
        if not server.is_running():
            server.start()
        server.flush()
        close_publisher()
        self.redis = server.client()
        self.models: dict[str, ModelTask] = {}
        self.runs: list[Run] = []
        self.seen: dict[str, Row] = {}
        self.held_back: list[list[TaskRecord]] = []
        self.restarts = 0
        self.last_token = timezone.now()
        self.steady_since = database_now() - timedelta(seconds=LEASE)
        self.set_pulse(database_now())
        sweep()  # the sweeper has watched this broker from the start: its run id is known

    def teardown(self) -> None:
        """Close this example's Redis client."""
        self.redis.close()

    # --- helpers ------------------------------------------------------------------------------

    def row(self, task: ModelTask) -> Row:
        """The task's row now."""
        return Row(*TaskRecord.objects.values_list(*ROW_FIELDS).get(pk=task.id))

    def rows(self) -> dict[str, Row]:
        """Every modelled task's row, by task id."""
        found = TaskRecord.objects.filter(pk__in=list(self.models)).values_list("id", *ROW_FIELDS)
        return {str(values[0]): Row(*values[1:]) for values in found}

    def messages(self) -> list[tuple[str, str]]:
        """The messages waiting in the broker's queue: (raw message, task id)."""
        raws = cast(list[str], self.redis.lrange(QUEUE, 0, -1))  # the client decodes them
        return [(raw, str(json.loads(raw)["headers"]["id"])) for raw in raws]

    def token(self) -> datetime:
        """A claim's start time, later than every earlier one (tokens never collide)."""
        self.last_token = max(timezone.now(), self.last_token + timedelta(milliseconds=1))
        return self.last_token

    @contextmanager
    def publishing(self, mode: str) -> Iterator[None]:
        """Run the block with its publishes sent, refused by the broker, or held back."""
        if mode == REFUSED:
            refused = ConnectionError("the broker refused the publish (model)")
            with mock.patch.object(outbox, "send_records", side_effect=refused):
                yield
        elif mode == HELD_BACK:
            with mock.patch.object(outbox, "publish_committed", side_effect=self.held_back.append):
                yield
        else:
            yield

    def set_pulse(self, now: datetime) -> None:
        """The pulse as live heartbeats keep it: seen just now, steady since ``steady_since``."""
        LedgerPulse.objects.update_or_create(
            name=PULSE_NAME,
            defaults={"last_seen_at": now - timedelta(seconds=1),
                      "steady_since": self.steady_since})

    def running(self) -> list[Run]:
        """Runs that have not reported."""
        return [run for run in self.runs if run.outcome is None]

    def draw_task(self, data: st.DataObject, tasks: list[ModelTask] | None = None) -> ModelTask:
        """One of ``tasks`` (default: all), drawn by label."""
        by_label = {task.label: task for task in (self.models.values() if tasks is None
                                                  else tasks)}
        return by_label[data.draw(st.sampled_from(sorted(by_label)), label="task")]

    def draw_run(self, data: st.DataObject, runs: list[Run]) -> Run:
        """One of ``runs``, drawn by label."""
        by_label = {run.label: run for run in runs}
        return by_label[data.draw(st.sampled_from(sorted(by_label)), label="run")]

    def limit_of(self, task: ModelTask, row: Row) -> int:
        """The attempts the ledger allows the row: its own limit, else the task's."""
        return row.max_attempts or task_budget(TASK_NAMES[task.retry_on_lost])

    # --- dispatch and publishing --------------------------------------------------------------

    @initialize(retry_on_lost=st.booleans(), max_attempts=MAX_ATTEMPTS, publish=PUBLISH,
                expired=EXPIRED, held=HELD)
    def first_dispatch(self, retry_on_lost: bool, max_attempts: int | None, publish: str,
                       expired: bool, held: bool) -> None:
        """Every example has a task from the start (swarm testing may turn ``dispatch`` off)."""
        self.dispatch_task(retry_on_lost, max_attempts, publish, expired, held)

    @precondition(lambda self: len(self.models) < MAX_TASKS)
    @rule(retry_on_lost=st.booleans(), max_attempts=MAX_ATTEMPTS, publish=PUBLISH,
          expired=EXPIRED, held=HELD)
    def dispatch(self, retry_on_lost: bool, max_attempts: int | None, publish: str,
                 expired: bool, held: bool) -> None:
        """Another task."""
        self.dispatch_task(retry_on_lost, max_attempts, publish, expired, held)

    def dispatch_task(self, retry_on_lost: bool, max_attempts: int | None, publish: str,
                      expired: bool, held: bool) -> None:
        """``reliable_tasks.dispatch`` in autocommit: recorded, then published on commit."""
        options: dict[str, Any] = {}
        if max_attempts is not None:
            options["max_attempts"] = max_attempts
        if expired:
            options["expires"] = timezone.now() - timedelta(seconds=1)
        if held:
            options["countdown"] = HELD_DELAY
        name = TASK_NAMES[retry_on_lost]
        with self.publishing(publish):
            record = reliable_tasks.dispatch(name, TASK_ARGS[retry_on_lost], **options)
        budget = max_attempts or task_budget(name)
        task = ModelTask(id=str(record.pk), label=f"task{len(self.models)}",
                         retry_on_lost=retry_on_lost, budget=budget, limit=budget)
        self.models[task.id] = task
        row = self.row(task)
        expected = TaskState.QUEUED if publish == SENT and not held else TaskState.PENDING
        assert row.state == expected, f"{task} dispatched ({publish}) is {row.state}"
        assert row.next_attempt_at is not None or expected == TaskState.QUEUED

    @precondition(lambda self: self.held_back)
    @rule(data=st.data(), refused=st.booleans())
    def after_commit_publish(self, data: st.DataObject, refused: bool) -> None:
        """A held-back after-commit publish runs now, whatever became of its rows meanwhile."""
        batch = self.held_back.pop(data.draw(st.integers(0, len(self.held_back) - 1),
                                             label="batch"))
        before = {str(record.pk): self.row(self.models[str(record.pk)]) for record in batch}
        with self.publishing(REFUSED if refused else SENT):
            outbox.publish_committed(batch)
        for record in batch:
            task = self.models[str(record.pk)]
            was, row = before[task.id], self.row(task)
            marked = (not refused and was.state in (TaskState.PENDING, TaskState.RETRY)
                      and was.attempts == record.attempts)
            expected = TaskState.QUEUED if marked else was.state
            assert row.state == expected, (
                f"{task}: a late publish of attempt {record.attempts} found {was.state} at "
                f"attempt {was.attempts} and left {row.state}")

    # --- workers ------------------------------------------------------------------------------

    @precondition(lambda self: self.redis.llen(QUEUE) > 0)
    @rule(data=st.data(), worker=st.sampled_from(WORKERS))
    def deliver(self, data: st.DataObject, worker: str) -> None:
        """A worker takes a message of a task off the queue and claims its row.

        The task is drawn, not the message's place in the queue: a pass publishes rows due at
        the same time in no fixed order, and the example must replay the same.
        """
        # The oldest message of each task: the one a worker takes first (the right end).
        by_task = {self.models[task_id].label: raw for raw, task_id in self.messages()}
        label = data.draw(st.sampled_from(sorted(by_task)), label="message of")
        self.redis.lrem(QUEUE, 1, by_task[label])
        self.claim(next(t for t in self.models.values() if t.label == label), worker)

    @precondition(lambda self: any(task.delivered for task in self.models.values()))
    @rule(data=st.data(), worker=st.sampled_from(WORKERS))
    def redeliver(self, data: st.DataObject, worker: str) -> None:
        """A duplicate delivery of a task delivered before (``acks_late``, a second copy)."""
        self.claim(self.draw_task(data, [t for t in self.models.values() if t.delivered]),
                   worker)

    def claim(self, task: ModelTask, worker: str) -> None:
        """Claim ``task`` as ``ReliableTask`` does; check the verdict against the contract."""
        task.delivered = True
        before = self.row(task)
        token = self.token()
        name = TASK_NAMES[task.retry_on_lost]
        claimed = ledger.claim(task.id, task_name=name, worker=worker,
                               rerun_after_lost=task.retry_on_lost, started_at=token,
                               max_attempts=task_budget(name))
        now = database_now()
        row = self.row(task)
        wins, ends_as = self.expected_claim(task, before, now)
        assert claimed.won == wins, (
            f"{task}: a claim on {before.state} (attempts {before.attempts}) "
            f"{'won' if claimed.won else 'lost: ' + claimed.reason}; expected the opposite")
        if not claimed.won:
            assert row.state == ends_as, f"{task}: a lost claim left {row.state}, not {ends_as}"
            assert row.attempts == before.attempts
            return
        assert (row.state, row.attempts, row.worker, row.started_at) == (
            TaskState.STARTED, before.attempts + 1, worker, token), f"{task}: won claim {row}"
        assert row.lease_expires_at is not None and row.lease_expires_at > now
        run = Run(label=f"run{len(self.runs)}", task=task, worker=worker, started_at=token,
                  attempt=row.attempts, generation=task.generation, claim=claimed)
        self.check_body_may_run(task, run, before)
        task.runs.append(run)
        self.runs.append(run)

    def expected_claim(self, task: ModelTask, row: Row, now: datetime) -> tuple[bool, str]:
        """Whether a claim on ``row`` must win, and the state a losing claim leaves."""
        if row.state in CLAIMABLE_STATES:
            if row.expires_at is not None and row.expires_at < now:
                return False, TaskState.EXPIRED
            return True, TaskState.STARTED
        if row.state == TaskState.STARTED and task.retry_on_lost and (
                row.lease_expires_at is not None and row.lease_expires_at < now):
            if now - self.steady_since < timedelta(seconds=LEASE):
                return False, TaskState.STARTED  # the lease ran out in an outage: held
            if row.attempts >= self.limit_of(task, row):
                return False, TaskState.LOST
            return True, TaskState.STARTED
        return False, row.state

    def check_body_may_run(self, task: ModelTask, run: Run, before: Row) -> None:
        """A won claim runs the body again only after a retry or a worker lost for good."""
        for earlier in task.runs:
            assert earlier.attempt < run.attempt, f"{task}: two claims won attempt {run.attempt}"
            if earlier.generation != task.generation:
                continue  # a manual retry re-runs the task on purpose
            if earlier.outcome == "retry" and earlier.recorded:
                continue  # it failed and the ledger recorded the retry
            if earlier.lease_expired and task.retry_on_lost:
                continue  # its worker died, and the task may re-run after that
            raise AssertionError(
                f"{task}: the body runs twice: {run} won while {earlier} "
                f"(outcome {earlier.outcome}, recorded {earlier.recorded}, lease expired "
                f"{earlier.lease_expired}) had not given it up; the row was {before}")

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def succeed(self, data: st.DataObject) -> None:
        """The body returned: ``record_success`` from the claim."""
        run = self.draw_run(data, self.running())
        self.report(run, "success", lambda: ledger.record_success(run.task.id, run.claim),
                    TaskState.SUCCESS)

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        """The body raised an error that is not retried: ``record_failure``."""
        run = self.draw_run(data, self.running())
        self.report(run, "failure", lambda: ledger.record_failure(
            run.task.id, run.claim, ValueError("model failure")), TaskState.FAILURE)

    @precondition(lambda self: self.running())
    @rule(data=st.data(), held=st.booleans(), publish=st.sampled_from((SENT, SENT, REFUSED)))
    def raise_retryable(self, data: st.DataObject, held: bool, publish: str) -> None:
        """The body raised a ``retry_for`` error: RETRY while attempts are left, else FAILURE.

        As ``ReliableTask`` does: the retry is recorded first, then published at once unless
        its delay is held in the database.
        """
        run = self.draw_run(data, self.running())
        claimed = ledger.load_attempt(run.task.id, run.claim)
        limit = claimed.max_attempts or task_budget(TASK_NAMES[run.task.retry_on_lost])
        error = ConnectionError("model retryable failure")
        if (claimed.attempt or 0) >= limit:
            self.report(run, "failure", lambda: ledger.record_failure(
                run.task.id, run.claim, error), TaskState.FAILURE)
            return
        now = timezone.now()
        due = now + timedelta(seconds=HELD_DELAY if held else GRACE)

        def write() -> bool:
            recorded = ledger.record_retry(run.task.id, run.claim, error, due, eta=due)
            if recorded and not held:
                with self.publishing(publish):
                    outbox.publish_records([TaskRecord.objects.get(pk=run.task.id)])
            return recorded

        self.report(run, "retry", write, TaskState.RETRY,
                    also=(TaskState.QUEUED,) if publish == SENT and not held else ())

    def report(self, run: Run, outcome: str, write: Callable[[], bool], state: str,
               also: tuple[str, ...] = ()) -> None:
        """Write a run's outcome: recorded if the run holds the row; if it moves the row, the
        run is the row's latest attempt and no manual retry came after it."""
        task = run.task
        before = self.row(task)
        run.outcome = outcome
        run.recorded = bool(write())
        row = self.row(task)
        if outcome == "success" and before.state == TaskState.LOST and (
                before.worker, before.started_at) == (run.worker, run.started_at):
            # The one documented move of a finished row besides a manual retry (README, "Task
            # states"): the attempt taken for lost was only stalled, and it finished.
            task.may_leave_finished = True
        if run.holds(before):
            assert run.recorded, f"{task}: {run} held the row but its {outcome} was refused"
            assert row.state in (state, *also), f"{task}: {outcome} recorded as {row.state}"
        moved = (row.state, row.attempts) != (before.state, before.attempts)
        if moved:
            assert run.generation == task.generation, (
                f"{task}: the {outcome} of {run}, from before a manual retry, moved the row "
                f"from {before.state} to {row.state}")
            assert run.attempt == before.attempts, (
                f"{task}: the {outcome} of {run} moved the row of attempt {before.attempts}")

    @precondition(lambda self: any(not run.stalled for run in self.running()))
    @rule(data=st.data())
    def stop_heartbeating(self, data: st.DataObject) -> None:
        """A run's worker stops renewing its lease: it died, or stalled (it may report late)."""
        run = self.draw_run(data, [run for run in self.running() if not run.stalled])
        run.stalled = True
        changed = TaskRecord.objects.filter(
            pk=run.task.id, state=TaskState.STARTED, worker=run.worker,
            started_at=run.started_at,
        ).update(lease_expires_at=database_now() - timedelta(seconds=1))
        if changed:
            run.lease_expired = True

    @precondition(lambda self: any(not run.stalled for run in self.running()))
    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        """A live worker renews the leases of the tasks it really runs."""
        alive = [run for run in self.running() if run.worker == worker and not run.stalled]
        beat(worker, [run.task.id for run in alive])
        for run in alive:
            row = self.row(run.task)
            if row.state == TaskState.STARTED and row.worker == worker:
                assert row.lease_expires_at is not None
                assert row.lease_expires_at > database_now(), f"{run.task}: lease not renewed"

    @precondition(lambda self: self.running())
    @rule()
    def database_outage(self) -> None:
        """The database was away longer than a lease: every lease ran out by its clock, but
        the workers only waited; the pulse says since when the database is back."""
        now = database_now()
        TaskRecord.objects.filter(state=TaskState.STARTED).update(
            lease_expires_at=now - timedelta(seconds=1))
        self.steady_since = now
        self.set_pulse(now)  # as the first touch after the gap writes it

    # --- the sweeper and the broker -----------------------------------------------------------

    @precondition(lambda self: any(row.state not in FINISHED_STATES
                                   for row in self.seen.values()))
    @rule(jump=st.sampled_from(JUMPS), refused=st.booleans())
    def sweeper_pass(self, jump: float, refused: bool) -> None:
        """One sweeper pass, ``jump`` seconds after the database's now, without heartbeats."""
        now = database_now() + timedelta(seconds=jump)
        self.set_pulse(now)
        judges_leases = now - self.steady_since >= timedelta(seconds=LEASE)
        before = self.rows()
        with self.publishing(REFUSED if refused else SENT):
            report = sweep(now=now)
        after = self.rows()
        assert report.leases_held_after_outage is not judges_leases
        for task_id, was in before.items():
            task, row = self.models[task_id], after[task_id]
            expired = (was.state == TaskState.STARTED and was.lease_expires_at is not None
                       and was.lease_expires_at < now)
            if not expired:
                continue
            holder = next((run for run in task.runs if run.holds(was)), None)
            assert holder is not None, f"{task}: STARTED by no known claim: {was}"
            if not judges_leases:
                assert row.state == TaskState.STARTED, f"{task}: lease judged after an outage"
                continue
            holder.lease_expired = True
            rerun = task.retry_on_lost and was.attempts < self.limit_of(task, was)
            expected = ((TaskState.RETRY, TaskState.QUEUED) if rerun else (TaskState.LOST,))
            assert row.state in expected, f"{task}: expired lease of {was} became {row.state}"
        if not refused:
            for task_id, row in after.items():
                assert not (row.state in (TaskState.PENDING, TaskState.RETRY)
                            and row.next_attempt_at is not None and row.next_attempt_at <= now), (
                    f"{self.models[task_id]}: due at {row.next_attempt_at}, not published by "
                    f"a pass at {now}")

    @precondition(lambda self: self.restarts < MAX_RESTARTS and self.redis.llen(QUEUE) > 0)
    @rule()
    def broker_loses_its_data(self) -> None:
        """The broker's Redis restarts empty (no persistence): a new run id, no messages."""
        self.restarts += 1
        self.redis.close()
        self.server.restart()
        self.redis = self.server.client()

    # --- manual actions -----------------------------------------------------------------------

    @precondition(lambda self: any(row.state in FINISHED_STATES for row in self.seen.values()))
    @rule(data=st.data(), force=st.booleans(), through_package=st.booleans(),
          publish=PUBLISH)
    def manual_retry(self, data: st.DataObject, force: bool, through_package: bool,
                     publish: str) -> None:
        """A human retries a task (once one has finished): from a finished state only, with a
        fresh budget."""
        task = self.draw_task(data)
        before = self.row(task)
        allowed = before.state in MANUALLY_RETRYABLE_STATES or (
            force and before.state == TaskState.SUCCESS)
        retry = reliable_tasks.retry if through_package else ledger.retry
        try:
            with self.publishing(publish):
                retry(task.id, force=force)
        except RetryNotAllowed:
            assert not allowed, f"{task}: a manual retry from {before.state} was refused"
            return
        assert allowed, f"{task}: a manual retry from {before.state} was allowed"
        task.generation += 1
        task.may_leave_finished = True
        task.limit = before.attempts + task.budget
        row = self.row(task)
        expected = TaskState.QUEUED if publish == SENT else TaskState.PENDING
        assert row.state == expected, f"{task}: manually retried ({publish}): {row.state}"
        assert row.max_attempts == task.limit, (
            f"{task}: a manual retry at attempt {before.attempts} gives a budget of "
            f"{(row.max_attempts or 0) - before.attempts} attempts, not the task's "
            f"{task.budget} (max_attempts {before.max_attempts} -> {row.max_attempts})")

    @precondition(lambda self: any(row.state == TaskState.STARTED for row in self.seen.values()))
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        """A running task is revoked (its worker is not terminated: the run may still report).

        Revoking a row that has not started is ``test_ledger``'s; here the interest is the run
        that goes on after its row finished.
        """
        task = self.draw_task(data, [task for task in self.models.values()
                                     if self.seen[task.id].state == TaskState.STARTED])
        before = self.row(task)
        revoked = ledger.record_revoked(task.id, expired=False)
        assert revoked is (before.state not in FINISHED_STATES)
        assert self.row(task).state == (TaskState.REVOKED if revoked else before.state)

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def the_ledger_keeps_its_promises(self) -> None:
        """The invariants of the module docstring, after every step."""
        rows = self.rows()
        queued_ids = {task_id for _, task_id in self.messages()}
        run_ids = set(BrokerEpoch.objects.values_list("run_id", flat=True))
        broker_changed = bool(run_ids) and self.redis.info("server")["run_id"] not in run_ids
        for task_id, row in rows.items():
            task = self.models[task_id]
            was = self.seen.get(task_id)
            if was is not None and was.state in FINISHED_STATES and not task.may_leave_finished:
                assert (row.state, row.attempts) == (was.state, was.attempts), (
                    f"{task}: finished as {was.state}, it moved to {row.state} without a "
                    f"manual retry")
            task.may_leave_finished = False
            assert row.attempts == len(task.runs), (
                f"{task}: {row.attempts} attempts recorded, {len(task.runs)} claims won")
            assert row.attempts <= task.limit, (
                f"{task}: {row.attempts} attempts, more than its budget allows ({task.limit})")
            if row.state in CLAIMABLE_STATES:
                assert row.attempts < task.limit, (
                    f"{task}: {row.state} with its {row.attempts} attempts used up: its next "
                    f"claim would exceed the budget ({task.limit})")
            if row.state in (TaskState.PENDING, TaskState.RETRY):
                assert row.next_attempt_at is not None, f"{task}: {row.state}, never due"
            elif row.state == TaskState.STARTED:
                assert row.lease_expires_at is not None, f"{task}: STARTED without a lease"
                assert any(run.holds(row) and run.attempt == row.attempts
                           for run in task.runs), f"{task}: STARTED by no known claim: {row}"
            elif row.state == TaskState.QUEUED:
                assert task_id in queued_ids or broker_changed, (
                    f"{task}: QUEUED, with no message in the broker and no broker change "
                    f"for the sweeper to notice")
        self.seen = rows


def test_the_ledger_state_machine(redis_server: RedisServer) -> None:
    """Random interleavings of dispatches, publishes, claims, outcomes, sweeps, broker loss and
    manual retries keep every invariant of the ledger (see the module docstring)."""
    # A short history: the bounded history drops entries within an example (a manual retry
    # reads the budget it gives from there).
    with override_settings(RELIABLE_TASKS_LEASE_TIMEOUT=LEASE,
                           RELIABLE_TASKS_PUBLISH_GRACE=GRACE,
                           RELIABLE_TASKS_PUBLISH_TIMEOUT=1.0,
                           RELIABLE_TASKS_HISTORY_LIMIT=2):
        run_state_machine_as_test(
            LedgerMachine.on(redis_server),
            settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS,
                              deadline=None, database=None,
                              phases=list(Phase) if SHRINK else [Phase.explicit, Phase.generate],
                              suppress_health_check=[HealthCheck.too_slow]),
        )
