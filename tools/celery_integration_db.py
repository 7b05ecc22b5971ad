"""Database chores of ``tools.celery_integration``, run with the integration venv's Python.

``python -m tools.celery_integration_db recreate URL`` drops and creates the database that the
PostgreSQL URL names (connecting to the server's ``postgres`` database);
``python -m tools.celery_integration_db states`` prints, as JSON, the ledger table's name, its
row count per state and its number of adopted rows (recorded from plain Celery's signals), for
the database of ``DATABASE_URL`` (through Django's settings).
"""

from __future__ import annotations

import json
import os
import sys
from urllib.parse import urlsplit, urlunsplit


def recreate_database(url: str) -> None:
    """Drop (closing its connections) and create the database named by ``url``."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name or name == "postgres":
        raise ValueError(f"refusing to recreate the database of {url!r}")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        database = sql.Identifier(name)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(database))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(database))


def ledger_states() -> dict[str, object]:
    """The ledger's table name, its number of rows per state and of adopted rows."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    import django

    django.setup()
    from django.db import connection

    from reliable_tasks.models import TaskRecord

    table = TaskRecord._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT state, count(*) FROM {connection.ops.quote_name(table)} GROUP BY state"
        )
        states = {state: count for state, count in cursor.fetchall()}
    adopted = TaskRecord.objects.filter(adopted=True).count()
    return {"table": table, "states": states, "adopted": adopted}


def main(argv: list[str]) -> int:
    """Run one command (``recreate URL`` or ``states``); return the exit status."""
    if len(argv) == 2 and argv[0] == "recreate":
        recreate_database(argv[1])
        return 0
    if argv == ["states"]:
        print(json.dumps(ledger_states()))
        return 0
    print("usage: python -m tools.celery_integration_db (recreate URL | states)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
