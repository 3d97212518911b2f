"""`volfm bench patch-embed`: the fused Triton 3D patch embedding against F.linear and cuDNN conv3d.

3D patch embedding is a Conv3d with kernel == stride: (B, C, I, J, K) volume -> (B, N, E) tokens,
N = (I/pi) * (J/pj) * (K/pk). Three methods run in the same process on the same seeded inputs
(x ~ N(0, 1), weight ~ N(0, 1/Kp), bias ~ N(0, 0.1^2), all in ``--dtype``):

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

Timing: on CUDA, ``--warmup`` untimed calls per method (Triton's autotuner runs during these), then
``--repeats`` timed repeats, each of ``--inner`` back-to-back calls between two CUDA events (auto:
enough calls for about 2 ms, from the time of one call after the warm-up, so launch overhead is
amortised as in a training loop), alternating between the methods; the median per-call time is
reported. On CPU the same with ``time.perf_counter`` and about 20 ms per repeat.

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
triton faster than cuDNN, on every shape and mode; triton >= 60 % of the dense bf16 peak (forward,
largest shape, ``--dtype bf16``). The exit status is 1 when an output or gradient is off by more
than the tolerance or a method fails, 0 otherwise (also when a speed goal fails).

On a machine without CUDA the Triton kernels only run under the Triton interpreter
(TRITON_INTERPRET=1 set before volfm.kernels is imported; very slow), so the defaults there are
float32 and small shapes, triton is included only with ``--include-interpreted``, and the numbers
say nothing about the GPU goals.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import volfm.kernels.patch_embed as pe
from volfm.bench.common import write_results

METHODS = ("triton", "linear", "cudnn")
MODES = ("fwd", "fwd+bwd")

DEFAULT_SHAPES_CUDA = (
    "4x1x224x224x160:16:768",
    "4x4x224x224x160:16:768",
    "2x1x96x96x96:16:768",
    "2x1x224x224x160:16x16x8:768",  # anisotropic: 8 along the slice axis K
)
DEFAULT_SHAPES_CPU = (
    "2x1x64x64x32:16:96",
    "2x1x64x64x32:16x16x8:96",
)

GOAL_VS_LINEAR = 1.3
GOAL_PEAK_FRACTION = 0.60
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
    p.add_argument("--mode", choices=["fwd", "fwd+bwd", "both"], default="both",
                   help="forward only, forward + backward, or both (default both)")
    p.add_argument("--no-input-grad", action="store_true",
                   help="fwd+bwd: gradients for weight and bias only, not the input (a first layer)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
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
    """Callables for one (case, mode, method) and their timing."""

    def __init__(self, torch, device, cuda: bool):
        self.torch, self.device, self.cuda = torch, device, cuda

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def step(self, fn, x, w, b, gout, patch, mode: str, input_grad: bool):
        torch = self.torch
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return fn(x, w, b, patch)
            return run
        xg = x.detach().requires_grad_(input_grad)
        wg = w.detach().requires_grad_(True)
        bg = b.detach().requires_grad_(True)
        leaves = [wg, bg] + ([xg] if input_grad else [])

        def run():
            out = fn(xg, wg, bg, patch)
            return out, torch.autograd.grad(out, leaves, gout)
        return run

    def time_block(self, run, inner: int) -> float:
        """Milliseconds per call of ``inner`` back-to-back calls."""
        torch = self.torch
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            run()
        return (time.perf_counter() - t0) * 1e3 / inner


def _check(torch, fns, methods, case, x, w, b, gout, modes, input_grad):
    """Outputs (and grads in fwd+bwd) of every method vs the linear path; outputs vs an fp32 reference."""
    patch = case.patch
    with torch.no_grad():
        ref32 = fns["linear"](x.float(), w.float(), b.float(), patch)
        ref = fns["linear"](x, w, b, patch)
    res = {}
    grads_ref = None
    if "fwd+bwd" in modes:
        grads_ref = _grads(torch, fns["linear"], x, w, b, gout, patch, input_grad)
    for m in methods:
        with torch.no_grad():
            out = fns[m](x, w, b, patch)
        r = {"out_vs_linear": _rel_diff(out, ref), "out_vs_fp32": _rel_diff(out, ref32)}
        del out
        if grads_ref is not None:
            grads = _grads(torch, fns[m], x, w, b, gout, patch, input_grad)
            for name in grads_ref:
                r[f"{name}_vs_linear"] = _rel_diff(grads[name], grads_ref[name])
            del grads
        res[m] = r
    return res


def _check_into(checks, failed, torch, fns, methods, case, x, w, b, gout, modes, input_grad, tol, ragged):
    """Run :func:`_check` on the methods that have not failed; append one row per method to ``checks``."""
    ok_methods = [m for m in methods if m not in failed]
    if "linear" not in ok_methods:
        return
    try:
        chk = _check(torch, fns, ok_methods, case, x, w, b, gout, modes, input_grad)
    except Exception as exc:
        failed.setdefault("check", f"{type(exc).__name__}: {' '.join(str(exc).splitlines())[:300]}")
        chk = {}
    for m, r in chk.items():
        vals = [v for v in r.values()]
        checks.append({"shape": list(case.shape), "patch": list(case.patch), "embed_dim": case.embed_dim,
                       "method": m, **r, "tol": tol, "ok": bool(all(v <= tol for v in vals)), "ragged": ragged})


def _grads(torch, fn, x, w, b, gout, patch, input_grad):
    xg = x.detach().requires_grad_(input_grad)
    wg = w.detach().requires_grad_(True)
    bg = b.detach().requires_grad_(True)
    leaves = [wg, bg] + ([xg] if input_grad else [])
    out = fn(xg, wg, bg, patch)
    gr = torch.autograd.grad(out, leaves, gout)
    return dict(zip(["dW", "db", "dx"], gr))


def _fmt(v, spec: str, width: int) -> str:
    return f"{'n/a':>{width}}" if v is None else f"{v:{width}{spec}}"


# --- main ------------------------------------------------------------------------------------------

def _usage_error(msg: str) -> int:
    print(f"volfm bench patch-embed: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for k in ("repeats", "inner"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            return _usage_error(f"--{k} must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        return _usage_error("--warmup must be >= 0")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        return _usage_error("--peak-tflops must be > 0")

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        return _usage_error(f"--device {args.device!r}: {' '.join(str(exc).splitlines())}")
    if device.type not in ("cuda", "cpu"):
        return _usage_error(f"--device must be cuda[:N] or cpu, got {args.device!r}")
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        return _usage_error("--device cuda, but torch sees no CUDA device")
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        cases = [parse_shape(s) for s in (args.shapes or (DEFAULT_SHAPES_CUDA if cuda else DEFAULT_SHAPES_CPU))]
    except ValueError as exc:
        return _usage_error(f"--shapes {exc}")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.repeats = args.repeats or (20 if cuda else 3)
    if cuda:
        with torch.cuda.device(device):
            return _run(args, cases, torch, device)
    return _run(args, cases, torch, device)


def _run(args, cases, torch, device) -> int:
    cuda = device.type == "cuda"
    dtype = getattr(torch, DTYPES[args.dtype])
    modes = list(MODES) if args.mode == "both" else [args.mode]
    input_grad = not args.no_input_grad
    tol = tolerance(args.dtype)
    notes = []

    methods = ["triton", "linear", "cudnn"]
    triton_skip = None
    if cuda:
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
    runner = _Runner(torch, device, cuda)
    grads_txt = "weight, bias and input" if input_grad else "weight and bias (--no-input-grad)"
    mode_label = {"fwd": "fwd", "fwd+bwd": "fwd+bwd " + ("dW,db,dx" if input_grad else "dW,db")}

    print(f"volfm bench patch-embed: device {device} ({dev_name}), {args.dtype}, torch {torch.__version__}, "
          f"triton {triton_version or 'n/a'}" + ("" if cuda else f", {torch.get_num_threads()} threads"))
    print(f"methods: triton = fused Triton implicit GEMM, linear = reshape/permute + F.linear (reference), "
          f"cudnn = F.conv3d(stride=patch).flatten(2).transpose(1, 2) ({'cuDNN' if cuda else 'CPU conv3d'})")
    print("shapes are (B, C, I, J, K) as volfm stores volumes (K = slice axis), given to the kernels as "
          "(B, C, D, H, W) = (B, C, I, J, K); patch (pi, pj, pk)")
    print(f"modes: {', '.join(modes)}" + (f"; fwd+bwd = forward + grads wrt {grads_txt}" if "fwd+bwd" in modes
                                          else ""))
    if cuda:
        print(f"timing: {args.warmup} warm-up call(s) per method and mode (Triton autotunes here), then "
              f"{args.repeats} repeats of {args.inner or 'auto (~2 ms)'} back-to-back call(s) between CUDA events, "
              f"methods alternating; median ms per call")
    else:
        print(f"timing: {args.warmup} warm-up call(s), then {args.repeats} repeats of "
              f"{args.inner or 'auto (~20 ms)'} back-to-back call(s) (perf_counter), methods alternating; "
              f"median ms per call")
        print("NOTE: CPU run -- these numbers say nothing about the GPU goals (triton, if run, is the Triton "
              "interpreter)")
    print(f"FLOPs: fwd 2*B*N*Kp*E (Kp = C*pi*pj*pk); fwd+bwd {3 if input_grad else 2}x fwd; "
          f"peak: " + (f"{peak:g} TFLOP/s dense bf16 ({peak_src})" if peak else
                       "n/a (unknown device; --peak-tflops sets it)"))
    for n in notes:
        print(f"note: {n}")

    saved_cudnn_tf32 = torch.backends.cudnn.allow_tf32
    if args.dtype == "fp32":
        torch.backends.cudnn.allow_tf32 = False  # all three methods in full fp32
    failed = {}
    results, checks = [], []
    target_ms = CUDA_TARGET_MS if cuda else CPU_TARGET_MS
    try:
        for ci, case in enumerate(cases):
            x, w, b, gout = _make_inputs(torch, case, dtype, device, args.seed + ci)
            print(f"running {case.label()} patch {case.patch_label()} -> {case.embed_dim} ...", flush=True)
            for mode in modes:
                runs, inner, times = {}, {}, {}
                for m in list(methods):
                    if m in failed:
                        continue
                    run = runner.step(fns[m], x, w, b, gout, case.patch, mode, input_grad)
                    try:
                        for _ in range(args.warmup):
                            run()
                        runner.sync()
                        if args.inner:
                            inner[m] = args.inner
                        else:  # enough back-to-back calls for about target_ms per repeat
                            t1 = runner.time_block(run, 1)
                            inner[m] = max(1, min(MAX_INNER, math.ceil(target_ms / max(t1, 1e-4))))
                    except Exception as exc:  # a method that cannot run is reported, the others go on
                        failed[m] = f"{type(exc).__name__}: {' '.join(str(exc).splitlines())[:300]}"
                        print(f"  {m} failed on {case.label()} {mode}: {failed[m]}", file=sys.stderr)
                        runner.sync()
                        continue
                    runs[m], times[m] = run, []
                order = list(runs)
                for r in range(args.repeats):  # alternate the methods, and who goes first
                    for m in (order if r % 2 == 0 else order[::-1]):
                        times[m].append(runner.time_block(runs[m], inner[m]))
                del runs
                flops = case.flops(mode, input_grad)
                entry = {"shape": list(case.shape), "patch": list(case.patch), "embed_dim": case.embed_dim,
                         "tokens": case.tokens, "k": case.k, "mode": mode, "input_grad": input_grad,
                         "flops": flops, "methods": {}}
                for m, ts in times.items():
                    med = statistics.median(ts)
                    tf = flops / (med * 1e-3) / 1e12
                    entry["methods"][m] = {"median_ms": med, "times_ms": ts, "inner": inner[m], "tflops": tf,
                                           "pct_peak": (100 * tf / peak) if peak else None}
                tt = entry["methods"].get("triton", {}).get("median_ms")
                for m in ("linear", "cudnn"):
                    mm = entry["methods"].get(m, {}).get("median_ms")
                    entry[f"{m}_over_triton"] = (mm / tt) if (mm is not None and tt) else None
                results.append(entry)
                if cuda:
                    torch.cuda.empty_cache()
            _check_into(checks, failed, torch, fns, methods, case, x, w, b, gout, modes, input_grad, tol, False)
            del x, w, b, gout
            if cuda:
                torch.cuda.empty_cache()
        # the masked edges of every kernel, on a shape that is ragged in M, E and Kp (correctness only)
        ragged = parse_shape(RAGGED_CHECK_SHAPES["cuda" if cuda else "cpu"])
        x, w, b, gout = _make_inputs(torch, ragged, dtype, device, args.seed + len(cases))
        _check_into(checks, failed, torch, fns, methods, ragged, x, w, b, gout, modes, input_grad, tol, True)
        del x, w, b, gout
    finally:
        torch.backends.cudnn.allow_tf32 = saved_cudnn_tf32

    # --- speed table
    print()
    head = (f"{'shape (B,C,I,J,K)':<18} {'patch':<9} {'E':>5} {'N/vol':>6} {'Kp':>6} {'mode':<16} {'method':<7} "
            f"{'median ms':>10} {'TFLOP/s':>8} {'% peak':>7} {'time/triton':>11}")
    print(head)
    print("-" * len(head))
    for e in results:
        tt = e["methods"].get("triton", {}).get("median_ms")
        for m in METHODS:
            r = e["methods"].get(m)
            if r is None:
                continue
            ratio = r["median_ms"] / tt if tt else None
            print(f"{'x'.join(map(str, e['shape'])):<18} {'x'.join(map(str, e['patch'])):<9} {e['embed_dim']:>5} "
                  f"{e['tokens']:>6} {e['k']:>6} {mode_label[e['mode']]:<16} {m:<7} {r['median_ms']:10.3f} "
                  f"{r['tflops']:8.3g} {_fmt(r['pct_peak'], '.1f', 7)} {_fmt(ratio, '.2f', 11)}")
    print("N/vol = tokens per volume; Kp = C*pi*pj*pk; time/triton = this method's time / triton's "
          "(> 1: triton is faster), i.e. linear/triton and cudnn/triton")

    # --- correctness table
    print()
    print(f"correctness: max |diff| / max |reference|, tolerance {tol:.3g} ({args.dtype}); "
          f"fp32 ref = linear path on the inputs cast to float32" +
          ("; grads vs the linear path's" if "fwd+bwd" in modes else ""))
    gnames = (["dW", "db"] + (["dx"] if input_grad else [])) if "fwd+bwd" in modes else []
    chead = (f"{'shape (B,C,I,J,K)':<18} {'patch':<9} {'method':<7} {'out vs linear':>13} {'out vs fp32':>11}"
             + "".join(f" {g + ' vs linear':>12}" for g in gnames) + "  ok")
    print(chead)
    print("-" * len(chead))
    for c in checks:
        vs_lin = "0 (ref)" if c["method"] == "linear" else f"{c['out_vs_linear']:.3g}"
        print(f"{'x'.join(map(str, c['shape'])):<18} {'x'.join(map(str, c['patch'])):<9} {c['method']:<7} "
              f"{vs_lin:>13} {c['out_vs_fp32']:11.3g}"
              + "".join(f" {c[g + '_vs_linear']:12.3g}" for g in gnames) + f"  {'yes' if c['ok'] else 'NO'}"
              + ("  (ragged, check only)" if c["ragged"] else ""))

    # --- goals
    print()
    goals = _goals(args, cuda, results, methods, failed, peak, checks, tol)
    for g in goals.values():
        print(g["line"])
    for m, err in failed.items():
        print(f"failed: {m}: {err}")

    if args.json:
        doc = {"device": str(device), "device_name": dev_name, "dtype": args.dtype, "torch": torch.__version__,
               "triton": triton_version, "layout": "(B, C, I, J, K), K = slice axis; kernels' (D, H, W) = (I, J, K)",
               "methods_run": [m for m in methods if m not in failed], "modes": modes, "input_grad": input_grad,
               "warmup": args.warmup, "repeats": args.repeats, "inner": args.inner, "peak_tflops": peak,
               "peak_source": peak_src, "tolerance": tol,
               "flops_formula": {"fwd": "2*B*N*Kp*E", "fwd+bwd": f"{3 if input_grad else 2}*fwd"},
               "results": results, "correctness": checks, "goals": goals, "failed": failed, "notes": notes}
        write_results(args.json, doc)
    ok = not failed and all(c["ok"] for c in checks)
    return 0 if ok else 1


def _goals(args, cuda, results, methods, failed, peak, checks, tol) -> dict:
    goals = {}
    names = {"vs_linear": f"goal: triton >= {GOAL_VS_LINEAR:g}x the F.linear path (every shape and mode)",
             "vs_cudnn": "goal: triton faster than cuDNN conv3d (every shape and mode)",
             "peak": f"goal: triton >= {100 * GOAL_PEAK_FRACTION:.0f}% of the dense bf16 peak (fwd, largest shape)"}
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
        else:
            e = max(fwd, key=lambda r: r["flops"])
            frac = e["methods"]["triton"]["tflops"] / peak
            passed = frac >= GOAL_PEAK_FRACTION
            goals["peak"] = {"pass": bool(passed), "fraction": frac, "shape": e["shape"], "patch": e["patch"],
                             "line": f"{names['peak']}: {'PASS' if passed else 'FAIL'} ({100 * frac:.1f}% = "
                                     f"{e['methods']['triton']['tflops']:.1f} of {peak:g} TFLOP/s at "
                                     f"{'x'.join(map(str, e['shape']))} patch {'x'.join(map(str, e['patch']))})"}
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
