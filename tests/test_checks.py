"""System checks of the app's settings."""

from __future__ import annotations

import pytest

from reliable_tasks.checks import check_settings
from reliable_tasks.conf import SPECS, app_settings


def ids(messages) -> list[str]:
    return [message.id for message in messages]


def test_the_default_settings_pass():
    assert check_settings() == []


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_setting_of_the_wrong_type_is_an_error(settings, name):
    setattr(settings, f"RELIABLE_TASKS_{name}", [])

    messages = check_settings()

    assert ids(messages) == ["reliable_tasks.E001"]
    assert f"RELIABLE_TASKS_{name}" in messages[0].msg


@pytest.mark.parametrize("name", sorted(n for n, spec in SPECS.items() if spec.minimum))
def test_a_setting_below_its_minimum_is_an_error(settings, name):
    setattr(settings, f"RELIABLE_TASKS_{name}", -1)

    assert ids(check_settings()) == ["reliable_tasks.E002"]


def test_settings_are_read_on_access(settings):
    settings.RELIABLE_TASKS_SWEEP_BATCH_SIZE = 7

    assert app_settings.SWEEP_BATCH_SIZE == 7
