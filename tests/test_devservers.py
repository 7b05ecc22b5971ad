"""The dev servers and fixtures work against the real thing: redis-server and Celery processes."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
import pytest
import redis
from django.conf import settings

from example_project.celery import app as celery_app
from example_project.demo.models import Execution
from example_project.devservers import CeleryProcess, RedisServer, database_url_for


def _process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


# --- Redis ----------------------------------------------------------------------------------------


def test_redis_server_answers_on_loopback_without_persistence(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.port != 6379
    with redis_server.client() as client:
        assert client.ping()
        assert client.info("server")["process_id"] == redis_server.pid
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}


def test_redis_fixtures_point_the_celery_app_and_settings_at_their_server(
    redis_server: RedisServer,
) -> None:
    assert celery_app.conf.broker_url == redis_server.url
    assert celery_app.conf.redbeat_redis_url == redis_server.url
    assert redis_server.url == settings.REDIS_URL == settings.CELERY_BROKER_URL
    with celery_app.connection_for_write() as conn:
        assert (conn.hostname, conn.port) == ("127.0.0.1", redis_server.port)


@pytest.mark.parametrize("run", [1, 2])
def test_shared_redis_is_flushed_for_each_test(shared_redis: RedisServer, run: int) -> None:
    with shared_redis.client() as client:
        assert client.dbsize() == 0
        client.set("left-over", run)  # the next test using shared_redis must not see it
    assert celery_app.conf.broker_url == shared_redis.url


def test_without_a_redis_fixture_the_app_points_at_a_port_that_refuses() -> None:
    url = urlsplit(celery_app.conf.broker_url)
    assert url.hostname == "127.0.0.1"
    assert url.port != 6379
    assert settings.REDIS_URL == celery_app.conf.broker_url == celery_app.conf.redbeat_redis_url
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((url.hostname, url.port), timeout=1).close()


def test_pause_hangs_redis_for_about_the_given_time(redis_server: RedisServer) -> None:
    started_at = time.monotonic()
    cli = redis_server.pause(1.5)
    with redis_server.client(timeout=0.2) as client, pytest.raises(redis.TimeoutError):
        client.ping()

    def answers() -> bool:
        try:
            with redis_server.client(timeout=0.2) as client:
                return bool(client.ping())
        except redis.TimeoutError:
            return False

    assert _wait_until(answers, timeout=10, interval=0.05)
    assert 1.2 <= time.monotonic() - started_at <= 4.0
    assert cli.wait(timeout=5) == 0


def test_kill_then_restart_gives_an_empty_server_on_the_same_port(
    redis_server: RedisServer,
) -> None:
    with redis_server.client() as client:
        client.set("key", "value")
    port, pid, run_id = redis_server.port, redis_server.pid, redis_server.run_id()

    redis_server.kill()
    assert pid is not None and not _process_exists(pid)
    with redis_server.client(timeout=0.5) as client, pytest.raises(redis.ConnectionError):
        client.ping()

    redis_server.restart()
    assert redis_server.port == port
    assert redis_server.pid != pid
    assert redis_server.run_id() != run_id
    with redis_server.client() as client:
        assert client.dbsize() == 0


def test_stop_leaves_no_process_and_no_temporary_directory() -> None:
    server = RedisServer().start()
    pid, data_dir = server.pid, server.data_dir
    assert pid is not None and _process_exists(pid)

    server.stop()

    assert not _process_exists(pid)
    assert not data_dir.exists()
    assert not server.is_running()


# --- database URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings_dict",
    [
        {"ENGINE": "django.db.backends.sqlite3", "NAME": "/tmp/some dir/test db.sqlite3"},
        {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "test_reliable",
            "USER": "rt user",
            "PASSWORD": "p@ss:w/rd%",
            "HOST": "127.0.0.1",
            "PORT": "5432",
        },
        {
            "ENGINE": "django.db.backends.mysql",
            "NAME": "test_reliable",
            "USER": "root",
            "PASSWORD": "secret",
            "HOST": "127.0.0.1",
            "PORT": 3306,
        },
    ],
    ids=["sqlite", "postgresql", "mysql"],
)
def test_database_url_for_round_trips_through_dj_database_url(settings_dict: dict) -> None:
    parsed = dj_database_url.parse(database_url_for(settings_dict))

    for key in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST"):
        assert parsed.get(key, "") == settings_dict.get(key, ""), key
    assert str(parsed.get("PORT", "")) == str(settings_dict.get("PORT", ""))


def test_database_url_for_refuses_an_in_memory_database() -> None:
    with pytest.raises(ValueError, match="in-memory"):
        database_url_for({"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"})


# --- Celery processes -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_runs_a_plain_celery_task_against_the_test_database(
    redis_server: RedisServer, celery_worker: Callable[..., CeleryProcess]
) -> None:
    worker = celery_worker(redis_server)

    celery_app.send_task("demo.plain_record", args=["tok-1"])

    def recorded() -> bool:
        return Execution.objects.filter(token="tok-1").count() == 1

    assert _wait_until(recorded, timeout=30), worker.log_text()[-3000:]
    pid = worker.pid
    assert pid is not None
    worker.stop()
    assert not worker.is_running()
    assert not _process_exists(pid)


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.django_db(transaction=True)
def test_kill_pool_child_kills_one_pool_process_and_the_worker_replaces_it(
    redis_server: RedisServer, celery_worker: Callable[..., CeleryProcess]
) -> None:
    worker = celery_worker(redis_server, concurrency=1)
    [child] = worker.children()

    assert worker.kill_pool_child() == child

    assert _wait_until(lambda: len(worker.children()) == 1 and child not in worker.children(), 20)
    assert not _process_exists(child)
    assert worker.is_running()


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.django_db(transaction=True)
def test_killed_worker_leaves_no_process_after_stop(
    redis_server: RedisServer, celery_worker: Callable[..., CeleryProcess]
) -> None:
    worker = celery_worker(redis_server, concurrency=2)
    pids = [worker.pid, *worker.children()]

    worker.kill()
    assert not worker.is_running()
    worker.stop()

    assert not any(_process_exists(pid) for pid in pids if pid is not None)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_beat_starts_against_the_test_redis_and_stops(
    redis_server: RedisServer, celery_beat: Callable[..., CeleryProcess]
) -> None:
    beat = celery_beat(redis_server)

    def beat_wrote_to_redis() -> bool:
        with redis_server.client() as client:
            return client.dbsize() > 0

    assert _wait_until(beat_wrote_to_redis, timeout=20), beat.log_text()[-3000:]
    pid = beat.pid
    assert pid is not None
    beat.stop()
    assert not _process_exists(pid)
