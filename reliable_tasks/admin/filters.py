"""Changelist filters whose choices cost a bounded query on a ledger of any size.

Django's ``AllValuesFieldListFilter`` runs ``SELECT DISTINCT`` over the whole table on every page
view. The value filters here (task name, queue, concurrency and rate key) take their choices
from the most recent rows only (one index scan on ``created_at`` per page view, shared by all of
them), and always keep the value currently filtered on. The choices of the others are fixed.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from reliable_tasks.models import WaitReason
from reliable_tasks.states import TaskState

#: Where a request keeps the newest rows' values read for the value filters (one query).
_SAMPLE_ATTRIBUTE = "_reliable_tasks_recent_values"


class RecentValuesListFilter(admin.SimpleListFilter):
    """Filter on a text field, offering the values seen in the latest ``sample_size`` rows."""

    #: The model field filtered on, also the name of the query string parameter.
    parameter_name = ""
    #: How many of the newest rows are read to find the choices.
    sample_size = 5_000
    #: The most choices shown (sorted); the rest stay reachable through the URL or search.
    max_choices = 100

    def lookups(self, request: HttpRequest,
                model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        """The distinct non-empty values of the newest rows, plus the one selected."""
        newest = _newest_values(request, model_admin, self.sample_size)
        values = {row[self.parameter_name] for row in newest if row[self.parameter_name]}
        selected = self.value()
        if selected:
            values.add(selected)
        return [(value, value) for value in sorted(values)[: self.max_choices]]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet | None:
        """Rows whose field equals the selected value (all rows when none is selected)."""
        value = self.value()
        if not value:
            return None
        return queryset.filter(**{self.parameter_name: value})


class TaskNameListFilter(RecentValuesListFilter):
    """Filter on the registered task name."""

    title = _("task")
    parameter_name = "task_name"


class QueueListFilter(RecentValuesListFilter):
    """Filter on the queue the task was published to."""

    title = _("queue")
    parameter_name = "queue"


class ConcurrencyKeyListFilter(RecentValuesListFilter):
    """Filter on the concurrency key (the keys of the newest rows are offered)."""

    title = _("concurrency key")
    parameter_name = "concurrency_key"


class RateKeyListFilter(RecentValuesListFilter):
    """Filter on the rate key (the keys of the newest rows are offered)."""

    title = _("rate key")
    parameter_name = "rate_key"


def _newest_values(request: HttpRequest, model_admin: admin.ModelAdmin,
                   sample_size: int) -> list[dict[str, Any]]:
    """The value filters' fields of the newest ``sample_size`` rows, read once per request."""
    fields = sorted({spec.parameter_name for spec in model_admin.get_list_filter(request)
                     if isinstance(spec, type) and issubclass(spec, RecentValuesListFilter)})
    cache: dict[tuple[Any, ...], list[dict[str, Any]]] = request.__dict__.setdefault(
        _SAMPLE_ATTRIBUTE, {})
    key = (model_admin.model._meta.label, tuple(fields), sample_size)
    if key not in cache:
        cache[key] = list(model_admin.get_queryset(request).order_by("-created_at")
                          .values(*fields)[:sample_size])
    return cache[key]


class FixedChoicesListFilter(admin.SimpleListFilter):
    """A filter of a few fixed choices, each a condition (``conditions``); any other value
    is refused as an incorrect lookup (the admin then shows the whole list, flagged ``?e=1``)."""

    def conditions(self) -> dict[str, tuple[str, Q]]:
        """Per value: its label and the rows it selects."""
        raise NotImplementedError

    def lookups(self, request: HttpRequest,
                model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        """The fixed choices."""
        return [(value, label) for value, (label, _condition) in self.conditions().items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet | None:
        """The rows of the selected choice (all rows when none is selected)."""
        value = self.value()
        if value is None:
            return None
        conditions = self.conditions()
        if value not in conditions:
            raise IncorrectLookupParameters(
                f"{self.parameter_name} must be one of {', '.join(conditions)}, not {value!r}")
        return queryset.filter(conditions[value][1])


#: States in which a row deferred by a limit still waits: WAITING, or woken and not started.
WAITING_STATES = (TaskState.WAITING, TaskState.PENDING, TaskState.QUEUED)


class WaitingForListFilter(FixedChoicesListFilter):
    """Filter on what a task deferred by a limit waits for: a concurrency slot or its rate
    start (WAITING, or woken and not started yet), or nothing."""

    title = _("waiting for")
    parameter_name = "waiting_for"

    def conditions(self) -> dict[str, tuple[str, Q]]:
        """Concurrency, rate, or none."""
        def waits_for(*reasons: str) -> Q:
            return Q(state__in=WAITING_STATES, waiting_for__in=reasons)

        return {
            WaitReason.CONCURRENCY.value: (gettext("a concurrency slot"),
                                           waits_for(WaitReason.CONCURRENCY)),
            WaitReason.RATE.value: (gettext("its rate limit"), waits_for(WaitReason.RATE)),
            "none": (gettext("nothing"), ~waits_for(WaitReason.CONCURRENCY, WaitReason.RATE)),
        }


class LimitedByListFilter(FixedChoicesListFilter):
    """Filter on whether a task has a concurrency key, a rate key, or neither."""

    title = _("limited by")
    parameter_name = "limited_by"

    def conditions(self) -> dict[str, tuple[str, Q]]:
        """Concurrency key, rate key, or none."""
        return {
            "concurrency": (gettext("a concurrency key"), Q(concurrency_key__isnull=False)),
            "rate": (gettext("a rate key"), Q(rate_key__isnull=False)),
            "none": (gettext("no limit"), Q(concurrency_key__isnull=True, rate_key__isnull=True)),
        }
