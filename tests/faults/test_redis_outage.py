"""Scenario 3: a plain Redis crashes with tasks queued, stays down, and comes back empty."""

from __future__ import annotations

import pytest

from benchmarks.fault_scenarios import redis_outage
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]


def test_redis_down_then_back_empty_loses_nothing_and_runs_nothing_twice(
        redis_server, rig, scale) -> None:
    outcome = redis_outage(rig, redis_server, "reliable", scale)
    print(outcome.summary())

    assert outcome.dispatched >= scale.outage_backlog + scale.outage_seconds * scale.outage_rate / 2
    assert outcome.raised == 0, outcome.summary()
    assert outcome.lost == 0, outcome.summary()
    assert outcome.run_twice == 0, outcome.summary()
    assert set(TaskRecord.objects.values_list("state", flat=True)) == {TaskState.SUCCESS}
