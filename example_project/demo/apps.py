"""The demo app: a few tasks to watch in the admin, and probes the test suite counts."""

from django.apps import AppConfig


class DemoConfig(AppConfig):
    """Demo tasks of the example project."""

    name = "example_project.demo"
    label = "demo"
    default_auto_field = "django.db.models.BigAutoField"
