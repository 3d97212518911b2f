"""The error and warning classes of volfm.io's readers, in a module of their own so that every reader module
(``readers``, ``multiframe``) can raise them without importing another; import them from :mod:`volfm.io`."""
from __future__ import annotations

from volfm import VolfmError


class VolumeReadError(VolfmError):
    """An image that cannot be read; the message is one line naming the file and what to do."""


class GeometryWarning(UserWarning):
    pass


def one_line(text) -> str:
    """Collapse a (library) message onto one line: VolumeReadError messages are single-line."""
    return " ".join(str(text).split())
