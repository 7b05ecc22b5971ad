"""Composable ``ModelAdmin`` pieces: read-only access, and the manual retry of ledger rows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib.admin.templatetags.admin_urls import add_preserved_filters
from django.contrib.admin.utils import quote
from django.contrib.auth import get_permission_codename
from django.db.models import Model
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, path, reverse

from reliable_tasks.admin import views
from reliable_tasks.admin.actions import retry_selected
from reliable_tasks.admin.retries import RETRYABLE_STATES

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

    _Base = ModelAdmin
else:
    _Base = object


class ReadOnlyAdminMixin(_Base):
    """No adding, editing or deleting through the admin: the rows are written by the app alone.

    Staff with the view permission see the list and the detail pages; nobody gets a form.
    """

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Rows are never added through the admin."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        """Rows are never edited through the admin."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        """Rows are never deleted through the admin (retention prunes finished rows)."""
        return False


class TaskRetryAdminMixin(_Base):
    """Manual retries of ``TaskRecord`` rows: the bulk action and the detail page's button.

    Both are offered only to users with the model's ``retry`` permission
    (``reliable_tasks.retry_taskrecord``), which both check again when they run.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.actions is not None and retry_selected not in self.actions:
            self.actions = [*self.actions, retry_selected]

    def has_retry_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        """Whether the user holds the model's ``retry`` permission."""
        opts = self.opts
        codename = get_permission_codename("retry", opts)
        return request.user.has_perm(f"{opts.app_label}.{codename}")

    def get_urls(self) -> list[URLPattern]:
        """The model's admin URLs plus ``<id>/retry/`` (named ``<app>_<model>_retry``)."""
        opts = self.opts
        retry_url = path(
            "<path:object_id>/retry/",
            self.admin_site.admin_view(self.retry_view),
            name=f"{opts.app_label}_{opts.model_name}_retry",
        )
        return [retry_url, *super().get_urls()]

    def retry_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The Retry button's target (see ``reliable_tasks.admin.views.retry_task``)."""
        return views.retry_task(request, model_admin=self, object_id=object_id)

    def render_change_form(self, request: HttpRequest, context: dict[str, Any],
                           add: bool = False, change: bool = False, form_url: str = "",
                           obj: Model | None = None) -> HttpResponse:
        """Offer the Retry button when the user may retry and the task's state allows it."""
        can_retry = (obj is not None and getattr(obj, "state", None) in RETRYABLE_STATES
                     and self.has_retry_permission(request, obj))
        context["can_retry_task"] = can_retry
        if can_retry and obj is not None:
            opts = self.opts
            url = reverse(f"admin:{opts.app_label}_{opts.model_name}_retry",
                          args=(quote(obj.pk),), current_app=self.admin_site.name)
            context["retry_url"] = add_preserved_filters(
                {"preserved_filters": self.get_preserved_filters(request), "opts": opts}, url)
        return super().render_change_form(request, context, add, change, form_url, obj)
