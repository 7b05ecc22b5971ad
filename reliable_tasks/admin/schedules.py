"""The admin of periodic schedules: a form with the registered tasks, the timing in words, the next
and last runs as RedBeat has them, the sync state, and the actions enable, disable, run now and
push now.

- ``describe_timing``: "every 5 minutes", "02:30 daily, Europe/Berlin", "at 09:00 on Mon-Fri, UTC";
- ``RedBeatColumnsMixin``: next and last run read from RedBeat in one pipelined round trip per
  changelist page (``ScheduleChangeList``), and once for a detail page;
- ``ScheduleActionsMixin``: the four actions, each allowed by its permission (``change``,
  ``reliable_tasks.run_periodicschedule``, ``reliable_tasks.push_periodicschedule``), which the
  action checks again when it runs; ``get_actions()`` leaves out those the user may not run;
- ``PeriodicScheduleAdmin``: the two, plus the health page (``HealthAdminMixin``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.dateformat import format as date_format
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext

from reliable_tasks import redbeat_store
from reliable_tasks.admin import widgets
from reliable_tasks.admin.health import HealthAdminMixin
from reliable_tasks.admin.phrases import describe_schedule
from reliable_tasks.celery_app import get_celery_app
from reliable_tasks.exceptions import DispatchError
from reliable_tasks.forms import PeriodicScheduleForm
from reliable_tasks.models import PeriodicSchedule
from reliable_tasks.outbox import dispatch
from reliable_tasks.sync import push_schedules

if TYPE_CHECKING:
    _Base = admin.ModelAdmin
else:
    _Base = object

#: Task ids and errors listed in one message at most.
LISTED = 10
_SYNCED_COLOR = widgets.STATE_COLORS["SUCCESS"]
_PENDING_COLOR = widgets.STATE_COLORS["RETRY"]
_ERROR_COLOR = widgets.STATE_COLORS["FAILURE"]

# --- next and last runs, from RedBeat ------------------------------------------------------------

_ENTRY = "_rt_redbeat_entry"
_ENTRY_ERROR = "_rt_redbeat_error"


def attach_entries(schedules: list[PeriodicSchedule]) -> str:
    """Read the RedBeat entries of ``schedules`` in one pipelined round trip; attach them.

    Returns the error when RedBeat could not be read (then every row carries it), else "".
    """
    names = [redbeat_store.entry_name(schedule.pk) for schedule in schedules]
    try:
        entries = redbeat_store.read_entries(get_celery_app(), names)
        error = ""
    except Exception as exc:  # noqa: BLE001 - the page renders without RedBeat's data
        entries, error = {}, f"{type(exc).__name__}: {exc}"
    for schedule, name in zip(schedules, names, strict=True):
        setattr(schedule, _ENTRY, entries.get(name))
        setattr(schedule, _ENTRY_ERROR, error)
    return error


class ScheduleChangeList(ChangeList):
    """The changelist, reading the page's RedBeat entries at once."""

    def get_results(self, request: HttpRequest) -> None:
        """The page's rows, each with its RedBeat entry."""
        super().get_results(request)
        error = attach_entries(list(self.result_list))
        if error:
            messages.warning(request, _(
                "RedBeat could not be read, next and last runs are unknown: %(error)s")
                % {"error": error})


def _moment(value: datetime, now: datetime) -> SafeString:
    """A time to the second in the current zone, and how far from now it is in the tooltip."""
    delta = value - now
    relative = (_("in %(duration)s") % {"duration": widgets.format_duration(delta)}
                if delta.total_seconds() >= 0 else widgets.time_ago(value, now))
    return format_html('<span title="{}">{}</span>', relative,
                       date_format(timezone.localtime(value), "Y-m-d H:i:s"))


