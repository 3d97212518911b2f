"""volfm.kernels: Triton kernels and their pure-torch references.

Note: whether Triton kernels run under the interpreter (TRITON_INTERPRET=1, CPU) is decided when
this package is first imported, as ``triton.jit`` does; set the variable before importing.
"""
from volfm.kernels import patch_embed as _patch_embed
from volfm.kernels.patch_embed import *  # noqa: F401,F403 - the public names listed in its __all__

__all__ = list(_patch_embed.__all__)
