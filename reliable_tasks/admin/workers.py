"""The workers' admin: which Celery workers beat recently, read-only."""

from __future__ import annotations

from django.contrib import admin
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from reliable_tasks.admin import widgets
from reliable_tasks.admin.mixins import ReadOnlyAdminMixin
from reliable_tasks.models import WorkerHeartbeat


class WorkerHeartbeatAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Worker nodes with their last heartbeat; alive while it is fresh and they did not stop."""

    list_display = ("hostname", "status", "pid", "running", "last_beat", "first_seen_at",
                    "last_seen_at", "stopped_at")
    search_fields = ("hostname",)
    ordering = ("hostname",)
    fields = ("hostname", "status", "pid", "running", "last_beat", "first_seen_at",
              "last_seen_at", "stopped_at")
    readonly_fields = fields

    @admin.display(description=_("status"))
    def status(self, obj: WorkerHeartbeat) -> SafeString:
        """An "alive" or "dead" badge (see ``WorkerHeartbeat.is_alive``)."""
        return widgets.alive_badge(obj.is_alive())

    @admin.display(description=_("last beat"), ordering="last_seen_at")
    def last_beat(self, obj: WorkerHeartbeat) -> str:
        """How long ago the worker last beat, to the second."""
        return widgets.time_ago(obj.last_seen_at)
