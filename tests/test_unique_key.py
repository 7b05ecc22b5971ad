"""Deduplication keys: at most one unfinished task per ``unique_key``, enforced by the database.

Unit tests run in the test's transaction (nothing is published); those that commit use the
session's Redis. The race runs 20 OS processes against the test database; the worker test runs
a real worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from example_project.celery import app as celery_app
from example_project.demo.models import Execution
from example_project.demo.tasks import add, record, replaced
from reliable_tasks import ReliableTask, dispatch, dispatch_many, ledger, outbox, statements
from reliable_tasks.exceptions import DispatchError, DuplicateTask, RetryNotAllowed
from reliable_tasks.models import (
    KEY_HOLDING_STATES,
    LIVE_KEY_COLUMN,
    UNIQUE_KEY_MAX_LENGTH,
    TaskRecord,
)
from reliable_tasks.states import FINISHED_STATES, TaskState
from tests.test_execution import state_of, wait_for

FINISHED = sorted(FINISHED_STATES)


@celery_app.task(base=ReliableTask, name="tests.unique_key.report",
                 unique_key=lambda args, kwargs: f"report:{args[0]}" if args[0] else None)
def report(report_id: int, fmt: str = "pdf") -> str:
    """A task whose calls are keyed by their first argument (none for report 0)."""
    return f"{report_id}.{fmt}"


class StrictTask(ReliableTask):
    """A base class whose tasks refuse a second call with the same kwargs' ``name``."""

    unique_key = staticmethod(lambda args, kwargs: f"strict:{kwargs['name']}")
    on_conflict = "raise"


@celery_app.task(base=StrictTask, name="tests.unique_key.strict")
def strict(name: str) -> str:
    """A task of ``StrictTask``."""
    return name


@celery_app.task(base=ReliableTask, name="tests.unique_key.bad_attribute", unique_key="fixed")
def bad_attribute() -> None:
    """A task whose ``unique_key`` is a string, not a function."""


@celery_app.task(base=ReliableTask, name="tests.unique_key.bad_function",
                 unique_key=lambda args, kwargs: 42)
def bad_function() -> None:
    """A task whose ``unique_key`` function returns a number."""


@celery_app.task(base=ReliableTask, name="tests.unique_key.bad_policy", on_conflict="ignore")
def bad_policy() -> None:
    """A task whose ``on_conflict`` is not one of the two."""


def set_state(row: TaskRecord, state: str) -> TaskRecord:
    TaskRecord.objects.filter(pk=row.pk).update(state=state)
    row.refresh_from_db()
    return row


def keyed_rows(key: str) -> list[TaskRecord]:
    return list(TaskRecord.objects.filter(unique_key=key))


# --- the rule --------------------------------------------------------------------------------


def test_the_holding_states_are_every_state_but_the_finished_ones():
    assert set(KEY_HOLDING_STATES) == {state.value for state in TaskState} - FINISHED_STATES


@pytest.mark.django_db
@pytest.mark.parametrize("state", KEY_HOLDING_STATES)
def test_an_unfinished_holder_is_returned_and_nothing_is_recorded(state):
    first = set_state(dispatch(add, (1, 2), unique_key="report:42"), state)

    second = dispatch(add, (3, 4), unique_key="report:42")

    assert second.pk == first.pk
    assert (second.args, second.state) == ([1, 2], state)
    assert TaskRecord.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("state", FINISHED)
def test_a_finished_holder_frees_the_key(state):
    first = set_state(dispatch(add, (1, 2), unique_key="report:42"), state)

    second = dispatch(add, (3, 4), unique_key="report:42")

    assert second.pk != first.pk
    assert {row.pk for row in keyed_rows("report:42")} == {first.pk, second.pk}
    assert dispatch(add, (5, 6), unique_key="report:42").pk == second.pk


@pytest.mark.django_db
def test_raise_names_the_holder_and_records_nothing():
    first = dispatch(add, (1, 2), unique_key="report:42")

    with pytest.raises(DuplicateTask) as raised:
        dispatch(add, (3, 4), unique_key="report:42", on_conflict="raise")

    assert isinstance(raised.value, DispatchError)
    assert raised.value.existing.pk == first.pk
    assert str(first.pk) in str(raised.value) and "'report:42'" in str(raised.value)
    assert TaskRecord.objects.count() == 1


