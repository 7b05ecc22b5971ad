"""The ledger's admin: a changelist that stays fast on millions of rows, read-only details."""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _

from reliable_tasks.admin import widgets
from reliable_tasks.admin.filters import (
    ConcurrencyKeyListFilter,
    LimitedByListFilter,
    QueueListFilter,
    RateKeyListFilter,
    TaskNameListFilter,
    WaitingForListFilter,
)
from reliable_tasks.admin.mixins import ReadOnlyAdminMixin, TaskRetryAdminMixin
from reliable_tasks.admin.pagination import EstimatedCountPaginator
from reliable_tasks.admin.search import task_search_query
from reliable_tasks.admin.waiting import describe_wait, short_reason
from reliable_tasks.models import TaskRecord

#: Columns the changelist never shows: not read for it (a traceback can be 20 kB a row).
_LIST_DEFERRED = ("args", "kwargs", "options", "history", "traceback", "publish_error")
_ERROR_EXCERPT_CHARS = 80
#: Django 5.0+ can count the rows behind each filter choice; never on the ledger (Django 4.2 can't).
_NO_FACETS = getattr(getattr(admin, "ShowFacets", None), "NEVER", None)


class TaskRecordChangeList(ChangeList):
    """The changelist, reading only the columns it shows."""

    def get_queryset(self, request: HttpRequest, *args: Any, **kwargs: Any) -> QuerySet:
        """The filtered rows, without their large JSON and text columns."""
        return super().get_queryset(request, *args, **kwargs).defer(*_LIST_DEFERRED)


