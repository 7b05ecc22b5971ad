"""Worker side: what the ledger costs a worker running no-op tasks, against plain Celery.

For each variant, 5,000 tasks are put in Redis while no worker runs; then a prefork worker with
concurrency 2 is started, and the time from its "ready" log line to the moment the queue
(``celery`` list) and kombu's ``unacked`` hash are both empty is measured (polled every 20 ms).
Tasks are acknowledged late, after the task's ledger or result write, so an empty ``unacked``
hash means every write is done. Variants, interleaved in rounds, medians reported:

- ``plain``: ``demo.plain_noop``, worker with ``RELIABLE_TASKS_ADOPT=0`` (the baseline).
- ``ledger``: ``demo.noop``, a ``ReliableTask`` (claim + SUCCESS write per task), sent with
  ``dispatch_many``; every row must end SUCCESS.
- ``ledger-async``: the same with ``RELIABLE_TASKS_WORKER_SYNCHRONOUS_COMMIT = False``
  (PostgreSQL commits the worker's ledger writes without waiting for the disk).
- ``django-db``: ``demo.plain_noop_result``, its result stored by django-celery-results,
  worker with ``RELIABLE_TASKS_ADOPT=0``.

The worker logs at INFO (two lines per task), as ``CeleryProcess`` runs it, in every variant.

``--compare-with REV`` adds ``ledger@REV``: the ``ledger`` variant with the worker's code taken
from git revision ``REV`` of this repository (``git archive``), so a change to the worker side
is measured before and after in the same run, on the same machine.

Run: ``.venv/bin/python -m benchmarks.bench_worker [--rounds 3] [--tasks 5000]
[--compare-with REV]``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    QUEUE_KEY,
    UNACKED_KEY,
    BenchEnvironment,
    Row,
    bench_environment,
    log,
    print_problems,
    print_table,
    rotated,
    rows_against,
)
from example_project.devservers import REPO_ROOT, CeleryProcess

TASKS = 5000
CONCURRENCY = 2
POLL_INTERVAL = 0.02
READY_POLL_INTERVAL = 0.005
READY_TIMEOUT = 60.0
DRAIN_TIMEOUT = 600.0
#: Tasks a worker may take between its "ready" line and our seeing it (5 ms polls).
EARLY_TAKE_LIMIT = 20
_PROBLEM_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


# --- enqueueing (no worker running) ---------------------------------------------------------------


def enqueue_plain(task_name: str) -> Callable[[int], None]:
    """Return ``enqueue(n)``: ``n`` plain ``apply_async()`` calls, ledger adoption off."""

    def enqueue(n: int) -> None:
        from celery import current_app
        from django.test import override_settings

        task = current_app.tasks[task_name]
        adoption_off = override_settings(RELIABLE_TASKS_ADOPT=False)
        with adoption_off, current_app.producer_or_acquire() as producer:
            for _ in range(n):
                task.apply_async(producer=producer)

    return enqueue


def enqueue_reliable(n: int) -> None:
    """``dispatch_many`` of ``n`` ``demo.noop`` signatures (rows QUEUED once published)."""
    from example_project.demo.tasks import noop
    from reliable_tasks import dispatch_many

    dispatch_many([noop.s() for _ in range(n)])


# --- checks after a run ---------------------------------------------------------------------------


def expect_nothing_recorded(env: BenchEnvironment, where: str, n: int) -> None:
    """Plain Celery with adoption off: no ledger rows, no stored results."""
    from django_celery_results.models import TaskResult

    from reliable_tasks.models import TaskRecord

    rows, results = TaskRecord.objects.count(), TaskResult.objects.count()
    if rows or results:
        env.problem(f"{where}: {rows} ledger rows and {results} results, expected none")


def expect_ledger_success(env: BenchEnvironment, where: str, n: int) -> None:
    """Ledger on: ``n`` rows, all SUCCESS after one attempt, no duplicate deliveries."""
    from django.db.models import Count, Max, Sum

    from reliable_tasks.models import TaskRecord
    from reliable_tasks.states import TaskState

    states = dict(TaskRecord.objects.values_list("state").annotate(Count("id")).order_by())
    if states.get(TaskState.SUCCESS, 0) != n or sum(states.values()) != n:
        env.problem(f"{where}: ledger rows by state {states}, expected {n} SUCCESS")
    totals = TaskRecord.objects.aggregate(
        duplicates=Sum("duplicate_deliveries"), attempts=Max("attempts"))
    if totals["duplicates"]:
        env.problem(f"{where}: {totals['duplicates']} duplicate deliveries counted")
    if totals["attempts"] not in (None, 1):
        env.problem(f"{where}: a row took {totals['attempts']} attempts")


def expect_results_stored(env: BenchEnvironment, where: str, n: int) -> None:
    """django-db backend: ``n`` SUCCESS results, no ledger rows (adoption off)."""
    from django_celery_results.models import TaskResult

    from reliable_tasks.models import TaskRecord

    results = TaskResult.objects.filter(status="SUCCESS").count()
    if results != n:
        env.problem(f"{where}: {results} SUCCESS results stored, expected {n}")
    rows = TaskRecord.objects.count()
    if rows:
        env.problem(f"{where}: {rows} ledger rows with adoption off")


@dataclass(frozen=True)
class WorkerVariant:
    """One kind of task run by a worker started with ``env``."""

    key: str
    label: str
    enqueue: Callable[[int], None]
    worker_env: dict[str, str]
    check: Callable[[BenchEnvironment, str, int], None]
    goal: float | None = None


VARIANTS = (
    WorkerVariant("plain", "plain_noop, adopt off", enqueue_plain("demo.plain_noop"),
                  {"RELIABLE_TASKS_ADOPT": "0"}, expect_nothing_recorded),
    WorkerVariant("ledger", "noop (ReliableTask, ledger)", enqueue_reliable,
                  {"RELIABLE_TASKS_ADOPT": "1"}, expect_ledger_success, goal=0.5),
    WorkerVariant("ledger-async", "noop, ledger, synchronous_commit off", enqueue_reliable,
                  {"RELIABLE_TASKS_ADOPT": "1",
                   "RELIABLE_TASKS_WORKER_SYNCHRONOUS_COMMIT": "false"},
                  expect_ledger_success, goal=0.5),
    WorkerVariant("django-db", "plain_noop_result, django-db", enqueue_plain(
        "demo.plain_noop_result"), {"RELIABLE_TASKS_ADOPT": "0"}, expect_results_stored),
)


# --- one run --------------------------------------------------------------------------------------


def _queue_state(env: BenchEnvironment) -> tuple[int, int]:
    with env.redis.client() as client:
        pipe = client.pipeline(transaction=False)
        pipe.llen(QUEUE_KEY)
        pipe.hlen(UNACKED_KEY)
        waiting, unacked = pipe.execute()
    return int(waiting), int(unacked)


def _wait_ready(worker: CeleryProcess) -> float:
    """Poll the worker's log until its "ready" line; return the monotonic time it was seen."""
    assert worker.ready_pattern is not None
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if worker.ready_pattern.search(worker.log_text()):
            return time.monotonic()
        if not worker.is_running():
            raise RuntimeError(f"{worker!r} exited before it was ready:\n{worker.log_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{worker!r} not ready in {READY_TIMEOUT:g} s")
        time.sleep(READY_POLL_INTERVAL)


