"""Worker heartbeats: keep the worker's row fresh and extend the leases of its running tasks.

``beat()`` is the service (two UPDATEs); ``HeartbeatThread`` runs it every
``HEARTBEAT_INTERVAL`` in the worker's main process, which is the process that knows which
tasks are really running: a task whose pool process died is no longer among them, so its lease
runs out and the sweeper recovers it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from datetime import timedelta

from django.db import DatabaseError, close_old_connections, connections
from django.utils import timezone

from reliable_tasks.conf import app_settings
from reliable_tasks.models import TaskRecord, WorkerHeartbeat
from reliable_tasks.states import TaskState

logger = logging.getLogger(__name__)


def beat(hostname: str, running_ids: Iterable[str], pid: int | None = None) -> int:
    """Record that ``hostname`` is alive and extend its running tasks' leases.

    Returns how many leases were extended. Only the rows of tasks this worker still runs are
    extended: a task whose pool process was killed keeps its old lease and expires.
    """
    now = timezone.now()
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


class HeartbeatThread(threading.Thread):
    """Calls ``beat()`` every ``HEARTBEAT_INTERVAL`` until stopped; survives database errors."""

    def __init__(self, hostname: str, running_ids: Callable[[], Iterable[str]]) -> None:
        super().__init__(name=f"reliable-tasks-heartbeat-{hostname}", daemon=True)
        self.hostname = hostname
        self.running_ids = running_ids
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._beat_once()
                self._stopping.wait(app_settings.HEARTBEAT_INTERVAL)
            mark_stopped(self.hostname)
        except DatabaseError:
            logger.warning("worker heartbeat: recording the stop failed", exc_info=True)
        finally:
            connections.close_all()

    def _beat_once(self) -> None:
        try:
            close_old_connections()
            beat(self.hostname, [str(task_id) for task_id in self.running_ids()])
        except DatabaseError:
            logger.warning("worker heartbeat failed; retrying in %ss",
                           app_settings.HEARTBEAT_INTERVAL, exc_info=True)
            connections.close_all()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating, record the clean stop and wait for the thread to end."""
        self._stopping.set()
        self.join(timeout)
