"""The ``/metrics`` view: Prometheus' text format, for staff sessions or a bearer token."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from django.utils.crypto import constant_time_compare
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from reliable_tasks.conf import app_settings


def may_read_metrics(request: HttpRequest) -> bool:
    """Whether ``request`` comes from an active staff user, or carries the metrics token.

    The token is ``RELIABLE_TASKS_METRICS_TOKEN``, sent as ``Authorization: Bearer <token>``
    and compared in constant time. Without the setting, only staff sessions may read.
    """
    token = app_settings.METRICS_TOKEN
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and constant_time_compare(given.strip(), token):
            return True
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


@never_cache
@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    """The app's metrics (``reliable_tasks.metrics``), read from the database now; else 403."""
    if not may_read_metrics(request):
        return HttpResponseForbidden(
            "Metrics are for staff users, or for a bearer token set in "
            "RELIABLE_TASKS_METRICS_TOKEN.\n", content_type="text/plain; charset=utf-8")
    try:
        from prometheus_client.exposition import choose_encoder
    except ImportError as exc:
        raise ImproperlyConfigured(
            "The metrics view needs prometheus-client: pip install "
            "'django-reliable-tasks[metrics]'.") from exc
    from reliable_tasks.metrics import registry

    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(registry()), content_type=content_type)
