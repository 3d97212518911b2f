"""Helpers shared by the `volfm bench ...` benchmarks: argument types, quiet imports, timing, scratch
folders and the results file."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from volfm import VolfmError
from volfm.utils import parse_triple_text

__all__ = ["ints_arg", "floats_arg", "parse_skip", "quiet_import", "timed", "scratch_dir", "write_results"]


def ints_arg(text) -> list[int]:
    """argparse type: 3 sizes >= 2 as ``512,512,300`` or ``512x512x300`` (one number: all three axes)."""
    try:
        return list(parse_triple_text(text, "sizes", integer=True, at_least=2))
    except VolfmError:
        raise argparse.ArgumentTypeError(f"expected 3 sizes >= 2 like 512,512,300, got {text!r}") from None


def floats_arg(text) -> list[float]:
    """argparse type: 3 positive numbers as ``1.5,1.5,3.0`` or ``1.5x1.5x3`` (one number: all three axes)."""
    try:
        return list(parse_triple_text(text, "numbers", above=0))
    except VolfmError:
        raise argparse.ArgumentTypeError(f"expected 3 positive numbers like 1.5,1.5,3.0, got {text!r}") from None


def parse_skip(text: str) -> set[str]:
    """``"sitk, MONAI"`` -> ``{"sitk", "monai"}``: the lower-cased names of a comma-separated ``--skip``."""
    return {s.strip().lower() for s in str(text).split(",") if s.strip()}


def quiet_import(*modules: str) -> None:
    """Import peers up front so their import-time chatter does not land inside the table (missing ones are skipped)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for m in modules:
            try:
                importlib.import_module(m)
            except ImportError:
                pass


def timed(fn: Callable, repeats: int, warmup: int = 1):
    """``(median seconds, [seconds of each run], last result)`` of ``repeats`` calls of ``fn`` after
    ``warmup`` untimed calls (whose output is swallowed)."""
    for _ in range(warmup):  # first-call chatter (e.g. MONAI's reader registration) stays out of the table
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            res = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, res


@contextlib.contextmanager
def scratch_dir(out, prefix: str) -> Iterator[Path]:
    """The folder ``out`` (created if needed), or with ``out=None`` a new temporary folder that is
    removed afterwards."""
    owned = out is None
    root = Path(tempfile.mkdtemp(prefix=prefix)) if owned else Path(out)
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield root
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)


def write_results(path, doc: dict) -> None:
    """A benchmark's results as JSON (numpy scalars as floats), and where they went."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2, default=float))
    print(f"results: {path}")
