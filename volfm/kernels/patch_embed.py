"""3D patch embedding (non-overlapping Conv3d with kernel == stride) as an implicit GEMM.

Two implementations with the same numbers (up to float rounding):

* :func:`patch_embed_torch` -- the reference and CPU path: reshape/permute the volume into
  (B, N, K) patches and apply ``F.linear``.
* :func:`patch_embed_triton` -- fused Triton kernels wrapped in :class:`PatchEmbedFunction`.
  The forward kernel reads the (B, C, D, H, W) volume directly through its strides (no im2col /
  permute copy is materialised), multiplies by the projection weight with fp32 accumulation and
  adds bias and the optional positional embedding in the epilogue. Backward: one kernel for the
  weight gradient (deterministic split-K over tokens), one for the input gradient (scattered back
  per patch); the bias and positional-embedding gradients are torch sums of ``grad_out``.

Shapes and layout conventions (shared by both paths):

* ``x``: (B, C, D, H, W), with D, H, W divisible by the patch size (pd, ph, pw).
* ``weight``: (E, C, pd, ph, pw) (an ``nn.Conv3d`` weight) or the same flattened to (E, K),
  K = C * pd * ph * pw in Conv3d order (c, kd, kh, kw).
* ``bias``: (E,) or None; ``pos_embed``: (N, E) or (1, N, E) or None, broadcast over batch.
* result: (B, N, E), N = (D/pd) * (H/ph) * (W/pw) tokens in (d, h, w) raster order.

Dtypes (both paths agree): the GEMM runs in :func:`compute_dtype` of ``x``: the autocast dtype when
autocast is on for ``x``'s device (``precision: bf16-mixed`` gives fp32 volumes and parameters under
``torch.autocast(dtype=bfloat16)``), else ``x.dtype``. The result is in that dtype (what ``F.linear``
returns under the same autocast); gradients reach each input in its own dtype (fp32 master weights
get fp32 gradients, accumulated in fp32).

Which path ``backend="auto"`` takes is :func:`choose_backend`: the kernels only on CUDA, only for a
bf16/fp16 compute dtype (never the slow fp32 "ieee" path by default), and only while
:data:`AUTO_PREFERS_TRITON` records that the kernels were measured faster than reshape + ``F.linear``
on a GPU. An explicit ``backend="triton"`` always runs the kernels.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

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
    "AUTO_PREFERS_TRITON",
    "HAS_TRITON",
    "PatchEmbedFunction",
    "choose_backend",
    "compute_dtype",
    "normalize_patch_size",
    "patch_embed_torch",
    "patch_embed_triton",
    "triton_interpret_enabled",
    "triton_usable",
]

PatchSize = int | Sequence[int]

# Whether backend="auto" sends bf16/fp16 CUDA calls to the Triton kernels. Measured on an NVIDIA H200
# (torch 2.11.0+cu130, triton 3.6.0, bf16, median ms per call) with the kernels as they were before the
# issue-15 rewrite: 4x1x224x224x160 patch 16 -> 768: forward 0.241 (triton) vs 0.193 (reshape + F.linear),
# forward+backward 1.410 vs 1.125; 2x1x96x96x96: forward 0.141 vs 0.076. The kernels lost, so "auto" picks
# the torch path until `volfm bench patch-embed` on a GPU shows the current kernels ahead; then set True.
AUTO_PREFERS_TRITON = False

_HALF_DTYPES = (torch.bfloat16, torch.float16)


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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the patch-embedding GEMM runs in for input ``x``: the autocast dtype when autocast is enabled
    for ``x``'s device type (and ``x`` is an autocast-eligible float: fp32/fp16/bf16), else ``x.dtype``.
    The torch path gets the same from ``F.linear`` under autocast; the Triton path casts to it explicitly."""
    dev = x.device.type
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def choose_backend(device_type: str, dtype: torch.dtype, requested: str = "auto", *,
                   triton_ok: bool | None = None, prefer_triton: bool | None = None) -> str:
    """``"triton"`` or ``"torch"`` for a call on ``device_type`` whose GEMM runs in ``dtype`` (see
    :func:`compute_dtype`). ``requested`` "triton"/"torch" is returned as is; "auto" gives "triton" only on
    CUDA, for bf16/fp16, with Triton importable (``triton_ok``, default :data:`HAS_TRITON`) and when the kernels
    are known to win (``prefer_triton``, default :data:`AUTO_PREFERS_TRITON`); fp32 never goes to the kernels
    by default (their exact fp32 path is an FMA loop, far slower than cuBLAS). A pure function: no tensors."""
    if requested in ("triton", "torch"):
        return requested
    if requested != "auto":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {requested!r}")
    ok = HAS_TRITON if triton_ok is None else triton_ok
    prefer = AUTO_PREFERS_TRITON if prefer_triton is None else prefer_triton
    return "triton" if (device_type == "cuda" and dtype in _HALF_DTYPES and ok and prefer) else "torch"


