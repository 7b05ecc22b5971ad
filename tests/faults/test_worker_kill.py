"""Scenario 4: workers SIGKILLed mid-task, over Sentinel, with a failover on top.

The same faults over a plain Redis (a whole worker killed, a pool process killed) are in
``tests/test_recovery.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from benchmarks.fault_scenarios import Sweeper, kill_worker_and_master, running
from example_project.demo.models import Execution
from reliable_tasks import dispatch
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

FAST_LEASES = {"RELIABLE_TASKS_LEASE_TIMEOUT": "3", "RELIABLE_TASKS_HEARTBEAT_INTERVAL": "0.5"}


@pytest.fixture(autouse=True)
def short_leases(settings) -> None:
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = 3
    settings.RELIABLE_TASKS_SWEEP_INTERVAL = 1
    settings.RELIABLE_TASKS_PUBLISH_GRACE = 1


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def state_of(task_id) -> str:
    return TaskRecord.objects.values_list("state", flat=True).get(pk=task_id)


def test_a_task_whose_worker_and_master_were_killed_runs_exactly_once_more(
        sentinel_topology, sentinel_worker) -> None:
    first = sentinel_worker(sentinel_topology, env=FAST_LEASES)
    with running(Sweeper()):
        row = dispatch("demo.resumable_record", ("worker-and-master", 3.0))
        wait_for(lambda: state_of(row.id) == TaskState.STARTED, 30, "STARTED")

        first.kill_all()  # the main process and its pool, as when a pod is killed
        old = sentinel_topology.kill_master()
        sentinel_topology.wait_for_new_master(old)
        sentinel_worker(sentinel_topology, env=FAST_LEASES)
        wait_for(lambda: state_of(row.id) == TaskState.SUCCESS, 60, "SUCCESS after the kills")

    assert Execution.objects.filter(token="worker-and-master").count() == 1
    assert TaskRecord.objects.get(pk=row.id).attempts == 2


def test_a_killed_pool_process_s_task_is_recovered_through_a_failover(
        sentinel_topology, sentinel_worker) -> None:
    worker = sentinel_worker(sentinel_topology, concurrency=1, env=FAST_LEASES)
    with running(Sweeper()):
        row = dispatch("demo.resumable_record", ("pool-and-master", 3.0))
        wait_for(lambda: state_of(row.id) == TaskState.STARTED, 30, "STARTED")

        worker.kill_pool_child()
        old = sentinel_topology.kill_master()
        sentinel_topology.wait_for_new_master(old)
        wait_for(lambda: state_of(row.id) == TaskState.SUCCESS, 60, "SUCCESS after the kills")

    assert Execution.objects.filter(token="pool-and-master").count() == 1
    assert worker.is_running()


def test_a_backlog_survives_a_killed_worker_and_a_killed_master(
        sentinel_topology, rig, scale) -> None:
    outcome = kill_worker_and_master(rig, sentinel_topology, "reliable", scale)
    print(outcome.summary())

    assert outcome.raised == 0, outcome.summary()
    assert outcome.lost == 0, outcome.summary()
    # retry_on_lost tasks run at least once: a body killed after its Execution row committed
    # and before its SUCCESS was recorded runs again (at most the two that were running).
    assert outcome.run_twice <= 2, outcome.summary()
    assert set(TaskRecord.objects.values_list("state", flat=True)) == {TaskState.SUCCESS}
