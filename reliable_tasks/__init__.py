"""reliable_tasks: Celery tasks that cannot be lost.

The public API is imported lazily so that ``import reliable_tasks`` works before Django's app
registry is ready (for example from a Celery app module or a settings file).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0.dev0"

_PUBLIC_NAMES = {
    "dispatch": "reliable_tasks.outbox",
    "dispatch_many": "reliable_tasks.outbox",
    "retry": "reliable_tasks.ledger",
    "ReliableTask": "reliable_tasks.execution",
    "TaskState": "reliable_tasks.states",
}

__all__ = sorted(_PUBLIC_NAMES)


def __getattr__(name: str) -> Any:
    module_path = _PUBLIC_NAMES.get(name)
    if module_path is None:
        raise AttributeError(f"module 'reliable_tasks' has no attribute {name!r}")
    return getattr(import_module(module_path), name)
