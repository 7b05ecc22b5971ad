"""The ledger's pulse: has the database been reachable without a gap, and since when?

After a database outage longer than a lease, every lease has run out by the database's clock,
although the workers holding them are alive and only waited for the database like everybody
else. The sweeper must not take those tasks for lost before the heartbeats had a chance to
resume. Heartbeats and sweeper passes ``touch()`` one row with the database's clock; a touch
that follows a longer gap than ``gap_allowed()`` restarts ``steady_since``. The sweeper expires
leases only once ``leases_may_expire()``: a whole lease after the database came back.

The gap allowed is a third of ``LEASE_TIMEOUT`` (L), or one and a half ``SWEEP_INTERVAL`` (S)
if that is longer, so that neither the heartbeats of one worker nor the passes of a lone sweeper
look like gaps. A live worker renews its leases every ``HEARTBEAT_INTERVAL`` (H), so a lease can
run out unrenewed only in an outage longer than L minus two heartbeats (the one before and the
one after it); ``reliable_tasks.W008`` warns unless every such outage is longer than the gap
allowed (the defaults, H = 5 s, L = 30 s and S = 10 s, see any outage over 15 s).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.db.models import Case, F, Value, When

from reliable_tasks.conf import app_settings
from reliable_tasks.models import LedgerPulse

PULSE_NAME = "ledger"


def gap_allowed() -> timedelta:
    """The longest pause between two touches that is not taken for an outage."""
    return timedelta(seconds=max(app_settings.LEASE_TIMEOUT / 3,
                                 app_settings.SWEEP_INTERVAL * 1.5))


def outages_are_seen() -> bool:
    """Whether every outage long enough to let a live worker's lease run out is a gap."""
    longest_harmless = app_settings.LEASE_TIMEOUT - 2 * app_settings.HEARTBEAT_INTERVAL
    return gap_allowed().total_seconds() < longest_harmless


def touch(now: datetime) -> datetime:
    """Record that the ledger answered at ``now`` (the database's time); return steady_since."""
    rows = LedgerPulse.objects.filter(name=PULSE_NAME)
    # steady_since is assigned first: MySQL evaluates SET left to right with the new values.
    changed = rows.update(
        steady_since=Case(When(last_seen_at__lt=now - gap_allowed(), then=Value(now)),
                          default=F("steady_since")),
        last_seen_at=Case(When(last_seen_at__lt=now, then=Value(now)),
                          default=F("last_seen_at")),
    )
    if not changed:
        # A new ledger has known no outage: it counts as steady for a whole lease already.
        steady_since = now - timedelta(seconds=app_settings.LEASE_TIMEOUT)
        try:
            with transaction.atomic():
                LedgerPulse.objects.create(name=PULSE_NAME, last_seen_at=now,
                                           steady_since=steady_since)
        except IntegrityError:  # another process created it meanwhile
            return touch(now)
        return steady_since
    return rows.values_list("steady_since", flat=True).get()


def leases_may_expire(now: datetime, steady_since: datetime) -> bool:
    """Whether a whole lease has passed since the database was last reachable again."""
    return now - steady_since >= timedelta(seconds=app_settings.LEASE_TIMEOUT)
