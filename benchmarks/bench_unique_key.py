"""Dispatch with a ``unique_key`` against dispatch without, in one run.

Three scenarios, each timed in interleaved rounds (the ledger truncated and Redis flushed
before every run; medians reported), with ``dispatch()`` without a key as the baseline:

- 100 tasks in one transaction (timed to the end of the commit, which publishes them).
- One task per autocommit transaction, 300 sequential calls.
- ``dispatch_many`` of 1000 signatures (calls with a key are inserted one by one).

Beside the baseline, each scenario times calls with a key each (every insert wins: a savepoint
and the INSERT maintaining the key's unique index) and calls that all share one key (the first
wins; every other one conflicts, rolls back its savepoint and reads the holder).

Run: ``.venv/bin/python -m benchmarks.bench_unique_key [--rounds 5]`` (``DATABASE_URL``, else the
PostgreSQL database of ``benchmarks.common``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
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

WARMUP_TASKS = 20
#: Keys of the calls: None (no key), a key per call, or one key for every call.
NONE, EACH, SHARED = "none", "each", "shared"


def _key(keys: str, index: int) -> dict[str, Any]:
    if keys == NONE:
        return {}
    return {"unique_key": f"bench:{index}" if keys == EACH else "bench:shared"}


def _noop() -> Any:
    from example_project.demo.tasks import noop

    return noop


def in_transaction(keys: str, n: int) -> None:
    """``dispatch(noop)`` ``n`` times in one transaction; the commit publishes them."""
    from django.db import transaction

    from reliable_tasks import dispatch

    noop = _noop()
    with transaction.atomic():
        for index in range(n):
            dispatch(noop, **_key(keys, index))


def autocommit(keys: str, n: int) -> None:
    """``dispatch(noop)`` ``n`` times outside any transaction: each call commits and publishes."""
    from reliable_tasks import dispatch

    noop = _noop()
    for index in range(n):
        dispatch(noop, **_key(keys, index))


def bulk(keys: str, n: int) -> None:
    """``dispatch_many`` of ``n`` signatures (building them included)."""
    from reliable_tasks import dispatch_many

    noop = _noop()
    dispatch_many([noop.s().set(**_key(keys, index)) for index in range(n)])


@dataclass(frozen=True)
class Scenario:
    """``action(keys, n)`` timed with each way of keying its calls; no key is the baseline."""

    name: str
    tasks: int
    action: Callable[[str, int], None]


SCENARIOS = (
    Scenario("100 in one transaction", 100, in_transaction),
    Scenario("1 per autocommit, N=300", 300, autocommit),
    Scenario("dispatch_many of 1000", 1000, bulk),
)
LABELS = {NONE: "no key", EACH: "a key per call", SHARED: "one key, n-1 conflicts"}


def check_run(env: BenchEnvironment, scenario: Scenario, keys: str, n: int) -> None:
    """After a run: one row and one message per call, or one of each for a shared key."""
    from reliable_tasks.models import TaskRecord
    from reliable_tasks.states import TaskState

    expected = 1 if keys == SHARED else n
    where = f"{scenario.name} / {LABELS[keys]}"
    with env.redis.client() as client:
        messages = client.llen(QUEUE_KEY)
    rows = TaskRecord.objects.count()
    queued = TaskRecord.objects.filter(state=TaskState.QUEUED).count()
    if (messages, rows, queued) != (expected, expected, expected):
        env.problem(f"{where}: {messages} messages, {rows} rows ({queued} QUEUED), "
                    f"expected {expected} of each")


def run_variant(env: BenchEnvironment, scenario: Scenario, keys: str, n: int) -> float:
    """Reset, time one run with ``n`` calls keyed by ``keys``, check it; return the seconds."""
    env.reset()
    seconds = timed(partial(scenario.action, keys, n))
    check_run(env, scenario, keys, n)
    return seconds


def run(env: BenchEnvironment, rounds: int) -> list[Row]:
    """Time every scenario and keying ``rounds`` times, interleaved; return the table's rows."""
    for scenario in SCENARIOS:
        for keys in LABELS:
            run_variant(env, scenario, keys, WARMUP_TASKS)
    seconds: dict[tuple[str, str], list[float]] = {}
    for round_index in range(rounds):
        log(f"unique key benchmark: round {round_index + 1}/{rounds}")
        for scenario in SCENARIOS:
            for keys in rotated(list(LABELS), round_index):
                took = run_variant(env, scenario, keys, scenario.tasks)
                seconds.setdefault((scenario.name, keys), []).append(took)
    env.reset()
    rows: list[Row] = []
    for scenario in SCENARIOS:
        measured = [Row(scenario=f"dispatch: {scenario.name}", variant=label,
                        seconds=seconds[(scenario.name, keys)], tasks=scenario.tasks)
                    for keys, label in LABELS.items()]
        rows.extend(rows_against(measured[0], measured[1:]))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table (ratio: no-key seconds / keyed seconds)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per variant")
    args = parser.parse_args(argv)
    with bench_environment() as env:
        rows = run(env, rounds=args.rounds)
    print_table(rows, title=f"Dispatch with unique_key (median of {args.rounds} interleaved "
                            f"runs; ratio > 1 is faster than without a key)")
    print_problems(env.problems)
    return 1 if env.problems else 0


if __name__ == "__main__":
    sys.exit(main())
