"""Sweeper side: what one recovery pass costs on a big ledger, and how fast it publishes a backlog.

Two scenarios on PostgreSQL, against a private ``redis-server`` (``benchmarks.common``):

1. **Idle pass over a big ledger.** 1,000,000 finished rows (mostly SUCCESS, some FAILURE, a few
   REVOKED, EXPIRED and LOST; all finished inside the retention window, so nothing is pruned) and
   a handful of rows in flight: QUEUED, STARTED with a live lease, PENDING and RETRY not due yet.
   Nothing is due, so the pass only looks. Goal: median ``sweep()`` <= 50 ms (7 passes after one
   warm-up). Each query of the pass is timed, and ``EXPLAIN (ANALYZE, BUFFERS)`` of each query is
   printed (run in a transaction that is rolled back); a sequential scan of the ledger is reported
   as a problem.
2. **Publishing a backlog.** 10,000 PENDING ``demo.noop`` rows past their ``next_attempt_at``, on
   top of the million finished rows; one ``sweep()`` publishes them all. Goal: >= 5,000 tasks/s
   (median of 5 runs after a warm-up). After every run Redis must hold exactly 10,000 messages in
   ``celery`` and every one of the rows must be QUEUED. Baseline, in the same interleaved rounds:
   plain Celery ``app.send_task("demo.noop")`` x 10,000. The queries of one publishing pass are
   EXPLAINed as well, replayed on a fresh copy of the same backlog.

The million rows are written once with ``INSERT ... SELECT generate_series`` and kept: a re-run
that finds exactly them (still inside the retention window) reuses them, so re-runs take seconds.
``--refill`` rebuilds them. The other benchmarks empty the ledger table of the same database; the
next run of this one then fills it again.

Run: ``.venv/bin/python -m benchmarks.bench_sweeper [--refill] [--passes 7] [--runs 5]``.
Progress goes to stderr; the table, the per-query timings and the plans go to stdout. The exit
status is 1 when a check failed (listed under the table), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from benchmarks.common import QUEUE_KEY, BenchEnvironment, bench_environment, log, median

if TYPE_CHECKING:
    from reliable_tasks.sweeper import SweepReport

FINISHED_ROWS = 1_000_000
PENDING_ROWS = 10_000
FILL_CHUNK = 250_000
SWEEP_GOAL_MS = 50.0
PUBLISH_GOAL_RATE = 5_000.0
#: The task of the publishing scenario; the finished rows never use it.
NOOP = "demo.noop"
#: Task names of the finished and in-flight rows (the last one stands for adopted plain tasks).
FILLER_NAMES = ("demo.add", "demo.record", "demo.flaky", "demo.plain_record")
#: In-flight rows of each state (QUEUED, STARTED, PENDING, RETRY), none of them due.
LIVE_ROWS_PER_STATE = 20
#: The finished rows span this fraction of ``RETENTION``, ending a minute before the fill.
SPAN_OF_RETENTION = 0.5
#: A kept fill is refilled once its oldest row gets this close to the retention cutoff.
REUSE_MARGIN = timedelta(hours=1)
#: Time budget of the publishing pass: large, so the pass publishes the whole backlog.
PUBLISH_BUDGET = 600.0
#: Prefix of the deterministic ids of the backlog rows (the same ids on every seeding).
PENDING_ID_PREFIX = "rt-bench-sweeper-pending-"
#: Out of every 1000 finished rows: cumulative thresholds of their states.
STATE_MIX = ((960, "SUCCESS"), (990, "FAILURE"), (995, "REVOKED"), (998, "EXPIRED"), (1000, "LOST"))
FAILURE_TRACEBACK = "".join(
    f'  File "example_project/demo/tasks.py", line {40 + n}, in always_fails\n' for n in range(6)
) + "example_project.demo.tasks.FlakyError: this task always fails\n"


# --- results --------------------------------------------------------------------------------------


@dataclass
class IdleResult:
    """Scenario 1: seconds of each timed pass, per-query timings, plans."""

    rows: int
    seconds: list[float]
    query_rows: list[tuple[str, int, float]] = field(default_factory=list)
    outside_sql_ms: float = 0.0
    broker_info_ms: float = 0.0

    @property
    def median_ms(self) -> float:
        """Median pass, in milliseconds."""
        return median(self.seconds) * 1000


@dataclass
class PublishResult:
    """Scenario 2: seconds of each run of the sweeper and of the plain Celery baseline."""

    tasks: int
    sweeper: list[float]
    plain: list[float]

    @property
    def sweeper_rate(self) -> float:
        """Tasks per second of the sweeper at its median run."""
        return self.tasks / median(self.sweeper)

    @property
    def plain_rate(self) -> float:
        """Tasks per second of plain ``send_task`` at its median run."""
        return self.tasks / median(self.plain)


# --- SQL helpers ----------------------------------------------------------------------------------


def _table() -> str:
    """The quoted name of the ledger table."""
    from django.db import connection

    from reliable_tasks.models import TaskRecord

    return connection.ops.quote_name(TaskRecord._meta.db_table)


def _execute(sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[tuple]:
    """Run one statement on the default connection; return its rows (empty if none)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []


def _insert_select(expressions: dict[str, str], source: str, params: dict[str, Any]) -> int:
    """``INSERT INTO`` the ledger ``SELECT`` one SQL expression per column ``FROM source``.

    Columns without an expression get their model default (as a parameter) or NULL, so a column
    added to ``TaskRecord`` later does not break the fill. Returns the number of rows inserted.
    """
    from django.db import connection

    from reliable_tasks.models import TaskRecord

    params = dict(params)
    fields = TaskRecord._meta.concrete_fields
    unknown = set(expressions) - {f.column for f in fields}
    if unknown:
        raise RuntimeError(f"the ledger has no column(s) {sorted(unknown)}: update the benchmark")
    columns, values = [], []
    for model_field in fields:
        if model_field.column in expressions:
            value = expressions[model_field.column]
        elif model_field.null:
            continue
        elif model_field.has_default():
            key = f"default_{model_field.column}"
            params[key] = model_field.get_db_prep_save(model_field.get_default(), connection)
            value = f"%({key})s"
        else:
            raise RuntimeError(f"no value for the NOT NULL column {model_field.column!r}")
        columns.append(connection.ops.quote_name(model_field.column))
        values.append(value)
    sql = (f"INSERT INTO {_table()} ({', '.join(columns)}) "
           f"SELECT {', '.join(values)} FROM {source}")
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def _finished_states() -> list[str]:
    from reliable_tasks.states import FINISHED_STATES

    return sorted(str(state) for state in FINISHED_STATES)


def _unfinished_states() -> list[str]:
    from reliable_tasks.states import FINISHED_STATES, TaskState

    return sorted(str(state) for state in TaskState.values if state not in FINISHED_STATES)


# --- the million finished rows --------------------------------------------------------------------


def _retention() -> timedelta:
    from reliable_tasks.conf import app_settings

    return timedelta(seconds=app_settings.RETENTION)


def fill_finished(rows: int) -> None:
    """Write ``rows`` finished rows with ``INSERT ... SELECT generate_series``, in chunks."""
    from django.utils import timezone

    span = _retention() * SPAN_OF_RETENTION
    end = timezone.now() - timedelta(minutes=1)
    state_case = "CASE " + " ".join(
        f"WHEN mod(i, 1000) < {limit} THEN '{state}'" for limit, state in STATE_MIX) + " END"
    source = (
        "generate_series(%(lo)s::int, %(hi)s::int) AS i, LATERAL (SELECT "
        "%(end)s::timestamptz - make_interval(secs => %(span)s::float8 * (%(n)s - i) / %(n)s) "
        f"AS created, {state_case} AS st) AS x"
    )
    history = (
        "jsonb_build_array(jsonb_build_object('attempt', 1, 'worker', 'celery@bench-' || mod(i, 8),"
        " 'started_at', to_jsonb(created + interval '15 milliseconds'),"
        " 'finished_at', to_jsonb(created + make_interval(secs => 0.02 + mod(i, 500) / 1000.0)),"
        " 'outcome', st))"
    )
    expressions = {
        "id": "gen_random_uuid()",
        "task_name": "(%(names)s::text[])[1 + mod(i, %(name_count)s)]",
        "args": "jsonb_build_array(mod(i, 1000), 7)",
        "kwargs": "'{}'::jsonb",
        "options": "'{}'::jsonb",
        "queue": "''",
        "state": "st",
        "adopted": "mod(i, %(name_count)s) = %(name_count)s - 1",
        "attempts": "CASE WHEN st = 'FAILURE' THEN 3 WHEN st = 'REVOKED' THEN 0 ELSE 1 END",
        "publish_attempts": "1",
        "publish_error": "''",
        "publish_claim": "''",
        "duplicate_deliveries": "0",
        "worker": "'celery@bench-' || mod(i, 8)",
        "created_at": "created",
        "published_at": "created + interval '3 milliseconds'",
        "started_at": "created + interval '15 milliseconds'",
        "finished_at": "created + make_interval(secs => 0.02 + mod(i, 500) / 1000.0)",
        "error_type": "CASE st WHEN 'FAILURE' THEN 'example_project.demo.tasks.FlakyError' "
                      "WHEN 'LOST' THEN 'reliable_tasks.WorkerLost' ELSE '' END",
        "error_message": "CASE st WHEN 'FAILURE' THEN 'this task always fails' "
                         "WHEN 'LOST' THEN 'The worker stopped heartbeating while running it.' "
                         "ELSE '' END",
        "traceback": "CASE WHEN st = 'FAILURE' THEN %(traceback)s ELSE '' END",
        "history": history,
    }
    params = {
        "end": end, "span": span.total_seconds(), "n": rows, "names": list(FILLER_NAMES),
        "name_count": len(FILLER_NAMES), "traceback": FAILURE_TRACEBACK,
    }
    started = time.perf_counter()
    for lo in range(1, rows + 1, FILL_CHUNK):
        hi = min(lo + FILL_CHUNK - 1, rows)
        _insert_select(expressions, source, {**params, "lo": lo, "hi": hi})
        log(f"  filled {hi:,} / {rows:,} rows ({time.perf_counter() - started:.1f} s)")


