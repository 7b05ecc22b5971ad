"""The admin of ``reliable_tasks``, one module per job.

- ``task_record``: the ledger (``TaskRecordAdmin``), read-only, with the changelist tuned for large
  tables (``pagination``, ``filters``, ``search``);
- ``workers``: worker heartbeats (``WorkerHeartbeatAdmin``), read-only;
- ``mixins``: the composable pieces (read-only access, manual retry);
- ``actions`` and ``views``: the "Retry selected tasks" action and the Retry button's view, both
  through ``retries``, which calls ``reliable_tasks.ledger.retry``;
- ``widgets``: escaped HTML fragments (badges, JSON, tracebacks, history).

Importing this package (Django's admin autodiscovery does) registers both on the default site.
"""

from django.contrib import admin

from reliable_tasks.admin.mixins import ReadOnlyAdminMixin, TaskRetryAdminMixin
from reliable_tasks.admin.schedules import PeriodicScheduleAdmin  # noqa: F401 - registers it
from reliable_tasks.admin.task_record import TaskRecordAdmin
from reliable_tasks.admin.workers import WorkerHeartbeatAdmin
from reliable_tasks.models import TaskRecord, WorkerHeartbeat

__all__ = ["ReadOnlyAdminMixin", "TaskRecordAdmin", "TaskRetryAdminMixin",
           "WorkerHeartbeatAdmin"]

admin.site.register(TaskRecord, TaskRecordAdmin)
admin.site.register(WorkerHeartbeat, WorkerHeartbeatAdmin)
