"""Publish side: what recording tasks in the ledger costs the caller, against plain Celery.

Three scenarios, each with three or four variants timed in interleaved rounds (the ledger table is
truncated and Redis flushed before every run; medians are reported):

- 100 tasks in one transaction: ``dispatch(noop)`` x100 and ``noop.delay()`` x100 in
  ``transaction.atomic()`` (timed to the end of the commit, which publishes them), a naive
  outbox, and plain ``apply_async()`` x100.
- One task per autocommit transaction, 300 sequential calls.
- A bulk of 5000: ``dispatch_many`` of 5000 signatures, a naive bulk outbox, and 5000 plain
  ``apply_async()``.

The naive outbox is what one writes without this app: per task a ``TaskRecord`` INSERT, an
``on_commit`` hook that publishes with plain Celery under that id, and an UPDATE to QUEUED after
the publish (the bulk variant: one ``bulk_create``, a loop of ``apply_async`` and one UPDATE).
Plain Celery and the naive outbox run with ledger adoption off (``RELIABLE_TASKS_ADOPT=False``),
so plain Celery is measured alone.

Run: ``.venv/bin/python -m benchmarks.bench_dispatch [--rounds 5] [--json FILE]``; ``--json``
also writes every timed run's seconds, by scenario and variant (``benchmarks.bench_versions``
reads them to compare Celery versions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from benchmarks.common import (
    QUEUE_KEY,
    BenchEnvironment,
    Row,
    bench_environment,
    log,
    print_problems,
    print_table,
    rotated,
    rows_against,
    timed,
)

PLAIN, RELIABLE, NAIVE = "plain", "reliable", "naive"
WARMUP_TASKS = 50


# --- the variants ---------------------------------------------------------------------------------


def _tasks() -> Any:
    """The demo tasks module (imported once Django is set up)."""
    from example_project.demo import tasks

    return tasks


def plain_loop(n: int) -> None:
    """Plain Celery: ``plain_noop.apply_async()`` ``n`` times."""
    plain_noop = _tasks().plain_noop
    for _ in range(n):
        plain_noop.apply_async()


def dispatch_in_transaction(n: int) -> None:
    """``dispatch(noop)`` ``n`` times in one transaction; the commit publishes them."""
    from django.db import transaction

    from reliable_tasks import dispatch

    noop = _tasks().noop
    with transaction.atomic():
        for _ in range(n):
            dispatch(noop)


def delay_in_transaction(n: int) -> None:
    """``noop.delay()`` ``n`` times in one transaction: Celery's call-time checks, then
    ``dispatch``; the commit publishes them."""
    from django.db import transaction

    noop = _tasks().noop
    with transaction.atomic():
        for _ in range(n):
            noop.delay()


def dispatch_autocommit(n: int) -> None:
    """``dispatch(noop)`` ``n`` times outside any transaction: each call commits and publishes."""
    from reliable_tasks import dispatch

    noop = _tasks().noop
    for _ in range(n):
        dispatch(noop)


def dispatch_autocommit_in_background(n: int) -> None:
    """As ``dispatch_autocommit`` with ``PUBLISH_IN_BACKGROUND``, timed until all are QUEUED."""
    from django.test import override_settings

    from reliable_tasks import background

    with override_settings(RELIABLE_TASKS_PUBLISH_IN_BACKGROUND=True):
        dispatch_autocommit(n)
        if not background.flush(timeout=60):
            raise RuntimeError("the background publisher did not catch up within 60 s")


def dispatch_many_bulk(n: int) -> None:
    """``dispatch_many`` of ``n`` signatures (building them included)."""
    from reliable_tasks import dispatch_many

    noop = _tasks().noop
    dispatch_many([noop.s() for _ in range(n)])


def _naive_publish(task_id: Any) -> None:
    """Naive outbox, after commit: publish one task with plain Celery, then mark it QUEUED."""
    from django.utils import timezone

    from reliable_tasks.models import TaskRecord
    from reliable_tasks.states import TaskState

    _tasks().plain_noop.apply_async(task_id=str(task_id))
    TaskRecord.objects.filter(pk=task_id).update(
        state=TaskState.QUEUED, published_at=timezone.now(), publish_attempts=1)


def _naive_record() -> None:
    """Naive outbox, in the caller's transaction: INSERT the row, publish it on commit."""
    from django.db import transaction

    from reliable_tasks.models import TaskRecord

    record = TaskRecord.objects.create(task_name=_tasks().plain_noop.name)
    transaction.on_commit(partial(_naive_publish, record.pk))


