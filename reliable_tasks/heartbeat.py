"""Worker heartbeats: keep the worker's row fresh and extend the leases of its running tasks.

``beat()`` is the service (two UPDATEs); ``HeartbeatThread`` runs it every
``HEARTBEAT_INTERVAL`` in the worker's main process, which is the process that knows which
tasks are really running: a task whose pool process died is no longer among them, so its lease
runs out and the sweeper recovers it.
"""

from __future__ import annotations

import _thread
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from django.db import DatabaseError, close_old_connections, connections
from django.utils import timezone

from reliable_tasks import db_retry
from reliable_tasks.clock import database_now
from reliable_tasks.conf import app_settings
from reliable_tasks.models import TaskRecord, WorkerHeartbeat
from reliable_tasks.pulse import touch
from reliable_tasks.states import TaskState

logger = logging.getLogger(__name__)


def beat(hostname: str, running_ids: Iterable[str], pid: int | None = None) -> int:
    """Record that ``hostname`` is alive and extend its running tasks' leases.

    Returns how many leases were extended. Only the rows of tasks this worker still runs are
    extended: a task whose pool process was killed keeps its old lease and expires. Times are
    the database's (``reliable_tasks.clock``), and the beat touches the ledger's pulse.
    """
    now = database_now()
    touch(now)
    ids = list(running_ids)
    updated = WorkerHeartbeat.objects.filter(hostname=hostname).update(
        last_seen_at=now, running=len(ids), pid=pid or os.getpid(), stopped_at=None)
    if not updated:
        WorkerHeartbeat.objects.update_or_create(
            hostname=hostname,
            defaults={"last_seen_at": now, "running": len(ids), "pid": pid or os.getpid(),
                      "stopped_at": None},
        )
    if not ids:
        return 0
    return TaskRecord.objects.filter(
        id__in=ids, state=TaskState.STARTED, worker=hostname,
    ).update(lease_expires_at=now + timedelta(seconds=app_settings.LEASE_TIMEOUT))


def mark_stopped(hostname: str) -> None:
    """Record a clean shutdown of ``hostname``."""
    WorkerHeartbeat.objects.filter(hostname=hostname).update(
        stopped_at=timezone.now(), running=0)


def _native_thread_primitives() -> tuple[Callable[..., object], Callable[[], Any]]:
    """``_thread.start_new_thread`` and ``allocate_lock`` as the OS provides them.

    Under the gevent and eventlet pools the ``threading`` module is patched into greenlets,
    which a CPU-bound task starves: its lease would run out while it runs. Their originals
    start a real thread, and give a lock whose timed wait is a real one.
    """
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("threading"):
        start, lock = gevent_monkey.get_original("_thread",
                                                 ["start_new_thread", "allocate_lock"])
        return start, lock
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    if eventlet_patcher is not None and eventlet_patcher.is_monkey_patched("thread"):
        original = eventlet_patcher.original("_thread")
        return original.start_new_thread, original.allocate_lock
    return _thread.start_new_thread, _thread.allocate_lock


class HeartbeatThread:
    """Calls ``beat()`` every ``HEARTBEAT_INTERVAL`` until stopped, in an OS thread of its own.

    A real thread under every pool (prefork, threads, solo, gevent, eventlet), so that no task
    can starve it. It also stores the ledger writes the worker's main process could not
    (``defer()``): each is tried again at every beat until the database takes it. Its
    connection is checked before every beat (``close_old_connections``) and dropped after an
    error, so a restarted database is reconnected at the next beat.
    """

    def __init__(self, hostname: str, running_ids: Callable[[], Iterable[str]]) -> None:
        self.hostname = hostname
        self.running_ids = running_ids
        self._start_thread, allocate_lock = _native_thread_primitives()
        self._running = allocate_lock()  # held while the thread should go on
        self._finished = allocate_lock()  # held until the thread has ended
        self._deferred: deque[Callable[[], object]] = deque()

    def start(self) -> None:
        """Start beating in a new OS thread."""
        self._running.acquire()
        self._finished.acquire()
        self._start_thread(self.run, ())

    def defer(self, write: Callable[[], object]) -> None:
        """Store ``write`` at the next beat, and at every beat after until it succeeds."""
        self._deferred.append(write)

    def run(self) -> None:
        """Beat until stopped, then record the clean stop (the thread's body)."""
        try:
            while True:
                self._beat_once()
                if self._running.acquire(timeout=app_settings.HEARTBEAT_INTERVAL):
                    break  # stop() released it
            db_retry.within(lambda: mark_stopped(self.hostname), app_settings.HEARTBEAT_INTERVAL,
                            what="worker heartbeat: recording the stop")
        except db_retry.TRANSIENT_ERRORS:
            # Nothing is lost: the worker's heartbeat goes stale, which says the same later.
            logger.warning("worker heartbeat: recording the stop failed", exc_info=True)
        finally:
            connections.close_all()
            self._finished.release()

    def _beat_once(self) -> None:
        try:
            close_old_connections()
            beat(self.hostname, [str(task_id) for task_id in self.running_ids()])
            self._store_deferred()
        except DatabaseError:
            # Any error is tried again at the next beat (the thread must outlive it); the
            # leases hold that long (HEARTBEAT_INTERVAL is well below LEASE_TIMEOUT) and,
            # after an outage, the pulse holds them longer (tests/test_fail_closed.py;
            # tests/faults/test_database_faults.py: an 8 s outage with 3 s leases).
            logger.warning("worker heartbeat failed; retrying in %ss",
                           app_settings.HEARTBEAT_INTERVAL, exc_info=True)
            db_retry.drop_connections()

    def _store_deferred(self) -> None:
        while self._deferred:
            self._deferred[0]()  # a failure leaves it first in line for the next beat
            self._deferred.popleft()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating, record the clean stop and wait for the thread to end."""
        self._running.release()
        if self._finished.acquire(timeout=timeout):
            self._finished.release()
