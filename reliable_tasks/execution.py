"""``ReliableTask``: a Celery task class whose calls go through the outbox and whose runs claim.

Calling side: ``delay``/``apply_async``/``delay_on_commit`` record the task with ``dispatch()``.
Worker side: the body runs only after the worker claimed the task's row; a duplicate delivery of
a finished task (or of one running under a live lease) is acknowledged and skipped. Both ends
fail closed on the database: a claim the database does not take sends the delivery back to the
broker without running the body, and an outcome (SUCCESS, FAILURE, RETRY) is written as soon as
the body returns, retried on a fresh connection until the database stores it, before Celery's
result backend is touched (it may live in the same database).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar
from uuid import UUID

from celery.contrib.django.task import DjangoTask
from celery.exceptions import Ignore, Reject, Retry
from celery.result import AsyncResult
from django.db import transaction
from django.utils import timezone

from reliable_tasks import db_retry, ledger, limits
from reliable_tasks.calling import record_call
from reliable_tasks.conf import app_settings
from reliable_tasks.models import TaskRecord
from reliable_tasks.outbox import publish_records
from reliable_tasks.payload import to_stored

logger = logging.getLogger(__name__)

T = TypeVar("T")

class _SettingDefault:
    """A class attribute that reads its default from the app's settings until overridden."""

    def __init__(self, setting: str) -> None:
        self.setting = setting

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        return getattr(app_settings, self.setting)


def backoff_seconds(attempt: int, base: float, maximum: float, jitter: bool) -> float:
    """Delay before the attempt after ``attempt``: ``base * 2**(attempt-1)``, capped.

    With ``jitter`` the delay is drawn from its upper half, so retries of many tasks spread out
    while the spacing stays within a factor of two of the configured curve.
    """
    delay = min(maximum, base * (2 ** max(attempt - 1, 0)))
    if jitter and delay > 0:
        delay = delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - not for security
    return delay


def _error_of(retrying: BaseException | None) -> BaseException | None:
    """The error a retry records: the one ``retry(exc=...)`` names, none for a bare retry."""
    return None if retrying is None or isinstance(retrying, Retry) else retrying


