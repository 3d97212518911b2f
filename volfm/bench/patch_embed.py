"""`volfm bench patch-embed`: the fused Triton 3D patch embedding against F.linear and cuDNN conv3d.

3D patch embedding is a Conv3d with kernel == stride: (B, C, I, J, K) volume -> (B, N, E) tokens,
N = (I/pi) * (J/pj) * (K/pk). Three methods run in the same process on the same seeded inputs
(x ~ N(0, 1), weight ~ N(0, 1/Kp), bias ~ N(0, 0.1^2), all in ``--dtype``, or in fp32 with ``--autocast``):

* triton -- :func:`volfm.kernels.patch_embed.patch_embed_triton`: the fused implicit-GEMM Triton
            kernels (forward, and weight+bias / input backward) behind an autograd Function;
* linear -- :func:`volfm.kernels.patch_embed.patch_embed_torch`: reshape/permute into patches +
            ``F.linear`` (the reference);
* cudnn  -- ``F.conv3d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)`` (cuDNN on CUDA;
            the result is the strided view, no ``.contiguous()`` copy is counted).

Shapes are written (B, C, I, J, K) as volfm stores volumes ((C, I, J, K), K the slice axis, e.g.
224 x 224 x 160) and are passed as they are to the kernels, whose (D, H, W) are then (I, J, K);
the patch is (pi, pj, pk). ``--shapes`` takes ``BxCxIxJxK:P:E`` with P one size or ``pixpjxpk``.

Modes: ``fwd`` (forward only, under ``torch.no_grad``) and ``fwd+bwd`` (forward, then
``torch.autograd.grad`` of the output against a fixed random grad-output, for the weight, the bias
and the input; ``--no-input-grad`` leaves the input out, as for a first layer).

``--autocast``: inputs, weight, bias and grad-output in fp32, every method called under
``torch.autocast(device, dtype=--dtype)`` (bf16 on CUDA by default), as ``precision: bf16-mixed``
training calls the patch embedding; the weight and bias gradients then come back in fp32.

Timing: on CUDA, ``--warmup`` untimed calls per method (the kernels pick their tile configs and
compile during these, and cuDNN searches its algorithms where ``cudnn.benchmark`` is on), then
``--repeats`` timed repeats, each of ``--inner`` back-to-back calls between two CUDA events (auto:
enough calls for about 2 ms, from the time of one call after the warm-up, so launch overhead is
amortised as in a training loop), alternating between the methods timed together; the median
per-call time is reported. A method whose calls are slow gets fewer repeats (at least 3) so that
its timing stays within ``--method-budget-s``. Beside the GPU time, "host ms" is the CPU time to
issue one call (the same loop without waiting): when it is close to the GPU time the method is
host-bound (Python, launches) and the GPU time is an upper bound. ``--cuda-graphs`` captures the
back-to-back calls in a CUDA graph after the warm-up and times its replays instead (no host
overhead; the eager figures stay in the JSON); a method that cannot be captured keeps its eager
time. On CPU the same with ``time.perf_counter`` and about 20 ms per repeat (no host column).

Order, and what survives a timeout: ``--methods`` (default ``triton,linear,cudnn``) says which
methods run. triton and linear are timed together (alternating) on every shape and mode first;
cuDNN runs after them, alone, shape by shape (``--cudnn-bwd-max-tokens N`` leaves its fwd+bwd out on
shapes with more than N tokens). Each row is printed as soon as it is measured, and ``--json`` is
rewritten (atomically) after every shape and mode, with ``"complete": false`` and ``"in_progress"``
naming what was being measured, so a run killed by a time limit still leaves every row measured
before. :func:`run_suite` goes further: it runs the triton/linear part of every configuration first
and the cuDNN parts of all of them at the end, cheapest first, merged into each configuration's
document.

``--cudnn-benchmark`` (default ``fwd``): ``torch.backends.cudnn.benchmark`` on for the forward-only
mode, off for fwd+bwd (cuDNN's heuristic algorithm choice, as the earlier figures were measured);
``on`` / ``off`` for every call. Why: on an NVIDIA H200 (torch 2.11.0+cu130, triton 3.6.0) this bench
with it ``on`` for every call printed nothing after "running 8x1x224x224x160 ..." for 150 s, and
nothing after "running 4x1x224x224x160 ..." for 125 s on that shape alone, and was killed both times
(it printed its rows only at the end then). Earlier the same day its previous version
(``cudnn.benchmark`` off, the previous kernels) ran 4x1x224x224x160 and 2x1x96x96x96 in both modes
in about 60 s, cuDNN's fwd+bwd taking 298 ms per call; the current kernels, their tile tuning and
split-K passed their CUDA tests in 26 s and ran a ViT-B fit. The suspect is cuDNN's algorithm search
for this conv (kernel = stride = 16^3), its backward data/filter search most of all; the kernels'
tile tuning at M = 15680 / 7840 tokens is a weaker one. Suspected, not confirmed: nothing in those
runs said where they stood. Now each row says how long its warm-up took (tuning, compiles, cuDNN's
search), and the setting is printed and recorded (``"cudnn_benchmark"`` in the JSON and in every
cuDNN row).

FLOPs (multiply-add = 2): with Kp = C * pi * pj * pk and M = B * N tokens,

* forward:  F = 2 * M * Kp * E
* fwd+bwd:  3 * F with the input gradient (forward + grad weight + grad input, each a GEMM of the
  same size), 2 * F without it (``--no-input-grad``).

The bias add and the bias gradient (M * E each) are not counted (a fraction 1 / (2 Kp) of F).
TFLOP/s = FLOPs / median time; "% peak" is against the device's dense bf16 tensor peak (by device
name: H100 SXM / H200 989.4, H100 PCIe 756, A100 312, L40S 362, RTX 4090 165 TFLOP/s;
``--peak-tflops`` overrides; unknown devices and CPUs -> n/a).

Correctness, in the same run: the output of each method against the linear path and against an
fp32 reference (the linear path on the inputs cast to float32), and in fwd+bwd mode the gradients
against the linear path's, each as max |diff| / max |reference| (relative, since the rounding of
bf16/fp16 scales with the values); tolerance 2 * eps of the dtype for bf16/fp16, 1e-4 for fp32
(with fp32, TF32 is switched off for cuDNN during the run so that all three compute in fp32).
The same check also runs on one small ragged shape (``RAGGED_CHECK_SHAPES``, one for CPU and one for
CUDA; not timed): M = B * N, E and Kp there are multiples of none of the kernels' block sizes (16
under the interpreter, 32-256 on the GPU) and span at least two blocks each, so the kernels' edge
masks are checked whatever ``--shapes`` says; its rows are marked "(ragged, check only)".

Goals (CUDA only; on CPU they print "skipped (no GPU)"): triton >= 1.3x the F.linear path and
triton faster than cuDNN, on every shape and mode; triton >= 60 % of the dense bf16 peak in the
forward, bf16 compute, judged on every shape with at least ``GOAL_PEAK_MIN_TOKENS`` = 8192 tokens
(M = B * N; smaller GEMMs cannot fill 132 SMs with large tiles, so their % of peak says little: e.g.
4x1x224x224x160 at patch 16 has M = 7840 and is not judged, 8x1x224x224x160 with M = 15680 is).
The exit status is 1 when an output or gradient is off by more than the tolerance or a method
fails, 0 otherwise (also when a speed goal fails).

In Python: :func:`run` (argv -> exit status and the results document that ``--json`` writes; ``merge=``
adds methods to an earlier run's document) and :func:`run_suite` (several configurations in one process,
cuDNN last, e.g. :data:`GPU_RUNS` / :data:`GPU_RUNS_FP`, what `volfm bench gpu` runs; :data:`DRY_RUNS` on a
CPU).

On a machine without CUDA the Triton kernels only run under the Triton interpreter
(TRITON_INTERPRET=1 set before volfm.kernels is imported; very slow), so the defaults there are
float32 and small shapes, triton is included only with ``--include-interpreted``, and the numbers
say nothing about the GPU goals.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import volfm.kernels.patch_embed as pe

METHODS = ("triton", "linear", "cudnn")
MODES = ("fwd", "fwd+bwd")
CUDNN_BENCHMARK = ("fwd", "on", "off")  # --cudnn-benchmark choices; see the module docstring

DEFAULT_SHAPES_CUDA = (
    "4x1x224x224x160:16:768",  # Merlin's batch of 4 at ViT-B's patch 16: M = 7840 tokens
    "8x1x224x224x160:16:768",  # M = 15680: a shape the %-of-peak goal is judged on (>= GOAL_PEAK_MIN_TOKENS)
    "4x4x224x224x160:16:768",
    "2x1x96x96x96:16:768",  # a fine-tuning crop batch: M = 432
    "2x1x224x224x160:16x16x8:768",  # anisotropic: 8 along the slice axis K
)
DEFAULT_SHAPES_CPU = (
    "2x1x64x64x32:16:96",
    "2x1x64x64x32:16x16x8:96",
)

GOAL_VS_LINEAR = 1.3
GOAL_PEAK_FRACTION = 0.60
GOAL_PEAK_MIN_TOKENS = 8192  # the %-of-peak goal is judged on forward GEMMs with at least this many tokens
METHOD_BUDGET_S = 2.0  # default --method-budget-s
HOST_BOUND = 0.9  # host ms / GPU ms at or above this: the call is host-bound
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FP32_TOL = 1e-4
CUDA_TARGET_MS = 2.0  # auto --inner: back-to-back calls per timed repeat, about this long
CPU_TARGET_MS = 20.0
MAX_INNER = 1000
# Checked for correctness only (never timed), after the --shapes; M = B*N, Kp and E are multiples of none of the
# kernels' block sizes and span at least two blocks each. CPU (interpreter, blocks 16; kept small, it is slow):
# grid 2x2x3, M = 24, Kp = 3*3*5*3 = 135, E = 20. CUDA (blocks 32..256): grid 6x4x3, M = 360, Kp = 3*5*5*7 = 525,
# E = 300.
RAGGED_CHECK_SHAPES = {"cpu": "2x3x6x10x9:3x5x3:20", "cuda": "5x3x30x20x21:5x5x7:300"}


# --- shapes, FLOPs, peaks --------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One benchmark shape: input (B, C, I, J, K), patch (pi, pj, pk), embedding width E."""

    shape: tuple[int, int, int, int, int]
    patch: tuple[int, int, int]
    embed_dim: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.shape[2:], self.patch))  # type: ignore[return-value]

    @property
    def tokens(self) -> int:
        """Tokens per volume, N."""
        return math.prod(self.grid)

    @property
    def k(self) -> int:
        """GEMM reduction size C * pi * pj * pk."""
        return self.shape[1] * math.prod(self.patch)

    def flops(self, mode: str = "fwd", input_grad: bool = True) -> int:
        return patch_embed_flops(self.shape, self.patch, self.embed_dim, mode, input_grad)

    def label(self) -> str:
        return "x".join(map(str, self.shape))

    def patch_label(self) -> str:
        return "x".join(map(str, self.patch))


