"""State transitions of the ledger: compare-and-set claims and monotonic outcome writes."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from reliable_tasks import adoption, ledger
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState

pytestmark = pytest.mark.django_db


def make_row(state: str = TaskState.QUEUED, **fields) -> TaskRecord:
    return TaskRecord.objects.create(task_name="demo.add", state=state, **fields)


def claim(row: TaskRecord, worker: str = "w1", rerun_after_lost: bool = False) -> ledger.Claim:
    return ledger.claim(str(row.id), task_name=row.task_name, worker=worker,
                        rerun_after_lost=rerun_after_lost)


def test_only_one_of_two_claims_on_the_same_row_wins():
    row = make_row()

    first, second = claim(row, "w1"), claim(row, "w2")

    assert (first.won, second.won) == (True, False)
    row.refresh_from_db()
    assert (row.state, row.attempts, row.worker) == (TaskState.STARTED, 1, "w1")
    assert second.reason == "running under a live lease"


@pytest.mark.parametrize("state", [TaskState.SUCCESS, TaskState.FAILURE, TaskState.LOST,
                                   TaskState.REVOKED, TaskState.EXPIRED])
def test_a_finished_task_cannot_be_claimed(state):
    row = make_row(state)

    result = claim(row)

    assert not result.won
    assert result.reason == f"already {state}"
    row.refresh_from_db()
    assert row.state == state


def test_a_late_started_event_never_regresses_a_success():
    row = make_row()
    won = claim(row)
    assert ledger.record_success(str(row.id), won)

    late = claim(row, "w2")
    adoption.adopt_started(row.id, row.task_name, "w3")

    assert not late.won
    row.refresh_from_db()
    assert (row.state, row.attempts) == (TaskState.SUCCESS, 1)


def test_an_outcome_of_a_stale_attempt_is_ignored():
    row = make_row(lease_expires_at=None)
    stale = claim(row, "w1")
    TaskRecord.objects.filter(pk=row.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1))
    fresh = claim(row, "w2", rerun_after_lost=True)
    assert fresh.won
    assert ledger.load_attempt(str(row.id), fresh).attempt == 2

    assert not ledger.record_failure(str(row.id), stale, ValueError("late"))
    assert ledger.record_success(str(row.id), fresh)
    row.refresh_from_db()
    assert (row.state, row.worker, row.error_type) == (TaskState.SUCCESS, "w2", "")


def test_an_expired_lease_is_not_rerun_unless_the_task_allows_it():
    row = make_row()
    claim(row, "w1")
    TaskRecord.objects.filter(pk=row.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1))

    assert not claim(row, "w2", rerun_after_lost=False).won
    assert claim(row, "w2", rerun_after_lost=True).won


def test_a_delivery_after_expiry_is_recorded_expired_and_not_run():
    row = make_row(expires_at=timezone.now() - timedelta(seconds=1))

    result = claim(row)

    assert not result.won and result.reason.startswith("expired")
    row.refresh_from_db()
    assert row.state == TaskState.EXPIRED


def test_a_delivery_without_a_row_is_recorded_as_started():
    task_id = str(uuid.uuid4())

    result = ledger.claim(task_id, task_name="demo.add", worker="w1", rerun_after_lost=False)

    assert result.won
    row = TaskRecord.objects.get(pk=task_id)
    assert (row.state, row.adopted, row.attempts) == (TaskState.STARTED, True, 1)


def test_revoking_never_overwrites_a_finished_task():
    done = make_row(TaskState.SUCCESS)
    queued = make_row(TaskState.QUEUED)

    assert not ledger.record_revoked(str(done.id), expired=False)
    assert ledger.record_revoked(str(queued.id), expired=False)
    done.refresh_from_db()
    queued.refresh_from_db()
    assert (done.state, queued.state) == (TaskState.SUCCESS, TaskState.REVOKED)


def test_the_attempt_history_is_bounded(settings):
    settings.RELIABLE_TASKS_HISTORY_LIMIT = 3
    row = make_row()
    for attempt in range(5):
        won = claim(row, f"w{attempt}")
        due = timezone.now()
        assert ledger.record_retry(str(row.id), won, ValueError(attempt), due)

    row.refresh_from_db()
    assert [entry["worker"] for entry in row.history] == ["w2", "w3", "w4"]
    assert row.attempts == 5


@pytest.mark.parametrize("state", [TaskState.PENDING, TaskState.QUEUED, TaskState.RETRY])
def test_a_claim_wins_from_every_claimable_state_in_one_update(state):
    """One conditional UPDATE over all claimable states: the publisher marking the row QUEUED
    at the same moment cannot make the claim lose."""
    row = make_row(state)

    with CaptureQueriesContext(connection) as queries:
        result = claim(row)

    assert result.won
    assert len(queries.captured_queries) == 1
    row.refresh_from_db()
    assert (row.state, row.attempts) == (TaskState.STARTED, 1)


@pytest.mark.parametrize(("attempts", "won", "state"), [
    (1, True, TaskState.STARTED),
    (2, False, TaskState.LOST),
])
def test_a_redelivery_takes_over_an_expired_lease_only_while_attempts_are_left(
        attempts, won, state):
    from datetime import timedelta

    from django.utils import timezone

    row = make_row(TaskState.STARTED, worker="w1", attempts=attempts, max_attempts=2,
                   started_at=timezone.now() - timedelta(minutes=1),
                   lease_expires_at=timezone.now() - timedelta(seconds=5))

    result = claim(row, "w2", rerun_after_lost=True)

    assert result.won is won
    row.refresh_from_db()
    assert row.state == state
    assert row.attempts == (attempts + 1 if won else attempts)


def test_every_manual_retry_gives_the_budget_the_task_was_dispatched_with():
    """Found by the state-machine model: a second manual retry took the row's max_attempts,
    which the first had raised to count the attempts before it, as its budget."""
    row = make_row(TaskState.FAILURE, attempts=1, max_attempts=2)

    ledger.retry(row)
    TaskRecord.objects.filter(pk=row.pk).update(state=TaskState.FAILURE, attempts=2)
    again = ledger.retry(row)

    assert again.max_attempts == 2 + 2
    assert [entry["budget"] for entry in again.history if entry.get("manual_retry")] == [2, 2]


def test_a_late_outcome_of_an_attempt_from_before_a_manual_retry_moves_nothing():
    """Found by the state-machine model: retry() kept the old claim's worker and start time,
    so that attempt's late success turned the retried row into SUCCESS unrun."""
    row = make_row()
    old = claim(row)
    ledger.record_revoked(str(row.id), expired=False)
    ledger.retry(row)
    TaskRecord.objects.filter(pk=row.pk).update(state=TaskState.QUEUED)  # its publish

    assert not ledger.record_success(str(row.id), old)
    assert not ledger.record_failure(str(row.id), old, ValueError("late"))
    assert TaskRecord.objects.get(pk=row.pk).state == TaskState.QUEUED


