"""Manual retries from the admin: which selected rows may be retried, doing it, and saying so.

The retry itself is ``reliable_tasks.ledger.retry``, the one path for manual retries (it checks
the state under a row lock, resets the row and writes the ``LogEntry`` audit). This module only
walks a selection through it in bounded batches and turns the result into counted messages.
A forced retry of a SUCCESS is never offered here: that stays a deliberate act in the shell.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.contrib import messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from reliable_tasks import ledger
from reliable_tasks.exceptions import RetryNotAllowed
from reliable_tasks.states import MANUALLY_RETRYABLE_STATES

#: The states the admin retries from; the order in which they are listed to the user.
RETRYABLE_STATES: tuple[str, ...] = tuple(sorted(MANUALLY_RETRYABLE_STATES))

#: Rows read per query while retrying a large selection.
BATCH_SIZE = 500


@dataclass
class RetryPlan:
    """What a selection holds: how many rows may be retried, and the others by state."""

    retryable: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass
class RetryOutcome:
    """What a retry of a selection did."""

    retried: int = 0
    #: Rows left alone, by the state that did not allow a retry.
    skipped: Counter[str] = field(default_factory=Counter)


def plan(queryset: QuerySet) -> RetryPlan:
    """Count the selected rows per state (one grouped query) and split them."""
    result = RetryPlan()
    per_state = queryset.order_by().values_list("state").annotate(rows=Count("pk"))
    for state, rows in per_state:
        if state in MANUALLY_RETRYABLE_STATES:
            result.retryable += rows
        else:
            result.skipped[state] += rows
    return result


def _retryable_ids(queryset: QuerySet) -> Iterator[Any]:
    """The ids of the retryable rows of ``queryset``, read in batches in key order."""
    retryable = queryset.filter(state__in=RETRYABLE_STATES).order_by("pk")
    last = None
    while True:
        page = retryable if last is None else retryable.filter(pk__gt=last)
        ids = list(page.values_list("pk", flat=True)[:BATCH_SIZE])
        yield from ids
        if len(ids) < BATCH_SIZE:
            return
        last = ids[-1]


def retry_selection(queryset: QuerySet, user: Any) -> RetryOutcome:
    """Retry every retryable row of ``queryset`` as ``user``; count the rows left alone."""
    outcome = RetryOutcome(skipped=plan(queryset).skipped)
    model = queryset.model
    for pk in _retryable_ids(queryset):
        try:
            ledger.retry(pk, by=user)
        except RetryNotAllowed:
            # It moved on since it was read (another operator, or the sweeper, was first).
            state = model.objects.filter(pk=pk).values_list("state", flat=True).first()
            outcome.skipped[state or _("deleted")] += 1
        except model.DoesNotExist:
            outcome.skipped[_("deleted")] += 1
        else:
            outcome.retried += 1
    return outcome


def describe_states(counts: Counter[str]) -> str:
    """``2 SUCCESS, 1 STARTED``: counts per state, largest first."""
    return ", ".join(f"{rows} {state}" for state, rows in
                     sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def report(request: HttpRequest, outcome: RetryOutcome) -> None:
    """Tell the user how many tasks were retried and which were skipped, with their states."""
    if outcome.retried:
        messages.success(request, ngettext(
            "%(count)d task was reset to PENDING and will run again.",
            "%(count)d tasks were reset to PENDING and will run again.",
            outcome.retried,
        ) % {"count": outcome.retried})
    skipped = sum(outcome.skipped.values())
    if skipped:
        messages.warning(request, skipped_message(skipped, outcome.skipped))


def skipped_message(skipped: int, states: Counter[str]) -> str:
    """The sentence saying that ``skipped`` rows cannot be retried, and their states."""
    return ngettext(
        "%(count)d task was skipped because of its state (%(states)s): "
        "only tasks in %(allowed)s can be retried.",
        "%(count)d tasks were skipped because of their states (%(states)s): "
        "only tasks in %(allowed)s can be retried.",
        skipped,
    ) % {"count": skipped, "allowed": ", ".join(RETRYABLE_STATES),
         "states": describe_states(states)}
