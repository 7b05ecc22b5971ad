"""Fixtures of the whole suite: real Redis servers and real Celery processes.

Redis. Every server is a throwaway ``redis-server`` on 127.0.0.1 started by the suite; the
machine's own Redis is never used.

- ``redis_server`` (function scope): a private server the test may kill, pause or restart.
- ``redis_session_server`` (session scope): one server shared by the session. Never break it.
- ``shared_redis`` (function scope): ``redis_session_server``, flushed before the test.

``redis_server`` and ``shared_redis`` point the example project's Celery app (``broker_url``,
``redbeat_redis_url``, its connection pools) and the Django settings (``REDIS_URL``,
``CELERY_BROKER_URL``, ``CELERY_REDBEAT_REDIS_URL``) at their server for the test; use one of the
two per test. Outside them, the app and the settings point at a loopback port that refuses
connections, so a test that forgets to ask for Redis fails fast instead of reaching a real server.

Celery processes. Workers and beat are other processes: their tests need committed data, so they
are marked ``@pytest.mark.django_db(transaction=True)``.

- ``worker_env(server, **extra)``: the environment of a subprocess that uses ``server`` and the
  test database.
- ``celery_worker(server, concurrency=2, extra_args=(), env=None)``: a started worker.
- ``celery_beat(server, extra_args=(), env=None)``: a started beat.

The processes a test starts are stopped at its teardown, and their logs are attached to the report
when it fails. Whatever is still running at the end of the session is stopped then (and, failing
that, at exit).

Redis Sentinel. ``sentinel_topology`` (function scope) starts a ``SentinelTopology``: a master, a
replica and three sentinels on free loopback ports (quorum 2, a master is down after 1 s), the
master and the sentinels password-protected (``SENTINEL_PASSWORD``, ``SENTINEL_SENTINEL_PASSWORD``,
with characters that need quoting in URLs). The test may kill, hang and restart its servers. The
fixture points the Celery app (``reliable_tasks.sentinel.celery_settings()``: broker URL and
transport options, RedBeat's URL and options) and the Django settings (``REDIS_SENTINELS``,
``REDIS_MASTER_NAME``, ``CELERY_BROKER_*``, ``CELERY_REDBEAT_*``) at it for the test.

- ``sentinel_worker_env(topology, **extra)``: the environment of a subprocess that uses the
  topology (``REDIS_SENTINELS``, ``REDIS_MASTER_NAME``, ``REDIS_PASSWORD``, ...) and the test
  database.
- ``sentinel_worker(topology, concurrency=2, extra_args=(), env=None)`` and
  ``sentinel_beat(topology, extra_args=(), env=None)``: started processes using the topology.

PostgreSQL. ``postgres_server`` (function scope) starts a ``PostgresServer`` of the test alone: a
throwaway cluster on a free loopback port (``url``, ``connect()``), its log in ``tmp_path``, which
the test may stop, kill, pause, restart or cut off (``terminate_backends()``). Nothing is pointed
at it. It is skipped, with the reason, where the machine has no PostgreSQL server binaries.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
from django.db import connection
from django.test import override_settings
from kombu import pools

from example_project.celery import app as celery_app
from example_project.devservers import (
    LOOPBACK,
    REPO_ROOT,
    CeleryProcess,
    PostgresServer,
    RedisServer,
    SentinelTopology,
    celery_app_using,
    database_url_for,
    postgres_unavailable,
    stop_all,
)
from reliable_tasks.publisher import close_publisher
from reliable_tasks.sentinel import as_django_settings

WorkerEnv = Callable[..., dict[str, str]]
ProcessFactory = Callable[..., CeleryProcess]

_APP_URL_KEYS = ("broker_url", "redbeat_redis_url")
_SETTINGS_URL_NAMES = ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_REDBEAT_REDIS_URL")
_STARTED = pytest.StashKey[list[CeleryProcess]]()
_LOG_TAIL_CHARS = 20_000


# --- pointing the Celery app at a server ----------------------------------------------------------


def _drop_app_connections() -> None:
    """Close the app's broker and RedBeat connections, so the next use reads the current URLs."""
    pools.reset()  # closes and forgets every kombu connection and producer pool
    celery_app._pool = None
    amqp = celery_app.__dict__.get("amqp")  # a cached property: only reset it if it exists
    if amqp is not None:
        amqp._producer_pool = None
    redbeat_client = celery_app.__dict__.pop("redbeat_redis", None)
    if redbeat_client is not None:
        redbeat_client.close()
    celery_app.__dict__.pop("redbeat_conf", None)  # RedBeat caches its URL in there


