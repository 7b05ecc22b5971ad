"""Messages the broker lost: a restart or failover (new run id), resumed across passes; one
epoch per broker; and a purge, ``FLUSHDB`` or eviction (same run id) found by looking up old
QUEUED rows in the broker's queues."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from example_project.celery import app as celery_app
from example_project.devservers import RedisServer, celery_app_using
from reliable_tasks import dispatch
from reliable_tasks.models import BrokerEpoch, TaskRecord
from reliable_tasks.publisher import close_publisher
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep

pytestmark = pytest.mark.django_db(transaction=True)

AUDIT_AGE = 600


def states(records: list[TaskRecord]) -> list[str]:
    by_id = dict(TaskRecord.objects.filter(id__in=[r.id for r in records])
                 .values_list("id", "state"))
    return [by_id[r.id] for r in records]


def test_the_requeue_after_a_broker_restart_resumes_on_later_passes(redis_server):
    """Issue 16, item 2: the change is committed first; a pass that ran out of time (or a
    sweeper that died) right after it left the rest QUEUED with no message, for ever."""
    queued = [dispatch("demo.record", (f"q{i}",)) for i in range(30)]
    sweep()  # the first look at this broker
    redis_server.restart()

    interrupted = sweep(time_budget=0)  # notices the change, requeues nothing

    assert interrupted.broker_changed and interrupted.requeued_after_broker_loss == 0
    assert BrokerEpoch.objects.get().requeue_before is not None
    published_after = dispatch("demo.record", ("after the change",))

    resumed = sweep()

    assert not resumed.broker_changed
    assert resumed.requeued_after_broker_loss == 30, "published after the change: not requeued"
    assert set(states([*queued, published_after])) == {TaskState.QUEUED}
    assert redis_server.client().llen("celery") == 31
    assert BrokerEpoch.objects.get().requeue_before is None, "done: the cutoff is forgotten"
    assert sweep().requeued_after_broker_loss == 0


def test_the_requeue_goes_batch_by_batch_and_leaves_claimed_rows_alone(redis_server,
                                                                     settings):
    settings.RELIABLE_TASKS_SWEEP_BATCH_SIZE = 4
    queued = [dispatch("demo.record", (f"q{i}",)) for i in range(10)]
    sweep()
    started = queued[0]
    TaskRecord.objects.filter(pk=started.pk).update(state=TaskState.STARTED, attempts=1)
    redis_server.restart()

    assert sweep().requeued_after_broker_loss == 9

    assert states(queued) == [TaskState.STARTED] + [TaskState.QUEUED] * 9


@contextmanager
def broker(server: RedisServer) -> Iterator[None]:
    """The Celery app's broker pointed at ``server`` for the block."""
    close_publisher()
    with celery_app_using(celery_app, {"broker_url": server.url}):
        try:
            yield
        finally:
            close_publisher()


def test_two_apps_on_two_brokers_sharing_a_ledger_each_keep_their_own_epoch(
        redis_server, tmp_path: Path):
    """Issue 16, item 6: with one global epoch, every pass of either app saw a "new" broker
    and re-published every QUEUED row."""
    with RedisServer(data_dir=tmp_path / "other") as other:
        dispatch("demo.record", ("on the first broker",))
        with broker(other):
            dispatch("demo.record", ("on the other broker",))
        for _ in range(3):
            first = sweep()
            with broker(other):
                second = sweep()
            epochs = list(BrokerEpoch.objects.values_list("name", "run_id"))
            assert not first.broker_changed and not second.broker_changed, (
                f"epochs {epochs}; servers {redis_server.run_id()} and {other.run_id()}")
            assert first.requeued_after_broker_loss == second.requeued_after_broker_loss == 0
        assert BrokerEpoch.objects.count() == 2
        assert other.client().llen("celery") == 1
    assert redis_server.client().llen("celery") == 1


