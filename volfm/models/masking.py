"""Random masks for masked-image pretraining: 3D blocks of voxels (CNNs) and tokens (ViTs).

Both draw from an explicit ``torch.Generator`` so that a training step's masks depend only on
``(seed, global step, rank)`` (:func:`mask_generator`): every rank masks differently, a resumed run masks as the
uninterrupted one did, and nothing touches the global RNG that data augmentation and dropout use.

Exact ratios: :func:`block_mask` masks ``round(ratio * n_blocks)`` of the ``ceil(size / block)`` blocks of
every sample (so exactly ``ratio`` of the voxels when the size is a multiple of the block); :func:`token_mask`
keeps ``n - round(ratio * n)`` tokens of every sample.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

from volfm import VolfmError
from volfm.utils import parse_triple

__all__ = ["block_mask", "mask_generator", "masked_count", "token_mask"]


def mask_generator(seed: int, step: int, rank: int = 0, stream: str = "mask") -> torch.Generator:
    """A CPU generator seeded from (seed, step, rank, stream): reproducible, distinct per rank and step."""
    key = f"{int(seed)}:{int(step)}:{int(rank)}:{stream}".encode()
    g = torch.Generator(device="cpu")
    g.manual_seed(zlib.crc32(key) | (zlib.adler32(key) << 32))
    return g


def masked_count(n: int, ratio: float) -> int:
    """How many of ``n`` items a ``ratio`` masks: round(ratio * n), at least 1 and at most n - 1 (for n >= 2),
    so that there is always something to reconstruct and something to see."""
    if not 0.0 < float(ratio) < 1.0:
        raise VolfmError(f"mask ratio must be in (0, 1), got {ratio}")
    if n < 2:
        raise VolfmError(f"masking needs at least 2 blocks/tokens per sample, got {n}; use smaller blocks or a "
                         "larger input")
    return min(n - 1, max(1, round(float(ratio) * n)))


def _choose(batch: int, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, n) bool with exactly k True per row, positions uniformly at random."""
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    out = torch.zeros(batch, n, dtype=torch.bool)
    out.scatter_(1, order[:, :k], True)
    return out


def block_mask(batch: int, size: Sequence[int], block: int | Sequence[int], ratio: float,
               generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, 1, I, J, K) bool, True = masked: the volume is tiled by ``block`` (the last block of an axis
    is cut at the border) and ``round(ratio * n_blocks)`` tiles of each sample are masked."""
    size = parse_triple(size, "size", integer=True, at_least=1)
    block = parse_triple(block, "block_size", integer=True, at_least=1)
    grid = tuple(math.ceil(s / b) for s, b in zip(size, block))
    n = math.prod(grid)
    chosen = _choose(int(batch), n, masked_count(n, ratio), generator).reshape(int(batch), 1, *grid)
    up = chosen
    for axis, b in enumerate(block):
        up = up.repeat_interleave(b, dim=2 + axis)
    return up[:, :, : size[0], : size[1], : size[2]].contiguous().to(device)


def token_mask(batch: int, n_tokens: int, ratio: float, generator: torch.Generator,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's random token masking: ``(keep, masked)`` where ``keep`` (batch, n_keep) holds the kept token
    indices of each sample in increasing order and ``masked`` (batch, n_tokens) is True where a token is
    dropped; n_keep = n_tokens - round(ratio * n_tokens)."""
    m = _choose(int(batch), int(n_tokens), masked_count(int(n_tokens), ratio), generator)
    keep = (~m).nonzero()[:, 1].reshape(int(batch), -1)  # row-major: each row's kept indices, ascending
    return keep.to(device), m.to(device)