@contextlib.contextmanager
def _celery_app_using(url: str) -> Iterator[None]:
    """Point the example project's Celery app (broker and RedBeat) at ``url`` for the block."""
    saved = {key: celery_app.conf.get(key) for key in _APP_URL_KEYS}
    _drop_app_connections()
    celery_app.conf.update(dict.fromkeys(_APP_URL_KEYS, url))
    try:
        yield
    finally:
        _drop_app_connections()
        celery_app.conf.update(saved)


@contextlib.contextmanager
def _pointed_at(url: str) -> Iterator[None]:
    """Point the Django settings and the Celery app at the Redis at ``url`` for the block."""
    # The app saves its own values before Django's settings, which it reads live, are overridden.
    with _celery_app_using(url), override_settings(**dict.fromkeys(_SETTINGS_URL_NAMES, url)):
        yield


@pytest.fixture(scope="session", autouse=True)
def _redis_refused_by_default() -> Iterator[None]:
    """Point the app and settings at a loopback port bound but never listening on, all session."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        with _pointed_at(f"redis://{LOOPBACK}:{sock.getsockname()[1]}/0"):
            yield


# --- Redis ----------------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started Redis server of this test alone, which it may kill, pause or restart."""
    with RedisServer(data_dir=tmp_path / "redis") as server, _pointed_at(server.url):
        yield server


@pytest.fixture(scope="session")
def redis_session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis server for the whole session (not pointed at: see ``shared_redis``)."""
    with RedisServer(data_dir=tmp_path_factory.mktemp("redis-session")) as server:
        yield server


@pytest.fixture
def shared_redis(redis_session_server: RedisServer) -> Iterator[RedisServer]:
    """The session's Redis server, flushed, with the app and settings pointed at it."""
    redis_session_server.flush()
    with _pointed_at(redis_session_server.url):
        yield redis_session_server


# --- PostgreSQL -----------------------------------------------------------------------------------


@pytest.fixture
def postgres_server(tmp_path: Path) -> Iterator[PostgresServer]:
    """A started PostgreSQL cluster of this test alone: it may stop, kill, pause or restart it."""
    reason = postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with PostgresServer(base_dir=tmp_path / "postgres") as server:
        yield server


# --- Celery processes -----------------------------------------------------------------------------


@pytest.fixture
def worker_env(django_db_setup: None) -> WorkerEnv:
    """Return ``make(server, **extra)``: the environment of a worker or beat subprocess.

    It uses ``server`` and opens the test database (set up by pytest-django by then); ``extra``
    variables are added last.
    """

    def make(server: RedisServer, **extra: str) -> dict[str, str]:
        return {
            "REDIS_URL": server.url,
            "DATABASE_URL": database_url_for(connection.settings_dict),
            # pytest-django exports it; settings.SETTINGS_MODULE is None under override_settings
            "DJANGO_SETTINGS_MODULE": os.environ["DJANGO_SETTINGS_MODULE"],
            "PYTHONPATH": str(REPO_ROOT),
            **extra,
        }

    return make


@contextlib.contextmanager
def _celery_launcher(
    request: pytest.FixtureRequest, tmp_path: Path, make_env: Callable[..., dict[str, str]]
) -> Iterator[Callable[..., CeleryProcess]]:
    """Yield ``launch(kind, target, extra_args, env, **options)``; stop all it started on exit.

    ``make_env(target, **env)`` gives the process its environment (a Redis server's, or a
    Sentinel topology's).
    """
    started = request.node.stash.setdefault(_STARTED, [])

    def launch(
        kind: Literal["worker", "beat"],
        target: Any,
        extra_args: Sequence[str],
        env: dict[str, str] | None,
        **options: int,
    ) -> CeleryProcess:
        process = CeleryProcess(kind, make_env(target, **(env or {})), extra_args=extra_args,
                                log_dir=tmp_path / "celery", **options)
        started.append(process)
        return process.start()

    yield launch
    for process in reversed(started):
        process.stop()


@pytest.fixture
def _launch_celery(
    request: pytest.FixtureRequest, worker_env: WorkerEnv, tmp_path: Path
) -> Iterator[Callable[..., CeleryProcess]]:
    """Return ``launch(kind, server, extra_args, env, **options)``; stop all at teardown."""
    with _celery_launcher(request, tmp_path, worker_env) as launch:
        yield launch


