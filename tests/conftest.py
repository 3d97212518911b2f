"""Test-wide settings: Triton kernels run under the interpreter on CPU (set before any kernel is defined)."""
import importlib.util
import os
from pathlib import Path

import pytest

from volfm.testing import write_study_tree

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def merlin_fakes():
    """tests/merlin_fakes.py (a Merlin-layout state dict and a forward pass written from Merlin's layout), loaded
    by path: with --import-mode=importlib the tests folder is not importable as a package."""
    spec = importlib.util.spec_from_file_location("merlin_fakes", Path(__file__).with_name("merlin_fakes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def dicom_study_tree(tmp_path_factory):
    """(root, uids) of the DICOM study tree volfm.testing.write_study_tree builds (DICOMDIR part, nested folders, a
    localizer, a missing slice, an SR, ...), built once for the scan and the selection tests, which only read it."""
    base = tmp_path_factory.mktemp("dicomtree")
    uids = write_study_tree(base / "root", base / "staging")
    return base / "root", uids
