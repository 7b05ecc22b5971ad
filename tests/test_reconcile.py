"""``manage.py reconcile_tasks`` against real Redis, a real beat, and many concurrent runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from example_project.celery import app as celery_app
from example_project.devservers import REPO_ROOT
from reliable_tasks import reconcile as reconcile_module
from reliable_tasks import redbeat_store
from reliable_tasks.models import PeriodicSchedule, TaskRecord

pytestmark = pytest.mark.django_db(transaction=True)


def schedules(count: int, seconds: int = 60, prefix: str = "s") -> list[PeriodicSchedule]:
    return [PeriodicSchedule.objects.create(name=f"{prefix}{i}", task="demo.add", args=[i, i],
                                            interval_seconds=seconds) for i in range(count)]


def dump(client) -> dict[str, bytes]:
    """Every key with its serialized value (DUMP), to compare whole states."""
    return {key: client.dump(key) for key in client.keys("*")
            if not key.startswith(b"reliable_tasks:metrics:")}


def reconcile(*args: str) -> dict:
    out = StringIO()
    call_command("reconcile_tasks", "--json", *args, stdout=out)
    return json.loads(out.getvalue())


def test_a_clean_state_needs_nothing_and_writes_nothing(redis_server):
    schedules(5)
    client = redis_server.client(decode_responses=False)
    before = dump(client)

    report = reconcile("--schedules-only")

    assert (report["created"], report["updated"], report["removed"]) == (0, 0, 0)
    assert report["unchanged"] == 5
    after = dump(client)
    assert after == before


def test_drift_is_repaired_and_only_owned_keys_are_touched(redis_server):
    kept, edited, lost = schedules(3)
    client = redis_server.client()
    client.delete(f"redbeat:{redbeat_store.entry_name(lost.pk)}")
    PeriodicSchedule.objects.filter(pk=edited.pk).update(args=[42, 42])  # pushed: now re-drift
    client.hset(f"redbeat:{redbeat_store.entry_name(edited.pk)}", "definition", "{}")
    client.hset("redbeat:reliable_tasks:999", "definition", "{}")  # an owned orphan
    client.hset("redbeat:someone-else", "definition", "{}")  # a foreign entry
    client.sadd("redbeat::statics", "static-entry")
    client.hset("redbeat:static-entry", "definition", "{}")
    client.set("redbeat::lock", "the-beats-token", px=60_000)

    report = reconcile("--schedules-only")

    assert (report["created"], report["updated"], report["removed"]) == (1, 1, 1)
    assert client.exists("redbeat:reliable_tasks:999") == 0
    for foreign in ("redbeat:someone-else", "redbeat:static-entry", "redbeat::statics"):
        assert client.exists(foreign) == 1, foreign
    assert client.get("redbeat::lock") == "the-beats-token"
    entries = redbeat_store.read_entries(
        celery_app, [redbeat_store.entry_name(s.pk) for s in (kept, edited, lost)])
    assert redbeat_store.decode_definition(
        entries[redbeat_store.entry_name(edited.pk)].definition)["args"] == [42, 42]


def test_no_prune_keeps_owned_orphans(redis_server):
    client = redis_server.client()
    client.hset("redbeat:reliable_tasks:999", "definition", "{}")

    report = reconcile("--schedules-only", "--no-prune")

    assert report["removed"] == 0
    assert client.exists("redbeat:reliable_tasks:999") == 1


def test_dry_run_on_a_drifted_state_writes_nothing(redis_server):
    schedule, *_ = schedules(3)
    client = redis_server.client(decode_responses=False)
    client.delete(f"redbeat:{redbeat_store.entry_name(schedule.pk)}")
    client.hset("redbeat:reliable_tasks:999", "definition", "{}")
    before = dump(client)

    out = StringIO()
    call_command("reconcile_tasks", "--dry-run", stdout=out)

    assert dump(client) == before
    assert "1 would be created" in out.getvalue()
    assert "remove reliable_tasks:999" in out.getvalue()


def test_check_exits_non_zero_on_drift_and_zero_when_clean(redis_server):
    schedule = schedules(1)[0]
    call_command("reconcile_tasks", "--check", stdout=StringIO())
    redis_server.client().delete(f"redbeat:{redbeat_store.entry_name(schedule.pk)}")

    with pytest.raises(CommandError, match="drifted") as error:
        call_command("reconcile_tasks", "--check", stdout=StringIO())
    assert error.value.returncode == 1


def hold_reconcile_lock(client) -> None:
    """Stand in for a concurrent repair: the app's reconcile lock, held by someone else."""
    client.set("reliable_tasks:reconcile:lock", "another-run", px=60_000)


def test_a_clean_run_takes_no_lock_and_is_not_held_up_by_a_repair_in_progress(redis_server):
    schedules(3)
    client = redis_server.client()
    hold_reconcile_lock(client)
    started = time.monotonic()

    report = reconcile("--schedules-only", "--wait", "5")

    assert time.monotonic() - started < 5
    assert (report["skipped_busy"], report["unchanged"]) == (False, 3)
    assert client.get("reliable_tasks:reconcile:lock") == "another-run"


def test_a_drifted_run_waits_for_a_repair_in_progress_then_skips(redis_server):
    schedule = schedules(2)[0]
    client = redis_server.client()
    client.delete(f"redbeat:{redbeat_store.entry_name(schedule.pk)}")
    hold_reconcile_lock(client)

    report = reconcile("--wait", "0.5")

    assert report["skipped_busy"] is True
    assert report["sweep"] is None
    assert not client.exists(f"redbeat:{redbeat_store.entry_name(schedule.pk)}")
    client.delete("reliable_tasks:reconcile:lock")
    assert reconcile("--schedules-only")["created"] == 1


