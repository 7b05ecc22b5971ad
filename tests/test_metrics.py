"""Prometheus metrics: values read from the database, durations kept in Redis, the view's access."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db.models import F
from django.test import Client
from django.utils import timezone
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from reliable_tasks.metrics import (
    LedgerCollector,
    observe_reconcile,
    observe_sweep,
    oldest_pending_age,
    registry,
)
from reliable_tasks.models import PeriodicSchedule, TaskRecord, WorkerHeartbeat
from reliable_tasks.reconcile import ReconcileReport, SchedulePlan
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import SweepReport

pytestmark = pytest.mark.django_db

NOW = timezone.now().replace(microsecond=0)
TOKEN = "metrics-token-" + "x" * 32


def row(state: str, task_name: str = "demo.add", **fields: Any) -> TaskRecord:
    return TaskRecord.objects.create(task_name=task_name, state=state, **fields)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def scrape(observations: bool = True) -> CollectorRegistry:
    return registry(LedgerCollector(now=lambda: NOW, observations=observations))


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


# --- values read from the database ------------------------------------------------------------


def test_tasks_are_counted_by_task_name_and_state_with_retries_and_duplicates():
    row(TaskState.SUCCESS, attempts=1, duplicate_deliveries=1)
    row(TaskState.SUCCESS, attempts=3)
    row(TaskState.FAILURE, attempts=3)
    row(TaskState.PENDING, attempts=0)
    row(TaskState.LOST, "demo.record", attempts=1, duplicate_deliveries=2)
    row(TaskState.LOST, "demo.record", attempts=2)

    reg = scrape(observations=False)

    assert value(reg, "reliable_tasks_tasks", task="demo.add", state="SUCCESS") == 2
    assert value(reg, "reliable_tasks_tasks", task="demo.add", state="FAILURE") == 1
    assert value(reg, "reliable_tasks_tasks", task="demo.add", state="PENDING") == 1
    assert value(reg, "reliable_tasks_tasks", task="demo.record", state="LOST") == 2
    assert value(reg, "reliable_tasks_tasks", task="demo.record", state="SUCCESS") is None
    assert value(reg, "reliable_tasks_lost_tasks") == 2
    assert value(reg, "reliable_tasks_task_retries", task="demo.add") == 4  # 0 + 2 + 2 + 0
    assert value(reg, "reliable_tasks_task_retries", task="demo.record") == 1
    assert value(reg, "reliable_tasks_duplicate_deliveries", task="demo.add") == 1
    assert value(reg, "reliable_tasks_duplicate_deliveries", task="demo.record") == 2


def test_an_empty_ledger_still_exports_its_gauges_at_zero():
    reg = scrape(observations=False)

    assert value(reg, "reliable_tasks_lost_tasks") == 0
    assert value(reg, "reliable_tasks_oldest_pending_age_seconds") == 0
    assert value(reg, "reliable_tasks_schedules_drifted") == 0
    assert value(reg, "reliable_tasks_workers_alive") == 0


def test_the_oldest_pending_age_counts_from_creation_or_from_a_held_eta():
    row(TaskState.PENDING, created_at=ago(100))
    row(TaskState.PENDING, created_at=ago(3600), eta=NOW + timedelta(hours=1))  # still held
    row(TaskState.PENDING, created_at=ago(3600), eta=ago(50))  # held; due for 50 s
    row(TaskState.QUEUED, created_at=ago(7200))

    assert oldest_pending_age(NOW) == 100
    assert value(scrape(observations=False), "reliable_tasks_oldest_pending_age_seconds") == 100


def test_a_held_task_past_its_eta_counts_from_its_eta():
    row(TaskState.PENDING, created_at=ago(3600), eta=ago(50))

    assert oldest_pending_age(NOW) == 50


def test_schedule_drift_counts_revisions_redbeat_has_not_seen():
    for name in ("a", "b", "c"):
        PeriodicSchedule.objects.create(name=name, task="demo.add", interval_seconds=60,
                                        enabled=name != "c")
    PeriodicSchedule.objects.filter(name="a").update(synced_revision=F("revision"))

    reg = scrape(observations=False)

    assert value(reg, "reliable_tasks_schedules_drifted") == 2
    assert value(reg, "reliable_tasks_schedules", enabled="true") == 2
    assert value(reg, "reliable_tasks_schedules", enabled="false") == 1


def test_live_workers_are_those_with_a_fresh_heartbeat(settings):
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = 30
    WorkerHeartbeat.objects.create(hostname="fresh", last_seen_at=ago(5))
    WorkerHeartbeat.objects.create(hostname="stale", last_seen_at=ago(60))
    WorkerHeartbeat.objects.create(hostname="stopped", last_seen_at=ago(1), stopped_at=ago(1))

    assert value(scrape(observations=False), "reliable_tasks_workers_alive") == 1


def test_a_scrape_takes_a_bounded_number_of_queries(django_assert_max_num_queries):
    for index in range(20):
        row(TaskState.SUCCESS, f"demo.task{index % 4}")
        row(TaskState.PENDING, f"demo.task{index % 4}", created_at=ago(index))

    # The grouped counts, the two groupings of limit keys, the oldest pending row,
    # schedules, workers.
    with django_assert_max_num_queries(6):
        scrape(observations=False)


# --- durations kept in the broker's Redis -----------------------------------------------------


def test_sweeper_passes_add_up_across_processes(shared_redis):
    observe_sweep(SweepReport(published=3, pruned=2, broker_changed=True, seconds=0.5))
    observe_sweep(SweepReport(published=1, expired_leases_lost=1, seconds=0.25))

    reg = scrape()

    assert value(reg, "reliable_tasks_metrics_store_up") == 1
    assert value(reg, "reliable_tasks_sweep_duration_seconds_count") == 2
    assert value(reg, "reliable_tasks_sweep_duration_seconds_sum") == 0.75
    assert value(reg, "reliable_tasks_sweep_last_duration_seconds") == 0.25
    assert value(reg, "reliable_tasks_sweep_last_run_timestamp_seconds") > NOW.timestamp() - 60
    assert value(reg, "reliable_tasks_sweep_rows_total", step="published") == 4
    assert value(reg, "reliable_tasks_sweep_rows_total", step="pruned") == 2
    assert value(reg, "reliable_tasks_sweep_rows_total", step="expired_leases_lost") == 1
    assert value(reg, "reliable_tasks_sweep_events_total", event="broker_changed") == 1
    key = "reliable_tasks:metrics:sweep"
    assert 0 < shared_redis.client().ttl(key) <= 30 * 24 * 3600


def test_reconcile_durations_and_drift_come_from_real_runs(shared_redis):
    plan = SchedulePlan(create=["reliable_tasks:1"], update=["reliable_tasks:2"])
    observe_reconcile(ReconcileReport(dry_run=False, created=4, updated=1, plan=plan,
                                      seconds=0.5))
    observe_reconcile(ReconcileReport(dry_run=False, removed=2, plan=SchedulePlan(),
                                      seconds=0.25))
    observe_reconcile(ReconcileReport(dry_run=False, seconds=0.25))  # --ledger-only: no plan

    reg = scrape()

    assert value(reg, "reliable_tasks_reconcile_duration_seconds_count") == 3
    assert value(reg, "reliable_tasks_reconcile_duration_seconds_sum") == 1.0
    assert value(reg, "reliable_tasks_reconcile_last_duration_seconds") == 0.25
    assert value(reg, "reliable_tasks_reconcile_last_drift", action="create") == 0
    assert value(reg, "reliable_tasks_reconcile_last_drift", action="update") == 0
    assert value(reg, "reliable_tasks_reconcile_last_drift", action="remove") == 2


def test_dry_and_skipped_reconciliations_write_nothing(shared_redis):
    observe_reconcile(ReconcileReport(dry_run=True, created=4, plan=SchedulePlan(),
                                      seconds=9.0))
    observe_reconcile(ReconcileReport(dry_run=False, skipped_busy=True, seconds=30.0))

    assert shared_redis.client().keys("*") == []
    assert value(scrape(), "reliable_tasks_reconcile_duration_seconds_count") == 0


def test_nothing_observed_yet_exports_empty_summaries(shared_redis):
    reg = scrape()

    assert value(reg, "reliable_tasks_sweep_duration_seconds_count") == 0
    assert value(reg, "reliable_tasks_sweep_last_duration_seconds") is None
    assert value(reg, "reliable_tasks_reconcile_last_drift", action="create") is None


def test_without_redis_recording_is_dropped_and_the_scrape_goes_on(settings, caplog):
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 0.5  # the suite's default Redis port refuses
    row(TaskState.LOST)

    observe_sweep(SweepReport(seconds=1.0))  # logged, never raised
    reg = scrape()

    assert "could not record metrics" in caplog.text
    assert value(reg, "reliable_tasks_metrics_store_up") == 0
    assert value(reg, "reliable_tasks_lost_tasks") == 1
    assert value(reg, "reliable_tasks_sweep_duration_seconds_count") is None


def test_a_hung_redis_delays_a_recording_by_the_timeout_at_most(redis_server, settings):
    # redis_server before settings: the overrides must be undone in the reverse order.
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 0.3
    redis_server.pause(3)
    started = timezone.now()

    observe_sweep(SweepReport(seconds=1.0))

    assert (timezone.now() - started).total_seconds() < 2


# --- the view ---------------------------------------------------------------------------------


@pytest.fixture
def metrics_client(settings) -> Client:
    settings.ROOT_URLCONF = "reliable_tasks.urls"
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 0.5
    return Client()


def user(username: str, *, is_staff: bool, is_active: bool = True) -> User:
    return User.objects.create_user(username, password="pw", is_staff=is_staff,
                                    is_active=is_active)


def test_anonymous_requests_are_forbidden(metrics_client):
    response = metrics_client.get("/metrics")

    assert response.status_code == 403
    assert b"reliable_tasks_" not in response.content


def test_a_staff_session_reads_the_metrics(metrics_client):
    row(TaskState.FAILURE, "demo.always_fails")
    metrics_client.force_login(user("ops", is_staff=True))

    response = metrics_client.get("/metrics")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "no-cache" in response["Cache-Control"]
    families = {family.name: family
                for family in text_string_to_metric_families(response.content.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for s in families["reliable_tasks_tasks"].samples}
    assert samples[("reliable_tasks_tasks",
                    (("state", "FAILURE"), ("task", "demo.always_fails")))] == 1


@pytest.mark.parametrize("username, is_staff, is_active", [
    ("customer", False, True), ("former_staff", True, False)])
def test_a_user_who_is_not_active_staff_is_forbidden(metrics_client, username, is_staff,
                                                      is_active):
    metrics_client.force_login(user(username, is_staff=is_staff, is_active=is_active))

    assert metrics_client.get("/metrics").status_code == 403


def test_the_configured_bearer_token_reads_the_metrics(metrics_client, settings):
    settings.RELIABLE_TASKS_METRICS_TOKEN = TOKEN

    response = metrics_client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 200
    assert b"reliable_tasks_lost_tasks 0.0" in response.content


@pytest.mark.parametrize("header", [
    f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", f"{TOKEN}", "Bearer ", ""])
def test_a_wrong_token_or_scheme_is_forbidden(metrics_client, settings, header):
    settings.RELIABLE_TASKS_METRICS_TOKEN = TOKEN

    assert metrics_client.get("/metrics", headers={"Authorization": header}).status_code == 403


def test_without_a_configured_token_no_token_is_accepted(metrics_client):
    response = metrics_client.get("/metrics", headers={"Authorization": "Bearer None"})

    assert response.status_code == 403


def test_openmetrics_is_served_when_asked_for(metrics_client, settings):
    settings.RELIABLE_TASKS_METRICS_TOKEN = TOKEN

    response = metrics_client.get("/metrics", headers={
        "Authorization": f"Bearer {TOKEN}", "Accept": "application/openmetrics-text"})

    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.endswith(b"# EOF\n")


def test_the_view_only_answers_get_and_head(metrics_client, settings):
    settings.RELIABLE_TASKS_METRICS_TOKEN = TOKEN
    auth = {"Authorization": f"Bearer {TOKEN}"}

    assert metrics_client.head("/metrics", headers=auth).status_code == 200
    assert metrics_client.post("/metrics", headers=auth).status_code == 405