def prepare_ledger(rows: int, refill: bool) -> str:
    """Make the ledger hold ``rows`` finished rows and nothing else; say whether it refilled.

    Rows in unfinished states (in-flight rows and backlogs of earlier runs) are deleted first;
    the finished rows are kept when they are exactly a fill of ``rows`` still inside retention.
    """
    from django.utils import timezone

    table = _table()
    _execute(f"DELETE FROM {table} WHERE state = ANY(%s)", [_unfinished_states()])
    finished = _finished_states()
    count, oldest, names = _execute(
        f"SELECT count(*), min(finished_at), count(*) FILTER (WHERE NOT task_name = ANY(%s)) "
        f"FROM {table} WHERE state = ANY(%s)", [list(FILLER_NAMES), finished])[0]
    cutoff = timezone.now() - _retention() + REUSE_MARGIN
    if refill:
        reason = "--refill given"
    elif count != rows or names:
        reason = f"the ledger holds {count:,} finished rows, not a fill of {rows:,}"
    elif oldest is None or oldest < cutoff:
        reason = f"the oldest row (finished {oldest}) is too close to the retention cutoff"
    else:
        return (f"reused the {count:,} finished rows already in the ledger "
                f"(oldest finished {oldest:%Y-%m-%d %H:%M} UTC); --refill rebuilds them")
    log(f"filling the ledger with {rows:,} finished rows: {reason}")
    started = time.perf_counter()
    _execute(f"TRUNCATE TABLE {table}")
    fill_finished(rows)
    return f"filled {rows:,} finished rows in {time.perf_counter() - started:.1f} s ({reason})"


def insert_live_rows() -> None:
    """Rows in flight, none due: QUEUED; STARTED with a live lease; PENDING and RETRY later."""
    from django.utils import timezone

    from reliable_tasks.models import TaskRecord
    from reliable_tasks.states import TaskState

    now = timezone.now()
    later = now + timedelta(hours=1)
    records = []
    for n in range(LIVE_ROWS_PER_STATE):
        name = FILLER_NAMES[n % (len(FILLER_NAMES) - 1)]
        sent = now - timedelta(seconds=2)
        records += [
            TaskRecord(task_name=name, state=TaskState.QUEUED, created_at=sent,
                       published_at=sent, publish_attempts=1),
            TaskRecord(task_name=name, state=TaskState.STARTED, created_at=sent,
                       published_at=sent, publish_attempts=1, started_at=now, attempts=1,
                       worker="celery@bench-live", lease_expires_at=later),
            TaskRecord(task_name=name, state=TaskState.PENDING, created_at=now,
                       next_attempt_at=later),
            TaskRecord(task_name=name, state=TaskState.RETRY, created_at=sent, published_at=sent,
                       publish_attempts=1, attempts=1, next_attempt_at=later,
                       error_type="example_project.demo.tasks.FlakyError"),
        ]
    TaskRecord.objects.bulk_create(records)


def live_row_counts() -> dict[str, int]:
    """Rows per unfinished state."""
    table = _table()
    found = _execute(f"SELECT state, count(*) FROM {table} WHERE state = ANY(%s) GROUP BY state",
                     [_unfinished_states()])
    return {str(state): int(count) for state, count in found}


