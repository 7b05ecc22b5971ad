"""``reliable_tasks.health`` and the admin's health page and reconcile button, against real Redis.

The report: RedBeat's lock and its TTL, the last beat tick (a real beat's too), drift, the
``maxmemory-policy`` of each Redis (CONFIG, or INFO when CONFIG is disabled), workers, the oldest
pending task, counts per state, no password anywhere, and problems instead of exceptions when
Redis is down. The hourly activity in one query. The page: permissions, escaping, the chart, and
the reconcile button (dry run on GET, applied on POST with the CSRF token).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone
from redis.exceptions import ResponseError

from example_project.celery import app as celery_app
from reliable_tasks import health, redbeat_store
from reliable_tasks.admin.health import activity_chart
from reliable_tasks.models import PeriodicSchedule, TaskRecord, WorkerHeartbeat
from reliable_tasks.publisher import close_publisher
from reliable_tasks.states import TaskState

HEALTH = reverse("admin:reliable_tasks_health")
RECONCILE = reverse("admin:reliable_tasks_reconcile")
LEDGER = reverse("admin:reliable_tasks_taskrecord_changelist")
XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


# --- helpers -------------------------------------------------------------------------------------


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
    "viewer": ("view_taskrecord",),
    "operator": ("view_taskrecord", "push_periodicschedule"),
    "pusher_only": ("push_periodicschedule",),
    "schedules_only": ("view_periodicschedule", "change_periodicschedule"),
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


def make_schedule(name: str, **fields: Any) -> PeriodicSchedule:
    return PeriodicSchedule.objects.create(
        name=name, task="demo.add", args=[1, 1], **{"interval_seconds": 60, **fields})


def problems(report: health.HealthReport, topic: str | None = None,
             severity: str | None = None) -> list[str]:
    return [problem.message for problem in report.problems
            if (topic is None or problem.topic == topic)
            and (severity is None or problem.severity == severity)]


def heartbeat(hostname: str, seen_ago: float, stopped: bool = False) -> WorkerHeartbeat:
    now = timezone.now()
    return WorkerHeartbeat.objects.create(
        hostname=hostname, pid=42, last_seen_at=now - timedelta(seconds=seen_ago),
        stopped_at=now if stopped else None)


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def app_pointed_at(broker_url: str, redbeat_url: str | None = None) -> Iterator[None]:
    """Point the Celery app's broker and RedBeat (default: the broker's) for the block.

    Django's settings are overridden too: the app reads them (``CELERY_*``) live, and before
    Celery 5.7 they take precedence over ``conf.update()``.
    """
    saved = {key: celery_app.conf.get(key) for key in ("broker_url", "redbeat_redis_url")}

    def drop() -> None:
        close_publisher()
        client = celery_app.__dict__.pop("redbeat_redis", None)
        if client is not None:
            client.close()
        celery_app.__dict__.pop("redbeat_conf", None)

    drop()
    urls = {"broker_url": broker_url, "redbeat_redis_url": redbeat_url or broker_url}
    celery_app.conf.update(urls)
    try:
        with override_settings(**{f"CELERY_{key.upper()}": url for key, url in urls.items()}):
            yield
    finally:
        drop()
        celery_app.conf.update(saved)


# --- the report ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_with_redis_down_the_report_lists_problems_and_still_reads_the_database():
    TaskRecord.objects.create(task_name="demo.add", state=TaskState.FAILURE)

    report = health.report()  # no Redis fixture: the app points at a refusing port

    [redbeat_error] = problems(report, "redbeat", health.ERROR)
    assert "Reading RedBeat's Redis" in redbeat_error and "Connection refused" in redbeat_error
    assert report.beat_lock is None and report.drift is None
    assert report.redis[0].error == "unreachable"
    assert report.state_counts[TaskState.FAILURE] == 1
    assert not report.ok
    json.dumps(report.as_dict())  # plain data


@pytest.mark.django_db
def test_a_clean_redis_without_beat_says_no_beat_holds_the_lock(shared_redis):
    report = health.report()

    assert report.beat_lock == health.BeatLock(key="redbeat::lock", held=False, ttl_seconds=None)
    assert any("No beat holds RedBeat's lock" in text
               for text in problems(report, "beat", health.ERROR))
    assert report.redis == [health.RedisMemory(
        role="broker and RedBeat", url=shared_redis.url, policy="noeviction",
        source="CONFIG GET")]
    assert not problems(report, "redis")


@pytest.mark.django_db
def test_a_held_lock_shows_its_ttl_and_the_sweep_entry_gives_the_last_tick(shared_redis):
    shared_redis.client().set("redbeat::lock", "opaque-token", px=15_000)
    last_tick = timezone.now() - timedelta(seconds=3)
    redbeat_store.advance(celery_app, redbeat_store.sweep_entry_name(), last_tick, 5,
                          last_tick + timedelta(seconds=10))

    report = health.report()

    assert report.beat_lock is not None and report.beat_lock.held
    assert 10 < report.beat_lock.ttl_seconds <= 15
    assert abs((report.last_beat_at - last_tick).total_seconds()) < 0.01
    assert not problems(report, "beat")
    assert "opaque-token" not in json.dumps(report.as_dict())


@pytest.mark.django_db
def test_a_stale_last_tick_and_a_lock_without_expiry_are_warnings(shared_redis):
    shared_redis.client().set("redbeat::lock", "token")
    long_ago = timezone.now() - timedelta(hours=1)
    redbeat_store.advance(celery_app, redbeat_store.sweep_entry_name(), long_ago, 5, None)

    report = health.report()

    beat = problems(report, "beat", health.WARNING)
    assert any("has no expiry" in text for text in beat)
    assert any("beat may be stuck or stopped" in text for text in beat)


def overdue_problems(report: health.HealthReport) -> list[str]:
    return [text for text in problems(report, "beat", health.WARNING) if "overdue" in text]


def due_ago(name: str, seconds: float) -> None:
    """Give the entry ``name`` a run RedBeat has had due for ``seconds``."""
    now = timezone.now()
    redbeat_store.advance(celery_app, name, now - timedelta(hours=1), 1,
                          now - timedelta(seconds=seconds))


@pytest.mark.django_db
def test_runs_overdue_while_a_beat_holds_the_lock_are_a_warning(shared_redis):
    client = shared_redis.client()
    client.set("redbeat::lock", "token", px=15_000)
    first, second = redbeat_store.entry_name(1), redbeat_store.entry_name(2)
    due_ago(first, 30)  # late, but within the grace
    client.zadd("redbeat::schedule", {"redbeat:someone-elses": time.time() - 3600})  # not ours

    calm = health.report()

    assert calm.overdue == health.OverdueRuns(count=0, oldest_seconds=0.0, names=[])
    assert overdue_problems(calm) == []
    due_ago(first, 300)
    due_ago(second, 120)

    late = health.report()

    assert late.overdue is not None
    assert late.overdue.count == 2 and late.overdue.names == [first, second]
    assert 299 < late.overdue.oldest_seconds < 310
    [warning] = overdue_problems(late)
    assert warning.startswith(
        "Beat holds RedBeat's lock but 2 schedule run(s) are overdue, the oldest by 30")
    assert "beat cannot record or advance them" in warning
    assert late.as_dict()["overdue"]["count"] == 2


@pytest.mark.django_db
def test_overdue_runs_are_not_checked_while_no_beat_holds_the_lock(shared_redis):
    due_ago(redbeat_store.entry_name(1), 300)

    report = health.report()

    assert report.overdue is None and overdue_problems(report) == []
    assert any("No beat holds RedBeat's lock" in text
               for text in problems(report, "beat", health.ERROR))


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_real_beat_holds_the_lock_and_ticks(redis_server, celery_beat):
    celery_beat(redis_server)

    report = wait_for(lambda: (lambda r: r if r.last_beat_at else None)(health.report()),
                      timeout=30, what="the sweeper entry's first run")

    assert report.beat_lock is not None and report.beat_lock.held
    assert 0 < report.beat_lock.ttl_seconds <= 20
    assert (report.generated_at - report.last_beat_at).total_seconds() < 15
    assert not problems(report, "beat")


@pytest.mark.django_db(transaction=True)
def test_drift_is_counted_and_named(shared_redis):
    kept, lost = make_schedule("kept"), make_schedule("lost")
    shared_redis.client().delete(f"redbeat:{redbeat_store.entry_name(lost.pk)}")
    shared_redis.client().hset("redbeat:reliable_tasks:999", "definition", "{}")

    report = health.report()

    assert report.drift is not None
    assert (report.drift.create, report.drift.update, report.drift.remove,
            report.drift.unchanged) == (1, 0, 1, 1)
    assert report.drift.names["create"] == [redbeat_store.entry_name(lost.pk)]
    assert report.drift.names["remove"] == ["reliable_tasks:999"]
    assert any("2 RedBeat entries differ" in text for text in problems(report, "schedules"))
    named = [name for names in report.drift.names.values() for name in names]
    assert redbeat_store.entry_name(kept.pk) not in named


@pytest.mark.django_db
def test_unsynced_schedules_and_failed_pushes_are_counted(shared_redis):
    make_schedule("never-pushed")
    failed = make_schedule("failed")
    PeriodicSchedule.objects.filter(pk=failed.pk).update(sync_error="ConnectionError: x")

    report = health.report()

    assert (report.unsynced_schedules, report.sync_errors) == (2, 1)
    assert any("1 schedule(s) could not be pushed" in text
               for text in problems(report, "schedules"))


@pytest.mark.django_db
def test_a_maxmemory_policy_other_than_noeviction_is_a_warning(redis_server):
    redis_server.client().config_set("maxmemory-policy", "allkeys-lru")

    report = health.report()

    assert report.redis[0].policy == "allkeys-lru" and not report.redis[0].safe
    [warning] = problems(report, "redis", health.WARNING)
    assert "maxmemory-policy allkeys-lru" in warning and "noeviction" in warning


@pytest.mark.django_db
def test_broker_and_redbeat_on_two_servers_are_checked_each(redis_server, shared_redis):
    redis_server.client().config_set("maxmemory-policy", "volatile-ttl")

    with app_pointed_at(shared_redis.url, redbeat_url=redis_server.url):
        report = health.report()

    policies = {server.role: server.policy for server in report.redis}
    assert policies == {"broker": "noeviction", "RedBeat": "volatile-ttl"}
    assert len(problems(report, "redis", health.WARNING)) == 1


def _failover_delay_warnings(report: health.HealthReport) -> list[str]:
    return [message for message in problems(report, "redis", health.WARNING)
            if "fail a silent master over" in message]


@pytest.mark.django_db
def test_sentinels_that_fail_over_before_a_publish_gives_up_are_a_warning(sentinel_topology):
    report = health.report()  # the fixture's sentinels: 1 s; PUBLISH_TIMEOUT: 2 s

    [warning] = _failover_delay_warnings(report)
    assert "after 1 s" in warning and "above 3000" in warning and "W007" in warning
    assert not problems(report, "redis", health.ERROR)
    assert sentinel_topology.password not in json.dumps(report.as_dict())


@pytest.mark.django_db
def test_sentinels_slower_than_a_publish_give_no_warning(sentinel_topology):
    sentinel_topology.set_down_after(5000)

    report = health.report()

    assert _failover_delay_warnings(report) == []
    assert not problems(report, "redis", health.ERROR)


@pytest.mark.django_db
def test_a_broker_without_sentinels_is_not_asked_for_a_failover_delay(redis_server):
    report = health.report()

    assert _failover_delay_warnings(report) == []
    assert not any("sentinels" in message for message in problems(report, "redis"))


class _NoConfigClient:
    """A Redis client of a managed service that disabled CONFIG."""

    def __init__(self, policy: str | None) -> None:
        self.policy = policy

    def config_get(self, name: str) -> dict[str, str]:
        raise ResponseError("unknown command 'CONFIG'")

    def info(self, section: str) -> dict[str, Any]:
        return {"maxmemory_policy": self.policy} if self.policy else {}


def test_the_policy_is_read_from_info_when_config_is_disabled():
    assert health.read_memory_policy(_NoConfigClient("allkeys-lfu")) == (
        "allkeys-lfu", "INFO memory")
    assert health.read_memory_policy(_NoConfigClient(None)) == (None, "")


@pytest.mark.django_db
def test_no_password_appears_in_the_report_or_the_page(redis_server, root):
    secret = "s3cret-pw"
    redis_server.client().config_set("requirepass", secret)
    url = f"redis://:{secret}@127.0.0.1:{redis_server.port}/0"
    try:
        with app_pointed_at(url):
            report = health.report()
            html = root.get(HEALTH).content.decode()
    finally:
        import redis

        with redis.Redis(host="127.0.0.1", port=redis_server.port, password=secret) as client:
            client.config_set("requirepass", "")
    data = json.dumps(report.as_dict())
    assert report.redis[0].policy == "noeviction"
    assert secret not in data and secret not in html
    assert f"redis://:**@127.0.0.1:{redis_server.port}/0" in data


def test_sanitize_masks_passwords_of_urls_inside_messages():
    text = "could not reach redis://user:pw@host:6379/0 or sentinel://:pw2@h:26379"

    assert health.sanitize(text) == (
        "could not reach redis://user:**@host:6379/0 or sentinel://:**@h:26379/")


def test_sanitize_masks_every_password_of_a_list_of_sentinel_urls():
    # Kombu's maybe_sanitize_url took such a list for one URL and masked only the first part.
    urls = "sentinel://:p%3B1@h1:26379/0;sentinel://:p%3B1@h2:26379/0;sentinel://:p%3B1@h3:26379/0"

    masked = health.sanitize(f"broker {urls} failed")

    assert "p%3B1" not in masked and "p;1" not in masked
    assert masked.count(":**@") == 3 and "h3:26379" in masked


@pytest.mark.django_db
def test_live_and_dead_workers_are_listed_and_a_lost_worker_is_a_warning():
    heartbeat("alive@a", seen_ago=1)
    heartbeat("lost@b", seen_ago=300)
    heartbeat("stopped@c", seen_ago=400, stopped=True)

    report = health.report()

    assert [worker.hostname for worker in report.workers_alive] == ["alive@a"]
    assert [worker.hostname for worker in report.workers_dead] == ["lost@b", "stopped@c"]
    [warning] = problems(report, "workers")
    assert "Worker lost@b stopped heartbeating" in warning


@pytest.mark.django_db
def test_no_live_worker_is_an_error():
    heartbeat("old@a", seen_ago=3600, stopped=True)

    report = health.report()

    assert problems(report, "workers", health.ERROR) == [
        "No live worker: queued tasks wait until one starts."]


@pytest.mark.django_db
def test_the_oldest_pending_task_due_for_publishing_and_the_counts_per_state():
    now = timezone.now()
    old = now - timedelta(hours=2)
    TaskRecord.objects.create(task_name="demo.add", created_at=old, next_attempt_at=old)
    TaskRecord.objects.create(task_name="demo.add", created_at=old - timedelta(hours=1),
                              eta=now + timedelta(days=1),
                              next_attempt_at=now + timedelta(days=1))  # held: not late
    for state in (TaskState.SUCCESS, TaskState.SUCCESS, TaskState.FAILURE):
        TaskRecord.objects.create(task_name="demo.add", state=state)

    report = health.report(now=now)

    assert report.oldest_pending_since == old
    assert report.oldest_pending_age == timedelta(hours=2)
    assert any("oldest pending task has waited 7200 s" in text
               for text in problems(report, "tasks"))
    assert report.state_counts == {**dict.fromkeys(TaskState.values, 0), "PENDING": 2,
                                   "SUCCESS": 2, "FAILURE": 1}


# --- activity per hour ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_hourly_activity_counts_finished_failed_and_retried_per_hour_in_one_query(
        django_assert_num_queries):
    now = datetime(2030, 5, 6, 12, 30, tzinfo=UTC)

    def finished(hours_ago: float, state: str, attempts: int = 1) -> None:
        TaskRecord.objects.create(task_name="demo.add", state=state, attempts=attempts,
                                  finished_at=now - timedelta(hours=hours_ago))

    finished(0.1, TaskState.SUCCESS)
    finished(0.2, TaskState.SUCCESS, attempts=3)  # retried, then succeeded
    finished(1, TaskState.FAILURE, attempts=3)
    finished(1.2, TaskState.LOST)
    finished(25, TaskState.SUCCESS)  # outside the window
    TaskRecord.objects.create(task_name="demo.add", state=TaskState.RETRY, attempts=2)

    with django_assert_num_queries(1):
        hours = health.hourly_activity(24, now=now)

    assert len(hours) == 24
    assert hours[0].hour == datetime(2030, 5, 5, 13, tzinfo=UTC)
    assert hours[-1] == health.HourActivity(hour=datetime(2030, 5, 6, 12, tzinfo=UTC),
                                            succeeded=2, failed=0, retried=1)
    assert hours[-2] == health.HourActivity(hour=datetime(2030, 5, 6, 11, tzinfo=UTC),
                                            succeeded=0, failed=1, retried=1)
    assert sum(h.succeeded + h.failed + h.retried for h in hours[:-2]) == 0


@pytest.mark.django_db
@pytest.mark.skipif(connection.vendor == "mysql",
                    reason="MariaDB converts time zones only with its zone tables loaded")
def test_hourly_activity_buckets_by_the_hours_of_the_current_time_zone():
    now = datetime(2030, 5, 6, 12, 30, tzinfo=UTC)
    TaskRecord.objects.create(task_name="demo.add", state=TaskState.SUCCESS,
                              finished_at=now - timedelta(minutes=45))

    with timezone.override("Asia/Kolkata"):  # UTC+05:30: local hours start at :30 UTC
        hours = health.hourly_activity(3, now=now)

    assert [h.hour.strftime("%H:%M") for h in hours] == ["16:00", "17:00", "18:00"]
    assert [h.succeeded for h in hours] == [0, 1, 0]


def test_the_chart_scales_bars_to_the_busiest_hour():
    start = datetime(2030, 1, 1, tzinfo=UTC)
    hours = [health.HourActivity(hour=start + timedelta(hours=i), succeeded=i, failed=1)
             for i in range(24)]

    chart = activity_chart(hours)

    assert chart["peak"] == 23
    heights = [bar["height"] for bar in chart["bars"]]
    assert max(heights) == 160 and len(heights) == 72
    assert [series["total"] for series in chart["legend"]] == [276, 24, 0]


# --- the health page -----------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("role, status, reconcile_button", [
    ("superuser", 200, True),
    ("viewer", 200, False),
    ("operator", 200, True),
    ("pusher_only", 403, False),
    ("schedules_only", 403, False),
])
def test_the_health_page_needs_the_ledgers_view_permission(client_for, role, status,
                                                           reconcile_button):
    response = client_for(role).get(HEALTH)

    assert response.status_code == status
    if status == 200:
        assert ('id="rt-reconcile-link"' in response.content.decode()) is reconcile_button


@pytest.mark.django_db
def test_anonymous_users_are_sent_to_the_login_page():
    response = Client().get(HEALTH)

    assert response.status_code == 302
    assert "/login/" in response["Location"]


@pytest.mark.django_db
def test_the_health_page_renders_when_redis_was_stopped(redis_server, root):
    redis_server.stop()

    response = root.get(HEALTH)

    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-severity="error" data-topic="redbeat"' in html
    assert "Connection refused" in html
    assert 'id="rt-activity-chart"' in html


@pytest.mark.django_db
def test_the_page_shows_the_memory_warning_counts_and_chart(redis_server, root):
    redis_server.client().config_set("maxmemory-policy", "allkeys-lru")
    TaskRecord.objects.create(task_name="demo.add", state=TaskState.FAILURE,
                              finished_at=timezone.now())

    html = root.get(HEALTH).content.decode()

    assert 'data-topic="redis"' in html and "maxmemory-policy allkeys-lru" in html
    assert '<span data-count-of="FAILURE">1</span>' in html
    assert f'href="{LEDGER}?state__exact=FAILURE"' in html
    assert "<rect " in html and "<title>" in html


@pytest.mark.django_db
def test_the_page_lists_the_overdue_runs(shared_redis, root):
    shared_redis.client().set("redbeat::lock", "token", px=15_000)
    name = redbeat_store.entry_name(3)
    due_ago(name, 120)

    html = root.get(HEALTH).content.decode()

    assert 'data-severity="warning" data-topic="beat"' in html
    row = html[html.index('id="rt-overdue"'):]
    row = row[:row.index("</tr>")]
    assert "1 run overdue, by 12" in row and f"<code>{name}</code>" in row


@pytest.mark.django_db
def test_whatever_the_page_shows_is_escaped(shared_redis, root):
    heartbeat(XSS, seen_ago=1)
    heartbeat(f"{XSS}-dead", seen_ago=600)

    html = root.get(HEALTH).content.decode()

    assert XSS not in html
    assert XSS_ESCAPED in html


@pytest.mark.django_db
def test_the_health_page_answers_get_only(root):
    assert root.post(HEALTH).status_code == 405


@pytest.mark.django_db
def test_the_ledger_changelist_links_the_health_page(root):
    html = root.get(LEDGER).content.decode()

    assert f'href="{HEALTH}" id="rt-health-link"' in html


# --- the reconcile button ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_reconcile_get_shows_the_dry_run_plan_and_writes_nothing(shared_redis, root):
    make_schedule("kept")
    lost = make_schedule("lost")
    client = shared_redis.client()
    client.delete(f"redbeat:{redbeat_store.entry_name(lost.pk)}")
    client.hset("redbeat:reliable_tasks:999", "definition", "{}")
    before = sorted(client.keys("*"))

    response = root.get(RECONCILE)

    assert response.status_code == 200
    html = response.content.decode()
    assert f"create 1 entry:\n        <code>{redbeat_store.entry_name(lost.pk)}</code>" in html
    assert "remove 1 entry:\n        <code>reliable_tasks:999</code>" in html
    assert 'name="csrfmiddlewaretoken"' in html
    assert sorted(client.keys("*")) == before


@pytest.mark.django_db(transaction=True)
def test_reconcile_post_repairs_the_drift_and_says_what_it_did(shared_redis, root):
    make_schedule("kept")
    lost = make_schedule("lost")
    client = shared_redis.client()
    client.delete(f"redbeat:{redbeat_store.entry_name(lost.pk)}")
    client.hset("redbeat:reliable_tasks:999", "definition", "{}")

    response = root.post(RECONCILE, follow=True)

    assert response.redirect_chain == [(HEALTH, 302)]
    texts = [str(message) for message in response.context["messages"]]
    assert texts[0].startswith(
        "Reconciled RedBeat with the database: 1 RedBeat entry created, 0 updated, 1 removed, "
        "1 unchanged.")
    assert client.exists(f"redbeat:{redbeat_store.entry_name(lost.pk)}")
    assert not client.exists("redbeat:reliable_tasks:999")
    assert health.report().drift == health.Drift(
        create=0, update=0, remove=0, unchanged=2,
        names={"create": [], "update": [], "remove": []})


@pytest.mark.django_db
def test_reconcile_with_a_clean_state_says_nothing_differs(shared_redis, root):
    html = root.get(RECONCILE).content.decode()

    assert 'id="rt-plan-clean"' in html


@pytest.mark.django_db
def test_reconcile_with_redis_down_shows_the_error(root):
    response = root.get(RECONCILE)

    assert response.status_code == 200
    assert 'id="rt-reconcile-error"' in response.content.decode()

    response = root.post(RECONCILE, follow=True)

    texts = [str(message) for message in response.context["messages"]]
    assert any(text.startswith("The reconciliation failed: ConnectionError") for text in texts)


@pytest.mark.django_db
@pytest.mark.parametrize("role", ["viewer", "schedules_only"])
def test_reconcile_needs_the_push_permission(client_for, shared_redis, role):
    lost = make_schedule("lost")  # never pushed: not in RedBeat
    client = client_for(role)

    assert client.get(RECONCILE).status_code == 403
    assert client.post(RECONCILE).status_code == 403
    assert not shared_redis.client().exists(f"redbeat:{redbeat_store.entry_name(lost.pk)}")


@pytest.mark.django_db
def test_reconcile_post_needs_the_csrf_token(shared_redis):
    lost = make_schedule("lost")
    user = User.objects.create_superuser("root", "root@example.com", "pw")

    response = logged_in(user, enforce_csrf_checks=True).post(RECONCILE)

    assert response.status_code == 403
    assert not shared_redis.client().exists(f"redbeat:{redbeat_store.entry_name(lost.pk)}")


@pytest.mark.django_db
def test_reconcile_refuses_other_methods(root):
    assert root.put(RECONCILE).status_code == 405
