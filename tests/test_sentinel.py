"""``reliable_tasks.sentinel``: one set of settings for kombu, Celery's result backend and RedBeat.

The option names are checked against what the libraries read (kombu's ``SentinelChannel``,
Celery's ``SentinelBackend``, RedBeat's ``get_redis``), then used for real: a topology of a
master, a replica and three sentinels, password-protected, with a worker and beat of the example
project going through it, and a failover in the middle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from urllib.parse import unquote

import pytest
import redis
from celery import Celery
from django.conf import settings
from kombu import Connection
from kombu.transport.redis import SentinelChannel
from redbeat.schedulers import REDBEAT_INTERNAL_OPTIONS, get_redis

from example_project.celery import app as celery_app
from example_project.demo.models import Execution
from example_project.devservers import REPO_ROOT, SentinelTopology, celery_app_using
from reliable_tasks import dispatch, redbeat_store
from reliable_tasks.models import PeriodicSchedule, TaskRecord
from reliable_tasks.publisher import broker_run_id
from reliable_tasks.sentinel import (
    as_django_settings,
    celery_settings,
    describe,
    parse_sentinels,
    sanitize_url,
)
from reliable_tasks.states import TaskState
from reliable_tasks.sweeper import sweep

SENTINELS = "10.0.0.1:26379,10.0.0.2:26380,[fd00::3]:26381"
SECRET = "s3cr;t@/pass%"
SENTINEL_SECRET = "sentinel-only-secret"


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- the settings, without servers ----------------------------------------------------------------


def test_sentinel_addresses_are_parsed_from_text_or_pairs() -> None:
    assert parse_sentinels(" a:1, b:2 ,") == [("a", 1), ("b", 2)]
    assert parse_sentinels(["[::1]:26379", ("c", 3)]) == [("::1", 26379), ("c", 3)]


@pytest.mark.parametrize("bad", ["", "host", "host:port", ":26379", "h:0", "h:70000", [("h", "1")]])
def test_a_bad_sentinel_address_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match="Sentinel address|no Sentinel address"):
        parse_sentinels(bad)  # type: ignore[arg-type]


def test_the_broker_url_names_every_sentinel_with_the_database_and_quoted_credentials() -> None:
    conf = celery_settings(SENTINELS, "prod", db=3, password=SECRET, username="app")

    parts = conf["broker_url"].split(";")
    assert len(parts) == 3
    for part in parts:
        assert part.startswith("sentinel://app:")
        assert part.endswith("/3")
    assert parts[2].startswith("sentinel://app:") and "@[fd00::3]:26381/3" in parts[2]
    # kombu splits on ';' first: the password's own ';' must be quoted.
    connection = Connection(conf["broker_url"], transport_options=conf["broker_transport_options"])
    assert connection.password == SECRET
    assert connection.userid == "app"
    assert connection.virtual_host == "3"
    assert [unquote(part.split("@")[0].split(":")[-1]) for part in parts] == [SECRET] * 3


def test_broker_transport_options_are_the_names_kombu_reads() -> None:
    conf = celery_settings(SENTINELS, "prod", password=SECRET, sentinel_password=SENTINEL_SECRET,
                           socket_timeout=3, min_other_sentinels=1, visibility_timeout=600)

    options = conf["broker_transport_options"]
    assert set(options) <= set(SentinelChannel.from_transport_options)
    assert options["master_name"] == "prod"
    assert options["socket_timeout"] == options["socket_connect_timeout"] == 3
    assert options["retry_on_timeout"] is False
    assert options["min_other_sentinels"] == 1
    sentinel_kwargs = options["sentinel_kwargs"]
    assert sentinel_kwargs["password"] == SENTINEL_SECRET
    assert sentinel_kwargs["socket_timeout"] == sentinel_kwargs["socket_connect_timeout"] == 1.0
    assert sentinel_kwargs["retry"].get_retries() == 0


def test_redbeat_options_are_the_names_redbeat_reads() -> None:
    conf = celery_settings(SENTINELS, "prod", db=2, password=SECRET, username="app",
                           sentinel_password=SENTINEL_SECRET, redbeat_retry_period=10)

    assert conf["redbeat_redis_url"] == "redis-sentinel://10.0.0.1:26379/2"
    options = conf["redbeat_redis_options"]
    assert options["sentinels"] == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("fd00::3", 26381)]
    assert options["service_name"] == "prod"
    assert "master_name" not in options
    assert (options["db"], options["password"], options["username"]) == (2, SECRET, "app")
    assert options["retry_period"] == 10
    assert options["sentinel_kwargs"]["password"] == SENTINEL_SECRET
    assert set(options) - {"socket_timeout", "password", "db", "username"} <= set(
        REDBEAT_INTERNAL_OPTIONS)


def test_the_result_backend_is_configured_only_when_it_is_redis() -> None:
    assert "result_backend" not in celery_settings(SENTINELS, "prod")
    conf = celery_settings(SENTINELS, "prod", password=SECRET, result_backend_is_redis=True,
                           socket_timeout=4)

    assert conf["result_backend"] == conf["broker_url"]
    assert conf["result_backend_transport_options"]["master_name"] == "prod"
    assert conf["result_backend_transport_options"]["sentinel_kwargs"]["socket_timeout"] == 1.0
    assert (conf["redis_socket_timeout"], conf["redis_socket_connect_timeout"]) == (4, 4)
    assert conf["redis_retry_on_timeout"] is False


def test_tls_applies_to_the_broker_the_result_backend_redbeat_and_the_sentinels() -> None:
    tls = {"ssl_ca_certs": "/etc/ssl/ca.pem", "ssl_cert_reqs": "required"}
    conf = celery_settings(SENTINELS, "prod", ssl=tls, result_backend_is_redis=True)

    assert conf["broker_use_ssl"] == conf["redis_backend_use_ssl"] == tls
    assert conf["redbeat_redis_use_ssl"] == tls
    sentinel_kwargs = conf["broker_transport_options"]["sentinel_kwargs"]
    assert sentinel_kwargs["ssl"] is True
    assert sentinel_kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    plain_sentinels = celery_settings(SENTINELS, "prod", ssl=True, sentinel_ssl=False)
    assert "ssl" not in plain_sentinels["broker_transport_options"]["sentinel_kwargs"]
    assert "broker_use_ssl" not in celery_settings(SENTINELS, "prod")


@pytest.mark.parametrize("kwargs", [
    {"master_name": ""}, {"db": -1}, {"db": "0"}, {"socket_timeout": 0},
])
def test_bad_arguments_are_clear_errors_without_the_password(kwargs: dict) -> None:
    arguments = {"sentinels": SENTINELS, "master_name": "prod", "password": SECRET, **kwargs}
    with pytest.raises(ValueError) as error:
        celery_settings(**arguments)
    assert SECRET not in str(error.value)


def test_describe_and_sanitize_url_mask_every_password() -> None:
    conf = celery_settings(SENTINELS, "prod", password=SECRET, sentinel_password=SENTINEL_SECRET,
                           result_backend_is_redis=True)

    shown = json.dumps(describe(conf), default=repr)
    assert SECRET not in shown and "s3cr" not in shown
    assert SENTINEL_SECRET not in shown
    assert sanitize_url(conf["broker_url"]).count(":**@") == 3
    assert sanitize_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_as_django_settings_names_them_for_the_celery_namespace() -> None:
    conf = celery_settings(SENTINELS, "prod")
    names = as_django_settings(conf)

    assert names["CELERY_BROKER_URL"] == conf["broker_url"]
    assert names["CELERY_BROKER_TRANSPORT_OPTIONS"] is conf["broker_transport_options"]
    assert names["CELERY_REDBEAT_REDIS_OPTIONS"] is conf["redbeat_redis_options"]
    app = Celery("namespaced")
    app.config_from_object(type("Settings", (), names), namespace="CELERY")
    assert app.conf.broker_url == conf["broker_url"]
    assert app.conf.redbeat_redis_options == conf["redbeat_redis_options"]


def test_the_example_project_reads_redis_sentinels_from_the_environment() -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "example_project.settings",
           "REDIS_SENTINELS": "127.0.0.1:26379,127.0.0.1:26380", "REDIS_MASTER_NAME": "prod",
           "REDIS_PASSWORD": SECRET, "PYTHONPATH": str(REPO_ROOT)}
    script = (
        "import json, django; django.setup()\n"
        "from example_project.celery import app\n"
        "print(json.dumps({'url': app.conf.broker_url,"
        " 'master': app.conf.broker_transport_options['master_name'],"
        " 'redbeat': app.conf.redbeat_redis_url,"
        " 'service': app.conf.redbeat_redis_options['service_name'],"
        " 'sentinels': app.conf.redbeat_redis_options['sentinels']}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60, check=True)

    seen = json.loads(result.stdout)
    assert seen["url"].startswith("sentinel://:") and seen["url"].count("sentinel://") == 2
    assert seen["master"] == seen["service"] == "prod"
    assert seen["redbeat"] == "redis-sentinel://127.0.0.1:26379/0"
    assert seen["sentinels"] == [["127.0.0.1", 26379], ["127.0.0.1", 26380]]


# --- against a real topology ----------------------------------------------------------------------


def test_the_fixture_points_the_app_and_settings_at_the_topology(
        sentinel_topology: SentinelTopology) -> None:
    assert celery_app.conf.broker_url.startswith("sentinel://")
    assert celery_app.conf.broker_transport_options["master_name"] == "rt-master"
    assert sentinel_topology.sentinels_text == settings.REDIS_SENTINELS
    assert settings.CELERY_REDBEAT_REDIS_OPTIONS["service_name"] == "rt-master"
    master = sentinel_topology.master()
    assert broker_run_id(celery_app) == master.run_id()
    assert get_redis(celery_app).info("server")["tcp_port"] == master.port


def test_redbeat_and_kombu_without_passwords_work_too(tmp_path) -> None:
    with SentinelTopology(base_dir=tmp_path / "open") as topology:
        app = Celery("open")
        with celery_app_using(app, topology.celery_settings(db=1)):
            with app.connection_for_write() as connection:
                connection.default_channel.client.set("kombu-key", "1")
            get_redis(app).set("redbeat-key", "1")
            with topology.master().client() as client:
                client.select(1)
                assert sorted(client.keys("*")) == ["kombu-key", "redbeat-key"]


@pytest.mark.django_db(transaction=True)
def test_a_task_runs_and_a_schedule_is_pushed_through_sentinel_with_passwords(
        sentinel_topology, sentinel_worker) -> None:
    sentinel_worker(sentinel_topology)
    row = dispatch("demo.record", ("through-sentinel",))
    schedule = PeriodicSchedule.objects.create(name="every-minute", task="demo.add", args=[1, 2],
                                               interval_seconds=60)

    wait_for(lambda: Execution.objects.filter(token="through-sentinel").exists(), 30, "the run")
    wait_for(lambda: TaskRecord.objects.get(pk=row.id).state == TaskState.SUCCESS, 10, "SUCCESS")
    entries = redbeat_store.read_entries(celery_app, [redbeat_store.entry_name(schedule.pk)])
    assert list(entries) == [redbeat_store.entry_name(schedule.pk)]


@pytest.mark.django_db(transaction=True)
def test_no_password_appears_in_the_logs_of_a_worker_and_beat_through_a_failover(
        sentinel_topology, sentinel_worker, sentinel_beat, caplog) -> None:
    worker = sentinel_worker(sentinel_topology)
    beat = sentinel_beat(sentinel_topology, env={"RELIABLE_TASKS_SWEEP_INTERVAL": "1"})
    dispatch("demo.record", ("before-failover",))
    wait_for(lambda: Execution.objects.filter(token="before-failover").exists(), 30, "a run")
    sweep()

    old = sentinel_topology.kill_master()
    for _ in range(10):  # publishes and sweeps that fail while there is no master
        dispatch("demo.record", ("during-failover",))
        sweep()
        time.sleep(0.2)
    sentinel_topology.wait_for_new_master(old)
    wait_for(lambda: Execution.objects.filter(token="during-failover").count() >= 10, 60,
             "the runs dispatched during the failover")

    logs = [worker.log_text(), beat.log_text(), caplog.text,
            *TaskRecord.objects.values_list("publish_error", flat=True)]
    secrets = [sentinel_topology.password, sentinel_topology.sentinel_password]
    assert all(secrets)
    for secret in secrets:
        assert all(secret not in text for text in logs), secret


@pytest.mark.django_db(transaction=True)
def test_the_sweeper_sees_a_failover_as_a_new_broker(sentinel_topology) -> None:
    sweep()
    old = sentinel_topology.kill_master()
    new = sentinel_topology.wait_for_new_master(old)

    deadline = time.monotonic() + 20
    while not sweep().broker_changed:
        assert time.monotonic() < deadline, "the failover was not seen"
        time.sleep(0.5)
    assert broker_run_id(celery_app) == new.run_id()

    # The old master returns empty and is demoted. On a loaded machine the sentinels may also
    # fail over once more (1 s down-after) and promote it: either way one master remains and
    # every other server is a read-only replica of it.
    sentinel_topology.restart(old)
    sentinel_topology.wait_healthy(timeout=60)
    master = sentinel_topology.master()
    assert [server for server in sentinel_topology.servers
            if server.replication()["role"] == "master"] == [master]
    for replica in sentinel_topology.replicas():
        with pytest.raises(redis.ReadOnlyError):
            replica.client().set("written-to-a-replica", "1")
