"""Broker-loss detection: has the Redis server behind the broker changed since last seen?

A Redis restarted without persistence, or a Sentinel failover to a replica that missed the last
writes, answers with a new run id. The last run id seen is kept in the database (a marker kept in
Redis would vanish with the data it vouches for), one row per broker: two Celery apps on
different Redis servers may share a ledger, and each compares its own server with its own row.
One conditional UPDATE decides which of many concurrent sweepers acts on a change, and the same
UPDATE stores the cutoff of the requeue that follows, so that the requeue resumes, pass after
pass and across crashes, until every row published before the change is done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

from celery import Celery
from django.db.models import Q
from kombu import Connection

from reliable_tasks.celery_app import get_celery_app
from reliable_tasks.models import BrokerEpoch
from reliable_tasks.publisher import broker_run_id

logger = logging.getLogger(__name__)

_NAME_LENGTH = BrokerEpoch._meta.get_field("name").max_length or 100


@dataclass(frozen=True)
class EpochCheck:
    """The outcome of one look at the broker."""

    name: str
    changed: bool
    run_id: str | None = None
    #: QUEUED rows published up to this time still wait for their requeue (None: none wait).
    requeue_before: datetime | None = None
    #: When the last look for missing messages began, as read (None: never).
    audited_at: datetime | None = None


def broker_name(app: Celery) -> str:
    """The ``BrokerEpoch`` name of the app's broker: Sentinel master name or host and port,
    and the database number; never a password."""
    options = app.conf.broker_transport_options or {}
    return _name_of(str(app.conf.broker_write_url or app.conf.broker_url),
                    str(options.get("master_name") or ""))


@lru_cache(maxsize=16)
def _name_of(url: str, master_name: str) -> str:
    connection = Connection(url)
    try:
        # A master name in the transport options means nothing to a plain redis:// URL.
        if master_name and connection.transport_cls == "sentinel":
            name = f"broker:sentinel:{master_name}/{connection.virtual_host or 0}"
        else:
            name = (f"broker:{connection.transport_cls}://{connection.hostname}:"
                    f"{connection.port or ''}/{connection.virtual_host or 0}")
    finally:
        connection.release()
    return name[:_NAME_LENGTH]


def check_broker_epoch(now: datetime) -> EpochCheck:
    """Compare the broker's run id with the one last seen; ``changed`` for one caller only."""
    app = get_celery_app()
    name = broker_name(app)
    try:
        run_id = broker_run_id(app)
    except Exception as exc:  # noqa: BLE001 - an unreachable broker is not a changed broker
        logger.warning("could not read the broker's run id: %r", exc)
        known = BrokerEpoch.objects.filter(name=name).first()
        return EpochCheck(name=name, changed=False,
                          requeue_before=known.requeue_before if known else None,
                          audited_at=known.audited_at if known else None)
    return record_epoch(name, run_id, now)


def stored_run_id(name: str) -> str | None:
    """The run id last recorded for ``name``, or None before the first; reads only."""
    run_id: str | None = (BrokerEpoch.objects.filter(name=name)
                          .values_list("run_id", flat=True).first())
    return run_id


def record_epoch(name: str, run_id: str, now: datetime) -> EpochCheck:
    """Remember ``run_id`` as the server behind ``name``; ``changed`` for one caller only.

    On a change the rows published up to ``now`` are due for a requeue (``requeue_before``).
    """
    known = BrokerEpoch.objects.filter(name=name).first()
    if known is None:
        BrokerEpoch.objects.get_or_create(
            name=name, defaults={"run_id": run_id, "seen_since": now})
        return EpochCheck(name=name, changed=False, run_id=run_id)
    if known.run_id == run_id:
        return EpochCheck(name=name, changed=False, run_id=run_id,
                          requeue_before=known.requeue_before, audited_at=known.audited_at)
    won = BrokerEpoch.objects.filter(name=name, run_id=known.run_id).update(
        run_id=run_id, seen_since=now, requeue_before=now)
    return EpochCheck(name=name, changed=won == 1, run_id=run_id,
                      requeue_before=now if won else known.requeue_before,
                      audited_at=known.audited_at)


def requeue_done(name: str, cutoff: datetime) -> bool:
    """Every row published up to ``cutoff`` was requeued: forget the cutoff, unless a later
    change set another meanwhile. Returns whether it was forgotten."""
    return BrokerEpoch.objects.filter(name=name, requeue_before=cutoff).update(
        requeue_before=None) == 1


def start_audit(name: str, now: datetime, every: float) -> bool:
    """Whether this caller looks for missing messages now: at most once per ``every`` seconds
    per broker, across every process (one conditional UPDATE)."""
    due = Q(audited_at__isnull=True) | Q(audited_at__lte=now - timedelta(seconds=every))
    return BrokerEpoch.objects.filter(due, name=name).update(audited_at=now) == 1


def audit_again_soon(name: str, started: datetime) -> None:
    """The audit left rows to look at: let the next pass go on with them."""
    BrokerEpoch.objects.filter(name=name, audited_at=started).update(audited_at=None)