def patch_embed_flops(shape, patch, embed_dim: int, mode: str = "fwd", input_grad: bool = True) -> int:
    """Model FLOPs of a patch embedding: forward 2*B*N*Kp*E; fwd+bwd 3x that (2x without input grad)."""
    B, C = int(shape[0]), int(shape[1])
    n = math.prod(int(s) // int(p) for s, p in zip(shape[2:], patch))
    fwd = 2 * B * n * (C * math.prod(int(p) for p in patch)) * int(embed_dim)
    if mode == "fwd":
        return fwd
    if mode == "fwd+bwd":
        return fwd * (3 if input_grad else 2)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _int_list(text: str, what: str):
    parts = [p for p in text.replace(",", "x").split("x")]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a list of integers") from None
    if any(v < 1 for v in vals):
        raise ValueError(f"{what} {text!r} must be positive")
    return vals


def parse_shape(text: str) -> Case:
    """``BxCxIxJxK:P:E`` (P one size or ``pixpjxpk``; ',' works for 'x') -> :class:`Case`."""
    hint = "expected BxCxIxJxK:P:E, e.g. 4x1x224x224x160:16:768 or 2x1x224x224x160:16x16x8:768"
    parts = str(text).strip().split(":")
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise ValueError(f"{text!r}: {hint}")
    try:
        dims = _int_list(parts[0].strip(), "volume")
        patch = _int_list(parts[1].strip(), "patch")
        emb = _int_list(parts[2].strip(), "embedding width")
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}; {hint}") from None
    if len(dims) != 5:
        raise ValueError(f"{text!r}: volume needs 5 sizes B x C x I x J x K, got {len(dims)}; {hint}")
    if len(patch) == 1:
        patch *= 3
    if len(patch) != 3:
        raise ValueError(f"{text!r}: patch needs 1 or 3 sizes, got {len(patch)}; {hint}")
    if len(emb) != 1:
        raise ValueError(f"{text!r}: embedding width must be one integer; {hint}")
    spatial = dims[2:]
    if any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(f"{text!r}: volume {'x'.join(map(str, spatial))} is not divisible by patch "
                         f"{'x'.join(map(str, patch))}")
    return Case(tuple(dims), tuple(patch), emb[0])  # type: ignore[arg-type]


