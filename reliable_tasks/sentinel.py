"""Celery, kombu and RedBeat settings for a Redis behind Sentinel, from one call.

A Redis watched by Sentinel is configured in three places that spell the same things
differently: kombu's broker (``sentinel://`` URLs, ``master_name`` in the transport options),
Celery's Redis result backend (the same URL form, its own ``result_backend_transport_options``
and ``redis_*`` settings) and RedBeat (a ``redis-sentinel://`` URL that only selects the mode,
then ``sentinels`` as ``(host, port)`` pairs and ``service_name`` in ``redbeat_redis_options``).
``celery_settings()`` returns one consistent set of all of them::

    from reliable_tasks.sentinel import celery_settings

    app.conf.update(celery_settings(
        "10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379", "mymaster",
        password=REDIS_PASSWORD, sentinel_password=SENTINEL_PASSWORD))

In a Django settings module read with ``app.config_from_object("django.conf:settings",
namespace="CELERY")``, every key becomes ``CELERY_`` plus the key in upper case
(``broker_transport_options`` is ``CELERY_BROKER_TRANSPORT_OPTIONS``, ``redbeat_redis_options``
is ``CELERY_REDBEAT_REDIS_OPTIONS``); ``as_django_settings()`` does that renaming::

    globals().update(as_django_settings(celery_settings(...)))

What the settings guarantee:

- every socket has a timeout: the master's (``socket_timeout``, ``socket_connect_timeout``) and
  the sentinels' (``sentinel_socket_timeout``), so a hung master or sentinel makes calls fail
  after a bounded time instead of blocking them; clients of the sentinels never retry a
  command (a dead sentinel is skipped at once and the next one asked);
- ``retry_on_timeout`` is off: a publish that timed out is not silently sent a second time
  (``reliable_tasks`` re-publishes it from the ledger when it knows it was lost);
- credentials: ``password`` (and ``username``, for a Redis 6 ACL user) of the master and its
  replicas travel in the broker and result URLs, percent-encoded, and in RedBeat's options;
  ``sentinel_password`` (and ``sentinel_username``) of the sentinels, which may differ, in
  ``sentinel_kwargs``. TLS (``ssl``) applies to the master; ``sentinel_ssl`` (default: the same)
  to the sentinels. Sentinel URLs have no ``rediss://`` form: TLS is always these options.

Known limits of the libraries, not of these settings: RedBeat's Sentinel mode takes no connect
timeout for the master (``socket_timeout`` bounds every reply, and a refused connection fails
at once), and Celery's Redis result backend uses ``redis_socket_connect_timeout``.

Passwords never appear in what this module logs or raises. URLs that carry one are shown
with ``sanitize_url()``, which masks the password of every ``;``-separated part (kombu's
``maybe_sanitize_url`` fails on such lists).
"""

from __future__ import annotations

import ssl as ssl_module
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from kombu.utils.url import maybe_sanitize_url
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry
from redis.sentinel import SentinelConnectionPool

#: Seconds a sentinel may take to answer before the next one is asked (at most).
DEFAULT_SENTINEL_SOCKET_TIMEOUT = 1.0
#: Seconds a master may take to answer a command before the call fails.
DEFAULT_SOCKET_TIMEOUT = 5.0

Address = tuple[str, int]


def parse_sentinels(sentinels: str | Iterable[str | Address]) -> list[Address]:
    """Return ``[(host, port), ...]`` from ``"h1:26379,h2:26379"`` or an iterable of either form.

    IPv6 hosts are written in brackets (``[::1]:26379``). Raises ``ValueError`` for an empty
    list or an address without a valid port.
    """
    items: Iterable[str | Address] = (
        [part for part in sentinels.split(",") if part.strip()]
        if isinstance(sentinels, str) else sentinels)
    addresses = [_address(item) for item in items]
    if not addresses:
        raise ValueError("no Sentinel address given (expected 'host:port[,host:port...]')")
    return addresses


def _address(item: str | Address) -> Address:
    if not isinstance(item, str):
        host, port = item
        return _checked(str(host), port, repr(tuple(item)))
    text = item.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"Sentinel address {text!r} is not 'host:port'")
    return _checked(host.removeprefix("[").removesuffix("]"), int(port_text), repr(text))


