"""The changelist action "Retry selected tasks": confirm first, then retry on the second POST.

The first POST (the action chosen on the changelist) changes nothing: it shows what the selection
holds, how many tasks will run again and which are skipped with their states. The confirmation
form posts the same selection back with ``post=yes``, and only that retries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from reliable_tasks.admin import retries
from reliable_tasks.admin.widgets import state_badge

if TYPE_CHECKING:
    from reliable_tasks.admin.mixins import TaskRetryAdminMixin

#: How many of the tasks about to be retried the confirmation page lists.
CONFIRMATION_SAMPLE = 50


@admin.action(description=gettext_lazy("Retry selected tasks"), permissions=["retry"])
def retry_selected(modeladmin: TaskRetryAdminMixin, request: HttpRequest,
                   queryset: QuerySet) -> TemplateResponse | None:
    """Ask to confirm the retry of the selected failed, lost, revoked or expired tasks; do it.

    Runs ``reliable_tasks.ledger.retry`` for each retryable row as the requesting user; the other
    rows are skipped and counted by state. A SUCCESS is never force-retried from here.
    """
    if not modeladmin.has_retry_permission(request):
        raise PermissionDenied
    if request.POST.get("post") == "yes":
        retries.report(request, retries.retry_selection(queryset, request.user))
        return None
    selection = retries.plan(queryset)
    if not selection.retryable:
        skipped = sum(selection.skipped.values())
        messages.warning(request, retries.skipped_message(skipped, selection.skipped))
        return None
    return _confirmation(modeladmin, request, queryset, selection)


def _confirmation(modeladmin: TaskRetryAdminMixin, request: HttpRequest, queryset: QuerySet,
                  selection: retries.RetryPlan) -> TemplateResponse:
    """The page listing what the retry will do, with the form that confirms it."""
    opts = modeladmin.model._meta
    sample = (queryset.filter(state__in=retries.RETRYABLE_STATES).order_by("-created_at")
              .only("id", "task_name", "state", "attempts", "created_at")[:CONFIRMATION_SAMPLE])
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": _("Retry tasks?"),
        "subtitle": None,
        "opts": opts,
        "media": modeladmin.media,
        "action_name": "retry_selected",
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "selected_ids": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
        "select_across": request.POST.get("select_across") == "1",
        "retryable_count": selection.retryable,
        "sample": [(record, state_badge(record.state)) for record in sample],
        "more_count": max(0, selection.retryable - CONFIRMATION_SAMPLE),
        "skipped_count": sum(selection.skipped.values()),
        "skipped_states": retries.describe_states(selection.skipped),
        "allowed_states": ", ".join(retries.RETRYABLE_STATES),
    }
    request.current_app = modeladmin.admin_site.name
    return TemplateResponse(request, [
        f"admin/{opts.app_label}/{opts.model_name}/retry_selected_confirmation.html",
        f"admin/{opts.app_label}/retry_selected_confirmation.html",
    ], context)
