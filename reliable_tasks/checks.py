"""System checks for the app's settings (ids are stable and never reused)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from reliable_tasks.conf import PREFIX, SPECS


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E001: a setting has the wrong type. E002: a setting is below its minimum."""
    messages: list[checks.CheckMessage] = []
    for name, spec in SPECS.items():
        full_name = PREFIX + name
        if not hasattr(settings, full_name):
            continue
        value = getattr(settings, full_name)
        wrong_bool = isinstance(value, bool) and bool not in spec.types
        if wrong_bool or not isinstance(value, spec.types):
            expected = " or ".join(t.__name__ for t in spec.types)
            messages.append(checks.Error(
                f"{full_name} must be {expected}, not {type(value).__name__}.",
                hint=spec.help, id="reliable_tasks.E001"))
        elif spec.minimum is not None and value < spec.minimum:
            messages.append(checks.Error(
                f"{full_name} must be at least {spec.minimum}, not {value!r}.",
                hint=spec.help, id="reliable_tasks.E002"))
    return messages


def register() -> None:
    """Register the app's checks with Django."""
    checks.register(check_settings, "reliable_tasks")
