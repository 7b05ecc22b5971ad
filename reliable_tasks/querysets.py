"""Query vocabulary of the ledger: callers name what they want, not how to filter it."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.db import models

from reliable_tasks.states import FINISHED_STATES, TaskState


class TaskRecordQuerySet(models.QuerySet):
    """Domain queries on ``TaskRecord``; each one is served by an index on ``state``."""

    def in_states(self, states: Iterable[str]) -> TaskRecordQuerySet:
        """Rows in any of ``states``."""
        return self.filter(state__in=list(states))

    def due_for_publish(self, now: datetime) -> TaskRecordQuerySet:
        """Rows the sweeper must publish now.

        PENDING rows whose after-commit publish did not confirm within the publish grace (or
        whose held delay is over), and RETRY rows whose next attempt is due: both carry the
        time of their next publish in ``next_attempt_at``.
        """
        return self.filter(
            state__in=[TaskState.PENDING, TaskState.RETRY], next_attempt_at__lte=now)

    def lease_expired(self, now: datetime) -> TaskRecordQuerySet:
        """STARTED rows whose lease ran out: their worker stopped heartbeating."""
        return self.filter(state=TaskState.STARTED, lease_expires_at__lt=now)

    def finished_before(self, cutoff: datetime) -> TaskRecordQuerySet:
        """Finished rows older than ``cutoff`` (retention)."""
        return self.filter(state__in=list(FINISHED_STATES), finished_at__lt=cutoff)

    def transition(self, from_states: Iterable[str], **changes: Any) -> int:
        """Compare-and-set: apply ``changes`` to the rows still in ``from_states``.

        Returns the number of rows changed; a row that moved on meanwhile is left alone.
        """
        return self.filter(state__in=list(from_states)).update(**changes)
