"""`volfm bench gpu`: every GPU figure volfm reports, from one command, in one short GPU slot.

GPU time comes in short slots, so one command measures everything the README's GPU section shows and writes it
as ``bench_gpu.json`` (every step's results) and ``bench_gpu.md`` (README-ready tables) in ``--out``:

    env              the device, the software, and two ceilings measured on it: a bf16 8192^3 matrix product
                     (TFLOP/s) and a device-to-device copy (GB/s); checks that the Triton patch embedding runs
                     under bf16 autocast and agrees with the torch path
    patch-embed      ``volfm bench patch-embed``: Triton vs reshape+F.linear vs cuDNN conv3d in bf16, forward and
                     forward+backward, with and without the input gradient, under autocast, correctness vs fp32
    sliding-window   ``volfm bench sliding-window`` on the GPU: volfm vs MONAI, same model, same outputs, peak memory
    store            a synthetic Merlin-size cohort (224 x 224 x 160 CTs, ICD codes, reports) through the real
                     pipeline (``volfm synth`` + ``volfm preprocess --spec ct_merlin``), then the same store
                     converted to the compact blosc2 encoding; bytes per case of each
    fit-resnet152    a bf16-mixed ``fit`` of PretrainTask (the ICD pretext, Merlin's stage 1) with resnet152_3d on
                     whole 224 x 224 x 160 volumes for a fixed number of steps: volumes/s, peak memory, the time
                     waiting for data against the time computing (is the loader the bottleneck?)
    fit-vit-triton   the same with vit_base_3d and the Triton patch embedding,
    fit-vit-torch    ... and with the torch patch embedding
    fit-resnet152-blosc2, patch-embed-fp   the ResNet fit reading the blosc2 store; patch-embed rows in fp16 / fp32

Each step runs in its own process (``python -m volfm.bench.gpu --step NAME``), so a CUDA fault or an out-of-memory
error cannot take the others down, under a deadline inside ``--budget-s`` (default 480 s): a step that runs over is
killed and recorded as ``timeout``, and the next ones still run while time is left. The exit status is 1 when a
correctness check failed, a step crashed, ran out of time or was skipped for lack of budget (its figures are
missing), 0 otherwise (a missed speed goal is reported, not an error).

It installs nothing. Without a CUDA device it stops with one line, unless ``--dry-run``, which runs the same steps on
the CPU with tiny shapes (Triton under its interpreter) to check that every step is wired; CI runs that.

    volfm bench gpu [--out bench_gpu] [--budget-s 480] [--steps env,patch-embed,...] [--cases 24] [--fit-steps 20]
                    [--workers N] [--dry-run]

On a bare GPU machine without network: ``scripts/gpu_check.sh`` installs the carried wheels and runs this.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from volfm.bench.common import write_results

STEPS = ("env", "patch-embed", "sliding-window", "store", "fit-resnet152", "fit-vit-triton", "fit-vit-torch",
         "fit-resnet152-blosc2", "patch-embed-fp")
# seconds each step may take at most on an H100/H200 (imports, Triton autotuning and cuDNN benchmarking included);
# the whole run is further capped by --budget-s. The dry run (CPU, interpreter) has its own, larger, caps.
STEP_SECONDS = {"env": 45, "patch-embed": 150, "sliding-window": 120, "store": 90, "fit-resnet152": 110,
                "fit-vit-triton": 80, "fit-vit-torch": 70, "fit-resnet152-blosc2": 90, "patch-embed-fp": 90}
# the H200 run of 2026-12-04: sliding-window's three processes took 17 s each to start and warm up (75 s was short)
DRY_STEP_SECONDS = {s: 240 for s in STEPS}
MERLIN_SIZE = (224, 224, 160)
DRY_SIZE = (32, 32, 32)
DRY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}  # the interpreter is slow: a tiny ViT
# step -> ((encoder, kwargs) on the GPU, (encoder, kwargs) in the dry run, batch on the GPU, store encoding)
FIT_MODELS = {
    "fit-resnet152": (("resnet152_3d", {}), ("resnet18_3d", {"base_channels": 8}), 4, "npy"),
    "fit-resnet152-blosc2": (("resnet152_3d", {}), ("resnet18_3d", {"base_channels": 8}), 4, "blosc2"),
    "fit-vit-triton": (("vit_base_3d", {"patch_backend": "triton"}), ("vit_base_3d", {"patch_backend": "triton",
                                                                                      **DRY_VIT}), 4, "npy"),
    "fit-vit-torch": (("vit_base_3d", {"patch_backend": "torch"}), ("vit_base_3d", {"patch_backend": "torch",
                                                                                    **DRY_VIT}), 4, "npy"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="volfm bench gpu", description="every GPU figure in one command (see the module "
                                "docstring): patch embedding, sliding window, store, bf16 fits")
    p.add_argument("--out", default="bench_gpu", help="folder for bench_gpu.json, bench_gpu.md and the step logs")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all steps (default 480)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--cases", type=int, default=24, help="cases in the synthetic store (default 24)")
    p.add_argument("--fit-steps", type=int, default=20, help="timed optimiser steps per fit (default 20)")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps before them (default 5)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of the fits (default min(8, CPUs - 2), the recipes' 8)")
    p.add_argument("--dry-run", action="store_true", help="run every step on the CPU with tiny shapes (wiring check)")
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------------- the runner
def _stream(proc: subprocess.Popen, log, prefix: str) -> None:
    for line in proc.stdout:
        log.write(line)
        log.flush()
        print(f"{prefix}{line}", end="", flush=True)


def run_step(step: str, args, work: Path, timeout: float) -> dict:
    """Run one step in its own process (its own session, so a timeout kills its children too) -> record."""
    cmd = [sys.executable, "-m", "volfm.bench.gpu", "--step", step, "--work", str(work), "--cases", str(args.cases),
           "--fit-steps", str(args.fit_steps), "--warmup-steps", str(args.warmup_steps)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if args.dry_run:
        cmd.append("--dry-run")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"  # the dry run keeps every tensor on the CPU; set before volfm.kernels is imported
    result_file = work / f"{step}.json"
    result_file.unlink(missing_ok=True)
    t0, started = time.perf_counter(), time.time()
    with open(work / "logs" / f"{step}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        reader = threading.Thread(target=_stream, args=(proc, log, f"  [{step}] "), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
        reader.join(timeout=5)
    rec = {"step": step, "status": status, "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
           "limit_s": round(timeout, 1)}
    if result_file.is_file():
        rec["result"] = json.loads(result_file.read_text())
    elif step.startswith("patch-embed"):
        # killed mid-suite: the patch-embed bench rewrites pe_<run>.json (atomically) after every row it measures
        runs = {f.stem[3:]: json.loads(f.read_text()) for f in sorted(work.glob("pe_*.json"))
                if f.stat().st_mtime >= started}
        if runs:
            rec["result"] = {"runs": runs, "partial": True}
        if status == "ok" and rec["result"].get("check_failed"):
            rec["status"] = "check failed"
    elif status == "ok":
        rec["status"] = "failed"  # exited 0 without results: a wiring bug
    if rec["status"] != "ok":
        tail = (work / "logs" / f"{step}.log").read_text().strip().splitlines()[-3:]
        rec["error"] = " | ".join(t.strip() for t in tail)[-400:]
    return rec


def _device_line() -> str:
    return f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.step:
        return run_worker(args)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"volfm bench gpu: error: unknown step {unknown[0]!r}; steps: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    if args.cases < 4 or args.fit_steps < 1 or args.warmup_steps < 0 or args.budget_s <= 0:
        print("volfm bench gpu: error: need --cases >= 4, --fit-steps >= 1, --warmup-steps >= 0, --budget-s > 0",
              file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print(f"volfm bench gpu: error: no CUDA device ({_device_line()}); run it on a GPU machine, or --dry-run to "
              "check the wiring on this one", file=sys.stderr)
        return 2
    out = Path(args.out)
    work = out / "work"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    caps = DRY_STEP_SECONDS if args.dry_run else STEP_SECONDS
    started = time.perf_counter()
    deadline = started + args.budget_s
    print(f"volfm bench gpu{' --dry-run (CPU, tiny shapes: wiring only, no GPU figures)' if args.dry_run else ''}: "
          f"{len(steps)} steps, budget {args.budget_s:.0f} s, {_device_line()}; results in {out}")
    records = []
    for step in steps:
        left = deadline - time.perf_counter()
        if left < 10:
            records.append({"step": step, "status": "skipped (budget spent)", "seconds": 0.0})
            print(f"- {step}: skipped, {left:.0f} s of the budget left")
            continue
        limit = min(caps[step], left)
        print(f"- {step} (at most {limit:.0f} s)", flush=True)
        rec = run_step(step, args, work, limit)
        records.append(rec)
        print(f"- {step}: {rec['status']} in {rec['seconds']:.1f} s" + (f" ({rec['error']})" if "error" in rec else ""),
              flush=True)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "dry_run": args.dry_run, "budget_s": args.budget_s, "total_s": round(time.perf_counter() - started, 1),
           "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
           "args": {"cases": args.cases, "fit_steps": args.fit_steps, "warmup_steps": args.warmup_steps,
                    "workers": args.workers},
           "steps": records}
    write_results(out / "bench_gpu.json", doc)
    md = render_markdown(doc)
    (out / "bench_gpu.md").write_text(md)
    print(f"markdown: {out / 'bench_gpu.md'}\n")
    print(md)
    bad = [f"{r['step']} ({r['status']})" for r in records if r["status"] != "ok"]
    if bad:
        print(f"volfm bench gpu: figures missing or wrong from: {', '.join(bad)}; see {work / 'logs'}")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------- the report
def _f(v, fmt="{:.3g}", none="-"):
    return none if v is None else fmt.format(v)


def _table(head: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def _pe_rows(runs: dict) -> tuple[list[list], list[str]]:
    rows, goals = [], []
    for name, doc in runs.items():
        if not isinstance(doc, dict) or "results" not in doc:
            continue
        for r in doc["results"]:
            shape = "x".join(map(str, r["shape"]))
            base = r["methods"].get("linear", {}).get("median_ms")
            for method, m in r["methods"].items():
                ratio = base / m["median_ms"] if base and m.get("median_ms") else None
                rows.append([name, shape, r["mode"] + ("" if r.get("input_grad", True) else " (no dx)"), method,
                             _f(m.get("median_ms"), "{:.3f}"), _f(m.get("tflops"), "{:.0f}"),
                             _f(m.get("pct_peak"), "{:.1f}"), _f(ratio, "{:.2f}")])
        goals += [f"- {name}: {g['line']}" for g in doc.get("goals", {}).values() if isinstance(g, dict) and "line" in g]
        if doc.get("complete") is False:
            goals.append(f"- {name}: INCOMPLETE, stopped while measuring {doc.get('in_progress') or '?'} "
                         f"(pending: {', '.join(doc.get('pending') or []) or '-'})")
    return rows, goals


def render_markdown(doc: dict) -> str:
    steps = {r["step"]: r for r in doc["steps"]}
    res = {k: r.get("result") or {} for k, r in steps.items()}
    env = res.get("env", {})
    out = [f"### volfm bench gpu, {doc['date']}" + (" (dry run on CPU: wiring only)" if doc["dry_run"] else ""), ""]
    if env:
        out += [f"{env.get('device_name', '?')} ({env.get('sm_count', '?')} SMs, {_f(env.get('memory_gib'), '{:.0f}')} "
                f"GiB), {env.get('cpus')} CPU cores; torch {env.get('torch')}, CUDA {env.get('cuda')}, triton "
                f"{env.get('triton')}, Python {env.get('python')}. Measured ceilings: bf16 matmul "
                f"{_f(env.get('matmul_bf16_tflops'), '{:.0f}')} TFLOP/s ({env.get('matmul_shape')}), device copy "
                f"{_f(env.get('copy_gbps'), '{:.0f}')} GB/s (read + write). Triton patch embedding under "
                f"{env.get('autocast_dtype')} autocast: output {env.get('autocast_out_dtype')}, max rel. diff to the "
                f"torch path {_f(env.get('autocast_rel_diff'))} ({'ok' if env.get('autocast_ok') else 'FAILED'}).", ""]
    runs = {}
    for key in ("patch-embed", "patch-embed-fp"):
        runs.update(res.get(key, {}).get("runs", {}))
    if runs:
        rows, goals = _pe_rows(runs)
        out += ["**Patch embedding** (median ms per call; speed-up = F.linear time / this method's)", ""]
        out += _table(["run", "shape (B,C,I,J,K)", "mode", "method", "ms", "TFLOP/s", "% bf16 peak", "speed-up"], rows)
        out += [""] + goals + [""]
    sw = res.get("sliding-window", {}).get("doc")
    if sw:
        rows = []
        for name, r in sw["results"].items():
            mem = r.get("peak_cuda_bytes", r.get("peak_rss_rise_bytes"))
            rows.append([name, _f(r.get("median_s"), "{:.3f}"), _f(mem / 2**20 if mem else None, "{:.0f}"),
                         r.get("accumulate_on", "")])
        out += [f"**Sliding window** ({'x'.join(map(str, sw['size']))} volume, {'x'.join(map(str, sw['patch']))} "
                f"windows, overlap {sw['overlap']}, gaussian; MONAI/volfm time {sw['ratio_monai_over_volfm']:.2f}, "
                f"max |diff| {sw['max_abs_diff']:.3g})", ""]
        out += _table(["method", "median s", "peak MiB", "accumulate on"], rows) + [""]
    st = res.get("store", {})
    if st:
        rows = [[enc, s["cases"], _f(s["bytes_per_case"] / 2**20, "{:.1f}"), _f(s.get("ratio"), "{:.3f}"),
                 _f(s["seconds"], "{:.1f}")] for enc, s in st.get("stores", {}).items()]
        out += [f"**Store** ({st.get('cases')} synthetic {'x'.join(map(str, st.get('size', [])))} CTs through "
                f"ct_merlin, {st.get('workers')} workers)", ""]
        out += _table(["encoding", "cases", "MiB per case", "bytes vs float32", "build/convert s"], rows) + [""]
    fits = [(k, res[k]) for k in FIT_MODELS if res.get(k)]
    if fits:
        rows = []
        for k, f in fits:
            rows.append([k, f["encoder"], f.get("patch_backend", "-"), f["store_encoding"], f["batch"],
                         _f(f["volumes_per_s"], "{:.2f}"), _f(f.get("steady_volumes_per_s"), "{:.2f}"),
                         _f(f["compute_ms_median"], "{:.0f}"), _f(f["data_wait_ms_median"], "{:.1f}"),
                         _f(f["data_wait_fraction"] * 100, "{:.1f}"), _f(f["peak_gib"], "{:.1f}"),
                         "yes" if f["loader_bound"] else "no"])
        f0 = fits[0][1]
        out += [f"**bf16-mixed fit, PretrainTask (ICD pretext)** on whole {'x'.join(map(str, f0['size']))} volumes: "
                f"{f0['timed_steps']} timed steps after {f0['warmup_steps']}, {f0['workers']} loader workers, "
                f"precision {f0['precision']}; data wait = time from one step's end to the next one's start "
                f"(waiting on the loader; the pinned host-to-device copy is asynchronous and lands in the step)", ""]
        out += _table(["step", "encoder", "patch embed", "store", "batch", "volumes/s", "volumes/s at median step",
                       "compute ms (median)", "data wait ms (median)", "data wait % (total)", "peak GiB",
                       "loader-bound?"], rows) + [""]
    rows = [[r["step"], r["status"], _f(r.get("seconds"), "{:.1f}"), r.get("error", "")[:120]] for r in doc["steps"]]
    out += [f"Steps (total {doc['total_s']:.0f} s of a {doc['budget_s']:.0f} s budget):", ""]
    out += _table(["step", "status", "s", "note"], rows)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- the steps
# Each step is its own process and imports only its stack inside its function (the PLC0415 exemptions):
# measured on the 2-core dev machine, `import lightning.pytorch` alone takes 5.5 s (torch 1.1 s), which the
# runner and the kernel / sliding-window steps need not pay.
class _Ctx:
    def __init__(self, args):
        self.args = args
        self.dry = bool(args.dry_run)
        self.cuda = torch.cuda.is_available() and not self.dry
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.work = Path(args.work)
        self.size = DRY_SIZE if self.dry else MERLIN_SIZE
        cpus = os.cpu_count() or 1
        self.workers = args.workers if args.workers is not None else (min(8, max(1, cpus - 2)) if not self.dry else 0)


def _cuda_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def step_env(ctx) -> dict:
    from volfm.kernels.patch_embed import HAS_TRITON  # noqa: PLC0415 - each step imports only its own stack
    from volfm.models.patch_embed import PatchEmbed3d  # noqa: PLC0415

    res = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpus": os.cpu_count(), "device_name": "cpu (dry run)", "triton": None}
    if HAS_TRITON:
        import triton  # noqa: PLC0415

        res["triton"] = triton.__version__
    if ctx.cuda:
        prop = torch.cuda.get_device_properties(0)
        res.update(device_name=prop.name, sm_count=prop.multi_processor_count, memory_gib=prop.total_memory / 2**30,
                   capability=f"{prop.major}.{prop.minor}")
    n = 8192 if ctx.cuda else 256
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    if ctx.cuda:
        ms = _cuda_ms(lambda: a @ b, 3, 10)
        buf = torch.empty(2**29, device=ctx.device, dtype=torch.uint8)  # 512 MiB, well past the L2
        dst = torch.empty_like(buf)
        copy_ms = _cuda_ms(lambda: dst.copy_(buf), 3, 10)
        res.update(matmul_bf16_tflops=2 * n**3 / ms / 1e9, copy_gbps=2 * buf.numel() / copy_ms / 1e6)
    else:
        t0 = time.perf_counter()
        a @ b
        res.update(matmul_bf16_tflops=2 * n**3 / (time.perf_counter() - t0) / 1e12, copy_gbps=None)
    res["matmul_shape"] = f"{n}^3"
    # the Triton patch embedding where training uses it: inside bf16 autocast (fp32 inputs and weights)
    torch.manual_seed(0)
    size, embed = (ctx.size, 768) if ctx.cuda else (DRY_SIZE, 32)
    x = torch.randn(2, 1, *size, device=ctx.device)
    layers = {be: PatchEmbed3d(1, embed, 16, backend=be).to(ctx.device) for be in ("torch", "triton")}
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    dtype = torch.bfloat16 if ctx.cuda else torch.float32  # the interpreter's bf16 dot is wrong: fp32 on the CPU
    outs = {}
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=ctx.cuda):
        for be, layer in layers.items():
            outs[be] = layer(x)
    ref = outs["torch"].float()
    rel = float((outs["triton"].float() - ref).abs().max() / ref.abs().max())
    tol = 2 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-4
    res.update(autocast_dtype=str(dtype).replace("torch.", ""), autocast_out_dtype=str(outs["triton"].dtype)
               .replace("torch.", ""), autocast_torch_out_dtype=str(outs["torch"].dtype).replace("torch.", ""),
               autocast_rel_diff=rel, autocast_tol=tol)
    res["autocast_ok"] = bool(rel <= tol and outs["triton"].dtype == outs["torch"].dtype)
    res["check_failed"] = not res["autocast_ok"]
    return res


def _patch_embed_runs(ctx, runs: dict) -> dict:
    from volfm.bench import patch_embed  # noqa: PLC0415

    res = patch_embed.run_suite(runs, json_dir=ctx.work)
    for doc in res["runs"].values():
        for r in (doc or {}).get("results", []):
            for m in r["methods"].values():
                m.pop("times_ms", None)  # the medians are what the report uses
    return {"runs": res["runs"], "elapsed_s": res["elapsed_s"], "check_failed": res["returncode"] != 0}


def step_patch_embed(ctx) -> dict:
    from volfm.bench.patch_embed import DRY_RUNS, GPU_RUNS  # noqa: PLC0415

    return _patch_embed_runs(ctx, DRY_RUNS if ctx.dry else GPU_RUNS)


def step_patch_embed_fp(ctx) -> dict:
    from volfm.bench.patch_embed import DRY_RUNS, GPU_RUNS_FP  # noqa: PLC0415

    return _patch_embed_runs(ctx, {"dry-fp32": DRY_RUNS["dry"]} if ctx.dry else GPU_RUNS_FP)


def step_sliding_window(ctx) -> dict:
    from volfm.bench import sliding_window  # noqa: PLC0415

    path = ctx.work / "sliding_window.json"
    if ctx.dry:
        argv = ["--device", "cpu", "--size", "40,40,40", "--patch", "32,32,32", "--repeats", "1"]
    else:
        argv = ["--device", "cuda", "--size", "300,300,300", "--repeats", "3"]
    rc = sliding_window.main([*argv, "--json", str(path)])
    doc = json.loads(path.read_text()) if path.is_file() else None
    same = bool(doc and doc["goals"]["identical"]["pass"])
    return {"doc": doc, "check_failed": rc != 0 or not same}


def _store_spec(ctx) -> Path:
    """ct_merlin, with the crop shrunk in the dry run (same steps, tiny volumes)."""
    import yaml  # noqa: PLC0415

    from volfm.preprocess.spec import load_spec, resolve_spec_path  # noqa: PLC0415

    raw = yaml.safe_load(resolve_spec_path("ct_merlin").read_text())
    raw["name"] = "bench_gpu_ct"
    raw["crop"]["size"] = list(ctx.size)
    path = ctx.work / "bench_gpu_ct.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_spec(path)  # validated before any case runs
    return path


def step_store(ctx) -> dict:
    from volfm.store.arrays import convert_store  # noqa: PLC0415
    from volfm.store.build import run_cohort  # noqa: PLC0415
    from volfm.synth.ct import make_ct_cohort  # noqa: PLC0415

    n = ctx.args.cases
    for old in ("raw", "store_npy", "store_blosc2"):  # a rerun into the same --out starts from scratch
        shutil.rmtree(ctx.work / old, ignore_errors=True)
    workers = max(1, os.cpu_count() or 1) if not ctx.dry else 1
    raw_shape = (240, 240, 170) if not ctx.dry else (40, 40, 24)  # a little larger than the crop: it crops, as real CTs
    t0 = time.perf_counter()
    table = make_ct_cohort(ctx.work / "raw", n, seed=0, shape=raw_shape, workers=workers, progress=False)
    synth_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    npy = ctx.work / "store_npy"
    summary = run_cohort(_store_spec(ctx), npy, cohort=table, workers=workers, progress=False, qc=False)
    stores = {"npy": {"path": str(npy), "cases": summary["ok"], "seconds": time.perf_counter() - t0}}
    res = {"cases": n, "size": list(ctx.size), "workers": workers, "synth_s": synth_s, "stores": stores,
           "check_failed": bool(summary["failed"])}
    b2 = ctx.work / "store_blosc2"
    shutil.copytree(npy, b2)
    t0 = time.perf_counter()
    conv = convert_store(b2, {"codec": "blosc2", "dtype": "compact"}, workers=workers, progress=False)
    stores["blosc2"] = {"path": str(b2), "cases": conv["converted"] + conv["skipped"],
                        "seconds": time.perf_counter() - t0, "failed": conv["failed"]}
    res["check_failed"] |= bool(conv["failed"])
    # convert_store reports the array files' bytes before and after, case by case (the same cases on both sides)
    converted = max(1, stores["blosc2"]["cases"])
    stores["npy"]["bytes_per_case"] = conv["bytes_before"] / converted
    stores["blosc2"]["bytes_per_case"] = conv["bytes_after"] / converted
    for s in stores.values():
        s["ratio"] = s["bytes_per_case"] / stores["npy"]["bytes_per_case"]
    return res


def step_fit(ctx, step: str) -> dict:
    import lightning.pytorch as pl  # noqa: PLC0415

    from volfm.bench.common import quiet_lightning  # noqa: PLC0415
    from volfm.bench.step_timer import StepTimer  # noqa: PLC0415
    from volfm.data.datamodules import PretrainDataModule  # noqa: PLC0415
    from volfm.tasks import PretrainTask  # noqa: PLC0415

    gpu_model, dry_model, batch, encoding = FIT_MODELS[step]
    encoder, kwargs = dry_model if ctx.dry else gpu_model
    kwargs = dict(kwargs)
    batch = 2 if ctx.dry else batch
    store = ctx.work / f"store_{encoding}"
    if not (store / "manifest.csv").is_file():
        raise SystemExit(f"volfm bench gpu: {step}: no {encoding} store at {store}; run the store step first")
    if encoder.startswith("vit"):
        kwargs["img_size"] = list(ctx.size)
    timer = StepTimer(ctx.args.warmup_steps, sync=ctx.cuda)
    # one epoch holds every step: with a small cohort, epoch ends (the loader refilling) would otherwise dominate
    # the waits (the H200 run of 2026-12-04 had 5 steps an epoch: 1-2 ms median wait, 28-61 % of the time waiting)
    loader_kwargs = dict(patch_size=list(ctx.size), batch_size=batch, val_batch_size=batch, num_workers=ctx.workers,
                         pin_memory=True, persistent_workers=ctx.workers > 0, augmentation=None)
    n_train = len(PretrainDataModule(str(store), **loader_kwargs).train_dataset())
    per_volume = math.ceil((ctx.args.warmup_steps + ctx.args.fit_steps + 1) * batch / max(1, n_train))
    dm = PretrainDataModule(str(store), samples_per_volume=per_volume, **loader_kwargs)
    task = PretrainTask(encoder={"name": encoder, "kwargs": kwargs},
                        icd={"min_count": 1, "level": "category"}, contrastive=None,
                        evaluation={"prompts": None})
    precision = "bf16-mixed" if ctx.cuda else "32-true"
    trainer = pl.Trainer(accelerator="gpu" if ctx.cuda else "cpu", devices=1, precision=precision,
                         max_steps=ctx.args.warmup_steps + ctx.args.fit_steps, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, benchmark=ctx.cuda, use_distributed_sampler=False,
                         callbacks=[timer], default_root_dir=str(ctx.work / "runs"))
    t0 = time.perf_counter()
    with quiet_lightning():
        trainer.fit(task, datamodule=dm)
    wall = time.perf_counter() - t0
    if not timer.steps:
        raise SystemExit(f"volfm bench gpu: {step}: no timed step ran (the store has too few training cases?)")
    waits = [w for w, _ in timer.steps]
    computes = [c for _, c in timer.steps]
    total = sum(waits) + sum(computes)
    step_median = statistics.median(w + c for w, c in timer.steps)
    res = {"encoder": encoder, "kwargs": kwargs, "store_encoding": encoding, "batch": batch, "size": list(ctx.size),
           "precision": precision, "workers": ctx.workers, "warmup_steps": ctx.args.warmup_steps,
           "train_cases": n_train, "samples_per_volume": per_volume,
           "timed_steps": len(timer.steps), "volumes_per_s": batch * len(timer.steps) / total,
           "steady_volumes_per_s": batch / step_median, "step_ms_median": 1000 * step_median,
           "compute_ms_median": 1000 * statistics.median(computes), "data_wait_ms_median": 1000 * statistics.median(waits),
           "data_wait_fraction": sum(waits) / total, "fit_wall_s": wall,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if ctx.cuda else None,
           "params_m": sum(p.numel() for p in task.encoder.parameters()) / 1e6,
           "loss_finite": timer.loss_finite}
    # loader-bound: the typical step waits (a few long waits, e.g. a worker's first batch, do not make it so)
    res["loader_bound"] = statistics.median(waits) > 0.10 * step_median
    if "patch_backend" in kwargs:
        res["patch_backend"] = kwargs["patch_backend"]
    res["check_failed"] = not timer.loss_finite
    print(f"{step}: {res['volumes_per_s']:.2f} volumes/s ({res['steady_volumes_per_s']:.2f} at the median step), "
          f"step {res['step_ms_median']:.0f} ms (data wait {res['data_wait_ms_median']:.0f} ms, "
          f"{100 * res['data_wait_fraction']:.1f} %), peak "
          f"{_f(res['peak_gib'], '{:.1f}')} GiB", flush=True)
    return res


WORKERS = {"env": step_env, "patch-embed": step_patch_embed, "patch-embed-fp": step_patch_embed_fp,
           "sliding-window": step_sliding_window, "store": step_store}


def run_worker(args) -> int:
    ctx = _Ctx(args)
    ctx.work.mkdir(parents=True, exist_ok=True)
    if ctx.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # what training on the GPU uses for fp32 matmuls
    fn = WORKERS.get(args.step)
    res = fn(ctx) if fn is not None else step_fit(ctx, args.step)
    write_results(ctx.work / f"{args.step}.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
