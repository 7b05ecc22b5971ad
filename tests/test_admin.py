"""The admin of the ledger and the workers, driven through Django's test client.

The changelist (columns, filters, search, bounded counting), the read-only detail page, the
"Retry selected tasks" action and the Retry button, the permission matrix (superuser, view-only
staff, staff allowed to retry), POST only with CSRF, escaping of whatever a task carries, and a
retry from the admin that really runs a failed task again on a worker.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin import DateFieldListFilter
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django_celery_results.models import TaskResult

from example_project.demo.models import Execution
from reliable_tasks.admin import widgets
from reliable_tasks.admin.pagination import EstimatedCountPaginator
from reliable_tasks.admin.search import hyphenated, id_prefix, id_prefix_range
from reliable_tasks.models import TaskRecord, WorkerHeartbeat
from reliable_tasks.states import TaskState

CHANGELIST = reverse("admin:reliable_tasks_taskrecord_changelist")
WORKERS = reverse("admin:reliable_tasks_workerheartbeat_changelist")
XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


# --- helpers and fixtures ------------------------------------------------------------------------


def make_record(state: str = TaskState.FAILURE, **fields: Any) -> TaskRecord:
    """A ledger row; a failed ``demo.record`` run by default."""
    now = timezone.now()
    defaults: dict[str, Any] = {
        "task_name": "demo.record", "args": ["token"], "attempts": 1, "max_attempts": 1,
        "worker": "w1@host", "queue": "celery", "started_at": now - timedelta(seconds=2),
        "finished_at": now,
    }
    if state == TaskState.FAILURE:
        defaults.update(
            error_type="example_project.demo.tasks.FlakyError",
            error_message="this task always fails",
            traceback='Traceback (most recent call last):\n  File "x.py"\nFlakyError: boom',
        )
    return TaskRecord.objects.create(state=state, **{**defaults, **fields})


def change_url(record: TaskRecord) -> str:
    return reverse("admin:reliable_tasks_taskrecord_change", args=[record.pk])


def retry_url(record: TaskRecord) -> str:
    return reverse("admin:reliable_tasks_taskrecord_retry", args=[record.pk])


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def state_of(record: TaskRecord) -> str:
    return TaskRecord.objects.values_list("state", flat=True).get(pk=record.pk)


def staff(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(
        content_type__app_label="reliable_tasks", codename__in=codenames))
    return user


def logged_in(user: User, **client_options: Any) -> Client:
    client = Client(**client_options)
    client.force_login(user)
    return client


@pytest.fixture
def admin_client_for() -> Callable[[str], Client]:
    """Return ``make(role)``: a client logged in as a superuser, a viewer or an operator."""

    def make(role: str) -> Client:
        if role == "superuser":
            user = User.objects.create_superuser("root", "root@example.com", "pw")
        elif role == "viewer":
            user = staff("viewer", "view_taskrecord", "view_workerheartbeat")
        elif role == "operator":
            user = staff("operator", "view_taskrecord", "retry_taskrecord")
        else:
            raise ValueError(role)
        return logged_in(user)

    return make


@pytest.fixture
def root(admin_client_for: Callable[[str], Client]) -> Client:
    return admin_client_for("superuser")


def action_post(*records: TaskRecord, confirm: bool, **extra: str) -> dict[str, Any]:
    data: dict[str, Any] = {"action": "retry_selected",
                            "_selected_action": [str(record.pk) for record in records]}
    if confirm:
        data["post"] = "yes"
    return {**data, **extra}


# --- the changelist ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_changelist_shows_id_task_badge_attempts_run_time_worker_and_error(root):
    record = make_record(attempts=3, worker="w7@box")

    response = root.get(CHANGELIST)

    assert response.status_code == 200
    html = response.content.decode()
    assert str(record.pk)[:8] in html
    assert "demo.record" in html
    assert 'data-state="FAILURE"' in html
    assert "w7@box" in html
    assert "2.000 s" in html
    assert "FlakyError: this task always fails" in html
    assert response.context["cl"].result_count == 1


@pytest.mark.django_db
def test_changelist_filters_by_state_task_name_queue_and_date(root):
    failed = make_record(TaskState.FAILURE, task_name="demo.record", queue="celery")
    done = make_record(TaskState.SUCCESS, task_name="demo.add", queue="fast")
    old = make_record(TaskState.SUCCESS, task_name="demo.add", queue="fast",
                      created_at=timezone.now() - timedelta(days=400))

    def listed(**params: str) -> set[uuid.UUID]:
        response = root.get(CHANGELIST, params)
        assert response.status_code == 200, params
        return {row.pk for row in response.context["cl"].result_list}

    assert listed() == {failed.pk, done.pk, old.pk}
    assert listed(state__exact="FAILURE") == {failed.pk}
    assert listed(task_name="demo.add") == {done.pk, old.pk}
    assert listed(queue="celery") == {failed.pk}
    date_filter = next(spec for spec in root.get(CHANGELIST).context["cl"].filter_specs
                       if isinstance(spec, DateFieldListFilter))
    past_week = dict(date_filter.links)["Past 7 days"]
    assert listed(**past_week) == {failed.pk, done.pk}
    assert listed(created_at__year=str(old.created_at.year)) >= {old.pk}
    html = root.get(CHANGELIST).content.decode()
    for choice in ("?task_name=demo.add", "?task_name=demo.record", "?queue=fast",
                   "?state__exact=FAILURE"):
        assert choice in html


@pytest.mark.django_db
def test_changelist_searches_by_id_prefix_whole_id_and_task_name(root):
    first = make_record(id=uuid.UUID("abcdef01-0000-4000-8000-000000000001"),
                        task_name="demo.record")
    second = make_record(id=uuid.UUID("12345678-0000-4000-8000-000000000002"),
                         task_name="demo.always_fails")

    def found(term: str) -> set[uuid.UUID]:
        response = root.get(CHANGELIST, {"q": term})
        assert response.status_code == 200
        return {row.pk for row in response.context["cl"].result_list}

    assert found("abcdef01") == {first.pk}
    assert found("ABCDEF01") == {first.pk}
    assert found(str(second.pk)) == {second.pk}
    assert found(second.pk.hex) == {second.pk}
    assert found("always_fails") == {second.pk}
    assert found("nothing-like-this") == set()


def test_an_id_prefix_becomes_the_range_of_ids_it_covers():
    low, high = id_prefix_range(id_prefix("ABC"))

    assert str(low) == "abc00000-0000-0000-0000-000000000000"
    assert str(high) == "abcfffff-ffff-ffff-ffff-ffffffffffff"
    assert id_prefix("demo.add") is None
    assert id_prefix("0" * 33) is None


@pytest.mark.parametrize(("digits", "text"), [
    ("abc", "abc"), ("abcdef01", "abcdef01"), ("abcdef012", "abcdef01-2"),
    ("0" * 32, "00000000-0000-0000-0000-000000000000")])
def test_an_id_prefix_is_written_like_the_start_of_a_uuid(digits, text):
    assert hyphenated(digits) == text


@pytest.mark.django_db
def test_changelist_never_counts_without_a_limit(root):
    for _ in range(3):
        make_record()

    with CaptureQueriesContext(connection) as queries:
        response = root.get(CHANGELIST, {"state__exact": "FAILURE"})

    assert response.status_code == 200
    counts = [query["sql"] for query in queries if "COUNT(" in query["sql"].upper()]
    assert counts, "the changelist should count the filtered rows (bounded)"
    assert all("LIMIT" in sql.upper() for sql in counts), counts


@pytest.mark.django_db
def test_past_the_limit_the_changelist_says_more_than(root, monkeypatch):
    monkeypatch.setattr(EstimatedCountPaginator, "exact_count_limit", 3)
    for _ in range(5):
        make_record()

    response = root.get(CHANGELIST, {"state__exact": "FAILURE"})

    assert response.context["cl"].result_count == 3
    assert "more than 3 task records" in response.content.decode()


@pytest.mark.django_db
def test_the_paginator_estimates_a_large_unfiltered_table_on_postgresql(root, monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("pg_class.reltuples is PostgreSQL's")
    TaskRecord.objects.bulk_create(
        [TaskRecord(task_name="demo.add", state=TaskState.SUCCESS) for _ in range(50)])
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {connection.ops.quote_name(TaskRecord._meta.db_table)}")
    monkeypatch.setattr(EstimatedCountPaginator, "exact_count_limit", 10)

    unfiltered = EstimatedCountPaginator(TaskRecord.objects.order_by("-created_at"), 5)
    with CaptureQueriesContext(connection) as queries:
        estimate = unfiltered.count
    filtered = EstimatedCountPaginator(
        TaskRecord.objects.filter(task_name="demo.add").order_by("-created_at"), 5)

    assert estimate == 50
    assert not unfiltered.count_is_exact and not unfiltered.count_is_capped
    assert not any("COUNT(" in query["sql"].upper() for query in queries)
    assert (filtered.count, filtered.count_is_capped) == (10, True)
    assert "about 50 task records" in root.get(CHANGELIST).content.decode()


@pytest.mark.django_db
def test_a_small_table_is_counted_exactly():
    for _ in range(4):
        make_record()

    paginator = EstimatedCountPaginator(TaskRecord.objects.order_by("-created_at"), 2)

    assert (paginator.count, paginator.count_is_exact, paginator.num_pages) == (4, True, 2)


# --- the detail page -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_detail_page_shows_arguments_history_traceback_duplicates_and_result(root):
    record = make_record(
        args=["token", {"nested": [1, 2]}], kwargs={"sleep": 0.5, "name": "é"},
        duplicate_deliveries=4,
        history=[
            {"attempt": 1, "worker": "w1@host", "started_at": "2024-05-01T10:00:00+00:00",
             "finished_at": "2024-05-01T10:00:02+00:00", "outcome": "FAILURE",
             "error": "FlakyError: this task always fails"},
            {"manual_retry": True, "from_state": "FAILURE", "at": "2024-05-01T11:00:00+00:00",
             "by": "root"},
        ],
    )
    result = TaskResult.objects.create(task_id=str(record.pk), status="FAILURE")

    response = root.get(change_url(record))

    assert response.status_code == 200
    html = response.content.decode()
    assert "&quot;nested&quot;: [\n      1,\n      2\n    ]" in html
    assert "&quot;sleep&quot;: 0.5" in html
    assert "é" in html
    assert '<table class="rt-history">' in html
    assert html.count("<tr><td>") == 2
    assert "<td>2024-05-01 10:00:00</td><td>2024-05-01 10:00:02</td><td>2.000 s</td>" in html
    assert "manual retry" in html
    assert "FAILURE &rarr; PENDING" in html
    assert '<pre class="rt-pre"' in html and "FlakyError: boom" in html
    assert '<div class="readonly">4</div>' in html
    result_url = reverse("admin:django_celery_results_taskresult_change", args=[result.pk])
    assert f'href="{result_url}"' in html


@pytest.mark.django_db
def test_detail_page_without_stored_result_has_no_result_link(root):
    record = make_record(TaskState.QUEUED)

    html = root.get(change_url(record)).content.decode()

    assert "rt-result-link" not in html


@pytest.mark.django_db
def test_the_ledger_cannot_be_added_to_edited_or_deleted_from_the_admin(root):
    record = make_record()

    detail = root.get(change_url(record))
    edit = root.post(change_url(record), {"task_name": "demo.add", "state": "SUCCESS"})
    add = root.get(reverse("admin:reliable_tasks_taskrecord_add"))
    delete = root.post(reverse("admin:reliable_tasks_taskrecord_delete", args=[record.pk]),
                       {"post": "yes"})
    actions = root.get(CHANGELIST).context["action_form"].fields["action"].choices

    assert 'name="_save"' not in detail.content.decode()
    assert (edit.status_code, add.status_code, delete.status_code) == (403, 403, 403)
    assert "delete_selected" not in dict(actions)
    record.refresh_from_db()
    assert (record.task_name, record.state) == ("demo.record", TaskState.FAILURE)


# --- permissions ---------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("role", "may_retry"),
                         [("superuser", True), ("viewer", False), ("operator", True)])
def test_only_users_with_the_retry_permission_see_and_use_retry(
        admin_client_for, role, may_retry):
    client = admin_client_for(role)
    record = make_record()

    changelist = client.get(CHANGELIST)
    detail = client.get(change_url(record))
    button = client.post(retry_url(record))
    action_form = changelist.context["action_form"]
    offered = dict(action_form.fields["action"].choices) if action_form else {}

    assert (changelist.status_code, detail.status_code) == (200, 200)
    assert ("retry_selected" in offered) is may_retry
    assert ('id="rt-retry-button"' in detail.content.decode()) is may_retry
    assert button.status_code == (302 if may_retry else 403)
    assert state_of(record) == (TaskState.PENDING if may_retry else TaskState.FAILURE)


@pytest.mark.django_db
def test_a_view_only_user_posting_the_action_changes_nothing(admin_client_for):
    viewer = admin_client_for("viewer")
    record = make_record()

    response = viewer.post(CHANGELIST, action_post(record, confirm=True), follow=True)

    assert response.status_code == 200
    assert state_of(record) == TaskState.FAILURE
    assert not LogEntry.objects.exists()
    assert not any("PENDING" in text for text in messages_of(response))


@pytest.mark.django_db
def test_retry_permission_without_view_permission_is_refused():
    client = logged_in(staff("blind", "retry_taskrecord"))
    record = make_record()

    assert client.post(retry_url(record)).status_code == 403
    assert client.get(CHANGELIST).status_code == 403
    assert state_of(record) == TaskState.FAILURE


@pytest.mark.django_db
def test_non_staff_are_sent_to_the_login_page():
    client = logged_in(User.objects.create_user("someone", password="pw"))
    record = make_record()

    response = client.post(retry_url(record))

    assert response.status_code == 302
    assert reverse("admin:login") in response["Location"]
    assert state_of(record) == TaskState.FAILURE


# --- the Retry button ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_retry_view_takes_post_only(root):
    record = make_record()

    response = root.get(retry_url(record))

    assert response.status_code == 405
    assert state_of(record) == TaskState.FAILURE


@pytest.mark.django_db
def test_the_retry_view_requires_the_csrf_token():
    client = logged_in(User.objects.create_superuser("root", "r@example.com", "pw"),
                       enforce_csrf_checks=True)
    record = make_record()

    refused = client.post(retry_url(record))
    page = client.get(change_url(record))
    token = page.context["csrf_token"]
    accepted = client.post(retry_url(record), {"csrfmiddlewaretoken": str(token)})

    assert refused.status_code == 403
    assert 'name="csrfmiddlewaretoken"' in page.content.decode()
    assert accepted.status_code == 302
    assert state_of(record) == TaskState.PENDING


@pytest.mark.django_db
def test_the_retry_button_resets_the_task_audits_it_and_returns_to_the_task(root):
    record = make_record(TaskState.LOST)
    filters = "_changelist_filters=state__exact%3DLOST"

    response = root.post(f"{retry_url(record)}?{filters}")
    page = root.get(response["Location"])

    assert response.status_code == 302
    assert response["Location"] == f"{change_url(record)}?{filters}"
    record.refresh_from_db()
    assert record.state == TaskState.PENDING
    assert record.history[-1]["manual_retry"] and record.history[-1]["by"] == "root"
    entry = LogEntry.objects.get(object_id=str(record.pk))
    assert (entry.user.username, entry.action_flag) == ("root", CHANGE)
    assert any("was reset to PENDING and will run again" in text
               for text in messages_of(page))


@pytest.mark.django_db
@pytest.mark.parametrize("state", [TaskState.SUCCESS, TaskState.STARTED, TaskState.QUEUED])
def test_no_retry_button_for_a_state_that_cannot_be_retried(root, state):
    record = make_record(state)

    detail = root.get(change_url(record)).content.decode()
    response = root.post(retry_url(record), follow=True)

    assert 'id="rt-retry-button"' not in detail
    assert state_of(record) == state
    assert any(f"it is {state}" in text for text in messages_of(response))


@pytest.mark.django_db
def test_the_retry_view_answers_404_for_an_unknown_task(root):
    unknown = reverse("admin:reliable_tasks_taskrecord_retry", args=[uuid.uuid4()])

    assert root.post(unknown).status_code == 404


# --- the action ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_action_asks_for_confirmation_before_changing_anything(root):
    failed, lost = make_record(TaskState.FAILURE), make_record(TaskState.LOST)
    done, running = make_record(TaskState.SUCCESS), make_record(TaskState.STARTED)

    response = root.post(CHANGELIST, action_post(failed, lost, done, running, confirm=False))

    assert response.status_code == 200
    html = response.content.decode()
    assert "2 tasks will be reset to PENDING" in html
    assert "2 selected tasks will be skipped" in html
    assert "1 STARTED, 1 SUCCESS" in html
    assert html.count('name="_selected_action"') == 4
    assert 'name="post" value="yes"' in html
    assert {state_of(row) for row in (failed, lost)} == {TaskState.FAILURE, TaskState.LOST}


@pytest.mark.django_db
def test_the_confirmed_action_retries_what_it_can_and_counts_the_rest_by_state(root):
    failed, revoked = make_record(TaskState.FAILURE), make_record(TaskState.REVOKED)
    expired = make_record(TaskState.EXPIRED)
    done, running = make_record(TaskState.SUCCESS), make_record(TaskState.STARTED)

    response = root.post(
        CHANGELIST, action_post(failed, revoked, expired, done, running, confirm=True),
        follow=True)

    assert [state_of(row) for row in (failed, revoked, expired, done, running)] == [
        TaskState.PENDING, TaskState.PENDING, TaskState.PENDING, TaskState.SUCCESS,
        TaskState.STARTED]
    assert messages_of(response) == [
        "3 tasks were reset to PENDING and will run again.",
        "2 tasks were skipped because of their states (1 STARTED, 1 SUCCESS): only tasks in "
        "EXPIRED, FAILURE, LOST, REVOKED can be retried.",
    ]
    assert LogEntry.objects.filter(action_flag=CHANGE).count() == 3


@pytest.mark.django_db
def test_the_action_never_force_retries_a_success(root):
    done = make_record(TaskState.SUCCESS)

    response = root.post(CHANGELIST, action_post(done, confirm=False), follow=True)
    confirmed = root.post(CHANGELIST, action_post(done, confirm=True), follow=True)

    assert state_of(done) == TaskState.SUCCESS
    assert messages_of(response) == [
        "1 task was skipped because of its state (1 SUCCESS): only tasks in "
        "EXPIRED, FAILURE, LOST, REVOKED can be retried."]
    assert messages_of(confirmed) == messages_of(response)


@pytest.mark.django_db
def test_the_action_on_all_matching_rows_keeps_the_selection_across_pages(root):
    failures = [make_record(TaskState.FAILURE) for _ in range(3)]
    done = make_record(TaskState.SUCCESS)
    url = f"{CHANGELIST}?state__exact=FAILURE"

    confirmation = root.post(url, action_post(failures[0], confirm=False, select_across="1"))
    confirmed = root.post(url, action_post(failures[0], confirm=True, select_across="1"),
                          follow=True)

    assert 'name="select_across" value="1"' in confirmation.content.decode()
    assert "3 tasks will be reset to PENDING" in confirmation.content.decode()
    assert {state_of(row) for row in failures} == {TaskState.PENDING}
    assert state_of(done) == TaskState.SUCCESS
    assert messages_of(confirmed) == ["3 tasks were reset to PENDING and will run again."]


@pytest.mark.django_db
def test_a_row_retried_meanwhile_is_skipped_with_its_new_state(root, monkeypatch):
    from reliable_tasks import ledger
    from reliable_tasks.admin import retries

    record = make_record(TaskState.FAILURE)
    real_retry = ledger.retry

    def another_operator_first(pk: Any, *, by: Any = None) -> TaskRecord:
        real_retry(pk, by="someone else")
        return real_retry(pk, by=by)

    monkeypatch.setattr(retries.ledger, "retry", another_operator_first)

    response = root.post(CHANGELIST, action_post(record, confirm=True), follow=True)

    assert messages_of(response) == [
        "1 task was skipped because of its state (1 PENDING): only tasks in "
        "EXPIRED, FAILURE, LOST, REVOKED can be retried."]


# --- escaping ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_script_in_task_data_is_shown_as_text(root):
    record = make_record(
        task_name=f"demo.{XSS}", args=[XSS], kwargs={XSS: XSS}, worker=XSS, queue=XSS,
        error_type=XSS, error_message=XSS, traceback=XSS,
        history=[{"attempt": 1, "worker": XSS, "outcome": XSS, "error": XSS,
                  "started_at": XSS, "finished_at": None},
                 {"manual_retry": True, "from_state": XSS, "at": XSS, "by": XSS}],
    )
    WorkerHeartbeat.objects.create(hostname=XSS)

    pages = {
        "changelist": root.get(CHANGELIST),
        "filtered": root.get(CHANGELIST, {"queue": XSS, "q": XSS}),
        "detail": root.get(change_url(record)),
        "confirmation": root.post(CHANGELIST, action_post(record, confirm=False)),
        "workers": root.get(WORKERS),
    }

    for name, response in pages.items():
        assert response.status_code == 200, name
        html = response.content.decode()
        assert XSS not in html, name
        assert "<script>alert" not in html, name
        assert XSS_ESCAPED in html, name


def test_every_widget_escapes_its_input():
    fragments = [
        widgets.state_badge(XSS), widgets.preformatted(XSS), widgets.pretty_json([XSS]),
        widgets.history_table([{"attempt": XSS, "worker": XSS, "outcome": XSS, "error": XSS}]),
        widgets.badge(XSS, XSS, key=XSS, title=XSS),
    ]

    for fragment in fragments:
        assert "<script" not in fragment
        assert "&lt;script&gt;" in fragment


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.0421, "0.042 s"), (12.46, "12.5 s"), (187, "3 min 07 s"), (7500, "2 h 05 min")])
def test_run_times_read_naturally(seconds, shown):
    assert widgets.format_duration(timedelta(seconds=seconds)) == shown


# --- workers -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_workers_page_shows_alive_and_dead_workers_read_only(admin_client_for):
    viewer = admin_client_for("viewer")
    now = timezone.now()
    WorkerHeartbeat.objects.create(hostname="w-alive@host", pid=11, running=2,
                                   last_seen_at=now)
    WorkerHeartbeat.objects.create(hostname="w-stale@host", pid=12,
                                   last_seen_at=now - timedelta(hours=1))
    stopped = WorkerHeartbeat.objects.create(hostname="w-stopped@host", pid=13,
                                             last_seen_at=now, stopped_at=now)

    response = viewer.get(WORKERS)
    detail = viewer.get(reverse("admin:reliable_tasks_workerheartbeat_change",
                                args=[stopped.pk]))

    html = response.content.decode()
    assert response.status_code == 200
    assert html.count('data-state="alive"') == 1
    assert html.count('data-state="dead"') == 2
    for text in ("w-alive@host", "w-stale@host", "w-stopped@host", ">11<", ">2<", "s ago",
                 "1 h 00 min ago"):
        assert text in html
    assert response.context["action_form"] is None
    assert detail.status_code == 200 and 'name="_save"' not in detail.content.decode()
    add = viewer.get(reverse("admin:reliable_tasks_workerheartbeat_add"))
    assert add.status_code == 403


# --- a real worker -------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


@pytest.mark.django_db(transaction=True)
def test_the_retry_action_runs_a_failed_task_again_on_a_worker(redis_server, celery_worker):
    celery_worker(redis_server)
    record = make_record(TaskState.FAILURE, args=["admin-retry"])
    client = logged_in(User.objects.create_superuser("root", "r@example.com", "pw"))

    response = client.post(CHANGELIST, action_post(record, confirm=True), follow=True)

    assert messages_of(response) == ["1 task was reset to PENDING and will run again."]
    wait_for(lambda: state_of(record) == TaskState.SUCCESS, what="the retried task's SUCCESS")
    assert Execution.objects.filter(token="admin-retry").count() == 1
    record.refresh_from_db()
    assert record.attempts == 2
    assert record.history[0]["manual_retry"] and record.history[0]["by"] == "root"
