"""Settings of the example project.

Environment variables choose the parts, so one codebase runs on a laptop, in CI and against
Sentinel: ``DATABASE_URL`` (SQLite file by default; ``postgres://``, ``mysql://``),
``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), or ``REDIS_SENTINELS`` (comma-separated
``host:port`` of the sentinels) with ``REDIS_MASTER_NAME`` (default ``mymaster``) and the
optional ``REDIS_PASSWORD`` (the master's) and ``REDIS_SENTINEL_PASSWORD`` (the sentinels'):
then the broker and RedBeat go through Sentinel, configured by
``reliable_tasks.sentinel.celery_settings()``, and ``REDIS_URL`` is not used.
"""

import json
import os
from pathlib import Path

import dj_database_url

from reliable_tasks.sentinel import as_django_settings, celery_settings

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("EXAMPLE_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-not-for-production")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "reliable_tasks",
    "example_project.demo",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database_from_env() -> dict:
    default_url = f"sqlite:///{VAR_DIR / 'db.sqlite3'}"
    config = dj_database_url.parse(
        os.environ.get("DATABASE_URL", default_url), conn_max_age=600, conn_health_checks=True
    )
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # Workers are other processes: the test database must be a file they can open too;
        # one per test session, so that two sessions on one machine never share it.
        test_name = Path(config["NAME"]).with_suffix(f".test-{os.getpid()}.sqlite3")
        config["TEST"] = {"NAME": str(test_name)}
        config["OPTIONS"] = {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    elif config["ENGINE"] == "django.db.backends.mysql":
        config["OPTIONS"] = {"charset": "utf8mb4", "isolation_level": "read committed"}
    return config


DATABASES = {"default": _database_from_env()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_SENTINELS = os.environ.get("REDIS_SENTINELS", "")
REDIS_MASTER_NAME = os.environ.get("REDIS_MASTER_NAME") or "mymaster"

# Any RELIABLE_TASKS_<NAME> setting can come from the environment as a JSON literal
# (RELIABLE_TASKS_LEASE_TIMEOUT=3, RELIABLE_TASKS_ADOPT=false): tests and benchmarks tune workers
# that way.
for _name, _value in os.environ.items():
    if _name.startswith("RELIABLE_TASKS_"):
        globals()[_name] = json.loads(_value)

if REDIS_SENTINELS:
    # The broker's URL and transport options and RedBeat's URL and options, as one set
    # (CELERY_BROKER_URL, CELERY_BROKER_TRANSPORT_OPTIONS, CELERY_REDBEAT_REDIS_URL, ...).
    globals().update(as_django_settings(celery_settings(
        REDIS_SENTINELS,
        REDIS_MASTER_NAME,
        password=os.environ.get("REDIS_PASSWORD") or None,
        sentinel_password=os.environ.get("REDIS_SENTINEL_PASSWORD") or None,
    )))
else:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_REDBEAT_REDIS_URL = REDIS_URL

# django-celery-results; CELERY_RESULT_BACKEND in the environment picks another (a redis:// URL).
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "django-db")
CELERY_RESULT_EXTENDED = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "reliable_tasks.beat:ReliableRedBeatScheduler"
CELERY_BEAT_MAX_LOOP_INTERVAL = 5
if os.environ.get("REDBEAT_LOCK_KEY"):  # tests force a second beat past the lock this way
    CELERY_REDBEAT_LOCK_KEY = os.environ["REDBEAT_LOCK_KEY"]

# Django's task framework (django.tasks; the django-tasks backport on Django 5.2) on the ledger.
# Tasks of the "retrying" backend retry FlakyError, three attempts in all, and run again by
# themselves when their worker dies.
TASKS = {
    "default": {
        "BACKEND": "reliable_tasks.backend.ReliableCeleryBackend",
        "QUEUES": ["default", "emails"],
    },
    "retrying": {
        "BACKEND": "reliable_tasks.backend.ReliableCeleryBackend",
        "OPTIONS": {
            "max_attempts": 3,
            "retry_for": ["example_project.demo.django_tasks.FlakyError"],
            "retry_backoff": 0.2,
            "retry_backoff_max": 0.5,
            "retry_on_lost": True,
        },
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"reliable_tasks": {"level": "INFO"}},
}
