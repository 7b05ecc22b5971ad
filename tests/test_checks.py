"""System checks of the app's settings and of the project's Celery configuration."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.checks.registry import registry
from kombu import Queue

from example_project.celery import app as celery_app
from reliable_tasks import ReliableTask
from reliable_tasks.beat import ReliableRedBeatScheduler
from reliable_tasks.checks import check_broker, check_celery, check_settings, check_task_backends
from reliable_tasks.conf import SPECS, app_settings
from reliable_tasks.metrics import broker_redis
from reliable_tasks.runner import RUNNER_NAME
from reliable_tasks.sentinel import down_after_seconds


def ids(messages) -> list[str]:
    return [message.id for message in messages]


def test_the_default_settings_pass():
    assert check_settings() == []


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_setting_of_the_wrong_type_is_an_error(settings, name):
    setattr(settings, f"RELIABLE_TASKS_{name}", [])

    messages = check_settings()

    assert ids(messages) == ["reliable_tasks.E001"]
    assert f"RELIABLE_TASKS_{name}" in messages[0].msg


@pytest.mark.parametrize("name", sorted(n for n, spec in SPECS.items() if spec.minimum))
def test_a_setting_below_its_minimum_is_an_error(settings, name):
    setattr(settings, f"RELIABLE_TASKS_{name}", -1)

    assert ids(check_settings()) == ["reliable_tasks.E002"]


def test_settings_are_read_on_access(settings):
    settings.RELIABLE_TASKS_SWEEP_BATCH_SIZE = 7

    assert app_settings.SWEEP_BATCH_SIZE == 7


# --- the project's Celery configuration -------------------------------------------------------


class _OurSchedulerSubclass(ReliableRedBeatScheduler):
    """A project's own subclass of the app's scheduler: still records runs in the ledger."""


@pytest.fixture
def celery_conf(settings: Any) -> Iterator[Callable[..., None]]:
    """Return ``set(**conf)``: change the Celery app's configuration for this test only.

    Django's ``CELERY_*`` settings change too: the app reads them live, and before Celery 5.7
    they take precedence over ``conf.update()``.
    """
    saved: dict[str, Any] = {}

    def change(**conf: Any) -> None:
        for key, value in conf.items():
            saved.setdefault(key, celery_app.conf.get(key))
            setattr(settings, f"CELERY_{key.upper()}", value)
        celery_app.conf.update(conf)

    yield change
    celery_app.conf.update(saved)


def test_the_project_celery_configuration_passes():
    assert check_celery() == []


@pytest.mark.parametrize("conf", [
    {"accept_content": ["json", "pickle"]},
    {"accept_content": ["application/x-python-serialize"]},
    {"result_accept_content": ["pickle"]},
    {"task_serializer": "pickle"},
    {"result_serializer": "pickle"},
], ids=lambda conf: next(iter(conf)))
def test_pickle_anywhere_is_a_warning(celery_conf, conf):
    celery_conf(**conf)

    messages = check_celery()

    assert ids(messages) == ["reliable_tasks.W001"]
    assert next(iter(conf)) in messages[0].msg
    assert messages[0].hint


def test_a_missing_redbeat_url_is_a_warning(celery_conf, settings):
    celery_conf(redbeat_redis_url=None)
    settings.REDBEAT_REDIS_URL = "redis://example.invalid/1"  # the missing CELERY_ namespace

    messages = check_celery()

    assert ids(messages) == ["reliable_tasks.W002"]
    assert "falls back to broker_url" in messages[0].msg
    assert "never reads it" in messages[0].hint


def test_a_missing_redbeat_url_with_a_broker_that_is_not_redis_says_so(celery_conf):
    celery_conf(redbeat_redis_url="", broker_url="amqp://guest@127.0.0.1:5672//")

    messages = check_celery()

    assert ids(messages) == ["reliable_tasks.W002"]
    assert "not a Redis URL" in messages[0].msg


@pytest.mark.parametrize("scheduler", [
    "celery.beat:PersistentScheduler", "redbeat:RedBeatScheduler", "no.such:Scheduler"])
def test_a_beat_scheduler_that_is_not_ours_is_a_warning(celery_conf, scheduler):
    celery_conf(beat_scheduler=scheduler)

    messages = check_celery()

    assert ids(messages) == ["reliable_tasks.W003"]
    assert scheduler in messages[0].msg


@pytest.mark.parametrize("scheduler", [
    "reliable_tasks.beat:ReliableRedBeatScheduler",
    "reliable_tasks.beat.ReliableRedBeatScheduler",
    _OurSchedulerSubclass,
])
def test_our_scheduler_its_dotted_spellings_and_subclasses_pass(celery_conf, scheduler):
    celery_conf(beat_scheduler=scheduler)

    assert check_celery() == []


def test_a_retry_on_lost_task_without_acks_late_is_a_warning():
    @celery_app.task(name="tests.checks.lossy", base=ReliableTask, retry_on_lost=True,
                     acks_late=False, shared=False)
    def lossy() -> None:
        """A task that may re-run after its worker died, but acknowledges early."""

    try:
        messages = check_celery()
    finally:
        celery_app.tasks.unregister("tests.checks.lossy")

    assert ids(messages) == ["reliable_tasks.W004"]
    assert "tests.checks.lossy" in messages[0].msg
    assert "demo.resumable_record" not in messages[0].msg  # retry_on_lost, acks_late: fine


def test_a_visibility_timeout_not_longer_than_the_delay_threshold_is_an_error(celery_conf):
    celery_conf(broker_transport_options={"visibility_timeout": 300})

    messages = check_celery()

    assert ids(messages) == ["reliable_tasks.E003"]
    assert "300" in messages[0].msg


def test_a_delay_threshold_above_the_default_visibility_timeout_is_an_error(settings):
    settings.RELIABLE_TASKS_DELAY_THRESHOLD = 2 * 3600

    assert ids(check_celery()) == ["reliable_tasks.E003"]


def test_the_visibility_timeout_of_a_broker_that_is_not_redis_is_not_checked(celery_conf):
    celery_conf(broker_url="amqp://guest@127.0.0.1:5672//",
                broker_transport_options={"visibility_timeout": 1})

    assert check_celery() == []


def test_a_celery_app_path_that_does_not_import_is_an_error(settings):
    settings.RELIABLE_TASKS_CELERY_APP = "example_project.celery.no_such_app"

    messages = check_celery()

    assert ids(messages) == ["reliable_tasks.E005"]
    assert "no_such_app" in messages[0].msg
    assert check_broker() == []  # reported once, by the check that runs every time


def test_a_short_metrics_token_is_a_warning(settings):
    settings.RELIABLE_TASKS_METRICS_TOKEN = "s3cret"

    messages = check_settings()

    assert ids(messages) == ["reliable_tasks.W006"]
    assert "6 characters" in messages[0].msg


def test_a_long_metrics_token_passes(settings):
    settings.RELIABLE_TASKS_METRICS_TOKEN = "x" * 43

    assert check_settings() == []


def test_the_checks_are_registered_and_the_broker_check_only_for_deploy():
    everyday = registry.get_checks(include_deployment_checks=False)
    deploy = registry.get_checks(include_deployment_checks=True)

    assert check_settings in everyday and check_celery in everyday
    assert check_broker not in everyday and check_broker in deploy
    assert all("reliable_tasks" in check.tags for check in (check_settings, check_broker))


# --- deploy checks: the broker's Redis over the network ---------------------------------------


def test_an_unreachable_broker_is_a_warning_and_fast(settings):
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 0.5  # the autouse fixture's port refuses anyway
    started = time.monotonic()

    messages = check_broker()

    assert ids(messages) == ["reliable_tasks.W005"]
    assert time.monotonic() - started < 2


def test_a_hung_broker_is_a_warning_within_the_timeout(redis_server, settings):
    # redis_server before settings: the overrides must be undone in the reverse order.
    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 0.3
    redis_server.pause(3)
    started = time.monotonic()

    messages = check_broker()

    assert ids(messages) == ["reliable_tasks.W005"]
    assert time.monotonic() - started < 2


def test_a_broker_that_evicts_keys_is_an_error(redis_server):
    with redis_server.client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")

    messages = check_broker()

    assert ids(messages) == ["reliable_tasks.E004"]
    assert "allkeys-lru" in messages[0].msg


def test_a_broker_that_never_evicts_passes(redis_server):
    assert check_broker() == []


def test_the_deploy_check_runs_with_check_deploy(redis_server):
    with redis_server.client() as client:
        client.config_set("maxmemory-policy", "volatile-lru")

    messages = run_checks(include_deployment_checks=True, tags=["reliable_tasks"])

    assert "reliable_tasks.E004" in ids(messages)


# --- deploy checks: the broker's sentinels ----------------------------------------------------


def test_sentinels_that_fail_over_before_a_publish_gives_up_are_a_warning(sentinel_topology):
    # The fixture's sentinels fail over after 1 s; a publish waits up to PUBLISH_TIMEOUT (2 s).
    messages = check_broker()

    assert ids(messages) == ["reliable_tasks.W007"]
    assert "after 1 s" in messages[0].msg and "(2 s) + 1 s" in messages[0].msg
    # Below 1 s no timeout is short enough: the hint only says to raise the delay.
    assert messages[0].hint == "Raise Sentinel's down-after-milliseconds above 3000."
    assert sentinel_topology.password not in messages[0].msg + messages[0].hint


def test_sentinels_slower_than_a_publish_pass(sentinel_topology, settings):
    sentinel_topology.set_down_after(5000)
    assert check_broker() == []

    settings.RELIABLE_TASKS_PUBLISH_TIMEOUT = 4.5  # 4.5 s + 1 s is not below 5 s any more
    messages = check_broker()
    assert ids(messages) == ["reliable_tasks.W007"]
    assert messages[0].hint == ("Raise Sentinel's down-after-milliseconds above 5500, or lower "
                                "RELIABLE_TASKS_PUBLISH_TIMEOUT below 4 s.")


def test_a_dead_sentinel_is_skipped_when_reading_the_failover_delay(sentinel_topology):
    sentinel_topology.set_down_after(5000)

    with broker_redis() as client:
        pool = client.connection_pool
        asked_first = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
        first = next(sentinel for sentinel in sentinel_topology.sentinels
                     if sentinel.port == asked_first["port"])
        first.kill()

        assert down_after_seconds(pool) == 5.0
    assert check_broker() == []


def test_a_broker_without_sentinels_has_no_failover_delay(redis_server):
    with redis_server.client() as client:
        assert down_after_seconds(client.connection_pool) is None


# --- TASKS: django.tasks backends -----------------------------------------------------------

OUR_BACKEND = "reliable_tasks.backend.ReliableCeleryBackend"


def test_the_project_tasks_setting_passes():
    assert check_task_backends() == []


def test_the_task_backend_check_is_registered():
    assert check_task_backends in registry.get_checks()


def test_another_task_backend_is_not_checked(settings):
    settings.TASKS = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend",
                                  "OPTIONS": {"anything": 1}}}

    assert check_task_backends() == []


def test_a_backend_that_cannot_be_imported_is_an_error(settings, monkeypatch):
    monkeypatch.setitem(sys.modules, "reliable_tasks.backend", None)  # as without the framework
    settings.TASKS = {"default": {"BACKEND": OUR_BACKEND}}

    messages = check_task_backends()

    assert ids(messages) == ["reliable_tasks.E006"]
    assert "django-tasks" in messages[0].hint


@pytest.mark.parametrize("entry", [
    {"OPTIONS": {"max_attempt": 3}},
    {"OPTIONS": ["max_attempts"]},
    {"QUEUES": "default"},
    {"QUEUES": ["default", 7]},
], ids=["unknown option", "options not a dict", "queues a string", "a queue not a name"])
def test_queues_or_options_of_the_wrong_shape_are_an_error(settings, entry):
    settings.TASKS = {"default": {"BACKEND": OUR_BACKEND, **entry}}

    messages = check_task_backends()

    assert ids(messages) == ["reliable_tasks.E007"]
    assert "TASKS['default']" in messages[0].msg


@pytest.mark.parametrize(("options", "named"), [
    ({"max_attempts": 0}, "max_attempts"),
    ({"max_attempts": "3"}, "max_attempts"),
    ({"max_attempts": True}, "max_attempts"),
    ({"retry_backoff": -1}, "retry_backoff"),
    ({"retry_backoff_max": "10"}, "retry_backoff_max"),
    ({"retry_for": "builtins.ValueError"}, "retry_for"),
    ({"retry_for": ["reliable_tasks.exceptions.NoSuchError"]}, "NoSuchError"),
    ({"retry_for": ["builtins.len"]}, "len"),
    ({"retry_on_lost": "yes"}, "retry_on_lost"),
])
def test_an_invalid_option_is_an_error(settings, options, named):
    settings.TASKS = {"default": {"BACKEND": OUR_BACKEND, "OPTIONS": options}}

    messages = check_task_backends()

    assert ids(messages) == ["reliable_tasks.E008"]
    assert named in messages[0].msg


def test_valid_options_pass(settings):
    settings.TASKS = {"default": {"BACKEND": OUR_BACKEND, "OPTIONS": {
        "max_attempts": 5, "retry_for": [ValueError, "builtins.KeyError"], "retry_backoff": 1,
        "retry_backoff_max": 2.5, "retry_on_lost": True}}}

    assert check_task_backends() == []


@pytest.mark.parametrize(("create_missing", "expected"), [
    (True, "reliable_tasks.W009"), (False, "reliable_tasks.E009"),
])
def test_a_queue_celery_does_not_declare_is_reported(settings, celery_conf, create_missing,
                                                      expected):
    celery_conf(task_queues=[Queue("celery"), Queue("emails")],
                task_create_missing_queues=create_missing)
    settings.TASKS = {"default": {"BACKEND": OUR_BACKEND,
                                  "QUEUES": ["default", "emails", "reports"]}}

    messages = check_task_backends()

    assert ids(messages) == [expected]
    assert "'reports'" in messages[0].msg


def test_queues_celery_declares_pass(settings, celery_conf):
    celery_conf(task_queues=[Queue("celery"), Queue("emails")])
    settings.TASKS = {"default": {"BACKEND": OUR_BACKEND, "QUEUES": ["default", "emails"]}}

    assert check_task_backends() == []


def test_a_runner_task_the_celery_app_does_not_know_is_an_error(monkeypatch):
    monkeypatch.delitem(celery_app.tasks, RUNNER_NAME)

    messages = check_task_backends()

    assert ids(messages) == ["reliable_tasks.E010"]
    assert "'default', 'retrying'" in messages[0].msg
