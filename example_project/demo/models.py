"""A log of task body executions, so tests can count runs and duplicates in the database."""

from django.db import models


class Execution(models.Model):
    """One run of a demo task's body."""

    token = models.CharField(max_length=100, db_index=True)
    task_id = models.CharField(max_length=255, blank=True, default="")
    pid = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.token} ({self.task_id})"