@pytest.fixture
def celery_worker(_launch_celery: Callable[..., CeleryProcess]) -> ProcessFactory:
    """Return ``start(server, concurrency=2, extra_args=(), env=None)``: a started worker.

    ``env`` adds variables to ``worker_env(server)``. Workers are stopped at teardown.
    """

    def start(
        server: RedisServer,
        concurrency: int = 2,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> CeleryProcess:
        return _launch_celery("worker", server, extra_args, env, concurrency=concurrency)

    return start


@pytest.fixture
def celery_beat(_launch_celery: Callable[..., CeleryProcess]) -> ProcessFactory:
    """Return ``start(server, extra_args=(), env=None)``: a started beat, stopped at teardown."""

    def start(
        server: RedisServer, extra_args: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> CeleryProcess:
        return _launch_celery("beat", server, extra_args, env)

    return start


# --- Redis Sentinel -------------------------------------------------------------------------------

#: The master's password in the ``sentinel_topology`` fixture: needs quoting in a URL.
SENTINEL_PASSWORD = "m@ster;pass/word%"
#: The sentinels' own password in the ``sentinel_topology`` fixture.
SENTINEL_SENTINEL_PASSWORD = "sentinel:secret"


@contextlib.contextmanager
def _pointed_at_topology(topology: SentinelTopology) -> Iterator[None]:
    """Point the Django settings and the Celery app at ``topology`` for the block."""
    conf = topology.celery_settings()
    django_names = {
        "REDIS_SENTINELS": topology.sentinels_text,
        "REDIS_MASTER_NAME": topology.master_name,
        **as_django_settings(conf),
    }
    close_publisher()
    # The app reads Django's settings live: it saves its own values before they are overridden,
    # else it would "restore" the topology's afterwards.
    with celery_app_using(celery_app, conf), override_settings(**django_names):
        try:
            yield
        finally:
            close_publisher()


@pytest.fixture
def sentinel_topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    """A started master, replica and three sentinels of this test, the app pointed at them."""
    topology = SentinelTopology(
        base_dir=tmp_path / "sentinel",
        password=SENTINEL_PASSWORD,
        sentinel_password=SENTINEL_SENTINEL_PASSWORD,
    )
    with topology, _pointed_at_topology(topology):
        yield topology


@pytest.fixture
def sentinel_worker_env(django_db_setup: None) -> Callable[..., dict[str, str]]:
    """Return ``make(topology, **extra)``: the environment of a subprocess using ``topology``."""

    def make(topology: SentinelTopology, **extra: str) -> dict[str, str]:
        return {
            **topology.env(),
            "DATABASE_URL": database_url_for(connection.settings_dict),
            "DJANGO_SETTINGS_MODULE": os.environ["DJANGO_SETTINGS_MODULE"],
            "PYTHONPATH": str(REPO_ROOT),
            **extra,
        }

    return make


@pytest.fixture
def _launch_sentinel_celery(
    request: pytest.FixtureRequest,
    sentinel_worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> Iterator[Callable[..., CeleryProcess]]:
    """Return ``launch(kind, topology, extra_args, env, **options)``; stop all at teardown."""
    with _celery_launcher(request, tmp_path, sentinel_worker_env) as launch:
        yield launch


@pytest.fixture
def sentinel_worker(_launch_sentinel_celery: Callable[..., CeleryProcess]) -> ProcessFactory:
    """Return ``start(topology, concurrency=2, extra_args=(), env=None)``: a started worker."""

    def start(
        topology: SentinelTopology,
        concurrency: int = 2,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> CeleryProcess:
        return _launch_sentinel_celery("worker", topology, extra_args, env,
                                       concurrency=concurrency)

    return start


@pytest.fixture
def sentinel_beat(_launch_sentinel_celery: Callable[..., CeleryProcess]) -> ProcessFactory:
    """Return ``start(topology, extra_args=(), env=None)``: a started beat using ``topology``."""

    def start(
        topology: SentinelTopology,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> CeleryProcess:
        return _launch_sentinel_celery("beat", topology, extra_args, env)

    return start


# --- reporting and the safety net -----------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the logs of the Celery processes a test started to the report of its failure."""
    report = yield
    if report.failed:
        for process in item.stash.get(_STARTED, []):
            log = process.log_text()
            if len(log) > _LOG_TAIL_CHARS:
                log = "[...]\n" + log[-_LOG_TAIL_CHARS:]
            report.sections.append((f"log of {process.name} ({report.when})", log))
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop every server and process still running, whatever fixture forgot it; then close
    the clients left to those servers.

    Connections to servers the tests killed linger in pools and in garbage cycles; pytest
    collects its garbage once more after the session and, with ``-W error``, fails the whole
    run on the first unclosed socket it finds, naming no test. The session's own pools are
    closed here, and the remaining garbage is collected with that warning silenced: a leak
    inside a test is still reported by that test.
    """
    stop_all()
    close_publisher()
    pools.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
