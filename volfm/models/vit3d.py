"""3D Vision Transformer encoder (ViT-Tiny/Small/Base with 3D patches).

Input ``x`` is ``(B, C, I, J, K)`` as for :mod:`volfm.models.resnet3d`. The volume is cut into
non-overlapping patches of ``patch_size`` (isotropic ``16`` or anisotropic, e.g. ``(16, 16, 8)``)
by :class:`volfm.models.patch_embed.PatchEmbed3d`; tokens are in (I, J, K) raster order. The
positional embedding is made for ``img_size`` (Merlin's 224x224x160 by default) and is resampled
trilinearly when the input gives another token grid; "learned" is a parameter, "sincos" a fixed
3D sine-cosine table (a non-persistent buffer, rebuilt from the constructor arguments).

Encoder interface (see registry.py): ``forward_features`` -> (B, E, gi, gj, gk) token maps after the
final norm (the CLS token left out); ``forward_intermediates`` -> the token maps of chosen blocks
(4 evenly spaced by default, UNETR-style); ``forward_pooled`` -> (B, E) (CLS token or mean of the
tokens); ``num_features`` = E; ``feature_info`` reduction = the patch size.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from volfm import VolfmError
from volfm.kernels.patch_embed import normalize_patch_size
from volfm.models.patch_embed import PatchEmbed3d
from volfm.models.registry import register_encoder
from volfm.utils import parse_triple

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "ViT3d",
    "VIT_CONFIGS",
    "default_block_indices",
    "interpolate_pos_embed",
    "sincos_pos_embed_3d",
]


def sincos_pos_embed_3d(grid: Sequence[int], embed_dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 3D sine-cosine embedding, (gi*gj*gk, embed_dim) in (i, j, k) raster order.

    embed_dim is split in three equal parts (one per axis), each half sine, half cosine of the
    position times ``temperature ** (-f)`` for f evenly spaced in [0, 1) (MAE's 2D recipe in 3D).
    """
    if embed_dim % 6:
        raise VolfmError(f"sincos positional embedding needs embed_dim divisible by 6 (got {embed_dim})")
    per_axis = embed_dim // 3
    omega = torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis // 2)
    omega = 1.0 / temperature**omega
    coords = torch.meshgrid(*[torch.arange(int(g), dtype=torch.float64) for g in grid], indexing="ij")
    parts = []
    for c in coords:
        out = c.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(out), torch.cos(out)]
    return torch.cat(parts, dim=1).float()


