"""Test-wide settings: Triton kernels run under the interpreter on CPU (set before any kernel is defined)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
