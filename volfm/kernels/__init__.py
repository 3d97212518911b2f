"""volfm.kernels: Triton kernels and their pure-torch references.

Note: whether Triton kernels run under the interpreter (TRITON_INTERPRET=1, CPU) is decided when
this package is first imported, as ``triton.jit`` does; set the variable before importing.
"""
from volfm.kernels.patch_embed import (
    HAS_TRITON,
    PatchEmbedFunction,
    normalize_patch_size,
    patch_embed_torch,
    patch_embed_triton,
    triton_interpret_enabled,
    triton_usable,
)

__all__ = [
    "HAS_TRITON",
    "PatchEmbedFunction",
    "normalize_patch_size",
    "patch_embed_torch",
    "patch_embed_triton",
    "triton_interpret_enabled",
    "triton_usable",
]
