"""Compare-and-set updates of rows chosen by id find them by primary key (PostgreSQL plans).

Statistics gathered while hardly any row was PENDING make PostgreSQL estimate one PENDING row;
a condition ``state IN (...)`` that an index on ``state`` can answer then wins over the primary
key, and every batch reads the whole backlog. Here 6,000 rows turn PENDING after ANALYZE saw
none, the backlog of a Redis outage in small.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from django.db import connection, transaction
from django.utils import timezone

from reliable_tasks import statements
from reliable_tasks.models import TaskRecord
from reliable_tasks.outbox import new_record
from reliable_tasks.querysets import state_still_in
from reliable_tasks.states import TaskState

pytestmark = pytest.mark.django_db(transaction=True)

FINISHED = 40_000
BACKLOG = 6_000
BATCH = 500


@pytest.fixture
def backlog_after_analyze() -> Iterator[list[str]]:
    """Ids of a PENDING backlog that the table's statistics have not seen."""
    if connection.vendor != "postgresql":
        pytest.skip("the plans of PostgreSQL")
    now = timezone.now()
    statements.insert_records([
        new_record({"task_name": "demo.add", "state": TaskState.SUCCESS, "attempts": 1,
                    "created_at": now, "finished_at": now})
        for _ in range(FINISHED)])
    table = TaskRecord._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {table}")
        cursor.execute(f"UPDATE {table} SET state = 'PENDING', finished_at = NULL WHERE id IN "
                       f"(SELECT id FROM {table} LIMIT %s) RETURNING id", [BACKLOG])
        ids = [str(row[0]) for row in cursor.fetchall()]
    yield ids[:BATCH]


def plan_of(sql: str, params: list[object]) -> str:
    """The plan's node lines, without the long lists of ids."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN {sql}", params)
        lines = [row[0].split("ANY ('{")[0] for row in cursor.fetchall()]
        transaction.set_rollback(True)
    return "\n".join(lines)


def assert_not_through_a_state_index(ours: str, naive: str) -> None:
    assert "rt_task_state" in naive, f"the statistics did not mislead the planner:\n{naive}"
    assert "rt_task_state" not in ours, ours


def test_the_queued_mark_finds_its_rows_without_the_state_indexes(backlog_after_analyze) -> None:
    sql, params = statements.queued_statement(backlog_after_analyze, 1,
                                              alias=connection.alias)
    naive_sql = re.sub(r"CASE WHEN (.*) THEN 1 ELSE 0 END = 1", r"\1", sql)

    assert_not_through_a_state_index(plan_of(sql, params), plan_of(naive_sql, params))
    assert statements.mark_queued(backlog_after_analyze, 1) == BATCH


def test_a_transition_finds_its_rows_without_the_state_indexes(backlog_after_analyze) -> None:
    rows = TaskRecord.objects.filter(id__in=backlog_after_analyze)
    ours = rows.filter(state_still_in([TaskState.PENDING])).query.sql_with_params()
    naive = rows.filter(state__in=[TaskState.PENDING]).query.sql_with_params()

    assert_not_through_a_state_index(plan_of(ours[0], list(ours[1])),
                                     plan_of(naive[0], list(naive[1])))
    assert rows.transition([TaskState.PENDING], state=TaskState.QUEUED) == BATCH
    assert rows.transition([TaskState.PENDING], state=TaskState.RETRY) == 0