def test_messages_purged_from_the_queue_are_found_and_published_again(redis_server,
                                                                      settings):
    """Issue 16, item 6: a purge (or FLUSHDB, or an eviction) keeps the run id; QUEUED rows
    whose message is gone were never recovered."""
    settings.RELIABLE_TASKS_QUEUE_AUDIT_AGE = AUDIT_AGE
    purged = [dispatch("demo.record", (f"purged {i}",)) for i in range(5)]
    sweep()
    redis_server.client().delete("celery")  # what `celery purge` does to a Redis queue
    kept = [dispatch("demo.record", (f"kept {i}",)) for i in range(3)]
    later = timezone.now() + timedelta(seconds=AUDIT_AGE + 1)

    assert sweep().requeued_missing_messages == 0, "too young to be looked up"
    report = sweep(now=later)

    assert report.requeued_missing_messages == 5
    assert report.published == 5
    assert redis_server.client().llen("celery") == 8, "each purged task once more, no other"
    assert set(states(purged + kept)) == {TaskState.QUEUED}
    redis_server.client().flushdb()
    assert sweep(now=later + timedelta(seconds=1)).requeued_missing_messages == 0, (
        "at most one look per QUEUE_AUDIT_AGE")
    report = sweep(now=later + timedelta(seconds=2 * AUDIT_AGE + 2))
    assert report.requeued_missing_messages == 8, "after FLUSHDB: all eight"


def _deliver_to_a_worker(server: RedisServer) -> str:
    """Move the oldest message from the queue to kombu's unacked hash, as a worker's
    prefetch does; return its task id."""
    client = server.client()
    raw = client.rpop("celery")
    message = json.loads(raw)
    client.hset("unacked", "tag-1", json.dumps([message, "", "celery"]))
    client.zadd("unacked_index", {"tag-1": timezone.now().timestamp()})
    return str(message["headers"]["id"])


def test_messages_held_by_a_worker_or_in_a_priority_queue_count_as_present(redis_server,
                                                                          settings):
    settings.RELIABLE_TASKS_QUEUE_AUDIT_AGE = AUDIT_AGE
    prefetched = dispatch("demo.record", ("prefetched",))
    urgent = dispatch("demo.record", ("urgent",), priority=9)
    assert _deliver_to_a_worker(redis_server) == str(prefetched.id)

    report = sweep(now=timezone.now() + timedelta(seconds=AUDIT_AGE + 1))

    assert report.requeued_missing_messages == 0
    assert states([prefetched, urgent]) == [TaskState.QUEUED, TaskState.QUEUED]


def test_no_audit_when_it_is_off_or_the_broker_is_down(redis_server, settings):
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 0.5
    settings.RELIABLE_TASKS_QUEUE_AUDIT_AGE = 0
    record = dispatch("demo.record", ("gone",))
    redis_server.client().delete("celery")
    later = timezone.now() + timedelta(hours=1)
    assert sweep(now=later).requeued_missing_messages == 0

    settings.RELIABLE_TASKS_QUEUE_AUDIT_AGE = AUDIT_AGE
    redis_server.stop()
    assert sweep(now=later).requeued_missing_messages == 0
    assert states([record]) == [TaskState.QUEUED]


def test_a_broker_is_named_by_its_host_or_sentinel_master_and_never_its_password():
    from reliable_tasks.broker_epoch import broker_name
    from reliable_tasks.sentinel import celery_settings

    plain = {"broker_url": "redis://:s3cret@10.0.0.5:6380/2",
             "broker_transport_options": {"master_name": "left over"}}
    with celery_app_using(celery_app, plain):
        assert broker_name(celery_app) == "broker:redis://10.0.0.5:6380/2"
    sentinel = celery_settings([("10.0.0.7", 26379), ("10.0.0.8", 26379)], "orders", db=3,
                               password="s3cret")
    with celery_app_using(celery_app, sentinel):
        assert broker_name(celery_app) == "broker:sentinel:orders/3"
