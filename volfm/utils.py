"""Small helpers shared by every room of volfm (root rank: only the standard library and ``volfm.VolfmError``).

- :func:`is_number`: a finite real number that is not a bool.
- :func:`parse_triple` / :func:`parse_triple_text`: a value (a number or 3 numbers) or a text
  (``"2x2x3"``, ``"2,2,3"``, ``"96"``) -> a 3-tuple, one value per spatial axis.
- :func:`did_you_mean`: the ``" (did you mean 'x'?)"`` hint of an error about an unknown name.
- :func:`progress_bar`: a tqdm bar on a terminal, else (a log file, a pipe) :class:`LineProgress`: a line at most
  every ~10 % or every 30 s, and a final line; no carriage returns.
"""
from __future__ import annotations

import difflib
import math
import numbers
import sys
import time
from collections.abc import Iterable, Mapping

from tqdm import tqdm

from volfm import VolfmError

__all__ = ["is_number", "parse_triple", "parse_triple_text", "did_you_mean", "progress_bar", "LineProgress"]


def is_number(x) -> bool:
    """True for a finite int/float (numpy scalars included); False for bools, NaN/inf and anything else."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _triple_error(value, what: str, integer: bool, above, at_least, error: type[Exception], where: str) -> Exception:
    one, many = ("an integer", "integers") if integer else ("a number", "numbers")
    bound = f" > {above:g}" if above is not None else f" >= {at_least:g}" if at_least is not None else ""
    return error(f"{where}{what} must be {one} or 3 {many}{bound} (one per spatial axis), got {value!r}")


def parse_triple(value, what: str = "value", *, integer: bool = False, above: float | None = None,
                 at_least: float | None = None, error: type[Exception] = VolfmError, where: str = "") -> tuple:
    """``value`` as a 3-tuple, one entry per spatial axis.

    A single number is used for all three axes; otherwise ``value`` must hold exactly 3 finite numbers
    (a list, tuple, array, ...). ``integer=True`` requires whole numbers and returns ints (``96.0`` is
    accepted as 96), else floats are returned. ``above`` / ``at_least``: every entry must be ``> above``
    / ``>= at_least``. Anything else raises ``error`` (default :class:`volfm.VolfmError`) with a one-line
    message naming ``what``, prefixed by ``where`` (e.g. ``"spec.yaml: "``).
    """
    if is_number(value):
        items: tuple = (value, value, value)
    elif isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _triple_error(value, what, integer, above, at_least, error, where)
    else:
        items = tuple(value)
    if len(items) != 3 or not all(is_number(x) for x in items):
        raise _triple_error(value, what, integer, above, at_least, error, where)
    if (integer and not all(float(x).is_integer() for x in items)) \
            or (above is not None and not all(x > above for x in items)) \
            or (at_least is not None and not all(x >= at_least for x in items)):
        raise _triple_error(value, what, integer, above, at_least, error, where)
    return tuple(int(x) for x in items) if integer else tuple(float(x) for x in items)


def parse_triple_text(text, what: str = "value", *, integer: bool = False, above: float | None = None,
                      at_least: float | None = None, error: type[Exception] = VolfmError, where: str = "") -> tuple:
    """A command-line text ``"2x2x3"``, ``"2,2,3"`` or ``"2"`` (all axes) as a 3-tuple, checked as by
    :func:`parse_triple` (same keyword arguments); empty parts (``"2,,2,3"``) are ignored."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise _triple_error(text, what, integer, above, at_least, error, where) from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise _triple_error(text, what, integer, above, at_least, error, where)
    try:
        return parse_triple(values, what, integer=integer, above=above, at_least=at_least, error=error, where=where)
    except error:
        raise _triple_error(text, what, integer, above, at_least, error, where) from None


def did_you_mean(word, choices: Iterable, n: int = 1, cutoff: float = 0.5,
                 template: str = " (did you mean {}?)") -> str:
    """The hint for an unknown ``word``: ``" (did you mean 'x'?)"`` naming up to ``n`` close ``choices``
    (``difflib`` ratio >= ``cutoff``, closest first, quoted and comma-separated), or ``""`` when none is
    close. ``template`` (with one ``{}`` for the names) changes the wording, e.g. ``" Did you mean {}?"``."""
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=cutoff)
    return template.format(", ".join(f"'{c}'" for c in near)) if near else ""


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False,
                 file=None, every_fraction: float = 0.1, every_s: float = 30.0, **tqdm_kwargs):
    """A progress bar for ``iterable`` (or for ``total`` steps counted with ``update``), written to ``file``
    (default ``sys.stderr``).

    On a terminal (``file.isatty()``): a ``tqdm`` bar (``tqdm_kwargs`` go to it). Elsewhere (a log file, a pipe, a
    notebook's stream): a :class:`LineProgress`, which prints whole lines only, at most one per ``every_fraction``
    of ``total`` or per ``every_s`` seconds, and a final line on close. ``disable=True`` prints nothing (as
    ``tqdm(disable=True)``). Either object iterates, counts with ``update(n)``, prints with ``write(text)``, closes
    with ``close()`` and works as a context manager.
    """
    stream = sys.stderr if file is None else file
    if not disable and _is_tty(stream):

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, **tqdm_kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream,
                        every_fraction=every_fraction, every_s=every_s)


class LineProgress:
    """Progress for a log: ``desc: n/total unit (p %), t s`` lines, never carriage returns.

    A line is printed when the count passes the next ``every_fraction`` of ``total`` (not at 100 %: that is the final
    line) or ``every_s`` seconds after the last line; :meth:`close` (also the end of iteration) prints the final
    ``desc: n/total unit in t s``. So 1000 quick steps give at most ``1 / every_fraction`` lines.
    """

    def __init__(self, iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 disable: bool = False, file=None, every_fraction: float = 0.1, every_s: float = 30.0):
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.file = disable, sys.stderr if file is None else file
        self.every_fraction, self.every_s = every_fraction, every_s
        self.n = 0
        self.start_t = self._last_t = time.monotonic()
        self._next_n = self._step_n()
        self._closed = False

    def _step_n(self) -> float:
        """The count at which the next fraction line is due."""
        if not self.total or self.every_fraction <= 0:
            return math.inf
        step = self.every_fraction * self.total
        return (math.floor(self.n / step) + 1) * step

    def _line(self, final: bool) -> str:
        head = f"{self.desc}: " if self.desc else ""
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100.0 * self.n / self.total:.0f} %)" if self.total and not final else ""
        took = time.monotonic() - self.start_t
        return f"{head}{self.n}{of} {self.unit}{pct}{' in' if final else ','} {took:.1f} s"

    def _print(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or self._closed:
            return
        now = time.monotonic()
        due_fraction = self.n >= self._next_n and (self.total is None or self.n < self.total)
        if due_fraction or now - self._last_t >= self.every_s:
            self._print(self._line(final=False))
            self._last_t = now
            self._next_n = self._step_n()

    def __iter__(self):
        if self.iterable is None:
            raise TypeError("LineProgress without an iterable: count with update()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed and not self.disable:
            self._print(self._line(final=True))
        self._closed = True

    def write(self, text: str, file=None) -> None:
        """Print ``text`` as a line (like ``tqdm.write``: stdout unless ``file`` is given)."""
        print(text, file=sys.stdout if file is None else file, flush=True)

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix(self, *args, **kwargs) -> None:
        """Accepted for tqdm compatibility; lines carry no postfix."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