def _wait_drained(env: BenchEnvironment, worker: CeleryProcess) -> float:
    """Poll Redis until no message waits or is unacked; return the monotonic time."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    with env.redis.client() as client:
        pipe = client.pipeline(transaction=False)
        while True:
            pipe.llen(QUEUE_KEY)
            pipe.hlen(UNACKED_KEY)
            waiting, unacked = pipe.execute()
            if not waiting and not unacked:
                return time.monotonic()
            if not worker.is_running():
                raise RuntimeError(f"{worker!r} exited with {waiting} waiting, {unacked} unacked")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not drained in {DRAIN_TIMEOUT:g} s: {waiting} waiting, "
                                   f"{unacked} unacked")
            time.sleep(POLL_INTERVAL)


def _log_problems(env: BenchEnvironment, where: str, text: str) -> bool:
    lines = [line.strip() for line in text.splitlines() if _PROBLEM_LINE.search(line)]
    if not lines:
        return False
    shown = "; ".join(dict.fromkeys(line[:300] for line in lines[:5]))
    env.problem(f"{where}: {len(lines)} warning/error line(s) in the worker log: {shown}")
    return True


def run_once(env: BenchEnvironment, variant: WorkerVariant, n: int, log_dir: Path,
             label: str) -> float:
    """Enqueue ``n`` tasks, start a worker, time it from ready to drained; return the seconds."""
    where = f"worker {variant.key} {label}"
    env.reset()
    variant.enqueue(n)
    waiting, _ = _queue_state(env)
    if waiting != n:
        env.problem(f"{where}: {waiting} messages queued before the worker started, expected {n}")
    worker = CeleryProcess("worker", env.worker_env(**variant.worker_env),
                           concurrency=CONCURRENCY, log_dir=log_dir / f"{variant.key}-{label}")
    worker.start(wait_ready=False)
    try:
        ready_at = _wait_ready(worker)
        waiting_at_ready, _ = _queue_state(env)
        done_at = _wait_drained(env, worker)
    finally:
        text = worker.log_text()
        worker.stop()
    if n - waiting_at_ready > EARLY_TAKE_LIMIT:
        env.problem(f"{where}: {n - waiting_at_ready} tasks already taken when the ready line "
                    f"was seen: the timing misses them")
    variant.check(env, where, n)
    if not _log_problems(env, where, text):
        shutil.rmtree(log_dir / f"{variant.key}-{label}", ignore_errors=True)
    return done_at - ready_at


def checkout(revision: str, into: Path) -> Path:
    """The files of git ``revision`` of this repository, unpacked in ``into``; return it."""
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", revision],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def ledger_at(revision: str, tree: Path) -> WorkerVariant:
    """The ``ledger`` variant, its worker running the code of ``revision`` unpacked in ``tree``."""
    return WorkerVariant(f"ledger@{revision}", f"noop, ledger, worker code of {revision}",
                         enqueue_reliable, {"RELIABLE_TASKS_ADOPT": "1", "PYTHONPATH": str(tree)},
                         expect_ledger_success)


def run(env: BenchEnvironment, rounds: int = 3, tasks: int = TASKS,
        variants: Sequence[WorkerVariant] = VARIANTS) -> list[Row]:
    """Time every variant ``rounds`` times, interleaved; return the rows of the table.

    The first variant is the baseline of the others' ratios.
    """
    log_dir = Path(tempfile.mkdtemp(prefix="rt-bench-worker-"))
    seconds: dict[str, list[float]] = {variant.key: [] for variant in variants}
    by_key = {variant.key: variant for variant in variants}
    try:
        for round_index in range(rounds):
            for key in rotated(list(by_key), round_index):
                took = run_once(env, by_key[key], tasks, log_dir, f"r{round_index + 1}")
                seconds[key].append(took)
                log(f"worker benchmark: round {round_index + 1}/{rounds} {key}: {took:.2f} s")
        env.reset()
    finally:
        if any(log_dir.iterdir()):
            log(f"worker logs kept in {log_dir}")
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    scenario = f"worker: {tasks} no-ops, prefork x{CONCURRENCY}"
    measured = [
        Row(scenario=scenario, variant=variant.label, seconds=seconds[variant.key], tasks=tasks,
            goal=variant.goal)
        for variant in variants
    ]
    return rows_against(measured[0], measured[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker-side benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--tasks", type=int, default=TASKS, help="tasks per run")
    parser.add_argument("--compare-with", metavar="REV",
                        help="also time the ledger variant with the worker code of git REV")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rt-bench-worker-rev-") as tree:
        variants = list(VARIANTS)
        if args.compare_with:
            variants.append(ledger_at(args.compare_with, checkout(args.compare_with, Path(tree))))
        with bench_environment() as env:
            rows = run(env, rounds=args.rounds, tasks=args.tasks, variants=variants)
    print_table(rows, title=f"Worker side (median of {args.rounds} interleaved runs)")
    print_problems(env.problems)
    return 1 if env.problems else 0


if __name__ == "__main__":
    sys.exit(main())