# Dense bf16 tensor-core peak in TFLOP/s (no sparsity), by device name.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0, "L40S": 362.0,
                    "RTX 4090": 165.0}


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak for a CUDA device name (torch.cuda.get_device_name), None when unknown."""
    n = " ".join(str(device_name).upper().replace("-", " ").split())
    if "H100" in n:
        if "PCIE" in n:
            return PEAK_BF16_TFLOPS["H100 PCIe"]
        if "SXM" in n or "HBM3" in n:  # the SXM part reports itself as "NVIDIA H100 80GB HBM3"
            return PEAK_BF16_TFLOPS["H100 SXM"]
        return None  # H100 NVL and others: not in the table
    if "H200" in n:
        return None if "NVL" in n else PEAK_BF16_TFLOPS["H200"]
    if "A100" in n:
        return PEAK_BF16_TFLOPS["A100"]
    if "L40S" in n:
        return PEAK_BF16_TFLOPS["L40S"]
    if "RTX 4090" in n and "4090 D" not in n:
        return PEAK_BF16_TFLOPS["RTX 4090"]
    return None


def tolerance(dtype_name: str) -> float:
    if dtype_name == "fp32":
        return FP32_TOL
    return 2 * torch.finfo(getattr(torch, DTYPES[dtype_name])).eps


# --- parser ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="volfm bench patch-embed",
        description="3D patch embedding (Conv3d, kernel == stride): fused Triton kernel vs reshape + F.linear "
                    "vs cuDNN conv3d; time, TFLOP/s, percent of bf16 peak, correctness")
    p.add_argument("--shapes", nargs="+", metavar="BxCxIxJxK:P:E",
                   help="shapes to run, each BxCxIxJxK:P:E with the volume as volfm stores it (K = slice axis), "
                        "P the patch as one size or pixpjxpk, E the embedding width; e.g. "
                        "4x1x224x224x160:16:768 2x1x224x224x160:16x16x8:768 (default on CUDA: "
                        + " ".join(DEFAULT_SHAPES_CUDA) + "; on CPU: " + " ".join(DEFAULT_SHAPES_CPU) + ")")
    p.add_argument("--methods", default=",".join(METHODS), metavar="M[,M...]",
                   help="methods to run, comma-separated, from " + ", ".join(METHODS) + " (default all); triton and "
                        "linear are timed first, cudnn after them")
    p.add_argument("--cudnn-benchmark", choices=CUDNN_BENCHMARK, default="fwd",
                   help="torch.backends.cudnn.benchmark: 'fwd' (default) on for the forward-only mode and off for "
                        "fwd+bwd (cuDNN's heuristic algorithms); 'on' / 'off' for every call")
    p.add_argument("--cudnn-bwd-max-tokens", type=int, default=None, metavar="N",
                   help="time cudnn's fwd+bwd only on shapes with at most N tokens (M = B*N; default: every shape)")
    p.add_argument("--mode", choices=["fwd", "fwd+bwd", "both"], default="both",
                   help="forward only, forward + backward, or both (default both)")
    p.add_argument("--no-input-grad", action="store_true",
                   help="fwd+bwd: gradients for weight and bias only, not the input (a first layer)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="compute dtype (default bf16 on CUDA, fp32 on CPU; with --autocast: bf16 on CUDA, fp16 on CPU, "
                        "where the Triton interpreter's bf16 dot is wrong)")
    p.add_argument("--autocast", action="store_true",
                   help="fp32 inputs and parameters, every method under torch.autocast(device, dtype=--dtype), as "
                        "bf16-mixed training calls it")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA: time CUDA-graph replays of the back-to-back calls (no host overhead; for small shapes)")
    p.add_argument("--method-budget-s", type=float, default=METHOD_BUDGET_S,
                   help=f"at most about this many seconds of timed calls per method and mode; slower methods get "
                        f"fewer repeats, at least 3 (default {METHOD_BUDGET_S:g})")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per method and mode first (Triton autotunes here; default 3 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per method and mode; the median is reported (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--inner", type=int, default=None,
                   help="calls per timed repeat (default: about 2 ms worth on CUDA, 20 ms on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the device in TFLOP/s (default: from a table by device name)")
    p.add_argument("--include-interpreted", action="store_true",
                   help="on CPU, also run triton under the Triton interpreter (needs TRITON_INTERPRET=1 set before "
                        "start; very slow, keep the shapes tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and weights")
    p.add_argument("--json", help="also write the results as JSON here")
    return p


# --- measuring -------------------------------------------------------------------------------------

def _method_fns(torch, F, pe):
    return {
        "triton": lambda x, w, b, patch: pe.patch_embed_triton(x, w, b, patch),
        "linear": lambda x, w, b, patch: pe.patch_embed_torch(x, w, b, patch),
        "cudnn": lambda x, w, b, patch: F.conv3d(x, w, b, stride=patch).flatten(2).transpose(1, 2),
    }


def _make_inputs(torch, case: Case, dtype, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, C = case.shape[:2]
    E = case.embed_dim
    # generated on the CPU in float32 (same numbers on every device), then moved and cast
    x = torch.randn(case.shape, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn((E, C, *case.patch), generator=g) / math.sqrt(case.k)).to(device=device, dtype=dtype)
    b = (0.1 * torch.randn((E,), generator=g)).to(device=device, dtype=dtype)
    gout = torch.randn((B, case.tokens, E), generator=g).to(device=device, dtype=dtype)
    return x, w, b, gout


def _rel_diff(a, ref) -> float:
    d = (a.float() - ref.float()).abs().max().item()
    m = ref.float().abs().max().item()
    if math.isnan(d) or math.isnan(m):
        return math.inf
    return d / m if m > 0 else (0.0 if d == 0 else math.inf)


class _Runner:
    """Callables for one (case, mode, method) and their timing; ``autocast``: the compute dtype of
    ``torch.autocast`` around every call (None: no autocast)."""

    def __init__(self, torch, device, cuda: bool, autocast=None):
        self.torch, self.device, self.cuda, self.autocast = torch, device, cuda, autocast

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.autocast)

    def step(self, fn, x, w, b, gout, patch, mode: str, input_grad: bool):
        torch = self.torch
        if mode == "fwd":
            def run():
                with torch.no_grad(), self.ctx():
                    return fn(x, w, b, patch)
            return run
        xg = x.detach().requires_grad_(input_grad)
        wg = w.detach().requires_grad_(True)
        bg = b.detach().requires_grad_(True)
        leaves = [wg, bg] + ([xg] if input_grad else [])
        g = gout if self.autocast is None else gout.to(self.autocast)  # the outputs' dtype, cast once

        def run():
            with self.ctx():
                out = fn(xg, wg, bg, patch)
            return out, torch.autograd.grad(out, leaves, g)
        return run

    def time_block(self, run, inner: int) -> tuple[float, float | None]:
        """(milliseconds per call of ``inner`` back-to-back calls, host milliseconds per call to issue them; None
        on CPU, where the two are the same)."""
        torch = self.torch
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for _ in range(inner):
                run()
            host = (time.perf_counter() - t0) * 1e3 / inner
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner, host
        t0 = time.perf_counter()
        for _ in range(inner):
            run()
        return (time.perf_counter() - t0) * 1e3 / inner, None

    def graph(self, run, inner: int):
        """A CUDA graph of ``inner`` back-to-back calls (captured after the warm-up), or an exception."""
        torch = self.torch
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):  # one more warm call on the capture's side stream, as torch recommends
            run()
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.sync()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                run()
        self.sync()
        return g

    def time_graph(self, g, inner: int) -> float:
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner


def cudnn_benchmark_on(setting: str, mode: str) -> bool:
    """Whether ``torch.backends.cudnn.benchmark`` is on for calls in ``mode`` under ``--cudnn-benchmark setting``:
    'fwd' -> only in the forward-only mode; 'on' / 'off' -> always / never."""
    if setting not in CUDNN_BENCHMARK:
        raise ValueError(f"--cudnn-benchmark must be one of {CUDNN_BENCHMARK}, got {setting!r}")
    return setting == "on" or (setting == "fwd" and mode == "fwd")


@contextlib.contextmanager
def _cudnn_benchmark(torch, on: bool):
    """``torch.backends.cudnn.benchmark = on`` inside, the previous value restored after (a global flag: it only
    changes how cuDNN convolutions pick their algorithms, so it is harmless around the other methods)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(on)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _err(exc) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).splitlines())[:300]}"