class ReliableTask(DjangoTask):
    """Celery task base class backed by the ledger.

    Attributes (all optional, per task): ``max_attempts`` (runs before FAILURE, first run
    included), ``retry_for`` (exception classes retried with backoff), ``retry_backoff`` and
    ``retry_backoff_max`` (seconds), ``retry_on_lost`` (safe to re-run after its worker died),
    ``unique_key`` (a function ``(args, kwargs) -> str | None``: the deduplication key of a
    call that names none) and ``on_conflict`` (``"return_existing"`` or ``"raise"``: what a
    call gets while an unfinished task holds its key). A call's own ``unique_key`` and
    ``on_conflict`` options win. Celery's ``self.retry()`` and ``autoretry_for`` keep working
    and are recorded.
    """

    max_attempts = _SettingDefault("MAX_ATTEMPTS")
    retry_backoff = _SettingDefault("RETRY_BACKOFF")
    retry_backoff_max = _SettingDefault("RETRY_BACKOFF_MAX")
    retry_for: tuple[type[BaseException], ...] = ()
    retry_on_lost = False
    #: Global limits (``reliable_tasks.limits``): at most ``concurrency_limit`` runs with the
    #: same ``concurrency_key`` at once, and ``global_rate_limit`` (``"100/m"``) starts per
    #: ``rate_key``, on all workers together. A key is a string or a function
    #: ``(args, kwargs) -> str``; without one, the task's name. Celery's own ``rate_limit``
    #: stays per worker.
    concurrency_key: str | Callable[[tuple[Any, ...], dict[str, Any]], str | None] | None = None
    concurrency_limit: int | None = None
    global_rate_limit: str | None = None
    rate_key: str | Callable[[tuple[Any, ...], dict[str, Any]], str | None] | None = None
    #: Default deduplication key of a call, from its args and kwargs (read unbound, so a
    #: ``lambda args, kwargs: ...`` given to ``@shared_task`` works), or None.
    unique_key: Callable[[tuple[Any, ...], dict[str, Any]], str | None] | None = None
    on_conflict = "return_existing"
    #: Its execution claims the ledger row (``dispatch()`` accepts only such tasks).
    claims_its_row = True

    # -- calling side -------------------------------------------------------------------

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    producer: Any = None, link: Any = None, link_error: Any = None,
                    shadow: Any = None, **options: Any) -> AsyncResult:
        """Record the call in the ledger; it is published when the transaction commits.

        Celery's call-time checks and bookkeeping run as for any task (``calling``). Under
        ``task_always_eager`` the call is Celery's own: it runs here and now and returns its
        ``EagerResult``.
        """
        retrying = getattr(self.request, "reliable_retry", None)
        if retrying is not None and task_id is not None and task_id == self.request.id:
            return self._publish_retry(args, kwargs, task_id, options, retrying)
        if self.app.conf.task_always_eager:
            return super().apply_async(args, kwargs, task_id, producer, link, link_error,
                                       shadow, **options)
        return record_call(self, args, kwargs, task_id, producer, link, link_error, shadow,
                           options)

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Record now, in the current transaction; the outbox publishes on commit."""
        self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(  # type: ignore[override]
            self, *args: Any, **kwargs: Any) -> None:
        """Same as ``apply_async``: the outbox already publishes on commit (under
        ``task_always_eager``, Celery's: the task runs when the transaction commits)."""
        if self.app.conf.task_always_eager:
            super().apply_async_on_commit(*args, **kwargs)
        else:
            self.apply_async(*args, **kwargs)

    # -- worker side --------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request: Any = self.request  # Celery's Context takes the claim along
        if request.called_directly:
            return self.run(*args, **kwargs)
        claimed = self._claim(request)
        request.reliable_claim = claimed
        request.reliable_retry = None
        try:
            return self._run_and_record(claimed, request, args, kwargs)
        finally:
            if claimed is not None and claimed.concurrency_key is not None:
                self._wake_waiters(claimed.concurrency_key)

    def _run_and_record(self, claimed: ledger.Claim | None, request: Any,
                        args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the body and write its outcome to the claimed row."""
        try:
            retval = self.run(*args, **kwargs)
        except Retry:
            if claimed is not None and request.is_eager:
                self._store(ledger.record_retry, request.id, claimed,
                            _error_of(request.reliable_retry),
                            timezone.now() + timedelta(seconds=app_settings.PUBLISH_GRACE))
            raise
        except Ignore as exc:
            # After a replace() the row is the replacement's already and this writes nothing.
            if claimed is not None:
                self._store(ledger.record_ignored, request.id, claimed, exc)
            raise
        except Reject as exc:
            if claimed is not None:
                requeue = bool(getattr(exc, "requeue", False))
                self._store(ledger.record_rejected, request.id, claimed, exc, requeue)
            raise
        except Exception as exc:
            if claimed is not None and isinstance(exc, self._retry_for_classes()):
                delay = self.retry_delay(exc, self._attempt(claimed), claimed.max_attempts)
                if delay is not None:
                    # The attempts decide (max_attempts), not Celery's max_retries.
                    raise self.retry(exc=exc, countdown=delay,
                                     max_retries=request.retries + 1) from exc
            if claimed is not None:
                self._store(ledger.record_failure, request.id, claimed, exc)
            raise
        if claimed is not None:
            self._store(ledger.record_success, request.id, claimed, self.kept_return_value(retval))
        return retval

    def _wake_waiters(self, concurrency_key: str) -> None:
        """This run freed a slot of ``concurrency_key``: wake and publish the oldest rows
        waiting for one (the sweeper does it too, should this process die first)."""
        woken = self._store(limits.wake, concurrency_key)
        if woken:
            publish_records(woken)

    def kept_return_value(self, retval: Any) -> Any:
        """What the ledger row keeps of a successful run's return value (JSON), or
        ``ledger.NOT_KEPT`` (the default: Celery's result backend keeps results)."""
        return ledger.NOT_KEPT

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None,
              throw: bool = True, eta: datetime | None = None, countdown: float | None = None,
              max_retries: int | None = None, **options: Any) -> Retry:
        """Celery's ``retry()`` (limited by Celery's ``max_retries``), recorded in the ledger."""
        request: Any = self.request
        request.reliable_retry = exc if exc is not None else Retry()
        return super().retry(args=args, kwargs=kwargs, exc=exc,  # type: ignore[arg-type]
                             throw=throw, eta=eta,
                             countdown=countdown, max_retries=max_retries, **options)

    def on_replace(self, sig: Any) -> Any:
        """Celery's ``replace()``: the row goes REPLACED, naming the replacement, in the same
        transaction that records the replacement (frozen with this task's id, it takes the row
        over when it is dispatched: at once, or when a chain it ends reaches it)."""
        claimed = getattr(self.request, "reliable_claim", None)
        if claimed is None or self.request.is_eager:
            return super().on_replace(sig)
        with transaction.atomic():
            self._store(ledger.record_replaced, self.request.id, claimed, repr(sig))
            try:
                return super().on_replace(sig)
            except Ignore as handed_over:  # Celery's end of a replaced run: commit first
                ending = handed_over
        raise ending

    def reruns_after_lost(self, kwargs: Mapping[str, Any] | None) -> bool:
        """Whether a run whose worker died may run again by itself (``retry_on_lost``);
        ``kwargs`` are that run's keyword arguments (a subclass may decide per run)."""
        return bool(self.retry_on_lost)

    def retry_delay(self, exc: BaseException, attempt: int,
                    max_attempts: int | None) -> float | None:
        """Seconds before the next attempt after ``exc`` ended ``attempt``, or None when
        ``exc`` is not retried (not in ``retry_for``) or the attempts are used up
        (``max_attempts``: the row's own limit, else the task's)."""
        if not isinstance(exc, self._retry_for_classes()):
            return None
        if attempt >= int(max_attempts or self.max_attempts):
            return None
        return backoff_seconds(attempt, float(self.retry_backoff), float(self.retry_backoff_max),
                               bool(getattr(self, "retry_jitter", True)))

    # -- helpers ------------------------------------------------------------------------

    def _attempt(self, claimed: ledger.Claim | None) -> int:
        """This run's attempt number (read from the ledger on first need; 0 if unrecorded)."""
        if claimed is None:
            return 0
        self._store(ledger.load_attempt, self.request.id, claimed)
        return claimed.attempt or 0

    def _retry_for_classes(self) -> tuple[type[BaseException], ...]:
        return tuple(self.retry_for or ())

    def _claim(self, request: Any) -> ledger.Claim | None:
        """Claim the row; raise ``Ignore`` for a duplicate; ``None`` for a non-UUID task id.

        The claim fails closed: a database that does not take it within
        ``CLAIM_RETRY_TIMEOUT`` seconds never lets the body run (``_defer``).
        """
        task_id = request.id
        try:
            UUID(str(task_id))
        except ValueError:
            logger.warning("%s[%s]: task id is not a UUID; running without the ledger",
                           self.name, task_id)
            return None
        token = timezone.now()  # the claim's start time, the same on every try

        def claim() -> ledger.Claim:
            return ledger.claim(task_id, task_name=self.name, worker=request.hostname or "",
                                rerun_after_lost=self.reruns_after_lost(request.kwargs),
                                started_at=token,
                                max_attempts=int(self.max_attempts),
                                limited=self._has_limits(request),
                                enforce_limits=not request.is_eager)

        try:
            claimed = db_retry.within(claim, app_settings.CLAIM_RETRY_TIMEOUT,
                                      what=f"{self.name}[{task_id}] claim")
        except db_retry.TRANSIENT_ERRORS as exc:
            self._defer(request, exc)
        if claimed.waiting_for:
            self._wait(request, claimed)
        if not claimed.won:
            if request.is_eager:
                # apply() runs the body, as Celery's does; the ledger keeps the other run's.
                logger.debug("%s[%s]: run eagerly without the ledger (%s)", self.name, task_id,
                             claimed.reason)
                return None
            logger.info("%s[%s]: duplicate delivery skipped (%s)", self.name, task_id,
                        claimed.reason)
            raise Ignore(f"duplicate delivery: {claimed.reason}")
        return claimed

    def _has_limits(self, request: Any) -> bool:
        """Whether the delivery's row has limits: the task's own, or a call's (its header)."""
        return bool(self.concurrency_limit or self.global_rate_limit
                    or getattr(request, limits.LIMITED_HEADER, False))

    def _wait(self, request: Any, claimed: ledger.Claim) -> NoReturn:
        """A limit deferred the delivery (its row is WAITING): acknowledge it, body not run.

        A rate's short wait goes back to the broker as a copy with a countdown; otherwise the
        row waits in the database, to be woken when a slot frees or published when due.
        """
        logger.info("%s[%s]: %s", self.name, request.id, claimed.reason)
        if claimed.due is not None:
            delay = max((claimed.due - timezone.now()).total_seconds(), 0.0)
            copy = self.signature_from_request(request, countdown=delay)
            try:
                DjangoTask.apply_async(self, copy.args, copy.kwargs, **copy.options)
            except Exception:  # the row is WAITING with a due time: the sweeper sends it
                logger.warning("%s[%s]: the deferred copy was not published; the sweeper "
                               "publishes the task when due", self.name, request.id,
                               exc_info=True)
        raise Ignore(claimed.reason)

    def _defer(self, request: Any, exc: BaseException) -> NoReturn:
        """The ledger refused the claim: send the delivery back to run later, body not run.

        A copy of the message goes to the broker with a countdown of ``CLAIM_RETRY_TIMEOUT``
        and this delivery is acknowledged (``Ignore``), whatever the task's ``acks_late``. If
        the broker refuses the copy too, the delivery is rejected with requeue, which puts it
        back where ``acks_late`` is on. Eagerly (``apply()``, ``task_always_eager``) there is
        no broker to go back to: the database error is raised.
        """
        if request.is_eager:
            raise exc
        delay = app_settings.CLAIM_RETRY_TIMEOUT
        logger.warning("%s[%s]: the ledger did not take the claim (%r); the body did not run "
                       "and the task goes back to the broker for %ss", self.name, request.id,
                       exc, delay)
        copy = self.signature_from_request(request, countdown=delay)
        try:
            DjangoTask.apply_async(self, copy.args, copy.kwargs, **copy.options)
        except Exception as publish_error:
            raise Reject(publish_error, requeue=True) from exc
        raise Ignore("deferred: the ledger did not take the claim") from exc

    def _store(self, write: Callable[..., T], *args: Any) -> T:
        """Run a ledger write until the database stored it (never dropped, see ``db_retry``).

        While it waits the task is still running as far as the worker knows, so the worker's
        heartbeat keeps its lease: the sweeper never takes a finished task for a lost one.
        """
        name = getattr(write, "__name__", "write")
        return db_retry.until_done(lambda: write(*args),
                                   what=f"{self.name}[{self.request.id}] {name}")

    def _publish_retry(self, args: Any, kwargs: Any, task_id: str, options: dict[str, Any],
                       exc: BaseException) -> AsyncResult:
        """Celery's retry path: record RETRY first, then publish (or hold) the next attempt."""
        claimed = getattr(self.request, "reliable_claim", None)
        if claimed is None:
            return super().apply_async(args, kwargs, task_id=task_id, **options)
        now = timezone.now()
        eta = options.get("eta")
        if options.get("countdown") is not None:
            eta = now + timedelta(seconds=float(options["countdown"]))
        eta = eta or now
        held = (eta - now).total_seconds() > app_settings.DELAY_THRESHOLD
        sweeper_due_at = eta if held else eta + timedelta(seconds=app_settings.PUBLISH_GRACE)
        call_changes: dict[str, Any] = {"eta": eta}
        if args is not None:
            call_changes["args"] = to_stored(list(args), "args")
        if kwargs is not None:
            call_changes["kwargs"] = to_stored(dict(kwargs), "kwargs")
        recorded = self._store(functools.partial(
            ledger.record_retry, task_id, claimed, _error_of(exc),
            sweeper_due_at, None, **call_changes))
        if not recorded:
            return super().apply_async(args, kwargs, task_id=task_id, **options)
        if not held:
            publish_records([TaskRecord.objects.get(pk=task_id)])
        return self.AsyncResult(task_id)
