"""Admin registration of the demo app."""

from django.contrib import admin

from example_project.demo.models import Execution


@admin.register(Execution)
class ExecutionAdmin(admin.ModelAdmin):
    """Read-only list of demo task executions."""

    list_display = ["token", "task_id", "pid", "created_at"]
    search_fields = ["token", "task_id"]
