"""What ``make demo`` runs: the example project with Redis, a worker, beat and the admin.

``python -m example_project.run_demo`` migrates the database, makes sure Redis answers at
``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``; if nothing answers there it starts its own
``redis-server`` on a free loopback port), creates the superuser ``admin`` with a new password,
starts a worker, beat and ``runserver`` on 127.0.0.1 (port ``DEMO_PORT``, default 8000, or the next
free one), prints the admin URL and the credentials, and dispatches the demo tasks. Ctrl-C or
SIGTERM stops everything it started and exits 0.

``--smoke`` does the same, then checks that ``demo.add`` succeeded and that the admin login page
is served, stops everything and exits 0 (1 on any failure): a check that the demo works.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sys
import time
import traceback
import urllib.request
from pathlib import Path
from types import FrameType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from example_project.devservers import (
    LOOPBACK,
    REPO_ROOT,
    CeleryProcess,
    ManagedProcess,
    RedisServer,
)

DEFAULT_REDIS_URL = f"redis://{LOOPBACK}:6379/0"
ADMIN_USERNAME = "admin"
SMOKE_TIMEOUT = 60.0


class _Stopped(BaseException):
    """Raised by the SIGINT and SIGTERM handlers to unwind to the shutdown (like Ctrl-C)."""


class SmokeFailure(Exception):
    """A check of ``--smoke`` failed."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signal.Signals(signum).name)


def redis_answers(url: str) -> bool:
    """Return whether a Redis server answers PING at ``url`` within 2 s."""
    client = redis.Redis.from_url(
        url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    try:
        with client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def first_free_port(start: int, attempts: int = 100) -> int:
    """Return the first port from ``start`` on that can be bound on 127.0.0.1."""
    for port in range(start, start + attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {LOOPBACK} in {start}..{start + attempts - 1}")


def reset_admin_password() -> str:
    """Create the superuser ``admin`` or reset its password; return the new password."""
    from django.contrib.auth import get_user_model

    password = secrets.token_urlsafe(12)
    user, _ = get_user_model().objects.get_or_create(
        username=ADMIN_USERNAME, defaults={"email": "admin@example.com"}
    )
    user.is_staff = user.is_superuser = user.is_active = True
    user.set_password(password)
    user.save()
    return password


def dispatch_demo_tasks() -> str:
    """Dispatch ``demo.add(2, 3)``, ``demo.flaky(failures=2)`` and ``demo.always_fails()``.

    Returns the task id of ``demo.add``.
    """
    from example_project.demo.tasks import add, always_fails, flaky

    result = add.delay(2, 3)
    flaky.delay(failures=2)
    always_fails.delay()
    return str(result.id)


def smoke_check(add_task_id: str, admin_url: str) -> None:
    """Wait until ``demo.add`` succeeded, then fetch the admin login page; raise if not."""
    from django_celery_results.models import TaskResult

    deadline = time.monotonic() + SMOKE_TIMEOUT
    while not TaskResult.objects.filter(task_id=add_task_id, status="SUCCESS").exists():
        if time.monotonic() >= deadline:
            raise SmokeFailure(f"demo.add ({add_task_id}) did not succeed in {SMOKE_TIMEOUT:g} s")
        time.sleep(0.5)
    print(f"smoke: demo.add ({add_task_id}) succeeded")

    login_url = f"{admin_url}login/"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    with opener.open(login_url, timeout=10) as response:
        if response.status != 200:
            raise SmokeFailure(f"GET {login_url} answered {response.status}")
    print(f"smoke: GET {login_url} answered 200")


def wait_while_running(processes: list[ManagedProcess]) -> None:
    """Return when one of ``processes`` has exited, after printing the end of its log."""
    while True:
        for process in processes:
            if not process.is_running():
                print(f"{process.name} exited; its log ends with:", file=sys.stderr)
                print(process.log_text()[-3000:], file=sys.stderr)
                return
        time.sleep(1)


def run(smoke: bool, started: list[RedisServer | ManagedProcess]) -> int:
    """Start the demo; append what it starts to ``started`` (the caller stops it all)."""
    redis_url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    redis_origin = "already running"
    if not redis_answers(redis_url):
        server = RedisServer()
        started.append(server)
        server.start()
        print(f"Nothing answers at {redis_url}: started redis-server on {server.url}")
        redis_url, redis_origin = server.url, "started by the demo"
    os.environ["REDIS_URL"] = redis_url  # before Django reads its settings; children inherit it
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

    import django
    from django.conf import settings
    from django.core.management import call_command

    django.setup()
    print("Migrating the database...")
    call_command("migrate", interactive=False, verbosity=0)
    password = reset_admin_password()

    log_dir = Path(settings.VAR_DIR) / "demo-logs" / time.strftime("%Y%m%d-%H%M%S")
    env = {"REDIS_URL": redis_url, "DJANGO_SETTINGS_MODULE": os.environ["DJANGO_SETTINGS_MODULE"]}
    port = first_free_port(int(os.environ.get("DEMO_PORT", "8000")))
    processes: list[ManagedProcess] = [
        CeleryProcess("worker", env, concurrency=2, log_dir=log_dir),
        CeleryProcess("beat", env, log_dir=log_dir),
        ManagedProcess(
            [sys.executable, str(REPO_ROOT / "manage.py"), "runserver", f"{LOOPBACK}:{port}"]
            + ["--noreload"],
            name="runserver",
            env=env,
            log_dir=log_dir,
            ready_pattern=r"Quit the server with",
        ),
    ]
    for process in processes:
        started.append(process)
        print(f"Starting {process.name}...")
        process.start()

    admin_url = f"http://{LOOPBACK}:{port}/admin/"
    print(
        f"\nThe demo is running.\n"
        f"  admin:    {admin_url}\n"
        f"  username: {ADMIN_USERNAME}\n"
        f"  password: {password}\n"
        f"  Redis:    {redis_url} ({redis_origin})\n"
        f"  logs:     {log_dir}\n"
    )
    add_task_id = dispatch_demo_tasks()
    print("Dispatched demo.add(2, 3), demo.flaky(failures=2) and demo.always_fails().")
    if smoke:
        smoke_check(add_task_id, admin_url)
        return 0
    print("Press Ctrl-C to stop.")
    wait_while_running(processes)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the demo until Ctrl-C or SIGTERM (or, with ``--smoke``, until checked); stop it all."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="check the demo works, then stop")
    args = parser.parse_args(argv)

    started: list[RedisServer | ManagedProcess] = []
    signal.signal(signal.SIGINT, _raise_stopped)
    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        status = run(args.smoke, started)
    except _Stopped as stopped:
        print(f"\n{stopped}: stopping.")
        status = 0
    except SmokeFailure as failure:
        print(f"smoke: FAILED: {failure}", file=sys.stderr)
        status = 1
    except Exception:  # any failure becomes an exit status, after the shutdown below
        traceback.print_exc()
        status = 1
    finally:
        # A second Ctrl-C must not cut the shutdown short (every stop is bounded).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for item in reversed(started):
            item.stop()
    print("Stopped everything the demo started.")
    return status


if __name__ == "__main__":
    sys.exit(main())