@pytest.mark.django_db
def test_keys_compare_exactly_on_every_database():
    """MariaDB's default collations ignore case and trailing spaces; the key's column does not."""
    keys = ["report:42", "Report:42", "report:42 ", "réport:42", "report:42\u00a0"]
    rows = [dispatch(add, (1, 2), unique_key=key) for key in keys]

    assert len({row.pk for row in rows}) == len(keys)
    for key, row in zip(keys, rows, strict=True):
        assert dispatch(add, (1, 2), unique_key=key).pk == row.pk
    assert TaskRecord.objects.count() == len(keys)


@pytest.mark.django_db
def test_calls_without_a_key_never_collide():
    rows = [dispatch(add, (1, 2)) for _ in range(3)] + [dispatch(add, (1, 2), unique_key=None)]
    assert len({row.pk for row in rows}) == 4
    assert not TaskRecord.objects.filter(unique_key__isnull=False).exists()


@pytest.mark.django_db(transaction=True)
def test_a_conflict_leaves_the_callers_transaction_usable(shared_redis):
    with transaction.atomic():
        first = dispatch(add, (1, 2), unique_key="report:42")
        assert dispatch(add, (3, 4), unique_key="report:42").pk == first.pk
        with pytest.raises(DuplicateTask):
            dispatch(add, (3, 4), unique_key="report:42", on_conflict="raise")
        other = dispatch(add, (5, 6), unique_key="report:43")
        assert TaskRecord.objects.count() == 2, "the transaction still answers"

    assert set(TaskRecord.objects.values_list("pk", "state")) == {
        (first.pk, TaskState.QUEUED), (other.pk, TaskState.QUEUED)}
    assert shared_redis.client().llen("celery") == 2, "the returned holder is not sent again"


@pytest.mark.django_db(transaction=True)
def test_a_conflict_in_autocommit_returns_the_holder(shared_redis):
    first = dispatch(add, (1, 2), unique_key="report:42")
    assert dispatch(add, (3, 4), unique_key="report:42").pk == first.pk
    with pytest.raises(DuplicateTask):
        dispatch(add, (3, 4), unique_key="report:42", on_conflict="raise")
    assert TaskRecord.objects.count() == 1
    assert shared_redis.client().llen("celery") == 1


# --- a holder that finishes between the conflict and the look-up -----------------------------


@pytest.mark.django_db
def test_a_holder_finishing_before_the_look_up_frees_the_key_and_the_insert_is_tried_again(
        monkeypatch):
    holder = dispatch(add, (1, 2), unique_key="report:42")
    real_look_up = outbox.key_holder

    def finished_meanwhile(key: str) -> TaskRecord | None:
        TaskRecord.objects.filter(pk=holder.pk).update(state=TaskState.SUCCESS)
        return real_look_up(key)

    monkeypatch.setattr(outbox, "key_holder", finished_meanwhile)
    second = dispatch(add, (3, 4), unique_key="report:42", on_conflict="raise")

    assert second.pk != holder.pk
    assert TaskRecord.objects.get(pk=second.pk).state == TaskState.PENDING


@pytest.mark.django_db
def test_a_key_taken_and_freed_again_and_again_gives_up_after_a_bounded_number_of_tries(
        monkeypatch):
    dispatch(add, (0, 0), unique_key="report:42")
    real_look_up = outbox.key_holder
    looks: list[str] = []

    def churn(key: str) -> TaskRecord | None:
        # Another process finishes the holder, then dispatches the key again, every time.
        TaskRecord.objects.filter(unique_key=key).update(state=TaskState.SUCCESS)
        found = real_look_up(key)
        TaskRecord.objects.create(task_name="demo.add", unique_key=key)
        looks.append(key)
        return found

    monkeypatch.setattr(outbox, "key_holder", churn)
    with pytest.raises(DispatchError, match="held, then free, 5 times"):
        dispatch(add, (3, 4), unique_key="report:42")

    assert len(looks) == 5
    assert not TaskRecord.objects.filter(args=[3, 4]).exists()


# --- ReliableTask calls and per-task defaults ------------------------------------------------


@pytest.mark.django_db
def test_apply_async_returns_the_holders_id_or_raises():
    first = add.apply_async((1, 2), unique_key="sum")

    again = add.apply_async((3, 4), unique_key="sum")
    with pytest.raises(DuplicateTask) as raised:
        add.apply_async((3, 4), unique_key="sum", on_conflict="raise")

    assert again.id == first.id
    assert str(raised.value.existing.pk) == first.id
    assert TaskRecord.objects.get().unique_key == "sum"
    assert "unique_key" not in TaskRecord.objects.get().options, "never sent to Celery"


