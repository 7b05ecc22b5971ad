"""Run Celery's own integration tests with plain Celery and with ``ReliableTask``, and compare.

Usage (from the repository root, with the project's venv)::

    python -m tools.celery_integration [--runs plain,reliable]
        [--tests test_tasks.py,test_canvas.py] [-k EXPR] [--timeout 180] [--run-timeout 5400]
        [--no-reruns]
    python -m tools.celery_integration --report-only   # report again on the latest runs

Steps:

1. Download the sdist of the installed Celery version into ``var/celery-integration/`` (kept for
   the next time) and extract it: its integration tests are ``celery-<v>/t/integration/``.
2. Create the venv ``var/celery-integration/venv`` (Python 3.11) with this project installed in
   editable mode, a PostgreSQL driver, and the test tools at the versions Celery's
   ``requirements/`` pin (pytest, pytest-timeout, pytest-rerunfailures, pydantic). The project's
   own ``.venv`` is not touched.
3. For each run: a fresh database ``celery_it_<run>`` on the PostgreSQL server at
   ``127.0.0.1:5432`` (migrated), a private ``redis-server`` on a free loopback port, then pytest
   in the extracted sdist with ``tools.celery_integration_plugin``. The ``reliable`` run sets
   ``task_cls`` of the test apps to ``ReliableTask``; the ``plain`` run keeps Celery's default
   (with Django configured in both, Celery's Django fix-up makes that ``DjangoTask``).
4. Count the ledger's rows per state after each run.
5. Print the per-file counts of each run and the tests whose outcome differs, and write them to
   ``var/celery-integration/report.json``. Each run's files (pytest log, JUnit XML, the plugin's
   JSON lines) stay in ``var/celery-integration/runs/<run>/``.

Celery's ``flaky`` tests are rerun by pytest-rerunfailures (up to 5 times on a timeout or
connection error, as Celery's conftest says); the last attempt decides, and the report counts
the reruns of each run. ``--no-reruns`` runs each test once (a faster, harsher measurement).

The exit status is 0 whatever the tests do (this is a measuring tool); it is non-zero only when
the harness itself could not do its job (no venv, no database, pytest unable to run, a run whose
session app has the wrong task class).
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = REPO_ROOT / "var" / "celery-integration"
VENV_DIR = WORK_DIR / "venv"
REPORT_PATH = WORK_DIR / "report.json"
POSTGRES_SERVER_URL = "postgres://postgres@127.0.0.1:5432"
RELIABLE_TASK_CLS = "reliable_tasks.execution:ReliableTask"
RELIABLE_TASK_CLASS_NAME = "reliable_tasks.execution.ReliableTask"
#: Run name -> ``task_cls`` of the test apps (None: Celery's default).
RUNS: dict[str, str | None] = {"plain": None, "reliable": RELIABLE_TASK_CLS}
DEFAULT_TESTS = ("test_tasks.py", "test_canvas.py")
#: Test tools the integration suite needs, installed at the versions Celery pins when it does.
TEST_TOOLS = ("pytest", "pytest-timeout", "pytest-rerunfailures", "pydantic")
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "not run")
FAILING = frozenset({"failed", "error", "not run"})
#: pytest exit codes that mean it could not run the tests at all (interrupted, internal error,
#: usage error).
BROKEN_EXIT_CODES = frozenset({2, 3, 4})
#: Inherited variables that would change what a run measures.
DROPPED_ENV = frozenset({
    "DATABASE_URL", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "NO_WORKER", "TEST_BROKER",
    "TEST_BACKEND", "REDIS_HOST", "REDIS_PORT", "REDIS_URL", "REDIS_SENTINELS",
    "REDBEAT_LOCK_KEY", "DJANGO_SETTINGS_MODULE", "PYTEST_ADDOPTS", "PYTEST_PLUGINS",
})
DROPPED_ENV_PREFIXES = ("RELIABLE_TASKS_", "CELERY_")


class HarnessError(RuntimeError):
    """The harness could not measure (as opposed to tests failing)."""


@dataclass
class TestOutcome:
    """The outcome of one test in one run and the first line of its error, if any."""

    outcome: str
    message: str = ""
    reruns: int = 0


@dataclass
class RunResult:
    """What one run measured."""

    name: str
    task_cls: str | None
    database_url: str
    selection: list[str]
    keyword: str | None
    reruns_enabled: bool
    #: The commit of the repository and the files of the app that differed from it at the start.
    source: dict[str, Any]
    exit_code: int | None
    timed_out: bool
    duration: float
    task_class_chain: list[str]
    tests: dict[str, TestOutcome]
    ledger_table: str = ""
    ledger_states: dict[str, int] = field(default_factory=dict)
    ledger_adopted: int = 0

    @property
    def started_rows(self) -> int:
        """Ledger rows left in the STARTED state after the run."""
        return self.ledger_states.get("STARTED", 0)


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.celery_integration",
        description="Celery's integration tests, plain vs ReliableTask, compared test by test.",
    )
    parser.add_argument("--runs", default=",".join(RUNS), type=_csv,
                        help="comma-separated runs among plain,reliable (default: both)")
    parser.add_argument("--tests", default=",".join(DEFAULT_TESTS), type=_csv,
                        help="comma-separated files of t/integration/ (default: %(default)s)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="per-test timeout in seconds (pytest-timeout; default: %(default)s)")
    parser.add_argument("--run-timeout", type=float, default=5400.0,
                        help="limit of one pytest run in seconds (default: %(default)s)")
    parser.add_argument("--no-reruns", action="store_true",
                        help="disable pytest-rerunfailures (Celery's flaky tests run once)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report again on the latest runs (files and databases)")
    args = parser.parse_args(argv)
    unknown = [run for run in args.runs if run not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose among {', '.join(RUNS)}")
    return args


def _csv(text: str) -> list[str]:
    """Split a comma-separated argument, dropping empty items."""
    return [item.strip() for item in text.split(",") if item.strip()]


# --- Celery's sdist -------------------------------------------------------------------------------


def celery_version() -> str:
    """The version of Celery installed in this (the project's) Python."""
    return metadata.version("celery")


def fetch_sdist(version: str) -> Path:
    """Download (unless present) and extract Celery's sdist; return the extracted directory."""
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    archive = WORK_DIR / f"celery-{version}.tar.gz"
    if not archive.exists():
        print(f"downloading the sdist of celery {version}", flush=True)
        _check_call([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
                     "--no-deps", f"celery=={version}", "--dest", str(WORK_DIR)],
                    log=WORK_DIR / "download.log")
    source = WORK_DIR / f"celery-{version}"
    if not (source / "t" / "integration" / "conftest.py").exists():
        with tarfile.open(archive) as tar:
            tar.extractall(WORK_DIR, filter="data")
    if not (source / "t" / "integration" / "conftest.py").exists():
        raise HarnessError(f"{archive} holds no t/integration/conftest.py")
    return source


# --- the integration venv -------------------------------------------------------------------------


def find_python311() -> str:
    """A Python 3.11 interpreter: ``python3.11`` on PATH, else one of pyenv's."""
    candidates = [shutil.which("python3.11") or ""]
    candidates += sorted(map(str, Path.home().glob(".pyenv/versions/3.11*/bin/python3.11")))
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.executable)"],
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 and probe.stdout.strip():
            return probe.stdout.strip()
    raise HarnessError("no Python 3.11 found (python3.11 on PATH or ~/.pyenv/versions/3.11*)")