class RedBeatColumnsMixin(_Base):
    """The next and last run of each schedule as RedBeat stores them."""

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        """The changelist that reads RedBeat once per page."""
        return ScheduleChangeList

    def _entry(self, obj: PeriodicSchedule) -> tuple[Any, str]:
        if not hasattr(obj, _ENTRY):
            attach_entries([obj])
        return getattr(obj, _ENTRY), getattr(obj, _ENTRY_ERROR)

    def _unknown(self, obj: PeriodicSchedule, *, flag_missing: bool) -> SafeString | str | None:
        """What to show instead of a time when there is none to show.

        An enabled schedule without an entry is flagged (``flag_missing``) in one column only.
        """
        entry, error = self._entry(obj)
        if error:
            return format_html('<span title="{}">?</span>', error)
        if entry is None or entry.definition is None:  # a score alone is no entry
            if obj.enabled and flag_missing:
                return widgets.badge(_("not in RedBeat"), _ERROR_COLOR, key="missing")
            return self.get_empty_value_display()
        return None

    @admin.display(description=gettext_lazy("next run"))
    def next_run(self, obj: PeriodicSchedule) -> SafeString | str:
        """When RedBeat will run the schedule next (the entry's score)."""
        unknown = self._unknown(obj, flag_missing=True)
        if unknown is not None:
            return unknown
        entry, _error = self._entry(obj)
        if entry.score is None:
            return self.get_empty_value_display()
        return _moment(datetime.fromtimestamp(entry.score, UTC), timezone.now())

    @admin.display(description=gettext_lazy("last run"))
    def last_run(self, obj: PeriodicSchedule) -> SafeString | str:
        """The slot RedBeat last ran (shown once the entry has run at least once)."""
        unknown = self._unknown(obj, flag_missing=False)
        if unknown is not None:
            return unknown
        entry, _error = self._entry(obj)
        if not entry.total_run_count or entry.last_run_at is None:
            return self.get_empty_value_display()
        return _moment(entry.last_run_at, timezone.now())


# --- actions -------------------------------------------------------------------------------------


def _require(allowed: bool) -> None:
    if not allowed:
        raise PermissionDenied


def _report_unsynced(request: HttpRequest, ids: list[int]) -> None:
    """Say how many of the schedules ``ids`` RedBeat has not seen yet (their push failed)."""
    behind = PeriodicSchedule.objects.filter(pk__in=ids).needing_sync().count()
    if behind:
        messages.warning(request, ngettext(
            "RedBeat has not seen the change of %(count)d schedule yet; the sweeper pushes it "
            "again.",
            "RedBeat has not seen the change of %(count)d schedules yet; the sweeper pushes "
            "them again.",
            behind) % {"count": behind})


def _set_enabled(request: HttpRequest, queryset: QuerySet, enabled: bool) -> None:
    ids = list(queryset.filter(enabled=not enabled).values_list("pk", flat=True))
    changed = PeriodicSchedule.objects.filter(pk__in=ids).update(enabled=enabled)
    if enabled:
        text = ngettext("%(count)d schedule was enabled.", "%(count)d schedules were enabled.",
                        changed)
    else:
        text = ngettext("%(count)d schedule was disabled.", "%(count)d schedules were disabled.",
                        changed)
    messages.success(request, text % {"count": changed})
    _report_unsynced(request, ids)


@admin.action(description=gettext_lazy("Enable selected schedules"), permissions=["change"])
def enable_schedules(modeladmin: ScheduleActionsMixin, request: HttpRequest,
                     queryset: QuerySet) -> None:
    """Enable the selection (one UPDATE, which bumps the revisions and pushes after commit)."""
    _require(modeladmin.has_change_permission(request))
    _set_enabled(request, queryset, True)


@admin.action(description=gettext_lazy("Disable selected schedules"), permissions=["change"])
def disable_schedules(modeladmin: ScheduleActionsMixin, request: HttpRequest,
                      queryset: QuerySet) -> None:
    """Disable the selection: their RedBeat entries are removed after commit."""
    _require(modeladmin.has_change_permission(request))
    _set_enabled(request, queryset, False)


@admin.action(description=gettext_lazy("Run selected schedules now"), permissions=["run"])
def run_now(modeladmin: ScheduleActionsMixin, request: HttpRequest, queryset: QuerySet) -> None:
    """Dispatch each selected schedule's task once, now, through the outbox; audit each run."""
    _require(modeladmin.has_run_permission(request))
    started: list[tuple[PeriodicSchedule, Any]] = []
    failed: list[tuple[PeriodicSchedule, DispatchError]] = []
    for schedule in queryset.order_by("name"):
        try:
            with transaction.atomic():
                record = dispatch(schedule.task, schedule.args, schedule.kwargs,
                                  **(schedule.options or {}))
        except DispatchError as exc:
            failed.append((schedule, exc))
            continue
        started.append((schedule, record))
        modeladmin.log_change(request, schedule, _("Ran now as task %(id)s.") % {"id": record.pk})
    if started:
        links = format_html_join(", ", '<a href="{}">{}</a>', (
            (reverse("admin:reliable_tasks_taskrecord_change", args=(record.pk,),
                     current_app=modeladmin.admin_site.name), str(record.pk)[:8])
            for _schedule, record in started[:LISTED]))
        more = "" if len(started) <= LISTED else _(" and %(count)d more") % {
            "count": len(started) - LISTED}
        messages.success(request, format_html("{} {}{}", ngettext(
            "%(count)d schedule was run now, as task:", "%(count)d schedules were run now, "
            "as tasks:", len(started)) % {"count": len(started)}, links, more))
    if failed:
        details = "; ".join(f"{schedule.name}: {exc}" for schedule, exc in failed[:LISTED])
        messages.error(request, ngettext(
            "%(count)d schedule could not be run (%(details)s).",
            "%(count)d schedules could not be run (%(details)s).",
            len(failed)) % {"count": len(failed), "details": details})


