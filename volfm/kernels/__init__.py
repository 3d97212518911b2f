"""volfm.kernels."""
