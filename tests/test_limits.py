"""Concurrency and rate limits, enforced by the ledger at the claim (``reliable_tasks.limits``).

The claims here are the workers' own (``ledger.claim``) against the test database, several
"workers" told apart by name; ``tests/test_limits_workers.py`` runs real workers.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from example_project.celery import app as celery_app
from example_project.demo.tasks import add
from reliable_tasks import ReliableTask, dispatch, ledger, limits
from reliable_tasks.exceptions import DispatchError, DuplicateTask
from reliable_tasks.models import TaskLimiter, TaskRecord, WaitReason
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep


@celery_app.task(base=ReliableTask, name="tests.limits.export", concurrency_limit=2,
                 concurrency_key=lambda args, kwargs: f"export:{args[0]}")
def export(customer: int) -> int:
    """At most two exports of one customer at once."""
    return customer


@celery_app.task(base=ReliableTask, name="tests.limits.call_api", global_rate_limit="3/s")
def call_api() -> None:
    """At most three calls a second, keyed by the task's name."""


def claim(row: TaskRecord, worker: str = "w1") -> ledger.Claim:
    return ledger.claim(str(row.pk), task_name=row.task_name, worker=worker,
                        rerun_after_lost=False, limited=True)


def state(row: TaskRecord) -> tuple[str, str]:
    row.refresh_from_db()
    return row.state, row.waiting_for


def finish(row: TaskRecord, claimed: ledger.Claim) -> None:
    assert ledger.record_success(str(row.pk), claimed)


# --- the options of a call ------------------------------------------------------------------


@pytest.mark.django_db
def test_a_call_s_limits_are_stored_on_its_row():
    row = dispatch(add, (1, 2), concurrency_key="k", concurrency_limit=3, rate_limit="10/m",
                   rate_key="api")
    row.refresh_from_db()
    assert (row.concurrency_key, row.concurrency_limit, row.rate_key, row.rate_limit) == (
        "k", 3, "api", "10/m")
    assert "concurrency_key" not in row.options and "rate_limit" not in row.options


@pytest.mark.django_db
def test_a_limit_without_a_key_limits_the_task_by_its_name():
    row = dispatch(add, (1, 2), concurrency_limit=1, rate_limit="5/s")
    assert (row.concurrency_key, row.rate_key) == ("demo.add", "demo.add")


@pytest.mark.django_db
def test_the_task_s_limits_apply_and_a_call_s_options_win():
    row = export.delay(7)
    record = TaskRecord.objects.get(pk=row.id)
    assert (record.concurrency_key, record.concurrency_limit) == ("export:7", 2)
    api = TaskRecord.objects.get(pk=call_api.delay().id)
    assert (api.rate_key, api.rate_limit) == ("tests.limits.call_api", "3/s")
    other = dispatch(export, (7,), concurrency_limit=5, concurrency_key="all-exports")
    assert (other.concurrency_key, other.concurrency_limit) == ("all-exports", 5)


@pytest.mark.django_db
@pytest.mark.parametrize(("options", "message"), [
    ({"concurrency_limit": 0}, "concurrency_limit must be a positive integer"),
    ({"concurrency_limit": "3"}, "concurrency_limit must be a positive integer"),
    ({"concurrency_limit": True}, "concurrency_limit must be a positive integer"),
    ({"concurrency_key": "k"}, "needs a concurrency_limit"),
    ({"concurrency_key": "", "concurrency_limit": 1}, "non-empty string"),
    ({"concurrency_key": "k" * 256, "concurrency_limit": 1}, "256 characters long"),
    ({"rate_limit": "10"}, "rate_limit must be a count per period"),
    ({"rate_limit": "0/s"}, "rate_limit must be a count per period"),
    ({"rate_limit": "10/y"}, "rate_limit must be a count per period"),
    ({"rate_limit": 10}, "rate_limit must be a count per period"),
    ({"rate_key": "api"}, "needs a rate_limit"),
])
def test_a_limit_the_ledger_cannot_enforce_is_refused_and_nothing_is_recorded(options, message):
    with pytest.raises(DispatchError, match=message):
        dispatch(add, (1, 2), **options)
    assert not TaskRecord.objects.exists()


@pytest.mark.parametrize(("text", "count", "period"), [
    ("10/s", 10, 1.0), ("100/m", 100, 60.0), ("5/h", 5, 3600.0), ("1/d", 1, 86400.0),
    ("20/30s", 20, 30.0), (" 3 / m ", 3, 60.0),
])
def test_rates_read_as_a_count_per_period(text, count, period):
    assert limits.parse_rate(text) == limits.Rate(count, period)


