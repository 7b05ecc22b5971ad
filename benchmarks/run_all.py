"""Run the publish-side and worker-side benchmarks in one environment and print one table.

This is what ``make bench`` runs: ``.venv/bin/python -m benchmarks.run_all``. The exit status
is 1 when something looked wrong during the runs (listed under the table), else 0; goals that
were missed show as ``NO`` in the table and do not change the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmarks import bench_dispatch, bench_worker
from benchmarks.common import bench_environment, log, print_problems, print_table


def main(argv: Sequence[str] | None = None) -> int:
    """Run both benchmarks and print their rows as one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dispatch-rounds", type=int, default=5,
                        help="timed runs per publish-side variant (default 5)")
    parser.add_argument("--worker-rounds", type=int, default=3,
                        help="timed runs per worker-side variant (default 3)")
    parser.add_argument("--tasks", type=int, default=bench_worker.TASKS,
                        help=f"tasks per worker run (default {bench_worker.TASKS})")
    args = parser.parse_args(argv)
    with bench_environment() as env:
        log("publish-side benchmark ...")
        rows = bench_dispatch.run(env, rounds=args.dispatch_rounds)
        log("worker-side benchmark ...")
        rows += bench_worker.run(env, rounds=args.worker_rounds, tasks=args.tasks)
    print_table(rows, title=(
        f"reliable_tasks vs plain Celery (publish: median of {args.dispatch_rounds} runs; "
        f"worker: median of {args.worker_rounds} runs); ratio = plain s / variant s"))
    print_problems(env.problems)
    return 1 if env.problems else 0


if __name__ == "__main__":
    sys.exit(main())
