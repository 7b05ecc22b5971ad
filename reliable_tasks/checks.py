"""System checks of the app's settings and of the project's Celery configuration.

Ids are stable and never reused (the README's table lists them all):

- ``E001``/``E002``: a ``RELIABLE_TASKS_*`` setting of the wrong type, or below its minimum;
- ``E005``: ``RELIABLE_TASKS_CELERY_APP`` cannot be imported;
- ``W006``: ``RELIABLE_TASKS_METRICS_TOKEN`` is too short to be a secret;
- ``W008``: ``RELIABLE_TASKS_LEASE_TIMEOUT`` too short for the heartbeat and sweep intervals;
- ``W001``-``W004``, ``E003``: unsafe Celery configuration of the project's app (pickle, no
  ``redbeat_redis_url``, a beat scheduler that is not ours, ``retry_on_lost`` tasks without
  ``acks_late``, a Redis ``visibility_timeout`` shorter than the longest delay left in Redis);
- ``TASKS`` entries of ``ReliableCeleryBackend`` (``django.tasks``): ``E006`` the backend cannot
  be imported (no task framework installed), ``E007`` ``QUEUES`` or ``OPTIONS`` of the wrong
  shape or an unknown option, ``E008`` an option's value is invalid, ``E009`` a queue Celery
  refuses (not in ``task_queues``, ``task_create_missing_queues`` off), ``W009`` a queue not in
  ``task_queues`` (no worker started without ``-Q`` consumes it), ``E010`` the Celery task
  that runs these tasks is not registered with the app;
- deploy only (``check --deploy``), over the network with short timeouts: ``W005`` the broker's
  Redis could not be checked, ``E004`` its ``maxmemory-policy`` is not ``noeviction``, ``W007``
  its sentinels fail a silent master over sooner than a publish gives up on it.

The Celery app is resolved inside each check (never at import time), and the non-deploy checks
do no I/O: reading the app's configuration and importing its task modules is all they do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from importlib import import_module
from typing import Any, cast

from celery import Celery
from celery.utils.imports import symbol_by_name
from django.conf import settings
from django.core import checks
from django.utils.module_loading import autodiscover_modules, import_string

from reliable_tasks.conf import PREFIX, SPECS, app_settings
from reliable_tasks.publisher import SENTINEL_RECHECK_AFTER, shortest_safe_down_after
from reliable_tasks.pulse import outages_are_seen
from reliable_tasks.sentinel import down_after_seconds

#: The beat scheduler that records periodic runs in the ledger before they advance.
OUR_SCHEDULER = "reliable_tasks.beat:ReliableRedBeatScheduler"
#: Shortest ``RELIABLE_TASKS_METRICS_TOKEN`` accepted without a warning.
MIN_TOKEN_LENGTH = 32
#: Kombu's default ``visibility_timeout`` of the Redis transport, in seconds.
DEFAULT_VISIBILITY_TIMEOUT = 3600
#: URL schemes of kombu's Redis transports (plain, TLS, Unix socket, Sentinel).
REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "socket", "sentinel"})
#: The only ``maxmemory-policy`` under which Redis never drops keys on its own.
SAFE_EVICTION_POLICY = "noeviction"
#: Tag the app's checks are registered under (``manage.py check --tag reliable_tasks``).
TAG = "reliable_tasks"


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E001: a setting has the wrong type. E002: below its minimum. W006: short metrics token.
    W008: a lease too short for the heartbeat and sweep intervals (``reliable_tasks.pulse``)."""
    messages: list[checks.CheckMessage] = []
    for name, spec in SPECS.items():
        full_name = PREFIX + name
        if not hasattr(settings, full_name):
            continue
        value = getattr(settings, full_name)
        wrong_bool = isinstance(value, bool) and bool not in spec.types
        if wrong_bool or not isinstance(value, spec.types):
            expected = " or ".join(t.__name__ for t in spec.types)
            messages.append(checks.Error(
                f"{full_name} must be {expected}, not {type(value).__name__}.",
                hint=spec.help, id="reliable_tasks.E001"))
        elif spec.minimum is not None and cast(float, value) < spec.minimum:
            messages.append(checks.Error(
                f"{full_name} must be at least {spec.minimum}, not {value!r}.",
                hint=spec.help, id="reliable_tasks.E002"))
    token = getattr(settings, PREFIX + "METRICS_TOKEN", None)
    if isinstance(token, str) and len(token) < MIN_TOKEN_LENGTH:
        messages.append(checks.Warning(
            f"{PREFIX}METRICS_TOKEN is {len(token)} characters long; a bearer token shorter "
            f"than {MIN_TOKEN_LENGTH} characters can be guessed.",
            hint="Generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'` "
                 "and keep it out of the code (read it from the environment).",
            id="reliable_tasks.W006"))
    if not messages and not outages_are_seen():
        messages.append(checks.Warning(
            f"{PREFIX}LEASE_TIMEOUT ({app_settings.LEASE_TIMEOUT:g} s) is too short for "
            f"HEARTBEAT_INTERVAL ({app_settings.HEARTBEAT_INTERVAL:g} s) and SWEEP_INTERVAL "
            f"({app_settings.SWEEP_INTERVAL:g} s): a database outage could let live workers' "
            f"leases run out without the sweeper noticing the outage.",
            hint="Keep LEASE_TIMEOUT above two heartbeats plus the larger of a third of "
                 "itself and one and a half sweep intervals (defaults: 30 s, 5 s, 10 s).",
            id="reliable_tasks.W008"))
    return messages


