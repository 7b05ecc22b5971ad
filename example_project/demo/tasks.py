"""Demo tasks: one succeeds, one fails a few times then succeeds, one always fails.

``record`` and ``plain_record`` write an ``Execution`` row per body run, so tests can count
executions and duplicates in the database. ``log_run`` and ``plain_log_run`` count them outside
the database instead (one line per run appended to a file), for the scenarios that break it.
"""

import os
import time

from celery import chord, group, shared_task
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded, TimeLimitExceeded
from django.db import connection

from example_project.demo.models import Execution
from reliable_tasks import ReliableTask


class FlakyError(Exception):
    """A transient error the demo tasks retry on."""


@shared_task(base=ReliableTask, name="demo.add")
def add(x: int, y: int) -> int:
    """Succeed at once."""
    return x + y


@shared_task(
    bind=True, base=ReliableTask, name="demo.flaky",
    retry_for=(FlakyError,), max_attempts=5, retry_backoff=1, retry_backoff_max=2,
)
def flaky(self: ReliableTask, failures: int = 2) -> str:
    """Fail ``failures`` times, then succeed."""
    if self.request.retries < failures:
        raise FlakyError(f"attempt {self.request.retries + 1} of {failures + 1} fails on purpose")
    return f"succeeded after {failures} failures"


@shared_task(
    base=ReliableTask, name="demo.always_fails",
    retry_for=(FlakyError,), max_attempts=3, retry_backoff=1, retry_backoff_max=2,
)
def always_fails() -> None:
    """Fail every attempt; ends as FAILURE after ``max_attempts``."""
    raise FlakyError("this task always fails")


@shared_task(bind=True, base=ReliableTask, name="demo.record")
def record(self: ReliableTask, token: str, sleep: float = 0.0) -> str:
    """Log one execution of the body under ``token`` (after sleeping ``sleep`` seconds)."""
    if sleep:
        time.sleep(sleep)
    Execution.objects.create(token=token, task_id=self.request.id or "", pid=os.getpid())
    return token


@shared_task(bind=True, base=ReliableTask, name="demo.resumable_record", retry_on_lost=True)
def resumable_record(self: ReliableTask, token: str, sleep: float = 0.0) -> str:
    """``record`` for a task that is safe to re-run after its worker died."""
    if sleep:
        time.sleep(sleep)
    Execution.objects.create(token=token, task_id=self.request.id or "", pid=os.getpid())
    return token


@shared_task(bind=True, base=ReliableTask, name="demo.db_session")
def db_session(self: ReliableTask, token: str) -> int:
    """Log the database server's id of this worker's connection (PostgreSQL and MySQL)."""
    query = "SELECT pg_backend_pid()" if connection.vendor == "postgresql" else (
        "SELECT CONNECTION_ID()")
    with connection.cursor() as cursor:
        cursor.execute(query)
        session_id = int(cursor.fetchone()[0])
    Execution.objects.create(token=token, task_id=self.request.id or "", pid=session_id)
    return session_id


