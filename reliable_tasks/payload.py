"""Task payloads as stored in the ledger: plain JSON that round-trips to what Celery sends.

Celery's JSON serializer (kombu's) carries datetimes, UUIDs and Decimals as tagged objects. The
ledger stores exactly that tagged form, so a re-publish from the database sends the same values
the first publish did.
"""

from __future__ import annotations

import json
from typing import Any

from kombu.utils import json as kombu_json

from reliable_tasks.exceptions import PayloadError


def to_stored(value: Any, what: str) -> Any:
    """Return ``value`` as plain JSON for the ledger; raise ``PayloadError`` if it cannot be."""
    return to_stored_sized(value, what)[0]


def to_stored_sized(value: Any, what: str) -> tuple[Any, int]:
    """``to_stored`` and the size in bytes of the JSON text.

    Values made only of JSON's own types are stored as they are (one ``json.dumps``); others go
    through Celery's serializer, which tags datetimes, UUIDs and Decimals.
    """
    try:
        return value, len(json.dumps(value, separators=(",", ":")))
    except (TypeError, ValueError):
        pass
    try:
        text = kombu_json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{what} must be JSON-serializable: {exc}") from exc
    return json.loads(text), len(text)


def from_stored(value: Any) -> Any:
    """Inverse of ``to_stored``: restore tagged datetimes, UUIDs and Decimals."""
    if not _has_tags(value):
        return value
    return kombu_json.loads(json.dumps(value))


def _has_tags(value: Any) -> bool:
    """Whether ``value`` holds a kombu-tagged object anywhere."""
    if isinstance(value, dict):
        return "__type__" in value or any(_has_tags(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_tags(item) for item in value)
    return False
