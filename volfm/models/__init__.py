"""volfm.models."""
