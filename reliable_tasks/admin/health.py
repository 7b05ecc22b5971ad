"""The health page and the reconcile button, mounted on a ``ModelAdmin`` by ``HealthAdminMixin``.

- ``health/`` (``admin:reliable_tasks_health``): ``reliable_tasks.health.report()`` with its
  problems first, and a bar chart (inline SVG, drawn on the server) of the tasks that finished,
  failed and were retried in each of the last 24 hours. Staff with the ledger's view permission
  (``reliable_tasks.view_taskrecord``).
- ``reconcile/`` (``admin:reliable_tasks_reconcile``): on GET the dry-run plan of
  ``reliable_tasks.reconcile.reconcile`` (nothing is written), on POST (with the CSRF token) the
  reconciliation itself, then back to the health page with what it did. Staff with
  ``reliable_tasks.push_periodicschedule``.

The URL names do not depend on the model the mixin is mounted on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext
from django.views.decorators.http import require_http_methods, require_safe

from reliable_tasks import health
from reliable_tasks.admin import widgets
from reliable_tasks.reconcile import ReconcileReport, reconcile

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

    _Base = ModelAdmin
else:
    _Base = object

HEALTH_PERMISSION = "reliable_tasks.view_taskrecord"
RECONCILE_PERMISSION = "reliable_tasks.push_periodicschedule"
#: How long the reconcile button waits for a reconciliation already running elsewhere.
RECONCILE_WAIT = 5.0
#: Entry names listed per action on the confirmation page.
PLAN_SHOWN = 100

# --- the chart -----------------------------------------------------------------------------------

#: Attribute of ``HourActivity``, label and colour of each bar of an hour.
CHART_SERIES = (
    ("succeeded", gettext_lazy("succeeded"), widgets.STATE_COLORS["SUCCESS"]),
    ("failed", gettext_lazy("failed"), widgets.STATE_COLORS["FAILURE"]),
    ("retried", gettext_lazy("retried"), widgets.STATE_COLORS["RETRY"]),
)
_SLOT, _BAR, _LEFT, _TOP, _PLOT_HEIGHT, _BOTTOM = 30, 8, 40, 10, 160, 30


def activity_chart(hours: Sequence[health.HourActivity]) -> dict[str, Any]:
    """The geometry of a grouped bar chart (three bars per hour), in whole SVG units.

    Every text in it is plain data: the template escapes it.
    """
    peak = max([1, *(getattr(hour, name) for hour in hours for name, *_rest in CHART_SERIES)])
    bars = []
    for index, hour in enumerate(hours):
        for position, (name, label, color) in enumerate(CHART_SERIES):
            value = getattr(hour, name)
            height = round(value * _PLOT_HEIGHT / peak)
            bars.append({
                "x": _LEFT + index * _SLOT + 3 + position * _BAR, "y": _TOP + _PLOT_HEIGHT - height,
                "width": _BAR - 1, "height": height, "color": color,
                "title": f"{hour.hour:%Y-%m-%d %H:00}: {value} {label}",
            })
    labels = [{"x": _LEFT + index * _SLOT + _SLOT // 2, "text": hour.hour.strftime("%H:00")}
              for index, hour in enumerate(hours) if index % 3 == 0]
    return {
        "width": _LEFT + len(hours) * _SLOT + 10,
        "height": _TOP + _PLOT_HEIGHT + _BOTTOM,
        "plot_left": _LEFT, "plot_top": _TOP, "plot_bottom": _TOP + _PLOT_HEIGHT,
        "label_y": _TOP + _PLOT_HEIGHT + 16, "peak": peak, "peak_y": _TOP + 4,
        "bars": bars, "labels": labels,
        "legend": [{"name": label, "color": color,
                    "total": sum(getattr(hour, name) for hour in hours)}
                   for name, label, color in CHART_SERIES],
    }


# --- messages ------------------------------------------------------------------------------------


def reconcile_message(result: ReconcileReport) -> str:
    """What a reconciliation did, counted."""
    if result.skipped_busy:
        return _("Another reconciliation is running; it does the same work. Nothing was done.")
    parts = [
        ngettext("%(count)d RedBeat entry created", "%(count)d RedBeat entries created",
                 result.created) % {"count": result.created},
        ngettext("%(count)d updated", "%(count)d updated", result.updated) % {
            "count": result.updated},
        ngettext("%(count)d removed", "%(count)d removed", result.removed) % {
            "count": result.removed},
        ngettext("%(count)d unchanged", "%(count)d unchanged", result.unchanged) % {
            "count": result.unchanged},
    ]
    text = _("Reconciled RedBeat with the database: %(parts)s.") % {"parts": ", ".join(parts)}
    if result.sweep is not None:
        published = result.sweep.published
        text += " " + ngettext(
            "The sweeper pass published %(count)d task.",
            "The sweeper pass published %(count)d tasks.", published) % {"count": published}
    return text


# --- the mixin -----------------------------------------------------------------------------------


class HealthAdminMixin(_Base):
    """Mount the health page and the reconcile button on this ``ModelAdmin``'s URLs."""

    health_template = "admin/reliable_tasks/health.html"
    reconcile_template = "admin/reliable_tasks/reconcile.html"

    def has_health_permission(self, request: HttpRequest) -> bool:
        """Whether the user may see the health page (the ledger's view permission)."""
        return request.user.has_perm(HEALTH_PERMISSION)

    def has_reconcile_permission(self, request: HttpRequest) -> bool:
        """Whether the user may reconcile RedBeat with the database."""
        return request.user.has_perm(RECONCILE_PERMISSION)

    def get_urls(self) -> list[URLPattern]:
        """``health/`` and ``reconcile/`` before the model's own URLs."""
        return [
            path("health/", self.admin_site.admin_view(self.health_view),
                 name="reliable_tasks_health"),
            path("reconcile/", self.admin_site.admin_view(self.reconcile_view),
                 name="reliable_tasks_reconcile"),
            *super().get_urls(),
        ]

    def _context(self, request: HttpRequest, title: str) -> dict[str, Any]:
        return {**self.admin_site.each_context(request), "title": title, "subtitle": None,
                "opts": self.opts}

    def health_view(self, request: HttpRequest) -> HttpResponse:
        """The health page (GET or HEAD only)."""
        return require_safe(self._health_view)(request)

    def _health_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_health_permission(request):
            raise PermissionDenied
        result = health.report()
        context = {
            **self._context(request, _("Task health")),
            "report": result,
            "state_badges": [(state, widgets.state_badge(state), count)
                             for state, count in result.state_counts.items()],
            "chart": activity_chart(health.hourly_activity(24)),
            "can_reconcile": self.has_reconcile_permission(request),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, self.health_template, context)

    def reconcile_view(self, request: HttpRequest) -> HttpResponse:
        """GET: the dry-run plan and a button; POST: reconcile, then back to the health page."""
        return require_http_methods(["GET", "HEAD", "POST"])(self._reconcile_view)(request)

    def _reconcile_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_reconcile_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            try:
                result = reconcile(wait=RECONCILE_WAIT)
            except Exception as exc:  # noqa: BLE001 - Redis or the database is down: say so
                messages.error(request, _("The reconciliation failed: %(error)s") % {
                    "error": health.sanitize(f"{type(exc).__name__}: {exc}")})
            else:
                level = messages.WARNING if result.skipped_busy else messages.SUCCESS
                messages.add_message(request, level, reconcile_message(result))
            return HttpResponseRedirect(reverse("admin:reliable_tasks_health",
                                                current_app=self.admin_site.name))
        context = self._context(request, _("Reconcile RedBeat with the database?"))
        try:
            plan = reconcile(dry_run=True, ledger=False).plan
        except Exception as exc:  # noqa: BLE001 - shown on the page
            context["error"] = health.sanitize(f"{type(exc).__name__}: {exc}")
        else:
            assert plan is not None
            context.update(plan=plan, actions=[
                (_("create"), len(plan.create), plan.create[:PLAN_SHOWN]),
                (_("update"), len(plan.update), plan.update[:PLAN_SHOWN]),
                (_("remove"), len(plan.remove), plan.remove[:PLAN_SHOWN]),
            ])
        request.current_app = self.admin_site.name
        return TemplateResponse(request, self.reconcile_template, context)
