"""Changelist filters whose choices cost a bounded query on a ledger of any size.

Django's ``AllValuesFieldListFilter`` runs ``SELECT DISTINCT`` over the whole table on every page
view. The filters here take their choices from the most recent rows only (an index scan on
``created_at``), and always keep the value currently filtered on.
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _


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
        newest = (model_admin.get_queryset(request).order_by("-created_at")
                  .values_list(self.parameter_name, flat=True)[: self.sample_size])
        values = {value for value in newest if value}
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