def vacuum_analyze() -> float:
    """``VACUUM ANALYZE`` the ledger (outside any transaction); return the seconds it took."""
    started = time.perf_counter()
    _execute(f"VACUUM ANALYZE {_table()}")
    return time.perf_counter() - started


def pin_broker_epoch(env: BenchEnvironment) -> None:
    """Record the private Redis as the broker already seen.

    The ledger database outlives the private Redis of each run: without this the first pass
    would take the new server for a broker that lost its data and publish the QUEUED rows again.
    """
    from django.utils import timezone

    from reliable_tasks.broker_epoch import broker_name
    from reliable_tasks.celery_app import get_celery_app
    from reliable_tasks.models import BrokerEpoch

    now = timezone.now()
    BrokerEpoch.objects.update_or_create(
        name=broker_name(get_celery_app()),
        defaults={"run_id": env.redis.run_id(), "seen_since": now, "requeue_before": None})


# --- measuring the queries of a pass --------------------------------------------------------------


def _template_shape(sql: str) -> str:
    """A query with its placeholder lists and savepoint names collapsed: equal for every batch."""
    text = re.sub(r"%s(?:, %s)+", "%s, ...", " ".join(sql.split()))
    return re.sub(r'SAVEPOINT "\w+"', "SAVEPOINT ...", text)


def abbreviate(sql: str) -> str:
    """A query as printed: table prefixes dropped, long column and value lists shortened."""
    text = re.sub(r'"\w+"\.(?=")', "", " ".join(sql.split()))

    def columns(match: re.Match[str]) -> str:
        names = match.group(1).split(", ")
        return f"SELECT {names[0]}, ... ({len(names)} columns) FROM" if len(names) > 4 else (
            match.group(0))

    def values(match: re.Match[str]) -> str:
        items = match.group(1).split(", ")
        return f"IN ({items[0]}, ... {len(items)} values)" if len(items) > 3 else match.group(0)

    text = re.sub(r"^SELECT (.+?) FROM", columns, text)
    text = re.sub(r"IN \(([^()]*)\)", values, text)
    text = re.sub(r"%s, \.\.\.", "%s...", text)
    return text


def abbreviate_plan_line(line: str) -> str:
    """A plan line with long array literals (``'{a,b,...}'::uuid[]``) shortened."""

    def array(match: re.Match[str]) -> str:
        items = match.group(1).split(",")
        return f"'{{{items[0]},... {len(items)} values}}'" if len(items) > 3 else match.group(0)

    return re.sub(r"'\{([^{}']*)\}'", array, line)


class QueryTimer:
    """A ``connection.execute_wrapper`` that times every query, by its shape and thread."""

    def __init__(self) -> None:
        """Start with no query seen."""
        self.calls: list[tuple[str, float, int]] = []

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool,
                 context: dict[str, Any]) -> Any:
        """Run the query and record how long it took."""
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.calls.append((_template_shape(sql), time.perf_counter() - started,
                               threading.get_ident()))


@contextlib.contextmanager
def timing_queries(timer: QueryTimer) -> Iterator[None]:
    """Time the queries of this thread's connection, and of connections opened meanwhile.

    A pass publishing a backlog runs a second loop in a helper thread, on a connection of its
    own: that connection gets the timer when it is opened.
    """
    from django.db import connection
    from django.db.backends.signals import connection_created

    def add_timer(sender: Any, connection: Any, **_: Any) -> None:
        connection.execute_wrappers.append(timer)

    connection_created.connect(add_timer, dispatch_uid="bench_sweeper.timing_queries")
    try:
        with connection.execute_wrapper(timer):
            yield
    finally:
        connection_created.disconnect(dispatch_uid="bench_sweeper.timing_queries")


