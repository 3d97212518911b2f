"""Masked-autoencoder parts for the 3D ViT (He et al., MAE, in 3D): patch <-> voxel layout and the light decoder.

Token order everywhere is :class:`volfm.models.patch_embed.PatchEmbed3d`'s: the (gi, gj, gk) grid in raster order,
and within a patch the values are laid out (pi, pj, pk, C) -- so ``patchify(x)[b, n]`` holds exactly the voxels
the n-th token of ``PatchEmbed3d`` embeds.

The decoder follows MAE: the encoder's visible tokens are projected to ``decoder_dim``, a shared learned mask
token fills the dropped places, a fixed 3D sine-cosine position table is added, a few pre-norm transformer blocks
run over all tokens, and a linear layer predicts every patch's voxels. The loss (``volfm.losses``) counts the
masked tokens only, optionally against per-patch normalised targets (MAE's ``norm_pix_loss``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from volfm import VolfmError
from volfm.models.vit3d import Block, sincos_pos_embed_3d
from volfm.utils import parse_triple

__all__ = ["MAEDecoder", "patchify", "unpatchify"]


def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(B, C, I, J, K) -> (B, N, pi*pj*pk*C), tokens in raster order of the (I/pi, J/pj, K/pk) grid."""
    p = parse_triple(patch_size, "patch_size", integer=True, at_least=1)
    B, C, I, J, K = x.shape
    if I % p[0] or J % p[1] or K % p[2]:
        raise VolfmError(f"input {tuple(x.shape[2:])} is not divisible by the patch size {p}")
    g = (I // p[0], J // p[1], K // p[2])
    x = x.reshape(B, C, g[0], p[0], g[1], p[1], g[2], p[2])
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # B, gi, gj, gk, pi, pj, pk, C
    return x.reshape(B, math.prod(g), math.prod(p) * C)


def unpatchify(tokens: torch.Tensor, patch_size: Sequence[int], grid: Sequence[int], channels: int = 1) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, N, pi*pj*pk*C) -> (B, C, I, J, K)."""
    p = parse_triple(patch_size, "patch_size", integer=True, at_least=1)
    g = parse_triple(grid, "grid", integer=True, at_least=1)
    B = tokens.shape[0]
    if tokens.shape[1] != math.prod(g) or tokens.shape[2] != math.prod(p) * channels:
        raise VolfmError(f"tokens {tuple(tokens.shape)} do not fit grid {g} x patch {p} x {channels} channel(s)")
    x = tokens.reshape(B, *g, *p, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, channels, g[0] * p[0], g[1] * p[1], g[2] * p[2])


class MAEDecoder(nn.Module):
    """MAE's light decoder over the visible tokens of a ViT3d.

    Args:
        embed_dim: the encoder's token width.
        patch_size: the encoder's patch size; ``in_chans`` its input channels (what each token predicts:
            ``prod(patch_size) * in_chans`` values).
        decoder_dim, depth, num_heads, mlp_ratio: the decoder transformer (MAE: 512, 8, 16 for ViT-B/L; volfm's
            default 128, 2, 4 is sized for small CPU runs).
    ``forward(visible, keep, grid)``: ``visible`` (B, P + n_keep, E) the encoder's output (P prefix tokens, e.g.
    CLS, dropped), ``keep`` (B, n_keep) the kept token indices, ``grid`` the token grid -> (B, N, prod(p) * C)
    predictions for every token.
    """

    def __init__(self, embed_dim: int, patch_size: int | Sequence[int], in_chans: int = 1, decoder_dim: int = 128,
                 depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0, num_prefix_tokens: int = 1):
        super().__init__()
        if decoder_dim % 6:
            raise VolfmError(f"MAE decoder_dim must be divisible by 6 (3D sine-cosine positions), got {decoder_dim}")
        self.patch_size = parse_triple(patch_size, "patch_size", integer=True, at_least=1)
        self.in_chans, self.decoder_dim = int(in_chans), int(decoder_dim)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.embed = nn.Linear(int(embed_dim), self.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.decoder_dim))
        self.blocks = nn.ModuleList(Block(self.decoder_dim, int(num_heads), mlp_ratio) for _ in range(int(depth)))
        self.norm = nn.LayerNorm(self.decoder_dim, eps=1e-6)
        self.pred = nn.Linear(self.decoder_dim, math.prod(self.patch_size) * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self._pos: dict[tuple, torch.Tensor] = {}

    def pos_embed(self, grid: Sequence[int], device, dtype) -> torch.Tensor:
        key = (tuple(int(g) for g in grid), str(device), dtype)
        if key not in self._pos:
            self._pos[key] = sincos_pos_embed_3d(key[0], self.decoder_dim).to(device=device, dtype=dtype)[None]
        return self._pos[key]

    def forward(self, visible: torch.Tensor, keep: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        n = math.prod(int(g) for g in grid)
        y = self.embed(visible[:, self.num_prefix_tokens:])
        B, n_keep, D = y.shape
        if keep.shape != (B, n_keep):
            raise VolfmError(f"MAEDecoder: keep indices {tuple(keep.shape)} do not match {n_keep} visible tokens")
        full = self.mask_token.to(y.dtype).expand(B, n, D).clone()
        full.scatter_(1, keep.unsqueeze(-1).expand(B, n_keep, D), y)
        full = full + self.pos_embed(grid, y.device, y.dtype)
        for blk in self.blocks:
            full = blk(full)
        return self.pred(self.norm(full))
