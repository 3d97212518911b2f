"""3D patch embedding (non-overlapping Conv3d with kernel == stride) as an implicit GEMM.

Two implementations with the same numbers (up to float rounding):

* :func:`patch_embed_torch` -- the reference and CPU path: reshape/permute the volume into
  (B, N, K) patches and apply ``F.linear``.
* :func:`patch_embed_triton` -- fused Triton kernels wrapped in :class:`PatchEmbedFunction`.
  The forward kernel reads the (B, C, D, H, W) volume directly through computed strides
  (no im2col / permute copy is materialised), multiplies by the projection weight with fp32
  accumulation and adds bias and the optional positional embedding in the epilogue.

Shapes and layout conventions (shared by both paths):

* ``x``: (B, C, D, H, W), with D, H, W divisible by the patch size (pd, ph, pw).
* ``weight``: (E, C, pd, ph, pw) (an ``nn.Conv3d`` weight) or the same flattened to (E, K),
  K = C * pd * ph * pw in Conv3d order (c, kd, kh, kw).
* ``bias``: (E,) or None; ``pos_embed``: (N, E) or (1, N, E) or None, broadcast over batch.
* result: (B, N, E), N = (D/pd) * (H/ph) * (W/pw) tokens in (d, h, w) raster order.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from volfm.utils import parse_triple

try:  # Triton is optional: the torch path must work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "PatchEmbedFunction",
    "normalize_patch_size",
    "patch_embed_torch",
    "patch_embed_triton",
    "triton_interpret_enabled",
    "triton_usable",
]

PatchSize = int | Sequence[int]


def triton_interpret_enabled() -> bool:
    """Whether Triton kernels run under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Decided once, like triton.jit does when the kernels below are defined.
_INTERPRET = triton_interpret_enabled()


