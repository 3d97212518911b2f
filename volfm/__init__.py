"""volfm: 3D CT/MRI/PET foundation-model toolkit."""

__version__ = "0.1.0"


class VolfmError(ValueError):
    """A user-facing error: its message names the file or case, what is wrong and what to do."""
