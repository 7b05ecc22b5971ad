"""Task states of the ledger (the contract's state table)."""

from django.db import models


class TaskState(models.TextChoices):
    """State of a ``TaskRecord``; values match Celery's state names where the meaning matches."""

    PENDING = "PENDING", "Pending"
    QUEUED = "QUEUED", "Queued"
    STARTED = "STARTED", "Started"
    RETRY = "RETRY", "Retry"
    SUCCESS = "SUCCESS", "Success"
    FAILURE = "FAILURE", "Failure"
    LOST = "LOST", "Lost"
    REVOKED = "REVOKED", "Revoked"
    EXPIRED = "EXPIRED", "Expired"
    #: The attempt handed its task id to a replacement (``Task.replace``); the replacement's
    #: dispatch takes the row over.
    REPLACED = "REPLACED", "Replaced"
    #: Deferred by a concurrency limit (no message in the broker: published when a slot frees,
    #: in dispatch order) or a rate limit (published when its token is due).
    WAITING = "WAITING", "Waiting"


#: States in which the task will not run again unless a human retries it.
FINISHED_STATES = frozenset(
    {TaskState.SUCCESS, TaskState.FAILURE, TaskState.LOST, TaskState.REVOKED, TaskState.EXPIRED}
)

#: States a manual ``retry()`` may start from without ``force``.
MANUALLY_RETRYABLE_STATES = frozenset(
    {TaskState.FAILURE, TaskState.LOST, TaskState.REVOKED, TaskState.EXPIRED}
)

#: States from which a worker may claim a delivery and run the body.
CLAIMABLE_STATES = frozenset({TaskState.PENDING, TaskState.QUEUED, TaskState.RETRY,
                              TaskState.WAITING})