def triton_usable(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on tensors of ``device``."""
    device = torch.device(device)
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _INTERPRET


def normalize_patch_size(patch_size: PatchSize) -> tuple[int, int, int]:
    """``patch_size`` (one size or 3) as 3 positive ints; a VolfmError (a ValueError) otherwise."""
    return parse_triple(patch_size, "patch_size", integer=True, at_least=1)  # type: ignore[return-value]


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, patch_size: PatchSize):
    """Validate shapes; return (patch, grid, E, K)."""
    if x.dim() != 5:
        raise ValueError(f"expected input of shape (B, C, D, H, W), got {tuple(x.shape)}")
    pd, ph, pw = normalize_patch_size(patch_size)
    B, C, D, H, W = x.shape
    if D % pd or H % ph or W % pw:
        raise ValueError(
            f"input spatial size {(D, H, W)} is not divisible by patch size {(pd, ph, pw)}; "
            "pad or crop the volume first"
        )
    K = C * pd * ph * pw
    E = weight.shape[0]
    if weight.dim() == 5:
        if tuple(weight.shape[1:]) != (C, pd, ph, pw):
            raise ValueError(
                f"weight shape {tuple(weight.shape)} does not match (E, C, pd, ph, pw) = (E, {C}, {pd}, {ph}, {pw})"
            )
    elif weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match (E, C*pd*ph*pw) = (E, {K})")
    return (pd, ph, pw), (D // pd, H // ph, W // pw), E, K


def _pos_2d(pos_embed: torch.Tensor | None, N: int, E: int) -> torch.Tensor | None:
    if pos_embed is None:
        return None
    if pos_embed.dim() == 3 and pos_embed.shape[0] == 1:
        pos_embed = pos_embed[0]
    if tuple(pos_embed.shape) != (N, E):
        raise ValueError(f"pos_embed shape {tuple(pos_embed.shape)} must be (N, E) or (1, N, E) = ({N}, {E})")
    return pos_embed


def patch_embed_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: PatchSize,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference patch embedding: reshape/permute into patches + ``F.linear``. Returns (B, N, E)."""
    (pd, ph, pw), (gd, gh, gw), E, K = _check_shapes(x, weight, patch_size)
    B, C = x.shape[:2]
    N = gd * gh * gw
    patches = (
        x.reshape(B, C, gd, pd, gh, ph, gw, pw)
        .permute(0, 2, 4, 6, 1, 3, 5, 7)
        .reshape(B, N, K)
    )
    out = F.linear(patches, weight.reshape(E, K).to(x.dtype), None if bias is None else bias.to(x.dtype))
    pos = _pos_2d(pos_embed, N, E)
    if pos is not None:
        out = out + pos.to(out.dtype).unsqueeze(0)
    return out


if HAS_TRITON:

    # Hopper-oriented candidates (H100/H200); under the interpreter a single small config.
    if _INTERPRET:
        _FWD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1)]
        _BWD_W_CONFIGS = [triton.Config({"BLOCK_E": 16, "BLOCK_K": 16, "BLOCK_M": 16}, num_warps=1)]
        _BWD_X_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_E": 16}, num_warps=1)]
    else:  # pragma: no cover - needs a GPU
        _FWD_CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [
                (128, 256, 64, 8, 3),
                (256, 128, 64, 8, 3),
                (128, 128, 64, 8, 4),
                (128, 128, 64, 4, 4),
                (128, 128, 32, 4, 4),
                (64, 256, 64, 4, 4),
                (128, 64, 64, 4, 4),
                (64, 128, 64, 4, 4),
                (64, 64, 64, 4, 3),
            ]
        ]
        _BWD_W_CONFIGS = [
            triton.Config({"BLOCK_E": be, "BLOCK_K": bk, "BLOCK_M": bm}, num_warps=w, num_stages=s)
            for be, bk, bm, w, s in [
                (128, 128, 64, 8, 3),
                (128, 256, 64, 8, 3),
                (128, 128, 64, 4, 4),
                (128, 128, 32, 4, 4),
                (64, 128, 64, 4, 4),
                (64, 64, 64, 4, 3),
            ]
        ]
        _BWD_X_CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_E": be}, num_warps=w, num_stages=s)
            for bm, bk, be, w, s in [
                (128, 128, 64, 8, 3),
                (128, 256, 64, 8, 3),
                (256, 128, 64, 8, 3),
                (128, 128, 64, 4, 4),
                (64, 128, 64, 4, 4),
                (64, 64, 64, 4, 3),
            ]
        ]

    @triton.jit
    def _token_offsets(offs_m, NTOK, GH, GW, sxb, sxd, sxh, sxw, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
        """Element offset of each token's first voxel: token m -> (b, d, h, w) patch origin."""
        m = offs_m.to(tl.int64)
        b = m // NTOK
        n = m % NTOK
        gd = n // (GH * GW)
        r = n % (GH * GW)
        gh = r // GW
        gw = r % GW
        return b * sxb + gd * (PD * sxd) + gh * (PH * sxh) + gw * (PW * sxw)

    @triton.jit
    def _k_offsets(offs_k, sxc, sxd, sxh, sxw, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
        """Element offset of each patch entry: k -> (c, kd, kh, kw) in Conv3d weight order."""
        k = offs_k.to(tl.int64)
        c = k // (PD * PH * PW)
        r = k % (PD * PH * PW)
        kd = r // (PH * PW)
        r2 = r % (PH * PW)
        kh = r2 // PW
        kw = r2 % PW
        return c * sxc + kd * sxd + kh * sxh + kw * sxw

    @triton.autotune(configs=_FWD_CONFIGS, key=["M", "E", "K"])
    @triton.jit
    def _patch_embed_fwd(
        x_ptr, w_ptr, b_ptr, pos_ptr, out_ptr,
        M, E, K, NTOK, GH, GW,
        sxb, sxc, sxd, sxh, sxw,
        swe, swk,
        spn, spe,
        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """out[m, e] = sum_k x[im2col(m, k)] * w[e, k] + bias[e] + pos[m % NTOK, e]."""
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(E, BLOCK_N)
        # Grouped ordering: consecutive programs share weight tiles / volume rows in L2.
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < E
        row = _token_offsets(offs_m, NTOK, GH, GW, sxb, sxd, sxh, sxw, PD, PH, PW)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            col = _k_offsets(offs_k, sxc, sxd, sxh, sxw, PD, PH, PW)
            a = tl.load(x_ptr + row[:, None] + col[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(
                w_ptr + offs_n[None, :] * swe + offs_k[:, None] * swk,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += bias[None, :]
        if HAS_POS:
            n_idx = offs_m % NTOK
            pos = tl.load(
                pos_ptr + n_idx[:, None] * spn + offs_n[None, :] * spe,
                mask=mask_m[:, None] & mask_n[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += pos
        out_offs = offs_m.to(tl.int64)[:, None] * E + offs_n[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.autotune(configs=_BWD_W_CONFIGS, key=["M", "E", "K"])
    @triton.jit
    def _patch_embed_bwd_w(
        x_ptr, dy_ptr, dw_ptr, db_ptr,
        M, E, K, NTOK, GH, GW,
        sxb, sxc, sxd, sxh, sxw,
        sdym, sdye,
        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """dw[e, k] = sum_m dy[m, e] * x[im2col(m, k)] (fp32); db[e] = sum_m dy[m, e] fused."""
        pid_e = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_e = offs_e < E
        mask_k = offs_k < K
        col = _k_offsets(offs_k, sxc, sxd, sxh, sxw, PD, PH, PW)

        acc = tl.zeros((BLOCK_E, BLOCK_K), dtype=tl.float32)
        db = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            row = _token_offsets(offs_m, NTOK, GH, GW, sxb, sxd, sxh, sxw, PD, PH, PW)
            dyt = tl.load(
                dy_ptr + offs_m.to(tl.int64)[None, :] * sdym + offs_e[:, None] * sdye,
                mask=mask_e[:, None] & mask_m[None, :],
                other=0.0,
            )
            a = tl.load(x_ptr + row[:, None] + col[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(dyt, a, acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                db += tl.sum(dyt.to(tl.float32), axis=1)

        tl.store(dw_ptr + offs_e[:, None] * K + offs_k[None, :], acc, mask=mask_e[:, None] & mask_k[None, :])
        if HAS_BIAS:
            # Every K-column of programs computes the same sum; only the first writes it.
            first_k = (tl.zeros((BLOCK_E,), dtype=tl.int32) + pid_k) == 0
            tl.store(db_ptr + offs_e, db, mask=mask_e & first_k)

    @triton.autotune(configs=_BWD_X_CONFIGS, key=["M", "E", "K"])
    @triton.jit
    def _patch_embed_bwd_x(
        dy_ptr, w_ptr, dx_ptr,
        M, E, K, NTOK, GH, GW,
        sxb, sxc, sxd, sxh, sxw,
        sdym, sdye,
        swe, swk,
        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """dx[im2col(m, k)] = sum_e dy[m, e] * w[e, k]; patches do not overlap, so plain stores."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_k = offs_k < K

        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < E
            dy = tl.load(
                dy_ptr + offs_m.to(tl.int64)[:, None] * sdym + offs_e[None, :] * sdye,
                mask=mask_m[:, None] & mask_e[None, :],
                other=0.0,
            )
            w = tl.load(
                w_ptr + offs_e[:, None] * swe + offs_k[None, :] * swk,
                mask=mask_e[:, None] & mask_k[None, :],
                other=0.0,
            )
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)

        row = _token_offsets(offs_m, NTOK, GH, GW, sxb, sxd, sxh, sxw, PD, PH, PW)
        col = _k_offsets(offs_k, sxc, sxd, sxh, sxw, PD, PH, PW)
        tl.store(
            dx_ptr + row[:, None] + col[None, :],
            acc.to(dx_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_k[None, :],
        )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul setting so "triton" and "torch" give the same numbers;
    # the option is ignored for fp16/bf16 (and by the interpreter).
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _require_triton(x: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("the 'triton' patch-embed backend needs the triton package; use backend='torch'")
    if not triton_usable(x.device):
        raise RuntimeError(
            f"the 'triton' patch-embed backend runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set "
            f"before volfm.kernels is imported); got a tensor on {x.device}. Use backend='torch' or 'auto'."
        )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the 'triton' patch-embed backend supports float32/float16/bfloat16, got {x.dtype}")


class PatchEmbedFunction(torch.autograd.Function):
    """Autograd wrapper around the fused Triton kernels.

    forward(x (B, C, D, H, W), weight (E, K) in x.dtype, bias (E,) or None, pos (N, E) or None,
    patch (pd, ph, pw)) -> (B, N, E) in x.dtype.
    Backward: grad x (Triton, scattered per patch), grad weight + grad bias (one Triton kernel,
    bias grad fused as a row sum of the same dy tiles), grad pos (torch sum over batch).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pos, patch):
        pd, ph, pw = patch
        B, C, D, H, W = x.shape
        gd, gh, gw = D // pd, H // ph, W // pw
        N = gd * gh * gw
        E, K = weight.shape
        M = B * N
        out = torch.empty((B, N, E), device=x.device, dtype=x.dtype)
        if M > 0 and E > 0:
            sx = x.stride()
            dummy = out  # placeholder pointer for absent bias / pos (never read)
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(E, meta["BLOCK_N"]),)  # noqa: E731
            _patch_embed_fwd[grid](
                x, weight, bias if bias is not None else dummy, pos if pos is not None else dummy, out,
                M, E, K, N, gh, gw,
                sx[0], sx[1], sx[2], sx[3], sx[4],
                weight.stride(0), weight.stride(1),
                pos.stride(0) if pos is not None else 0, pos.stride(1) if pos is not None else 0,
                PD=pd, PH=ph, PW=pw,
                HAS_BIAS=bias is not None, HAS_POS=pos is not None, DOT_PRECISION=_dot_precision(x.dtype),
            )
        ctx.save_for_backward(x, weight)
        ctx.patch = patch
        ctx.grid = (gd, gh, gw)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.pos_dtype = None if pos is None else pos.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        pd, ph, pw = ctx.patch
        gd, gh, gw = ctx.grid
        B = x.shape[0]
        N = gd * gh * gw
        E, K = weight.shape
        M = B * N
        need_x, need_w, need_b, need_pos = ctx.needs_input_grad[:4]
        dy = grad_out.reshape(M, E)
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        prec = _dot_precision(x.dtype)
        sx = x.stride()
        grad_x = grad_w = grad_b = grad_pos = None

        if need_x:
            grad_x = torch.empty_like(x)  # every voxel belongs to exactly one patch: fully written
            if M > 0 and K > 0:
                if E == 0:
                    grad_x.zero_()
                else:
                    sdx = grad_x.stride()
                    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))  # noqa: E731
                    _patch_embed_bwd_x[grid](
                        dy, weight, grad_x,
                        M, E, K, N, gh, gw,
                        sdx[0], sdx[1], sdx[2], sdx[3], sdx[4],
                        dy.stride(0), dy.stride(1),
                        weight.stride(0), weight.stride(1),
                        PD=pd, PH=ph, PW=pw, DOT_PRECISION=prec,
                    )

        if need_w or (need_b and ctx.has_bias):
            dw = torch.zeros((E, K), device=x.device, dtype=torch.float32)
            db = torch.zeros((E,), device=x.device, dtype=torch.float32)
            if M > 0 and E > 0 and K > 0:
                grid = lambda meta: (triton.cdiv(E, meta["BLOCK_E"]), triton.cdiv(K, meta["BLOCK_K"]))  # noqa: E731
                _patch_embed_bwd_w[grid](
                    x, dy, dw, db,
                    M, E, K, N, gh, gw,
                    sx[0], sx[1], sx[2], sx[3], sx[4],
                    dy.stride(0), dy.stride(1),
                    PD=pd, PH=ph, PW=pw, HAS_BIAS=ctx.has_bias, DOT_PRECISION=prec,
                )
            if need_w:
                grad_w = dw.to(weight.dtype)
            if need_b and ctx.has_bias:
                grad_b = db.to(ctx.bias_dtype)

        if need_pos and ctx.pos_dtype is not None:
            grad_pos = grad_out.reshape(B, N, E).sum(0, dtype=torch.float32).to(ctx.pos_dtype)

        return grad_x, grad_w, grad_b, grad_pos, None


def patch_embed_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: PatchSize,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused Triton patch embedding; same contract as :func:`patch_embed_torch`."""
    patch, (gd, gh, gw), E, K = _check_shapes(x, weight, patch_size)
    _require_triton(x)
    pos = _pos_2d(pos_embed, gd * gh * gw, E)
    w2d = weight.reshape(E, K).to(x.dtype)  # differentiable view/cast: grads flow to the 5D parameter
    return PatchEmbedFunction.apply(x, w2d, bias, pos, patch)
