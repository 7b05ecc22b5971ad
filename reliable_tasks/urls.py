"""URLs of the app: ``path("", include("reliable_tasks.urls"))`` serves ``/metrics``."""

from __future__ import annotations

from django.urls import path

from reliable_tasks import views

app_name = "reliable_tasks"

urlpatterns = [
    path("metrics", views.metrics, name="metrics"),
]
