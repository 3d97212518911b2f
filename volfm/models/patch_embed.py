"""PatchEmbed3d: non-overlapping 3D patch embedding with a torch or a fused Triton backend."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from volfm.kernels.patch_embed import (
    choose_backend,
    compute_dtype,
    normalize_patch_size,
    patch_embed_torch,
    patch_embed_triton,
    triton_usable,
)

__all__ = ["PatchEmbed3d", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")


class PatchEmbed3d(nn.Module):
    """(B, C, D, H, W) -> (B, N, E) tokens in (d, h, w) raster order.

    Equivalent to ``nn.Conv3d(in_chans, embed_dim, kernel_size=patch, stride=patch)`` followed by
    ``flatten(2).transpose(1, 2)``. Parameters are stored Conv3d-shaped (``weight`` (E, C, pd, ph, pw),
    ``bias`` (E,)), so an ``nn.Conv3d`` state dict loads directly; timm-style keys
    (``proj.weight`` / ``proj.bias``) are accepted too.

    backend: "torch" (reshape + F.linear, the reference), "triton" (fused kernels; CUDA, or CPU with
    TRITON_INTERPRET=1), "auto" (:func:`volfm.kernels.patch_embed.choose_backend`: the kernels only on CUDA,
    only when the GEMM runs in bf16/fp16 -- bf16 inputs, or fp32 inputs under ``torch.autocast`` as in
    ``precision: bf16-mixed`` -- and only while ``AUTO_PREFERS_TRITON`` records the kernels measured faster
    than reshape + F.linear on a GPU; torch otherwise, fp32 included).

    Dtypes are the same on both backends: the output is in the compute dtype
    (:func:`volfm.kernels.patch_embed.compute_dtype`: the autocast dtype when autocast is on, else the input's),
    and the parameters' gradients are in the parameters' dtype.
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        patch_size: int | Sequence[int] = 16,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_chans = int(in_chans)
        self.embed_dim = int(embed_dim)
        self.patch_size: tuple[int, int, int] = normalize_patch_size(patch_size)
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(self.embed_dim, self.in_chans, *self.patch_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.embed_dim))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same initialisation as nn.Conv3d.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def grid_size(self, input_shape: Sequence[int]) -> tuple[int, int, int]:
        """Token grid (D/pd, H/ph, W/pw) for an input shape (D, H, W) or (..., D, H, W)."""
        spatial = tuple(int(s) for s in input_shape[-3:])
        if len(spatial) != 3:
            raise ValueError(f"input_shape needs at least 3 (spatial) dims, got {tuple(input_shape)}")
        if any(s % p for s, p in zip(spatial, self.patch_size)):
            raise ValueError(f"input spatial size {spatial} is not divisible by patch size {self.patch_size}")
        return tuple(s // p for s, p in zip(spatial, self.patch_size))  # type: ignore[return-value]

    def num_patches(self, input_shape: Sequence[int]) -> int:
        return math.prod(self.grid_size(input_shape))

    def resolved_backend(self, x: torch.Tensor) -> str:
        """The backend a call with input ``x`` takes ("triton" or "torch"), honouring autocast."""
        if self.backend != "auto":
            return self.backend
        return choose_backend(x.device.type, compute_dtype(x), "auto", triton_ok=triton_usable(x.device))

    def forward(self, x: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, D, H, W), got {tuple(x.shape)}")
        fn = patch_embed_triton if self.resolved_backend(x) == "triton" else patch_embed_torch
        return fn(x, self.weight, self.bias, self.patch_size, pos_embed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("weight", "bias"):
            old = prefix + "proj." + name
            if old in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_chans={self.in_chans}, embed_dim={self.embed_dim}, patch_size={self.patch_size}, "
            f"bias={self.bias is not None}, backend={self.backend!r}"
        )
