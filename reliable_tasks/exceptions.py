"""The app's exception hierarchy."""

from typing import Any


class ReliableTasksError(Exception):
    """Base class of every error this app raises on purpose."""


class DispatchError(ReliableTasksError, ValueError):
    """A task could not be recorded: the input is invalid. Nothing was recorded or published."""


class UnknownTaskError(DispatchError):
    """The task name is not registered with the Celery app."""


class NotReliableTaskError(DispatchError):
    """The task is not a ``ReliableTask``: nothing would claim its row when it runs."""


class PayloadError(DispatchError):
    """The args, kwargs or options cannot be stored as JSON, or are larger than allowed."""


class DuplicateTask(DispatchError):
    """A call's ``unique_key`` is held by an unfinished task and the call asked to raise
    (``on_conflict="raise"``). Nothing was recorded; ``existing`` is the holder's row."""

    def __init__(self, message: str, existing: Any) -> None:
        super().__init__(message)
        #: The unfinished ``TaskRecord`` that holds the key.
        self.existing = existing


class RetryNotAllowed(ReliableTasksError):
    """A manual retry was asked for a task whose state does not allow it."""