def interpolate_pos_embed(pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Resample a (1, N_old, E) or (N_old, E) grid embedding to ``new_grid`` (trilinear); returns (1, N_new, E)."""
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    pe = pos_embed.reshape(1, *old_grid, -1)
    if old_grid == new_grid:
        return pe.reshape(1, math.prod(new_grid), -1)
    E = pe.shape[-1]
    pe = pe.permute(0, 4, 1, 2, 3)
    pe = F.interpolate(pe.float(), size=new_grid, mode="trilinear", align_corners=False).to(pos_embed.dtype)
    return pe.permute(0, 2, 3, 4, 1).reshape(1, math.prod(new_grid), E)


def default_block_indices(depth: int, n: int = 4) -> list[int]:
    """``n`` evenly spaced block indices ending at the last block (depth 12 -> [2, 5, 8, 11], as UNETR)."""
    return sorted({max((i + 1) * depth // n - 1, 0) for i in range(n)})


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or with p = 0)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise VolfmError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT3d(nn.Module):
    """3D ViT backbone (no classifier) with volfm's encoder interface.

    Args:
        img_size: (I, J, K) the positional embedding is made for; other input sizes (multiples of
            the patch size) resample it trilinearly.
        patch_size: int or (pi, pj, pk).
        in_chans: input channels (1 for CT).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        pos_embed: "learned" (parameter, trunc-normal std 0.02) or "sincos" (fixed 3D table).
        cls_token: prepend a learned CLS token.
        global_pool: "avg" (mean of the patch tokens after the final norm) or "cls" (the CLS token
            after the final norm; needs cls_token=True).
        drop_path_rate: stochastic depth, increasing linearly over the blocks up to this rate.
        grad_checkpointing: recompute each block in the backward pass (training with grad only).
        patch_backend: PatchEmbed3d backend ("auto", "torch" or "triton").
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = (224, 224, 160),
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_embed: str = "learned",
        cls_token: bool = True,
        global_pool: str = "avg",
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        patch_backend: str = "auto",
    ):
        super().__init__()
        if pos_embed not in ("learned", "sincos"):
            raise VolfmError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        if global_pool not in ("avg", "cls"):
            raise VolfmError(f"global_pool must be 'avg' or 'cls', got {global_pool!r}")
        if global_pool == "cls" and not cls_token:
            raise VolfmError("global_pool='cls' needs cls_token=True")
        if depth < 1:
            raise VolfmError(f"depth must be >= 1 (got {depth})")
        self.patch_size: tuple[int, int, int] = normalize_patch_size(patch_size)
        img = parse_triple(img_size, "img_size", integer=True, at_least=1)
        if any(s % p for s, p in zip(img, self.patch_size)):
            raise VolfmError(f"img_size {img} is not divisible by patch_size {self.patch_size}")
        self.img_size: tuple[int, int, int] = img
        self.grid_size: tuple[int, int, int] = tuple(s // p for s, p in zip(img, self.patch_size))  # type: ignore[assignment]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.pos_embed_type = pos_embed
        self.global_pool = global_pool
        self.grad_checkpointing = grad_checkpointing
        self.num_prefix_tokens = 1 if cls_token else 0

        self.patch_embed = PatchEmbed3d(in_chans, embed_dim, self.patch_size, backend=patch_backend)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        n = math.prod(self.grid_size)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
        else:
            self.register_buffer("pos_embed", sincos_pos_embed_3d(self.grid_size, embed_dim).unsqueeze(0), persistent=False)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.num_features = embed_dim
        self.default_indices = default_block_indices(depth)
        # timm-style description of forward_intermediates' (default) outputs; reduction per (I, J, K) axis.
        self.feature_info = [
            {"module": f"blocks.{i}", "num_chs": embed_dim, "reduction": self.patch_size} for i in self.default_indices
        ]
        self._init_weights()

    def _init_weights(self) -> None:
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _check_input(self, x: torch.Tensor) -> tuple[int, int, int]:
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise VolfmError(
                f"ViT3d expects input (B, {self.in_chans}, I, J, K), got shape {tuple(x.shape)}; "
                "add the batch/channel axes or build the encoder with a matching in_chans"
            )
        if any(s % p for s, p in zip(x.shape[2:], self.patch_size)):
            raise VolfmError(
                f"ViT3d input spatial size {tuple(x.shape[2:])} is not divisible by the patch size {self.patch_size}; "
                "pad or crop the volume"
            )
        return tuple(s // p for s, p in zip(x.shape[2:], self.patch_size))  # type: ignore[return-value]

    def pos_embed_for(self, grid: Sequence[int]) -> torch.Tensor:
        """(1, N, E) positional embedding for a token grid (the stored one when ``grid == grid_size``)."""
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        return interpolate_pos_embed(self.pos_embed, self.grid_size, grid)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        grid = self._check_input(x)
        tokens = self.patch_embed(x, pos_embed=self.pos_embed_for(grid).to(x.dtype))
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens, grid

    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def _to_map(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """(B, P + N, E) -> (B, E, gi, gj, gk), prefix (CLS) tokens dropped."""
        t = tokens[:, self.num_prefix_tokens:]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """All tokens after the final norm, (B, P + N, E) (CLS first when present), and the token grid."""
        tokens, grid = self._tokens(x)
        for blk in self.blocks:
            tokens = self._run_block(blk, tokens)
        return self.norm(tokens), grid

    def forward_masked(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """MAE's encoder pass: only the tokens ``keep`` (B, n_keep) (indices into the raster-ordered grid, e.g.
        from :func:`volfm.models.masking.token_mask`) go through the blocks. The patches are embedded by
        :class:`PatchEmbed3d` (Triton kernels or torch, see PatchEmbed3d) with their positional embedding, then the kept ones are
        gathered; returns (B, P + n_keep, E) after the final norm (CLS first when present) and the token grid.
        With every index kept this equals :meth:`forward_tokens`."""
        grid = self._check_input(x)
        tokens = self.patch_embed(x, pos_embed=self.pos_embed_for(grid).to(x.dtype))
        B, N, E = tokens.shape
        if keep.ndim != 2 or keep.shape[0] != B or keep.shape[1] < 1:
            raise VolfmError(f"keep must be (batch {B}, n_keep >= 1) token indices, got shape {tuple(keep.shape)}")
        if int(keep.min()) < 0 or int(keep.max()) >= N:
            raise VolfmError(f"keep indices must lie in [0, {N}) for the token grid {grid}")
        tokens = torch.gather(tokens, 1, keep.to(tokens.device).unsqueeze(-1).expand(B, keep.shape[1], E))
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.to(tokens.dtype).expand(B, -1, -1), tokens], dim=1)
        for blk in self.blocks:
            tokens = self._run_block(blk, tokens)
        return self.norm(tokens), grid

    def forward_intermediates(
        self, x: torch.Tensor, indices: Sequence[int] | None = None, norm: bool = True
    ) -> list[torch.Tensor]:
        """Token maps (B, E, gi, gj, gk) after the blocks ``indices`` (default: 4 evenly spaced, the
        last one included; negative indices count from the end). ``norm`` applies the final
        LayerNorm to each (so the last default map equals ``forward_features``)."""
        idx = self.default_indices if indices is None else [int(i) for i in indices]
        idx = [i + self.depth if i < 0 else i for i in idx]
        if not idx or any(i < 0 or i >= self.depth for i in idx):
            raise VolfmError(f"block indices {indices} out of range for depth {self.depth}")
        wanted = set(idx)
        tokens, grid = self._tokens(x)
        saved = {}
        for i, blk in enumerate(self.blocks[: max(idx) + 1]):
            tokens = self._run_block(blk, tokens)
            if i in wanted:
                saved[i] = self._to_map(self.norm(tokens) if norm else tokens, grid)
        return [saved[i] for i in idx]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E, I/pi, J/pj, K/pk): the patch tokens after the final norm as a map."""
        tokens, grid = self.forward_tokens(x)
        return self._to_map(tokens, grid)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E): the CLS token (global_pool="cls") or the mean of the patch tokens ("avg")."""
        tokens, _ = self.forward_tokens(x)
        if self.global_pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens:].mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(x)


# name -> (embed_dim, depth, num_heads)
VIT_CONFIGS: dict[str, tuple[int, int, int]] = {
    "vit_tiny_3d": (192, 12, 3),
    "vit_small_3d": (384, 12, 6),
    "vit_base_3d": (768, 12, 12),
}


def _factory(name: str, embed_dim: int, depth: int, num_heads: int):
    def build(**kwargs) -> ViT3d:
        cfg = dict(patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        cfg.update(kwargs)
        return ViT3d(**cfg)

    build.__name__ = name
    build.__doc__ = f"3D ViT (E={embed_dim}, depth={depth}, heads={num_heads}, patch 16; see volfm.models.vit3d)."
    return build


for _name, (_e, _d, _h) in VIT_CONFIGS.items():
    register_encoder(_name)(_factory(_name, _e, _d, _h))