def pinned_test_tools(source: Path) -> list[str]:
    """``TEST_TOOLS`` as Celery's ``requirements/*.txt`` pin them (``name==version``)."""
    pins: dict[str, str] = {}
    for path in sorted((source / "requirements").rglob("*.txt")):
        for line in path.read_text().splitlines():
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([\w.]+)", line.strip())
            if match:
                pins.setdefault(match.group(1).lower(), match.group(0))
    return [pins.get(name, name) for name in TEST_TOOLS]


def project_requirements() -> list[str]:
    """pip arguments installing this project (editable) with what it needs for PostgreSQL.

    The ``postgres`` extra when ``setup.cfg`` has one; else the ``demo`` extra (which brings
    ``dj-database-url``, read by the example settings) and ``psycopg[binary]``.
    """
    config = configparser.RawConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    extras = set(config.options("options.extras_require"))
    if "postgres" in extras:
        return ["-e", f"{REPO_ROOT}[postgres]"]
    return ["-e", f"{REPO_ROOT}[demo]", "psycopg[binary]>=3.1"]


def ensure_venv(source: Path, version: str) -> Path:
    """Create or update the integration venv; return its Python.

    A stamp records what was installed (the requirements and a hash of the project's packaging
    files): an unchanged stamp skips pip.
    """
    requirements = [*project_requirements(), f"celery=={version}", *pinned_test_tools(source)]
    stamp_text = json.dumps({"requirements": requirements, "packaging": _packaging_hash()})
    python = VENV_DIR / "bin" / "python"
    stamp = VENV_DIR / ".celery-integration-stamp"
    if python.exists() and stamp.exists() and stamp.read_text() == stamp_text:
        return python
    if not python.exists():
        print(f"creating {VENV_DIR}", flush=True)
        _check_call([find_python311(), "-m", "venv", str(VENV_DIR)], log=WORK_DIR / "venv.log")
    print(f"installing into {VENV_DIR}: {' '.join(requirements)}", flush=True)
    _check_call([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
                log=WORK_DIR / "venv.log")
    _check_call([str(python), "-m", "pip", "install", "--quiet", *requirements],
                log=WORK_DIR / "venv.log")
    stamp.write_text(stamp_text)
    return python


def _packaging_hash() -> str:
    """A hash of the files that decide what ``pip install -e`` of the project installs."""
    digest = hashlib.sha256()
    for name in ("setup.cfg", "pyproject.toml"):
        path = REPO_ROOT / name
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()


# --- processes ------------------------------------------------------------------------------------


def _check_call(argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None,
                cwd: Path | None = None, timeout: float = 1800) -> None:
    """Run ``argv`` with its output appended to ``log``; raise HarnessError if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        completed = subprocess.run(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, cwd=cwd, timeout=timeout)
    if completed.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise HarnessError(f"{argv[0]} ... failed ({completed.returncode}); {log} ends:\n{tail}")


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, leaving it unreaped (its PID and group stay ours)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for child ``pid`` to exit (unreaped); return whether it did."""
    deadline = time.monotonic() + timeout
    while not _exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def run_in_own_session(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, log: Path,
                       timeout: float) -> int | None:
    """Run ``argv`` in a new session, output to ``log``; return its exit code, None on timeout.

    Past ``timeout`` it gets SIGTERM, then SIGKILL. Whatever it forked and left behind (its
    process group, ours while the leader is unreaped) is SIGKILLed before the leader is reaped.
    """
    with log.open("wb") as out:
        process = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        finished = _wait_exited(process.pid, timeout)
        if not finished:
            os.killpg(process.pid, signal.SIGTERM)
            _wait_exited(process.pid, 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return process.returncode if finished else None


# --- one run --------------------------------------------------------------------------------------


def django_environment(venv_python: Path, database_url: str) -> dict[str, str]:
    """This process' environment less what would skew a measurement, set for Django and the
    venv's Python, on the database ``database_url``."""
    env = {
        name: value for name, value in os.environ.items()
        if name not in DROPPED_ENV and not name.startswith(DROPPED_ENV_PREFIXES)
    }
    env.update({
        "PATH": f"{venv_python.parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "DATABASE_URL": database_url,
    })
    return env


def run_environment(*, venv_python: Path, redis_url: str, redis_port: int, database_url: str,
                    task_cls: str | None, results: Path) -> dict[str, str]:
    """The environment of a run's commands: Django's, the private Redis, the plugin's files."""
    env = django_environment(venv_python, database_url)
    env.update({
        # The example project's own app and RedBeat use the private server too.
        "REDIS_URL": redis_url,
        "TEST_BROKER": redis_url,
        "TEST_BACKEND": redis_url,
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(redis_port),
        "CELERY_IT_RESULTS": str(results),
    })
    if task_cls:
        env["CELERY_IT_TASK_CLS"] = task_cls
    return env


def pytest_command(venv_python: Path, tests: Sequence[str], *, keyword: str | None,
                   timeout: float, reruns: bool, junit: Path) -> list[str]:
    """The pytest command line of a run (to be run in the extracted sdist)."""
    argv = [str(venv_python), "-m", "pytest", *(f"t/integration/{name}" for name in tests)]
    argv += ["-p", "celery.contrib.pytest", "-p", "tools.celery_integration_plugin"]
    argv += ["-p", "no:cacheprovider", f"--junitxml={junit}", f"--timeout={timeout:g}"]
    argv += ["--timeout-method=signal", "-v", "--tb=short", "-rfE"]
    argv += [] if reruns else ["-p", "no:rerunfailures"]
    return argv + (["-k", keyword] if keyword else [])


def measure(name: str, *, source: Path, venv_python: Path, tests: Sequence[str],
            keyword: str | None, timeout: float, run_timeout: float, reruns: bool) -> RunResult:
    """Run the tests once as ``name`` on a fresh database and Redis; return what it measured."""
    from example_project.devservers import RedisServer

    run_dir = WORK_DIR / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    database_url = f"{POSTGRES_SERVER_URL}/celery_it_{name}"
    _check_call([str(venv_python), "-m", "tools.celery_integration_db", "recreate", database_url],
                log=run_dir / "setup.log", cwd=REPO_ROOT)
    with RedisServer() as redis_server:
        env = run_environment(venv_python=venv_python, redis_url=redis_server.url,
                              redis_port=redis_server.port, database_url=database_url,
                              task_cls=RUNS[name], results=run_dir / "results.jsonl")
        _check_call([str(venv_python), "manage.py", "migrate", "--noinput"], env=env,
                    cwd=REPO_ROOT, log=run_dir / "setup.log")
        print(f"[{name}] pytest running; log: {run_dir / 'pytest.log'}", flush=True)
        code_state, started = source_state(), time.monotonic()
        exit_code = run_in_own_session(
            pytest_command(venv_python, tests, keyword=keyword, timeout=timeout,
                           reruns=reruns, junit=run_dir / "junit.xml"),
            env=env, cwd=source, log=run_dir / "pytest.log", timeout=run_timeout)
    run_info = {"source": code_state, "exit_code": exit_code,
                "duration": round(time.monotonic() - started, 1), "database_url": database_url,
                "selection": list(tests), "keyword": keyword, "reruns_enabled": reruns}
    (run_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    return load_run(name, venv_python)


def source_state() -> dict[str, Any]:
    """The repository's commit and the uncommitted files of the code a run imports."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=60).stdout.strip()

    changed = git("status", "--porcelain", "--", "reliable_tasks", "example_project", "tools")
    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted": [line[3:] for line in changed.splitlines()]}


def load_run(name: str, venv_python: Path) -> RunResult:
    """What the latest run ``name`` measured: its files in ``runs/<name>/`` and its database."""
    run_dir = WORK_DIR / "runs" / name
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError) as exc:
        raise HarnessError(f"no complete {name!r} run in {run_dir}: {exc}") from exc
    records = read_records(run_dir / "results.jsonl")
    result = RunResult(
        name=name, task_cls=RUNS[name], database_url=info["database_url"],
        selection=info["selection"], keyword=info["keyword"],
        reruns_enabled=info["reruns_enabled"], source=info["source"], exit_code=info["exit_code"],
        timed_out=info["exit_code"] is None, duration=info["duration"],
        task_class_chain=_task_class_chain(records), tests=classify(records))
    check_run(result, records, run_dir / "pytest.log")
    ledger = json.loads(_output([str(venv_python), "-m", "tools.celery_integration_db", "states"],
                                env=django_environment(venv_python, result.database_url),
                                cwd=REPO_ROOT))
    result.ledger_table, result.ledger_states = ledger["table"], ledger["states"]
    result.ledger_adopted = ledger["adopted"]
    return result


def _output(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path) -> str:
    """The standard output of ``argv``; raise HarnessError if it fails."""
    completed = subprocess.run(list(argv), capture_output=True, text=True, env=dict(env), cwd=cwd,
                               stdin=subprocess.DEVNULL, timeout=300)
    if completed.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed:\n{completed.stderr[-3000:]}")
    return completed.stdout


def check_run(result: RunResult, records: Sequence[Mapping[str, Any]], log: Path) -> None:
    """Raise HarnessError if pytest could not run, or the session app's task class is wrong."""
    collected = any(record["kind"] == "collected" for record in records)
    if result.exit_code in BROKEN_EXIT_CODES or (not collected and not result.timed_out):
        tail = log.read_text(errors="replace")[-3000:]
        raise HarnessError(f"[{result.name}] pytest exited {result.exit_code}; log ends:\n{tail}")
    if not result.task_class_chain:
        return  # no test used the session app (all deselected, say): nothing to check
    reliable = RELIABLE_TASK_CLASS_NAME in result.task_class_chain
    if reliable != (result.task_cls is not None):
        raise HarnessError(
            f"[{result.name}] the session app's task classes are {result.task_class_chain}")


# --- results --------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines the plugin wrote (none if it wrote nothing); a torn last line is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def _task_class_chain(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The session app's task class chain the plugin recorded (empty if it recorded none)."""
    chains = [record["task_class_chain"] for record in records if record["kind"] == "meta"]
    return list(chains[-1]) if chains else []


def classify(records: Iterable[Mapping[str, Any]]) -> dict[str, TestOutcome]:
    """One outcome per collected test from the plugin's reports.

    A teardown report ends an attempt (subtest reports may come before its setup report: they
    are logged live, the rest by pytest-rerunfailures once the attempt is over). Only the last
    attempt counts: the plugin reran the others, whose number is ``reruns``. A failed setup is
    an ``error``; a failed call or subtest makes the test ``failed``; a failed teardown of an
    otherwise passing test is an ``error``. A test collected but never reported (the run was
    killed) is ``not run``.
    """
    collected: list[str] = []
    attempts: dict[str, list[list[Mapping[str, Any]]]] = defaultdict(list)
    for record in records:
        if record["kind"] == "collected":
            collected = list(record["nodeids"])
        elif record["kind"] == "report":
            runs = attempts[record["nodeid"]]
            if not runs or runs[-1][-1]["when"] == "teardown":
                runs.append([])
            runs[-1].append(record)
    nodeids = collected + [nodeid for nodeid in attempts if nodeid not in collected]
    outcomes = {}
    for nodeid in nodeids:
        runs = attempts.get(nodeid) or [[]]
        outcomes[nodeid] = _outcome(runs[-1])
        outcomes[nodeid].reruns = len(runs) - 1
    return outcomes


def _outcome(reports: Sequence[Mapping[str, Any]]) -> TestOutcome:
    """The outcome of one attempt of a test from its reports, in the order pytest made them."""
    phases: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for report in reports:
        phases[report["when"]].append(report)
    for when, verdict in (("setup", "error"), ("call", "failed"), ("teardown", "error")):
        failed = [report for report in phases[when] if report["outcome"] in ("failed", "rerun")]
        if failed:
            return TestOutcome(verdict, failed[0]["message"])
    for report in phases["setup"] + phases["call"]:
        if report["outcome"] == "skipped":
            return TestOutcome("xfailed" if report["wasxfail"] else "skipped")
    calls = [report for report in phases["call"] if not report["subtest"]]
    if calls and calls[-1]["outcome"] == "passed":
        return TestOutcome("xpassed" if calls[-1]["wasxfail"] else "passed")
    return TestOutcome("not run")


def file_of(nodeid: str) -> str:
    """The file name of a node id (``t/integration/test_tasks.py::...`` -> ``test_tasks.py``)."""
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


def counts_by_file(tests: Mapping[str, TestOutcome]) -> dict[str, dict[str, int]]:
    """Per test file, the number of tests of each outcome (every outcome listed, zeros too)."""
    counters: dict[str, Counter[str]] = defaultdict(Counter)
    for nodeid, test in tests.items():
        counters[file_of(nodeid)][test.outcome] += 1
    return {name: {outcome: counter[outcome] for outcome in OUTCOMES}
            for name, counter in sorted(counters.items())}


def other_differences(plain: RunResult, reliable: RunResult) -> list[dict[str, str]]:
    """Tests whose outcome differs between the runs but not as a pass in one, fail in the other
    (passed vs skipped, xfailed vs xpassed, a test only one run has...)."""
    differing = []
    for nodeid in list(plain.tests) + [n for n in reliable.tests if n not in plain.tests]:
        outcomes = [run.tests[nodeid].outcome if nodeid in run.tests else "absent"
                    for run in (plain, reliable)]
        if outcomes[0] != outcomes[1] and not (
                "passed" in outcomes and set(outcomes) & FAILING):
            differing.append({"test": nodeid, "plain": outcomes[0], "reliable": outcomes[1]})
    return differing


def differences(base: RunResult, other: RunResult) -> list[dict[str, str]]:
    """Tests that pass in ``base`` and fail (or error, or did not run) in ``other``."""
    return [
        {"test": nodeid, "outcome": other.tests[nodeid].outcome,
         "message": other.tests[nodeid].message}
        for nodeid, test in base.tests.items()
        if test.outcome == "passed" and nodeid in other.tests
        and other.tests[nodeid].outcome in FAILING
    ]


# --- report ---------------------------------------------------------------------------------------


def build_report(version: str, results: Sequence[RunResult]) -> dict[str, Any]:
    """The JSON-ready report: per run its counts, ledger and outcomes; the differences."""
    runs = {}
    for result in results:
        data = asdict(result)
        data["counts"] = counts_by_file(result.tests)
        data["started_rows"] = result.started_rows
        runs[result.name] = data
    report: dict[str, Any] = {"celery_version": version, "runs": runs}
    by_name = {result.name: result for result in results}
    if {"plain", "reliable"} <= by_name.keys():
        plain, reliable = by_name["plain"], by_name["reliable"]
        report["pass_plain_fail_reliable"] = differences(plain, reliable)
        report["pass_reliable_fail_plain"] = differences(reliable, plain)
        report["other_differences"] = other_differences(plain, reliable)
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The report as text: counts per file and run, differences, ledger states."""
    totals: Counter[str] = Counter()
    for run in report["runs"].values():
        for counts in run["counts"].values():
            totals.update(counts)
    shown = [o for o in OUTCOMES if o in ("passed", "failed", "error", "skipped") or totals[o]]
    first = next(iter(report["runs"].values()))
    keyword = f" -k {first['keyword']!r}" if first["keyword"] else ""
    lines = [f"Celery {report['celery_version']} integration tests: "
             f"{', '.join(first['selection'])}{keyword}", ""]
    lines.append(f"{'file':<22}{'run':<10}" + "".join(f"{o:>9}" for o in shown))
    files = sorted({name for run in report["runs"].values() for name in run["counts"]})
    for name in files:
        for run_name, run in report["runs"].items():
            counts = run["counts"].get(name, dict.fromkeys(OUTCOMES, 0))
            lines.append(f"{name:<22}{run_name:<10}" + "".join(f"{counts[o]:>9}" for o in shown))
    for key, title in (("pass_plain_fail_reliable", "Pass in plain, fail in reliable"),
                       ("pass_reliable_fail_plain", "Pass in reliable, fail in plain")):
        if key in report:
            lines += ["", f"{title}: {len(report[key])}"]
            lines += [f"  {d['test']} [{d['outcome']}] {d['message']}" for d in report[key]]
    if "other_differences" in report:
        lines += ["", f"Other differences (plain -> reliable): {len(report['other_differences'])}"]
        lines += [f"  {d['test']} {d['plain']} -> {d['reliable']}"
                  for d in report["other_differences"]]
    lines.append("")
    for run_name, run in report["runs"].items():
        note = " (run timed out)" if run["timed_out"] else ""
        reruns = [test["reruns"] for test in run["tests"].values() if test["reruns"]]
        note += (f"; {sum(reruns)} reruns in {len(reruns)} tests" if run["reruns_enabled"]
                 else "; reruns disabled")
        dirty = " + uncommitted changes" if run["source"]["uncommitted"] else ""
        lines.append(f"[{run_name}] at {run['source']['commit'][:10]}{dirty}: "
                     f"pytest exit {run['exit_code']} in {run['duration']:.0f} s"
                     f"{note}; {run['ledger_table']} by state: {run['ledger_states']} "
                     f"({run['ledger_adopted']} adopted); "
                     f"STARTED rows left: {run['started_rows']}")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the harness; 0 unless the harness itself broke."""
    args = parse_args(argv)
    try:
        version = celery_version()
        source = fetch_sdist(version)
        missing = [name for name in args.tests if not (source / "t/integration" / name).exists()]
        if missing:
            raise HarnessError(f"no such files in {source / 't/integration'}: {missing}")
        venv_python = ensure_venv(source, version)
        results = [
            load_run(name, venv_python) if args.report_only else
            measure(name, source=source, venv_python=venv_python, tests=args.tests,
                    keyword=args.keyword, timeout=args.timeout, run_timeout=args.run_timeout,
                    reruns=not args.no_reruns)
            for name in args.runs
        ]
    except (HarnessError, subprocess.SubprocessError, OSError) as exc:
        print(f"celery_integration: {exc}", file=sys.stderr)
        return 2
    report = build_report(version, results)
    REPORT_PATH.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"\nreport: {REPORT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
