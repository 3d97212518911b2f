"""volfm.bench."""
