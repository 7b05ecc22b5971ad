"""The dev servers and fixtures work against the real thing: redis-server, PostgreSQL and Celery
processes."""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dj_database_url
import pytest
import redis
from django.conf import settings

from example_project.celery import app as celery_app
from example_project.demo.models import Execution
from example_project.devservers import (
    CeleryProcess,
    PostgresServer,
    RedisServer,
    database_url_for,
    postgres_unavailable,
)

try:
    import psycopg
except ImportError:  # the PostgreSQL tests are skipped: see postgres_unavailable()
    psycopg = None


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


# --- PostgreSQL -----------------------------------------------------------------------------------

_NO_POSTGRES = postgres_unavailable()
needs_postgres = pytest.mark.skipif(_NO_POSTGRES is not None, reason=_NO_POSTGRES or "")


def _process_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture(scope="module")
def shared_postgres() -> Iterator[PostgresServer]:
    """One cluster for the tests of this module that leave it running and answering."""
    if _NO_POSTGRES is not None:
        pytest.skip(_NO_POSTGRES)
    with PostgresServer(fsync=False) as server:
        yield server


@needs_postgres
def test_postgres_server_answers_on_loopback_and_its_pid_is_the_postmaster(
    shared_postgres: PostgresServer,
) -> None:
    server = shared_postgres
    assert server.url == f"postgres://postgres@127.0.0.1:{server.port}/reliable_tasks"
    assert server.port != 5432
    with server.connect() as conn:
        assert conn.execute("SELECT current_database(), 1 + 1").fetchone() == ("reliable_tasks", 2)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SHOW unix_socket_directories").fetchone() == ("",)
    pid = server.pid
    assert pid is not None
    assert (server.data_dir / "postmaster.pid").read_text().split()[0] == str(pid)
    ps = subprocess.run(["ps", "-o", "user=,args=", "-p", str(pid)],
                        capture_output=True, text=True, check=True).stdout.split()
    assert ps[1:3] == [str(server.bin_dir / "postgres"), "-D"]
    assert ps[0] == (server.user or getpass.getuser())
    if os.geteuid() == 0:
        assert server.user == "postgres"


@needs_postgres
def test_postgres_restart_keeps_the_data_and_the_port(postgres_server: PostgresServer) -> None:
    with postgres_server.connect() as conn:
        conn.execute("CREATE TABLE kept (value text)")
        conn.execute("INSERT INTO kept VALUES ('before')")
    port = postgres_server.port

    for mode in ("fast", "immediate"):
        pid = postgres_server.pid
        postgres_server.restart(mode)
        assert postgres_server.port == port
        assert postgres_server.pid != pid
        assert pid is not None and not _process_running(pid)
        with postgres_server.connect() as conn:
            assert conn.execute("SELECT value FROM kept").fetchall() == [("before",)], mode


@needs_postgres
def test_postgres_kill_leaves_no_process_and_start_recovers_committed_data(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    assert postgres_server.log_path.parent == tmp_path / "postgres"
    conn = postgres_server.connect()
    conn.execute("CREATE TABLE kept (value text)")
    conn.execute("INSERT INTO kept VALUES ('committed')")
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    port, pids = postgres_server.port, [postgres_server.pid, *postgres_server.children()]
    assert row[0] in pids and len(pids) >= 4  # the backend and the auxiliary processes

    postgres_server.kill()

    assert not postgres_server.is_running()
    assert not any(_process_running(pid) for pid in pids if pid is not None)
    assert _refuses_connections(port)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()

    postgres_server.start()
    assert postgres_server.port == port
    assert "automatic recovery in progress" in postgres_server.log_text()
    with postgres_server.connect() as conn:
        assert conn.execute("SELECT value FROM kept").fetchall() == [("committed",)]


@needs_postgres
def test_terminate_backends_breaks_the_open_connections(shared_postgres: PostgresServer) -> None:
    with shared_postgres.connect() as victim:
        victim.execute("SELECT 1")

        assert shared_postgres.terminate_backends() >= 1

        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
    with shared_postgres.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@needs_postgres
def test_pause_hangs_postgres_until_resume(postgres_server: PostgresServer) -> None:
    results: list[Any] = []
    with postgres_server.connect() as open_conn:
        postgres_server.pause()
        query = threading.Thread(
            target=lambda: results.append(open_conn.execute("SELECT 42").fetchone()), daemon=True
        )
        query.start()
        query.join(timeout=0.5)
        assert query.is_alive() and results == []
        with pytest.raises(psycopg.OperationalError):
            postgres_server.connect(connect_timeout=1)

        postgres_server.resume()

        query.join(timeout=10)
        assert results == [(42,)]
    with postgres_server.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@needs_postgres
def test_postgres_stop_frees_the_port_and_removes_its_directory() -> None:
    server = PostgresServer(fsync=False).start()
    port, base_dir, data_dir = server.port, server.base_dir, server.data_dir
    pids = [server.pid, *server.children()]
    assert data_dir.is_dir()

    server.stop()

    assert not server.is_running()
    assert not any(_process_running(pid) for pid in pids if pid is not None)
    assert _refuses_connections(port)
    assert not base_dir.exists()
    assert not data_dir.exists()


@needs_postgres
def test_postgres_stop_after_kill_removes_the_shared_memory_it_left() -> None:
    server = PostgresServer(fsync=False).start()
    server.kill()
    shmid = (server.data_dir / "postmaster.pid").read_text().splitlines()[6].split()[1]

    def segment_ids() -> list[str]:
        rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
        return [row.split()[1] for row in rows]

    assert shmid in segment_ids()  # a killed postmaster cannot remove it

    server.stop()

    assert shmid not in segment_ids()


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
