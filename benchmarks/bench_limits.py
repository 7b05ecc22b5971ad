"""The claim with a concurrency or rate limit against the claim without, in one run.

Every variant claims the same number of rows, one by one, as workers do (``ledger.claim``), on
rows dispatched beforehand; 50 rows of the key are left STARTED first, so the limited claim
counts a busy key's slots, and the table is analyzed (PostgreSQL), as autovacuum would have.
Limits are high enough never to defer: what is timed is the cost of enforcing them. Two figures
per variant, in interleaved rounds (medians):

- **claim**: the claims alone, the issue's measure (goal: within 20% of the claim without).
- **run's writes**: claim, SUCCESS and, for a concurrency key, the wake-up of its waiters that
  follows a limited run (none wait here: the look is what costs).

Variants: no limit (baseline); a concurrency key and limit; a rate key; both. The claim of a
limited row goes straight to the claim within limits, as a worker's does (the task's attributes,
or the message header of a call's limits, tell it).

Run: ``.venv/bin/python -m benchmarks.bench_limits [--rounds 5] [--claims 300]``
(``DATABASE_URL``, else the PostgreSQL database of ``benchmarks.common``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.common import (
    BenchEnvironment,
    Row,
    bench_environment,
    log,
    print_problems,
    print_table,
    rotated,
    rows_against,
)

BUSY = 50
HIGH_LIMIT = 100_000
HIGH_RATE = "1000000/s"


@dataclass(frozen=True)
class Variant:
    """How the rows are limited and whether the claim knows it from the task (``hinted``)."""

    label: str
    options: dict[str, Any]
    hinted: bool


VARIANTS = (
    Variant("no limit", {}, hinted=False),
    Variant("concurrency",
            {"concurrency_key": "bench", "concurrency_limit": HIGH_LIMIT}, hinted=True),
    Variant("rate", {"rate_key": "bench", "rate_limit": HIGH_RATE}, hinted=True),
    Variant("concurrency and rate",
            {"concurrency_key": "bench", "concurrency_limit": HIGH_LIMIT, "rate_key": "bench",
             "rate_limit": HIGH_RATE}, hinted=True),
)


def _prepare(env: BenchEnvironment, variant: Variant, claims: int) -> list[str]:
    """Reset; dispatch ``BUSY + claims`` rows; claim the first ``BUSY`` (they stay STARTED)."""
    from django.db import transaction

    from example_project.demo.tasks import noop
    from reliable_tasks import dispatch_many, ledger

    env.reset()
    with transaction.atomic():
        rows = dispatch_many([(noop, (), {}, variant.options) for _ in range(BUSY + claims)])
    ids = [str(row.pk) for row in rows]
    for task_id in ids[:BUSY]:
        ledger.claim(task_id, task_name=noop.name, worker="busy", rerun_after_lost=False,
                     limited=variant.hinted)
    _analyze()
    return ids[BUSY:]


def _analyze() -> None:
    """Fresh planner statistics, as autovacuum keeps them: the ledger was just filled."""
    from django.db import connection

    from reliable_tasks.models import TaskRecord

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {connection.ops.quote_name(TaskRecord._meta.db_table)}")


def _run(env: BenchEnvironment, variant: Variant, claims: int) -> tuple[float, float]:
    """Claim every row, then finish it; return (seconds in claims, seconds in all writes)."""
    from example_project.demo.tasks import noop
    from reliable_tasks import ledger, limits

    ids = _prepare(env, variant, claims)
    claiming = writing = 0.0
    for task_id in ids:
        start = time.perf_counter()
        claimed = ledger.claim(task_id, task_name=noop.name, worker="bench",
                               rerun_after_lost=False, limited=variant.hinted)
        claimed_at = time.perf_counter()
        if not claimed.won:
            env.problem(f"{variant.label}: a claim did not win ({claimed.reason})")
        ledger.record_success(task_id, claimed)
        if claimed.concurrency_key is not None:
            limits.wake(claimed.concurrency_key)
        claiming += claimed_at - start
        writing += time.perf_counter() - start
    return claiming, writing


def run(env: BenchEnvironment, rounds: int, claims: int) -> list[Row]:
    """Time every variant ``rounds`` times, interleaved; return the table's rows."""
    for variant in VARIANTS:
        _run(env, variant, 20)
    claim_seconds: dict[str, list[float]] = {}
    write_seconds: dict[str, list[float]] = {}
    labels = [variant.label for variant in VARIANTS]
    by_label = {variant.label: variant for variant in VARIANTS}
    for round_index in range(rounds):
        log(f"limits benchmark: round {round_index + 1}/{rounds}")
        for label in rotated(labels, round_index):
            claiming, writing = _run(env, by_label[label], claims)
            claim_seconds.setdefault(label, []).append(claiming)
            write_seconds.setdefault(label, []).append(writing)
    env.reset()
    rows: list[Row] = []
    for title, seconds in (("claim", claim_seconds), ("run's writes", write_seconds)):
        measured = [Row(scenario=f"{title}, {claims} rows", variant=label,
                        seconds=seconds[label], tasks=claims,
                        goal=None if title != "claim" or index == 0 else 1 / 1.2)
                    for index, label in enumerate(labels)]
        rows.extend(rows_against(measured[0], measured[1:]))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table (ratio: unlimited seconds / limited seconds)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--claims", type=int, default=300, help="claims per run")
    args = parser.parse_args(argv)
    with bench_environment() as env:
        rows = run(env, rounds=args.rounds, claims=args.claims)
    print_table(rows, title=f"Claims with limits (median of {args.rounds} interleaved runs; "
                            f"ratio > 1 is faster than without a limit; goal: within 20%)")
    print_problems(env.problems)
    return 1 if env.problems else 0


if __name__ == "__main__":
    sys.exit(main())
