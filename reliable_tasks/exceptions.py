"""The app's exception hierarchy."""


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


class RetryNotAllowed(ReliableTasksError):
    """A manual retry was asked for a task whose state does not allow it."""
