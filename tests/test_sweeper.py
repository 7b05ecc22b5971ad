"""The sweeper's passes against a real Redis and database (a worker only where it runs one)."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from example_project.devservers import REPO_ROOT
from reliable_tasks import dispatch
from reliable_tasks.heartbeat import beat, mark_stopped
from reliable_tasks.models import BrokerEpoch, TaskRecord, WorkerHeartbeat
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep

pytestmark = pytest.mark.django_db(transaction=True)


def row(state: str, task_name: str = "demo.record", **fields) -> TaskRecord:
    return TaskRecord.objects.create(task_name=task_name, state=state, **fields)


def test_expired_leases_become_retry_or_lost_by_the_tasks_retry_on_lost(redis_server):
    past = timezone.now() - timedelta(seconds=5)
    resumable = row(TaskState.STARTED, "demo.resumable_record", lease_expires_at=past)
    not_resumable = row(TaskState.STARTED, "demo.record", lease_expires_at=past)
    alive = row(TaskState.STARTED, "demo.record",
                lease_expires_at=timezone.now() + timedelta(seconds=60))

    report = sweep()

    assert (report.expired_leases_retried, report.expired_leases_lost) == (1, 1)
    assert TaskRecord.objects.get(pk=resumable.pk).state == TaskState.QUEUED  # re-published
    lost = TaskRecord.objects.get(pk=not_resumable.pk)
    assert lost.state == TaskState.LOST and lost.error_type == "reliable_tasks.WorkerLost"
    assert TaskRecord.objects.get(pk=alive.pk).state == TaskState.STARTED
    assert redis_server.client().llen("celery") == 1


def test_due_retries_are_published_and_future_ones_wait(redis_server):
    due = row(TaskState.RETRY, next_attempt_at=timezone.now() - timedelta(seconds=1),
              args=["due"])
    later = row(TaskState.RETRY, next_attempt_at=timezone.now() + timedelta(minutes=5))

    assert sweep().published == 1

    assert TaskRecord.objects.get(pk=due.pk).state == TaskState.QUEUED
    assert TaskRecord.objects.get(pk=later.pk).state == TaskState.RETRY


def test_a_broker_restarted_empty_makes_queued_tasks_publish_again(redis_server):
    queued = [dispatch("demo.record", (f"q{i}",)) for i in range(20)]
    assert redis_server.client().llen("celery") == 20
    first = sweep()
    assert not first.broker_changed
    old_run_id = BrokerEpoch.objects.get().run_id

    redis_server.restart()
    assert redis_server.client().llen("celery") == 0
    report = sweep()

    assert report.broker_changed
    assert report.requeued_after_broker_loss == 20
    assert report.published == 20
    assert redis_server.client().llen("celery") == 20
    assert BrokerEpoch.objects.get().run_id != old_run_id
    assert set(TaskRecord.objects.filter(id__in=[r.id for r in queued])
               .values_list("state", flat=True)) == {TaskState.QUEUED}
    assert not sweep().broker_changed, "a change is acted on once"


def test_a_sweep_with_redis_down_fails_nothing_and_loses_nothing(redis_server, settings):
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 0.5
    pending = row(TaskState.PENDING, next_attempt_at=timezone.now() - timedelta(seconds=1))
    redis_server.stop()

    report = sweep()

    assert (report.published, report.publish_failed) == (0, 1)
    assert TaskRecord.objects.get(pk=pending.pk).state == TaskState.PENDING
    redis_server.start()
    TaskRecord.objects.filter(pk=pending.pk).update(next_attempt_at=timezone.now())
    assert sweep().published == 1


def test_finished_rows_past_retention_are_pruned_in_batches(redis_server, settings):
    settings.RELIABLE_TASKS_RETENTION = 3600
    settings.RELIABLE_TASKS_SWEEP_BATCH_SIZE = 7
    old = timezone.now() - timedelta(hours=2)
    for _ in range(20):
        row(TaskState.SUCCESS, finished_at=old)
    kept_recent = row(TaskState.SUCCESS, finished_at=timezone.now())
    kept_unfinished = row(TaskState.RETRY, next_attempt_at=timezone.now() + timedelta(hours=1))

    assert sweep().pruned == 20

    assert set(TaskRecord.objects.values_list("id", flat=True)) == {
        kept_recent.id, kept_unfinished.id}


def test_a_task_held_for_two_hours_is_published_when_due(redis_server):
    held = dispatch("demo.record", ("held",), countdown=7200)
    assert redis_server.client().llen("celery") == 0
    assert sweep().published == 0

    report = sweep(now=timezone.now() + timedelta(hours=2, seconds=1))

    assert report.published == 1
    assert redis_server.client().llen("celery") == 1
    assert TaskRecord.objects.get(pk=held.pk).state == TaskState.QUEUED


def test_three_sweepers_at_once_publish_every_due_row_exactly_once(redis_server, worker_env):
    due_at = timezone.now() - timedelta(seconds=1)
    TaskRecord.objects.bulk_create(
        [TaskRecord(task_name="demo.noop", state=TaskState.PENDING, next_attempt_at=due_at)
         for _ in range(10_000)], batch_size=2000)
    env = worker_env(redis_server, RELIABLE_TASKS_SWEEP_BATCH_SIZE="500")
    code = ("import django; django.setup(); from reliable_tasks.sweeper import sweep; "
            "print(sweep(time_budget=120).published)")

    sweepers = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                                 stdout=subprocess.PIPE, text=True) for _ in range(3)]
    published = [int(proc.communicate(timeout=180)[0].strip().splitlines()[-1])
                 for proc in sweepers]

    assert sum(published) == 10_000
    assert redis_server.client().llen("celery") == 10_000
    assert TaskRecord.objects.filter(state=TaskState.QUEUED).count() == 10_000
    assert set(TaskRecord.objects.values_list("publish_attempts", flat=True)) == {1}


def test_heartbeats_extend_only_the_leases_of_tasks_still_running_there(settings):
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = 60
    soon = timezone.now() + timedelta(seconds=1)
    running = row(TaskState.STARTED, worker="w1@h", lease_expires_at=soon)
    died_in_pool = row(TaskState.STARTED, worker="w1@h", lease_expires_at=soon)
    elsewhere = row(TaskState.STARTED, worker="w2@h", lease_expires_at=soon)

    extended = beat("w1@h", [str(running.id), str(elsewhere.id)])

    assert extended == 1
    assert TaskRecord.objects.get(pk=running.pk).lease_expires_at > soon + timedelta(seconds=30)
    assert TaskRecord.objects.get(pk=died_in_pool.pk).lease_expires_at == soon
    assert TaskRecord.objects.get(pk=elsewhere.pk).lease_expires_at == soon
    heartbeat = WorkerHeartbeat.objects.get(hostname="w1@h")
    assert heartbeat.running == 2 and heartbeat.is_alive()

    mark_stopped("w1@h")
    assert not WorkerHeartbeat.objects.get(hostname="w1@h").is_alive()


def test_the_sweeper_s_own_task_is_never_recorded_in_the_ledger(redis_server, celery_worker):
    from reliable_tasks.tasks import sweep_task

    celery_worker(redis_server)
    result = sweep_task.delay()
    deadline = time.monotonic() + 30
    while redis_server.client().llen("celery") or redis_server.client().hlen("unacked"):
        assert time.monotonic() < deadline, "the sweep task did not run"
        time.sleep(0.1)

    assert not TaskRecord.objects.filter(pk=result.id).exists()


def test_an_adopted_row_whose_lease_expired_is_lost_even_for_a_task_that_may_rerun(
        redis_server):
    past = timezone.now() - timedelta(seconds=5)
    adopted = row(TaskState.STARTED, "demo.resumable_record", lease_expires_at=past, adopted=True)

    report = sweep()

    assert (report.expired_leases_retried, report.expired_leases_lost) == (0, 1)
    assert TaskRecord.objects.get(pk=adopted.pk).state == TaskState.LOST


def test_a_task_that_may_rerun_is_lost_when_its_worker_died_on_its_last_attempt(redis_server):
    past = timezone.now() - timedelta(seconds=5)
    last_try = row(TaskState.STARTED, "demo.resumable_record", lease_expires_at=past,
                   attempts=2, max_attempts=2)
    tries_left = row(TaskState.STARTED, "demo.resumable_record", lease_expires_at=past,
                     attempts=1, max_attempts=2)

    report = sweep()

    assert (report.expired_leases_retried, report.expired_leases_lost) == (1, 1)
    lost = TaskRecord.objects.get(pk=last_try.pk)
    assert lost.state == TaskState.LOST and "last allowed attempt" in lost.error_message
    assert TaskRecord.objects.get(pk=tries_left.pk).state == TaskState.QUEUED  # re-published
