"""Reconciliation of 10,000 schedules against RedBeat, and the two ways people do it without us.

On PostgreSQL and a private ``redis-server`` (``benchmarks.common``), with 10,000 interval
schedules in the database, medians of 5 runs:

- ``reconcile, nothing to do``: ``reconcile()`` (what ``manage.py reconcile_tasks`` runs,
  without the interpreter's start-up: the diff, then one sweeper pass) when RedBeat already
  matches the database. Goal <= 1 s, and nothing is written to Redis but the run's own metrics
  observation (checked with keyspace notifications: every key written during the run is
  listed, and any outside ``<ENTRY_PREFIX>metrics:`` is a problem).
- ``reconcile, from empty Redis``: the same after ``FLUSHALL``. Goal <= 2 s; afterwards every
  schedule has its entry.
- ``RedBeatSchedulerEntry.save() loop``: RedBeat's own API, one entry at a time, from empty
  Redis (measured at 6.0 s elsewhere).
- ``delete everything and reload``: the incident's init script: delete every ``redbeat:*`` key
  (the lock and the statics with them), then the save loop.

Run: ``.venv/bin/python -m benchmarks.bench_reconcile [--schedules 10000] [--runs 5]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from benchmarks.common import Row, bench_environment, log, print_problems, print_table, timed

SCHEDULES = 10_000
#: The only keys a reconcile with nothing to do may write: its metrics observations.
METRICS_KEY_PREFIX = "reliable_tasks:metrics:"


def create_schedules(count: int) -> None:
    """``count`` interval schedules, written in bulk (no push: the benchmark does the pushing)."""
    from reliable_tasks.models import PeriodicSchedule

    PeriodicSchedule.objects.all().delete()
    PeriodicSchedule.objects.bulk_create(
        [PeriodicSchedule(name=f"bench-{i}", task="demo.noop", interval_seconds=60 + i % 600,
                          args=[], kwargs={"n": i}) for i in range(count)],
        batch_size=2000)


class KeyWrites:
    """Names of the keys written while it listens (Redis keyspace notifications)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        client.config_set("notify-keyspace-events", "KA")
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("__keyspace@*__:*")
        self._pubsub.get_message(timeout=1.0)

    def drain(self) -> set[str]:
        """The keys written since the last drain."""
        keys: set[str] = set()
        while (message := self._pubsub.get_message(timeout=0.5)) is not None:
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            keys.add(channel.split(":", 1)[1])
        return keys

    def close(self) -> None:
        """Stop listening, and stop Redis from notifying (it costs the baselines time)."""
        self._pubsub.close()
        self._client.config_set("notify-keyspace-events", "")


def redbeat_save_loop(count_check: int) -> Callable[[], None]:
    """RedBeat's one-entry-at-a-time save of every schedule (what an init script would do)."""
    from celery.schedules import schedule as interval
    from redbeat.schedulers import RedBeatSchedulerEntry

    from example_project.celery import app
    from reliable_tasks.models import PeriodicSchedule

    def save_all() -> None:
        saved = 0
        for row in PeriodicSchedule.objects.iterator(chunk_size=2000):
            RedBeatSchedulerEntry(
                name=f"naive:{row.pk}", task=row.task, args=row.args, kwargs=row.kwargs,
                schedule=interval(timedelta(seconds=row.interval_seconds)), app=app).save()
            saved += 1
        assert saved == count_check

    return save_all


def run(count: int, runs: int) -> tuple[list[Row], list[str]]:
    """Measure every variant ``runs`` times; return the table rows and the problems seen."""
    with bench_environment() as env:
        from reliable_tasks import redbeat_store
        from reliable_tasks.celery_app import get_celery_app
        from reliable_tasks.reconcile import reconcile

        create_schedules(count)
        client = env.redis.client()
        app = get_celery_app()
        save_loop = redbeat_save_loop(count)
        seconds: dict[str, list[float]] = {key: [] for key in ("noop", "empty", "loop", "wipe")}
        for round_number in range(1, runs + 1):
            client.flushall()
            seconds["empty"].append(timed(reconcile))
            if len(redbeat_store.owned_entry_names(app)) != count:
                env.problem("reconcile from empty Redis did not create every entry")
            writes = KeyWrites(client)
            seconds["noop"].append(timed(reconcile))
            foreign = sorted(key for key in writes.drain()
                             if not key.startswith(METRICS_KEY_PREFIX))
            writes.close()
            if foreign:
                env.problem(f"a reconcile with nothing to do wrote {len(foreign)} key(s), "
                            f"e.g. {foreign[:3]}")
            client.flushall()
            seconds["loop"].append(timed(save_loop))

            def wipe_and_reload() -> None:
                for key in client.scan_iter(match="redbeat:*", count=1000):
                    client.delete(key)
                save_loop()

            seconds["wipe"].append(timed(wipe_and_reload))
            log(f"reconcile benchmark: round {round_number}/{runs}: "
                + ", ".join(f"{key} {values[-1]:.2f} s" for key, values in seconds.items()))
        scenario = f"reconcile {count:,} schedules"
        baseline = Row(scenario, "RedBeatSchedulerEntry.save() loop", seconds["loop"], count,
                       baseline=True, ratio=1.0)
        base = baseline.median_seconds
        rows = [
            baseline,
            Row(scenario, "delete everything and reload", seconds["wipe"], count,
                ratio=base / Row("", "", seconds["wipe"], count).median_seconds),
            Row(scenario, "reconcile_tasks, from empty Redis (goal <= 2 s)", seconds["empty"],
                count, ratio=base / Row("", "", seconds["empty"], count).median_seconds),
            Row(scenario, "reconcile_tasks, nothing to do (goal <= 1 s)", seconds["noop"],
                count, ratio=base / Row("", "", seconds["noop"], count).median_seconds),
        ]
        checks = [
            ("from empty Redis", Row("", "", seconds["empty"], count).median_seconds, 2.0),
            ("nothing to do", Row("", "", seconds["noop"], count).median_seconds, 1.0),
        ]
        for label, value, goal in checks:
            log(f"reconcile {label}: median {value:.3f} s, goal <= {goal} s: "
                f"{'met' if value <= goal else 'NOT met'}")
        return rows, list(env.problems)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; return 1 if a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", type=int, default=SCHEDULES)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    rows, problems = run(args.schedules, args.runs)
    print_table(rows, title="reliable_tasks reconcile vs RedBeat's own save loop "
                            f"(median of {args.runs}); ratio = save loop s / variant s")
    print_problems(problems)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