def test_a_schedule_pushed_after_the_database_was_read_is_not_overwritten(redis_server):
    schedule = schedules(1)[0]
    name = redbeat_store.entry_name(schedule.pk)
    state = reconcile_module._read_database()
    schedule.args = [7, 7]
    schedule.save()  # its save hook pushes revision 2 while this run holds revision 1
    stored_before = redis_server.client().hget(f"redbeat:{name}", "definition")

    reconcile_module._read_redis(state, progress=lambda message: None)
    plan = reconcile_module._plan(state, prune=True)
    reconcile_module.apply_plan(state, plan, progress=lambda message: None)

    assert (plan.update, plan.unchanged) == ([], 1)
    assert redis_server.client().hget(f"redbeat:{name}", "definition") == stored_before
    assert json.loads(stored_before)["args"] == [7, 7]


def test_an_entry_claiming_a_revision_the_database_never_had_is_repaired(redis_server):
    schedule = schedules(1)[0]
    key = f"redbeat:{redbeat_store.entry_name(schedule.pk)}"
    client = redis_server.client()
    tampered = json.loads(client.hget(key, "definition"))
    tampered["args"] = ["tampered"]
    tampered["options"]["reliable_tasks"]["revision"] = 99
    client.hset(key, "definition", json.dumps(tampered))

    report = reconcile("--schedules-only")

    assert report["updated"] == 1
    assert json.loads(client.hget(key, "definition"))["args"] == [0, 0]


def test_redis_flushed_entirely_is_restored_with_the_right_next_runs(redis_server):
    every_minute = schedules(1, seconds=60, prefix="interval")[0]
    nightly = PeriodicSchedule.objects.create(
        name="nightly", task="demo.add", args=[1, 1], crontab="30 2 * * *",
        timezone="Europe/Berlin")
    last_slot = timezone.now() - timedelta(seconds=20)
    TaskRecord.objects.create(task_name="demo.add", schedule=every_minute,
                              scheduled_for=last_slot, state="SUCCESS")
    client = redis_server.client()
    client.flushall()

    report = reconcile("--schedules-only")

    assert report["created"] == 2
    score = client.zscore("redbeat::schedule",
                          f"redbeat:{redbeat_store.entry_name(every_minute.pk)}")
    assert score == pytest.approx((last_slot + timedelta(seconds=60)).timestamp(), abs=1)
    nightly_due = client.zscore("redbeat::schedule",
                                f"redbeat:{redbeat_store.entry_name(nightly.pk)}")
    expected = redbeat_store.next_due(
        redbeat_store.spec_from_options("demo.add", {"reliable_tasks": {
            "schedule_id": nightly.pk, "crontab": "30 2 * * *",
            "timezone": "Europe/Berlin"}}), timezone.now())
    assert nightly_due == pytest.approx(expected.timestamp(), abs=1)


def test_the_database_unreachable_is_a_clear_error_and_redis_is_untouched(
        redis_server, worker_env, tmp_path):
    schedules(2)
    client = redis_server.client(decode_responses=False)
    client.hset("redbeat:reliable_tasks:999", "definition", "{}")
    before = dump(client)
    env = worker_env(redis_server)
    env["DATABASE_URL"] = f"sqlite:///{tmp_path}/missing/dir/db.sqlite3"

    result = subprocess.run([sys.executable, "manage.py", "reconcile_tasks"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert "The database is unreachable" in result.stderr
    assert dump(client) == before


@pytest.mark.slow
def test_the_incident_reconcile_from_five_processes_while_beat_runs(
        redis_server, worker_env, celery_worker, celery_beat):
    """The seed's incident: a reconcile on every pod start must never disturb beat."""
    beat_schedules = schedules(20, seconds=2, prefix="incident")
    celery_worker(redis_server, concurrency=2)
    beat = celery_beat(redis_server, env={"RELIABLE_TASKS_MISSED_RUN_GRACE": "5"})
    client = redis_server.client()
    deadline = time.monotonic() + 30
    while client.get("redbeat::lock") is None and time.monotonic() < deadline:
        time.sleep(0.2)
    token = client.get("redbeat::lock")
    assert token
    time.sleep(3)
    started = timezone.now()

    env = worker_env(redis_server)
    script = (f"for i in 1 2; do {sys.executable} manage.py reconcile_tasks --wait 5 || exit 1; "
              f"done")
    runs = [subprocess.Popen(["bash", "-c", script], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(5)]
    outputs = [proc.communicate(timeout=180)[0] for proc in runs]
    time.sleep(5)
    ended = timezone.now()

    assert all(proc.returncode == 0 for proc in runs), outputs
    assert client.get("redbeat::lock") == token, "beat's lock changed hands"
    assert "LockNotOwnedError" not in beat.log_text()
    assert "lost RedBeat's lock" not in beat.log_text()
    for schedule in beat_schedules:
        slots = sorted(TaskRecord.objects.filter(
            schedule=schedule, scheduled_for__gte=started, scheduled_for__lte=ended)
            .values_list("scheduled_for", flat=True))
        assert max(Counter(slots).values()) == 1, f"{schedule.name}: a slot ran twice"
        gaps = {(b - a).total_seconds() for a, b in zip(slots, slots[1:], strict=False)}
        assert gaps == {2.0}, f"{schedule.name}: a slot was missed (gaps {gaps})"
