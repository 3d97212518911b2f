"""volfm.preprocess."""
