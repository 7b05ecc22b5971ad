"""Searching the ledger by task id (whole or its first characters) without a table scan.

The changelist shows the first eight characters of each id. Where ids compare by their hex digits
from left to right (PostgreSQL's ``uuid``; the ``char(32)`` of SQLite and MySQL), a prefix is
turned into the range of ids it covers, which the primary key index serves (a ``LIKE`` on the id
cast to text would read the whole table). MariaDB's native ``uuid`` type orders ids otherwise,
so there the prefix is matched with ``LIKE``.
"""

from __future__ import annotations

import re
import uuid

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Q

_HEX_DIGITS = 32
_ID_PREFIX = re.compile(r"[0-9a-f]{1,32}")
#: Where the canonical form of a UUID has its hyphens, counted in hex digits.
_HYPHENS_AFTER = (8, 12, 16, 20)


def id_prefix(term: str) -> str | None:
    """The hex digits of ``term`` when it can start a task id (hyphens and case ignored)."""
    digits = term.strip().lower().replace("-", "")
    return digits if _ID_PREFIX.fullmatch(digits) else None


def id_prefix_range(digits: str) -> tuple[uuid.UUID, uuid.UUID]:
    """The lowest and the highest UUID whose hex digits start with ``digits``."""
    missing = _HEX_DIGITS - len(digits)
    return uuid.UUID(digits + "0" * missing), uuid.UUID(digits + "f" * missing)


def hyphenated(digits: str) -> str:
    """``digits`` as the start of a UUID's canonical text (``abcdef0123`` -> ``abcdef01-23``)."""
    parts, start = [], 0
    for end in (*_HYPHENS_AFTER, _HEX_DIGITS):
        if start >= len(digits):
            break
        parts.append(digits[start:end])
        start = end
    return "-".join(parts)


def ids_compare_as_hex(connection: BaseDatabaseWrapper) -> bool:
    """Whether the database orders UUIDs by their hex digits, left to right."""
    return connection.vendor == "postgresql" or not connection.features.has_native_uuid_field


def task_search_query(term: str, connection: BaseDatabaseWrapper) -> Q:
    """Rows whose id starts with ``term``, whose task name contains it, or whose unique,
    concurrency or rate key is ``term``."""
    query = (Q(task_name__icontains=term) | Q(unique_key=term) | Q(concurrency_key=term)
             | Q(rate_key=term))
    digits = id_prefix(term)
    if digits is None:
        return query
    if ids_compare_as_hex(connection):
        return query | Q(id__range=id_prefix_range(digits))
    return query | Q(id__startswith=hyphenated(digits))