def naive_in_transaction(n: int) -> None:
    """Naive outbox, ``n`` tasks in one transaction (``n`` INSERTs, publishes and UPDATEs)."""
    from django.db import transaction

    with transaction.atomic():
        for _ in range(n):
            _naive_record()


def naive_autocommit(n: int) -> None:
    """Naive outbox, one task per autocommit transaction: INSERT, publish, UPDATE per call."""
    for _ in range(n):
        _naive_record()


def _naive_publish_many(ids: list[Any]) -> None:
    from django.utils import timezone

    from reliable_tasks.models import TaskRecord
    from reliable_tasks.states import TaskState

    plain_noop = _tasks().plain_noop
    for task_id in ids:
        plain_noop.apply_async(task_id=str(task_id))
    TaskRecord.objects.filter(pk__in=ids).update(
        state=TaskState.QUEUED, published_at=timezone.now(), publish_attempts=1)


def naive_bulk(n: int) -> None:
    """Naive bulk outbox: one ``bulk_create``, on commit a loop of ``apply_async``, one UPDATE."""
    from django.db import transaction
    from django.utils import timezone

    from reliable_tasks.models import TaskRecord

    name = _tasks().plain_noop.name
    now = timezone.now()
    records = [TaskRecord(task_name=name, created_at=now) for _ in range(n)]
    with transaction.atomic():
        TaskRecord.objects.bulk_create(records, batch_size=2000)
        transaction.on_commit(partial(_naive_publish_many, [record.pk for record in records]))


@dataclass(frozen=True)
class Variant:
    """One way of sending a scenario's tasks."""

    kind: str
    label: str
    action: Callable[[int], None]
    goal: float | None = None
    reference: float | None = None


@dataclass(frozen=True)
class Scenario:
    """Tasks sent the same way by each variant; the plain variant is the baseline."""

    name: str
    tasks: int
    variants: tuple[Variant, ...]


SCENARIOS = (
    Scenario("100 in one transaction", 100, (
        Variant(PLAIN, "plain apply_async() x100", plain_loop),
        Variant(RELIABLE, "dispatch() x100 in atomic()", dispatch_in_transaction, goal=0.8),
        Variant(RELIABLE, "ReliableTask.delay() x100 in atomic()", delay_in_transaction,
                goal=0.8),
        Variant(NAIVE, "naive: create+on_commit+UPDATE each", naive_in_transaction,
                reference=0.65),
    )),
    Scenario("1 per autocommit, N=300", 300, (
        Variant(PLAIN, "plain apply_async() x300", plain_loop),
        Variant(RELIABLE, "dispatch() x300", dispatch_autocommit, goal=0.5),
        Variant(RELIABLE, "dispatch() x300, in background", dispatch_autocommit_in_background,
                goal=0.5),
        Variant(NAIVE, "naive: create+publish+UPDATE each", naive_autocommit, reference=0.29),
    )),
    Scenario("bulk of 5000", 5000, (
        Variant(PLAIN, "plain apply_async() x5000", plain_loop),
        Variant(RELIABLE, "dispatch_many(5000 sigs)", dispatch_many_bulk, goal=3.0),
        Variant(NAIVE, "naive: bulk_create+loop+1 UPDATE", naive_bulk, reference=1.9),
    )),
)


# --- running --------------------------------------------------------------------------------------


