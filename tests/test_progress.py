"""volfm.utils.progress_bar: a tqdm bar on a terminal, whole lines at a low rate elsewhere (a log file, a pipe)."""
from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from volfm.utils import LineProgress, progress_bar


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_tty_gives_few_whole_lines_for_1000_updates():
    out = io.StringIO()
    bar = progress_bar(total=1000, desc="preprocess", unit="case", file=out)
    assert isinstance(bar, LineProgress)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10, lines  # one per 10 % below 100 %, plus the final line
    assert all(line.startswith("preprocess: ") for line in lines)
    assert lines[-1].startswith("preprocess: 1000/1000 case in ")


def test_not_a_tty_iterates_and_ends_with_one_final_line():
    out = io.StringIO()
    seen = list(progress_bar(range(1000), desc="synth CT", unit="case", file=out))
    assert seen == list(range(1000))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) <= 11
    assert lines[-1].startswith("synth CT: 1000/1000 case in ")
    # unknown length (a generator): only the final line when quick
    out = io.StringIO()
    assert sum(progress_bar((i for i in range(1000)), desc="g", file=out)) == sum(range(1000))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("g: 1000 it in ")


def test_time_rate_limit(monkeypatch):
    """Without a known total a line is printed every ``every_s`` seconds."""
    clock = [0.0]
    monkeypatch.setattr("volfm.utils.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = progress_bar(desc="scan", file=out, every_s=10.0)
    for _ in range(100):
        clock[0] += 1.0
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # t = 10, 20, ..., 100 s, then the final line
    assert lines[0] == "scan: 10 it, 10.0 s" and lines[-1] == "scan: 100 it in 100.0 s"


def test_disable_prints_nothing_but_still_iterates():
    out = io.StringIO()
    assert list(progress_bar(range(5), disable=True, file=out)) == list(range(5))
    bar = progress_bar(total=3, disable=True, file=out)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""
    tty = FakeTTY()
    assert list(progress_bar(range(5), disable=True, file=tty)) == list(range(5))
    assert tty.getvalue() == ""


def test_a_tty_gets_a_tqdm_bar():
    out = FakeTTY()
    bar = progress_bar(range(50), desc="predict", unit="image", file=out)
    assert isinstance(bar, tqdm)
    assert list(bar) == list(range(50))
    assert "\r" in out.getvalue() and "predict" in out.getvalue()


def test_write_and_context_manager(capsys):
    out = io.StringIO()
    with progress_bar(total=2, desc="convert", file=out) as bar:
        bar.update(1)
        bar.write("  failed: case x")
        bar.update(1)
    assert capsys.readouterr().out == "  failed: case x\n"  # like tqdm.write: stdout
    assert out.getvalue().splitlines()[-1].startswith("convert: 2/2 it in ")
    assert not bar.disable


class Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


@pytest.mark.parametrize("stream", [io.StringIO(), object(), Closed()])
def test_streams_that_are_not_terminals(stream):
    assert isinstance(progress_bar(total=1, file=stream), LineProgress)
