"""Helpers shared by the `volfm bench ...` benchmarks: argument types, quiet imports, timing, scratch
folders and the results file."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from volfm import VolfmError
from volfm.utils import parse_triple_text

__all__ = ["counts_arg", "floats_arg", "ints_arg", "json_dict_arg", "mean_sd", "names_arg", "parse_skip", "quiet_import",
           "quiet_lightning", "scratch_dir", "seeds_arg", "timed", "write_results"]


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


def counts_arg(text):
    """argparse type: labelled-case counts like ``1,2,5,all`` (ints >= 1 or ``all``)."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == "all":
            out.append("all")
            continue
        try:
            k = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected counts like 1,2,5,all, got {text!r}") from None
        if k < 1:
            raise argparse.ArgumentTypeError(f"counts must be >= 1 (or 'all'), got {k}")
        out.append(k)
    if not out:
        raise argparse.ArgumentTypeError(f"expected counts like 1,2,5,all, got {text!r}")
    return out


def seeds_arg(text):
    """argparse type: distinct seeds >= 0 like ``0,1,2``."""
    try:
        out = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0 or 0,1,2, got {text!r}") from None
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0 like 0,1,2, got {text!r}")
    return out


def names_arg(text):
    """argparse type: comma-separated organ names."""
    out = [s.strip() for s in str(text).split(",") if s.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected organ names like spleen or liver,spleen, got {text!r}")
    return out


def json_dict_arg(text):
    """argparse type: a JSON object (e.g. encoder kwargs)."""
    try:
        v = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"in_chans\": 1}}', got {text!r}")
    return v


@contextlib.contextmanager
def quiet_lightning():
    """Lightning's info lines, its data-loader hints and the task's set-up prints off; warnings stay on stderr."""
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*(number of training batches|log_every_n_steps).*")
            warnings.filterwarnings("ignore", message=r".*[Cc]heckpoint.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # Lightning 2.6 on torch >= 2.10
            with contextlib.redirect_stdout(buf):
                yield buf
    finally:
        log.setLevel(level)


def mean_sd(values) -> dict:
    """``{mean, sd (sample), n}`` of the values that are not None."""
    vals = [v for v in values if v is not None]
    return {"mean": statistics.fmean(vals) if vals else None,
            "sd": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}
