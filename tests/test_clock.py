"""One clock: a worker or a sweeper whose clock is a minute off neither re-runs nor skips a task.

The skewed process (a worker, or a process running sweeper passes) starts with
``tests/skewed_clock`` on its ``PYTHONPATH``: its ``sitecustomize`` shifts Django's clock
(``timezone.now()``), which is every clock the app reads, by ``CLOCK_SKEW_SECONDS``. Leases,
expiry and published times come from the database's clock, so only PostgreSQL and MariaDB are
concerned: SQLite is a file on one host, whose processes all share that host's clock.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from django.db import connection

from example_project.demo.models import Execution
from example_project.devservers import REPO_ROOT
from reliable_tasks import dispatch
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep

SKEWED_CLOCK_DIR = Path(__file__).resolve().parent / "skewed_clock"

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor == "sqlite",
                       reason="SQLite's processes all share one host's clock"),
]

LEASE_TIMEOUT = 3
FAST_LEASES = {"RELIABLE_TASKS_LEASE_TIMEOUT": str(LEASE_TIMEOUT),
               "RELIABLE_TASKS_HEARTBEAT_INTERVAL": "0.5",
               "RELIABLE_TASKS_SWEEP_INTERVAL": "1"}
SWEEPS = """
import time, django
from django.utils import timezone
django.setup()
print(round(timezone.now().timestamp() - time.time()), flush=True)
from reliable_tasks.sweeper import sweep
for _ in range({passes}):
    report = sweep()
    print(report.expired_leases_retried, report.expired_leases_lost,
          report.requeued_after_broker_loss, flush=True)
    time.sleep(0.3)
"""


@pytest.fixture(autouse=True)
def short_leases(settings) -> None:
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = LEASE_TIMEOUT
    settings.RELIABLE_TASKS_SWEEP_INTERVAL = 1


def skewed(seconds: int) -> dict[str, str]:
    """Environment that sets the clock of a process of the example project ``seconds`` off."""
    return {"PYTHONPATH": f"{SKEWED_CLOCK_DIR}:{REPO_ROOT}", "CLOCK_SKEW_SECONDS": str(seconds)}


def sweeps_in_a_process(env: dict[str, str], passes: int) -> list[tuple[int, int, int]]:
    """Run ``passes`` sweeper passes in a process with ``env``; return each pass' counts
    (leases retried, leases lost, requeued after a broker loss)."""
    done = subprocess.run([sys.executable, "-c", SWEEPS.format(passes=passes)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    skew, *lines = done.stdout.splitlines()
    assert int(skew) == int(env.get("CLOCK_SKEW_SECONDS", 0)), "the clock is skewed as asked"
    return [tuple(int(n) for n in line.split()) for line in lines]


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             meanwhile: Callable[[], object] = lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        meanwhile()
        time.sleep(0.3)


def state_of(task_id) -> str:
    return TaskRecord.objects.values_list("state", flat=True).get(pk=task_id)


def test_a_worker_whose_clock_is_a_minute_slow_keeps_its_lease(redis_server, celery_worker):
    celery_worker(redis_server, env={**FAST_LEASES, **skewed(-60)})
    row = dispatch("demo.resumable_record", ("slow-worker", 2 * LEASE_TIMEOUT))
    wait_for(lambda: state_of(row.id) != TaskState.QUEUED, 30, "the claim")

    wait_for(lambda: state_of(row.id) == TaskState.SUCCESS, 60, "SUCCESS", meanwhile=sweep)

    assert Execution.objects.filter(token="slow-worker").count() == 1
    stored = TaskRecord.objects.get(pk=row.id)
    assert stored.attempts == 1
    assert (stored.created_at - stored.started_at).total_seconds() > 50, "the worker was slow"


def test_a_sweeper_whose_clock_is_a_minute_fast_expires_no_live_lease(
        redis_server, celery_worker, worker_env):
    celery_worker(redis_server, env=FAST_LEASES)
    row = dispatch("demo.resumable_record", ("fast-sweeper", 2 * LEASE_TIMEOUT))
    wait_for(lambda: state_of(row.id) == TaskState.STARTED, 30, "STARTED")

    passes = sweeps_in_a_process(worker_env(redis_server, **FAST_LEASES, **skewed(60)), 12)
    wait_for(lambda: state_of(row.id) == TaskState.SUCCESS, 60, "SUCCESS")

    assert [counts[:2] for counts in passes] == [(0, 0)] * 12, "no lease expired"
    assert Execution.objects.filter(token="fast-sweeper").count() == 1
    assert TaskRecord.objects.get(pk=row.id).attempts == 1


def test_a_sweeper_whose_clock_is_a_minute_slow_requeues_what_a_broker_loss_took(
        redis_server, worker_env):
    env = worker_env(redis_server, **FAST_LEASES, **skewed(-60))
    rows = [dispatch("demo.record", (f"slow-sweeper-{i}",)) for i in range(5)]
    assert {state_of(row.id) for row in rows} == {TaskState.QUEUED}
    sweeps_in_a_process(env, 1)  # remembers the broker's run id

    redis_server.restart()
    passes = sweeps_in_a_process(env, 1)

    assert passes == [(0, 0, 5)], "every task published before the loss is published again"
    assert redis_server.client().llen("celery") == 5
