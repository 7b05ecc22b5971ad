"""Django application configuration: wiring only, no I/O."""

from django.apps import AppConfig


class ReliableTasksConfig(AppConfig):
    """Connects the app's signal receivers and system checks."""

    name = "reliable_tasks"
    verbose_name = "Reliable tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from reliable_tasks import checks, receivers

        checks.register()
        receivers.connect()
