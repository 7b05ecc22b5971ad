"""The app's models: the task ledger."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone

from reliable_tasks import validators
from reliable_tasks.querysets import PeriodicScheduleQuerySet, TaskRecordQuerySet
from reliable_tasks.states import TaskState

_now = timezone.now  # the schedule model has a field named ``timezone``

#: The longest ``unique_key`` (characters): short enough for a unique index on every database.
UNIQUE_KEY_MAX_LENGTH = 255
#: States in which a row holds its ``unique_key``: every state but the finished ones (a
#: REPLACED row's replacement is still to run). Migration 0009 spells them out for MariaDB too.
KEY_HOLDING_STATES = ("PENDING", "QUEUED", "STARTED", "RETRY", "REPLACED", "WAITING")
#: MySQL and MariaDB have no partial indexes: there migration 0009 adds this stored generated
#: column (the key while the row holds it, else NULL; compared byte for byte) with a unique
#: index, the equivalent of ``rt_task_unique_key``. It is not a model field.
LIVE_KEY_COLUMN = "rt_live_unique_key"


#: The longest rate (``"100/m"``) a row stores.
RATE_LIMIT_MAX_LENGTH = 32


class WaitReason(models.TextChoices):
    """Why a WAITING row waits."""

    CONCURRENCY = "concurrency", "Concurrency limit"
    RATE = "rate", "Rate limit"


class CatchUp(models.TextChoices):
    """What a schedule does with runs missed while beat or Redis was down."""

    SKIP = "skip", "Skip missed runs"
    LATEST = "latest", "Run the latest missed run once"


class PeriodicSchedule(models.Model):
    """A periodic task. Its save and delete hooks push the change to RedBeat after commit."""

    name = models.CharField(max_length=200, unique=True)
    task = models.CharField(max_length=255, validators=[validators.validate_registered_task],
                            help_text="A registered Celery task name.")
    args = models.JSONField(default=list, blank=True, validators=[validators.validate_args])
    kwargs = models.JSONField(default=dict, blank=True, validators=[validators.validate_kwargs])
    options = models.JSONField(default=dict, blank=True,
                               validators=[validators.validate_options],
                               help_text="queue, priority, expires")
    interval_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="Run every this many seconds.")
    crontab = models.CharField(
        max_length=100, blank=True, default="",
        help_text="Five fields: minute hour day-of-month month day-of-week, e.g. 30 2 * * 1-5.")
    timezone = models.CharField(
        max_length=64, blank=True, default="", validators=[validators.validate_timezone],
        help_text="IANA time zone of the crontab; default: the project's TIME_ZONE.")
    run_at = models.DateTimeField(null=True, blank=True, help_text="One-off: run once at.")
    enabled = models.BooleanField(default=True)
    description = models.TextField(blank=True, default="")
    catch_up = models.CharField(max_length=10, choices=CatchUp.choices, default=CatchUp.SKIP)

    revision = models.PositiveIntegerField(default=1, editable=False)
    synced_revision = models.PositiveIntegerField(default=0, editable=False)
    synced_at = models.DateTimeField(null=True, blank=True, editable=False)
    sync_error = models.TextField(blank=True, default="", editable=False)
    created_at = models.DateTimeField(default=_now, editable=False)
    updated_at = models.DateTimeField(default=_now, editable=False)

    objects = PeriodicScheduleQuerySet.as_manager()

    class Meta:
        verbose_name = "periodic schedule"
        ordering = ["name"]
        permissions = [("run_periodicschedule", "Can run schedules now"),
                       ("push_periodicschedule", "Can push schedules to RedBeat")]
        constraints = [
            models.CheckConstraint(
                condition=(
                    Q(interval_seconds__isnull=False, crontab="", run_at__isnull=True)
                    | (Q(interval_seconds__isnull=True, run_at__isnull=True) & ~Q(crontab=""))
                    | Q(interval_seconds__isnull=True, crontab="", run_at__isnull=False)
                ),
                name="rt_schedule_one_timing",
                violation_error_message=(
                    "Give exactly one timing: interval_seconds, crontab or run_at."),
            ),
            models.CheckConstraint(condition=Q(interval_seconds__gte=1)
                                   | Q(interval_seconds__isnull=True),
                                   name="rt_schedule_interval_positive"),
        ]
        indexes = [models.Index(fields=["enabled", "name"], name="rt_schedule_enabled")]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Validate, bump the revision and save; the push to RedBeat follows the commit."""
        self.full_clean()
        if self.pk is not None:
            self.revision = (self.revision or 0) + 1
        self.updated_at = timezone.now()
        super().save(*args, **kwargs)

    def clean(self) -> None:
        """Cross-field checks; each error names its field."""
        timings = [self.interval_seconds is not None, bool(self.crontab), self.run_at is not None]
        if sum(timings) != 1:
            raise ValidationError({
                "interval_seconds": "Give exactly one timing: interval_seconds, crontab or "
                                    "run_at."})
        if self.crontab:
            errors = validators.crontab_errors(self.crontab, self.zone_name)
            if errors:
                raise ValidationError(errors)

    @property
    def zone_name(self) -> str:
        """The crontab's time zone, or the project's."""
        return self.timezone or settings.TIME_ZONE

    @property
    def needs_sync(self) -> bool:
        """Whether RedBeat has not seen this revision yet."""
        return self.synced_revision < self.revision


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
    return_value = models.JSONField(
        null=True, blank=True,
        help_text="The JSON return value of a successful run, for tasks that keep it "
                  "(django.tasks tasks run by ReliableCeleryBackend).")

    schedule = models.ForeignKey(
        PeriodicSchedule, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs")
    scheduled_for = models.DateTimeField(
        null=True, blank=True, help_text="The slot of a periodic run (one row per slot).")

    # NULL is "no key": NULLs never collide in a unique index, empty strings would.
    unique_key = models.CharField(  # noqa: DJ001
        max_length=UNIQUE_KEY_MAX_LENGTH, null=True, blank=True,
        help_text="Deduplication key: at most one unfinished task holds a key at a time.")

    # Limits, enforced at the claim (``reliable_tasks.limits``); NULL keys are "no limit".
    concurrency_key = models.CharField(  # noqa: DJ001
        max_length=UNIQUE_KEY_MAX_LENGTH, null=True, blank=True,
        help_text="At most concurrency_limit tasks with this key run at once, on all workers.")
    concurrency_limit = models.PositiveIntegerField(null=True, blank=True)
    rate_key = models.CharField(  # noqa: DJ001
        max_length=UNIQUE_KEY_MAX_LENGTH, null=True, blank=True,
        help_text="Tasks with this key start at most rate_limit times, on all workers.")
    rate_limit = models.CharField(max_length=RATE_LIMIT_MAX_LENGTH, blank=True, default="",
                                  help_text='Starts per period of the rate key: "100/m".')
    waiting_for = models.CharField(
        max_length=16, blank=True, default="", choices=WaitReason.choices,
        help_text="Why the task waits (deferred by a limit); empty once it started.")
    deferrals = models.PositiveIntegerField(
        default=0, help_text="Deliveries deferred by a concurrency or rate limit.")

    parent_id = models.UUIDField(null=True, blank=True)
    root_id = models.UUIDField(null=True, blank=True)
    group_id = models.UUIDField(null=True, blank=True)

    objects = TaskRecordQuerySet.as_manager()

    class Meta:
        verbose_name = "task record"
        permissions = [("retry_taskrecord", "Can retry tasks")]
        indexes = [
            models.Index(fields=["state", "created_at"], name="rt_task_state_created"),
            models.Index(fields=["state", "next_attempt_at"], name="rt_task_state_next_attempt"),
            models.Index(fields=["state", "lease_expires_at"], name="rt_task_state_lease"),
            models.Index(fields=["task_name", "created_at"], name="rt_task_name_created"),
            models.Index(fields=["created_at"], name="rt_task_created"),
            models.Index(fields=["finished_at"], name="rt_task_finished"),
            models.Index(fields=["root_id"], name="rt_task_root"),
            # The sweeper's publish queue, ordered by due time across both states. Partial
            # where the database has partial indexes (MySQL/MariaDB fall back to the
            # (state, next_attempt_at) index).
            models.Index(fields=["next_attempt_at"], name="rt_task_due",
                         condition=Q(state__in=["PENDING", "RETRY"], adopted=False)),
            # The claim's count of a key's running tasks, and of the rows that waited for a
            # slot (few: a row leaves it when it starts), by age: the wake-up's oldest waiter.
            models.Index(fields=["concurrency_key", "state", "created_at"],
                         name="rt_task_concurrency", condition=Q(concurrency_key__isnull=False)),
            models.Index(fields=["concurrency_key", "created_at"], name="rt_task_waiters",
                         condition=Q(waiting_for="concurrency")),
        ]
        constraints = [
            models.UniqueConstraint(fields=["schedule", "scheduled_for"],
                                    name="rt_task_one_run_per_slot"),
            # One unfinished row per key. A partial unique index on PostgreSQL and SQLite (it
            # holds keyed unfinished rows only); on MySQL/MariaDB, which skip it, a unique index
            # on the generated column ``LIVE_KEY_COLUMN`` (migration 0009).
            models.UniqueConstraint(
                fields=["unique_key"], name="rt_task_unique_key",
                condition=Q(unique_key__isnull=False, state__in=KEY_HOLDING_STATES)),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.id}] {self.state}"

    @property
    def is_finished(self) -> bool:
        """Whether the task will not run again unless a human retries it."""
        from reliable_tasks.states import FINISHED_STATES

        return self.state in FINISHED_STATES


