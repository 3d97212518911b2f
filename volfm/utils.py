"""Small helpers shared by every room of volfm (root rank: only the standard library and ``volfm.VolfmError``).

- :func:`is_number`: a finite real number that is not a bool.
- :func:`parse_triple` / :func:`parse_triple_text`: a value (a number or 3 numbers) or a text
  (``"2x2x3"``, ``"2,2,3"``, ``"96"``) -> a 3-tuple, one value per spatial axis.
- :func:`did_you_mean`: the ``" (did you mean 'x'?)"`` hint of an error about an unknown name.
"""
from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Mapping

from volfm import VolfmError

__all__ = ["is_number", "parse_triple", "parse_triple_text", "did_you_mean"]


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