def normalize_patch_size(patch_size: PatchSize) -> tuple[int, int, int]:
    """``patch_size`` (one size or 3) as 3 positive ints; a VolfmError (a ValueError) otherwise."""
    return parse_triple(patch_size, "patch_size", integer=True, at_least=1)  # type: ignore[return-value]


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, patch_size: PatchSize):
    """Validate shapes; return (patch, grid, E, K)."""
    if x.dim() != 5:
        raise ValueError(f"expected input of shape (B, C, D, H, W), got {tuple(x.shape)}")
    if type(patch_size) is tuple and len(patch_size) == 3 and all(type(p) is int and p >= 1 for p in patch_size):
        pd, ph, pw = patch_size  # already normalised (PatchEmbed3d's own): skip the general parser, per call
    else:
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
    """Reference patch embedding: reshape/permute into patches + ``F.linear``. Returns (B, N, E) in
    :func:`compute_dtype` of ``x`` (``F.linear`` follows autocast)."""
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


# --------------------------------------------------------------------------------------------- kernels
#
# Implicit GEMM. Token m = (b, gd, gh, gw) in raster order starts at element offset
#   row(m) = b*sxb + gd*pd*sxd + gh*ph*sxh + gw*pw*sxw
# and patch entry k = (c, kd, kh, kw) (Conv3d weight order) sits at col(k) = c*sxc + kd*sxd + kh*sxh + kw*sxw
# from it, so x[im2col(m, k)] = x_ptr[row(m) + col(k)]. row() needs divisions by runtime grid sizes: it is
# computed once per tile (forward, input gradient) or read from a cached table (weight gradient, whose loop
# runs over tokens). col() divides by the constexpr patch sizes only (shifts and masks for powers of two), so
# recomputing it per K step costs a few integer ops; with a unit W stride (XW1) the compiler sees contiguous
# runs of pw elements and the volume loads become 16-byte cp.async (bf16, pw >= 8) on sm_80/sm_90.
#
# Checked without a GPU by compiling every candidate for sm_90a (and sm_80) with Triton 3.6 and 3.9 and reading
# the SASS: wgmma, 16-byte cp.async for both operands, software-pipelined (no full wait per step), no 64-bit
# division in any loop, no spills inside loops. A variant that built the volume pointer tile once and added a
# scalar per K step was 13% fewer loop instructions on Triton 3.9 but lost vectorisation on 3.6 (2-byte loads).

