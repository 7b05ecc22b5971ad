"""Why a ledger row waits, in a sentence for its admin page.

A row deferred by a limit is WAITING: for a slot of its concurrency key (woken, in dispatch
order, when one frees) or for its start under its rate key (sent again at the start promised
to it, its ``eta``).
A woken row keeps ``waiting_for`` until it starts, holding the slot or the start promised to it.
Counting a key's rows reads the ``rt_task_concurrency`` index only, and the rows ahead of a
waiter are counted up to ``AHEAD_COUNTED``.
"""

from __future__ import annotations

from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from reliable_tasks.admin import widgets
from reliable_tasks.models import TaskRecord, WaitReason
from reliable_tasks.states import TaskState

#: The most rows counted ahead of a waiter ("more than 10000 waiting ahead" beyond).
AHEAD_COUNTED = 10_000
#: States of a woken row: its slot or start is promised until it starts.
WOKEN_STATES = (TaskState.PENDING, TaskState.QUEUED)


def short_reason(record: TaskRecord) -> str:
    """What a WAITING row waits for, from its own columns (no query): a badge's tooltip."""
    if record.state != TaskState.WAITING:
        return ""
    if record.waiting_for == WaitReason.CONCURRENCY:
        return _("Waiting for a slot of concurrency key '%(key)s'") % {
            "key": record.concurrency_key}
    if record.waiting_for == WaitReason.RATE:
        return _("Waiting for the rate limit %(rate)s of '%(key)s'") % {
            "rate": record.rate_limit, "key": record.rate_key}
    return _("Waiting (no reason recorded)")


def describe_wait(record: TaskRecord) -> str:
    """Why ``record`` waits, with its key's counts or its next start; empty when it does not."""
    if record.waiting_for == WaitReason.CONCURRENCY and record.concurrency_key:
        if record.state == TaskState.WAITING:
            return _concurrency_wait(record)
        if record.state in WOKEN_STATES:
            return _("Woken for a slot of concurrency key '%(key)s': the slot is its own "
                     "until it starts.") % {"key": record.concurrency_key}
    if record.waiting_for == WaitReason.RATE and record.rate_key:
        if record.state == TaskState.WAITING:
            return _rate_wait(record)
        if record.state in WOKEN_STATES:
            return _("Its start under the rate limit %(rate)s of '%(key)s' is due: it starts "
                     "ahead of newer tasks of the key.") % {
                "rate": record.rate_limit, "key": record.rate_key}
    return short_reason(record)


def _concurrency_wait(record: TaskRecord) -> str:
    """"Waiting for a slot of concurrency key 'exports' (limit 3: 3 running, 2 waiting
    ahead)", and whether a slot is free (the sweeper then wakes the row on its next pass)."""
    rows = TaskRecord.objects.filter(concurrency_key=record.concurrency_key)
    running = rows.filter(state=TaskState.STARTED).count()
    woken = rows.filter(state__in=WOKEN_STATES, waiting_for=WaitReason.CONCURRENCY).count()
    earlier = Q(created_at__lt=record.created_at) | Q(created_at=record.created_at,
                                                      id__lt=record.pk)
    ahead = (rows.filter(earlier, state=TaskState.WAITING, waiting_for=WaitReason.CONCURRENCY)
             .order_by().values("pk")[: AHEAD_COUNTED + 1].count())
    limit = record.concurrency_limit or 0
    counts = [ngettext("%(count)d running", "%(count)d running", running) % {"count": running}]
    if woken:
        counts.append(ngettext("%(count)d woken", "%(count)d woken", woken) % {"count": woken})
    if ahead > AHEAD_COUNTED:
        counts.append(_("more than %(count)d waiting ahead") % {"count": AHEAD_COUNTED})
    else:
        counts.append(ngettext("%(count)d waiting ahead", "%(count)d waiting ahead", ahead)
                      % {"count": ahead})
    text = _("Waiting for a slot of concurrency key '%(key)s' (limit %(limit)d: %(counts)s)") % {
        "key": record.concurrency_key, "limit": limit, "counts": ", ".join(counts)}
    if running + woken < limit:
        text += ". " + _("A slot is free: the sweeper wakes the oldest waiters on its next "
                         "pass.")
    return text


def _rate_wait(record: TaskRecord) -> str:
    """"Waiting for the rate limit 10/s of 'api': sent again at <time>"."""
    text = _("Waiting for the rate limit %(rate)s of '%(key)s'") % {
        "rate": record.rate_limit, "key": record.rate_key}
    start = record.eta or record.next_attempt_at  # the promised start, else the sweeper's
    if start is None:
        return text
    return _("%(waiting)s: sent again at %(moment)s (%(when)s)") % {
        "waiting": text, "moment": widgets.moment(start),
        "when": widgets.time_from_now(start, timezone.now())}