def time_queries(
    passes: int, run_pass: Callable[[], object], setup: Callable[[], object] | None = None,
) -> tuple[list[tuple[str, int, float]], float]:
    """Time each query of ``passes`` passes (``setup()`` runs untimed before each).

    Returns one row per query shape, in order of first use: (shape, calls per pass, median
    milliseconds per pass, summed over every thread's connection), and the median milliseconds
    of a pass this thread spent outside its own queries.
    """
    per_pass: list[dict[str, list[float]]] = []
    outside: list[float] = []
    order: list[str] = []
    timer = QueryTimer()
    for _ in range(passes):
        if setup is not None:
            setup()
        timer.calls.clear()
        gc.collect()
        with timing_queries(timer):
            started = time.perf_counter()
            run_pass()
            total = time.perf_counter() - started
        by_shape: dict[str, list[float]] = {}
        for shape, seconds, _ in timer.calls:
            by_shape.setdefault(shape, []).append(seconds)
            if shape not in order:
                order.append(shape)
        per_pass.append(by_shape)
        here = threading.get_ident()
        outside.append(total - sum(seconds for _, seconds, thread in timer.calls
                                   if thread == here))
    rows = []
    for shape in order:
        calls = max(len(found.get(shape, [])) for found in per_pass)
        spent = median([sum(found.get(shape, [])) for found in per_pass]) * 1000
        rows.append((shape, calls, spent))
    return rows, median(outside) * 1000


def print_query_times(rows: Sequence[tuple[str, int, float]], outside_ms: float,
                      title: str) -> None:
    """Print the per-query timings of a pass."""
    print(f"\n{title}")
    print(f"  {'median ms':>9}  {'calls':>5}  query")
    for shape, calls, spent in rows:
        print(f"  {spent:9.3f}  {calls:5d}  {abbreviate(shape)}")
    print(f"  {outside_ms:9.3f}  {'':>5}  (outside this thread's queries: Redis, COMMIT of atomic "
          f"blocks, Python)")


