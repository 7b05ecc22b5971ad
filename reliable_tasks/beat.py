"""``ReliableRedBeatScheduler``: RedBeat whose periodic runs go through the ledger.

Use it as ``beat_scheduler = "reliable_tasks.beat:ReliableRedBeatScheduler"`` (or
``celery beat -S reliable_tasks.beat:ReliableRedBeatScheduler``). Compared with RedBeat:

- each due run of a ``PeriodicSchedule`` is recorded in the ledger (one row per slot) before its
  entry advances, then published through the outbox; a run that cannot be recorded stays due,
  and a publish that fails is published by the sweeper. Other entries (``beat_schedule``
  statics) run as RedBeat runs them;
- it writes nothing before it holds RedBeat's lock (RedBeat's setup writes statics at start,
  even in a standby beat), and takes the lock without blocking: a standby polls every second;
- the lock lives ``4 x max_interval`` (20 s) and an idle beat wakes every ``max_interval`` (5 s):
  a restarted or standby beat dispatches again within about 21 s of the old one dying, and a
  saved schedule takes effect within 5 s;
- a lost lock (another beat took it, or a failover lost the key), an unreachable Redis or a
  database error is logged plainly and waited out; it never crashes the beat. Each tick checks
  its database connections first, as Django's request cycle does, and a database error drops
  them, so the next tick reconnects; a run it could not record stays due;
- it notices a new RedBeat Redis (restarted empty, or failed over: a new run id) and restores
  the app's entries from the database at once, until a restore succeeds;
- it installs the sweeper's own entry (``reliable_tasks.sweep`` every ``SWEEP_INTERVAL``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.db import DatabaseError, close_old_connections, transaction
from redbeat.schedulers import RedBeatScheduler, get_redis
from redis.exceptions import LockError, RedisError

from reliable_tasks import redbeat_store
from reliable_tasks.broker_epoch import record_epoch, stored_run_id
from reliable_tasks.conf import app_settings
from reliable_tasks.db_retry import drop_connections
from reliable_tasks.exceptions import DispatchError
from reliable_tasks.outbox import publish_records
from reliable_tasks.periodic import ScheduleGone, disable_one_off, record_runs
from reliable_tasks.reconcile import reconcile_schedules
from reliable_tasks.timing import plan_runs

logger = logging.getLogger(__name__)

#: ``BrokerEpoch`` name of the Redis behind RedBeat.
REDBEAT_EPOCH = "redbeat"


class ReliableRedBeatScheduler(RedBeatScheduler):
    """RedBeat scheduler that records periodic runs in the ledger before advancing them."""

    #: An idle beat wakes at least this often (Celery's default is 300 s).
    max_interval = 5
    #: How often a standby beat tries to take the lock.
    standby_interval = 1.0
    # Set by RedBeat's __init__ (its classes are untyped); declared for the type checker.
    lock_key: str | None
    lock_name: str | None
    lock: Any

    def __init__(self, app: Any, lock_key: str | None = None,
                 lock_timeout: float | None = None, **kwargs: Any) -> None:
        self._ready = False
        self._standby_logged = False
        #: The run id of the RedBeat Redis whose entries this beat restored (or found stored).
        self._restored_run_id = ""
        super().__init__(app, lock_key=lock_key, lock_timeout=lock_timeout, **kwargs)
        configured = lock_timeout or app.redbeat_conf.lock_timeout
        self.lock_timeout = configured or self.max_interval * 4
        # RedBeat's beat_init receiver blocks in ``lock.acquire()``, polling every
        # ``max_interval``; this scheduler takes the lock itself, without blocking, in ``tick``.
        self.lock_name = self.lock_key
        self.lock_key = None

    def setup_schedule(self) -> None:
        """Deferred until the lock is held: a standby beat must not write the schedule."""

    def _setup_after_lock(self) -> None:
        super().setup_schedule()
        self.update_from_dict({redbeat_store.sweep_entry_name(): {
            "task": "reliable_tasks.sweep",
            "schedule": app_settings.SWEEP_INTERVAL,
            "options": {"expires": app_settings.SWEEP_INTERVAL},
        }})
        self._ready = True

    # -- the lock -------------------------------------------------------------------------

    def _hold_lock(self) -> bool:
        """Keep or take RedBeat's lock without blocking; False while another beat holds it."""
        if self.lock is not None:
            try:
                self.lock.extend(self.lock_timeout, replace_ttl=True)
                return True
            except LockError:
                logger.warning(
                    "beat: lost RedBeat's lock %r (another beat took it, or a Redis failover "
                    "lost it); standing by and trying to take it again", self.lock_name)
                self.lock = None
        lock = get_redis(self.app).lock(self.lock_name, timeout=self.lock_timeout,
                                        thread_local=False)
        if lock.acquire(blocking=False):
            self.lock = lock
            self._standby_logged = False
            logger.info("beat: acquired RedBeat's lock %r (%ss); dispatching",
                        self.lock_name, self.lock_timeout)
            return True
        if not self._standby_logged:
            logger.info("beat: another beat holds RedBeat's lock %r; standing by",
                        self.lock_name)
            self._standby_logged = True
        return False

    def tick(self, min: Any = min, **kwargs: Any) -> float:  # noqa: A002 - Celery's signature
        """One beat: hold the lock, run what is due, return seconds until the next tick.

        The database connections are checked first, as Django's request cycle checks them
        around a request, so a connection that the server dropped or that failed is replaced.
        A Redis or database error ends the tick and is retried after ``standby_interval``; a
        database error also drops the connections. Nothing is lost by it: an entry advances
        only after its runs are recorded, a one-off is disabled with its run, and the run id of
        a new RedBeat Redis is recorded only after its entries were restored.
        """
        try:
            close_old_connections()
            if not self._hold_lock():
                return self.standby_interval
            if not self._ready:
                self._setup_after_lock()
            self._restore_after_redis_change()
            remaining = [self.maybe_due(entry, **self._maybe_due_kwargs)
                         for entry in _schedules_last(self.schedule.values())]
        except RedisError as exc:
            logger.warning("beat: Redis unavailable (%r); retrying in %ss", exc,
                           self.standby_interval)
            return self.standby_interval
        except DatabaseError as exc:
            drop_connections()
            logger.warning("beat: database unavailable (%r); could not record what is due, it "
                           "stays due; retrying in %ss on a new connection", exc,
                           self.standby_interval)
            return self.standby_interval
        return min([value for value in remaining if value] + [self.max_interval])

    def _restore_after_redis_change(self) -> None:
        """A new RedBeat Redis (restarted empty, or failed over) may lack entries: restore them.

        The run id of the Redis whose entries were restored is kept in the database and
        recorded only after the restore succeeded, so a restore that fails (Redis still
        loading or read-only during a failover, the database down) is tried again on the next
        tick, by this beat or by one started after it.
        """
        run_id = str(get_redis(self.app).info("server")["run_id"])
        if run_id == self._restored_run_id:
            return
        stored = stored_run_id(REDBEAT_EPOCH)
        if stored != run_id:
            if stored is None:
                logger.info("beat: first look at RedBeat's Redis; bringing the app's entries "
                            "in line with the database")
            else:
                logger.warning("beat: RedBeat's Redis changed (restart or failover); restoring "
                               "the app's entries from the database")
            self._setup_after_lock()
            plan = reconcile_schedules(dry_run=False)
            record_epoch(REDBEAT_EPOCH, run_id, self.app.now())
            logger.info("beat: restored %d and updated %d entries", len(plan.create),
                        len(plan.update))
        self._restored_run_id = run_id

    # -- periodic runs ---------------------------------------------------------------------

    def maybe_due(self, entry: Any, **kwargs: Any) -> float:
        """Run a schedule's due slots through the ledger; other entries as RedBeat does."""
        spec = redbeat_store.spec_from_options(entry.task, entry.options or {})
        if spec is None:
            return super().maybe_due(entry, **kwargs)
        now = self.app.now()
        last_slot = entry.last_run_at or now
        missed_after = float("inf") if spec.run_at else app_settings.MISSED_RUN_GRACE
        plan = plan_runs(spec.timing(), last_slot, now, catch_up=spec.catch_up,
                         missed_after=missed_after)
        if plan.advance_to is None:
            return self._seconds_until(plan.next_due, now)
        one_off_done = spec.run_at is not None and plan.next_due is None
        try:
            # A database error leaves the entry due (it is raised to ``tick``); a one-off is
            # disabled in the same transaction as its run, so it is either both or neither.
            with transaction.atomic():
                records = record_runs(spec.schedule_id, plan.to_run)
                if one_off_done:
                    disable_one_off(spec.schedule_id)
        except ScheduleGone:
            logger.info("beat: schedule %s is gone or disabled; removing its entry %s",
                        spec.schedule_id, entry.name)
            redbeat_store.remove(self.app, [entry.name])
            return self.max_interval
        except DispatchError as exc:
            # The schedule names a task this code does not have (removed, renamed) or not as a
            # ReliableTask: its runs stay due, and run by the catch-up policy once it is back.
            logger.error("beat: schedule %s cannot run: %s; its runs stay due",
                         spec.schedule_id, exc)
            return self.max_interval
        if one_off_done:
            # The push after the commit removed its entry; if that push failed, the next tick
            # finds the schedule disabled and removes it.
            logger.info("beat: one-off schedule %s ran; disabled", spec.schedule_id)
        else:
            redbeat_store.advance(self.app, entry.name, plan.advance_to,
                                  entry.total_run_count + len(plan.to_run), plan.next_due)
        if plan.skipped:
            logger.info("beat: %s skipped %d missed run(s) (catch_up=%s)", entry.name,
                        plan.skipped, spec.catch_up)
        publish_records(records)
        return self._seconds_until(plan.next_due, now)

    def _seconds_until(self, due: datetime | None, now: datetime) -> float:
        if due is None:
            return self.max_interval
        return max(min((due - now).total_seconds(), self.max_interval), 0.05)


def _schedules_last(entries: Iterable[Any]) -> list[Any]:
    """RedBeat's own entries (statics, the sweeper's) first, then the app's schedules.

    A database error ends the tick at the first schedule it cannot record; the entries that
    need no ledger row run before that, as they do without this app.
    """
    return sorted(entries, key=lambda entry: redbeat_store.schedule_id_of(entry.name) is not None)
