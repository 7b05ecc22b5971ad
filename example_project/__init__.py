"""Example project for reliable_tasks; also the project the test suite runs workers of."""

from example_project.celery import app as celery_app

__all__ = ["celery_app"]