@pytest.mark.django_db(transaction=True)
def test_the_message_of_a_row_with_limits_says_so_and_keeps_the_caller_s_headers(redis_server):
    dispatch(add, (1, 2), concurrency_limit=2, headers={"tenant": "acme"})
    dispatch(add, (1, 2), rate_limit="1/s")
    dispatch(add, (1, 2))
    messages = [json.loads(raw) for raw in redis_server.client().lrange("celery", 0, -1)]
    flags = sorted(str(message["headers"].get("reliable_limited")) for message in messages)
    assert flags == ["None", "True", "True"]
    assert [m["headers"]["tenant"] for m in messages if "tenant" in m["headers"]] == ["acme"]


# --- concurrency ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_claim_admits_up_to_the_limit_and_defers_the_rest():
    rows = [dispatch(add, (i, i), concurrency_key="k", concurrency_limit=2) for i in range(4)]
    claims = [claim(row, f"w{i}") for i, row in enumerate(rows)]
    assert [c.won for c in claims] == [True, True, False, False]
    assert claims[2].waiting_for == WaitReason.CONCURRENCY
    assert "over the concurrency limit of 'k'" in claims[2].reason
    assert [state(row) for row in rows] == [
        (TaskState.STARTED, ""), (TaskState.STARTED, ""),
        (TaskState.WAITING, WaitReason.CONCURRENCY), (TaskState.WAITING, WaitReason.CONCURRENCY)]
    waiting = TaskRecord.objects.get(pk=rows[2].pk)
    assert (waiting.deferrals, waiting.duplicate_deliveries, waiting.next_attempt_at) == (
        1, 0, None)


@pytest.mark.django_db
def test_keys_differing_only_in_case_or_trailing_spaces_are_limited_apart():
    keys = ["report", "Report", "report "]
    rows = [dispatch(add, (1, 1), concurrency_key=key, concurrency_limit=1, rate_key=key,
                     rate_limit="1/m") for key in keys]

    assert [claim(row, f"w{index}").won for index, row in enumerate(rows)] == [True] * 3
    assert sorted(TaskLimiter.objects.filter(key__startswith="r:").values_list(
        "key", flat=True)) == sorted(f"r:{key}" for key in keys)  # a bucket each


@pytest.mark.django_db
def test_keys_are_limited_apart():
    first = dispatch(add, (1, 1), concurrency_key="a", concurrency_limit=1)
    second = dispatch(add, (1, 1), concurrency_key="b", concurrency_limit=1)
    unlimited = dispatch(add, (1, 1))
    assert claim(first).won and claim(second).won
    assert ledger.claim(str(unlimited.pk), task_name="demo.add", worker="w",
                        rerun_after_lost=False).won


@pytest.mark.django_db
def test_a_finished_run_wakes_the_oldest_waiters_that_fit_the_free_slots():
    rows = [dispatch(add, (i, i), concurrency_key="k", concurrency_limit=2) for i in range(5)]
    claims = [claim(row, f"w{i}") for i, row in enumerate(rows)]
    finish(rows[0], claims[0])
    woken = limits.wake("k")
    assert [row.pk for row in woken] == [rows[2].pk]
    assert state(rows[2]) == (TaskState.PENDING, WaitReason.CONCURRENCY)
    assert limits.wake("k") == []  # the woken row holds the free slot until it starts
    assert state(rows[3])[0] == TaskState.WAITING


@pytest.mark.django_db
def test_waiters_start_in_dispatch_order_ahead_of_newer_deliveries():
    rows = [dispatch(add, (i, i), concurrency_key="k", concurrency_limit=1) for i in range(3)]
    first = claim(rows[0])
    assert not claim(rows[1]).won and not claim(rows[2]).won
    finish(rows[0], first)
    newcomer = dispatch(add, (9, 9), concurrency_key="k", concurrency_limit=1)
    assert [row.pk for row in limits.wake("k")] == [rows[1].pk]
    # A newer delivery, and an older waiter's stray copy, wait behind the woken row.
    assert claim(newcomer, "w9").waiting_for == WaitReason.CONCURRENCY
    assert claim(rows[2], "w2").waiting_for == WaitReason.CONCURRENCY
    assert claim(rows[1], "w1").won


@pytest.mark.django_db
def test_a_waiting_row_keeps_its_unique_key():
    rows = [dispatch(add, (i, i), concurrency_key="k", concurrency_limit=1) for i in range(2)]
    keyed = dispatch(add, (5, 5), concurrency_key="k", concurrency_limit=1, unique_key="u")
    claim(rows[0])
    assert claim(keyed).waiting_for
    with pytest.raises(DuplicateTask):
        dispatch(add, (5, 5), unique_key="u", on_conflict="raise")