def test_the_budget_survives_a_history_shorter_than_the_attempts(settings):
    settings.RELIABLE_TASKS_HISTORY_LIMIT = 1
    row = make_row(TaskState.QUEUED, max_attempts=1)
    for expected_limit in (2, 3, 4):
        ledger.record_failure(str(row.id), claim(row), ValueError("boom"))
        assert ledger.retry(row).max_attempts == expected_limit


def test_a_replaced_row_is_taken_over_by_its_replacement_and_never_by_the_old_task():
    row = make_row()
    first = claim(row)
    assert ledger.record_replaced(str(row.id), first, "demo.total.s()")
    assert not claim(row, "w2").won, "a REPLACED row waits for its replacement"

    replacement = TaskRecord(id=row.id, task_name="demo.total", args=[[1, 2]],
                             next_attempt_at=timezone.now())
    assert ledger.take_over(replacement)
    assert not ledger.take_over(replacement), "an unfinished row is not taken over"

    late_copy = claim(row, "w2")  # the replaced task's message, delivered again
    assert not late_copy.won
    assert "demo.total" in late_copy.reason
    stored = TaskRecord.objects.get(pk=row.pk)
    assert (stored.task_name, stored.state, stored.attempts, stored.args) == (
        "demo.total", TaskState.PENDING, 0, [[1, 2]])
    assert [entry["outcome"] for entry in stored.history] == [TaskState.REPLACED]

    won = ledger.claim(str(row.id), task_name="demo.total", worker="w3",
                       rerun_after_lost=False)
    assert won.won


def test_a_plain_task_s_row_is_taken_over_by_a_reliable_call_and_no_longer_adopted():
    task_id = str(uuid.uuid4())
    adoption.adopt_started(task_id, "demo.plain_replaced", "w1")
    call = TaskRecord(id=task_id, task_name="demo.add", args=[5, 1],
                      next_attempt_at=timezone.now())

    assert ledger.take_over(call), "plain Celery's row carries no guarantee"
    stored = TaskRecord.objects.get(pk=task_id)
    assert (stored.task_name, stored.state, stored.adopted) == (
        "demo.add", TaskState.PENDING, False)

    adoption.adopt_finished(task_id, "demo.plain_replaced", TaskState.SUCCESS)
    assert TaskRecord.objects.get(pk=task_id).state == TaskState.PENDING, (
        "plain Celery's late events no longer move the row")


def test_a_row_a_reliable_task_claimed_is_not_taken_over_while_it_runs():
    row = TaskRecord.objects.create(task_name="demo.add", state=TaskState.QUEUED)
    TaskRecord.objects.filter(pk=row.pk).delete()  # a delivery sent around the outbox
    assert ledger.claim(str(row.id), task_name="demo.add", worker="w1",
                        rerun_after_lost=False).won
    assert TaskRecord.objects.get(pk=row.pk).adopted

    assert not ledger.take_over(TaskRecord(id=row.id, task_name="demo.add",
                                           next_attempt_at=timezone.now()))
    assert TaskRecord.objects.get(pk=row.pk).state == TaskState.STARTED