# --- the project's Celery app -----------------------------------------------------------------


def _resolve_app() -> tuple[Celery | None, list[checks.CheckMessage]]:
    """The project's Celery app, or E005 when ``RELIABLE_TASKS_CELERY_APP`` does not import."""
    from reliable_tasks.celery_app import get_celery_app

    try:
        return get_celery_app(), []
    except (ImportError, AttributeError, ValueError) as exc:
        return None, [checks.Error(
            f"{PREFIX}CELERY_APP = {app_settings.CELERY_APP!r} cannot be imported: "
            f"{str(exc).rstrip('.')}.",
            hint="Give the dotted path of your Celery app object, e.g. "
                 "'myproject.celery.app', or leave the setting out to use Celery's current app.",
            id="reliable_tasks.E005")]


def broker_url(app: Celery) -> str:
    """The app's first broker URL (``broker_url`` may list fail-over URLs)."""
    url = app.conf.broker_url or ""
    if isinstance(url, list | tuple):
        url = url[0] if url else ""
    return str(url).split(";")[0].strip()


def is_redis_url(url: str) -> bool:
    """Whether ``url`` names one of kombu's Redis transports."""
    return url.partition("://")[0].lower() in REDIS_SCHEMES


def _pickle_messages(app: Celery) -> Iterator[checks.CheckMessage]:
    accepted = {
        "accept_content": app.conf.accept_content,
        "result_accept_content": app.conf.result_accept_content,
    }
    for key, content in accepted.items():
        names = [str(item).lower() for item in (content or ())]
        if any(name == "pickle" or name.endswith("x-python-serialize") for name in names):
            yield checks.Warning(
                f"The Celery app accepts pickle ({key} = {list(content)!r}): anyone who can "
                f"write to the broker can run code on your workers.",
                hint=f"Accept JSON only: CELERY_{key.upper()} = ['json']. The ledger stores "
                     f"JSON already, so ReliableTask payloads need nothing else.",
                id="reliable_tasks.W001")
    for key in ("task_serializer", "result_serializer"):
        if str(app.conf.get(key) or "").lower() == "pickle":
            yield checks.Warning(
                f"The Celery app serializes with pickle ({key} = 'pickle').",
                hint=f"Set CELERY_{key.upper()} = 'json' (and accept only JSON).",
                id="reliable_tasks.W001")


def _redbeat_url_messages(app: Celery) -> Iterator[checks.CheckMessage]:
    if app.conf.get("redbeat_redis_url"):
        return
    broker = broker_url(app)
    fallback = (f"RedBeat falls back to broker_url ({broker.partition('://')[0] or 'unset'}://"
                f"...), which it stops doing in RedBeat 2.5")
    if broker and not is_redis_url(broker):
        fallback = f"{fallback}, and that is not a Redis URL: beat and schedule pushes fail"
    hint = ("Set CELERY_REDBEAT_REDIS_URL (with the CELERY_ namespace your app reads its "
            "configuration from) to the Redis that keeps the schedules.")
    if getattr(settings, "REDBEAT_REDIS_URL", None):
        hint += " REDBEAT_REDIS_URL is set in Django's settings but the Celery app never reads it."
    yield checks.Warning(
        f"redbeat_redis_url is not set in the Celery app's configuration: {fallback}.",
        hint=hint, id="reliable_tasks.W002")


