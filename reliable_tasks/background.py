"""Publishing after commit from one background thread per process (``PUBLISH_IN_BACKGROUND``).

A commit hands its records to the process's ``BackgroundPublisher`` and returns at once; a
daemon thread publishes whatever has accumulated in one batch and marks it QUEUED. The queue is
never the only copy of a task: its rows are committed PENDING before they are handed over, so a
record that never leaves it (the process died, the queue overflowed, Redis was down) is published
by the sweeper once ``PUBLISH_GRACE`` has passed. At interpreter exit the queue is flushed for a
bounded time; a forked child starts with an empty queue of its own (the parent publishes what it
had queued).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from django.db import connections

from reliable_tasks.conf import app_settings

logger = logging.getLogger(__name__)

Item = TypeVar("Item")

#: Records one batch publishes at most.
MAX_BATCH = 2000
#: Records that may wait at most; a commit finding the queue full leaves its rows to the sweeper.
MAX_WAITING = 100_000
#: Seconds the thread lets records accumulate before it takes a batch that is not full: a
#: caller dispatching in a loop then shares each batch's publish and QUEUED mark with its next
#: few calls instead of racing the thread for the interpreter one record at a time.
LINGER = 0.005
#: Seconds without work after which the thread closes its database connections.
IDLE_CLOSE_AFTER = 5.0


class BackgroundPublisher(Generic[Item]):
    """A queue of committed records and the daemon thread that publishes them in batches.

    ``publish`` takes one batch and must not raise for a broker failure (it leaves the rows
    PENDING); anything it raises is logged and the thread goes on with the next batch.
    """

    def __init__(self, publish: Callable[[list[Item]], object], *, max_batch: int = MAX_BATCH,
                 max_waiting: int = MAX_WAITING, linger: float = LINGER,
                 idle_close_after: float = IDLE_CLOSE_AFTER) -> None:
        self._publish = publish
        self._max_batch = max_batch
        self._max_waiting = max_waiting
        self._linger = linger
        self._idle_close_after = idle_close_after
        self._condition = threading.Condition()
        self._waiting: list[Item] = []
        self._submitted = 0
        self._handled = 0
        self._dropped = 0
        self._thread: threading.Thread | None = None
        self._close_requested = False

    @property
    def dropped(self) -> int:
        """Records refused because the queue was full (left PENDING for the sweeper)."""
        return self._dropped

    def submit(self, items: Sequence[Item]) -> None:
        """Queue committed records for publishing; never blocks and never raises."""
        if not items:
            return
        with self._condition:
            room = self._max_waiting - len(self._waiting)
            if len(items) > room:
                self._dropped += len(items)
                logger.warning("background publish queue full (%d waiting): %d task(s) left "
                               "PENDING for the sweeper", len(self._waiting), len(items))
                return
            self._waiting.extend(items)
            self._submitted += len(items)
            self._start_thread()
            self._condition.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far was handled; False if ``timeout`` ran out.

        Handled means published and marked QUEUED, or left PENDING with the publish error.
        """
        with self._condition:
            target = self._submitted
            return self._condition.wait_for(lambda: self._handled >= target, timeout)

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="reliable-tasks-publisher",
                                            daemon=True)
            self._thread.start()

    def close_connections(self, timeout: float | None = None) -> bool:
        """Have the thread close its database connections now; False if ``timeout`` ran out.

        It closes them by itself after ``idle_close_after`` seconds without work; this is for
        callers that cannot wait for that (a test database about to be dropped).
        """
        with self._condition:
            if self._thread is None or not self._thread.is_alive():
                return True
            self._close_requested = True
            self._condition.notify_all()
            return self._condition.wait_for(lambda: not self._close_requested, timeout)

    def _next_batch(self) -> list[Item]:
        """Wait for work, let more of it arrive for ``linger`` seconds, take one batch.

        Waiting with nothing to do for ``idle_close_after`` seconds, or asked to, the thread
        closes its database connections.
        """
        while True:
            with self._condition:
                if not self._waiting and not self._close_requested:
                    self._condition.wait(self._idle_close_after)
                ready = len(self._waiting)
            if ready:
                if ready < self._max_batch and self._linger:
                    time.sleep(self._linger)
                with self._condition:
                    batch = self._waiting[:self._max_batch]
                    del self._waiting[:self._max_batch]
                return batch
            _close_database_connections()
            with self._condition:
                self._close_requested = False
                self._condition.notify_all()

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                self._publish(batch)
            except Exception:  # noqa: BLE001 - the rows stay PENDING: the sweeper publishes them
                logger.exception("background publishing of %d task(s) failed", len(batch))
                _close_database_connections()
            finally:
                with self._condition:
                    self._handled += len(batch)
                    self._condition.notify_all()


def _close_database_connections() -> None:
    """Close this thread's database connections; a failure to close is logged, never raised."""
    try:
        connections.close_all()
    except Exception:  # noqa: BLE001 - the thread must outlive a broken connection
        logger.warning("closing the publisher thread's database connections failed",
                       exc_info=True)


_instance: BackgroundPublisher[Any] | None = None
_instance_lock = threading.Lock()


def shared_publisher(publish: Callable[[list[Item]], object]) -> BackgroundPublisher[Item]:
    """The process's publisher, created on first use with ``publish`` as its batch function."""
    global _instance
    if _instance is not None:  # every commit asks: no lock once it exists
        return _instance
    with _instance_lock:
        if _instance is None:
            _instance = BackgroundPublisher(publish)
        return _instance


def flush(timeout: float | None = None) -> bool:
    """Wait for the process's background publishing to catch up; True when it has.

    For tests and shutdown hooks; a process that never published in the background returns
    True at once.
    """
    publisher = _instance
    return True if publisher is None else publisher.flush(timeout)


def close_connections(timeout: float | None = None) -> bool:
    """Have the background thread close its database connections (see ``flush``)."""
    publisher = _instance
    return True if publisher is None else publisher.close_connections(timeout)


def _forget_in_child() -> None:
    """After ``fork``: the child starts with no queue and no thread (the parent keeps both)."""
    global _instance, _instance_lock
    _instance = None
    _instance_lock = threading.Lock()


def _flush_at_exit() -> None:
    if flush(timeout=2 * app_settings.PUBLISH_TIMEOUT + 1):
        close_connections(timeout=1)
    else:
        logger.warning("exiting with background publishes unfinished: the sweeper publishes "
                       "the rows left PENDING")


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(_flush_at_exit)