@pytest.mark.django_db
def test_a_tasks_default_key_applies_to_delay_apply_async_and_dispatch():
    first = report.delay(42)

    assert report.apply_async((42,), {"fmt": "csv"}).id == first.id
    assert dispatch(report, (42,)).pk == uuid.UUID(first.id)
    assert dispatch_many([report.s(42)])[0].pk == uuid.UUID(first.id)
    assert TaskRecord.objects.get(pk=first.id).unique_key == "report:42"
    assert report.delay(43).id != first.id
    assert report.delay(0).id != report.delay(0).id, "None: no key"


@pytest.mark.django_db
def test_a_calls_own_options_win_over_the_tasks():
    first = report.delay(42)

    assert report.apply_async((42,), unique_key=None).id != first.id, "None opts out"
    assert report.apply_async((42,), unique_key="other").id != first.id
    with pytest.raises(DuplicateTask):
        report.apply_async((42,), on_conflict="raise")
    assert strict.apply_async(kwargs={"name": "x"}, on_conflict="return_existing").id == (
        strict.apply_async(kwargs={"name": "x"}, on_conflict="return_existing").id)


@pytest.mark.django_db
def test_a_base_class_may_set_the_key_and_the_policy():
    first = strict.delay(name="x")

    with pytest.raises(DuplicateTask) as raised:
        strict.delay(name="x")

    assert str(raised.value.existing.pk) == first.id
    assert TaskRecord.objects.get().unique_key == "strict:x"


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("options", "message"), [
    ({"unique_key": 42}, "unique_key must be a non-empty string or None, not 42"),
    ({"unique_key": b"report"}, "unique_key must be a non-empty string"),
    ({"unique_key": ""}, "unique_key must be a non-empty string or None, not ''"),
    ({"unique_key": "k" * (UNIQUE_KEY_MAX_LENGTH + 1)}, "256 characters long, more than"),
    ({"unique_key": "k", "on_conflict": "ignore"},
     "on_conflict must be 'return_existing' or 'raise', not 'ignore'"),
])
def test_bad_options_are_refused_before_anything_is_recorded(options, message):
    with pytest.raises(DispatchError, match=message):
        dispatch(add, (1, 2), **options)
    with pytest.raises(DispatchError, match=message):
        add.apply_async((1, 2), **options)
    with pytest.raises(DispatchError, match=message):
        dispatch_many([add.s(1, 1).set(unique_key="fine"), add.s(1, 2).set(**options)])
    assert TaskRecord.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(("task", "message"), [
    (bad_attribute, "tests.unique_key.bad_attribute.unique_key must be a function of "
                    r"\(args, kwargs\)"),
    (bad_function, r"tests.unique_key.bad_function.unique_key\(args, kwargs\) must be a "
                   "non-empty string or None, not 42"),
])
def test_a_bad_task_default_key_is_refused(task, message):
    with pytest.raises(DispatchError, match=message):
        task.delay()
    assert TaskRecord.objects.count() == 0


@pytest.mark.django_db
def test_a_bad_task_policy_is_refused_for_keyed_calls():
    with pytest.raises(DispatchError, match="tests.unique_key.bad_policy.on_conflict must be"):
        bad_policy.apply_async(unique_key="k")
    assert TaskRecord.objects.count() == 0


@pytest.mark.django_db
def test_the_longest_key_fits():
    key = "é" * UNIQUE_KEY_MAX_LENGTH
    first = dispatch(add, (1, 2), unique_key=key)
    assert dispatch(add, (1, 2), unique_key=key).pk == first.pk
    assert TaskRecord.objects.get().unique_key == key


# --- dispatch_many ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_dispatch_many_keys_each_call(shared_redis):
    held = dispatch(add, (0, 0), unique_key="a")

    results = dispatch_many([
        add.s(1, 1).set(unique_key="a"),
        ("demo.add", (2, 2), None, {"unique_key": "b"}),
        add.s(3, 3),
        {"task": "demo.add", "args": (4, 4), "options": {"unique_key": "b"}},
        add.s(5, 5),
    ])

    assert results[0].pk == held.pk
    assert results[3].pk == results[1].pk, "a key repeated in the batch: its first call holds it"
    assert len({result.pk for result in results}) == 4
    assert TaskRecord.objects.count() == 4
    assert shared_redis.client().llen("celery") == 1 + 3, "one sent before, three new rows"


