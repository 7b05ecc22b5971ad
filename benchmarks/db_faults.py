"""Database fault scenarios, plain Celery and reliable_tasks side by side (part of ``make faults``).

    .venv/bin/python -m benchmarks.db_faults [--scale full] [--scenario NAME ...]
                                             [--variant plain|reliable|both] [--json]

Each scenario of ``benchmarks.db_fault_scenarios`` runs for each variant in a process of its own
(this module again, with one ``--scenario`` and one ``--variant``), which starts its own
PostgreSQL cluster and ``redis-server`` on free loopback ports before it sets Django up: the
machine's PostgreSQL, Redis and ``DATABASE_URL`` are never used. With one scenario and one
variant the run happens here and its outcome is printed (``--json``: one JSON object, what
``tests/faults/test_database_faults.py`` asserts on); with several, the table is printed.

Progress goes to stderr, the outcomes to stdout. Needs PostgreSQL's server binaries (``initdb``,
``postgres``; as root, a ``postgres`` user to run them). The exit status is 1 when a run failed
or reliable_tasks lost, doubled or left unfinished anything it promises not to, else 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO, cast

from benchmarks.common import _sigterm_as_exit, log, print_markdown_table
from benchmarks.db_fault_scenarios import (
    SCALES,
    SCENARIOS,
    VARIANTS,
    DbOutcome,
    Variant,
    outcome_json,
    run_scenario,
)
from example_project.devservers import REPO_ROOT, postgres_unavailable

#: Scenarios where the database refuses connections for a while: the probe must say so.
OUTAGES = frozenset({"pg_restart_fast", "pg_restart_immediate", "pg_down",
                     "pg_killed_async_commit"})
#: Where reliable_tasks promises only what ``WORKER_SYNCHRONOUS_COMMIT = False`` keeps.
ASYNC_COMMIT = "pg_killed_async_commit"
#: Bound of one scenario's process (the full scale's longest takes about 3 minutes).
RUN_TIMEOUT = 900


def problems_of(outcome: DbOutcome) -> list[str]:
    """What reliable_tasks must never do in a database fault; nothing for plain Celery.

    Callers may see errors while the database is down (``raised``: a dispatch is an INSERT).
    With ``WORKER_SYNCHRONOUS_COMMIT = False`` and a crashed cluster, the app promises only that
    no accepted task goes unrun and every process recovers: rows left unfinished and bodies run
    twice are measured, not problems.
    """
    if outcome.variant != "reliable":
        return []
    failed = [note for note in outcome.notes if note.startswith("run failed")]
    if failed:
        return failed
    checks: dict[str, bool] = {
        "gave up dispatching": outcome.gave_up == 0,
        "lost": outcome.lost == 0,
        "beat not alive": outcome.beat_alive,
        f"{outcome.workers_alive} of 2 workers alive": outcome.workers_alive == 2,
        f"probe before the fault exited {outcome.probe_before}": outcome.probe_before == 0,
        f"probe after the fault exited {outcome.probe_after}": outcome.probe_after == 0,
    }
    if outcome.scenario in OUTAGES:
        checks[f"probe during the outage exited {outcome.probe_during}"] = (
            outcome.probe_during not in (None, 0))
    if outcome.scenario != ASYNC_COMMIT:
        checks.update({
            "run twice": outcome.run_twice == 0,
            f"rows not SUCCESS {outcome.states}": outcome.not_success == 0,
            "slots missed": outcome.slots_missed == 0,
            "slots doubled": outcome.slots_doubled == 0,
            "slots not run": outcome.slots_not_run == 0,
        })
    return [what for what, ok in checks.items() if not ok]


# --- one run in this process ----------------------------------------------------------------------


def run_here(scenario: str, variant: Variant, scale_name: str, work_dir: Path) -> DbOutcome:
    """Run one scenario in this process; a crash becomes an outcome noting it."""
    try:
        return run_scenario(scenario, variant, SCALES[scale_name], work_dir)
    except Exception as exc:  # noqa: BLE001 - reported in the outcome, traceback to stderr
        log(traceback.format_exc())
        failed = DbOutcome(scenario, variant, scale_name, work_dir=str(work_dir))
        failed.notes.append(f"run failed: {exc!r}")
        return failed


# --- many runs, each in a process of its own ------------------------------------------------------


def run_bounded(argv: Sequence[str], timeout: float) -> tuple[int | None, str, str]:
    """Run a scenario's process to its end; return its exit status (None if it timed out),
    stdout and stderr.

    One that has not finished within ``timeout`` seconds gets SIGTERM first, which unwinds it
    so that it stops the servers and workers it started, and SIGKILL a minute later.
    """
    with subprocess.Popen(list(argv), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                out, err = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
            return None, out, err
        return process.returncode, out, err


def runner_argv(scenario: str, variant: Variant, scale_name: str, work_dir: Path) -> list[str]:
    """The command that runs one scenario in a new process of this module (``--json``)."""
    return [sys.executable, "-m", "benchmarks.db_faults", "--scenario", scenario,
            "--variant", variant, "--scale", scale_name, "--json", "--work-dir", str(work_dir)]


def run_in_subprocess(scenario: str, variant: Variant, scale_name: str,
                      work_dir: Path) -> DbOutcome:
    """Run one scenario in a new process of this module; return the outcome it printed."""
    status, out, err = run_bounded(runner_argv(scenario, variant, scale_name, work_dir),
                                   RUN_TIMEOUT)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if status is None or not lines:
        log(err[-6000:])
        failed = DbOutcome(scenario, variant, scale_name, work_dir=str(work_dir))
        failed.notes.append(f"run failed: no outcome within {RUN_TIMEOUT}s" if status is None
                            else f"run failed: exit status {status}, no outcome")
        return failed
    return DbOutcome.from_dict(json.loads(lines[-1]))


def run_all(scenarios: Sequence[str], variants: Sequence[Variant], scale_name: str,
            work_dir: Path) -> list[DbOutcome]:
    """Every scenario for every variant, each in its own process; progress to stderr."""
    outcomes = []
    for scenario in scenarios:
        for variant in variants:
            log(f"{scenario} [{variant}] ...")
            started = time.monotonic()
            outcome = run_in_subprocess(scenario, variant, scale_name,
                                        work_dir / f"{scenario}-{variant}")
            log(f"  {outcome.summary()}")
            log(f"  took {time.monotonic() - started:.0f}s")
            outcomes.append(outcome)
    return outcomes


# --- the table ------------------------------------------------------------------------------------

_HEADERS = ("scenario", "variant", "dispatched", "raised", "lost", "run twice",
            "not SUCCESS", "results missing", "slots missed", "slots doubled", "beat alive",
            "probe during/after", "recovery s")


def _probe_text(code: int | None) -> str:
    return "-" if code is None else str(code)


def _cells(outcome: DbOutcome) -> tuple[str, ...]:
    recovery = "-" if outcome.recovery_seconds is None else f"{outcome.recovery_seconds:.1f}"
    states = ", ".join(f"{n} {state}" for state, n in sorted(outcome.states.items())
                       if state != "SUCCESS")
    return (outcome.title, outcome.variant_name, str(outcome.dispatched), str(outcome.raised),
            str(outcome.lost), str(outcome.run_twice), states or "0",
            str(outcome.results_missing), str(outcome.slots_missed),
            str(outcome.slots_doubled), "yes" if outcome.beat_alive else "NO",
            f"{_probe_text(outcome.probe_during)} / {_probe_text(outcome.probe_after)}",
            recovery)


def print_table(outcomes: Sequence[DbOutcome], title: str, out: TextIO | None = None) -> None:
    """Print the outcomes as a Markdown table, then each row's notes and log findings."""
    out = out or sys.stdout
    print_markdown_table(title, _HEADERS, [_cells(outcome) for outcome in outcomes], out)
    for outcome in outcomes:
        details = [*outcome.notes]
        if outcome.fault_seconds is not None:
            details.append(f"fault {outcome.fault_seconds:g}s")
        details.append(f"slots {outcome.slots}, skipped by catch-up "
                       f"{outcome.slots_skipped_by_policy}, not run {outcome.slots_not_run}, "
                       f"latest ran {outcome.latest_slot_run_seconds:g}s after its slot")
        if outcome.extra:
            details.append(f"{outcome.extra} extra task(s) recorded by calls that raised")
        if outcome.adopted_states:
            details.append(f"adopted rows (sweeps) {outcome.adopted_states}")
        if outcome.log_problems:
            details.append(f"logs {outcome.log_problems}")
        details.append(f"max dispatch {outcome.max_dispatch_seconds:.2f}s")
        print(f"- {outcome.title} [{outcome.variant_name}]: {'; '.join(details)}", file=out)
    out.flush()