def _scheduler_messages(app: Celery) -> Iterator[checks.CheckMessage]:
    from reliable_tasks.beat import ReliableRedBeatScheduler

    configured = app.conf.beat_scheduler
    try:
        scheduler = symbol_by_name(configured) if isinstance(configured, str) else configured
    except (ImportError, AttributeError, ValueError):
        scheduler = None
    if isinstance(scheduler, type) and issubclass(scheduler, ReliableRedBeatScheduler):
        return
    yield checks.Warning(
        f"beat_scheduler is {configured!r}, not {OUR_SCHEDULER!r}: periodic schedules are "
        f"not run from RedBeat, and due runs are not recorded in the ledger before they advance.",
        hint=f"Set CELERY_BEAT_SCHEDULER = {OUR_SCHEDULER!r} (or start beat with "
             f"`-S {OUR_SCHEDULER}`).",
        id="reliable_tasks.W003")


def _registered_tasks(app: Celery) -> Iterable[tuple[str, Any]]:
    """The app's tasks, after importing the task modules a worker would import.

    Not ``app.loader.import_default_modules()``: its ``import_modules`` signal makes Celery's
    Django fix-up run the system checks again, from inside this one. The same modules are
    imported directly instead: the ``tasks`` module of every installed app (what
    ``app.autodiscover_tasks()`` finds) and the app's ``imports`` and ``include``. A module that
    fails to import is the worker's error to report; the tasks that did register are checked.
    """
    try:
        autodiscover_modules("tasks")
        for module in app.loader.default_modules:
            import_module(module)
    except ImportError:
        pass
    return sorted(app.tasks.items())


def _acks_late_messages(app: Celery) -> Iterator[checks.CheckMessage]:
    unsafe = [name for name, task in _registered_tasks(app)
              if getattr(task, "retry_on_lost", False) is True
              and not getattr(task, "acks_late", False)]
    if unsafe:
        yield checks.Warning(
            f"Task(s) {', '.join(unsafe)} ask for retry_on_lost but do not acknowledge late: "
            f"a worker that dies mid-task has already acknowledged the message, so only the "
            f"sweeper recovers it, after RELIABLE_TASKS_LEASE_TIMEOUT.",
            hint="Set CELERY_TASK_ACKS_LATE = True (and CELERY_TASK_REJECT_ON_WORKER_LOST = True),"
                 " or acks_late=True on these tasks.",
            id="reliable_tasks.W004")


def _visibility_messages(app: Celery) -> Iterator[checks.CheckMessage]:
    if not is_redis_url(broker_url(app)):
        return
    options = app.conf.broker_transport_options or {}
    timeout = options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)
    threshold = app_settings.DELAY_THRESHOLD
    if isinstance(timeout, int | float) and timeout <= threshold:
        yield checks.Error(
            f"broker_transport_options['visibility_timeout'] is {timeout}s, not longer than "
            f"{PREFIX}DELAY_THRESHOLD ({threshold:g}s): Redis redelivers a task that waits for "
            f"its ETA longer than that, and it runs more than once.",
            hint=f"Raise the visibility timeout well above the delay threshold plus your longest "
                 f"task (the default is {DEFAULT_VISIBILITY_TIMEOUT}s), or lower "
                 f"{PREFIX}DELAY_THRESHOLD so that longer delays are held in the database.",
            id="reliable_tasks.E003")