@pytest.mark.django_db(transaction=True)
def test_dispatch_many_raising_records_none_of_the_batch(shared_redis):
    dispatch(add, (0, 0), unique_key="a")

    with pytest.raises(DuplicateTask):
        dispatch_many([add.s(1, 1), add.s(2, 2).set(unique_key="b"),
                       add.s(3, 3).set(unique_key="a", on_conflict="raise")])

    assert TaskRecord.objects.count() == 1
    assert shared_redis.client().llen("celery") == 1


@pytest.mark.django_db(transaction=True)
def test_dispatch_many_inserts_keyed_calls_in_one_statement_where_the_database_skips_conflicts(
        shared_redis):
    def inserts(calls: list[Any]) -> tuple[list[TaskRecord], int]:
        with CaptureQueriesContext(connection) as queries:
            results = dispatch_many(calls)
        return results, sum(query["sql"].startswith("INSERT") for query in queries)

    _unkeyed, unkeyed_inserts = inserts([add.s(index, index) for index in range(60)])
    TaskRecord.objects.all().delete()
    held = dispatch(add, (0, 0), unique_key="k:0")

    results, keyed_inserts = inserts(
        [add.s(index, index).set(unique_key=f"k:{index % 40}") for index in range(60)])

    if statements.inserts_skipping_conflicts(connection.alias):
        assert keyed_inserts == unkeyed_inserts  # the statements of the calls without keys
    else:  # MySQL and MariaDB: one INSERT per call (a refused one is not captured)
        assert keyed_inserts == 39
    assert results[0].pk == results[40].pk == held.pk
    assert [results[index + 40].pk for index in range(1, 20)] == [
        results[index].pk for index in range(1, 20)], "the first call of a key holds it"
    assert TaskRecord.objects.count() == 40
    assert shared_redis.client().llen("celery") == 60 + 40


@pytest.mark.django_db
def test_a_held_key_in_a_transaction_leaves_it_usable_and_needs_no_savepoint_where_skipped():
    with transaction.atomic():
        first = dispatch(add, (1, 1), unique_key="k")
        with CaptureQueriesContext(connection) as queries:
            second = dispatch(add, (2, 2), unique_key="k")
        third = dispatch(add, (3, 3), unique_key="other")

    assert second.pk == first.pk and third.pk != first.pk
    savepoints = [query for query in queries if "SAVEPOINT" in query["sql"].upper()]
    if statements.inserts_skipping_conflicts(connection.alias):
        assert savepoints == []
    else:  # MySQL and MariaDB: the refused INSERT is undone by its savepoint
        assert savepoints
    assert TaskRecord.objects.count() == 2


# --- manual retries and reused task ids ------------------------------------------------------


@pytest.mark.django_db
def test_a_manual_retry_is_refused_while_another_task_holds_the_key():
    failed = set_state(dispatch(add, (1, 2), unique_key="report:42"), TaskState.FAILURE)
    holder = dispatch(add, (3, 4), unique_key="report:42")

    with pytest.raises(RetryNotAllowed, match=f"while demo.add\\[{holder.pk}\\] \\(PENDING\\) "
                                              "holds its unique key 'report:42'"):
        ledger.retry(failed)

    assert TaskRecord.objects.get(pk=failed.pk).state == TaskState.FAILURE
    assert TaskRecord.objects.count() == 2, "the caller's transaction goes on"


@pytest.mark.django_db
def test_a_manual_retry_takes_the_key_back_when_it_is_free():
    failed = set_state(dispatch(add, (1, 2), unique_key="report:42"), TaskState.FAILURE)

    assert ledger.retry(failed).state == TaskState.PENDING
    assert dispatch(add, (3, 4), unique_key="report:42").pk == failed.pk


@pytest.mark.django_db
@pytest.mark.parametrize("on_conflict", ["return_existing", "raise"])
def test_a_reused_task_id_whose_key_is_held_elsewhere_leaves_its_finished_row(on_conflict):
    done = set_state(dispatch(add, (1, 2), unique_key="old"), TaskState.SUCCESS)
    holder = dispatch(add, (3, 4), unique_key="new")

    if on_conflict == "raise":
        with pytest.raises(DuplicateTask):
            dispatch(add, (5, 6), task_id=str(done.pk), unique_key="new", on_conflict="raise")
    else:
        result = add.apply_async((5, 6), task_id=str(done.pk), unique_key="new")
        assert result.id == str(holder.pk)

    done.refresh_from_db()
    assert (done.state, done.args, done.unique_key) == (TaskState.SUCCESS, [1, 2], "old")