if HAS_TRITON:

    @triton.jit
    def _token_offsets(m, NTOK, GH, GW, sxb, sxd, sxh, sxw, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
        """Element offset (int64) of each token's first voxel; ``m`` int32 token indices < M."""
        b = m // NTOK
        n = m % NTOK
        gd = n // (GH * GW)
        r = n % (GH * GW)
        gh = r // GW
        gw = r % GW
        return (b.to(tl.int64) * sxb + (gd * PD).to(tl.int64) * sxd + (gh * PH).to(tl.int64) * sxh
                + (gw * PW).to(tl.int64) * sxw)

    @triton.jit
    def _k_offsets(k, sxc, sxd, sxh, sxw, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                   XW1: tl.constexpr):
        """Element offset (int64) of patch entry ``k`` (scalar or vector, int32) = (c, kd, kh, kw)."""
        c = k // (PD * PH * PW)
        r = k % (PD * PH * PW)
        kd = r // (PH * PW)
        r2 = r % (PH * PW)
        kh = r2 // PW
        kw = r2 % PW
        off = c.to(tl.int64) * sxc + kd.to(tl.int64) * sxd + kh.to(tl.int64) * sxh
        if XW1:
            off += kw.to(tl.int64)
        else:
            off += kw.to(tl.int64) * sxw
        return off

    @triton.jit
    def _patch_embed_fwd(
        x_ptr, w_ptr, b_ptr, pos_ptr, out_ptr,
        M, E, K, NTOK, GH, GW,
        sxb, sxc, sxd, sxh, sxw, spn,
        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, XW1: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
        EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """out[m, e] = sum_k x[row(m) + col(k)] * w[e, k] + bias[e] + pos[m % NTOK, e]; w (E, K) contiguous,
        pos (N, E) with unit E stride, out (M, E) contiguous."""
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(E, BLOCK_N)
        # Grouped ordering: programs running together share volume rows and weight tiles in L2.
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, BLOCK_K)
        # Ragged M/E edges: clamp the rows/columns that are read (their results are never stored), so the
        # loop carries no M/E masks. Token offsets are computed once per tile.
        rows = _token_offsets(tl.minimum(offs_m, M - 1), NTOK, GH, GW, sxb, sxd, sxh, sxw, PD, PH, PW)
        w_ptrs = w_ptr + tl.minimum(offs_n, E - 1).to(tl.int64)[None, :] * K + j[:, None]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a_src = x_ptr + rows[:, None] + _k_offsets(k0 + j, sxc, sxd, sxh, sxw, PD, PH, PW, XW1)[None, :]
            if EVEN_K:
                a = tl.load(a_src)
                w = tl.load(w_ptrs)
            else:
                k_ok = j < K - k0
                a = tl.load(a_src, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_K

        if EVEN_N:
            n_ld = offs_n  # keeps the contiguity the compiler needs for vector loads
        else:
            n_ld = tl.minimum(offs_n, E - 1)
        if HAS_BIAS:
            bias = tl.load(b_ptr + n_ld).to(tl.float32)
            acc += bias[None, :]
        if HAS_POS:
            n_idx = tl.minimum(offs_m, M - 1) % NTOK
            pos = tl.load(pos_ptr + n_idx.to(tl.int64)[:, None] * spn + n_ld[None, :])
            acc += pos.to(tl.float32)
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * E + offs_n[None, :]
        if EVEN_M and EVEN_N:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < E))

    @triton.jit
    def _patch_embed_bwd_w(
        x_ptr, rows_ptr, dy_ptr, dw_ptr,
        M, E, K, M_SPLIT,
        sxc, sxd, sxh, sxw, sdym, dw_split_stride,
        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, XW1: tl.constexpr, ROW_ALIGN: tl.constexpr,
        EVEN_M: tl.constexpr, EVEN_E: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """dw[s, e, k] = sum over tokens m of split s of dy[m, e] * x[row(m) + col(k)] (fp32 accumulate).

        Split s covers tokens [s * M_SPLIT, min((s + 1) * M_SPLIT, M)) (program_id(1)); with one split dw is
        the weight gradient itself (stored in dw's dtype), else fp32 partials that the host sums in a fixed
        order (deterministic). Token offsets come from the int64 table ``rows_ptr`` (no div/mod in the loop);
        patch offsets are fixed per program. dy (M, E) has a unit E stride.
        """
        pid = tl.program_id(0)
        pid_s = tl.program_id(1)
        num_pid_e = tl.cdiv(E, BLOCK_E)
        pid_e = pid % num_pid_e  # programs sharing a K block (the same volume reads) run side by side
        pid_k = pid // num_pid_e
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        col = _k_offsets(offs_k, sxc, sxd, sxh, sxw, PD, PH, PW, XW1)
        e_ok = offs_e < E
        k_ok = offs_k < K

        m_start = pid_s * M_SPLIT
        m_end = tl.minimum(m_start + M_SPLIT, M)
        offs_mb = tl.arange(0, BLOCK_M)
        dy_ptrs = dy_ptr + offs_e[:, None] + (m_start + offs_mb).to(tl.int64)[None, :] * sdym
        # The token offsets of the next step are loaded one step ahead into registers (a loop-carried value):
        # loaded in-step, their latency would sit in front of the volume loads, and a table load that the
        # pipeliner turns into one more cp.async group forces a full wait every step (seen in the sm_90 SASS).
        # The alignment hint goes on each load (a hint on the loop-carried value would be lost).
        rows_next = tl.multiple_of(
            tl.load(rows_ptr + m_start + offs_mb, mask=m_start + offs_mb < m_end, other=0), ROW_ALIGN)
        acc = tl.zeros((BLOCK_E, BLOCK_K), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + offs_mb
            rows = rows_next
            nxt = offs_m + BLOCK_M
            rows_next = tl.multiple_of(tl.load(rows_ptr + nxt, mask=nxt < m_end, other=0), ROW_ALIGN)
            x_ptrs = x_ptr + rows[:, None] + col[None, :]
            if EVEN_M and EVEN_E and EVEN_K:
                dyt = tl.load(dy_ptrs)
                a = tl.load(x_ptrs)
            else:
                m_ok = offs_m < m_end
                dyt = tl.load(dy_ptrs, mask=e_ok[:, None] & m_ok[None, :], other=0.0)
                a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(dyt, a, acc, input_precision=DOT_PRECISION)
            dy_ptrs += BLOCK_M * sdym

        dw_ptrs = dw_ptr + pid_s.to(tl.int64) * dw_split_stride + offs_e.to(tl.int64)[:, None] * K + offs_k[None, :]
        if EVEN_E and EVEN_K:
            tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty))
        else:
            tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=e_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _patch_embed_bwd_x(
        dy_ptr, w_ptr, dx_ptr,
        M, E, K, NTOK, GH, GW,
        sxb, sxc, sxd, sxh, sxw, sdym,
        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, XW1: tl.constexpr,
        EVEN_M: tl.constexpr, EVEN_K: tl.constexpr, EVEN_E: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """dx[row(m) + col(k)] = sum_e dy[m, e] * w[e, k]; patches do not overlap, so plain stores. dy (M, E)
        with a unit E stride, w (E, K) contiguous; (sx*) are dx's strides."""
        pid = tl.program_id(0)
        num_pid_k = tl.cdiv(K, BLOCK_K)
        pid_m = pid // num_pid_k  # consecutive programs share the dy rows
        pid_k = pid % num_pid_k
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_e = tl.arange(0, BLOCK_E)
        k_ok = offs_k < K
        dy_ptrs = dy_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * sdym + offs_e[None, :]
        w_ptrs = w_ptr + offs_e.to(tl.int64)[:, None] * K + offs_k[None, :]

        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            if EVEN_E and EVEN_K:
                dy = tl.load(dy_ptrs)
                w = tl.load(w_ptrs)
            else:
                e_ok = offs_e < E - e0
                dy = tl.load(dy_ptrs, mask=e_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=e_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
            dy_ptrs += BLOCK_E
            w_ptrs += BLOCK_E * K

        rows = _token_offsets(tl.minimum(offs_m, M - 1), NTOK, GH, GW, sxb, sxd, sxh, sxw, PD, PH, PW)
        col = _k_offsets(offs_k, sxc, sxd, sxh, sxw, PD, PH, PW, XW1)
        dx_ptrs = dx_ptr + rows[:, None] + col[None, :]
        if EVEN_M and EVEN_K:
            tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty))
        else:
            tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & k_ok[None, :])


