"""The transactional outbox: record tasks in the caller's transaction, publish after commit.

``dispatch()`` writes a ``TaskRecord`` and registers an after-commit hook. When the transaction
commits, the first of its hooks publishes every task the transaction recorded in one pipelined
batch and marks them QUEUED in one UPDATE; a rolled-back transaction (or savepoint) publishes
nothing. A failed publish leaves the rows PENDING for the sweeper and never raises.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from uuid import UUID

from celery import Celery
from celery.canvas import Signature
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, router, transaction
from django.db.models import F, Field
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from reliable_tasks import db_retry, statements
from reliable_tasks.background import shared_publisher
from reliable_tasks.celery_app import claims_its_row, find_task, get_celery_app
from reliable_tasks.conf import app_settings
from reliable_tasks.exceptions import (
    DispatchError,
    DuplicateTask,
    NotReliableTaskError,
    PayloadError,
    UnknownTaskError,
)
from reliable_tasks.ledger import key_holder, take_over
from reliable_tasks.limits import LIMITED_HEADER, call_limits, task_default
from reliable_tasks.models import UNIQUE_KEY_MAX_LENGTH, TaskRecord
from reliable_tasks.payload import from_stored, to_stored, to_stored_sized
from reliable_tasks.publisher import Publishable, send_records
from reliable_tasks.states import TaskState

logger = logging.getLogger(__name__)

#: ``apply_async`` options kept as record columns rather than in ``options``, and the
#: dispatch's own (``on_conflict``), none of which goes into the message.
_COLUMN_OPTIONS = ("countdown", "eta", "expires", "task_id", "max_attempts",
                   "parent_id", "root_id", "unique_key", "on_conflict", "concurrency_key",
                   "concurrency_limit", "rate_limit", "rate_key")

#: ``on_conflict`` values: what a call gets when an unfinished task holds its ``unique_key``.
RETURN_EXISTING = "return_existing"
RAISE = "raise"
_ON_CONFLICT = (RETURN_EXISTING, RAISE)
#: Inserts a call tries while the key's holder keeps finishing between its conflict and the
#: look-up of the holder (each finish frees the key, so the next insert normally wins).
_KEY_TRIES = 5


def _task_name(app: Celery, task: Any) -> str:
    """The name of ``task``, a registered ``ReliableTask``; raise ``DispatchError``.

    Only a ``ReliableTask`` claims its row when it runs: a plain task's row could be published
    twice (the sweeper's re-publish, a redelivery) and its body would run each time.
    """
    name = task if isinstance(task, str) else getattr(task, "name", None)
    if not isinstance(name, str) or not name:
        raise UnknownTaskError(f"{task!r} is neither a task nor a task name")
    found = find_task(app, name)
    if found is None:
        raise UnknownTaskError(
            f"Unknown task {name!r}: it is not registered with the Celery app {app.main!r}")
    if not claims_its_row(found):
        raise NotReliableTaskError(
            f"Task {name!r} is a plain Celery task, so nothing would claim its ledger row when "
            f"it runs and a second delivery would run it again: declare it with "
            f"base=ReliableTask (or make ReliableTask the app's task_cls), or send it with "
            f"apply_async() (it is then recorded in the ledger without the outbox's guarantee)")
    return name


def _as_datetime(value: Any, what: str) -> datetime:
    if isinstance(value, str):
        parsed = parse_datetime(value)
        if parsed is None:
            raise DispatchError(f"{what} is not an ISO 8601 datetime: {value!r}")
        value = parsed
    if not isinstance(value, datetime):
        raise DispatchError(f"{what} must be a datetime, not {type(value).__name__}")
    if timezone.is_naive(value):
        value = timezone.make_aware(value, timezone.get_default_timezone())
    return value


def _eta(options: Mapping[str, Any], now: datetime) -> datetime | None:
    if options.get("countdown") is not None:
        return now + timedelta(seconds=float(options["countdown"]))
    if options.get("eta") is not None:
        return _as_datetime(options["eta"], "eta")
    return None


def _expires_at(expires: Any, now: datetime) -> datetime | None:
    if expires is None:
        return None
    if isinstance(expires, int | float):
        return now + timedelta(seconds=float(expires))
    return _as_datetime(expires, "expires")


def _lineage(app: Celery, options: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Parent and root ids: given, or those of the worker task that is dispatching."""
    parent_id, root_id = options.get("parent_id"), options.get("root_id")
    current = app.current_worker_task
    if current is not None:
        parent_id = parent_id or current.request.id
        root_id = root_id or current.request.root_id or current.request.id
    return parent_id, root_id


def build_record(
    app: Celery, task: Any, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None,
    options: Mapping[str, Any], now: datetime,
) -> TaskRecord:
    """Validate one call and return its unsaved ``TaskRecord``; raise ``DispatchError``."""
    name = _task_name(app, task)
    if args is None:
        args = ()
    if kwargs is None:
        kwargs = {}
    if not isinstance(args, list | tuple):
        raise PayloadError(f"args of {name} must be a list or tuple, not {type(args).__name__}")
    if not isinstance(kwargs, Mapping):
        raise PayloadError(f"kwargs of {name} must be a mapping, not {type(kwargs).__name__}")
    stored_args, args_size = to_stored_sized(list(args), f"args of {name}")
    stored_kwargs, kwargs_size = to_stored_sized(dict(kwargs), f"kwargs of {name}")
    size = args_size + kwargs_size
    if size > app_settings.MAX_PAYLOAD_BYTES:
        raise PayloadError(
            f"args and kwargs of {name} are {size} bytes of JSON, more than "
            f"RELIABLE_TASKS_MAX_PAYLOAD_BYTES ({app_settings.MAX_PAYLOAD_BYTES})")
    task_type = app.tasks[name]
    expires = options.get("expires", getattr(task_type, "expires", None))
    max_attempts = options.get("max_attempts")
    if max_attempts is not None and (not isinstance(max_attempts, int) or max_attempts < 1):
        raise DispatchError(f"max_attempts must be a positive integer, not {max_attempts!r}")
    parent_id, root_id = _lineage(app, options)
    unique_key = _unique_key(task_type, name, args, kwargs, options)
    limit_columns = call_limits(task_type, name, args, kwargs, options)
    extra = {key: value for key, value in options.items() if key not in _COLUMN_OPTIONS}
    if limit_columns["concurrency_key"] or limit_columns["rate_key"]:
        # The worker's claim then goes straight to the claim within limits.
        extra["headers"] = {**(extra.get("headers") or {}), LIMITED_HEADER: True}
    stored_options = to_stored(extra, f"options of {name}") if extra else {}
    record = new_record({
        "task_name": name,
        "args": stored_args,
        "kwargs": stored_kwargs,
        "options": stored_options,
        "queue": _queue_name(extra.get("queue")),
        "eta": _eta(options, now),
        "expires_at": _expires_at(expires, now),
        "max_attempts": max_attempts,
        "parent_id": parent_id,
        "root_id": root_id,
        "group_id": extra.get("group_id"),
        "unique_key": unique_key,
        **limit_columns,
        "created_at": now,
    })
    record.next_attempt_at = _first_publish_due_at(record, now)
    if options.get("task_id"):
        record.id = _task_uuid(options["task_id"])
    return record


def _unique_key(task_type: Any, name: str, args: Sequence[Any], kwargs: Mapping[str, Any],
                options: Mapping[str, Any]) -> str | None:
    """The call's ``unique_key`` option, else the task's (a function of args and kwargs), or
    None; raise ``DispatchError`` for one the ledger cannot hold."""
    if "unique_key" in options:
        key, source = options["unique_key"], "unique_key"
    else:
        default = task_default(task_type, "unique_key")
        if default is None:
            return None
        if not callable(default):
            raise DispatchError(
                f"{name}.unique_key must be a function of (args, kwargs) returning the key "
                f"or None, not {default!r}")
        key, source = default(tuple(args), dict(kwargs)), f"{name}.unique_key(args, kwargs)"
    if key is None:
        return None
    if not isinstance(key, str) or not key:
        raise DispatchError(f"{source} must be a non-empty string or None, not {key!r}")
    if len(key) > UNIQUE_KEY_MAX_LENGTH:
        raise DispatchError(
            f"{source} is {len(key)} characters long, more than the ledger's "
            f"{UNIQUE_KEY_MAX_LENGTH}: {key[:40]!r}...")
    return key


def on_conflict_policy(task: Any, options: Mapping[str, Any]) -> str:
    """The call's ``on_conflict`` option, else the task's, else ``return_existing``; raise
    ``DispatchError`` for an unknown one."""
    policy = options.get("on_conflict")
    source = "on_conflict"
    if policy is None:
        policy = task_default(task, "on_conflict") or RETURN_EXISTING
        source = f"{getattr(task, 'name', task)}.on_conflict"
    if policy not in _ON_CONFLICT:
        raise DispatchError(
            f"{source} must be {RETURN_EXISTING!r} or {RAISE!r}, not {policy!r}")
    return str(policy)


def _task_uuid(task_id: Any) -> UUID:
    """A given task id as the ledger's key (a UUID); raise ``DispatchError``."""
    try:
        return task_id if isinstance(task_id, UUID) else UUID(str(task_id))
    except ValueError:
        raise DispatchError(
            f"task_id must be a UUID, the ledger's key, not {task_id!r}") from None


@lru_cache(maxsize=1)
def _record_fields() -> tuple[Field[Any, Any], ...]:
    return tuple(TaskRecord._meta.concrete_fields)


def new_record(values: Mapping[str, Any]) -> TaskRecord:
    """An unsaved ``TaskRecord`` from ``values`` by field name, defaults for the rest.

    The same as ``TaskRecord(**values)``, built from positional values: Django's keyword path
    costs more than the rest of building a record.
    """
    model: Any = TaskRecord  # django-stubs types positional fields as if only ``id`` came first
    return model(*[values[field.name] if field.name in values else field.get_default()
                   for field in _record_fields()])


def _queue_name(queue: Any) -> str:
    if queue is None:
        return ""
    return str(getattr(queue, "name", queue))


def _is_held(record: TaskRecord, now: datetime) -> bool:
    """Whether the row waits in the database for the sweeper instead of in Redis."""
    return record.eta is not None and (
        (record.eta - now).total_seconds() > app_settings.DELAY_THRESHOLD)


def _first_publish_due_at(record: TaskRecord, now: datetime) -> datetime:
    """When the sweeper publishes the row if the after-commit publish has not confirmed."""
    if _is_held(record, now):
        assert record.eta is not None
        return record.eta
    return now + timedelta(seconds=app_settings.PUBLISH_GRACE)


def dispatch(task: Any, args: Sequence[Any] | None = (), kwargs: Mapping[str, Any] | None = None,
             **options: Any) -> TaskRecord:
    """Record a task in the current transaction and publish it after commit.

    ``task`` is a task object or a registered task name; ``options`` are those of
    ``apply_async`` (queue, countdown, eta, expires, priority, headers, ...) plus
    ``max_attempts``, ``unique_key``, ``on_conflict``, ``concurrency_key``,
    ``concurrency_limit``, ``rate_limit`` and ``rate_key`` (``reliable_tasks.limits``). The
    record's id is the Celery task id. Raises ``DispatchError`` for invalid input (nothing is
    recorded); never raises because the broker is unavailable.

    While an unfinished task holds the call's ``unique_key`` (the option, else the task's
    ``unique_key(args, kwargs)``), nothing is recorded: with ``on_conflict="return_existing"``
    (the default) the holder's record is returned, with ``"raise"`` ``DuplicateTask`` is
    raised. The database decides between racing callers.
    """
    app = get_celery_app()
    now = timezone.now()
    record = build_record(app, task, args, kwargs, options, now)
    if record.unique_key is not None:
        policy = on_conflict_policy(app.tasks[record.task_name], options)
        stored = _record_keyed(record, policy, given_id=bool(options.get("task_id")))
        if stored is not record:
            return stored
    elif options.get("task_id"):
        _save_with_given_id(record)
    else:
        record.save(force_insert=True)
    publish_on_commit([record])
    return record


def _savepoint() -> AbstractContextManager[Any]:
    """A savepoint inside a transaction (a failed statement leaves the caller's transaction
    usable); nothing in autocommit, where a failed statement ends nothing."""
    return transaction.atomic() if connection.in_atomic_block else nullcontext()


def _record_keyed(record: TaskRecord, policy: str, *, given_id: bool) -> TaskRecord:
    """Insert the row of a call with a ``unique_key``; return it, or the unfinished row that
    holds the key (``policy`` return_existing) or raise ``DuplicateTask`` (raise).

    The unique index decides: the insert runs in a savepoint and a conflict rolls back only
    that. A holder that finished between the conflict and the look-up freed the key, so the
    insert is tried again, a bounded number of times.
    """
    for _ in range(_KEY_TRIES):
        if _insert_keyed(record, given_id):
            return record
        assert record.unique_key is not None
        holder = key_holder(record.unique_key)
        if holder is not None:
            return _answer_held_key(record, holder, policy)
    raise DispatchError(
        f"The unique key {record.unique_key!r} of {record.task_name} was held, then free, "
        f"{_KEY_TRIES} times while dispatching: nothing was recorded; dispatch again")


def _answer_held_key(record: TaskRecord, holder: TaskRecord, policy: str) -> TaskRecord:
    """What a call whose ``unique_key`` ``holder`` holds gets: the holder (``policy``
    return_existing), or ``DuplicateTask`` (raise)."""
    if policy == RAISE:
        raise DuplicateTask(
            f"{holder.task_name}[{holder.pk}] ({holder.state}) holds the unique key "
            f"{record.unique_key!r}: {record.task_name} was not recorded", holder)
    logger.debug("%s: unique key %r held by %s[%s]; returning it", record.task_name,
                 record.unique_key, holder.task_name, holder.pk)
    return holder


def _insert_keyed(record: TaskRecord, given_id: bool) -> bool:
    """Insert (or, for a given task id in the ledger, take over) the row; False when an
    unfinished row holds its key. A new id is inserted skipping a conflict where the database
    can (no savepoint), else in a savepoint."""
    if not given_id and statements.inserts_skipping_conflicts(router.db_for_write(TaskRecord)):
        return bool(statements.insert_records_skipping_conflicts([record]))
    try:
        with _savepoint():
            record.save(force_insert=True)
        return True
    except IntegrityError:
        if not given_id or not TaskRecord.objects.filter(pk=record.pk).exists():
            return False
    try:
        with _savepoint():
            taken = take_over(record)
    except IntegrityError:
        return False
    if not taken:
        _log_another_message(record)
    return True


def _log_another_message(record: TaskRecord) -> None:
    """Say that a call names the id of an unfinished row: its message is one more delivery."""
    logger.info("%s[%s]: the task is in the ledger and not finished; another message is "
                "published and the claim decides", record.task_name, record.pk)


def _save_with_given_id(record: TaskRecord) -> None:
    """Insert the row of a call that names its task id, which may be in the ledger already.

    One task id is one row. A REPLACED row (``Task.replace`` froze the replacement with the
    replaced task's id) becomes the replacement's, and a finished row becomes the new call's
    (a frozen signature or errback applied again runs again, as with Celery). An unfinished row
    stays as it is: the call is published as another message of that task id, and the worker's
    claim decides whether it runs, as for any duplicate.
    """
    try:
        with _savepoint():
            record.save(force_insert=True)
    except IntegrityError:
        if not take_over(record):
            _log_another_message(record)


def _normalize_call(call: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    if isinstance(call, Signature):
        return call.task, call.args, call.kwargs, dict(call.options)
    if isinstance(call, Mapping):
        options = dict(call.get("options") or {})
        return call["task"], call.get("args", ()), call.get("kwargs"), options
    if isinstance(call, tuple | list) and 1 <= len(call) <= 4:
        task, args, kwargs, options = [*call, None, None, None][:4]
        return task, args, kwargs, dict(options or {})
    raise DispatchError(
        f"dispatch_many() takes signatures, mappings or (task, args, kwargs, options) tuples, "
        f"not {call!r}")


def dispatch_many(calls: Iterable[Any]) -> list[TaskRecord]:
    """Record many tasks with one INSERT per batch and publish them after commit in one batch.

    Each call is a Celery signature (``add.s(1, 2)``), a mapping with ``task``, ``args``,
    ``kwargs`` and ``options``, or a ``(task, args, kwargs, options)`` tuple (trailing items
    optional). All calls are validated before anything is recorded.

    A call may carry ``unique_key`` and ``on_conflict`` in its options, as for ``dispatch``:
    its place in the returned list holds the holder's record when the key is held (a key
    repeated within the batch is held by its first call), and a ``DuplicateTask`` records
    none of the batch. Calls with a key are inserted in bulk too, skipping the rows whose key
    is held, on PostgreSQL and SQLite; one by one on MySQL and MariaDB (``_record_keyed``).
    """
    app = get_celery_app()
    now = timezone.now()
    records: list[TaskRecord] = []
    keyed: dict[int, tuple[str, bool]] = {}  # call index: on_conflict, given task id
    for index, call in enumerate(calls):
        task, args, kwargs, options = _normalize_call(call)
        # One microsecond apart: rows keep their dispatch order (limits wake waiters by it).
        record = build_record(app, task, args, kwargs, options,
                              now + timedelta(microseconds=index))
        if record.unique_key is not None:
            keyed[len(records)] = (on_conflict_policy(app.tasks[record.task_name], options),
                                   bool(options.get("task_id")))
        records.append(record)
    if not records:
        return []
    results = list(records)
    with transaction.atomic():
        unkeyed = [record for record in records if record.unique_key is None]
        if unkeyed:
            statements.insert_records(unkeyed)
        _record_keyed_calls(records, results, keyed)
    publish_on_commit([record for record, result in zip(records, results, strict=True)
                       if result is record])
    return results


def _record_keyed_calls(records: list[TaskRecord], results: list[TaskRecord],
                        keyed: Mapping[int, tuple[str, bool]]) -> None:
    """Insert the calls of ``dispatch_many`` that have a key (``keyed``: their index, policy
    and whether they name their task id) and put each one's answer in ``results``.

    Where the database can skip a refused row, those that do not name a task id are inserted
    in bulk, and only the refused ones are answered one by one: by the row that holds
    the key (read once per key), else, if it finished meanwhile, by ``_record_keyed``.
    """
    one_by_one = dict(keyed)
    if statements.inserts_skipping_conflicts(router.db_for_write(TaskRecord)):
        bulk = [index for index, (_policy, given_id) in keyed.items() if not given_id]
        inserted = statements.insert_records_skipping_conflicts([records[i] for i in bulk])
        holders: dict[str, TaskRecord | None] = {}
        for index in bulk:
            del one_by_one[index]
            record = records[index]
            if record.pk in inserted:
                continue
            assert record.unique_key is not None
            if record.unique_key not in holders:
                holders[record.unique_key] = key_holder(record.unique_key)
            holder = holders[record.unique_key]
            if holder is None:
                one_by_one[index] = keyed[index]
            else:
                results[index] = _answer_held_key(record, holder, keyed[index][0])
    for index, (policy, given_id) in sorted(one_by_one.items()):
        results[index] = _record_keyed(records[index], policy, given_id=given_id)


class _WaitingHooks(threading.local):
    """Per thread and database alias: the publish hooks registered and not yet run."""

    def __init__(self) -> None:
        self.by_alias: dict[str, list[_PublishHook]] = {}


_waiting = _WaitingHooks()


class _PublishHook:
    """After-commit hook of one ``dispatch`` call.

    The first hook to run after a commit takes the records of every other hook still waiting
    on its thread and alias, keeps those whose rows exist (they committed; rows of rolled-back
    savepoints or transactions do not), and publishes them all in one batch. The hooks it took
    become no-ops when Django runs them.
    """

    __slots__ = ("records", "done", "using")

    def __init__(self, records: list[TaskRecord], using: str) -> None:
        self.records = records
        self.done = False
        self.using = using
        _waiting.by_alias.setdefault(using, []).append(self)

    def __call__(self) -> None:
        if self.done:
            return
        waiting = _waiting.by_alias.pop(self.using, [])
        others = [hook for hook in waiting if hook is not self and not hook.done]
        self.done = True
        try:
            self._publish(others)
        except db_retry.TRANSIENT_ERRORS as exc:
            # The caller's commit is done: its tasks are recorded, and their rows stay PENDING
            # (which the claim accepts) if the database went away before the QUEUED mark. The
            # sweeper publishes what is still PENDING after the grace, and the claim skips the
            # second copy; raising here would make a caller that tries again run a second task
            # (tests/test_fail_closed.py).
            logger.warning("after a commit: the database went away while publishing its tasks "
                           "(%r); the sweeper publishes what is still PENDING after the grace",
                           exc)
            db_retry.drop_connections()

    def _publish(self, others: list[_PublishHook]) -> None:
        batch = list(self.records)
        if others:
            for hook in others:
                hook.done = True
            candidates = [record for hook in others for record in hook.records]
            committed = set(TaskRecord.objects.using(self.using)
                            .filter(pk__in=[record.pk for record in candidates])
                            .values_list("pk", flat=True))
            batch.extend(record for record in candidates if record.pk in committed)
        publish_committed(batch)


def publish_on_commit(records: list[TaskRecord]) -> None:
    """Publish ``records`` when the current transaction commits (at once in autocommit).

    Rows delayed beyond ``DELAY_THRESHOLD`` are not published: the sweeper does when due.
    """
    now = timezone.now()
    to_publish = [record for record in records if not _is_held(record, now)]
    if to_publish:
        using = DEFAULT_DB_ALIAS
        transaction.on_commit(_PublishHook(to_publish, using), using=using)


def publish_committed(records: list[TaskRecord]) -> None:
    """Publish the records of a commit now, or hand them to the background publisher.

    ``PUBLISH_IN_BACKGROUND`` decides; ``task_always_eager`` always runs them here and now.
    """
    if app_settings.PUBLISH_IN_BACKGROUND and not get_celery_app().conf.task_always_eager:
        shared_publisher(publish_records).submit(records)
    else:
        publish_records(records)


def publish_records(records: Sequence[Publishable], *, retry_at: datetime | None = None) -> int:
    """Publish ``records`` in one batch and mark them QUEUED; return how many were published.

    On failure the rows stay PENDING (or RETRY) with the error and a publish-attempt count, and
    nothing is raised: the sweeper publishes them later (not before ``retry_at`` when given).
    """
    if not records:
        return 0
    app = get_celery_app()
    ids = [record.id for record in records]
    if app.conf.task_always_eager:
        return _run_eagerly(app, records)
    try:
        send_records(app, records)
    except Exception as exc:  # noqa: BLE001 - any broker failure leaves the rows to the sweeper
        logger.warning("publishing %d task(s) failed; the sweeper will retry: %r",
                       len(records), exc)
        _record_publish_failure(ids, exc, retry_at)
        return 0
    _mark_queued(records)
    return len(records)


@contextmanager
def publishing_transaction() -> Iterator[None]:
    """A transaction whose commit does not wait for the disk where the database allows.

    For writes that are harmless to lose in a database crash: a row left PENDING is published
    again after the grace, and the worker's claim skips the second copy. On PostgreSQL the
    transaction runs with ``synchronous_commit = off``. Inside a transaction already (a
    caller's, or the sweeper's batch), the writes join that one: a caller's is never relaxed.
    """
    if connection.in_atomic_block:
        yield
        return
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        yield


#: Rows marked QUEUED per statement (SQLite limits the parameters of one statement).
MARK_CHUNK = 2000


def _mark_queued(records: Sequence[Publishable]) -> None:
    """Mark published rows QUEUED, each at the attempt it was published for, without waiting
    for the disk where the database allows."""
    by_attempts: dict[int, list[Any]] = {}
    for record in records:
        by_attempts.setdefault(record.attempts, []).append(record.id)
    with publishing_transaction():
        for attempts, ids in by_attempts.items():
            for start in range(0, len(ids), MARK_CHUNK):
                statements.mark_queued(ids[start:start + MARK_CHUNK], attempts)


def _record_publish_failure(ids: list[Any], exc: Exception, retry_at: datetime | None) -> None:
    changes: dict[str, Any] = {
        "publish_attempts": F("publish_attempts") + 1,
        "publish_error": f"{type(exc).__name__}: {exc}"[:2000],
    }
    if retry_at is not None:
        changes["next_attempt_at"] = retry_at
    try:
        with transaction.atomic():  # a failure here must not break a surrounding transaction
            TaskRecord.objects.filter(id__in=ids).transition(
                (TaskState.PENDING, TaskState.RETRY), **changes)
    except Exception:  # noqa: BLE001 - the rows are PENDING either way; the sweeper acts
        logger.exception("recording a publish failure failed")


def _run_eagerly(app: Celery, records: Sequence[Publishable]) -> int:
    """``task_always_eager``: run each task here and now, through its claim, like a worker."""
    for record in records:
        app.tasks[record.task_name].apply(
            args=from_stored(record.args), kwargs=from_stored(record.kwargs),
            task_id=str(record.id))
    return len(records)