def check_celery(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """W001-W004, E003, E005: unsafe configuration of the project's Celery app (no I/O)."""
    app, messages = _resolve_app()
    if app is None:
        return messages
    for produce in (_pickle_messages, _redbeat_url_messages, _scheduler_messages,
                    _acks_late_messages, _visibility_messages):
        messages.extend(produce(app))
    return messages


# --- TASKS: django.tasks backends ---------------------------------------------------------------

#: The dotted path of the app's ``django.tasks`` backend.
OUR_TASK_BACKEND = "reliable_tasks.backend.ReliableCeleryBackend"


def check_task_backends(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E006-E010, W009: the ``TASKS`` entries whose backend is ``ReliableCeleryBackend``
    (no I/O: the backends are not created, the Celery app's configuration is read)."""
    configured = getattr(settings, "TASKS", None)
    if not isinstance(configured, Mapping):
        return []
    messages: list[checks.CheckMessage] = []
    ours = []
    for alias, params in configured.items():
        if not isinstance(params, Mapping):
            continue
        backend, problem = _task_backend_class(alias, params.get("BACKEND"))
        if problem is not None:
            messages.append(problem)
        elif backend is not None:
            ours.append(alias)
            messages.extend(_task_backend_messages(alias, params))
    if ours and not messages:
        messages.extend(_runner_messages(ours))
    return messages


def _task_backend_class(alias: str, path: Any) -> tuple[type | None, checks.CheckMessage | None]:
    """``TASKS[alias]``'s backend if it is ours (or a subclass), or E006 when ours does not
    import; (None, None) for another backend."""
    if not isinstance(path, str):
        return None, None
    try:
        found = import_string(path)
        from reliable_tasks.backend import ReliableCeleryBackend
    except ImportError as exc:
        if path != OUR_TASK_BACKEND:
            return None, None  # another backend's problem: the framework reports it
        return None, checks.Error(
            f"TASKS[{alias!r}] uses {OUR_TASK_BACKEND}, which cannot be imported: {exc}.",
            hint="It needs Django's task framework: Django 6.0 or later, or on Django 5.2 the "
                 "backport (pip install 'django-tasks>=0.12').",
            id="reliable_tasks.E006")
    if isinstance(found, type) and issubclass(found, ReliableCeleryBackend):
        return found, None
    return None, None


def _task_backend_messages(alias: str, params: Mapping[str, Any]) -> list[checks.CheckMessage]:
    from reliable_tasks.backend import OPTION_NAMES

    where = f"TASKS[{alias!r}]"
    queues = params.get("QUEUES", ["default"])
    options = params.get("OPTIONS", {})
    shape = []
    if not isinstance(queues, list | tuple) or not all(isinstance(q, str) for q in queues):
        shape.append(f"{where}['QUEUES'] must be a list of queue names, not {queues!r}.")
    if not isinstance(options, Mapping):
        shape.append(f"{where}['OPTIONS'] must be a dict, not {type(options).__name__}.")
    elif set(options) - OPTION_NAMES:
        unknown = ", ".join(sorted(map(str, set(options) - OPTION_NAMES)))
        shape.append(f"{where}['OPTIONS'] has unknown option(s): {unknown}.")
    if shape:
        return [checks.Error(
            text, hint=f"QUEUES lists the queue names tasks may use; OPTIONS takes "
                       f"{', '.join(sorted(OPTION_NAMES))}.",
            id="reliable_tasks.E007") for text in shape]
    return [*_task_option_messages(where, options), *_task_queue_messages(where, queues)]


def _task_option_messages(where: str, options: Mapping[str, Any]) -> Iterator[checks.CheckMessage]:
    from reliable_tasks.runner import exception_classes

    problems = []
    attempts = options.get("max_attempts")
    if attempts is not None and (isinstance(attempts, bool) or not isinstance(attempts, int)
                                 or attempts < 1):
        problems.append(f"max_attempts must be a positive integer, not {attempts!r}")
    for name in ("retry_backoff", "retry_backoff_max"):
        value = options.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            problems.append(f"{name} must be a number of seconds (0 or more), not {value!r}")
    if not isinstance(options.get("retry_on_lost", False), bool):
        problems.append(f"retry_on_lost must be True or False, not {options['retry_on_lost']!r}")
    retry_for = options.get("retry_for", ())
    try:
        if isinstance(retry_for, str) or not isinstance(retry_for, list | tuple):
            raise TypeError(f"retry_for must be a list, not {retry_for!r}")
        exception_classes(retry_for)
    except (ImportError, TypeError) as exc:
        problems.append(str(exc).rstrip("."))
    for problem in problems:
        yield checks.Error(
            f"{where}['OPTIONS']: {problem}.",
            hint="retry_for lists exception classes or their dotted paths, e.g. "
                 "['myapp.errors.Flaky'].",
            id="reliable_tasks.E008")


def _task_queue_messages(where: str, queues: Iterable[str]) -> Iterator[checks.CheckMessage]:
    from reliable_tasks.backend import celery_queue

    app, _ = _resolve_app()
    declared = getattr(app.conf, "task_queues", None) if app is not None else None
    if app is None or not declared:
        return  # any queue name is created on demand (E005 reports an app that is missing)
    names = {getattr(queue, "name", queue) for queue in declared}
    for queue_name in queues:
        celery_name = celery_queue(queue_name)
        if celery_name in names:
            continue
        text = (f"{where}['QUEUES'] has {queue_name!r}, whose Celery queue {celery_name!r} is "
                f"not in the Celery app's task_queues ({', '.join(sorted(map(str, names)))})")
        if not app.conf.task_create_missing_queues:
            yield checks.Error(
                f"{text}, and task_create_missing_queues is off: its tasks can never be "
                f"published and wait PENDING.",
                hint="Add the queue to CELERY_TASK_QUEUES, or take it out of QUEUES.",
                id="reliable_tasks.E009")
        else:
            yield checks.Warning(
                f"{text}: workers started without -Q do not consume it, so its tasks wait.",
                hint="Add the queue to CELERY_TASK_QUEUES, or start a worker with "
                     f"-Q {celery_name}.",
                id="reliable_tasks.W009")


def _runner_messages(aliases: list[str]) -> Iterator[checks.CheckMessage]:
    from reliable_tasks.runner import RUNNER_NAME

    app, _ = _resolve_app()
    if app is None or RUNNER_NAME in dict(_registered_tasks(app)):
        return
    yield checks.Error(
        f"TASKS {', '.join(map(repr, aliases))} use ReliableCeleryBackend, but the Celery task "
        f"that runs their tasks, {RUNNER_NAME}, is not registered with the Celery app "
        f"{app.main!r}: workers would discard them as unregistered.",
        hint="Let the Celery app find the tasks of installed apps: app.autodiscover_tasks() "
             "after app.config_from_object('django.conf:settings', namespace='CELERY').",
        id="reliable_tasks.E010")


# --- deploy checks: over the network ------------------------------------------------------------


def check_broker(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """W005: the broker's Redis could not be checked. E004: it may evict keys. W007: its
    sentinels fail over too soon for ``RELIABLE_TASKS_PUBLISH_TIMEOUT`` (deploy only).

    One connection bounded by ``RELIABLE_TASKS_PUBLISH_TIMEOUT``; ``INFO memory`` rather than
    ``CONFIG GET`` so that managed Redis services, which often disable ``CONFIG``, answer too.
    """
    from reliable_tasks.metrics import broker_redis

    app, _ = _resolve_app()
    if app is None:
        return []  # check_celery reports E005 already
    url = broker_url(app)
    if not is_redis_url(url):
        return []
    try:
        with broker_redis(app) as client:
            policy = str(client.info("memory").get("maxmemory_policy", ""))
            down_after = down_after_seconds(client.connection_pool)
    except Exception as exc:  # noqa: BLE001 - any failure means "could not check"
        return [checks.Warning(
            f"The broker's Redis could not be checked: {type(exc).__name__}: {exc}.",
            hint="Run the deploy checks where the broker is reachable, with the production "
                 "settings; the app needs its maxmemory-policy to be noeviction.",
            id="reliable_tasks.W005")]
    messages: list[checks.CheckMessage] = []
    if policy != SAFE_EVICTION_POLICY:
        messages.append(checks.Error(
            f"The broker's Redis has maxmemory-policy {policy!r}: when it fills up it deletes "
            f"queued messages, which the sweeper's queue audit publishes again only "
            f"RELIABLE_TASKS_QUEUE_AUDIT_AGE later.",
            hint="Set `maxmemory-policy noeviction` in redis.conf (or your provider's parameter "
                 "group): a full Redis then refuses writes, which the outbox survives.",
            id="reliable_tasks.E004"))
    messages.extend(_failover_timing_messages(down_after))
    return messages


def _failover_timing_messages(down_after: float | None) -> Iterator[checks.CheckMessage]:
    """W007: a master that hangs can be replaced while a publish still waits on it."""
    shortest = shortest_safe_down_after()
    if down_after is None or down_after > shortest:
        return
    hint = f"Raise Sentinel's down-after-milliseconds above {shortest * 1000:g}"
    longest_timeout = down_after - SENTINEL_RECHECK_AFTER
    if longest_timeout > 0:
        hint += f", or lower RELIABLE_TASKS_PUBLISH_TIMEOUT below {longest_timeout:g} s"
    yield checks.Warning(
        f"The broker's sentinels fail a silent master over after {down_after:g} s "
        f"(down-after-milliseconds), not more than RELIABLE_TASKS_PUBLISH_TIMEOUT "
        f"({app_settings.PUBLISH_TIMEOUT:g} s) + {SENTINEL_RECHECK_AFTER:g} s: a publish that "
        f"waits on a master that hangs that long can still succeed on it after it was "
        f"replaced, and the replaced master then drops the message while its row says QUEUED.",
        hint=f"{hint}.", id="reliable_tasks.W007")


def register() -> None:
    """Register the app's checks with Django."""
    checks.register(check_settings, TAG)
    checks.register(check_celery, TAG)
    checks.register(check_task_backends, TAG)
    checks.register(check_broker, TAG, deploy=True)