class TaskLimiter(models.Model):
    """The lock of one concurrency or rate key, and a rate key's bucket.

    The claim of a limited task locks its key's row first, so that claims of one key take
    turns (``reliable_tasks.limits``). A rate key's row is a GCRA bucket: ``allowed_at`` is
    when the next start is allowed, ``reserved_until`` the end of the starts promised to
    deferred tasks (both by the database's clock).
    """

    key = models.CharField(max_length=UNIQUE_KEY_MAX_LENGTH + 2, primary_key=True)
    allowed_at = models.DateTimeField(null=True, blank=True)
    reserved_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "task limiter"

    def __str__(self) -> str:
        return self.key


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
    #: Set when the server changed: QUEUED rows published up to then may have lost their
    #: message and are made due again, batch by batch, until none is left (then None).
    requeue_before = models.DateTimeField(null=True, blank=True)
    #: When the last look for QUEUED rows whose message is gone began (``broker_audit``).
    audited_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "broker epoch"

    def __str__(self) -> str:
        return f"{self.name}: {self.run_id}"


class LedgerPulse(models.Model):
    """When the app's processes last reached the ledger, and since when without a gap.

    Every worker heartbeat and every sweeper pass touches the one row (``name="ledger"``), with
    the database's clock. A gap longer than a third of a lease means nobody could reach the database
    (or nothing ran): ``steady_since`` starts again, and the sweeper expires no lease until a
    whole lease has passed since then, so that heartbeats resume before any lease is judged.
    """

    name = models.CharField(max_length=50, primary_key=True)
    last_seen_at = models.DateTimeField()
    steady_since = models.DateTimeField()

    class Meta:
        verbose_name = "ledger pulse"

    def __str__(self) -> str:
        return f"{self.name}: steady since {self.steady_since.isoformat()}"
