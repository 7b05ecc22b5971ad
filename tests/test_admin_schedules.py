"""The admin of periodic schedules, driven through Django's test client.

The timing in words, the form (registered tasks, JSON fields, model errors on their fields), the
next and last runs read from RedBeat in one round trip per page, the sync state, the actions
enable, disable, run now and push now with their permissions (superuser, view-only staff, staff
with one permission each), POST only, and escaping of whatever a schedule holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from example_project.celery import app as celery_app
from example_project.demo.models import Execution
from reliable_tasks import redbeat_store
from reliable_tasks.admin import schedules as schedule_admin
from reliable_tasks.admin.phrases import describe_timing
from reliable_tasks.forms import PeriodicScheduleForm, task_choices
from reliable_tasks.models import PeriodicSchedule, TaskRecord
from reliable_tasks.states import TaskState
from reliable_tasks.sync import push_schedules

CHANGELIST = reverse("admin:reliable_tasks_periodicschedule_changelist")
ADD = reverse("admin:reliable_tasks_periodicschedule_add")
XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
ALL_ACTIONS = {"delete_selected", "enable_schedules", "disable_schedules", "run_now", "push_now"}


# --- helpers -------------------------------------------------------------------------------------


def make(name: str = "every-minute", **fields: Any) -> PeriodicSchedule:
    defaults: dict[str, Any] = {"task": "demo.add", "args": [1, 2], "interval_seconds": 60}
    return PeriodicSchedule.objects.create(name=name, **{**defaults, **fields})


def staff(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(
        content_type__app_label="reliable_tasks", codename__in=codenames))
    return user


def logged_in(user: User, **client_options: Any) -> Client:
    client = Client(**client_options)
    client.force_login(user)
    return client


ROLES: dict[str, tuple[str, ...]] = {
    "viewer": ("view_periodicschedule", "view_taskrecord"),
    "editor": ("view_periodicschedule", "change_periodicschedule"),
    "runner": ("view_periodicschedule", "run_periodicschedule"),
    "pusher": ("view_periodicschedule", "push_periodicschedule"),
}


@pytest.fixture
def client_for() -> Callable[[str], Client]:
    """Return ``make(role)``: a client logged in as a superuser or one of ``ROLES``."""

    def make_client(role: str) -> Client:
        if role == "superuser":
            return logged_in(User.objects.create_superuser("root", "root@example.com", "pw"))
        return logged_in(staff(role, *ROLES[role]))

    return make_client


@pytest.fixture
def root(client_for: Callable[[str], Client]) -> Client:
    return client_for("superuser")


def act(client: Client, action: str, *schedules: PeriodicSchedule) -> Any:
    return client.post(CHANGELIST, {"action": action,
                                    "_selected_action": [str(s.pk) for s in schedules]},
                       follow=True)


def messages_of(response: Any) -> list[str]:
    """The page's messages, but the changelist's own "RedBeat could not be read" (no Redis)."""
    return [str(message) for message in response.context["messages"]
            if not str(message).startswith("RedBeat could not be read")]


def offered_actions(response: Any) -> set[str]:
    form = response.context["action_form"]
    if form is None:
        return set()
    return {name for name, _label in form.fields["action"].choices if name}


def enabled_of(schedule: PeriodicSchedule) -> bool:
    return PeriodicSchedule.objects.values_list("enabled", flat=True).get(pk=schedule.pk)


def state_of(record: TaskRecord) -> str:
    return TaskRecord.objects.values_list("state", flat=True).get(pk=record.pk)


def entry_exists(server: Any, schedule: PeriodicSchedule) -> bool:
    return bool(server.client().exists(f"redbeat:{redbeat_store.entry_name(schedule.pk)}"))


def form_data(**fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "nightly", "task": "demo.add", "enabled": "on", "description": "",
        "interval_seconds": "", "crontab": "30 2 * * *", "timezone": "Europe/Berlin",
        "run_at_0": "", "run_at_1": "", "catch_up": "skip", "args": "[1, 2]", "kwargs": "{}",
        "options": "{}",
    }
    data.update(fields)
    return data


# --- the timing in words -------------------------------------------------------------------------


@pytest.mark.parametrize("timing, phrase", [
    ({"interval_seconds": 300}, "every 5 minutes"),
    ({"interval_seconds": 30}, "every 30 seconds"),
    ({"interval_seconds": 1}, "every second"),
    ({"interval_seconds": 90}, "every 90 seconds"),
    ({"interval_seconds": 3600}, "every hour"),
    ({"interval_seconds": 7200}, "every 2 hours"),
    ({"interval_seconds": 86400}, "every day"),
    ({"crontab": "30 2 * * *", "zone": "Europe/Berlin"}, "02:30 daily, Europe/Berlin"),
    ({"crontab": "0 9 * * 1-5", "zone": "UTC"}, "at 09:00 on Mon-Fri, UTC"),
    ({"crontab": "0 9,17 * * *", "zone": "UTC"}, "09:00, 17:00 daily, UTC"),
    ({"crontab": "0 10 * * 0,6", "zone": "UTC"}, "at 10:00 on Sat, Sun, UTC"),
    ({"crontab": "15 8 * * 1,3,5", "zone": "UTC"}, "at 08:15 on Mon, Wed, Fri, UTC"),
    ({"crontab": "0 4 1 * *", "zone": "UTC"}, "at 04:00 on day 1 of the month, UTC"),
    ({"crontab": "* * * * *", "zone": "UTC"}, "every minute"),
    ({"crontab": "*/15 * * * *", "zone": "UTC"}, "every 15 minutes"),
    ({"crontab": "5 * * * *", "zone": "UTC"}, "every hour at :05, UTC"),
    ({"crontab": "0 */6 * * *", "zone": "America/New_York"},
     "every 6 hours at :00, America/New_York"),
    ({"crontab": "0 0 29 2 *", "zone": "UTC"}, "cron 0 0 29 2 *, UTC"),
    ({"crontab": "7,9 1-3 * * *", "zone": "Asia/Tokyo"}, "cron 7,9 1-3 * * *, Asia/Tokyo"),
    ({"crontab": "30 2 * * *"}, "02:30 daily, UTC"),
    ({"run_at": datetime(2026, 12, 1, 10, 0, tzinfo=UTC)}, "once at 2026-12-01 10:00 UTC"),
    ({"run_at": datetime(2026, 12, 1, 10, 0, 5, tzinfo=UTC)}, "once at 2026-12-01 10:00:05 UTC"),
])
def test_the_timing_is_put_in_words(timing, phrase):
    assert describe_timing(**timing) == phrase


def test_a_one_off_time_is_shown_in_the_current_time_zone():
    with timezone.override("Europe/Berlin"):
        phrase = describe_timing(run_at=datetime(2026, 12, 1, 10, 0, tzinfo=UTC))
    assert phrase == "once at 2026-12-01 11:00 Europe/Berlin"


# --- the form ------------------------------------------------------------------------------------


def test_the_task_choices_are_the_registered_tasks_without_celerys_internals():
    names = [name for name, _label in task_choices() if name]

    assert "demo.add" in names and "reliable_tasks.sweep" in names
    assert not [name for name in names if name.startswith("celery.")]
    assert names == sorted(names)
    assert [name for name, _ in task_choices("gone.task")][1] == "gone.task"


@pytest.mark.django_db
def test_adding_a_schedule_through_the_admin_saves_it(root):
    response = root.post(ADD, form_data(), follow=True)

    assert response.status_code == 200
    schedule = PeriodicSchedule.objects.get(name="nightly")
    assert (schedule.task, schedule.args, schedule.crontab, schedule.timezone) == (
        "demo.add", [1, 2], "30 2 * * *", "Europe/Berlin")
    assert "02:30 daily, Europe/Berlin" in response.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("fields, field", [
    ({"crontab": "61 * * * *"}, "crontab"),
    ({"interval_seconds": "60"}, "interval_seconds"),
    ({"crontab": "", "interval_seconds": ""}, "interval_seconds"),
    ({"args": '{"not": "a list"}'}, "args"),
    ({"args": "[1, "}, "args"),
    ({"kwargs": "[1]"}, "kwargs"),
    ({"options": '{"routing_key": "x"}'}, "options"),
    ({"task": "not.registered"}, "task"),
])
def test_invalid_input_shows_the_error_on_its_field(root, fields, field):
    response = root.post(ADD, form_data(**fields))

    assert response.status_code == 200
    form = response.context["adminform"].form
    assert field in form.errors, form.errors
    assert PeriodicSchedule.objects.count() == 0


@pytest.mark.django_db
def test_empty_json_fields_mean_no_arguments():
    form = PeriodicScheduleForm(data=form_data(args="", kwargs="", options="",
                                               run_at="", timezone=""))

    assert form.is_valid(), form.errors
    assert (form.cleaned_data["args"], form.cleaned_data["kwargs"],
            form.cleaned_data["options"]) == ([], {}, {})


# --- the changelist ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_changelist_shows_name_task_timing_enabled_and_sync_state(root):
    make("five-minutes", interval_seconds=300)
    make("nightly", interval_seconds=None, crontab="30 2 * * *", timezone="Europe/Berlin")
    failed = make("failed-push")
    PeriodicSchedule.objects.filter(pk=failed.pk).update(sync_error="ConnectionError: refused")

    response = root.get(CHANGELIST)

    html = response.content.decode()
    assert response.status_code == 200
    for text in ("five-minutes", "demo.add", "every 5 minutes", "02:30 daily, Europe/Berlin",
                 "pending push (rev 1 &gt; 0)", "error: ConnectionError: refused"):
        assert text in html, text


@pytest.mark.django_db
def test_next_and_last_run_come_from_redbeat_in_one_read_per_page(root, shared_redis,
                                                                  monkeypatch):
    ran, fresh, off = make("ran"), make("fresh"), make("off", enabled=False)
    push_schedules([ran.pk, fresh.pk, off.pk])
    last = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    redbeat_store.advance(celery_app, redbeat_store.entry_name(ran.pk), last, 7,
                          last + timedelta(seconds=60))
    reads: list[list[str]] = []
    real_read = redbeat_store.read_entries

    def counting_read(app: Any, names: Any) -> Any:
        reads.append(list(names))
        return real_read(app, names)

    monkeypatch.setattr(redbeat_store, "read_entries", counting_read)

    response = root.get(CHANGELIST)

    assert len(reads) == 1
    assert sorted(reads[0]) == sorted(redbeat_store.entry_name(s.pk) for s in (ran, fresh, off))
    rows = {row.pk: row for row in response.context["cl"].result_list}
    admin_obj = response.context["cl"].model_admin
    assert "2030-01-02 03:05:05" in admin_obj.next_run(rows[ran.pk])
    assert "2030-01-02 03:04:05" in admin_obj.last_run(rows[ran.pk])
    assert admin_obj.last_run(rows[fresh.pk]) == "-"  # pushed, never run
    assert admin_obj.next_run(rows[off.pk]) == "-"  # disabled: no entry
    html = response.content.decode()
    assert "2030-01-02 03:05:05" in html and "in sync" in html


@pytest.mark.django_db
def test_an_enabled_schedule_missing_from_redbeat_is_flagged(root, shared_redis):
    schedule = make()
    push_schedules([schedule.pk])
    shared_redis.client().delete(f"redbeat:{redbeat_store.entry_name(schedule.pk)}")

    response = root.get(CHANGELIST)

    assert 'data-state="missing"' in response.content.decode()


@pytest.mark.django_db
def test_changelist_renders_without_redis_and_says_runs_are_unknown(root):
    make()  # no Redis fixture: the app points at a port that refuses connections

    response = root.get(CHANGELIST)

    assert response.status_code == 200
    texts = [str(message) for message in response.context["messages"]]
    assert any(text.startswith("RedBeat could not be read") for text in texts)
    assert 'title="ConnectionError' in response.content.decode()


@pytest.mark.django_db
def test_the_change_page_shows_the_next_run_from_redbeat(root, shared_redis):
    schedule = make()
    push_schedules([schedule.pk])
    stored = redbeat_store.read_entries(celery_app, [redbeat_store.entry_name(schedule.pk)])
    due = datetime.fromtimestamp(stored[redbeat_store.entry_name(schedule.pk)].score, UTC)

    response = root.get(reverse("admin:reliable_tasks_periodicschedule_change",
                                args=[schedule.pk]))

    assert response.status_code == 200
    assert due.strftime("%Y-%m-%d %H:%M:%S") in response.content.decode()


# --- actions -------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_disable_and_enable_update_the_rows_and_redbeat_with_counted_messages(root,
                                                                              shared_redis):
    first, second, already_off = make("a"), make("b"), make("c", enabled=False)
    assert entry_exists(shared_redis, first)

    response = act(root, "disable_schedules", first, second, already_off)

    assert "2 schedules were disabled." in messages_of(response)
    assert not enabled_of(first) and not enabled_of(second)
    assert not entry_exists(shared_redis, first) and not entry_exists(shared_redis, second)

    response = act(root, "enable_schedules", first)

    assert "1 schedule was enabled." in messages_of(response)
    assert enabled_of(first) and entry_exists(shared_redis, first)
    assert PeriodicSchedule.objects.get(pk=first.pk).needs_sync is False


@pytest.mark.django_db(transaction=True)
def test_enabling_while_redis_is_down_says_the_push_is_pending(root):
    schedule = make(enabled=False)

    response = act(root, "enable_schedules", schedule)

    assert "1 schedule was enabled." in messages_of(response)
    assert ("RedBeat has not seen the change of 1 schedule yet; the sweeper pushes it again."
            in messages_of(response))


@pytest.mark.django_db
def test_run_now_dispatches_the_task_records_it_and_audits_it(root):
    schedule = make(args=[2, 3], kwargs={}, options={"queue": "celery", "priority": 5})

    response = act(root, "run_now", schedule)

    record = TaskRecord.objects.get()
    assert (record.task_name, record.args, record.queue) == ("demo.add", [2, 3], "celery")
    assert record.options.get("priority") == 5
    url = reverse("admin:reliable_tasks_taskrecord_change", args=[record.pk])
    assert messages_of(response) == [
        f'1 schedule was run now, as task: <a href="{url}">{str(record.pk)[:8]}</a>']
    assert LogEntry.objects.filter(object_id=str(schedule.pk),
                                   change_message__contains=str(record.pk)).exists()


@pytest.mark.django_db
def test_run_now_reports_a_schedule_that_cannot_be_dispatched(root):
    good = make("good")
    bad = make("bad")
    PeriodicSchedule.objects.filter(pk=bad.pk).update(task="gone.task")  # unregistered since

    response = act(root, "run_now", good, bad)

    assert TaskRecord.objects.count() == 1
    texts = messages_of(response)
    assert any(text.startswith("1 schedule was run now") for text in texts)
    assert any(text.startswith("1 schedule could not be run (bad: Unknown task 'gone.task'")
               for text in texts)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_run_now_runs_the_task_on_a_worker(root, redis_server, celery_worker):
    celery_worker(redis_server)
    schedule = make(task="demo.record", args=["run-now"])

    act(root, "run_now", schedule)

    record = TaskRecord.objects.get()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and state_of(record) != TaskState.SUCCESS:
        time.sleep(0.2)
    assert state_of(record) == TaskState.SUCCESS
    assert Execution.objects.filter(token="run-now", task_id=str(record.pk)).count() == 1


@pytest.mark.django_db
def test_push_now_writes_the_entries_and_removes_those_of_disabled_schedules(root,
                                                                            shared_redis):
    on, off = make("on"), make("off", enabled=False)
    shared_redis.client().hset(f"redbeat:{redbeat_store.entry_name(off.pk)}", "definition",
                               "{}")

    response = act(root, "push_now", on, off)

    assert messages_of(response) == [
        "1 schedule was pushed to RedBeat; 1 entry of a disabled or deleted schedule was "
        "removed."]
    assert entry_exists(shared_redis, on) and not entry_exists(shared_redis, off)
    assert PeriodicSchedule.objects.get(pk=on.pk).needs_sync is False


@pytest.mark.django_db
def test_push_now_with_redis_down_reports_the_failure(root):
    schedule = make()

    response = act(root, "push_now", schedule)

    [text] = messages_of(response)
    assert text.startswith("Pushing 1 schedule to RedBeat failed (ConnectionError")
    assert PeriodicSchedule.objects.get(pk=schedule.pk).sync_error


# --- permissions, POST only, escaping -------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("role, actions", [
    ("superuser", ALL_ACTIONS),
    ("viewer", set()),
    ("editor", {"enable_schedules", "disable_schedules"}),
    ("runner", {"run_now"}),
    ("pusher", {"push_now"}),
])
def test_each_user_is_offered_only_the_actions_they_may_run(client_for, role, actions):
    make()

    response = client_for(role).get(CHANGELIST)

    assert response.status_code == 200
    assert offered_actions(response) == actions


@pytest.mark.django_db
@pytest.mark.parametrize("role", ["viewer", "editor", "pusher"])
def test_a_posted_action_the_user_may_not_run_does_nothing(client_for, role):
    schedule = make()

    act(client_for(role), "run_now", schedule)

    assert TaskRecord.objects.count() == 0
    assert enabled_of(schedule)


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["enable_schedules", "disable_schedules", "run_now",
                                    "push_now"])
def test_the_action_itself_refuses_a_user_without_the_permission(action):
    from django.contrib import admin
    from django.core.exceptions import PermissionDenied
    from django.test import RequestFactory

    request = RequestFactory().post(CHANGELIST)
    request.user = staff("viewer", *ROLES["viewer"])
    model_admin = admin.site.get_model_admin(PeriodicSchedule)
    function = getattr(schedule_admin, action)

    with pytest.raises(PermissionDenied):
        function(model_admin, request, PeriodicSchedule.objects.all())


@pytest.mark.django_db
def test_a_get_with_action_parameters_changes_nothing(root):
    schedule = make()

    root.get(CHANGELIST, {"action": "disable_schedules", "_selected_action": [schedule.pk]})
    root.get(CHANGELIST, {"action": "run_now", "_selected_action": [schedule.pk]})

    assert enabled_of(schedule)
    assert TaskRecord.objects.count() == 0


@pytest.mark.django_db
def test_actions_need_the_csrf_token(root):
    schedule = make()
    client = logged_in(User.objects.get(username="root"), enforce_csrf_checks=True)

    response = client.post(CHANGELIST, {"action": "disable_schedules",
                                        "_selected_action": [schedule.pk]})

    assert response.status_code == 403
    assert enabled_of(schedule)


@pytest.mark.django_db
def test_a_view_only_user_sees_a_read_only_form(client_for):
    schedule = make()

    response = client_for("viewer").get(
        reverse("admin:reliable_tasks_periodicschedule_change", args=[schedule.pk]))

    assert response.status_code == 200
    assert 'name="_save"' not in response.content.decode()


@pytest.mark.django_db
def test_whatever_a_schedule_holds_is_escaped(root):
    schedule = make(XSS, args=[XSS], kwargs={"x": XSS}, description=XSS)
    PeriodicSchedule.objects.filter(pk=schedule.pk).update(sync_error=XSS)

    for url in (CHANGELIST,
                reverse("admin:reliable_tasks_periodicschedule_change", args=[schedule.pk])):
        html = root.get(url).content.decode()
        assert XSS not in html, url
        assert XSS_ESCAPED in html, url


@pytest.mark.django_db
@pytest.mark.parametrize("role, linked", [("superuser", True), ("viewer", True),
                                          ("runner", False)])
def test_the_changelist_links_the_health_page_for_those_who_may_see_it(client_for, role,
                                                                        linked):
    html = client_for(role).get(CHANGELIST).content.decode()

    assert ('id="rt-health-link"' in html) is linked
