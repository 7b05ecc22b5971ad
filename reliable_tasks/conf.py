"""The app's settings: flat ``RELIABLE_TASKS_<NAME>`` Django settings, read lazily.

Reading on first access (never at import time) and forgetting on Django's ``setting_changed``
signal keeps ``override_settings`` working; caching the values matters on hot paths (a setting
left at its default costs Django an ``AttributeError`` on every read). Durations are seconds
(``int`` or ``float``). Validation lives in ``reliable_tasks.checks``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed

PREFIX = "RELIABLE_TASKS_"


@dataclass(frozen=True)
class SettingSpec:
    """One setting: its default, the types it accepts and what it is for."""

    default: Any
    types: tuple[type, ...]
    help: str
    minimum: float | None = None


SPECS: dict[str, SettingSpec] = {
    "PUBLISH_GRACE": SettingSpec(
        30, (int, float), "Seconds a PENDING row may wait for its after-commit publish "
        "before the sweeper publishes it.", minimum=0),
    "PUBLISH_IN_BACKGROUND": SettingSpec(
        False, (bool,), "True: a commit hands its tasks to a background thread of the process "
        "that publishes them in batches, so the caller pays only for its INSERT. Rows the "
        "thread never gets to (the process was killed) are published by the sweeper after "
        "PUBLISH_GRACE. Needs a server that runs Python threads (uWSGI: --enable-threads)."),
    "PUBLISH_TIMEOUT": SettingSpec(
        2.0, (int, float), "Upper bound in seconds of one publish attempt (connect and "
        "write), so a request never hangs on a down or hung Redis.", minimum=0.05),
    "SWEEP_INTERVAL": SettingSpec(
        10, (int, float), "Seconds between sweeper passes (beat entry).", minimum=1),
    "HEARTBEAT_INTERVAL": SettingSpec(
        5, (int, float), "Seconds between worker heartbeats and lease extensions.", minimum=0.1),
    "LEASE_TIMEOUT": SettingSpec(
        30, (int, float), "Seconds a started task's lease lasts without a heartbeat.", minimum=1),
    "CLAIM_RETRY_TIMEOUT": SettingSpec(
        5, (int, float), "Seconds a worker retries a claim that the database refused (on a "
        "fresh connection each time) before it sends the delivery back to the broker, to run "
        "this many seconds later; the body never runs without its claim.", minimum=0),
    "MAX_ATTEMPTS": SettingSpec(
        3, (int,), "Attempts of a task (first run included) before it is FAILURE.", minimum=1),
    "RETRY_BACKOFF": SettingSpec(
        2, (int, float), "Base delay in seconds of the exponential retry backoff.", minimum=0),
    "RETRY_BACKOFF_MAX": SettingSpec(
        600, (int, float), "Cap in seconds of the retry backoff.", minimum=0),
    "RETENTION": SettingSpec(
        7 * 24 * 3600, (int, float), "Seconds finished rows are kept before pruning.", minimum=0),
    "ENTRY_PREFIX": SettingSpec(
        "reliable_tasks:", (str,), "Prefix of the RedBeat entries and Redis keys this app owns."),
    "QUEUE_AUDIT_AGE": SettingSpec(
        600, (int, float), "QUEUED rows published longer ago than this many seconds are looked "
        "for in the broker (Redis only), at most once per this period; a row whose message is "
        "gone (celery purge, FLUSHDB, an eviction) is published again. 0: never.", minimum=0),
    "SWEEP_BATCH_SIZE": SettingSpec(
        500, (int,), "Rows one sweeper step handles at most.", minimum=1),
    "CELERY_APP": SettingSpec(
        None, (str, type(None)), "Dotted path of the Celery app; default: Celery's current app."),
    "MAX_PAYLOAD_BYTES": SettingSpec(
        256 * 1024, (int,), "Largest JSON size of a task's args plus kwargs.", minimum=1),
    "DELAY_THRESHOLD": SettingSpec(
        300, (int, float), "Tasks delayed further than this many seconds are held in the "
        "database and published by the sweeper when due.", minimum=0),
    "HISTORY_LIMIT": SettingSpec(
        20, (int,), "Attempts kept in a row's history.", minimum=1),
    "MISSED_RUN_GRACE": SettingSpec(
        60, (int, float), "A periodic run later than this many seconds is missed (beat or "
        "Redis was down) and follows its schedule's catch-up policy.", minimum=0),
    "WORKER_SYNCHRONOUS_COMMIT": SettingSpec(
        True, (bool,), "False: on PostgreSQL, workers' ledger writes (claim, outcome, "
        "heartbeat) commit without waiting for the disk (synchronous_commit=off): faster, but "
        "a PostgreSQL crash can lose the last fraction of a second of them."),
    "ADOPT": SettingSpec(
        True, (bool,), "Record tasks sent with plain Celery (no ReliableTask) from signals."),
    "METRICS_TOKEN": SettingSpec(
        None, (str, type(None)), "Bearer token that may read the metrics view besides staff "
        "sessions (Authorization: Bearer <token>); None: staff sessions only."),
}


class ReliableTasksSettings:
    """Typed access to the app's settings, read from Django once and until they change."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        setting_changed.connect(self._forget, dispatch_uid="reliable_tasks.conf")

    def _get(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            value = self._values[name] = getattr(django_settings, PREFIX + name,
                                                 SPECS[name].default)
            return value

    def _forget(self, setting: str, **_: Any) -> None:
        """``setting_changed``: drop the cached values when one of ours changed."""
        if setting.startswith(PREFIX):
            self._values.clear()

    @property
    def PUBLISH_GRACE(self) -> float:
        return float(self._get("PUBLISH_GRACE"))

    @property
    def PUBLISH_IN_BACKGROUND(self) -> bool:
        return bool(self._get("PUBLISH_IN_BACKGROUND"))

    @property
    def PUBLISH_TIMEOUT(self) -> float:
        return float(self._get("PUBLISH_TIMEOUT"))

    @property
    def SWEEP_INTERVAL(self) -> float:
        return float(self._get("SWEEP_INTERVAL"))

    @property
    def HEARTBEAT_INTERVAL(self) -> float:
        return float(self._get("HEARTBEAT_INTERVAL"))

    @property
    def LEASE_TIMEOUT(self) -> float:
        return float(self._get("LEASE_TIMEOUT"))

    @property
    def CLAIM_RETRY_TIMEOUT(self) -> float:
        return float(self._get("CLAIM_RETRY_TIMEOUT"))

    @property
    def MAX_ATTEMPTS(self) -> int:
        return int(self._get("MAX_ATTEMPTS"))

    @property
    def RETRY_BACKOFF(self) -> float:
        return float(self._get("RETRY_BACKOFF"))

    @property
    def RETRY_BACKOFF_MAX(self) -> float:
        return float(self._get("RETRY_BACKOFF_MAX"))

    @property
    def RETENTION(self) -> float:
        return float(self._get("RETENTION"))

    @property
    def ENTRY_PREFIX(self) -> str:
        return str(self._get("ENTRY_PREFIX"))

    @property
    def QUEUE_AUDIT_AGE(self) -> float:
        return float(self._get("QUEUE_AUDIT_AGE"))

    @property
    def SWEEP_BATCH_SIZE(self) -> int:
        return int(self._get("SWEEP_BATCH_SIZE"))

    @property
    def CELERY_APP(self) -> str | None:
        value = self._get("CELERY_APP")
        return str(value) if value else None

    @property
    def MAX_PAYLOAD_BYTES(self) -> int:
        return int(self._get("MAX_PAYLOAD_BYTES"))

    @property
    def DELAY_THRESHOLD(self) -> float:
        return float(self._get("DELAY_THRESHOLD"))

    @property
    def HISTORY_LIMIT(self) -> int:
        return int(self._get("HISTORY_LIMIT"))

    @property
    def MISSED_RUN_GRACE(self) -> float:
        return float(self._get("MISSED_RUN_GRACE"))

    @property
    def WORKER_SYNCHRONOUS_COMMIT(self) -> bool:
        return bool(self._get("WORKER_SYNCHRONOUS_COMMIT"))

    @property
    def ADOPT(self) -> bool:
        return bool(self._get("ADOPT"))

    @property
    def METRICS_TOKEN(self) -> str | None:
        value = self._get("METRICS_TOKEN")
        return str(value) if value else None


app_settings = ReliableTasksSettings()
