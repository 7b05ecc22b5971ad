"""Concurrency and rate limits with real workers: four worker processes, the bodies log their
own start and end times (``demo.span``), and the test plays the sweeper while it waits.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from reliable_tasks import dispatch_many
from reliable_tasks.models import TaskRecord
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.faults]

LEASE_TIMEOUT = 3.0
SWEEP_INTERVAL = 1.0
FAST_LEASES = {"RELIABLE_TASKS_LEASE_TIMEOUT": "3", "RELIABLE_TASKS_HEARTBEAT_INTERVAL": "0.5"}
WORKERS = 4


@pytest.fixture(autouse=True)
def short_leases(settings):
    settings.RELIABLE_TASKS_LEASE_TIMEOUT = LEASE_TIMEOUT
    settings.RELIABLE_TASKS_SWEEP_INTERVAL = SWEEP_INTERVAL
    settings.RELIABLE_TASKS_PUBLISH_GRACE = 2


def sweeping_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Run sweeper passes until ``condition`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        sweep()
        time.sleep(SWEEP_INTERVAL / 4)


def spans(path: Path) -> list[tuple[str, str, float]]:
    """The ``(token, "start" | "end", unix time)`` lines the bodies logged, in time order."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        _task_id, label, _pid, moment = line.split()
        token, edge = label.rsplit(":", 1)
        found.append((token, edge, float(moment)))
    return sorted(found, key=lambda item: item[2])


def most_at_once(lines: list[tuple[str, str, float]]) -> int:
    running = peak = 0
    for _token, edge, _moment in lines:
        running += 1 if edge == "start" else -1
        peak = max(peak, running)
    return peak


def ends(path: Path) -> int:
    return sum(1 for _token, edge, _moment in spans(path) if edge == "end")


def start_workers(celery_worker, redis_server) -> list:
    return [celery_worker(redis_server, concurrency=1, env=FAST_LEASES) for _ in range(WORKERS)]


def test_a_limit_of_3_over_50_tasks_on_4_workers_never_runs_more_than_3(
        redis_server, celery_worker, tmp_path):
    log = tmp_path / "spans.log"
    start_workers(celery_worker, redis_server)
    dispatch_many([("demo.span", (str(log), f"t{i}", 0.3),
                    {}, {"concurrency_key": "exports", "concurrency_limit": 3})
                   for i in range(50)])
    sweeping_until(lambda: ends(log) >= 50, 120, "50 bodies")

    lines = spans(log)
    starts = Counter(token for token, edge, _ in lines if edge == "start")
    assert len(starts) == 50 and set(starts.values()) == {1}, "each body ran exactly once"
    print(f"most bodies at once: {most_at_once(lines)}, over "
          f"{lines[-1][2] - lines[0][2]:.2f} s")
    assert most_at_once(lines) == 3, "never more than the limit, and the limit was reached"
    rows = TaskRecord.objects.filter(concurrency_key="exports")
    assert set(rows.values_list("state", flat=True)) == {TaskState.SUCCESS}
    assert sum(rows.values_list("deferrals", flat=True)) > 0, "the limit deferred deliveries"


def test_a_killed_worker_s_slot_returns_within_the_lease_bound(
        redis_server, celery_worker, tmp_path):
    log = tmp_path / "spans.log"
    first = celery_worker(redis_server, concurrency=1, env=FAST_LEASES)
    limit = {"concurrency_key": "one", "concurrency_limit": 1}
    holder, = dispatch_many([("demo.span", (str(log), "holder", 60.0), {}, limit)])
    sweeping_until(lambda: len(spans(log)) == 1, 30, "the holder's start")
    second = celery_worker(redis_server, concurrency=1, env=FAST_LEASES)
    waiter, = dispatch_many([("demo.span", (str(log), "waiter", 0.0), {}, limit)])
    sweeping_until(lambda: TaskRecord.objects.get(pk=waiter.pk).state == TaskState.WAITING,
                   30, "the waiter deferred")

    first.kill_all()
    killed_at = time.time()
    sweeping_until(lambda: any(token == "waiter" and edge == "end"
                               for token, edge, _ in spans(log)), 30, "the waiter's run")

    waiter_start = next(moment for token, edge, moment in spans(log)
                        if (token, edge) == ("waiter", "start"))
    print(f"the slot returned {waiter_start - killed_at:.2f} s after the kill")
    assert waiter_start - killed_at <= LEASE_TIMEOUT + SWEEP_INTERVAL + 3
    holder_row = TaskRecord.objects.get(pk=holder.pk)
    assert holder_row.state in (TaskState.RETRY, TaskState.QUEUED, TaskState.STARTED,
                                TaskState.WAITING)
    assert second.is_running()


def test_a_rate_of_10_per_second_over_100_tasks_on_4_workers_never_starts_11_in_a_second(
        redis_server, celery_worker, tmp_path):
    log = tmp_path / "spans.log"
    start_workers(celery_worker, redis_server)
    dispatch_many([("demo.span", (str(log), f"t{i}", 0.0),
                    {}, {"rate_key": "api", "rate_limit": "10/s"})
                   for i in range(100)])
    sweeping_until(lambda: ends(log) >= 100, 120, "100 bodies")

    starts = [moment for _token, edge, moment in spans(log) if edge == "start"]
    assert len(starts) == 100
    busiest = max(sum(1 for other in starts if first <= other < first + 1.0)
                  for first in starts)
    print(f"busiest second: {busiest} starts; 100 starts in {starts[-1] - starts[0]:.2f} s")
    assert busiest <= 10
    assert starts[-1] - starts[0] >= 9.0, "100 starts at 10 a second take 9.9 s at least"
