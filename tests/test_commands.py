"""``prune_tasks`` and ``check_tasks_health``: against the real database and real Redis servers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from example_project.celery import app as celery_app
from example_project.devservers import REPO_ROOT
from reliable_tasks import redbeat_store
from reliable_tasks.management.commands import check_tasks_health
from reliable_tasks.management.commands.prune_tasks import parse_duration
from reliable_tasks.models import PeriodicSchedule, TaskRecord, WorkerHeartbeat
from reliable_tasks.states import TaskState

pytestmark = pytest.mark.django_db


def row(state: str, finished_days_ago: float | None = None, **fields: Any) -> TaskRecord:
    finished_at = (timezone.now() - timedelta(days=finished_days_ago)
                   if finished_days_ago is not None else None)
    return TaskRecord.objects.create(task_name="demo.add", state=state,
                                     finished_at=finished_at, **fields)


def run(command: str, *args: str) -> str:
    out = StringIO()
    call_command(command, *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def remaining() -> set[Any]:
    return set(TaskRecord.objects.values_list("pk", flat=True))


# --- prune_tasks -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("90", 90), ("1.5", 1.5), ("45s", 45), ("10m", 600), ("12h", 43200), ("7d", 604800),
    ("2w", 1209600), (" 7D ", 604800), ("0", 0)])
def test_durations_are_seconds_or_a_number_with_a_unit(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-5", "7 days", "1e3", "h", "7y"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_a_dry_run_counts_per_state_and_deletes_nothing():
    for state in (TaskState.SUCCESS, TaskState.SUCCESS, TaskState.FAILURE, TaskState.LOST):
        row(state, finished_days_ago=10)
    row(TaskState.SUCCESS, finished_days_ago=1)
    before = remaining()

    out = run("prune_tasks", "--older-than", "7d", "--dry-run")

    assert remaining() == before
    assert "would delete 4 task records" in out
    assert "SUCCESS: 2, FAILURE: 1, LOST: 1, REVOKED: 0, EXPIRED: 0" in out
    assert "Nothing was deleted" in out


def test_pruning_deletes_only_old_rows_of_the_states_asked_for():
    old_success = row(TaskState.SUCCESS, finished_days_ago=10)
    old_failure = row(TaskState.FAILURE, finished_days_ago=10)
    old_lost = row(TaskState.LOST, finished_days_ago=10)
    recent_success = row(TaskState.SUCCESS, finished_days_ago=1)

    out = run("prune_tasks", "--older-than", "7d", "--state", "success", "--state", "FAILURE")

    assert remaining() == {old_lost.pk, recent_success.pk}
    assert old_success.pk not in remaining() and old_failure.pk not in remaining()
    assert "Deleted 2 task records" in out and "(SUCCESS: 1, FAILURE: 1)" in out


def test_unfinished_rows_are_never_deleted_whatever_their_finished_at():
    # A finished row that was retried by hand is PENDING again, with its old finished_at.
    kept = [row(state, finished_days_ago=30)
            for state in (TaskState.PENDING, TaskState.QUEUED, TaskState.STARTED,
                          TaskState.RETRY)]

    run("prune_tasks", "--older-than", "0")

    assert remaining() == {record.pk for record in kept}


@pytest.mark.parametrize("state", ["STARTED", "pending", "RETRY", "QUEUED"])
def test_asking_for_an_unfinished_state_is_an_error(state):
    with pytest.raises(CommandError, match="never pruned"):
        run("prune_tasks", "--state", state)


@pytest.mark.parametrize("args, message", [
    (["--older-than", "soon"], "not a duration"),
    (["--older-than=-1d"], "not a duration"),
    (["--state", "DONE"], "not a task state"),
    (["--batch-size", "0"], "at least 1"),
])
def test_bad_input_is_a_command_error(args, message):
    row(TaskState.SUCCESS, finished_days_ago=30)

    with pytest.raises(CommandError, match=message):
        run("prune_tasks", *args)
    assert TaskRecord.objects.count() == 1


def test_rows_are_deleted_in_batches_without_ordering():
    for _ in range(5):
        row(TaskState.SUCCESS, finished_days_ago=10)

    with CaptureQueriesContext(connection) as queries:
        out = run("prune_tasks", "--older-than", "7d", "--state", "SUCCESS",
                  "--batch-size", "2", "--verbosity", "2")

    assert TaskRecord.objects.count() == 0
    assert "SUCCESS: deleted 2 so far" in out and "SUCCESS: deleted 5 so far" in out
    deletes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 3  # 2 + 2 + 1
    assert not any("ORDER BY" in q["sql"] for q in queries.captured_queries)


def test_the_default_age_is_the_retention_setting(settings):
    settings.RELIABLE_TASKS_RETENTION = 3 * 86400
    row(TaskState.EXPIRED, finished_days_ago=4)
    recent = row(TaskState.EXPIRED, finished_days_ago=2)

    run("prune_tasks")

    assert remaining() == {recent.pk}


def test_verbosity_zero_prints_nothing():
    row(TaskState.SUCCESS, finished_days_ago=10)

    assert run("prune_tasks", "--older-than", "1d", "--verbosity", "0") == ""
    assert TaskRecord.objects.count() == 0


# --- check_tasks_health ------------------------------------------------------------------------


def probe(*args: str) -> tuple[int, dict[str, Any]]:
    """Run the probe with ``--json``; return its exit status and its report."""
    out = StringIO()
    try:
        call_command("check_tasks_health", "--json", "--timeout", "0.5", *args,
                     stdout=out, stderr=StringIO())
        code = 0
    except CommandError as exc:
        code = exc.returncode
    return code, json.loads(out.getvalue())


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {name: check["status"] for name, check in report["checks"].items()}


def hold_beat_lock(seconds: float = 60) -> None:
    """Stand in for a running beat: its lock key, set the way RedBeat sets it."""
    redbeat_store.client(celery_app).set(redbeat_store.lock_key(celery_app), "token",
                                         px=int(seconds * 1000))


def live_worker(hostname: str = "worker@a") -> WorkerHeartbeat:
    return WorkerHeartbeat.objects.create(hostname=hostname)


@pytest.fixture
def healthy(redis_server):
    """A system the probe finds healthy: Redis up, a beat holding the lock, a live worker."""
    hold_beat_lock()
    live_worker()
    return redis_server


def test_a_healthy_system_exits_0(healthy):
    code, report = probe()

    assert code == 0
    assert report["status"] == "healthy" and report["exit_code"] == 0
    assert set(statuses(report).values()) == {"ok"}
    assert report["checks"]["beat"]["data"]["lock_key"] == redbeat_store.lock_key(celery_app)
    assert 0 < report["checks"]["beat"]["data"]["ttl_seconds"] <= 60
    assert report["checks"]["workers"]["data"] == {"alive": 1, "required": 1}


def test_the_text_report_names_each_check(healthy):
    out = run("check_tasks_health")

    for name in check_tasks_health.CHECKS:
        assert name in out
    assert out.strip().endswith("healthy")


def test_redis_down_is_unhealthy_and_exits_1(healthy):
    healthy.stop()

    code, report = probe()

    assert code == 1
    assert report["status"] == "unhealthy"
    assert statuses(report)["broker"] == "fail" and statuses(report)["beat"] == "fail"
    assert statuses(report)["database"] == "ok"
    assert "unreachable" in report["checks"]["broker"]["detail"]


def test_a_hung_redis_is_unhealthy_within_the_timeouts(healthy):
    healthy.pause(5)
    started = time.monotonic()

    code, report = probe()

    assert code == 1 and statuses(report)["broker"] == "fail"
    assert statuses(report)["beat"] == "fail"
    assert time.monotonic() - started < 3


def test_no_beat_holding_the_lock_is_unhealthy(redis_server):
    live_worker()

    code, report = probe()

    assert code == 1 and statuses(report)["beat"] == "fail"
    assert "no beat holds" in report["checks"]["beat"]["detail"]


def test_schedule_drift_is_degraded(healthy):
    PeriodicSchedule.objects.create(name="drifted", task="demo.add", interval_seconds=60)

    code, report = probe()

    assert code == 1 and report["status"] == "degraded"
    assert statuses(report)["schedules"] == "warn"
    assert report["checks"]["schedules"]["data"] == {"drifted": 1}


def test_runs_overdue_while_a_beat_holds_the_lock_are_degraded(healthy):
    name = redbeat_store.entry_name(7)
    now = timezone.now()
    redbeat_store.advance(celery_app, name, now - timedelta(hours=1), 1,
                          now - timedelta(seconds=30))  # late, but within the grace

    code, report = probe()

    assert code == 0 and report["checks"]["beat"]["data"]["overdue_runs"] == 0
    redbeat_store.advance(celery_app, name, now - timedelta(hours=1), 1,
                          now - timedelta(seconds=120))

    code, report = probe()

    assert code == 1 and report["status"] == "degraded"
    assert statuses(report)["beat"] == "warn"
    beat = report["checks"]["beat"]
    assert beat["data"]["overdue_runs"] == 1 and beat["data"]["oldest_overdue_seconds"] >= 120
    assert beat["detail"].startswith("a beat holds the lock (expires in ")
    assert "but 1 schedule run(s) are overdue, the oldest by 12" in beat["detail"]


def test_no_live_worker_is_unhealthy(redis_server, settings):
    hold_beat_lock()
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = 30
    WorkerHeartbeat.objects.create(hostname="stale",
                                   last_seen_at=timezone.now() - timedelta(minutes=5))

    code, report = probe()

    assert code == 1 and statuses(report)["workers"] == "fail"


def test_min_workers_raises_the_bar(healthy):
    assert probe("--min-workers", "1")[0] == 0
    assert probe("--min-workers", "2")[0] == 1


def test_an_old_pending_task_is_degraded_past_the_threshold(healthy):
    row(TaskState.PENDING, created_at=timezone.now() - timedelta(minutes=20))

    assert probe("--max-pending-age", "1h")[0] == 0
    code, report = probe("--max-pending-age", "10m")
    assert code == 1 and report["status"] == "degraded"
    assert statuses(report)["pending"] == "warn"
    assert report["checks"]["pending"]["data"]["oldest_seconds"] >= 1200


def test_skipped_checks_are_reported_and_not_run(redis_server):
    redis_server.stop()

    code, report = probe("--skip", "broker", "--skip", "beat", "--skip", "workers")

    assert code == 0
    assert statuses(report) == {"database": "ok", "broker": "skipped", "beat": "skipped",
                                "schedules": "ok", "workers": "skipped", "pending": "ok"}


def test_a_database_down_fails_and_its_dependent_checks_are_unknown(healthy, monkeypatch):
    def refuse() -> None:
        raise OperationalError("connection refused")

    monkeypatch.setattr(connection, "cursor", refuse)
    monkeypatch.setattr(check_tasks_health, "live_workers", lambda: pytest.fail("queried"))

    code, report = probe()

    assert code == 1 and statuses(report)["database"] == "fail"
    assert {statuses(report)[name] for name in ("schedules", "workers", "pending")} == {
        "unknown"}
    assert statuses(report)["broker"] == "ok"


def test_a_check_that_cannot_run_while_nothing_failed_exits_2(healthy, monkeypatch):
    def broken() -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(check_tasks_health, "drifted_schedules", broken)

    code, report = probe()

    assert code == 2 and report["status"] == "unknown"
    assert report["checks"]["schedules"] == {
        "status": "unknown", "detail": "could not check: RuntimeError: boom", "data": {}}


@pytest.mark.parametrize("args", [
    ["--skip", "everything"], ["--timeout", "soon"], ["--timeout", "0"],
    ["--max-pending-age", "-1"]])
def test_bad_arguments_exit_2(args):
    with pytest.raises(CommandError) as raised:
        run("check_tasks_health", *args)

    assert raised.value.returncode == 2


def test_a_celery_app_that_does_not_load_exits_2(settings):
    settings.RELIABLE_TASKS_CELERY_APP = "example_project.celery.missing"

    with pytest.raises(CommandError, match="could not be loaded") as raised:
        run("check_tasks_health")

    assert raised.value.returncode == 2


@pytest.mark.django_db(transaction=True)
def test_the_process_exit_status_is_0_then_1_when_redis_stops(redis_server, worker_env):
    hold_beat_lock()
    live_worker()
    command = [sys.executable, "manage.py", "check_tasks_health", "--timeout", "1"]
    env = worker_env(redis_server)

    def exit_status() -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=60, check=False)

    healthy_run = exit_status()
    assert healthy_run.returncode == 0, healthy_run.stdout + healthy_run.stderr
    redis_server.stop()
    unhealthy_run = exit_status()
    assert unhealthy_run.returncode == 1, unhealthy_run.stdout + unhealthy_run.stderr
    assert "unhealthy: broker, beat" in unhealthy_run.stderr


@pytest.mark.django_db(transaction=True)
def test_the_process_exit_status_is_2_when_it_cannot_check(redis_server, worker_env):
    result = subprocess.run(
        [sys.executable, "manage.py", "check_tasks_health", "--skip", "nothing"],
        cwd=REPO_ROOT, env=worker_env(redis_server), capture_output=True, text=True,
        timeout=60, check=False)

    assert result.returncode == 2
    assert "Unknown check(s) to skip: nothing" in result.stderr