@contextlib.contextmanager
def adoption_for(kind: str) -> Iterator[None]:
    """Adoption off for plain Celery and the naive outbox (plain Celery measured alone)."""
    if kind == RELIABLE:
        yield
        return
    from django.test import override_settings

    with override_settings(RELIABLE_TASKS_ADOPT=False):
        yield


def check_run(env: BenchEnvironment, scenario: Scenario, variant: Variant, n: int) -> None:
    """After a run: every message is in Redis; ledger rows exist (all QUEUED) unless plain."""
    from reliable_tasks.models import TaskRecord
    from reliable_tasks.states import TaskState

    where = f"{scenario.name} / {variant.label}"
    with env.redis.client() as client:
        queued_messages = client.llen(QUEUE_KEY)
    if queued_messages != n:
        env.problem(f"{where}: {queued_messages} messages in Redis, expected {n}")
    rows = TaskRecord.objects.count()
    expected_rows = 0 if variant.kind == PLAIN else n
    if rows != expected_rows:
        env.problem(f"{where}: {rows} ledger rows, expected {expected_rows}")
    if variant.kind != PLAIN:
        not_queued = TaskRecord.objects.exclude(state=TaskState.QUEUED).count()
        if not_queued:
            env.problem(f"{where}: {not_queued} ledger rows not QUEUED after commit")


def run_variant(env: BenchEnvironment, scenario: Scenario, variant: Variant, n: int) -> float:
    """Reset, time one run of ``variant`` with ``n`` tasks, check it; return the seconds."""
    env.reset()
    with adoption_for(variant.kind):
        seconds = timed(partial(variant.action, n))
    check_run(env, scenario, variant, n)
    return seconds


def warm_up(env: BenchEnvironment) -> None:
    """Open the database and both broker connections and fill caches before timing."""
    for scenario in SCENARIOS:
        for variant in scenario.variants:
            run_variant(env, scenario, variant, min(WARMUP_TASKS, scenario.tasks))
    env.reset()


def run(env: BenchEnvironment, rounds: int = 5) -> list[Row]:
    """Time every variant ``rounds`` times, interleaved; return the rows of the table."""
    warm_up(env)
    seconds: dict[tuple[str, str], list[float]] = {}
    for round_index in range(rounds):
        log(f"dispatch benchmark: round {round_index + 1}/{rounds}")
        for scenario in SCENARIOS:
            by_label = {variant.label: variant for variant in scenario.variants}
            for label in rotated(list(by_label), round_index):
                took = run_variant(env, scenario, by_label[label], scenario.tasks)
                seconds.setdefault((scenario.name, label), []).append(took)
    env.reset()
    rows: list[Row] = []
    for scenario in SCENARIOS:
        measured = [
            Row(scenario=f"publish: {scenario.name}", variant=variant.label,
                seconds=seconds[(scenario.name, variant.label)], tasks=scenario.tasks,
                goal=variant.goal, reference=variant.reference)
            for variant in scenario.variants
        ]
        rows.extend(rows_against(measured[0], measured[1:]))
    return rows


def write_seconds(rows: Sequence[Row], path: str) -> None:
    """Write ``[{"scenario", "variant", "tasks", "baseline", "seconds": [...]}, ...]`` to
    ``path`` (``baseline``: plain Celery, which the scenario's ratios are taken against)."""
    runs = [{"scenario": row.scenario, "variant": row.variant, "tasks": row.tasks,
             "baseline": row.baseline, "seconds": list(row.seconds)} for row in rows]
    with open(path, "w", encoding="utf-8") as out:
        json.dump(runs, out, indent=1)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the publish-side benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the seconds of every run to FILE, as JSON")
    args = parser.parse_args(argv)
    with bench_environment() as env:
        rows = run(env, rounds=args.rounds)
    if args.json:
        write_seconds(rows, args.json)
    print_table(rows, title=f"Publish side (median of {args.rounds} interleaved runs)")
    print_problems(env.problems)
    return 1 if env.problems else 0


if __name__ == "__main__":
    sys.exit(main())
