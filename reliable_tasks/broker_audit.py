"""Which task messages does the broker still hold? For finding QUEUED rows whose message is gone.

A Redis that keeps its run id can still lose messages: ``celery purge``, ``FLUSHDB``, an
eviction under a ``maxmemory-policy`` other than ``noeviction``, a key deleted by hand. The
broker-epoch check cannot see those; this module looks for the messages themselves.

On Redis, kombu keeps a queue's ready messages in one list per priority step and the messages
delivered to a worker but not acknowledged (prefetched, waiting for their ETA, running with
``acks_late``) in one hash. A message moves between the two (delivered: list to hash; restored
after the visibility timeout: hash to list), so the hash is read before and after the lists:
a message that moved once during the look is still seen. Other transports cannot be listed
without consuming; there ``messages_present`` answers None (unknown).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from celery import Celery

from reliable_tasks.publisher import PublishRow

logger = logging.getLogger(__name__)

#: Messages read per LRANGE or HSCAN call.
CHUNK = 1000


def _task_id(raw: bytes | str) -> str | None:
    """The task id in a kombu Redis message (a queue item, or an unacked hash value)."""
    try:
        message = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if isinstance(message, list) and message:  # unacked: [message, exchange, routing_key]
        message = message[0]
    headers = message.get("headers") if isinstance(message, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return str(task_id) if task_id else None


def _list_items(client: Any, key: str) -> Iterator[bytes]:
    start = 0
    while True:
        chunk = client.lrange(key, start, start + CHUNK - 1)
        yield from chunk
        if len(chunk) < CHUNK:
            return
        start += CHUNK


def _hash_values(client: Any, key: str) -> Iterator[bytes]:
    cursor = 0
    while True:
        cursor, found = client.hscan(key, cursor, count=CHUNK)
        yield from found.values()
        if not cursor:
            return


def queue_names(app: Celery, rows: Iterable[PublishRow]) -> set[str]:
    """The queues the rows' messages went to: their routes, and every queue the app declares.

    Routes are worked out from each task's name and options (a router that routes by argument
    is asked with the row's arguments).
    """
    names = {str(app.conf.task_default_queue)}
    names.update(str(name) for name in app.amqp.queues)
    router = app.amqp.router
    for row in rows:
        options = router.route(dict(row.options or {}), row.task_name, row.args, row.kwargs)
        queue = options.get("queue")
        name = getattr(queue, "name", queue)
        if name:
            names.add(str(name))
    return names


def messages_present(app: Celery, task_ids: set[str], queues: Iterable[str]) -> set[str] | None:
    """The ids among ``task_ids`` whose message is in one of ``queues`` or delivered to a
    worker and not yet acknowledged; None when the broker cannot be listed (not Redis)."""
    with app.connection_for_write() as connection:
        channel: Any = connection.default_channel
        client = getattr(channel, "client", None)
        if client is None or not hasattr(channel, "_q_for_pri"):
            return None
        prefix = str(getattr(channel, "global_keyprefix", "") or "")
        unacked = prefix + str(channel.unacked_key)
        keys = sorted({prefix + channel._q_for_pri(queue, step)
                       for queue in queues for step in channel.priority_steps})
        missing = set(task_ids)
        for source in [_hash_values(client, unacked), *(_list_items(client, key) for key in keys),
                       _hash_values(client, unacked)]:
            for raw in source:
                task_id = _task_id(raw)
                if task_id in missing:
                    missing.discard(task_id)
                    if not missing:
                        return set(task_ids)
    return set(task_ids) - missing
