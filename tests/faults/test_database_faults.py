"""Database faults: the app's PostgreSQL restarted, cut off, down and killed while tasks flow
through two real workers and a real beat runs a schedule every second.

Each test runs one scenario of ``benchmarks/db_fault_scenarios.py`` for reliable_tasks in a
process of its own (``python -m benchmarks.db_faults --scenario NAME --variant reliable --json``),
which starts a PostgreSQL cluster and a ``redis-server`` of its own, because the database it
breaks must not be the suite's. The tests assert on the counts it prints; ``make faults`` prints
the same scenarios beside plain Celery.

They need PostgreSQL's server binaries, not the suite's database, so they run once per CI run:
in the ``make test`` whose ``DATABASE_URL`` is unset or SQLite (the first of ``.ci/run``), and
are skipped in the others. ``DB_FAULTS=1`` runs them anyway, ``DB_FAULTS=0`` skips them;
``FAULTS_SCALE=full`` runs the issue's full scale (1,000 tasks, a 30 s outage).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.db_fault_scenarios import DbOutcome, scale_from_env
from benchmarks.db_faults import run_bounded, runner_argv
from example_project.devservers import postgres_unavailable

pytestmark = [pytest.mark.faults]

#: The longest one scenario's process may take (default scale: under a minute here).
RUN_TIMEOUT = {"default": 300, "full": 900}
_LOG_TAIL_CHARS = 6_000


def skip_reason() -> str | None:
    """Why the database fault scenarios do not run in this session, or None."""
    choice = os.environ.get("DB_FAULTS", "")
    if choice == "0":
        return "DB_FAULTS=0"
    reason = postgres_unavailable()
    if reason is not None:
        return reason
    database_url = os.environ.get("DATABASE_URL", "")
    if choice != "1" and database_url and not database_url.startswith("sqlite"):
        return ("the database fault scenarios start a PostgreSQL cluster of their own whatever "
                "DATABASE_URL says, so they run once per CI run, in the make test without "
                "DATABASE_URL (SQLite); DB_FAULTS=1 runs them here too")
    return None


def _logs(work_dir: Path) -> str:
    """The ends of the workers' and beat's logs of a run, for a failing test's message."""
    parts = []
    for path in sorted((work_dir / "celery").glob("*.log")):
        parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-_LOG_TAIL_CHARS:]}")
    return "\n".join(parts)


@pytest.fixture
def run_scenario(tmp_path: Path) -> Callable[[str], DbOutcome]:
    """Return ``run(name)``: the outcome of scenario ``name`` for reliable_tasks."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    scale = scale_from_env()

    def run(name: str) -> DbOutcome:
        work_dir = tmp_path / name
        status, out, err = run_bounded(runner_argv(name, "reliable", scale.name, work_dir),
                                       RUN_TIMEOUT[scale.name])
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert status == 0 and lines, (
            f"the scenario's process exited {status} (None: timed out):\n"
            f"{err[-_LOG_TAIL_CHARS:]}\n{_logs(work_dir)}")
        outcome = DbOutcome.from_dict(json.loads(lines[-1]))
        print(outcome.summary())
        return outcome

    return run


def assert_recovered(outcome: DbOutcome, *, tasks: int) -> None:
    """What every scenario must end with: nothing lost, beat and both workers alive, the probe
    healthy before and after, beat's schedule recorded all along."""
    context = outcome.summary() + "\n" + _logs(Path(outcome.work_dir))
    assert outcome.dispatched == tasks, context
    assert outcome.gave_up == 0, context
    assert outcome.lost == 0, context  # every accepted task's body ran
    assert outcome.beat_alive, context  # still running, and dispatched in its last seconds
    assert outcome.workers_alive == 2, context
    assert outcome.probe_before == 0, context
    assert outcome.probe_after == 0, context
    assert outcome.slots >= 5, context


def assert_exactly_once(outcome: DbOutcome) -> None:
    """Every body ran once, every row of the scenario ended SUCCESS, every slot ran once."""
    context = outcome.summary() + "\n" + _logs(Path(outcome.work_dir))
    assert outcome.run_twice == 0, context
    assert set(outcome.states) == {"SUCCESS"}, context
    assert outcome.slots_missed == 0, context  # none missed within the catch-up policy
    assert outcome.slots_doubled == 0, context  # no slot recorded or run twice
    assert outcome.slots_not_run == 0, context


@pytest.mark.parametrize("scenario", ["pg_restart_fast", "pg_restart_immediate", "pg_down"])
def test_a_database_restart_or_outage_loses_nothing_and_runs_nothing_twice(
        run_scenario: Callable[[str], DbOutcome], scenario: str) -> None:
    outcome = run_scenario(scenario)

    assert_recovered(outcome, tasks=scale_from_env().tasks)
    assert_exactly_once(outcome)
    assert outcome.probe_during == 1, outcome.summary()  # the database check fails meanwhile
    assert outcome.recovery_seconds is not None, outcome.summary()


def test_backends_terminated_every_second_lose_nothing_and_run_nothing_twice(
        run_scenario: Callable[[str], DbOutcome]) -> None:
    outcome = run_scenario("pg_backends_terminated")

    assert_recovered(outcome, tasks=scale_from_env().tasks)
    assert_exactly_once(outcome)


def test_a_task_after_idle_connections_were_killed_runs_once(
        run_scenario: Callable[[str], DbOutcome]) -> None:
    outcome = run_scenario("pg_idle_connection_killed")

    assert_recovered(outcome, tasks=scale_from_env().idle_cycles)
    assert_exactly_once(outcome)
    assert outcome.raised == 0, outcome.summary()  # the caller reconnected by itself, too
    assert outcome.recovery_seconds is not None, outcome.summary()  # each ran at once


def test_a_killed_database_loses_nothing_with_synchronous_commits(
        run_scenario: Callable[[str], DbOutcome]) -> None:
    outcome = run_scenario("pg_killed")

    assert_recovered(outcome, tasks=scale_from_env().tasks)
    assert_exactly_once(outcome)
    assert outcome.probe_during == 1, outcome.summary()


def test_a_killed_database_with_asynchronous_worker_commits_runs_every_task(
        run_scenario: Callable[[str], DbOutcome]) -> None:
    """``WORKER_SYNCHRONOUS_COMMIT = False`` promises no more: a crash may undo the workers'
    last writes, leaving rows unfinished (their bodies did run); counted, not asserted."""
    outcome = run_scenario("pg_killed_async_commit")

    assert_recovered(outcome, tasks=scale_from_env().tasks)
    assert outcome.probe_during == 1, outcome.summary()
