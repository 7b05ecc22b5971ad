"""The admin's form of a ``PeriodicSchedule``.

The task is chosen from the tasks registered with the project's Celery app (Celery's own
``celery.*`` tasks left out), the time zone from the IANA zones; args, kwargs and options are JSON.
All validation is the model's (``PeriodicSchedule.full_clean``): its errors show on their fields.
"""

from __future__ import annotations

import zoneinfo
from functools import cache
from typing import Any

from django import forms
from django.conf import settings
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from reliable_tasks.celery_app import get_celery_app
from reliable_tasks.models import PeriodicSchedule

#: Task names that are Celery's internals, never offered.
INTERNAL_TASK_PREFIX = "celery."

_imported_apps: set[int] = set()


def task_choices(current: str = "") -> list[tuple[str, str]]:
    """The registered task names, sorted; ``current`` stays offered even if it is gone.

    A web process knows only the tasks its code imported: the project's task modules are
    imported once first, as a worker would (``app.loader.import_default_modules()``).
    """
    app = get_celery_app()
    if id(app) not in _imported_apps:
        _imported_apps.add(id(app))
        app.loader.import_default_modules()
    names = sorted(name for name in app.tasks if not name.startswith(INTERNAL_TASK_PREFIX))
    if current and current not in names:
        names.insert(0, current)  # the model's validator says it is not registered
    return [("", "---------"), *((name, name) for name in names)]


@cache
def _zone_names() -> tuple[str, ...]:
    return tuple(sorted(zoneinfo.available_timezones()))


def timezone_choices(current: str = "") -> list[tuple[str, str]]:
    """The IANA time zones, after the project's default (an empty value)."""
    names = list(_zone_names())
    if current and current not in names:
        names.insert(0, current)
    default = _("Project default (%(zone)s)") % {"zone": settings.TIME_ZONE}
    return [("", default), *((name, name) for name in names)]


class PeriodicScheduleForm(forms.ModelForm):
    """Add or change a schedule: one timing out of interval, crontab and one-off time."""

    task = forms.ChoiceField(
        label=gettext_lazy("Task"),
        help_text=gettext_lazy("A task registered with the project's Celery app."))
    timezone = forms.ChoiceField(
        label=gettext_lazy("Time zone"), required=False,
        help_text=gettext_lazy("The crontab's IANA time zone."))

    class Meta:
        model = PeriodicSchedule
        fields = ("name", "task", "enabled", "description", "interval_seconds", "crontab",
                  "timezone", "run_at", "catch_up", "args", "kwargs", "options")
        widgets = {
            "description": forms.Textarea(attrs={"rows": 2}),
            "args": forms.Textarea(attrs={"rows": 2, "cols": 60}),
            "kwargs": forms.Textarea(attrs={"rows": 3, "cols": 60}),
            "options": forms.Textarea(attrs={"rows": 2, "cols": 60}),
        }
        help_texts = {
            "args": gettext_lazy('Positional arguments, a JSON list: [1, "a"].'),
            "kwargs": gettext_lazy('Keyword arguments, a JSON object: {"x": 1}.'),
            "options": gettext_lazy('Publish options, a JSON object with queue, priority and '
                                    'expires: {"queue": "low"}.'),
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        task, zone = self.fields["task"], self.fields["timezone"]
        assert isinstance(task, forms.ChoiceField) and isinstance(zone, forms.ChoiceField)
        task.choices = task_choices(self.instance.task or "")
        zone.choices = timezone_choices(self.instance.timezone or "")

    def clean_args(self) -> Any:
        """An empty field is no arguments."""
        value = self.cleaned_data.get("args")
        return [] if value is None else value

    def clean_kwargs(self) -> Any:
        """An empty field is no keyword arguments."""
        value = self.cleaned_data.get("kwargs")
        return {} if value is None else value

    def clean_options(self) -> Any:
        """An empty field is no options."""
        value = self.cleaned_data.get("options")
        return {} if value is None else value
