"""volfm.data."""
