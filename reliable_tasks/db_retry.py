"""Ledger statements that survive a broken database connection: reconnect and try again.

The ledger is the truth, so its writes fail closed: a statement that meets a dropped connection
(a database restart, a failover, a backend terminated by an administrator or an idle timeout) is
run again on a fresh connection, either until it succeeds (``until_done``: an outcome that must
never be dropped) or for a bounded time, after which the error is raised to the caller
(``within``: a claim that would rather give its delivery back to the broker).

Only errors that a new connection can cure are retried (``OperationalError`` and
``InterfaceError``); an ``IntegrityError`` or a programming error is raised at once. Inside a
transaction nothing is retried: the transaction is gone with its connection, so the error goes
to whoever opened it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from django.db import DatabaseError, InterfaceError, OperationalError, connections

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors a fresh connection may cure.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)

#: First pause between two tries, and the longest (the pause doubles, with jitter).
FIRST_PAUSE = 0.05
LONGEST_PAUSE = 1.0
#: While retrying without end, a warning is logged at most this often.
_WARN_EVERY = 10.0


def in_transaction() -> bool:
    """Whether any connection of this thread is inside an atomic block."""
    return any(connection.in_atomic_block
               for connection in connections.all(initialized_only=True))


def drop_connections() -> None:
    """Close this thread's database connections, so that the next statement reconnects.

    Closing a connection the server already dropped may itself fail; Django forgets the
    connection either way, which is all this needs, so such an error is not raised.
    """
    for connection in connections.all(initialized_only=True):
        if connection.in_atomic_block:
            continue
        try:
            connection.close()
        except DatabaseError:  # the connection is forgotten anyway (see the docstring)
            logger.debug("closing a broken %s connection failed", connection.alias,
                         exc_info=True)


def _pause(tries: int) -> float:
    longest = min(LONGEST_PAUSE, FIRST_PAUSE * 2 ** tries)
    return longest / 2 + random.uniform(0, longest / 2)  # noqa: S311 - not for security


def within(statement: Callable[[], T], seconds: float, *, what: str) -> T:
    """Run ``statement``, reconnecting and retrying transient errors for up to ``seconds``.

    Raises the last transient error once the time is up, and any other error at once.
    """
    deadline = time.monotonic() + seconds
    tries = 0
    while True:
        try:
            return statement()
        except TRANSIENT_ERRORS as exc:
            pause = _pause(tries)
            if in_transaction() or time.monotonic() + pause > deadline:
                raise
            tries += 1
            logger.info("%s: database unavailable (%r); retry %d in %.2fs", what, exc, tries,
                        pause)
            drop_connections()
            time.sleep(pause)


def until_done(statement: Callable[[], T], *, what: str,
               stopping: Callable[[], bool] | None = None) -> T:
    """Run ``statement``, reconnecting and retrying transient errors until it succeeds.

    For writes that must never be dropped. ``stopping`` (optional) ends the retries early by
    returning True, and the last error is raised then. Other errors are raised at once.
    """
    tries = 0
    warned_at = float("-inf")
    while True:
        try:
            return statement()
        except TRANSIENT_ERRORS as exc:
            if in_transaction() or (stopping is not None and stopping()):
                raise
            if time.monotonic() - warned_at >= _WARN_EVERY:
                logger.warning("%s: database unavailable (%r); retrying until it is stored",
                               what, exc)
                warned_at = time.monotonic()
            drop_connections()
            time.sleep(_pause(tries))
            tries += 1