@admin.action(description=gettext_lazy("Push selected schedules to RedBeat now"),
              permissions=["push"])
def push_now(modeladmin: ScheduleActionsMixin, request: HttpRequest, queryset: QuerySet) -> None:
    """Write the selection's entries to RedBeat (remove those of disabled schedules) now."""
    _require(modeladmin.has_push_permission(request))
    ids = list(queryset.values_list("pk", flat=True))
    result = push_schedules(ids)
    if result.failed:
        error = (PeriodicSchedule.objects.filter(pk__in=ids).exclude(sync_error="")
                 .values_list("sync_error", flat=True).first() or "")
        messages.error(request, ngettext(
            "Pushing %(count)d schedule to RedBeat failed (%(error)s); it stays marked and the "
            "sweeper pushes it again.",
            "Pushing %(count)d schedules to RedBeat failed (%(error)s); they stay marked and the "
            "sweeper pushes them again.", result.failed) % {
                "count": result.failed, "error": Truncator(error).chars(300)})
        return
    text = ngettext("%(count)d schedule was pushed to RedBeat",
                    "%(count)d schedules were pushed to RedBeat", result.pushed) % {
        "count": result.pushed}
    removed = ngettext("%(count)d entry of a disabled or deleted schedule was removed",
                       "%(count)d entries of disabled or deleted schedules were removed",
                       result.removed) % {"count": result.removed}
    messages.success(request, f"{text}; {removed}.")


class ScheduleActionsMixin(_Base):
    """Enable, disable, run now and push now, each behind its permission."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.actions is not None:
            mine = [enable_schedules, disable_schedules, run_now, push_now]
            self.actions = [*self.actions, *(action for action in mine
                                             if action not in self.actions)]

    def _has_model_permission(self, request: HttpRequest, action: str) -> bool:
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")

    def has_run_permission(self, request: HttpRequest) -> bool:
        """Whether the user may run schedules now (``run_periodicschedule``)."""
        return self._has_model_permission(request, "run")

    def has_push_permission(self, request: HttpRequest) -> bool:
        """Whether the user may push schedules to RedBeat (``push_periodicschedule``)."""
        return self._has_model_permission(request, "push")


# --- the admin -----------------------------------------------------------------------------------


@admin.register(PeriodicSchedule)
class PeriodicScheduleAdmin(HealthAdminMixin, RedBeatColumnsMixin, ScheduleActionsMixin,
                            admin.ModelAdmin):
    """Create and edit schedules, see when RedBeat runs them, run or push them by hand."""

    form = PeriodicScheduleForm
    list_display = ("name", "task", "timing", "enabled", "next_run", "last_run", "sync_state")
    list_filter = ("enabled", "catch_up")
    search_fields = ("name", "task", "description")
    ordering = ("name",)
    list_per_page = 50
    readonly_fields = ("sync_state", "next_run", "last_run", "revision", "synced_revision",
                       "synced_at", "sync_error", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "task", "enabled", "description")}),
        (gettext_lazy("Timing (exactly one of interval, crontab and one-off time)"), {
            "fields": ("interval_seconds", ("crontab", "timezone"), "run_at", "catch_up")}),
        (gettext_lazy("Arguments"), {"fields": ("args", "kwargs", "options")}),
        (gettext_lazy("RedBeat"), {"fields": ("sync_state", "next_run", "last_run", "revision",
                                              "synced_revision", "synced_at", "sync_error",
                                              "created_at", "updated_at")}),
    )

    @admin.display(description=gettext_lazy("schedule"))
    def timing(self, obj: PeriodicSchedule) -> str:
        """The timing in words."""
        return describe_schedule(obj)

    @admin.display(description=gettext_lazy("sync"))
    def sync_state(self, obj: PeriodicSchedule) -> SafeString:
        """In sync, pending push (with the revisions), or the last push error."""
        if obj.sync_error and obj.needs_sync:
            text = _("error: %(error)s") % {"error": obj.sync_error}
            return format_html('<span title="{}">{}</span>', text, widgets.badge(
                Truncator(text).chars(60), _ERROR_COLOR, key="error", title=text))
        if obj.needs_sync:
            return widgets.badge(_("pending push (rev %(revision)d > %(synced)d)") % {
                "revision": obj.revision, "synced": obj.synced_revision}, _PENDING_COLOR,
                key="pending")
        return widgets.badge(_("in sync"), _SYNCED_COLOR, key="in-sync")
