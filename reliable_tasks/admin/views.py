"""The view behind the detail page's Retry button: POST only, permission checked, one retry.

The detail page is the confirmation (it shows the task, its error and its history); the button
posts here with the CSRF token. A GET is answered 405, a user without the retry permission 403.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import messages
from django.contrib.admin.templatetags.admin_urls import add_preserved_filters
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponseRedirect
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from reliable_tasks import ledger
from reliable_tasks.admin.retries import RETRYABLE_STATES
from reliable_tasks.exceptions import RetryNotAllowed

if TYPE_CHECKING:
    from reliable_tasks.admin.mixins import TaskRetryAdminMixin


@require_POST
def retry_task(request: HttpRequest, *, model_admin: TaskRetryAdminMixin,
               object_id: str) -> HttpResponseRedirect:
    """Retry one task as the requesting user, then go back to its detail page with a message."""
    if not model_admin.has_retry_permission(request):
        raise PermissionDenied
    record = model_admin.get_object(request, unquote(object_id))
    if record is None:
        raise Http404(_("No task with this id."))
    if not (model_admin.has_view_permission(request, record)
            and model_admin.has_retry_permission(request, record)):
        raise PermissionDenied
    label = f"{record.task_name} [{record.pk}]"
    try:
        ledger.retry(record.pk, by=request.user)
    except RetryNotAllowed:
        state = (type(record).objects.filter(pk=record.pk)
                 .values_list("state", flat=True).first())
        messages.error(request, _(
            "The task %(task)s was not retried: it is %(state)s, and only tasks in "
            "%(allowed)s can be retried.") % {
                "task": label, "state": state, "allowed": ", ".join(RETRYABLE_STATES)})
    else:
        messages.success(request, _(
            "The task %(task)s was reset to PENDING and will run again.") % {"task": label})
    return HttpResponseRedirect(_change_url(request, model_admin, record.pk))


def _change_url(request: HttpRequest, model_admin: TaskRetryAdminMixin, pk: Any) -> str:
    """The task's detail page, keeping the changelist filters the user came with."""
    opts = model_admin.opts
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=(quote(pk),),
                  current_app=model_admin.admin_site.name)
    return add_preserved_filters(
        {"preserved_filters": model_admin.get_preserved_filters(request), "opts": opts}, url)
