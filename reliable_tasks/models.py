"""The app's models: the task ledger."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from django.db import models
from django.utils import timezone

from reliable_tasks.querysets import TaskRecordQuerySet
from reliable_tasks.states import TaskState


class TaskRecord(models.Model):
    """One logical Celery task, keyed by its Celery task id, through all its attempts."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    task_name = models.CharField(max_length=255)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    options = models.JSONField(
        default=dict, blank=True, help_text="Publish options: queue, priority, headers, ...")
    queue = models.CharField(max_length=255, blank=True, default="")
    state = models.CharField(max_length=16, choices=TaskState.choices, default=TaskState.PENDING)
    adopted = models.BooleanField(
        default=False,
        help_text="Sent with plain Celery: recorded from signals, without the outbox guarantee.")

    attempts = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(null=True, blank=True)
    publish_attempts = models.PositiveIntegerField(default=0)
    publish_error = models.TextField(blank=True, default="")
    publish_claim = models.CharField(
        max_length=32, blank=True, default="", editable=False,
        help_text="Token of the sweeper pass that took the row for publishing.")
    duplicate_deliveries = models.PositiveIntegerField(
        default=0, help_text="Deliveries skipped because the task had finished or was running.")

    eta = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=255, blank=True, default="")

    created_at = models.DateTimeField(default=timezone.now)
    published_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    error_type = models.CharField(max_length=255, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    traceback = models.TextField(blank=True, default="")
    history = models.JSONField(
        default=list, blank=True, help_text="The latest attempts, oldest first (bounded).")

    parent_id = models.UUIDField(null=True, blank=True)
    root_id = models.UUIDField(null=True, blank=True)
    group_id = models.UUIDField(null=True, blank=True)

    objects = TaskRecordQuerySet.as_manager()

    class Meta:
        verbose_name = "task record"
        ordering = ["-created_at"]
        permissions = [("retry_taskrecord", "Can retry tasks")]
        indexes = [
            models.Index(fields=["state", "created_at"], name="rt_task_state_created"),
            models.Index(fields=["state", "next_attempt_at"], name="rt_task_state_next_attempt"),
            models.Index(fields=["state", "lease_expires_at"], name="rt_task_state_lease"),
            models.Index(fields=["task_name", "created_at"], name="rt_task_name_created"),
            models.Index(fields=["created_at"], name="rt_task_created"),
            models.Index(fields=["finished_at"], name="rt_task_finished"),
            models.Index(fields=["root_id"], name="rt_task_root"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.id}] {self.state}"

    @property
    def is_finished(self) -> bool:
        """Whether the task will not run again unless a human retries it."""
        from reliable_tasks.states import FINISHED_STATES

        return self.state in FINISHED_STATES


class WorkerHeartbeat(models.Model):
    """A Celery worker node, alive while ``last_seen_at`` is fresh."""

    hostname = models.CharField(max_length=255, unique=True)
    pid = models.PositiveIntegerField(default=0)
    first_seen_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    stopped_at = models.DateTimeField(null=True, blank=True)
    running = models.PositiveIntegerField(default=0, help_text="Tasks running at the last beat.")

    class Meta:
        verbose_name = "worker heartbeat"
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname

    def is_alive(self, now: datetime | None = None) -> bool:
        """Whether the worker beat within the lease timeout and has not stopped."""
        from reliable_tasks.conf import app_settings

        now = now or timezone.now()
        fresh = now - self.last_seen_at < timedelta(seconds=app_settings.LEASE_TIMEOUT)
        return self.stopped_at is None and fresh


class BrokerEpoch(models.Model):
    """The Redis server seen behind the broker; a new run id means its data may be gone."""

    name = models.CharField(max_length=100, primary_key=True)
    run_id = models.CharField(max_length=64)
    seen_since = models.DateTimeField(default=timezone.now)
    checked_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "broker epoch"

    def __str__(self) -> str:
        return f"{self.name}: {self.run_id}"