class TaskRecordAdmin(ReadOnlyAdminMixin, TaskRetryAdminMixin, admin.ModelAdmin):
    """Browse the ledger, read a task's arguments, error and history, and retry failed tasks."""

    list_display = ("short_id", "task_name", "state_badge", "attempts", "created_at",
                    "run_time", "worker", "last_error")
    list_display_links = ("short_id",)
    ordering = ("-created_at",)
    list_filter = ("state", WaitingForListFilter, TaskNameListFilter, QueueListFilter,
                   LimitedByListFilter, ConcurrencyKeyListFilter, RateKeyListFilter,
                   ("created_at", admin.DateFieldListFilter))
    # Sorting by a column without an index would sort the whole table on each page view.
    sortable_by = ("task_name", "state_badge", "created_at")
    search_fields = ("task_name",)
    search_help_text = _("A task id (or its first characters), part of a task name, or a "
                         "unique, concurrency or rate key (whole).")
    date_hierarchy = "created_at"
    list_per_page = 50
    show_full_result_count = False
    if _NO_FACETS is not None:
        show_facets = _NO_FACETS
    paginator = EstimatedCountPaginator

    readonly_fields = ("id", "task_name", "state_badge", "unique_key", "queue", "adopted",
                       "attempts", "max_attempts", "worker", "celery_result", "created_at",
                       "published_at", "started_at", "finished_at", "run_time", "eta", "expires_at",
                       "next_attempt_at", "lease_expires_at", "args_json", "kwargs_json",
                       "options_json", "error_type", "error_message", "traceback_text",
                       "history_table", "duplicate_deliveries", "publish_attempts",
                       "publish_error", "parent_id", "root_id", "group_id", "waiting_reason",
                       "waiting_for", "concurrency_key", "concurrency_limit", "rate_key",
                       "rate_limit", "deferrals")
    fieldsets = (
        (None, {"fields": ("id", "task_name", "state_badge", "unique_key", "queue", "adopted",
                           ("attempts", "max_attempts"), "worker", "celery_result")}),
        (_("Arguments"), {"fields": ("args_json", "kwargs_json", "options_json")}),
        (_("Last error"), {"fields": ("error_type", "error_message", "traceback_text")}),
        (_("Attempts"), {"fields": ("history_table",)}),
        (_("Times"), {"fields": ("created_at", "published_at", "started_at", "finished_at",
                                 "run_time", "eta", "expires_at", "next_attempt_at",
                                 "lease_expires_at")}),
        (_("Delivery"), {"fields": ("duplicate_deliveries", "publish_attempts",
                                    "publish_error")}),
        (_("Workflow"), {"classes": ("collapse",),
                         "fields": ("parent_id", "root_id", "group_id")}),
    )

    def get_fieldsets(self, request: HttpRequest, obj: TaskRecord | None = None) -> Any:
        """The fieldsets, and after the first one the limits' for a task that has a limit
        (or was deferred by one)."""
        fieldsets = list(super().get_fieldsets(request, obj))
        if obj is not None and (obj.concurrency_key or obj.rate_key or obj.waiting_for
                                or obj.deferrals):
            fieldsets.insert(1, (_("Limits"), {"fields": (
                "waiting_reason", "waiting_for", ("concurrency_key", "concurrency_limit"),
                ("rate_key", "rate_limit"), "deferrals")}))
        return fieldsets

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        """The changelist that skips the large columns."""
        return TaskRecordChangeList

    def get_search_results(self, request: HttpRequest, queryset: QuerySet,
                           search_term: str) -> tuple[QuerySet, bool]:
        """Match the start of the id (served by the primary key), part of the task name, or
        the whole unique, concurrency or rate key."""
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(task_search_query(term, connections[queryset.db])), False

    # --- columns and fields ------------------------------------------------------------------

    @admin.display(description=_("id"))
    def short_id(self, obj: TaskRecord) -> str:
        """The first eight characters of the task id (enough to search for it)."""
        return str(obj.pk)[:8]

    @admin.display(description=_("state"), ordering="state")
    def state_badge(self, obj: TaskRecord) -> SafeString:
        """The state as a coloured badge; a waiting task's tooltip says what it waits for."""
        return widgets.state_badge(obj.state, short_reason(obj))

    @admin.display(description=_("why it waits"))
    def waiting_reason(self, obj: TaskRecord) -> str:
        """What a task deferred by a limit waits for: its key's counts, or its next start."""
        return describe_wait(obj) or self.get_empty_value_display()

    @admin.display(description=_("run time"))
    def run_time(self, obj: TaskRecord) -> str:
        """How long the last attempt ran."""
        return widgets.run_time(obj.started_at, obj.finished_at) or self.get_empty_value_display()

    @admin.display(description=_("last error"))
    def last_error(self, obj: TaskRecord) -> SafeString | str:
        """The start of the last error, its whole message in the tooltip."""
        if not (obj.error_type or obj.error_message):
            return self.get_empty_value_display()
        kind = obj.error_type.rpartition(".")[2]
        text = f"{kind}: {obj.error_message}" if kind else obj.error_message
        return format_html('<span title="{}" style="display:inline-block;min-width:16em">{}</span>',
                           Truncator(text).chars(500), Truncator(text).chars(_ERROR_EXCERPT_CHARS))

    @admin.display(description=_("args"))
    def args_json(self, obj: TaskRecord) -> SafeString:
        """The positional arguments, as indented JSON."""
        return widgets.pretty_json(obj.args)

    @admin.display(description=_("kwargs"))
    def kwargs_json(self, obj: TaskRecord) -> SafeString:
        """The keyword arguments, as indented JSON."""
        return widgets.pretty_json(obj.kwargs)

    @admin.display(description=_("options"))
    def options_json(self, obj: TaskRecord) -> SafeString:
        """The publish options, as indented JSON."""
        return widgets.pretty_json(obj.options)

    @admin.display(description=_("traceback"))
    def traceback_text(self, obj: TaskRecord) -> SafeString | str:
        """The last error's traceback, preformatted."""
        if not obj.traceback:
            return self.get_empty_value_display()
        return widgets.preformatted(obj.traceback)

    @admin.display(description=_("history"))
    def history_table(self, obj: TaskRecord) -> SafeString:
        """The latest attempts and manual retries, oldest first."""
        return widgets.history_table(obj.history)

    @admin.display(description=_("result"))
    def celery_result(self, obj: TaskRecord) -> SafeString | str:
        """A link to the task's django-celery-results result, when it stored one."""
        if not apps.is_installed("django_celery_results"):
            return self.get_empty_value_display()
        from django_celery_results.models import TaskResult

        found = (TaskResult.objects.filter(task_id=str(obj.pk))
                 .values_list("pk", "status").first())
        if found is None:
            return self.get_empty_value_display()
        pk, status = found
        opts = TaskResult._meta
        try:
            url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=(pk,),
                          current_app=self.admin_site.name)
        except NoReverseMatch:  # results are not in this admin site
            return status
        return format_html('<a href="{}" class="rt-result-link">{} ({})</a>', url,
                           _("stored result"), status)