@dataclass
class Plan:
    """The EXPLAIN of one captured query."""

    number: int
    sql: str
    lines: list[str]

    @property
    def text(self) -> str:
        """The plan as one string."""
        return "\n".join(self.lines)

    def seq_scans(self, table: str) -> list[str]:
        """Plan lines that scan ``table`` sequentially."""
        return [line.strip() for line in self.lines if re.search(rf"Seq Scan on {table}\b", line)]

    def indexes(self) -> list[str]:
        """Indexes the plan reads, in order of appearance."""
        found = re.findall(r"Index (?:Only )?Scan (?:Backward )?using (\S+)|Bitmap Index Scan on "
                           r"(\S+)", self.text)
        names = [a or b for a, b in found]
        return list(dict.fromkeys(names))

    def removed_by_filter(self) -> int:
        """The largest 'Rows Removed by Filter' of the plan's nodes."""
        counts = [int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", self.text)]
        return max(counts, default=0)


def _literal_shape(sql: str) -> str:
    """A captured query (literals inlined) with its literals and literal lists collapsed."""
    text = re.sub(r"'(?:[^']|'')*'", "?", sql)
    text = re.sub(r"\b\d+(?:\.\d+)?\b", "?", text)
    return re.sub(r"\?(?:(?:::\w+)?, \?)+", "?...", " ".join(text.split()))


def explain_captured(queries: Sequence[dict[str, Any]]) -> list[Plan]:
    """``EXPLAIN (ANALYZE, BUFFERS)`` each distinct SELECT/UPDATE/DELETE of ``queries``.

    The first query of each shape is replayed, in the captured order, inside one transaction
    that is rolled back: the UPDATEs and DELETEs really run (so their plans show real row
    counts) but change nothing, and the locks of ``FOR UPDATE`` are released at the end.
    """
    from django.db import connection, transaction

    seen: set[str] = set()
    plans: list[Plan] = []
    with transaction.atomic(), connection.cursor() as cursor:
        for query in queries:
            sql = query["sql"]
            verb = sql.lstrip().split(None, 1)[0].upper()
            shape = _literal_shape(sql)
            if verb not in {"SELECT", "UPDATE", "DELETE"} or shape in seen:
                continue
            seen.add(shape)
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
            plans.append(Plan(len(plans) + 1, sql, [row[0] for row in cursor.fetchall()]))
        transaction.set_rollback(True)
    return plans


def print_plans(plans: Sequence[Plan], title: str, env: BenchEnvironment) -> None:
    """Print the plans, a summary line under each; a sequential scan of the ledger is a problem."""
    table = _table().strip('"')
    print(f"\n{title}")
    for plan in plans:
        print(f"\n  Q{plan.number}: {abbreviate(plan.sql)}")
        for line in plan.lines:
            print(f"    {abbreviate_plan_line(line)}")
        seq = plan.seq_scans(table)
        indexes = ", ".join(plan.indexes()) or "none"
        removed = plan.removed_by_filter()
        note = f"  -> indexes: {indexes}; seq scans of the ledger: {len(seq)}"
        if removed:
            note += f"; most rows removed by a filter: {removed:,}"
        print(note)
        if seq:
            env.problem(f"Q{plan.number} scans the ledger sequentially: {abbreviate(plan.sql)}")


# --- scenario 1: an idle pass over a million rows -------------------------------------------------


def _is_idle(report: SweepReport) -> bool:
    """Whether the pass did nothing: every count and flag of its report is zero (or False)."""
    return not any(value for key, value in report.as_dict().items() if key != "seconds")


def bench_idle(env: BenchEnvironment, rows: int, passes: int, refill: bool) -> IdleResult:
    """Scenario 1: time ``sweep()`` over ``rows`` finished rows with nothing due."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from reliable_tasks.celery_app import get_celery_app
    from reliable_tasks.publisher import broker_run_id
    from reliable_tasks.sweeper import sweep

    print(prepare_ledger(rows, refill))
    insert_live_rows()
    live = live_row_counts()
    print(f"in-flight rows, none due: {live}")
    print(f"VACUUM ANALYZE of the ledger: {vacuum_analyze():.1f} s")
    size = _execute("SELECT pg_size_pretty(pg_total_relation_size(%s)), "
                    "pg_size_pretty(pg_relation_size(%s))", [_table().strip('"')] * 2)[0]
    print(f"ledger size: {size[0]} with indexes, {size[1]} of table")
    pin_broker_epoch(env)

    def checked_pass() -> None:
        report = sweep()
        if not _is_idle(report):
            env.problem(f"an idle pass did something: {report.as_dict()}")

    log(f"scenario 1: a warm-up pass, then {passes} timed passes over {rows:,} rows")
    checked_pass()
    seconds = []
    for _ in range(passes):
        gc.collect()
        started = time.perf_counter()
        report = sweep()
        seconds.append(time.perf_counter() - started)
        if not _is_idle(report):
            env.problem(f"an idle pass did something: {report.as_dict()}")
    result = IdleResult(rows=rows, seconds=seconds)
    result.query_rows, result.outside_sql_ms = time_queries(passes, checked_pass)
    app = get_celery_app()
    info = []
    for _ in range(passes):
        started = time.perf_counter()
        broker_run_id(app)
        info.append(time.perf_counter() - started)
    result.broker_info_ms = median(info) * 1000
    with CaptureQueriesContext(connection) as captured:
        checked_pass()
    if live_row_counts() != live:
        env.problem(f"the in-flight rows changed during idle passes: {live_row_counts()}")
    print(f"\nScenario 1: sweep() over {rows:,} finished rows, nothing due: "
          f"{', '.join(f'{s * 1000:.1f}' for s in seconds)} ms; median {result.median_ms:.1f} ms")
    print_query_times(result.query_rows, result.outside_sql_ms,
                      f"Queries of one idle pass (median of {passes} passes):")
    print(f"  (broker_run_id() alone, i.e. Redis INFO: median {result.broker_info_ms:.3f} ms)")
    plans = explain_captured(captured.captured_queries)
    print_plans(plans, "EXPLAIN (ANALYZE, BUFFERS) of the queries of one idle pass "
                       "(replayed in a rolled-back transaction):", env)
    return result


# --- scenario 2: publishing a backlog -------------------------------------------------------------


def clear_backlog(env: BenchEnvironment) -> None:
    """Delete the ``demo.noop`` rows and flush the private Redis."""
    from reliable_tasks.models import TaskRecord

    TaskRecord.objects.filter(task_name=NOOP).delete()
    env.redis.flush()


def seed_backlog(count: int) -> None:
    """``count`` PENDING ``demo.noop`` rows due about an hour ago, with the same ids every time."""
    from django.utils import timezone

    from reliable_tasks.conf import app_settings

    due = timezone.now() - timedelta(hours=1)
    source = ("generate_series(1, %(n)s::int) AS i, LATERAL (SELECT %(due)s::timestamptz "
              "+ make_interval(secs => i / 1000.0) AS next_at) AS x")
    expressions = {
        "id": "md5(%(prefix)s || i)::uuid",
        "task_name": "%(task)s",
        "state": "'PENDING'",
        "adopted": "false",
        "next_attempt_at": "next_at",
        "created_at": "next_at - make_interval(secs => %(grace)s::float8)",
    }
    params = {"n": count, "due": due, "prefix": PENDING_ID_PREFIX, "task": NOOP,
              "grace": app_settings.PUBLISH_GRACE}
    inserted = _insert_select(expressions, source, params)
    if inserted != count:
        raise RuntimeError(f"seeded {inserted} rows instead of {count}")


def _queued_messages(env: BenchEnvironment) -> int:
    with env.redis.client() as client:
        return int(client.llen(QUEUE_KEY))


def _noop_states() -> dict[str, int]:
    from django.db.models import Count

    from reliable_tasks.models import TaskRecord

    found = (TaskRecord.objects.filter(task_name=NOOP).order_by().values("state")
             .annotate(n=Count("id")).values_list("state", "n"))
    return {str(state): int(n) for state, n in found}


def run_sweeper_publish(env: BenchEnvironment, count: int, label: str) -> float:
    """Seed the backlog, time one ``sweep()`` publishing it, check Redis and the rows."""
    from reliable_tasks.sweeper import sweep

    clear_backlog(env)
    seed_backlog(count)
    gc.collect()
    started = time.perf_counter()
    report = sweep(time_budget=PUBLISH_BUDGET)
    seconds = time.perf_counter() - started
    expected = {"published": count, "publish_failed": 0, "pruned": 0,
                "expired_leases_retried": 0, "expired_leases_lost": 0, "broker_changed": False}
    wrong = {key: getattr(report, key) for key, value in expected.items()
             if getattr(report, key) != value}
    if wrong:
        env.problem(f"{label}: the pass reported {wrong}, expected {expected}")
    messages, states = _queued_messages(env), _noop_states()
    if messages != count:
        env.problem(f"{label}: Redis holds {messages} messages in {QUEUE_KEY!r}, not {count}")
    if states != {"QUEUED": count}:
        env.problem(f"{label}: the backlog rows are {states}, not {count} QUEUED")
    log(f"  {label}: sweeper published {report.published:,} in {seconds:.3f} s; "
        f"LLEN {QUEUE_KEY} = {messages:,}; rows {states}")
    return seconds


def run_plain_send(env: BenchEnvironment, count: int, label: str) -> float:
    """Time plain Celery ``app.send_task(NOOP)`` ``count`` times; check Redis and the ledger."""
    from example_project.celery import app

    clear_backlog(env)
    gc.collect()
    started = time.perf_counter()
    for _ in range(count):
        app.send_task(NOOP)
    seconds = time.perf_counter() - started
    messages, states = _queued_messages(env), _noop_states()
    if messages != count:
        env.problem(f"{label}: Redis holds {messages} messages in {QUEUE_KEY!r}, not {count}")
    if states:
        env.problem(f"{label}: plain send_task left ledger rows {states}")
    log(f"  {label}: plain send_task x {count:,} in {seconds:.3f} s; LLEN {QUEUE_KEY} = "
        f"{messages:,}")
    return seconds


def bench_publish(env: BenchEnvironment, count: int, runs: int) -> PublishResult:
    """Scenario 2: the sweeper publishing ``count`` due rows against plain ``send_task``."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from reliable_tasks.sweeper import sweep

    log(f"scenario 2: warm-up, then {runs} interleaved rounds of {count:,} tasks")
    # Warm-up of the sweeper, its queries captured for EXPLAIN below.
    clear_backlog(env)
    seed_backlog(count)
    with CaptureQueriesContext(connection) as captured:
        warm = sweep(time_budget=PUBLISH_BUDGET)
    if warm.published != count:
        env.problem(f"warm-up: the sweeper published {warm.published} of {count}")
    run_plain_send(env, count, "warm-up")
    sweeper, plain = [], []
    for round_number in range(runs):
        variants = ("sweeper", "plain") if round_number % 2 == 0 else ("plain", "sweeper")
        for variant in variants:
            label = f"round {round_number + 1} {variant}"
            if variant == "sweeper":
                sweeper.append(run_sweeper_publish(env, count, label))
            else:
                plain.append(run_plain_send(env, count, label))
    result = PublishResult(tasks=count, sweeper=sweeper, plain=plain)
    print(f"\nScenario 2: sweep() publishing {count:,} due rows: "
          f"{', '.join(f'{s:.3f}' for s in sweeper)} s; plain send_task x {count:,}: "
          f"{', '.join(f'{s:.3f}' for s in plain)} s")

    def seed() -> None:
        clear_backlog(env)
        seed_backlog(count)

    rows, outside_ms = time_queries(1, lambda: sweep(time_budget=PUBLISH_BUDGET), seed)
    print_query_times(rows, outside_ms, f"Queries of one pass publishing {count:,} rows "
                                        f"(one more run, timed per query; both publishing loops' "
                                        f"queries, which overlap in time, are counted):")
    clear_backlog(env)
    seed_backlog(count)
    plans = explain_captured(captured.captured_queries)
    print_plans(plans, f"EXPLAIN (ANALYZE, BUFFERS) of the queries of the warm-up pass publishing "
                       f"{count:,} rows (replayed on a fresh copy of the backlog, the same ids, in "
                       f"a rolled-back transaction; one batch of each query):", env)
    clear_backlog(env)
    return result


# --- the report -----------------------------------------------------------------------------------


def print_summary(idle: IdleResult, publish: PublishResult, passes: int, runs: int) -> None:
    """Print the plain table: scenario, median, goal, met?"""
    ratio = publish.sweeper_rate / publish.plain_rate
    def spread(seconds: Sequence[float], scale: float, unit: str) -> str:
        digits = 3 if unit == "s" else 1
        return f"{min(seconds) * scale:.{digits}f}-{max(seconds) * scale:.{digits}f} {unit}"

    rows = [
        (f"sweep() pass, {idle.rows:,} finished rows, nothing due",
         f"{idle.median_ms:.1f} ms", f"<= {SWEEP_GOAL_MS:g} ms",
         "yes" if idle.median_ms <= SWEEP_GOAL_MS else "NO",
         f"{passes}: {spread(idle.seconds, 1000, 'ms')}"),
        (f"sweep() publishing {publish.tasks:,} due rows",
         f"{publish.sweeper_rate:,.0f} tasks/s ({median(publish.sweeper):.3f} s)",
         f">= {PUBLISH_GOAL_RATE:,.0f} tasks/s",
         "yes" if publish.sweeper_rate >= PUBLISH_GOAL_RATE else "NO",
         f"{runs}: {spread(publish.sweeper, 1, 's')}"),
        (f"plain Celery send_task x {publish.tasks:,} (baseline)",
         f"{publish.plain_rate:,.0f} tasks/s ({median(publish.plain):.3f} s)", "-", "-",
         f"{runs}: {spread(publish.plain, 1, 's')}"),
        ("sweeper publish rate / plain send_task rate", f"{ratio:.2f}x", "-", "-", ""),
    ]
    headers = ("scenario", "median", "goal", "met?", "runs: min-max")
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    print("\nSummary")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_setup(env: BenchEnvironment) -> None:
    """Print what was measured against: database, Redis, the sweeper's settings."""
    from django.db import connection

    from reliable_tasks.conf import app_settings

    with env.redis.client() as client:
        redis_version = client.info("server")["redis_version"]
    settings = connection.settings_dict
    print(f"PostgreSQL: {_execute('SHOW server_version')[0][0]} at "
          f"{settings.get('HOST')}:{settings.get('PORT')}, database {settings['NAME']}")
    print(f"Redis: {redis_version}, private server {env.redis.url} (pid {env.redis.pid})")
    print(f"settings: SWEEP_BATCH_SIZE={app_settings.SWEEP_BATCH_SIZE}, "
          f"PUBLISH_GRACE={app_settings.PUBLISH_GRACE:g}, RETENTION={app_settings.RETENTION:g}, "
          f"SWEEP_INTERVAL={app_settings.SWEEP_INTERVAL:g} (default time budget "
          f"{max(app_settings.SWEEP_INTERVAL * 0.8, 1.0):g} s; the publishing pass gets "
          f"{PUBLISH_BUDGET:g} s)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run both scenarios and print the results; return 1 if a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refill", action="store_true",
                        help="rebuild the finished rows even if the ledger already has them")
    parser.add_argument("--rows", type=int, default=FINISHED_ROWS,
                        help=f"finished rows of scenario 1 (default {FINISHED_ROWS:,})")
    parser.add_argument("--pending", type=int, default=PENDING_ROWS,
                        help=f"due rows of scenario 2 (default {PENDING_ROWS:,})")
    parser.add_argument("--passes", type=int, default=7, help="timed idle passes (default 7)")
    parser.add_argument("--runs", type=int, default=5, help="timed publishing runs (default 5)")
    args = parser.parse_args(argv)
    with bench_environment() as env:
        print_setup(env)
        idle = bench_idle(env, args.rows, args.passes, args.refill)
        publish = bench_publish(env, args.pending, args.runs)
        print_summary(idle, publish, args.passes, args.runs)
        if env.problems:
            print(f"\n{len(env.problems)} problem(s) seen:")
            for problem in env.problems:
                print(f"  - {problem}")
        else:
            print("\nNo problems seen: every check after every pass and run passed.")
        return 1 if env.problems else 0


if __name__ == "__main__":
    sys.exit(main())