# --------------------------------------------------------------------------------------------- configs
#
# Candidate tiles per kernel (Hopper-oriented: wgmma wants 4 or 8 warps and 64-row multiples). Before the
# first call of a shape the candidates are ranked by a wave model (full waves of tiles on the SM count,
# bigger tiles more efficient per FLOP), the best _TUNE_TOP are compiled and timed once, and the winner is
# cached per (kernel, dtype, bucketed M, E, K, patch). The interpreter runs one small config.

_TUNE_TOP = 3
_TUNE_MIN_FLOPS = 1e9  # smaller GEMMs take the wave model's first choice untimed (one compile, not three)

if _INTERPRET:
    _FWD_CANDIDATES = {"half": [(16, 16, 16, 1, 1)], "fp32": [(16, 16, 16, 1, 1)]}
    _BWD_W_CANDIDATES = {"half": [(16, 16, 16, 1, 1)], "fp32": [(16, 16, 16, 1, 1)]}
    _BWD_X_CANDIDATES = {"half": [(16, 16, 16, 1, 1)], "fp32": [(16, 16, 16, 1, 1)]}
else:
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    _FWD_CANDIDATES = {
        "half": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                 (64, 256, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
        "fp32": [(128, 64, 32, 4, 3), (64, 64, 32, 4, 3)],
    }
    # (BLOCK_E, BLOCK_K, BLOCK_M, num_warps, num_stages)
    _BWD_W_CANDIDATES = {
        "half": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                 (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
        "fp32": [(64, 128, 32, 4, 3), (64, 64, 32, 4, 3)],
    }
    # (BLOCK_M, BLOCK_K, BLOCK_E, num_warps, num_stages)
    _BWD_X_CANDIDATES = {
        "half": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                 (64, 64, 64, 4, 4)],
        "fp32": [(128, 64, 32, 4, 3), (64, 64, 32, 4, 3)],
    }

# Tests may force the number of dW splits (None: chosen by the wave model).
_SPLIT_OVERRIDE: int | None = None
_MAX_SPLIT = 8
_TUNED: dict = {}
_PLANS: dict = {}
_ROWS_CACHE: OrderedDict = OrderedDict()
_SM_COUNT: dict = {}


def _autotune_on() -> bool:
    """Time the top candidates once per shape (default); VOLFM_PATCH_EMBED_AUTOTUNE=0 or
    torch.use_deterministic_algorithms(True) takes the wave model's first choice (the same config, hence the
    same summation order, in every process)."""
    if os.environ.get("VOLFM_PATCH_EMBED_AUTOTUNE", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return not torch.are_deterministic_algorithms_enabled()


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a nominal count, so the wave model still orders candidates
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _m_bucket(m: int) -> int:
    return 1 << max(4, (max(int(m), 1) - 1).bit_length())


def _tile_efficiency(a: int, b: int) -> float:
    """Relative MMA efficiency of an (a x b) output tile (operand reuse grows with the tile)."""
    return min(1.0, (a * b / 32768) ** 0.25)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _waves(tiles: int, sms: int) -> int:
    return _cdiv(tiles, sms)


def _rank_fwd(cands, M, E, K, sms):
    def est(c):
        bm, bn = c[:2]
        tiles = _cdiv(M, bm) * _cdiv(E, bn)
        return _waves(tiles, sms) * bm * bn / _tile_efficiency(bm, bn)
    return sorted(cands, key=est)


def _rank_bwd_x(cands, M, E, K, sms):
    def est(c):
        bm, bk = c[:2]
        tiles = _cdiv(M, bm) * _cdiv(K, bk)
        return _waves(tiles, sms) * bm * bk / _tile_efficiency(bm, bk)
    return sorted(cands, key=est)


def _dw_split(cfg, M, E, K, sms, half: bool) -> tuple[int, float]:
    """(splits, estimated microseconds) for a dW config: split the token reduction so that the tiles fill the
    SMs, paying for the fp32 partials written and summed (S > 1). At least 4 BLOCK_M steps per split."""
    be, bk, bm = cfg[:3]
    tiles = _cdiv(E, be) * _cdiv(K, bk)
    flops_per_sm = (989e12 if half else 60e12) / 132 * 0.6
    best = None
    for s in range(1, _MAX_SPLIT + 1):
        chunk = _cdiv(_cdiv(M, s), bm) * bm
        if s > 1 and (chunk < 4 * bm or _cdiv(M, chunk) < s):
            break
        t = _waves(tiles * s, sms) * 2.0 * be * bk * chunk / (flops_per_sm * _tile_efficiency(be, bk)) * 1e6
        if s > 1:
            t += (s + 1) * E * K * 4 / 3e12 * 1e6 + 4.0  # partials written + summed, one more launch
        if best is None or t < best[1] - 1e-9:
            best = (s, t)
    return best


def _rank_bwd_w(cands, M, E, K, sms, half):
    scored = []
    for c in cands:
        s, t = _dw_split(c, M, E, K, sms, half)
        scored.append((t, c, s))
    scored.sort(key=lambda r: r[0])
    return [(c, s) for _, c, s in scored]


def _timed_ms(fn, device) -> float:
    """Milliseconds per call of ``fn`` on the GPU (one call to size the loop, then about 1 ms of calls)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    n = max(2, min(50, int(1.0 / max(start.elapsed_time(end), 1e-3))))
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def _select(key, rank: Callable[[], list], launch: Callable, device: torch.device, flops: float):
    """The cached choice for ``key``; else time the first _TUNE_TOP candidates of ``rank()`` (each via
    ``launch(cand)``) and keep the fastest. Candidates that fail to compile or launch (e.g. out of shared memory) are skipped;
    if all fail, the first error is raised. No timing on the interpreter, during CUDA-graph capture, with
    autotuning off or for a GEMM under _TUNE_MIN_FLOPS: the first ranked candidate is used."""
    hit = _TUNED.get(key)
    if hit is not None:
        return hit
    ranked = rank()
    top = ranked[:_TUNE_TOP] if flops >= _TUNE_MIN_FLOPS else ranked[:1]
    if device.type != "cuda":
        _TUNED[key] = top[0]
        return top[0]
    capturing = torch.cuda.is_current_stream_capturing()
    if len(top) == 1 or capturing or not _autotune_on():
        if capturing:
            return top[0]
        for i, cand in enumerate(ranked):  # untimed: the first candidate that compiles and launches
            try:
                launch(cand)
            except Exception:  # noqa: BLE001 - e.g. out of shared memory on a smaller GPU: try the next one
                if i == len(ranked) - 1:
                    raise
                continue
            _TUNED[key] = cand
            return cand
    best, first_err = None, None
    for cand in top:
        try:
            launch(cand)  # compiles on first use
            torch.cuda.synchronize(device)
            t = _timed_ms(lambda cand=cand: launch(cand), device)
        except Exception as exc:  # noqa: BLE001 - a config the device cannot run is skipped
            first_err = first_err or exc
            continue
        if best is None or t < best[0]:
            best = (t, cand)
    if best is None:
        raise first_err  # type: ignore[misc]
    _TUNED[key] = best[1]
    return best[1]


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


def _row_align(shape, strides, patch) -> int:
    """Largest power of two (<= 16) dividing every token offset row(m) of a volume (a hint for the dW kernel)."""
    B, _, D, H, W = shape
    pd, ph, pw = patch
    g = 0
    for count, step in ((B, strides[0]), (D // pd, pd * strides[2]), (H // ph, ph * strides[3]),
                        (W // pw, pw * strides[4])):
        if count > 1:
            g = math.gcd(g, int(step))
    if g == 0:
        return 16
    return min(16, g & -g)


def _token_rows(x: torch.Tensor, patch) -> torch.Tensor:
    """int64 (M,) offsets of every token's first voxel in ``x`` (raster order), cached per shape/strides/device."""
    key = (x.device, tuple(x.shape), x.stride(), tuple(patch))
    rows = _ROWS_CACHE.get(key)
    if rows is not None:
        _ROWS_CACHE.move_to_end(key)
        return rows
    B, _, D, H, W = x.shape
    pd, ph, pw = patch
    sxb, _, sxd, sxh, sxw = x.stride()
    kw = {"device": x.device, "dtype": torch.int64}
    rows = (torch.arange(B, **kw).mul_(sxb).view(B, 1, 1, 1)
            + torch.arange(D // pd, **kw).mul_(pd * sxd).view(1, -1, 1, 1)
            + torch.arange(H // ph, **kw).mul_(ph * sxh).view(1, 1, -1, 1)
            + torch.arange(W // pw, **kw).mul_(pw * sxw).view(1, 1, 1, -1)).reshape(-1)
    if not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _ROWS_CACHE[key] = rows
        while len(_ROWS_CACHE) > 16:
            _ROWS_CACHE.popitem(last=False)
    return rows


def _kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _launch_fwd(xc, w, bias, pos, out, patch, grid_dims):
    pd, ph, pw = patch
    _, gh, gw = grid_dims
    B = xc.shape[0]
    N = grid_dims[0] * gh * gw
    M = B * N
    E, K = w.shape
    sx = xc.stride()
    dummy = out  # placeholder pointer for absent bias / pos (never read)
    prec = _dot_precision(xc.dtype)
    kind = _kind(xc.dtype)

    def launch(cfg):
        bm, bn, bk, nw, ns = cfg
        grid = (triton.cdiv(M, bm) * triton.cdiv(E, bn),)
        _patch_embed_fwd[grid](
            xc, w, bias if bias is not None else dummy, pos if pos is not None else dummy, out,
            M, E, K, N, gh, gw,
            sx[0], sx[1], sx[2], sx[3], sx[4], pos.stride(0) if pos is not None else 0,
            PD=pd, PH=ph, PW=pw, XW1=sx[4] == 1,
            HAS_BIAS=bias is not None, HAS_POS=pos is not None,
            EVEN_M=M % bm == 0, EVEN_N=E % bn == 0, EVEN_K=K % bk == 0, DOT_PRECISION=prec,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8 if bm >= 32 else 2, num_warps=nw, num_stages=ns,
        )

    key = ("fwd", xc.device, xc.dtype, prec, _m_bucket(M), E, K, patch, sx[4] == 1)
    cfg = _select(key, lambda: _rank_fwd(_FWD_CANDIDATES[kind], M, E, K, _sm_count(xc.device)), launch,
                  xc.device, 2.0 * M * E * K)
    launch(cfg)


def _launch_bwd_x(dy, w, dx, patch, grid_dims):
    pd, ph, pw = patch
    _, gh, gw = grid_dims
    M, E = dy.shape
    K = w.shape[1]
    N = grid_dims[0] * gh * gw
    sx = dx.stride()
    prec = _dot_precision(dy.dtype)
    kind = _kind(dy.dtype)

    def launch(cfg):
        bm, bk, be, nw, ns = cfg
        grid = (triton.cdiv(M, bm) * triton.cdiv(K, bk),)
        _patch_embed_bwd_x[grid](
            dy, w, dx,
            M, E, K, N, gh, gw,
            sx[0], sx[1], sx[2], sx[3], sx[4], dy.stride(0),
            PD=pd, PH=ph, PW=pw, XW1=sx[4] == 1,
            EVEN_M=M % bm == 0, EVEN_K=K % bk == 0, EVEN_E=E % be == 0, DOT_PRECISION=prec,
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_E=be, num_warps=nw, num_stages=ns,
        )

    key = ("bwd_x", dy.device, dy.dtype, prec, _m_bucket(M), E, K, patch, sx[4] == 1)
    launch(_select(key, lambda: _rank_bwd_x(_BWD_X_CANDIDATES[kind], M, E, K, _sm_count(dy.device)), launch,
                   dy.device, 2.0 * M * E * K))


def _launch_bwd_w(xc, dy, dw, patch):
    """dw (E, K) <- dy^T @ im2col(xc), written in dw's dtype; split-K partials summed in a fixed order."""
    pd, ph, pw = patch
    M, E = dy.shape
    K = dw.shape[1]
    sx = xc.stride()
    prec = _dot_precision(xc.dtype)
    kind = _kind(xc.dtype)
    rows = _token_rows(xc, patch)
    align = _row_align(tuple(xc.shape), sx, patch)

    def launch(plan):
        (be, bk, bm, nw, ns), splits = plan
        if _SPLIT_OVERRIDE is not None:
            splits = _SPLIT_OVERRIDE
        m_split = _cdiv(_cdiv(M, splits), bm) * bm
        splits = _cdiv(M, m_split)
        target = dw if splits == 1 else torch.empty((splits, E, K), device=dw.device, dtype=torch.float32)
        grid = (triton.cdiv(E, be) * triton.cdiv(K, bk), splits)
        _patch_embed_bwd_w[grid](
            xc, rows, dy, target,
            M, E, K, m_split,
            sx[1], sx[2], sx[3], sx[4], dy.stride(0), E * K,
            PD=pd, PH=ph, PW=pw, XW1=sx[4] == 1, ROW_ALIGN=align,
            EVEN_M=(M % bm == 0) and (m_split % bm == 0), EVEN_E=E % be == 0, EVEN_K=K % bk == 0,
            DOT_PRECISION=prec, BLOCK_E=be, BLOCK_K=bk, BLOCK_M=bm, num_warps=nw, num_stages=ns,
        )
        if splits > 1:
            if dw.dtype == torch.float32:
                torch.sum(target, dim=0, out=dw)
            else:
                dw.copy_(target.sum(dim=0))

    key = ("bwd_w", xc.device, xc.dtype, dw.dtype, prec, _m_bucket(M), E, K, patch, sx[4] == 1)
    plan = _PLANS.get((key, M))
    if plan is None:
        hit = _TUNED.get(key)
        if hit is not None:  # the tuned tile; the split follows this M (the key buckets M)
            plan = (hit[0], _dw_split(hit[0], M, E, K, _sm_count(xc.device), kind == "half")[0])
        else:
            plan = _select(key, lambda: _rank_bwd_w(_BWD_W_CANDIDATES[kind], M, E, K, _sm_count(xc.device),
                                                    kind == "half"), launch, xc.device, 2.0 * M * E * K)
        if key in _TUNED:
            _PLANS[(key, M)] = plan
    launch(plan)


def _no_autocast(device_type: str):
    """Autocast off inside the Function (its casts are explicit); entered only when autocast is on, since the
    context manager costs microseconds of host time per call."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class PatchEmbedFunction(torch.autograd.Function):
    """Autograd wrapper around the fused Triton kernels.

    forward(x (B, C, D, H, W), weight (E, K), bias (E,) or None, pos (N, E) or None, patch (pd, ph, pw),
    cdtype) -> (B, N, E) in ``cdtype`` (see :func:`compute_dtype`). Runs with autocast off: x and weight are
    cast to ``cdtype`` once (the cast x is what is saved for backward); bias and pos are read in their own
    dtypes and added in fp32.
    Backward: grad x (Triton, scattered per patch, written in x's dtype), grad weight (Triton, fp32
    accumulation, written in the weight's dtype; deterministic split-K over tokens), grad bias
    ``dy.sum(0, dtype=float32)`` and grad pos (sum over batch) in torch, each in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pos, patch, cdtype):
        with _no_autocast(x.device.type):
            pd, ph, pw = patch
            B, C, D, H, W = x.shape
            gd, gh, gw = D // pd, H // ph, W // pw
            N = gd * gh * gw
            E, K = weight.shape
            M = B * N
            xc = x.to(cdtype)
            wc = weight.to(cdtype).contiguous()
            if pos is not None and pos.stride(1) != 1:
                pos = pos.contiguous()
            if bias is not None and bias.stride(0) != 1:
                bias = bias.contiguous()
            out = torch.empty((B, N, E), device=x.device, dtype=cdtype)
            if M > 0 and E > 0:
                if K == 0:
                    out.zero_()
                    if bias is not None:
                        out += bias.to(cdtype)
                    if pos is not None:
                        out += pos.to(cdtype)
                else:
                    _launch_fwd(xc, wc, bias, pos, out, patch, (gd, gh, gw))
        ctx.save_for_backward(xc, wc)
        ctx.patch = patch
        ctx.grid = (gd, gh, gw)
        ctx.x_dtype = x.dtype
        ctx.w_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.pos_dtype = None if pos is None else pos.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, wc = ctx.saved_tensors
        patch = ctx.patch
        gd, gh, gw = ctx.grid
        B = xc.shape[0]
        N = gd * gh * gw
        E, K = wc.shape
        M = B * N
        need_x, need_w, need_b, need_pos = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = grad_pos = None
        with _no_autocast(xc.device.type):
            dy = grad_out.reshape(M, E)
            if dy.dtype != xc.dtype:
                dy = dy.to(xc.dtype)
            if E > 1 and dy.stride(1) != 1:
                dy = dy.contiguous()

            if need_x:
                # every voxel belongs to exactly one patch: fully written (in x's dtype, x's memory format)
                grad_x = torch.empty_like(xc, dtype=ctx.x_dtype)
                if grad_x.numel() > 0:
                    if E == 0 or M == 0:
                        grad_x.zero_()
                    else:
                        _launch_bwd_x(dy, wc, grad_x, patch, (gd, gh, gw))

            if need_w:
                grad_w = torch.empty((E, K), device=xc.device, dtype=ctx.w_dtype)
                if grad_w.numel() > 0:
                    if M == 0:
                        grad_w.zero_()
                    else:
                        _launch_bwd_w(xc, dy, grad_w, patch)

            if need_b and ctx.bias_dtype is not None:
                grad_b = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)

            if need_pos and ctx.pos_dtype is not None:
                grad_pos = grad_out.reshape(B, N, E).sum(0, dtype=torch.float32).to(ctx.pos_dtype)

        return grad_x, grad_w, grad_b, grad_pos, None, None


def patch_embed_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: PatchSize,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused Triton patch embedding; same contract as :func:`patch_embed_torch`, including the dtype of the
    result under autocast (:func:`compute_dtype`)."""
    patch, (gd, gh, gw), E, K = _check_shapes(x, weight, patch_size)
    _require_triton(x)
    pos = _pos_2d(pos_embed, gd * gh * gw, E)
    cd = compute_dtype(x)
    if cd not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the 'triton' patch-embed backend computes in float32/float16/bfloat16, got {cd}")
    # the 2D view is differentiable: the gradient reaches the 5D parameter in its own dtype
    return PatchEmbedFunction.apply(x, weight.reshape(E, K), bias, pos, patch, cd)
