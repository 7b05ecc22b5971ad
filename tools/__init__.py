"""Developer tools of the repository (not part of the ``reliable_tasks`` package)."""