def _check(torch, fns, methods, case, x, w, b, gout, modes, input_grad, runner, bench):
    """Outputs (and grads when "fwd+bwd" is in ``modes``) of ``methods`` vs the linear path (always computed: it is
    the reference, timed or not); outputs vs an fp32 reference. Every method and the linear reference run under the
    runner's autocast (if any), the fp32 reference without; ``bench(mode)``: cudnn.benchmark for that mode's calls."""
    patch = case.patch
    with torch.no_grad():
        ref32 = fns["linear"](x.float(), w.float(), b.float(), patch)
        with runner.ctx():
            ref = fns["linear"](x, w, b, patch)
    res = {}
    grads_ref = None
    if "fwd+bwd" in modes:
        grads_ref = _grads(torch, fns["linear"], x, w, b, gout, patch, input_grad, runner)
    for m in methods:
        with torch.no_grad(), runner.ctx(), _cudnn_benchmark(torch, bench("fwd")):
            out = fns[m](x, w, b, patch)
        r = {"out_vs_linear": _rel_diff(out, ref), "out_vs_fp32": _rel_diff(out, ref32)}
        del out
        if grads_ref is not None:
            with _cudnn_benchmark(torch, bench("fwd+bwd")):
                grads = _grads(torch, fns[m], x, w, b, gout, patch, input_grad, runner)
            for name in grads_ref:
                r[f"{name}_vs_linear"] = _rel_diff(grads[name], grads_ref[name])
            del grads
        res[m] = r
    return res


def _check_into(checks, failed, torch, fns, methods, case, x, w, b, gout, modes, input_grad, tol, ragged, runner,
                bench):
    """Run :func:`_check` on the ``methods`` that have not failed; append one row per method to ``checks``."""
    ok_methods = [m for m in methods if m not in failed]
    if not ok_methods or "linear" in failed:  # nothing to check, or no reference
        return
    try:
        chk = _check(torch, fns, ok_methods, case, x, w, b, gout, modes, input_grad, runner, bench)
    except Exception as exc:
        failed.setdefault("check", _err(exc))
        chk = {}
    for m, r in chk.items():
        vals = [v for v in r.values()]
        checks.append({"shape": list(case.shape), "patch": list(case.patch), "embed_dim": case.embed_dim,
                       "method": m, **r, "tol": tol, "ok": bool(all(v <= tol for v in vals)), "ragged": ragged})


def _grads(torch, fn, x, w, b, gout, patch, input_grad, runner):
    xg = x.detach().requires_grad_(input_grad)
    wg = w.detach().requires_grad_(True)
    bg = b.detach().requires_grad_(True)
    leaves = [wg, bg] + ([xg] if input_grad else [])
    with runner.ctx():
        out = fn(xg, wg, bg, patch)
    gr = torch.autograd.grad(out, leaves, gout.to(out.dtype))
    return dict(zip(["dW", "db", "dx"], gr))


def _measure(args, runner, fns, methods, case, inputs, mode, input_grad, failed, notes, graphs, target_ms) -> dict:
    """Time ``methods`` on one case and mode, alternating between them (and who goes first) -> {method: {"times",
    "hosts", "graph", "inner", "warmup_s"}}; warmup_s: seconds of the warm-up calls (tile tuning and compiles, cuDNN's
    algorithm search: where a run that stalls spends its time). A method that raises is recorded in ``failed`` and
    left out; the others go on."""
    x, w, b, gout = inputs
    runs, inner, times, hosts, reps, graph_ms, warm_s = {}, {}, {}, {}, {}, {}, {}

    def fail(m, exc):
        failed[m] = _err(exc)
        print(f"  {m} failed on {case.label()} {mode}: {failed[m]}", file=sys.stderr, flush=True)
        runs.pop(m, None)
        with contextlib.suppress(Exception):
            runner.sync()

    for m in methods:
        if m in failed:
            continue
        run_fn = runner.step(fns[m], x, w, b, gout, case.patch, mode, input_grad)
        try:
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                run_fn()
            runner.sync()
            warm_s[m] = time.perf_counter() - t0
            t1, _ = runner.time_block(run_fn, 1)
        except Exception as exc:  # a method that cannot run is reported, the others go on
            fail(m, exc)
            continue
        inner[m] = args.inner or max(1, min(MAX_INNER, math.ceil(target_ms / max(t1, 1e-4))))
        # slow methods (e.g. cuDNN's strided conv3d backward) get fewer repeats, at least 3
        reps[m] = max(min(3, args.repeats),
                      min(args.repeats, int(args.method_budget_s * 1e3 / max(t1 * inner[m], 1e-6))))
        runs[m], times[m], hosts[m] = run_fn, [], []
    order = list(runs)
    for r in range(max(reps.values(), default=0)):
        for m in (order if r % 2 == 0 else order[::-1]):
            if m in runs and r < reps[m]:
                try:
                    ms, host = runner.time_block(runs[m], inner[m])
                except Exception as exc:
                    fail(m, exc)
                    continue
                times[m].append(ms)
                if host is not None:
                    hosts[m].append(host)
    if graphs:
        for m in list(runs):
            try:
                g = runner.graph(runs[m], inner[m])
                graph_ms[m] = [runner.time_graph(g, inner[m]) for _ in range(reps[m])]
                del g
            except Exception as exc:  # keeps the eager time; said in the notes
                notes.append(f"{m} {case.label()} {mode}: CUDA graph failed, eager time kept ({_err(exc)[:200]})")
                with contextlib.suppress(Exception):
                    runner.sync()
    return {m: {"times": times[m], "hosts": hosts[m], "graph": graph_ms.get(m), "inner": inner[m],
                "warmup_s": warm_s[m]} for m in runs}


def _entry(results: list, case: Case, mode: str, input_grad: bool) -> dict:
    """The result row of (case, mode), appended to ``results`` the first time."""
    key = (list(case.shape), list(case.patch), case.embed_dim, mode, input_grad)
    for e in results:
        if (e["shape"], e["patch"], e["embed_dim"], e["mode"], e["input_grad"]) == key:
            return e
    flops = case.flops(mode, input_grad)
    e = {"shape": list(case.shape), "patch": list(case.patch), "embed_dim": case.embed_dim, "tokens": case.tokens,
         "m_tokens": case.shape[0] * case.tokens, "k": case.k, "mode": mode, "input_grad": input_grad,
         "flops": flops, "methods": {}, "linear_over_triton": None, "cudnn_over_triton": None}
    results.append(e)
    return e


def _record(raw: dict, flops: int, peak, cuda: bool, graphs: bool) -> dict:
    ts = raw["times"]
    eager = statistics.median(ts)
    med = statistics.median(raw["graph"]) if raw["graph"] else eager
    tf = flops / (med * 1e-3) / 1e12
    host = statistics.median(raw["hosts"]) if raw["hosts"] else None
    return {"median_ms": med, "times_ms": raw["graph"] or ts, "inner": raw["inner"], "tflops": tf,
            "pct_peak": (100 * tf / peak) if peak else None,
            "timing": "cuda-graph" if raw["graph"] else ("cuda-events" if cuda else "perf_counter"),
            "eager_ms": eager, "host_ms": host, "host_bound": (host >= HOST_BOUND * eager) if host is not None else None,
            "warmup_s": raw["warmup_s"]}


def _ratios(e: dict) -> None:
    tt = e["methods"].get("triton", {}).get("median_ms")
    for m in ("linear", "cudnn"):
        mm = e["methods"].get(m, {}).get("median_ms")
        e[f"{m}_over_triton"] = (mm / tt) if (mm is not None and tt) else None


def _mode_label(mode: str, input_grad: bool) -> str:
    return "fwd" if mode == "fwd" else "fwd+bwd " + ("dW,db,dx" if input_grad else "dW,db")


SPEED_HEAD = (f"{'shape (B,C,I,J,K)':<18} {'patch':<9} {'E':>5} {'N/vol':>6} {'Kp':>6} {'mode':<16} {'method':<7} "
              f"{'median ms':>10} {'host ms':>8} {'TFLOP/s':>8} {'% peak':>7} {'time/triton':>11}")


