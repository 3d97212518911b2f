"""volfm.tasks."""
