"""Shift Django's clock in this process by ``CLOCK_SKEW_SECONDS`` (tests of one clock only).

On ``PYTHONPATH`` this module runs at interpreter start-up, before Django and the app are
imported, and replaces ``django.utils.timezone.now``: everything the app times through Django
(``timezone.now()``) reads a clock that is off by the skew, in this process and in the pool
processes it forks. libfaketime would shift the system clock itself, but under it Python's
timed waits on threads hang, which a Celery worker cannot do without.
"""

import os
from datetime import timedelta

from django.utils import timezone

_skew = timedelta(seconds=float(os.environ["CLOCK_SKEW_SECONDS"]))
_true_now = timezone.now


def _skewed_now():  # noqa: ANN202 - same signature as django.utils.timezone.now
    return _true_now() + _skew


timezone.now = _skewed_now