@pytest.mark.django_db
def test_a_reused_task_id_takes_its_finished_row_over_with_the_calls_key():
    done = set_state(dispatch(add, (1, 2), unique_key="old"), TaskState.SUCCESS)

    again = dispatch(add, (5, 6), task_id=str(done.pk), unique_key="new")

    stored = TaskRecord.objects.get(pk=done.pk)
    assert again.pk == done.pk
    assert (stored.state, stored.args, stored.unique_key) == (TaskState.PENDING, [5, 6], "new")
    assert dispatch(add, (7, 8), unique_key="new").pk == done.pk
    assert dispatch(add, (7, 8), unique_key="old").pk != done.pk, "the old key is free"


@pytest.mark.django_db
def test_a_reused_task_id_with_a_new_id_conflict_returns_the_holder():
    holder = dispatch(add, (1, 2), unique_key="k")
    fresh_id = str(uuid.uuid4())

    assert dispatch(add, (3, 4), task_id=fresh_id, unique_key="k").pk == holder.pk
    assert not TaskRecord.objects.filter(pk=fresh_id).exists()


@pytest.mark.django_db
def test_a_replacement_keeps_the_replaced_tasks_key_unless_it_brings_its_own():
    row = set_state(dispatch(replaced, ("total", 1), unique_key="work:1"), TaskState.REPLACED)

    dispatch("demo.total", ([1, 2],), task_id=str(row.pk))

    stored = TaskRecord.objects.get(pk=row.pk)
    assert (stored.task_name, stored.state, stored.unique_key) == (
        "demo.total", TaskState.PENDING, "work:1")
    assert dispatch(add, (1, 1), unique_key="work:1").pk == row.pk, "still held"

    set_state(stored, TaskState.REPLACED)
    dispatch("demo.total", ([3],), task_id=str(row.pk), unique_key="work:2")
    assert TaskRecord.objects.get(pk=row.pk).unique_key == "work:2"


@pytest.mark.django_db
def test_a_finished_row_taken_over_by_a_call_without_a_key_drops_its_key():
    done = set_state(dispatch(add, (1, 2), unique_key="old"), TaskState.FAILURE)

    dispatch(add, (1, 2), task_id=str(done.pk))

    assert TaskRecord.objects.get(pk=done.pk).unique_key is None


# --- admin -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_admin_finds_a_task_by_its_key_and_shows_it(admin_client):
    keyed = dispatch(add, (1, 2), unique_key="report:42")
    dispatch(add, (1, 2), unique_key="report:421")

    page = admin_client.get(reverse("admin:reliable_tasks_taskrecord_changelist"),
                            {"q": "report:42"})
    detail = admin_client.get(reverse("admin:reliable_tasks_taskrecord_change",
                                      args=[keyed.pk]))

    assert page.status_code == 200
    assert [row.pk for row in page.context["cl"].result_list] == [keyed.pk]
    assert detail.status_code == 200
    assert "report:42" in detail.content.decode()
    assert "Unique key" in detail.content.decode()


# --- schema ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_on_mariadb_the_generated_column_holds_exactly_the_unfinished_states():
    if connection.vendor != "mysql":
        pytest.skip("the generated column exists on MySQL and MariaDB only")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT GENERATION_EXPRESSION, COLLATION_NAME FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s AND COLUMN_NAME = %s",
            [TaskRecord._meta.db_table, LIVE_KEY_COLUMN])
        expression, collation = cursor.fetchone()
    quoted = {part.strip(" '") for part in expression.split("in (")[1].split(")")[0].split(",")}
    assert quoted == set(KEY_HOLDING_STATES)
    assert collation.endswith("_bin")


@pytest.fixture
def at_0008() -> Iterator[Callable[[], Any]]:
    """The schema of migration 0008; yields ``migrate_forward()``. The latest schema is
    restored at teardown whatever happened."""
    executor = MigrationExecutor(connection)
    executor.migrate([("reliable_tasks", "0008_taskrecord_return_value")])
    executor.loader.build_graph()

    def migrate_forward() -> Any:
        forward = MigrationExecutor(connection)
        forward.migrate(forward.loader.graph.leaf_nodes())
        return forward

    try:
        yield migrate_forward
    finally:
        migrate_forward()