def _speed_line(e: dict, m: str, graphs: bool) -> str:
    r = e["methods"][m]
    tt = e["methods"].get("triton", {}).get("median_ms")
    ratio = r["median_ms"] / tt if tt else None
    return (f"{'x'.join(map(str, e['shape'])):<18} {'x'.join(map(str, e['patch'])):<9} {e['embed_dim']:>5} "
            f"{e['tokens']:>6} {e['k']:>6} {_mode_label(e['mode'], e['input_grad']):<16} {m:<7} "
            f"{r['median_ms']:10.3f} {_fmt(r['host_ms'], '.3f', 8)} {r['tflops']:8.3g} {_fmt(r['pct_peak'], '.1f', 7)} "
            f"{_fmt(ratio, '.2f', 11)}" + ("  host-bound" if r["host_bound"] and not graphs else ""))


def _write_json(path, doc: dict) -> None:
    """``doc`` as JSON at ``path``, atomically (a temporary file renamed over it): a run killed while writing leaves
    the previous version, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=float))
    os.replace(tmp, path)


def _fmt(v, spec: str, width: int) -> str:
    return f"{'n/a':>{width}}" if v is None else f"{v:{width}{spec}}"


def _parse_methods(text: str) -> list[str]:
    """``--methods`` 'triton,linear' -> the named methods in :data:`METHODS` order; ValueError on unknown/none."""
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise ValueError(f"{text!r}: expected a comma-separated list of {', '.join(METHODS)}")
    return [m for m in METHODS if m in names]


# --- main ------------------------------------------------------------------------------------------

def _usage_error(msg: str) -> int:
    print(f"volfm bench patch-embed: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    """`volfm bench patch-embed ARGS`; the exit status (0 ok, 1 a correctness failure, 2 bad arguments).
    ``--json PATH`` writes every figure (see :func:`run` for the same as a dict)."""
    return run(argv)[0]


def run(argv=None, merge: dict | None = None) -> tuple[int, dict | None]:
    """:func:`main` that also returns the results document (None on bad arguments): what ``--json`` writes.

    ``merge``: the document of an earlier :func:`run` of the same configuration with other ``--methods`` (what
    :func:`run_suite` does to time cuDNN last): its rows, checks, failures and notes are kept and this run's
    methods are added to them, in one document."""
    args = build_parser().parse_args(argv)
    for k in ("repeats", "inner", "cudnn_bwd_max_tokens"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            return _usage_error(f"--{k.replace('_', '-')} must be >= 1"), None
    if args.warmup is not None and args.warmup < 0:
        return _usage_error("--warmup must be >= 0"), None
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        return _usage_error("--peak-tflops must be > 0"), None
    if not args.method_budget_s > 0:
        return _usage_error("--method-budget-s must be > 0"), None
    try:
        args.methods = _parse_methods(args.methods)
    except ValueError as exc:
        return _usage_error(f"--methods {exc}"), None

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        return _usage_error(f"--device {args.device!r}: {' '.join(str(exc).splitlines())}"), None
    if device.type not in ("cuda", "cpu"):
        return _usage_error(f"--device must be cuda[:N] or cpu, got {args.device!r}"), None
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        return _usage_error("--device cuda, but torch sees no CUDA device"), None
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        cases = [parse_shape(s) for s in (args.shapes or (DEFAULT_SHAPES_CUDA if cuda else DEFAULT_SHAPES_CPU))]
    except ValueError as exc:
        return _usage_error(f"--shapes {exc}"), None
    if args.autocast:
        args.dtype = args.dtype or ("bf16" if cuda else "fp16")
        if args.dtype == "fp32":
            return _usage_error("--autocast computes in bf16 or fp16: --dtype bf16|fp16"), None
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.repeats = args.repeats or (20 if cuda else 3)
    if merge is not None and (merge.get("dtype"), merge.get("autocast")) != (args.dtype, args.autocast):
        return _usage_error("merge: the earlier document is of another --dtype / --autocast"), None
    saved_bench = torch.backends.cudnn.benchmark
    try:
        if cuda:
            with torch.cuda.device(device):
                return _run(args, cases, torch, device, merge)
        return _run(args, cases, torch, device, merge)
    finally:
        torch.backends.cudnn.benchmark = saved_bench


def _run(args, cases, torch, device, merge=None) -> tuple[int, dict]:
    cuda = device.type == "cuda"
    cdtype = getattr(torch, DTYPES[args.dtype])
    dtype = torch.float32 if args.autocast else cdtype  # what the inputs and parameters are
    modes = list(MODES) if args.mode == "both" else [args.mode]
    input_grad = not args.no_input_grad
    tol = tolerance(args.dtype)
    graphs = bool(args.cuda_graphs and cuda)
    prior = copy.deepcopy(merge) if merge is not None else {}
    notes = list(prior.get("notes", []))
    if args.cuda_graphs and not cuda and "--cuda-graphs ignored on CPU" not in notes:
        notes.append("--cuda-graphs ignored on CPU")

    methods = list(args.methods)
    triton_skip = None
    if "triton" not in methods:
        pass
    elif cuda:
        if not pe.triton_usable(device):
            triton_skip = "triton is not installed"
        elif pe.triton_interpret_enabled():
            notes.append("TRITON_INTERPRET=1 is set: the triton times are the interpreter's, not the GPU's")
    elif not args.include_interpreted:
        triton_skip = ("on CPU triton runs only under the Triton interpreter; add --include-interpreted "
                       "(with TRITON_INTERPRET=1 set before start) to run it anyway")
    elif not pe.triton_usable("cpu"):
        triton_skip = ("--include-interpreted needs TRITON_INTERPRET=1 in the environment before volfm.kernels "
                       "is imported (and the triton package)" if pe.HAS_TRITON else "triton is not installed")
    if triton_skip:
        methods.remove("triton")
        notes.append(f"triton not run: {triton_skip}")
    # every method of this configuration, this call's and the merged document's (for the goals and the JSON)
    all_methods = [m for m in METHODS if m in methods or m in prior.get("methods", [])]

    if cuda:
        dev_name = torch.cuda.get_device_name(device)
        table_peak = peak_bf16_tflops(dev_name)
    else:
        dev_name = platform.processor() or platform.machine() or "cpu"
        table_peak = None
    peak = args.peak_tflops if args.peak_tflops is not None else table_peak
    peak_src = ("--peak-tflops" if args.peak_tflops is not None else
                "table by device name" if table_peak is not None else None)
    triton_version = None
    if pe.HAS_TRITON:
        triton_version = getattr(pe.triton, "__version__", None)

    fns = _method_fns(torch, F, pe)
    runner = _Runner(torch, device, cuda, autocast=cdtype if args.autocast else None)
    grads_txt = "weight, bias and input" if input_grad else "weight and bias (--no-input-grad)"
    dtype_txt = (f"fp32 inputs and parameters under torch.autocast({device.type}, {args.dtype})" if args.autocast
                 else args.dtype)

    def bench(mode: str) -> bool:
        return cudnn_benchmark_on(args.cudnn_benchmark, mode)

    bench_txt = {"fwd": "on for fwd, off for fwd+bwd (cuDNN's heuristic algorithms)", "on": "on", "off": "off"}[
        args.cudnn_benchmark]
    print(f"volfm bench patch-embed: device {device} ({dev_name}), {dtype_txt}, torch {torch.__version__}, "
          f"triton {triton_version or 'n/a'}" + ("" if cuda else f", {torch.get_num_threads()} threads"))
    print(f"methods: triton = fused Triton implicit GEMM, linear = reshape/permute + F.linear (reference), "
          f"cudnn = F.conv3d(stride=patch).flatten(2).transpose(1, 2) ({'cuDNN' if cuda else 'CPU conv3d'}); "
          f"this run: {', '.join(methods) or 'none'}" + (" (added to an earlier run's rows)" if merge else ""))
    print("shapes are (B, C, I, J, K) as volfm stores volumes (K = slice axis), given to the kernels as "
          "(B, C, D, H, W) = (B, C, I, J, K); patch (pi, pj, pk)")
    print(f"modes: {', '.join(modes)}" + (f"; fwd+bwd = forward + grads wrt {grads_txt}" if "fwd+bwd" in modes
                                          else ""))
    if cuda:
        print(f"timing: {args.warmup} warm-up call(s) per method and mode (kernel configs are picked and compiled "
              f"here; cudnn.benchmark {bench_txt}), then {args.repeats} repeats of {args.inner or 'auto (~2 ms)'} "
              f"back-to-back call(s) between CUDA events, triton and linear alternating, cudnn after them; median "
              f"ms per call" + ("; CUDA-graph replays (eager times in the JSON)" if graphs else "")
              + "; host ms = CPU time to issue one call")
    else:
        print(f"timing: {args.warmup} warm-up call(s), then {args.repeats} repeats of "
              f"{args.inner or 'auto (~20 ms)'} back-to-back call(s) (perf_counter), triton and linear alternating, "
              f"cudnn after them; median ms per call")
        print("NOTE: CPU run -- these numbers say nothing about the GPU goals (triton, if run, is the Triton "
              "interpreter)")
    print(f"FLOPs: fwd 2*B*N*Kp*E (Kp = C*pi*pj*pk); fwd+bwd {3 if input_grad else 2}x fwd; "
          f"peak: " + (f"{peak:g} TFLOP/s dense bf16 ({peak_src})" if peak else
                       "n/a (unknown device; --peak-tflops sets it)"))
    for n in notes:
        print(f"note: {n}")

    failed = dict(prior.get("failed", {}))
    results, checks = list(prior.get("results", [])), list(prior.get("correctness", []))
    target_ms = CUDA_TARGET_MS if cuda else CPU_TARGET_MS
    t_start = time.perf_counter()
    elapsed_before = float(prior.get("elapsed_s", 0.0))

    def document(complete: bool, in_progress: str | None = None) -> dict:
        return {"device": str(device), "device_name": dev_name, "dtype": args.dtype,
                "autocast": args.autocast, "input_dtype": "fp32" if args.autocast else args.dtype,
                "torch": torch.__version__, "triton": triton_version,
                "layout": "(B, C, I, J, K), K = slice axis; kernels' (D, H, W) = (I, J, K)",
                "complete": complete, "in_progress": in_progress, "methods": all_methods,
                "methods_run": [m for m in all_methods if m not in failed], "modes": modes, "input_grad": input_grad,
                "warmup": args.warmup, "repeats": args.repeats, "inner": args.inner, "cuda_graphs": graphs,
                "cudnn_benchmark": args.cudnn_benchmark, "cudnn_bwd_max_tokens": args.cudnn_bwd_max_tokens,
                "method_budget_s": args.method_budget_s, "peak_tflops": peak, "peak_source": peak_src,
                "tolerance": tol, "goal_peak_min_tokens": GOAL_PEAK_MIN_TOKENS,
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                "flops_formula": {"fwd": "2*B*N*Kp*E", "fwd+bwd": f"{3 if input_grad else 2}*fwd"},
                "results": results, "correctness": checks,
                "goals": _goals(args, cuda, results, all_methods, failed, peak, checks, tol), "failed": failed,
                "notes": notes}

    def save(in_progress: str | None) -> None:
        if args.json:
            _write_json(args.json, document(False, in_progress))

    def cudnn_modes(case: Case) -> list[str]:
        """The modes cuDNN is timed (and checked) in on ``case``: fwd+bwd only up to --cudnn-bwd-max-tokens."""
        m_tok = case.shape[0] * case.tokens
        if args.cudnn_bwd_max_tokens is None or m_tok <= args.cudnn_bwd_max_tokens:
            return modes
        return [md for md in modes if md != "fwd+bwd"]

    # triton and linear (alternating) on every shape and mode first, then cuDNN alone: a cuDNN call that takes
    # minutes (an algorithm search, a slow backward) cannot cost the other rows
    groups = [g for g in ([m for m in methods if m != "cudnn"], [m for m in methods if m == "cudnn"]) if g]
    print()
    print("rows as they are measured (indented, with the seconds the warm-up calls took: tuning, compiles, cuDNN's "
          "algorithm search; the full tables follow at the end):")
    print("  " + SPEED_HEAD)
    saved_cudnn_tf32 = torch.backends.cudnn.allow_tf32
    if args.dtype == "fp32":
        torch.backends.cudnn.allow_tf32 = False  # all three methods in full fp32
    try:
        save("starting")
        for group in groups:
            for ci, case in enumerate(cases):
                group_modes = cudnn_modes(case) if group == ["cudnn"] else modes
                for md in modes:
                    if md not in group_modes:
                        notes.append(f"cudnn {md} not timed on {case.label()} ({case.shape[0] * case.tokens} tokens > "
                                     f"--cudnn-bwd-max-tokens {args.cudnn_bwd_max_tokens})")
                        print(f"note: {notes[-1]}", flush=True)
                live = [m for m in group if m not in failed]
                if not live or not group_modes:
                    continue
                inputs = _make_inputs(torch, case, dtype, device, args.seed + ci)  # the same inputs in each group
                print(f"running {case.label()} patch {case.patch_label()} -> {case.embed_dim}: {', '.join(live)} "
                      f"... [{time.perf_counter() - t_start:.1f} s]", flush=True)
                for mode in group_modes:
                    live = [m for m in group if m not in failed]
                    if not live:
                        break
                    what = f"{', '.join(live)} on {case.label()} {mode}"
                    if "cudnn" in live and cuda:
                        print(f"  timing {what} (cudnn.benchmark {'on' if bench(mode) else 'off'}) ... "
                              f"[{time.perf_counter() - t_start:.1f} s]", flush=True)
                    save(what)
                    with _cudnn_benchmark(torch, bench(mode)):
                        raw = _measure(args, runner, fns, live, case, inputs, mode, input_grad, failed, notes, graphs,
                                       target_ms)
                    if not raw:  # every method of the group failed (said on stderr, recorded in "failed")
                        continue
                    e = _entry(results, case, mode, input_grad)
                    for m, r in raw.items():
                        e["methods"][m] = _record(r, e["flops"], peak, cuda, graphs)
                        if m == "cudnn":
                            e["methods"][m]["cudnn_benchmark"] = bench(mode)
                    e["methods"] = {m: e["methods"][m] for m in METHODS if m in e["methods"]}
                    _ratios(e)
                    for m in raw:
                        print(f"  {_speed_line(e, m, graphs)}  (warm-up {raw[m]['warmup_s']:.1f} s)", flush=True)
                    if cuda:
                        torch.cuda.empty_cache()
                    save(f"checking {', '.join(live)} on {case.label()}" if mode == group_modes[-1] else None)
                x, w, b, gout = inputs
                _check_into(checks, failed, torch, fns, group, case, x, w, b, gout, group_modes, input_grad, tol,
                            False, runner, bench)
                del x, w, b, gout, inputs
                if cuda:
                    torch.cuda.empty_cache()
                save(None)
            # the masked edges of every kernel, on a shape that is ragged in M, E and Kp (correctness only)
            ragged = parse_shape(RAGGED_CHECK_SHAPES["cuda" if cuda else "cpu"])
            live = [m for m in group if m not in failed]
            if live:
                save(f"checking {', '.join(live)} on the ragged shape {ragged.label()}")
                x, w, b, gout = _make_inputs(torch, ragged, dtype, device, args.seed + len(cases))
                _check_into(checks, failed, torch, fns, group, ragged, x, w, b, gout,
                            cudnn_modes(ragged) if group == ["cudnn"] else modes, input_grad, tol, True, runner, bench)
                del x, w, b, gout
                save(None)
    finally:
        torch.backends.cudnn.allow_tf32 = saved_cudnn_tf32

    # --- speed table
    print()
    print(SPEED_HEAD)
    print("-" * len(SPEED_HEAD))
    for e in results:
        for m in METHODS:
            if m in e["methods"]:
                print(_speed_line(e, m, graphs))
    print("N/vol = tokens per volume; Kp = C*pi*pj*pk; host ms = CPU time to issue one call (host-bound: close to "
          "the GPU time, which is then an upper bound); time/triton = this method's time / triton's (> 1: triton "
          "is faster), i.e. linear/triton and cudnn/triton")

    # --- correctness table
    print()
    print(f"correctness: max |diff| / max |reference|, tolerance {tol:.3g} ({args.dtype}); "
          f"fp32 ref = linear path on the inputs cast to float32" +
          ("; grads vs the linear path's" if "fwd+bwd" in modes else "")
          + ("; methods and the linear path under autocast" if args.autocast else ""))
    gnames = (["dW", "db"] + (["dx"] if input_grad else [])) if "fwd+bwd" in modes else []
    chead = (f"{'shape (B,C,I,J,K)':<18} {'patch':<9} {'method':<7} {'out vs linear':>13} {'out vs fp32':>11}"
             + "".join(f" {g + ' vs linear':>12}" for g in gnames) + "  ok")
    print(chead)
    print("-" * len(chead))
    shapes_seen = list(dict.fromkeys(tuple(c["shape"]) for c in checks))
    for c in sorted(checks, key=lambda c: (c["ragged"], shapes_seen.index(tuple(c["shape"])),
                                           METHODS.index(c["method"]))):
        vs_lin = "0 (ref)" if c["method"] == "linear" else f"{c['out_vs_linear']:.3g}"
        print(f"{'x'.join(map(str, c['shape'])):<18} {'x'.join(map(str, c['patch'])):<9} {c['method']:<7} "
              f"{vs_lin:>13} {c['out_vs_fp32']:11.3g}"
              + "".join(f" {_fmt(c.get(g + '_vs_linear'), '.3g', 12)}" for g in gnames)
              + f"  {'yes' if c['ok'] else 'NO'}" + ("  (ragged, check only)" if c["ragged"] else ""))

    # --- goals
    print()
    doc = document(True)
    for g in doc["goals"].values():
        print(g["line"])
    for m, err in failed.items():
        print(f"failed: {m}: {err}")
    print(f"cudnn.benchmark: {bench_txt}")
    if args.json:
        _write_json(args.json, doc)
        print(f"results: {args.json}")
    ok = not failed and all(c["ok"] for c in checks)
    return (0 if ok else 1), doc


# What `volfm bench gpu` should run, in one process (kernels compiled and tuned for one run are reused by the next):
# run name -> argv for :func:`run` / :func:`main` (:func:`run_suite` adds "--json PATH"). run_suite times every
# triton/linear row of the suite first and the cuDNN rows of all runs after them (the run with the fewest tokens
# first), so a slow cuDNN call costs only cuDNN rows. Sized for about 120 s on an H100/H200 including the kernel
# compiles and tile tuning (an estimate from the CUDA tests and the old bench's 60 s; not yet measured in this form).
# GPU_RUNS, in the order they are timed:
#   bf16        triton, linear: 8x and 4x x 224x224x160, fwd and fwd+bwd (the main rows; the peak goal on 8x)
#   bf16-no-dx  triton, linear: 4x, fwd+bwd without the input gradient
#   bf16-small  triton, linear: the 2x 96^3 crop, both modes, CUDA-graph replays (eagerly its calls are host-bound;
#               the eager and host times stay in the JSON)
#   autocast    triton, linear: 4x, both modes, fp32 inputs under bf16 autocast
#   then cuDNN: bf16-small (both modes), then bf16: fwd on 8x and 4x (cudnn.benchmark on: its forward search), fwd+bwd
#               on 4x only (heuristic algorithms, 298 ms per call measured there on an H200; 8x would be about
#               twice that, unmeasured: --cudnn-bwd-max-tokens 8192). No cuDNN without dx or under autocast.
SHAPE_LARGE = "4x1x224x224x160:16:768"  # Merlin's batch of 4 at ViT-B's patch 16: M = 7840 tokens
SHAPE_XL = "8x1x224x224x160:16:768"  # M = 15680 >= GOAL_PEAK_MIN_TOKENS: the %-of-peak goal is judged here
SHAPE_SMALL = "2x1x96x96x96:16:768"  # a fine-tuning crop batch: M = 432 tokens
CUDNN_BWD_MAX_TOKENS = 8192  # GPU_RUNS: cuDNN's fwd+bwd on the 4x shape (7840 tokens), not on 8x (15680)
GPU_RUNS = {
    "bf16": ["--shapes", SHAPE_XL, SHAPE_LARGE, "--dtype", "bf16", "--mode", "both",
             "--cudnn-bwd-max-tokens", str(CUDNN_BWD_MAX_TOKENS)],
    "bf16-no-dx": ["--shapes", SHAPE_LARGE, "--dtype", "bf16", "--mode", "fwd+bwd", "--no-input-grad",
                   "--methods", "triton,linear"],
    "bf16-small": ["--shapes", SHAPE_SMALL, "--dtype", "bf16", "--mode", "both", "--cuda-graphs"],
    "autocast": ["--shapes", SHAPE_LARGE, "--autocast", "--mode", "both", "--methods", "triton,linear"],
}
GPU_RUNS_FP = {
    "fp16": ["--shapes", SHAPE_LARGE, "--dtype", "fp16", "--mode", "both"],
    "fp32": ["--shapes", SHAPE_LARGE, "--dtype", "fp32", "--mode", "fwd", "--repeats", "5"],
}
DRY_RUNS = {  # CPU wiring check (Triton under the interpreter when TRITON_INTERPRET=1 is set): seconds
    "dry": ["--device", "cpu", "--shapes", "1x1x8x8x8:4:16", "--dtype", "fp32", "--repeats", "1", "--warmup", "0",
            "--inner", "1", "--mode", "both", "--include-interpreted"],
    "dry-autocast": ["--device", "cpu", "--shapes", "1x1x8x8x8:4:16", "--autocast", "--repeats", "1",
                     "--warmup", "0", "--inner", "1", "--mode", "fwd+bwd", "--no-input-grad", "--include-interpreted"],
}


def _suite_plan(argv) -> tuple[list[str] | None, int]:
    """(the methods, the largest M = B*N of the shapes) of one run's argv; (None, 0) if it does not parse (then
    :func:`run` reports it)."""
    try:
        args = build_parser().parse_args(argv)
        methods = _parse_methods(args.methods)
        tokens = max((c.shape[0] * c.tokens for c in map(parse_shape, args.shapes or ())), default=0)
    except (SystemExit, ValueError):
        return None, 0
    return methods, tokens


def run_suite(runs: dict | None = None, json_dir=None, quiet: bool = False, cudnn_last: bool = True) -> dict:
    """Run several benchmark configurations in this process (default :data:`GPU_RUNS`; :data:`GPU_RUNS_FP` for
    the fp16/fp32 rows, :data:`DRY_RUNS` on a CPU) and return ``{"runs": {name: results document}, "returncode":
    worst exit status, "elapsed_s": ...}``; ``json_dir``: also write ``<json_dir>/pe_<name>.json``, rewritten after
    every shape and mode (``"complete": false`` until that run is done), so a suite killed by a time limit leaves
    every row measured so far; ``quiet``: swallow the printed tables.

    ``cudnn_last`` (default): every run first without cuDNN, then the cuDNN part of each run that has one, runs with
    the fewest tokens first, merged into that run's document (``"pending": ["cudnn"]`` marks a document waiting for
    it, with ``"complete": false``). So every triton and linear row of the suite is measured and written before the first
    cuDNN call."""
    runs = GPU_RUNS if runs is None else runs
    out, worst, t0, later = {}, 0, time.perf_counter(), []
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        for i, (name, argv) in enumerate(runs.items()):
            argv, path = list(argv), None
            if json_dir is not None:
                path = Path(json_dir) / f"pe_{name}.json"
                argv += ["--json", str(path)]
            first, rest = argv, None
            methods, tokens = _suite_plan(argv)
            if cudnn_last and methods and "cudnn" in methods:
                others = [m for m in methods if m != "cudnn"]
                first = (argv + ["--methods", ",".join(others)]) if others else None
                rest = argv + ["--methods", "cudnn"]
            if first is not None:
                print(f"== patch-embed {name}: {' '.join(first)}", flush=True)
                rc, doc = run(first)
                worst = max(worst, rc)
                out[name] = doc if doc is not None else {"returncode": rc}
                if doc is None:
                    continue
            if rest is not None:
                if name in out:
                    out[name].update(complete=False, pending=["cudnn"])
                    if path is not None:
                        _write_json(path, out[name])
                later.append((tokens, i, name, rest))
        for _, _, name, argv in sorted(later):
            print(f"== patch-embed {name}, cuDNN (after every triton/linear row of the suite): {' '.join(argv)}",
                  flush=True)
            rc, doc = run(argv, merge=out.get(name))
            worst = max(worst, rc)
            out[name] = doc if doc is not None else {"returncode": rc}
    out = {name: out[name] for name in runs if name in out}  # in the order of ``runs``
    return {"runs": out, "returncode": worst, "elapsed_s": time.perf_counter() - t0}


def _m_tokens(entry: dict) -> int:
    """Tokens M = B * N of a result row (the GEMM's M)."""
    shape, patch = entry["shape"], entry["patch"]
    return int(shape[0]) * math.prod(int(s) // int(p) for s, p in zip(shape[2:], patch))


def _goals(args, cuda, results, methods, failed, peak, checks, tol) -> dict:
    goals = {}
    names = {"vs_linear": f"goal: triton >= {GOAL_VS_LINEAR:g}x the F.linear path (every shape and mode)",
             "vs_cudnn": "goal: triton faster than cuDNN conv3d (every shape and mode)",
             "peak": f"goal: triton >= {100 * GOAL_PEAK_FRACTION:.0f}% of the dense bf16 peak (fwd, every shape with "
                     f">= {GOAL_PEAK_MIN_TOKENS} tokens)"}
    skip = None
    if not cuda:
        skip = "skipped (no GPU)"
    elif "triton" in failed:
        skip = "FAIL (triton failed)"
    elif "triton" not in methods:
        skip = "skipped (triton not available)"
    if skip:
        for k, n in names.items():
            goals[k] = {"pass": False if skip.startswith("FAIL") else None, "line": f"{n}: {skip}"}
    else:
        for key, m, need in (("vs_linear", "linear", GOAL_VS_LINEAR), ("vs_cudnn", "cudnn", 1.0)):
            rows = [(e[f"{m}_over_triton"], e) for e in results if e.get(f"{m}_over_triton") is not None]
            if not rows:
                goals[key] = {"pass": None, "line": f"{names[key]}: skipped ({m} did not run)"}
                continue
            worst, we = min(rows, key=lambda t: t[0])
            passed = worst >= need if m == "linear" else worst > need
            goals[key] = {"pass": bool(passed), "worst_ratio": worst, "need": need,
                          "worst_at": {"shape": we["shape"], "patch": we["patch"], "mode": we["mode"]},
                          "line": f"{names[key]}: {'PASS' if passed else 'FAIL'} (worst {m}/triton time "
                                  f"x{worst:.2f} at {'x'.join(map(str, we['shape']))} patch "
                                  f"{'x'.join(map(str, we['patch']))} {we['mode']})"}
        fwd = [e for e in results if e["mode"] == "fwd" and "triton" in e["methods"]]
        if args.dtype != "bf16":
            goals["peak"] = {"pass": None, "line": f"{names['peak']}: skipped (dtype {args.dtype}, the goal is bf16)"}
        elif not peak:
            goals["peak"] = {"pass": None, "line": f"{names['peak']}: skipped (peak unknown for this device; "
                                                   f"give --peak-tflops)"}
        elif not fwd:
            goals["peak"] = {"pass": None, "line": f"{names['peak']}: skipped (fwd not measured)"}
        elif not any(_m_tokens(e) >= GOAL_PEAK_MIN_TOKENS for e in fwd):
            biggest = max(_m_tokens(e) for e in fwd)
            goals["peak"] = {"pass": None, "line": f"{names['peak']}: skipped (largest forward has {biggest} tokens; "
                                                   f"add e.g. 8x1x224x224x160:16:768)"}
        else:
            e = min((r for r in fwd if _m_tokens(r) >= GOAL_PEAK_MIN_TOKENS),
                    key=lambda r: r["methods"]["triton"]["tflops"])
            frac = e["methods"]["triton"]["tflops"] / peak
            passed = frac >= GOAL_PEAK_FRACTION
            goals["peak"] = {"pass": bool(passed), "fraction": frac, "shape": e["shape"], "patch": e["patch"],
                             "tokens": _m_tokens(e),
                             "line": f"{names['peak']}: {'PASS' if passed else 'FAIL'} (worst {100 * frac:.1f}% = "
                                     f"{e['methods']['triton']['tflops']:.1f} of {peak:g} TFLOP/s at "
                                     f"{'x'.join(map(str, e['shape']))} patch {'x'.join(map(str, e['patch']))}, "
                                     f"{_m_tokens(e)} tokens)"}
    others = [c for c in checks if c["method"] != "linear"]
    worst = max((max(v for k, v in c.items() if k.endswith(("_vs_linear", "_vs_fp32"))) for c in checks),
                default=None)
    ok = bool(checks) and all(c["ok"] for c in checks) and "check" not in failed
    who = " and ".join(m for m in METHODS if any(c["method"] == m for c in others)) or "(only linear ran)"
    goals["match"] = {"pass": ok, "worst_rel_diff": worst, "tol": tol,
                      "line": f"check: {who} {'matches' if ' and ' not in who else 'match'} the linear path and all "
                              f"match the fp32 reference within {tol:.3g} x max |ref|: {'PASS' if ok else 'FAIL'}"
                              + (f" (worst {worst:.3g})" if worst is not None else " (nothing compared)")}
    return goals


if __name__ == "__main__":
    sys.exit(main())
