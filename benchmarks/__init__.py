"""Benchmarks of reliable_tasks against plain Celery (``python -m benchmarks.run_all``)."""