@pytest.mark.django_db(transaction=True)
def test_migration_0009_on_a_table_with_rows(at_0008):
    old = MigrationExecutor(connection).loader.project_state(
        ("reliable_tasks", "0008_taskrecord_return_value")).apps.get_model(
        "reliable_tasks", "TaskRecord")
    ids = [old.objects.create(task_name="demo.add", args=[i, i], state=state).pk
           for i, state in enumerate([*KEY_HOLDING_STATES, *FINISHED])]

    at_0008()

    assert set(TaskRecord.objects.values_list("pk", flat=True)) == set(ids)
    assert set(TaskRecord.objects.values_list("unique_key", flat=True)) == {None}
    first = dispatch(add, (1, 2), unique_key="after")
    with pytest.raises(DuplicateTask):
        dispatch(add, (3, 4), unique_key="after", on_conflict="raise")
    set_state(first, TaskState.SUCCESS)
    assert dispatch(add, (3, 4), unique_key="after").pk != first.pk


# --- many processes at once ------------------------------------------------------------------

_RACER = r"""
import json, os, sys, time
import django
django.setup()
from django.db import connection, transaction
from reliable_tasks import dispatch
from reliable_tasks.exceptions import DuplicateTask

index, go_file, ready_dir, policy = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
connection.ensure_connection()
open(os.path.join(ready_dir, str(index)), "w").close()
while not os.path.exists(go_file):
    time.sleep(0.005)
try:
    with transaction.atomic():
        row = dispatch("demo.add", (index, 0), unique_key="race:1", on_conflict=policy)
        time.sleep(0.2)  # hold the new row uncommitted while the others insert
    outcome = "created" if row.args == [index, 0] else "existing"
except DuplicateTask as exc:
    row, outcome = exc.existing, "duplicate"
print(json.dumps({"outcome": outcome, "id": str(row.pk)}))
"""

_RACERS = 20


def race(worker_env, server, tmp_path: Path, policy: str) -> list[dict[str, str]]:
    """Start ``_RACERS`` processes, let them dispatch the same key at once, return outcomes."""
    ready, go = tmp_path / f"ready-{policy}", tmp_path / f"go-{policy}"
    ready.mkdir()
    env = {**os.environ, **worker_env(server)}
    processes = [subprocess.Popen([sys.executable, "-c", _RACER, str(i), str(go), str(ready),
                                   policy], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for i in range(_RACERS)]
    try:
        wait_for(lambda: len(list(ready.iterdir())) == _RACERS, timeout=120,
                 what="every process connected")
        go.touch()
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    return [json.loads(stdout) for stdout, _ in outputs]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("policy", ["return_existing", "raise"])
def test_twenty_processes_dispatching_one_key_at_once_make_one_row(
        policy, worker_env, shared_redis, tmp_path):
    outcomes = race(worker_env, shared_redis, tmp_path, policy)

    rows = keyed_rows("race:1")
    assert len(rows) == 1
    losers = [item for item in outcomes if item["outcome"] != "created"]
    assert [item["outcome"] for item in outcomes].count("created") == 1
    expected = "existing" if policy == "return_existing" else "duplicate"
    assert {item["outcome"] for item in losers} == {expected}
    assert len(losers) == _RACERS - 1
    assert {item["id"] for item in outcomes} == {str(rows[0].pk)}
    assert shared_redis.client().llen("celery") == 1


# --- a real worker ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_keyed_task_runs_and_its_key_is_free_once_it_has_finished(redis_server, celery_worker):
    celery_worker(redis_server)
    first = record.apply_async(("keyed-1", 1.5), unique_key="job:1")
    wait_for(lambda: state_of(first.id) == TaskState.STARTED, what="STARTED")

    assert record.apply_async(("keyed-2",), unique_key="job:1").id == first.id
    wait_for(lambda: state_of(first.id) == TaskState.SUCCESS, what="SUCCESS")
    second = record.apply_async(("keyed-3",), unique_key="job:1")
    wait_for(lambda: state_of(second.id) == TaskState.SUCCESS, what="second SUCCESS")

    assert second.id != first.id
    assert sorted(Execution.objects.values_list("token", flat=True)) == ["keyed-1", "keyed-3"]
    time.sleep(0.5)
    assert TaskRecord.objects.get(pk=first.id).duplicate_deliveries == 0
