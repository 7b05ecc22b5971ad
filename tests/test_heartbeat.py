"""The worker heartbeat holds a long task's lease under every pool, even a CPU-bound one.

Under gevent and eventlet a task that never yields stops every greenlet of its process; the
heartbeat runs in a real OS thread, so it goes on extending the lease and the sweeper leaves the
task alone.
"""

from __future__ import annotations

import importlib.util
import time

import pytest

from example_project.demo.models import Execution
from reliable_tasks import dispatch
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.faults]

LEASE_TIMEOUT = 3
FAST_LEASES = {"RELIABLE_TASKS_LEASE_TIMEOUT": str(LEASE_TIMEOUT),
               "RELIABLE_TASKS_HEARTBEAT_INTERVAL": "0.5"}


def installed(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed")


@pytest.fixture(autouse=True)
def short_leases(settings) -> None:
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = LEASE_TIMEOUT
    settings.RELIABLE_TASKS_SWEEP_INTERVAL = 1
    settings.RELIABLE_TASKS_PUBLISH_GRACE = 1


@pytest.mark.parametrize("pool", [
    "prefork", "threads", "solo",
    pytest.param("gevent", marks=installed("gevent")),
    pytest.param("eventlet", marks=installed("eventlet")),
])
def test_a_cpu_bound_task_longer_than_its_lease_runs_once_under_every_pool(
        redis_server, celery_worker, pool):
    celery_worker(redis_server, concurrency=1, extra_args=[f"--pool={pool}"], env=FAST_LEASES)
    token = f"spin-{pool}"
    row = dispatch("demo.spin_record", (token, 3 * LEASE_TIMEOUT))

    deadline = time.monotonic() + 60
    while TaskRecord.objects.get(pk=row.id).state != TaskState.SUCCESS:
        assert time.monotonic() < deadline, "timed out waiting for SUCCESS"
        report = sweep()
        assert report.expired_leases_retried == 0, "the live task's lease expired"
        time.sleep(0.3)

    assert Execution.objects.filter(token=token).count() == 1
    assert TaskRecord.objects.get(pk=row.id).attempts == 1
