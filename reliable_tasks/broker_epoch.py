"""Broker-loss detection: has the Redis server behind the broker changed since last seen?

A Redis restarted without persistence, or a Sentinel failover to a replica that missed the last
writes, answers with a new run id. The last run id seen is kept in the database (a marker kept in
Redis would vanish with the data it vouches for). One conditional UPDATE decides which of many
concurrent sweepers acts on a change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from reliable_tasks.celery_app import get_celery_app
from reliable_tasks.models import BrokerEpoch
from reliable_tasks.publisher import broker_run_id

logger = logging.getLogger(__name__)

EPOCH_NAME = "broker"


@dataclass(frozen=True)
class EpochCheck:
    """The outcome of one look at the broker."""

    changed: bool
    run_id: str | None = None
    previous_since: datetime | None = None


def check_broker_epoch(now: datetime) -> EpochCheck:
    """Compare the broker's run id with the one last seen; ``changed`` for one caller only."""
    try:
        run_id = broker_run_id(get_celery_app())
    except Exception as exc:  # noqa: BLE001 - an unreachable broker is not a changed broker
        logger.warning("could not read the broker's run id: %r", exc)
        return EpochCheck(changed=False)
    return record_epoch(EPOCH_NAME, run_id, now)


def stored_run_id(name: str) -> str | None:
    """The run id last recorded for ``name``, or None before the first; reads only."""
    run_id: str | None = (BrokerEpoch.objects.filter(name=name)
                          .values_list("run_id", flat=True).first())
    return run_id


def record_epoch(name: str, run_id: str, now: datetime) -> EpochCheck:
    """Remember ``run_id`` as the server behind ``name``; ``changed`` for one caller only."""
    known = BrokerEpoch.objects.filter(name=name).first()
    if known is None:
        BrokerEpoch.objects.get_or_create(
            name=name, defaults={"run_id": run_id, "seen_since": now})
        return EpochCheck(changed=False, run_id=run_id)
    if known.run_id == run_id:
        return EpochCheck(changed=False, run_id=run_id)
    won = BrokerEpoch.objects.filter(name=name, run_id=known.run_id).update(
        run_id=run_id, seen_since=now)
    return EpochCheck(changed=won == 1, run_id=run_id, previous_since=known.seen_since)
