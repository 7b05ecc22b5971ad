"""The ledger's admin changelist over 1,000,000 rows on PostgreSQL: server time per page.

Uses the million finished rows of ``benchmarks.bench_sweeper`` (filled on first use with
``INSERT ... SELECT generate_series``, reused afterwards). A superuser's request goes through
Django's test client (the whole server side: middleware, admin, queries, template), median of 7
after one warm-up, for the pages an operator opens first. Goal: <= 500 ms each.

Run: ``.venv/bin/python -m benchmarks.bench_admin [--rows 1000000] [--runs 7]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmarks.common import Row, bench_environment, log, median, print_problems, print_table
from benchmarks.common import timed as time_call

GOAL_SECONDS = 0.5
#: (label, URL, whether the goal applies): the issue sets it for the unfiltered list and the
#: state filter; a free-text search is measured for information.
PAGES = (
    ("unfiltered", "/admin/reliable_tasks/taskrecord/", True),
    ("filtered by state FAILURE", "/admin/reliable_tasks/taskrecord/?state__exact=FAILURE", True),
    ("filtered by state SUCCESS", "/admin/reliable_tasks/taskrecord/?state__exact=SUCCESS", True),
    ("searched by task name (no goal)", "/admin/reliable_tasks/taskrecord/?q=demo.flaky", False),
)


def run(rows: int, runs: int) -> tuple[list[Row], list[str]]:
    """Time each page ``runs`` times; return the table rows and the problems seen."""
    with bench_environment() as env:
        from django.contrib.auth import get_user_model
        from django.test import Client

        from benchmarks.bench_sweeper import prepare_ledger, vacuum_analyze

        log(prepare_ledger(rows, refill=False))
        vacuum_analyze()
        user_model = get_user_model()
        admin, _ = user_model.objects.get_or_create(
            username="bench-admin", defaults={"is_staff": True, "is_superuser": True})
        client = Client()
        client.force_login(admin)
        table: list[Row] = []
        for label, url, has_goal in PAGES:
            response = client.get(url)  # warm-up, and the check that the page works
            if response.status_code != 200:
                env.problem(f"{label}: HTTP {response.status_code}")
                continue
            seconds = [time_call(lambda url=url: client.get(url)) for _ in range(runs)]
            log(f"admin {label}: median {median(seconds) * 1000:.0f} ms")
            if has_goal and median(seconds) > GOAL_SECONDS:
                env.problem(f"{label}: median {median(seconds) * 1000:.0f} ms is over the "
                            f"{GOAL_SECONDS * 1000:.0f} ms goal")
            table.append(Row(f"admin changelist, {rows:,} rows", label, seconds, 1))
        return table, list(env.problems)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; return 1 if a page missed the goal or failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    rows, problems = run(args.rows, args.runs)
    print_table(rows, title=f"TaskRecord changelist, server time per page (median of "
                            f"{args.runs}); goal <= {GOAL_SECONDS * 1000:.0f} ms")
    print_problems(problems)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
