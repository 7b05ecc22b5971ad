"""What a block of code dispatched, read from the ledger (``capture_dispatches``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from reliable_tasks.testing.broker import in_process

if TYPE_CHECKING:
    from reliable_tasks.models import TaskRecord


def _task_name(task: Any) -> str:
    name = task if isinstance(task, str) else getattr(task, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{task!r} is neither a task nor a task name")
    return name


def _as_stored(value: Any, what: str) -> Any:
    """``value`` as it reads back from the ledger (tuples become lists, as in JSON)."""
    from reliable_tasks.payload import from_stored, to_stored

    return from_stored(to_stored(value, what))


def _describe(record: TaskRecord) -> str:
    from reliable_tasks.payload import from_stored

    return (f"{record.task_name}(args={from_stored(record.args)!r}, "
            f"kwargs={from_stored(record.kwargs)!r})")


class Dispatches:
    """The tasks dispatched through the outbox during a ``capture_dispatches()`` block.

    Read from the ledger on each access, so it is what the database holds: a dispatch rolled
    back (with its transaction or savepoint, even after the block) is not in it.
    """

    def __init__(self, since: datetime) -> None:
        self._since = since
        self._until: datetime | None = None

    def close(self) -> None:
        """Stop at now: rows recorded after the block are not its dispatches."""
        self._until = timezone.now()

    @property
    def records(self) -> list[TaskRecord]:
        """The ``TaskRecord`` of each dispatched task, in the order they were recorded
        (the calls of one ``dispatch_many()`` share their time: in any order)."""
        from reliable_tasks.models import TaskRecord

        rows = TaskRecord.objects.filter(adopted=False, created_at__gte=self._since)
        if self._until is not None:
            rows = rows.filter(created_at__lte=self._until)
        return list(rows.order_by("created_at", "pk"))

    @property
    def names(self) -> list[str]:
        """The task names dispatched, in order."""
        return [record.task_name for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[TaskRecord]:
        return iter(self.records)

    def assert_dispatched(self, task: Any, args: Sequence[Any] | None = None,
                          kwargs: Mapping[str, Any] | None = None, *,
                          count: int | None = None) -> list[TaskRecord]:
        """Assert that ``task`` (a task or its name) was dispatched, with ``args`` and
        ``kwargs`` where given, at least once (exactly ``count`` times where given); return the
        matching records. The failure message lists what was dispatched."""
        from reliable_tasks.payload import from_stored

        name = _task_name(task)
        if args is not None and not isinstance(args, list | tuple):
            raise TypeError(f"args must be a list or tuple, not {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a mapping, not {type(kwargs).__name__}")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                  or count < 0):
            raise ValueError(f"count must be a non-negative integer, not {count!r}")
        want_args = None if args is None else _as_stored(list(args), "args")
        want_kwargs = None if kwargs is None else _as_stored(dict(kwargs), "kwargs")
        records = self.records
        matching = [
            record for record in records
            if record.task_name == name
            and (want_args is None or from_stored(record.args) == want_args)
            and (want_kwargs is None or from_stored(record.kwargs) == want_kwargs)]
        if (len(matching) != count) if count is not None else not matching:
            wanted = name + ("" if args is None else f" args={want_args!r}") + (
                "" if kwargs is None else f" kwargs={want_kwargs!r}")
            times = "at least once" if count is None else f"{count} time(s)"
            seen = "\n  ".join(_describe(record) for record in records) or "(nothing)"
            raise AssertionError(f"expected {wanted} dispatched {times}, found "
                                 f"{len(matching)}; dispatched:\n  {seen}")
        return matching

    def assert_nothing_dispatched(self) -> None:
        """Assert that nothing was dispatched (or that all of it was rolled back)."""
        records = self.records
        if records:
            seen = "\n  ".join(_describe(record) for record in records)
            raise AssertionError(f"expected nothing dispatched; dispatched:\n  {seen}")


@contextmanager
def capture_dispatches() -> Iterator[Dispatches]:
    """Capture what the block dispatches, and hold it: nothing is sent to the broker and
    nothing runs.

    Yields a ``Dispatches`` (the recorded ``TaskRecord`` rows, with ``assert_dispatched()``
    and ``assert_nothing_dispatched()``). Captured rows stay PENDING after the block, so
    ``drain()`` can run them. Tasks dispatched with ``dispatch()``, ``dispatch_many()`` and
    ``ReliableTask`` calls count; those sent around the outbox (a plain task's
    ``apply_async``) do not. Inside a TestCase's transaction the rows are visible as soon as
    they are recorded; a rolled-back savepoint takes its dispatches away, as a rolled-back
    transaction does elsewhere.
    """
    with in_process("hold"):
        captured = Dispatches(timezone.now())
        try:
            yield captured
        finally:
            captured.close()