@pytest.mark.django_db
def test_a_waiting_row_can_be_revoked_and_expires():
    rows = [dispatch(add, (i, i), concurrency_key="k", concurrency_limit=1,
                     expires=timezone.now() + timedelta(seconds=0.2 * i + 0.5))
            for i in range(3)]
    claim(rows[0])
    claim(rows[1])
    claim(rows[2])
    assert ledger.record_revoked(str(rows[1].pk), expired=False)
    assert state(rows[1])[0] == TaskState.REVOKED
    TaskRecord.objects.filter(pk=rows[2].pk).update(
        expires_at=timezone.now() - timedelta(seconds=1))
    assert not claim(rows[2]).won
    assert state(rows[2])[0] == TaskState.EXPIRED


@pytest.mark.django_db
def test_eager_claims_ignore_the_limits():
    rows = [dispatch(add, (i, i), concurrency_key="k", concurrency_limit=1) for i in range(2)]
    claim(rows[0])
    eager = ledger.claim(str(rows[1].pk), task_name="demo.add", worker="w2",
                         rerun_after_lost=False, enforce_limits=False)
    assert eager.won


@pytest.mark.django_db
def test_a_row_with_a_per_call_limit_is_claimed_within_it_without_the_hint():
    rows = [dispatch(add, (i, i), concurrency_key="k", concurrency_limit=1) for i in range(2)]
    plain = [ledger.claim(str(row.pk), task_name="demo.add", worker=f"w{i}",
                          rerun_after_lost=False) for i, row in enumerate(rows)]
    assert [c.won for c in plain] == [True, False]
    assert plain[1].waiting_for == WaitReason.CONCURRENCY


@pytest.mark.django_db
def test_the_sweeper_wakes_a_waiter_when_a_dead_worker_s_lease_ends(redis_server):
    rows = [dispatch(add, (i, i), concurrency_key="k", concurrency_limit=1) for i in range(2)]
    claim(rows[0], "dead")
    claim(rows[1], "w2")
    assert sweep().woken_for_concurrency == 0  # the lease holds: the slot is taken
    assert state(rows[1])[0] == TaskState.WAITING
    TaskRecord.objects.filter(pk=rows[0].pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1))

    report = sweep()

    assert state(rows[0])[0] == TaskState.LOST
    assert report.woken_for_concurrency == 1
    assert state(rows[1]) == (TaskState.QUEUED, WaitReason.CONCURRENCY)
    assert redis_server.client().llen("celery") == 1


# --- rate -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_rate_spaces_starts_and_promises_deferred_rows_the_next_free_starts():
    rows = [dispatch(add, (i, i), rate_key="api", rate_limit="4/s") for i in range(3)]
    first = claim(rows[0])
    assert first.won
    second, third = claim(rows[1]), claim(rows[2])
    assert (second.won, second.waiting_for, third.waiting_for) == (False, "rate", "rate")
    assert second.due is not None and third.due is not None
    assert third.due - second.due == timedelta(seconds=0.25)
    bucket = TaskLimiter.objects.get(key="r:api")
    assert bucket.reserved_until == third.due + timedelta(seconds=0.25)
    assert state(rows[1]) == (TaskState.WAITING, WaitReason.RATE)
    assert rows[1].eta == second.due  # the start promised to it (the admin shows it)


@pytest.mark.django_db
def test_a_promised_row_starts_once_the_bucket_allows_and_newer_rows_queue_behind():
    rows = [dispatch(add, (i, i), rate_key="api", rate_limit="10/s") for i in range(2)]
    assert claim(rows[0]).won
    deferred = claim(rows[1])
    TaskLimiter.objects.filter(key="r:api").update(
        allowed_at=timezone.now() - timedelta(seconds=1))
    newcomer = dispatch(add, (9, 9), rate_key="api", rate_limit="10/s")
    assert claim(newcomer, "w9").waiting_for == WaitReason.RATE  # behind the promise
    assert claim(rows[1], "w1").won
    assert deferred.due is not None


@pytest.mark.django_db
def test_the_sweeper_publishes_a_rate_waiter_whose_start_is_due(redis_server):
    rows = [dispatch(add, (i, i), rate_limit="1/h") for i in range(2)]
    assert claim(rows[0]).won
    deferred = claim(rows[1])
    assert deferred.waiting_for == WaitReason.RATE and deferred.due is None  # held: too far
    assert sweep().woken_for_rate == 0
    TaskRecord.objects.filter(pk=rows[1].pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1))

    report = sweep()

    assert (report.woken_for_rate, report.published) == (1, 1)
    assert state(rows[1]) == (TaskState.QUEUED, WaitReason.RATE)
    assert redis_server.client().llen("celery") == 1