def _checked(host: str, port: Any, shown: str) -> Address:
    if not host or not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"Sentinel address {shown} needs a host and a port from 1 to 65535")
    return host, port


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _credentials(username: str | None, password: str | None) -> str:
    if password is None and not username:
        return ""
    user = quote(username or "", safe="")
    return f"{user}:{quote(password or '', safe='')}@" if password is not None else f"{user}@"


def sentinel_url(addresses: Iterable[Address], db: int, *, username: str | None = None,
                 password: str | None = None) -> str:
    """The kombu and Celery form: ``sentinel://[cred@]host:port/db`` per sentinel, ``;``-joined.

    Every part carries the credentials and the database: kombu reads them from the first part,
    and from the next one when it fails over between the listed addresses.
    """
    credentials = _credentials(username, password)
    return ";".join(f"sentinel://{credentials}{_url_host(host)}:{port}/{db}"
                    for host, port in addresses)


def sanitize_url(url: str) -> str:
    """``url`` with the password of each ``;``-separated part masked, safe to log."""
    return ";".join(maybe_sanitize_url(part) for part in url.split(";"))


def _ssl_options(value: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``ssl_*`` keyword arguments of redis-py for ``value`` (None: no TLS)."""
    if value is False or value is None:
        return None
    if value is True:
        return {"ssl_cert_reqs": ssl_module.CERT_REQUIRED}
    return dict(value)


def celery_settings(
    sentinels: str | Iterable[str | Address],
    master_name: str,
    db: int = 0,
    password: str | None = None,
    *,
    username: str | None = None,
    sentinel_password: str | None = None,
    sentinel_username: str | None = None,
    ssl: bool | Mapping[str, Any] = False,
    sentinel_ssl: bool | Mapping[str, Any] | None = None,
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    socket_connect_timeout: float | None = None,
    sentinel_socket_timeout: float | None = None,
    min_other_sentinels: int = 0,
    result_backend_is_redis: bool = False,
    redbeat_retry_period: float | None = None,
    visibility_timeout: float | None = None,
    health_check_interval: float | None = None,
) -> dict[str, Any]:
    """Return Celery settings (lower-case names) for a broker, result backend and RedBeat.

    ``sentinels``: ``"host:port,host:port"`` or an iterable of ``"host:port"`` or
    ``(host, port)``; ``master_name``: the name the sentinels monitor; ``db``: the Redis
    database. ``password``/``username``: the master's (and replicas') credentials;
    ``sentinel_password``/``sentinel_username``: the sentinels' (none by default). ``ssl``:
    True, or redis-py's ``ssl_*`` options as a mapping (``ssl_ca_certs``, ``ssl_certfile``,
    ``ssl_keyfile``, ``ssl_cert_reqs``); ``sentinel_ssl`` defaults to ``ssl``.

    ``socket_timeout`` bounds every reply of the master (default 5 s; keep it above the
    worker's 1 s ``BRPOP``), ``socket_connect_timeout`` a connect (default: the same),
    ``sentinel_socket_timeout`` a sentinel's reply and connect (default
    ``min(socket_timeout, 1)``). ``min_other_sentinels``: a sentinel that sees fewer peers is not
    believed. ``result_backend_is_redis``: also configure ``result_backend`` for Redis through
    Sentinel (leave False with ``django-db``). ``redbeat_retry_period``: seconds RedBeat's
    client retries a failed command (default: no retry, which ``ReliableRedBeatScheduler``
    wants: it waits failures out itself). ``visibility_timeout`` and
    ``health_check_interval``: kombu's, passed when given.
    """
    addresses = parse_sentinels(sentinels)
    if not master_name:
        raise ValueError("master_name is required: the name the sentinels monitor")
    if isinstance(db, bool) or not isinstance(db, int) or db < 0:
        raise ValueError(f"db must be a non-negative integer, not {db!r}")
    if socket_timeout is None or socket_timeout <= 0:
        raise ValueError("socket_timeout must be a positive number of seconds: without it a "
                         "hung master blocks its callers")
    connect_timeout = socket_connect_timeout if socket_connect_timeout is not None else (
        socket_timeout)
    sentinel_timeout = sentinel_socket_timeout if sentinel_socket_timeout is not None else (
        min(socket_timeout, DEFAULT_SENTINEL_SOCKET_TIMEOUT))
    master_ssl = _ssl_options(ssl)
    sentinels_ssl = master_ssl if sentinel_ssl is None else _ssl_options(sentinel_ssl)

    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": sentinel_timeout,
        "socket_connect_timeout": sentinel_timeout,
        # redis-py clients retry three times with backoff by default: a dead sentinel would
        # cost seconds before the next one is asked.
        "retry": Retry(NoBackoff(), 0),
    }
    if sentinel_password is not None:
        sentinel_kwargs["password"] = sentinel_password
    if sentinel_username:
        sentinel_kwargs["username"] = sentinel_username
    if sentinels_ssl is not None:
        sentinel_kwargs.update(ssl=True, **sentinels_ssl)

    url = sentinel_url(addresses, db, username=username, password=password)
    transport_options: dict[str, Any] = {
        "master_name": master_name,
        "sentinel_kwargs": sentinel_kwargs,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "socket_keepalive": True,
        "retry_on_timeout": False,
    }
    if min_other_sentinels:
        transport_options["min_other_sentinels"] = min_other_sentinels
    if visibility_timeout is not None:
        transport_options["visibility_timeout"] = visibility_timeout
    if health_check_interval is not None:
        transport_options["health_check_interval"] = health_check_interval

    conf: dict[str, Any] = {
        "broker_url": url,
        "broker_transport_options": transport_options,
    }
    if master_ssl is not None:
        conf["broker_use_ssl"] = dict(master_ssl)

    if result_backend_is_redis:
        conf["result_backend"] = url
        result_options: dict[str, Any] = {
            "master_name": master_name, "sentinel_kwargs": dict(sentinel_kwargs)}
        if min_other_sentinels:
            result_options["min_other_sentinels"] = min_other_sentinels
        conf["result_backend_transport_options"] = result_options
        conf["redis_socket_timeout"] = socket_timeout
        conf["redis_socket_connect_timeout"] = connect_timeout
        conf["redis_retry_on_timeout"] = False
        if master_ssl is not None:
            conf["redis_backend_use_ssl"] = dict(master_ssl)

    host, port = addresses[0]
    redbeat_options: dict[str, Any] = {
        "sentinels": list(addresses),
        "service_name": master_name,  # RedBeat's name for kombu's master_name
        "db": db,
        "socket_timeout": socket_timeout,
        "sentinel_kwargs": dict(sentinel_kwargs),
    }
    if password is not None:
        redbeat_options["password"] = password
    if username:
        redbeat_options["username"] = username
    if redbeat_retry_period is not None:
        redbeat_options["retry_period"] = redbeat_retry_period
    # RedBeat only looks at the scheme; the address is there for people reading the setting.
    conf["redbeat_redis_url"] = f"redis-sentinel://{_url_host(host)}:{port}/{db}"
    conf["redbeat_redis_options"] = redbeat_options
    if master_ssl is not None:
        conf["redbeat_redis_use_ssl"] = dict(master_ssl)
    return conf


def as_django_settings(conf: Mapping[str, Any], namespace: str = "CELERY") -> dict[str, Any]:
    """Rename Celery settings for a Django settings module read with ``namespace``.

    ``{"broker_url": ...}`` becomes ``{"CELERY_BROKER_URL": ...}`` for
    ``app.config_from_object("django.conf:settings", namespace="CELERY")``.
    """
    prefix = f"{namespace}_" if namespace else ""
    return {f"{prefix}{key.upper()}": value for key, value in conf.items()}


def describe(conf: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``conf`` safe to log or show: URLs sanitized, every password masked."""
    return {key: _masked(key, value) for key, value in conf.items()}


def _masked(key: str, value: Any) -> Any:
    if isinstance(value, Mapping):
        return {inner: _masked(str(inner), item) for inner, item in value.items()}
    if value is not None and "password" in key.lower():
        return "**"
    if isinstance(value, str) and "://" in value:
        return sanitize_url(value)
    return value


def down_after_seconds(pool: Any) -> float | None:
    """Seconds the sentinels let the master behind ``pool`` be silent before failing it over.

    ``pool`` is a connection pool of redis-py; ``None`` unless it is a ``SentinelConnectionPool``
    (kombu's ``sentinel://`` transport) and one of its sentinels answers ``SENTINEL MASTER``.
    """
    if not isinstance(pool, SentinelConnectionPool):
        return None
    for sentinel in pool.sentinel_manager.sentinels:
        try:
            state = sentinel.sentinel_master(pool.service_name)
        except RedisError:
            continue  # a sentinel that is down or does not know the master: ask the next
        return int(state["down-after-milliseconds"]) / 1000
    return None
