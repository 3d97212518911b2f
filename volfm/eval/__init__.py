"""volfm.eval."""