@shared_task(bind=True, base=ReliableTask, name="demo.db_setting")
def db_setting(self: ReliableTask, token: str, name: str) -> str:
    """Log ``<token>:<value>`` of a PostgreSQL setting as this worker's connection sees it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting(%s)", [name])
        value = str(cursor.fetchone()[0])
    Execution.objects.create(token=f"{token}:{value}", task_id=self.request.id or "",
                             pid=os.getpid())
    return value


@shared_task(bind=True, name="demo.plain_record")
def plain_record(self, token: str) -> str:  # noqa: ANN001 - plain Celery task, no ReliableTask
    """The same as ``record`` but a plain Celery task: adopted into the ledger from signals."""
    Execution.objects.create(token=token, task_id=self.request.id or "", pid=os.getpid())
    return token


def append_run(path: str, task_id: str, token: str) -> None:
    """Append ``<task_id> <token> <pid> <unix time>`` to the file at ``path``, atomically.

    One ``os.write`` of one line on a descriptor opened with ``O_APPEND``: concurrent writers
    (every pool process of every worker) never interleave or overwrite each other's lines.
    """
    line = f"{task_id} {token} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@shared_task(bind=True, base=ReliableTask, name="demo.log_run")
def log_run(self: ReliableTask, path: str, token: str) -> str:
    """Log one run of the body to the file at ``path`` (the database is not touched)."""
    append_run(path, self.request.id or "", token)
    return token


@shared_task(bind=True, name="demo.plain_log_run")
def plain_log_run(self, path: str, token: str) -> str:  # noqa: ANN001 - plain Celery task
    """``log_run`` as a plain Celery task; its result goes to django-celery-results."""
    append_run(path, self.request.id or "", token)
    return token


@shared_task(base=ReliableTask, name="demo.noop", ignore_result=True)
def noop() -> None:
    """Do nothing, through the ledger (benchmarks)."""


@shared_task(name="demo.plain_noop", ignore_result=True)
def plain_noop() -> None:
    """Do nothing, as a plain Celery task without a result (benchmarks' baseline)."""


@shared_task(name="demo.plain_noop_result")
def plain_noop_result() -> None:
    """Do nothing, as a plain Celery task whose result django-celery-results stores."""


@shared_task(bind=True, base=ReliableTask, name="demo.spin_record", retry_on_lost=True)
def spin_record(self: ReliableTask, token: str, seconds: float) -> str:
    """Keep the CPU busy for ``seconds`` without yielding, then log one execution.

    Under the gevent and eventlet pools nothing else of the process runs meanwhile, except in
    another OS thread: what the heartbeat needs to hold the lease.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    Execution.objects.create(token=token, task_id=self.request.id or "", pid=os.getpid())
    return token


def _sleep_then_record(task: ReliableTask, token: str, seconds: float) -> str:
    time.sleep(seconds)
    Execution.objects.create(token=token, task_id=task.request.id or "", pid=os.getpid())
    return token


@shared_task(bind=True, base=ReliableTask, name="demo.overrun", time_limit=1.5)
def overrun(self: ReliableTask, token: str, seconds: float) -> str:
    """Sleep ``seconds``, then log one execution; the pool process is killed after 1.5 s."""
    return _sleep_then_record(self, token, seconds)


@shared_task(bind=True, base=ReliableTask, name="demo.overrun_retried", time_limit=1.5,
             retry_for=(TimeLimitExceeded,), max_attempts=2, retry_backoff=0)
def overrun_retried(self: ReliableTask, token: str, seconds: float) -> str:
    """``overrun`` for a task that retries a hard time limit, twice in all."""
    return _sleep_then_record(self, token, seconds)


@shared_task(bind=True, base=ReliableTask, name="demo.soft_overrun", soft_time_limit=1,
             retry_for=(SoftTimeLimitExceeded,), max_attempts=2, retry_backoff=0)
def soft_overrun(self: ReliableTask, token: str, seconds: float) -> str:
    """Sleep ``seconds``; after 1 s Celery raises ``SoftTimeLimitExceeded`` in the body,
    which is retried once."""
    return _sleep_then_record(self, token, seconds)


# --- Celery's own behaviours on ReliableTask (tests/test_celery_behaviour.py) --------------------


@shared_task(base=ReliableTask, name="demo.total")
def total(values: list[int]) -> int:
    """The sum of ``values`` (a chord's body)."""
    return sum(values)


@shared_task(base=ReliableTask, name="demo.boom")
def boom() -> None:
    """Fail once, with an error that is not retried."""
    raise ValueError("boom")


@shared_task(bind=True, base=ReliableTask, name="demo.replaced")
def replaced(self: ReliableTask, shape: str, x: int) -> None:
    """Replace itself (``Task.replace``) with a task, a chain, a group or a chord over ``x``."""
    replacements = {
        "task": lambda: add.s(x, 1),
        "chain": lambda: add.s(x, 1) | add.s(10),
        "group": lambda: group(add.s(x, 1), add.s(x, 2)),
        "chord": lambda: chord([add.s(x, 1), add.s(x, 2)], total.s()),
    }
    raise self.replace(replacements[shape]())


@shared_task(bind=True, name="demo.plain_replaced")
def plain_replaced(self, x: int) -> None:  # noqa: ANN001 - plain Celery task
    """A plain Celery task that replaces itself with the ``ReliableTask`` ``add(x, 1)``."""
    raise self.replace(add.s(x, 1))


@shared_task(bind=True, base=ReliableTask, name="demo.reject_once", acks_late=True)
def reject_once(self: ReliableTask, token: str) -> str:
    """Reject its first delivery with requeue, then log one execution and succeed."""
    if not Execution.objects.filter(token=f"{token}:rejected").exists():
        Execution.objects.create(token=f"{token}:rejected", task_id=self.request.id or "",
                                 pid=os.getpid())
        raise Reject("not yet", requeue=True)
    Execution.objects.create(token=token, task_id=self.request.id or "", pid=os.getpid())
    return token


@shared_task(bind=True, base=ReliableTask, name="demo.retries_by_default")
def retries_by_default(self: ReliableTask, token: str) -> None:
    """Log a run, then ``self.retry()`` for ever: Celery's default ``max_retries`` (3) ends it."""
    Execution.objects.create(token=token, task_id=self.request.id or "", pid=os.getpid())
    raise self.retry(countdown=0)


@shared_task(bind=True, base=ReliableTask, name="demo.retries_once")
def retries_once(self: ReliableTask, token: str) -> int:
    """Log a run; the first run asks for a retry, the second returns the retry count."""
    Execution.objects.create(token=token, task_id=self.request.id or "", pid=os.getpid())
    if not self.request.retries:
        raise self.retry(countdown=0)
    return self.request.retries


@shared_task(bind=True, base=ReliableTask, name="demo.retries_five", max_retries=5)
def retries_five(self: ReliableTask, token: str) -> None:
    """``retries_by_default`` with ``max_retries=5``."""
    Execution.objects.create(token=token, task_id=self.request.id or "", pid=os.getpid())
    raise self.retry(countdown=0)


@shared_task(bind=True, base=ReliableTask, name="demo.spawn")
def spawn(self: ReliableTask, x: int) -> str:
    """Send ``add(x, x)`` from the body; return its task id (a child of this task)."""
    return str(add.delay(x, x).id)


@shared_task(bind=True, base=ReliableTask, name="demo.gives_up")
def gives_up(self: ReliableTask, how: str) -> None:
    """End without an outcome: ``Ignore`` (``how="ignore"``) or ``Reject`` without requeue."""
    if how == "ignore":
        raise Ignore("nothing to do")
    raise Reject("cannot be done", requeue=False)


@shared_task(bind=True, base=ReliableTask, name="demo.span", retry_on_lost=True)
def span(self: ReliableTask, path: str, token: str, seconds: float = 0.0) -> str:
    """Log the start and the end of the body to the file at ``path`` (``<token>:start`` and
    ``<token>:end`` lines, as ``log_run``), sleeping ``seconds`` between: the limits' tests
    read from them how many bodies ran at once and when each started."""
    append_run(path, self.request.id or "", f"{token}:start")
    if seconds:
        time.sleep(seconds)
    append_run(path, self.request.id or "", f"{token}:end")
    return token