def report(outcomes: Sequence[DbOutcome], scale_name: str, minutes: float,
           out: TextIO | None = None) -> list[str]:
    """Print the table and the problems; return the problems."""
    out = out or sys.stdout
    print_table(outcomes, f"Database fault scenarios at {scale_name} scale ({minutes:.0f} min); "
                          f"plain Celery = demo.plain_log_run with django-celery-results' "
                          f"django-db backend, adoption off", out)
    problems = [f"{outcome.title}: {problem}" for outcome in outcomes
                for problem in problems_of(outcome)]
    if problems:
        print(f"\n{len(problems)} problem(s):", file=out)
        for problem in problems:
            print(f"  - {problem}", file=out)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Run one scenario here, or several in their own processes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, default=None,
                        help="a scenario to run (repeatable; default: all)")
    parser.add_argument("--variant", choices=(*VARIANTS, "both"), default="both")
    parser.add_argument("--scale", choices=tuple(SCALES), default="default")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per outcome instead of the table")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where logs go (default: a new temporary directory, removed when "
                             "nothing went wrong)")
    args = parser.parse_args(argv)
    reason = postgres_unavailable()
    if reason is not None:
        print(f"database fault scenarios skipped: {reason}", file=sys.stderr)
        return 0
    scenarios = args.scenario or list(SCENARIOS)
    variants = cast(list[Variant], VARIANTS if args.variant == "both" else [args.variant])
    own_dir = args.work_dir is None
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="rt-dbfaults-"))
    if len(scenarios) == 1 and len(variants) == 1:
        with _sigterm_as_exit():  # a SIGTERMed run still stops what it started
            outcome = run_here(scenarios[0], variants[0], args.scale, work_dir)
        print(outcome_json(outcome) if args.json else outcome.summary(), flush=True)
        return 1 if any(note.startswith("run failed") for note in outcome.notes) else 0
    started = time.monotonic()
    outcomes = run_all(scenarios, variants, args.scale, work_dir)
    if args.json:
        for outcome in outcomes:
            print(outcome_json(outcome))
        problems = [problem for outcome in outcomes for problem in problems_of(outcome)]
    else:
        problems = report(outcomes, args.scale, (time.monotonic() - started) / 60)
    if problems:
        print(f"logs kept in {work_dir}", file=sys.stderr)
        return 1
    if own_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
