"""Running dispatched tasks in the test's own process: at commit (``run_at_commit``), or
everything the ledger holds that is due (``drain``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from django.db import DEFAULT_DB_ALIAS, connections
from django.utils import timezone

from reliable_tasks.testing.broker import (
    MAX_RUNS,
    TooManyRuns,
    active,
    commit_hooks_since,
    forget_sent,
    in_process,
    in_test_transaction,
    record_run,
    run_commit_hooks_since,
    running_deliveries,
)
from reliable_tasks.testing.worker import Run, deliver

if TYPE_CHECKING:
    from reliable_tasks.models import TaskRecord


@contextmanager
def run_at_commit() -> Iterator[list[Run]]:
    """Run the tasks dispatched in the block in this process when their transaction commits.

    Yields the list of runs, which grows as tasks run. In place of the broker and a worker,
    the commit's publish marks the rows QUEUED and each task then runs here through its claim
    and its outcome, as on a worker: the ledger ends SUCCESS, FAILURE, or waiting for its next
    attempt (QUEUED, or RETRY for a backoff beyond ``DELAY_THRESHOLD``), with its attempts
    counted. What a task dispatches runs after it; a retry whose backoff is over runs at once,
    a later one when ``drain(advance=True)`` runs it. A task that fails is recorded, not
    raised: assert on the runs or the ledger. A rolled-back transaction runs nothing.

    Inside a ``TestCase`` (or a non-transactional ``django_db`` test) the test's transaction
    never commits: the end of the block stands in for the commit, running the on_commit
    callbacks the block registered as ``captureOnCommitCallbacks(execute=True)`` does (with
    every task the test's transaction recorded and not published yet). Elsewhere, end the
    block after the commit: a block that ends inside a transaction that dispatched and has not
    committed raises ``RuntimeError`` (its tasks would go to the real broker at the commit).
    """
    start = len(connections[DEFAULT_DB_ALIAS].run_on_commit)
    with in_process("run") as scope:
        yield scope.runs
        if in_test_transaction():
            run_commit_hooks_since(start)
    if not active() and _publishes_waiting(start):
        raise RuntimeError(
            "run_at_commit() ended inside a transaction that dispatched tasks and has not "
            "committed yet: they would be published to the broker at its commit. End the "
            "with block after the commit (put it around the transaction.atomic() block).")


def _publishes_waiting(start: int) -> bool:
    """Whether an outbox publish registered since ``start`` still waits for its commit."""
    from reliable_tasks.outbox import _PublishHook

    return any(isinstance(hook, _PublishHook) and not hook.done
               for hook in commit_hooks_since(start))


def drain(*, advance: bool = False, max_runs: int = MAX_RUNS) -> list[Run]:
    """Run every task of the ledger that is due, in this process, until none is; return the
    runs in the order they ran.

    Due: PENDING and QUEUED rows whose ETA (if any) has come, RETRY rows whose next attempt
    has. What the runs dispatch or retry is run too when due. With ``advance`` every waiting
    row is due, as if the clock had moved on past countdowns, ETAs and retry backoffs (a task
    that keeps failing then runs until its attempts are used up). Each run goes through the
    claim and records its outcome as on a worker. Raises ``TooManyRuns`` when more than
    ``max_runs`` deliveries would run (tasks that keep dispatching each other), ``ValueError``
    for a ``max_runs`` below 1.
    """
    if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
        raise ValueError(f"max_runs must be a positive integer, not {max_runs!r}")
    with in_process("run") as scope, running_deliveries():
        while (record := _next_due(advance)) is not None:
            if len(scope.runs) >= max_runs:
                raise TooManyRuns(f"drain() ran {max_runs} deliveries and more are due: "
                                  f"next {record}")
            forget_sent(record.pk)
            record_run(deliver(record))
    return scope.runs


def _next_due(advance: bool) -> TaskRecord | None:
    """The claimable row of the outbox that is due first (any, with ``advance``)."""
    from django.db.models import Case, F, Q, When
    from django.db.models.functions import Coalesce

    from reliable_tasks.models import TaskRecord
    from reliable_tasks.states import CLAIMABLE_STATES, TaskState

    rows = TaskRecord.objects.filter(adopted=False, state__in=list(CLAIMABLE_STATES))
    if not advance:
        now = timezone.now()
        rows = rows.filter(
            Q(state=TaskState.RETRY, next_attempt_at__lte=now)
            | (~Q(state=TaskState.RETRY) & (Q(eta__isnull=True) | Q(eta__lte=now))))
    due_at = Case(When(state=TaskState.RETRY,
                       then=Coalesce("next_attempt_at", "eta", "created_at")),
                  default=Coalesce("eta", "created_at"))
    return rows.annotate(due_at=due_at).order_by(F("due_at").asc(), "created_at", "pk").first()

