"""The in-process broker: what the outbox would send to Redis stays in this process.

While a scope is active (``run_at_commit``, ``drain``, ``capture_dispatches``, the plugin's
fixtures), the outbox's two steps that talk to the broker are this module's:
``outbox.publish_committed`` (what a commit hands over) and ``outbox.send_records`` (every
publish: after a commit, a task's retry, the sweeper's). The first scope puts them in place and
the last one to end puts the originals back and forgets every message, so nothing carries over to
the next test. The ledger moves as in production: a published row is marked QUEUED by the
outbox's own code, then claimed, run and finished by the task's own code (``worker.deliver``).

A scope either runs what a commit publishes (``run``) or holds it (``hold``: the rows stay
PENDING and nothing is sent, until ``drain()`` runs them); the innermost active scope decides.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections
from django.utils import timezone

from reliable_tasks.testing.worker import Run, deliver

if TYPE_CHECKING:
    from reliable_tasks.models import TaskRecord
    from reliable_tasks.publisher import Publishable

logger = logging.getLogger(__name__)

#: Deliveries one commit (or one ``drain()``) runs at most, unless told otherwise.
MAX_RUNS = 1000

Mode = Literal["run", "hold"]


class TooManyRuns(RuntimeError):
    """More deliveries were due than the bound allows: most likely tasks that keep dispatching
    each other (or themselves) without end."""


class Scope:
    """One active use of the in-process broker and the runs made while it was active."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.runs: list[Run] = []


class _Broker:
    """The process's stand-in for the broker: active scopes, sent messages, saved originals."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.sent: list[Publishable] = []
        self.originals: dict[str, Callable[..., Any]] = {}
        self.local = threading.local()

    def running(self) -> bool:
        """Whether this thread is running deliveries (new messages then wait their turn)."""
        return bool(getattr(self.local, "running", False))


_broker = _Broker()


def _send(app: Any, records: Sequence[Publishable]) -> None:
    """``send_records`` of the in-process broker: keep the messages (it cannot fail)."""
    _broker.sent.extend(records)


def _publish_committed(records: list[TaskRecord]) -> None:
    """``publish_committed`` of the in-process broker: publish now and run what is due, or
    hold everything (the innermost scope decides)."""
    from reliable_tasks import outbox

    if _broker.scopes[-1].mode == "hold":
        return
    outbox.publish_records(records)
    _pump()


def _due(eta: datetime | None, now: datetime) -> bool:
    return eta is None or eta <= now


def _pump(max_runs: int = MAX_RUNS) -> None:
    """Run the sent messages that are due, oldest first, including those their runs send.

    Messages with a later ETA (a countdown, a retry's backoff) stay sent; a later commit or
    ``drain()`` runs them. Nested calls (a task's own dispatch, committed while it runs) return
    at once: the outer loop runs what they sent after the current delivery.
    """
    from reliable_tasks.models import TaskRecord

    if _broker.running():
        return
    count = 0
    with running_deliveries():
        while True:
            now = timezone.now()
            message = next((item for item in _broker.sent if _due(item.eta, now)), None)
            if message is None:
                return
            _broker.sent.remove(message)
            record = TaskRecord.objects.filter(pk=message.id).first()
            if record is None:  # deleted since it was published (pruned, a test's cleanup)
                continue
            if count >= max_runs:
                raise TooManyRuns(f"more than {max_runs} deliveries were due at one commit")
            count += 1
            record_run(deliver(record))


def active() -> bool:
    """Whether any scope uses the in-process broker now."""
    return bool(_broker.scopes)


def record_run(run: Run) -> None:
    """Add ``run`` to every active scope that runs tasks."""
    for scope in _broker.scopes:
        if scope.mode == "run":
            scope.runs.append(run)


def forget_sent(task_id: Any) -> None:
    """Drop the sent messages of ``task_id`` (its row ran some other way: ``drain()``)."""
    _broker.sent[:] = [item for item in _broker.sent if str(item.id) != str(task_id)]


@contextmanager
def running_deliveries() -> Iterator[None]:
    """Mark this thread as running deliveries for the block (see ``_pump``)."""
    before = _broker.running()
    _broker.local.running = True
    try:
        yield
    finally:
        _broker.local.running = before


def _stand_ins() -> dict[str, Callable[..., Any]]:
    """The outbox's functions that talk to the broker, by name, and what stands in for them."""
    return {"send_records": _send, "publish_committed": _publish_committed}


def _activate(scope: Scope) -> None:
    from reliable_tasks import outbox

    if not _broker.scopes:
        stand_ins = _stand_ins()
        _broker.originals = {name: vars(outbox)[name] for name in stand_ins}
        vars(outbox).update(stand_ins)
    _broker.scopes.append(scope)


def _deactivate(scope: Scope) -> None:
    from reliable_tasks import outbox

    _broker.scopes.remove(scope)
    if not _broker.scopes:
        vars(outbox).update(_broker.originals)
        _broker.originals = {}
        _broker.sent.clear()


@contextmanager
def in_process(mode: Mode) -> Iterator[Scope]:
    """Use the in-process broker for the block; raise ``ImproperlyConfigured`` under Celery's
    ``task_always_eager`` (which runs tasks at the call, around the outbox)."""
    from reliable_tasks.celery_app import get_celery_app

    if get_celery_app().conf.task_always_eager:
        raise ImproperlyConfigured(
            "reliable_tasks.testing runs tasks at commit in place of the broker and the "
            "worker; Celery's task_always_eager runs them at the call instead, around the "
            "outbox: turn task_always_eager off in the tests that use these helpers")
    scope = Scope(mode)
    _activate(scope)
    try:
        yield scope
    finally:
        _deactivate(scope)


def in_test_transaction(using: str = DEFAULT_DB_ALIAS) -> bool:
    """Whether the connection is inside a TestCase's transaction and no other (one that never
    commits: its on_commit callbacks never run by themselves)."""
    connection = connections[using]
    # Django marks the atomic blocks a TestCase opens (it checks durable blocks with it).
    return connection.in_atomic_block and all(
        getattr(block, "_from_testcase", False) for block in connection.atomic_blocks)


def commit_hooks_since(start: int, using: str = DEFAULT_DB_ALIAS) -> list[Callable[[], Any]]:
    """The on_commit callbacks registered on the connection since it had ``start`` of them."""
    return [entry[1] for entry in connections[using].run_on_commit[start:]]


def run_commit_hooks_since(start: int, using: str = DEFAULT_DB_ALIAS) -> None:
    """Run the on_commit callbacks registered since there were ``start``, as a commit would,
    and those they register in turn (``TestCase.captureOnCommitCallbacks(execute=True)``): a
    robust callback's error is logged, any other's raised."""
    connection = connections[using]
    while len(connection.run_on_commit) > start:
        hooks: list[Any] = connection.run_on_commit[start:]
        start = len(connection.run_on_commit)
        for _, callback, robust in hooks:  # (savepoint ids, callback, robust)
            if not robust:
                callback()
                continue
            try:
                callback()
            except Exception:
                logger.exception("Error calling %s in on_commit()", callback)
