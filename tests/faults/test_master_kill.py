"""Scenario 1: the Sentinel master is SIGKILLed during a steady stream of dispatches."""

from __future__ import annotations

import pytest

from benchmarks.fault_scenarios import (
    CELERY_RECONNECT_SECONDS,
    PUBLISH_GRACE,
    STALL_SECONDS,
    SWEEP_INTERVAL,
    WORKER_START_SECONDS,
    kill_master_during_dispatch,
)
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]


def test_a_master_killed_during_dispatch_loses_nothing_and_runs_nothing_twice(
        sentinel_topology, rig, scale) -> None:
    outcome = kill_master_during_dispatch(rig, sentinel_topology, "reliable", scale)
    print(outcome.summary())

    assert outcome.dispatched == scale.kill_tasks
    assert outcome.raised == 0, outcome.summary()
    assert outcome.lost == 0, outcome.summary()
    assert outcome.run_twice == 0, outcome.summary()
    assert set(TaskRecord.objects.values_list("state", flat=True)) == {TaskState.SUCCESS}
    # From the new master's election: a sweeper pass re-publishes what the old master lost and,
    # a publish grace later, what failed to publish during the failover; the worker is back
    # once Celery has reconnected, or the supervisor has restarted it.
    bound = (2 * SWEEP_INTERVAL + PUBLISH_GRACE + CELERY_RECONNECT_SECONDS
             + outcome.worker_restarts * (STALL_SECONDS + WORKER_START_SECONDS))
    assert outcome.recovery_seconds is not None
    assert outcome.recovery_seconds <= bound, outcome.summary()
