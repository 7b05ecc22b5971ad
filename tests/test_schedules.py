"""``PeriodicSchedule``: validation, and the push to RedBeat after commit (real Redis)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from example_project.celery import app as celery_app
from reliable_tasks import redbeat_store
from reliable_tasks.models import PeriodicSchedule
from reliable_tasks.sweeper import sweep

pytestmark = pytest.mark.django_db(transaction=True)


def entry_key(schedule: PeriodicSchedule) -> str:
    return f"redbeat:{redbeat_store.entry_name(schedule.pk)}"


def stored(schedule: PeriodicSchedule) -> redbeat_store.StoredEntry | None:
    name = redbeat_store.entry_name(schedule.pk)
    return redbeat_store.read_entries(celery_app, [name]).get(name)


def definition(schedule: PeriodicSchedule) -> dict:
    entry = stored(schedule)
    assert entry is not None and entry.definition
    return redbeat_store.decode_definition(entry.definition)


def make(**fields) -> PeriodicSchedule:
    defaults = {"name": "every-minute", "task": "demo.add", "args": [1, 2],
                "interval_seconds": 60}
    return PeriodicSchedule.objects.create(**{**defaults, **fields})


@pytest.mark.parametrize("fields, field_in_error", [
    ({"crontab": "61 * * * *", "interval_seconds": None}, "crontab"),
    ({"task": "nope.missing"}, "task"),
    ({"task": "demo.plain_record"}, "task"),  # a plain Celery task: nothing claims its runs
    ({"args": {"not": "a list"}}, "args"),
    ({"kwargs": [1, 2]}, "kwargs"),
    ({"crontab": "0 3 * * *", "interval_seconds": None, "timezone": "Mars/Olympus"},
     "timezone"),
    ({"crontab": "0 3 * * *"}, "interval_seconds"),
    ({"options": {"routing_key": "x"}}, "options"),
])
def test_bad_input_is_refused_naming_the_field_and_nothing_is_saved_or_pushed(
        redis_server, fields, field_in_error):
    with pytest.raises(ValidationError) as error:
        make(**fields)

    assert field_in_error in error.value.message_dict
    assert PeriodicSchedule.objects.count() == 0
    assert redis_server.client().keys("redbeat:reliable_tasks:*") == []


def test_saving_pushes_the_entry_after_commit(redis_server):
    with transaction.atomic():
        schedule = make()
        assert stored(schedule) is None, "nothing reaches Redis before commit"

    entry = definition(schedule)
    assert (entry["task"], entry["args"]) == ("demo.add", [1, 2])
    schedule.refresh_from_db()
    assert schedule.synced_revision == schedule.revision == 1
    due = redis_server.client().zscore("redbeat::schedule", entry_key(schedule))
    assert abs(due - (timezone.now() + timedelta(seconds=60)).timestamp()) < 5


def test_a_rolled_back_edit_never_reaches_redis(redis_server):
    schedule = make()
    with pytest.raises(RuntimeError), transaction.atomic():
        schedule.args = [9, 9]
        schedule.save()
        raise RuntimeError("roll back")

    assert definition(schedule)["args"] == [1, 2]


def test_an_edit_of_args_keeps_last_run_at(redis_server):
    schedule = make()
    name = redbeat_store.entry_name(schedule.pk)
    last = timezone.now() - timedelta(seconds=30)
    redbeat_store.advance(celery_app, name, last, 7, last + timedelta(seconds=60))

    schedule.args = [5, 5]
    schedule.save()

    entry = stored(schedule)
    assert entry.last_run_at == last.replace(microsecond=entry.last_run_at.microsecond)
    assert entry.total_run_count == 7
    assert definition(schedule)["args"] == [5, 5]


def test_a_timing_change_reschedules_from_the_last_run(redis_server):
    schedule = make()
    name = redbeat_store.entry_name(schedule.pk)
    last = timezone.now() - timedelta(seconds=30)
    redbeat_store.advance(celery_app, name, last, 1, last + timedelta(seconds=60))

    schedule.interval_seconds = 600
    schedule.save()

    due = redis_server.client().zscore("redbeat::schedule", entry_key(schedule))
    assert abs(due - (last + timedelta(seconds=600)).timestamp()) < 1


def test_disabling_removes_the_entry_and_enabling_brings_it_back(redis_server):
    schedule = make()
    schedule.enabled = False
    schedule.save()

    assert stored(schedule) is None
    assert redis_server.client().zscore("redbeat::schedule", entry_key(schedule)) is None
    schedule.enabled = True
    schedule.save()
    assert stored(schedule) is not None


def test_deleting_removes_the_entry(redis_server):
    schedule = make()
    key = entry_key(schedule)

    schedule.delete()

    assert redis_server.client().exists(key) == 0
    assert redis_server.client().zscore("redbeat::schedule", key) is None


def test_a_rename_leaves_no_orphan(redis_server):
    schedule = make()

    schedule.name = "renamed"
    schedule.save()

    assert redbeat_store.owned_entry_names(celery_app) == [
        redbeat_store.entry_name(schedule.pk)]


def test_a_save_while_redis_is_down_is_kept_marked_and_pushed_once_redis_is_back(
        redis_server, settings):
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 0.5
    redis_server.stop()

    schedule = make()

    schedule.refresh_from_db()
    assert schedule.needs_sync
    assert "Error" in schedule.sync_error
    redis_server.start()
    assert sweep().schedules_pushed == 1
    schedule.refresh_from_db()
    assert not schedule.needs_sync and schedule.sync_error == ""
    assert stored(schedule) is not None


def test_bulk_update_marks_and_pushes_the_rows(redis_server):
    first, second = make(name="a"), make(name="b")

    PeriodicSchedule.objects.filter(pk__in=[first.pk, second.pk]).update(args=[7, 7])

    assert definition(first)["args"] == [7, 7]
    assert definition(second)["args"] == [7, 7]
    first.refresh_from_db()
    assert first.revision == 2 and not first.needs_sync


def test_foreign_entries_and_redbeats_own_keys_are_never_touched(redis_server):
    client = redis_server.client()
    client.hset("redbeat:someone-else", "definition", "{}")
    client.set("redbeat::lock", "token")
    schedule = make()

    schedule.delete()

    assert client.exists("redbeat:someone-else") == 1
    assert client.get("redbeat::lock") == "token"
