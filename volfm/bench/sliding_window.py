"""`volfm bench sliding-window`: volfm's SlidingWindowInferer against MONAI's sliding_window_inference.

The same small 3D model (Conv3d 1->8 3x3x3, ReLU, Conv3d 8->2 3x3x3, seeded weights) runs over the
same volume (default 300^3 float32, seeded noise) with the same patch (96^3), overlap (0.5), blending
(gaussian) and window batch (4), on ``--device`` (default CUDA when available):

* volfm -- :class:`volfm.inference.sliding_window.SlidingWindowInferer` on the numpy array (windows cut on the CPU,
           accumulators on the device when they fit, else streamed to the CPU);
* MONAI -- ``monai.inferers.sliding_window_inference(inputs, roi, sw_batch_size, model, overlap,
           mode, sw_device=device, device=device)`` on the tensor (1, 1, *size).

Each method runs in its own subprocess (so peak memory is its own): one warm-up call, then
``--repeats`` timed calls, alternating between the two processes (so that load from elsewhere on a
shared machine hits both alike); the median is reported. Peak memory is the rise of the process's peak
resident set (Linux VmHWM, reset before the warm-up) over its RSS before the first call on CPU, or
``torch.cuda.max_memory_allocated`` over the memory allocated before it on CUDA; "accumulators" is
the size of the output + weight buffers each method keeps. Outputs of the last call are compared
voxel by voxel (max |diff|).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from volfm.bench.common import ints_arg, write_results
from volfm.inference.sliding_window import SlidingWindowInferer

METHODS = ("volfm", "MONAI", "MONAI-cl")  # MONAI-cl: MONAI with the model converted to channels_last_3d
MATCH_TOL = 1e-4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="volfm bench sliding-window",
                                description="volfm SlidingWindowInferer vs monai.inferers.sliding_window_inference")
    p.add_argument("--size", type=ints_arg, default=[300, 300, 300], help="volume size (default 300,300,300)")
    p.add_argument("--patch", type=ints_arg, default=[96, 96, 96], help="window size (default 96,96,96)")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1) (default 0.5)")
    p.add_argument("--mode", choices=["gaussian", "constant"], default="gaussian", help="blending (gaussian)")
    p.add_argument("--batch", type=int, default=4, help="windows per model call (default 4)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method after a warm-up; median reported")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the volume and the model weights")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    return p


# --- shared set-up ---------------------------------------------------------------------------------

def build_model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(8, 2, 3, padding=1)).eval()


def make_volume(size, seed: int = 0) -> np.ndarray:
    """(1, *size) float32 noise, generated in place (no temporary copies, so RSS baselines are honest)."""
    vol = np.empty((1, *size), np.float32)
    np.random.default_rng(seed).standard_normal(tuple(size), dtype=np.float32, out=vol[0])
    return vol


def _proc_status_kib(field: str):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int:
    hwm = _proc_status_kib("VmHWM")
    return hwm if hwm is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# --- worker (one method, own process) --------------------------------------------------------------

def run_worker(args) -> int:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build_model(args.seed).to(device)
    vol = make_volume(args.size, args.seed)
    patch, c_out = tuple(args.patch), 2
    padded = [max(n, p) for n, p in zip(args.size, patch)]
    if args.worker == "volfm":
        inferer = SlidingWindowInferer(patch, args.overlap, args.mode, batch_size=args.batch, device=device)

        def run():
            return inferer(vol, model)
    else:
        src = torch.from_numpy(vol)[None]
        if args.worker == "MONAI-cl":  # what volfm does by itself on the CPU, done by hand for MONAI
            model = model.to(memory_format=torch.channels_last_3d)

        def run():
            with torch.no_grad():
                out = sliding_window_inference(src, patch, args.batch, model, args.overlap, args.mode,
                                               sw_device=device, device=device)
            return out[0].cpu()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    rss0 = _proc_status_kib("VmRSS") or 0
    reset_ok = _reset_peak_rss()
    if not reset_ok:
        rss0 = _peak_rss_kib()  # without a reset only the rise of the lifetime peak can be seen
    out = run()  # warm-up
    sync()
    # the driver alternates the methods' timed runs ("run" on stdin -> one timing on stdout), so that
    # load from other processes on a shared machine hits both alike; "done" ends the worker
    print(json.dumps({"ready": True}), flush=True)
    times = []
    for line in sys.stdin:
        if line.strip() != "run":
            break
        del out
        t0 = time.perf_counter()
        out = run()
        sync()
        times.append(time.perf_counter() - t0)
        print(json.dumps({"t": times[-1]}), flush=True)
    peak_rss = max(0, _peak_rss_kib() - rss0) * 1024
    res = {"method": args.worker, "times": times, "median_s": statistics.median(times),
           "peak_rss_rise_bytes": peak_rss, "peak_rss_reset": reset_ok, "shape": list(out.shape),
           "device": str(device), "torch_threads": torch.get_num_threads()}
    if cuda:
        res["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
    if args.worker == "volfm":
        res["accumulator_bytes"] = int(inferer.last_info["accumulator_bytes"])
        res["accumulate_on"] = inferer.last_info["accumulate_on"]
        res["windows"] = inferer.last_info["windows"]
        res["memory_format"] = inferer.last_info["memory_format"]
    else:  # output (C_out) + count map (1) on the padded grid, plus a padded copy of the input if any
        vox = int(np.prod(padded))
        res["accumulator_bytes"] = (c_out + 1) * vox * 4 + (vox * 4 if padded != list(args.size) else 0)
        res["accumulate_on"] = "device"
    work = Path(args.work_dir)
    np.save(work / f"{args.worker}.npy", out.numpy())
    (work / f"{args.worker}.json").write_text(json.dumps(res))
    return 0


# --- driver ----------------------------------------------------------------------------------------

def _max_abs_diff(a_path: Path, b_path: Path) -> float:
    a, b = np.load(a_path, mmap_mode="r"), np.load(b_path, mmap_mode="r")
    if a.shape != b.shape:
        return float("inf")
    worst = 0.0
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    step = 1 << 24
    for i in range(0, flat_a.size, step):
        d = np.abs(flat_a[i:i + step].astype(np.float64) - flat_b[i:i + step])
        worst = max(worst, float(np.nanmax(d)) if d.size else 0.0)
        if np.isnan(d).any():
            return float("inf")
    return worst


def _mib(n) -> str:
    return f"{n / 2**20:9.1f}" if n is not None else "        -"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.batch < 1 or not 0 <= args.overlap < 1:
        print("volfm bench sliding-window: need --repeats >= 1, --batch >= 1 and 0 <= --overlap < 1", file=sys.stderr)
        return 2
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        return run_worker(args)

    size, patch = args.size, args.patch
    cuda = args.device.startswith("cuda")
    print(f"volfm bench sliding-window: volume {'x'.join(map(str, size))} float32, patch {'x'.join(map(str, patch))}, "
          f"overlap {args.overlap:g}, {args.mode}, batch {args.batch}, device {args.device}, "
          f"model Conv3d(1->8, 3^3) ReLU Conv3d(8->2, 3^3)")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; each method in its own process: "
          f"1 warm-up + {args.repeats} timed run(s), alternating between the methods, median")
    results = {}
    with tempfile.TemporaryDirectory(prefix="volfm_bench_sw_") as tmp:
        work = Path(tmp)
        procs, errs = {}, {}

        def fail(method, what):
            p = procs[method]
            p.kill()
            p.wait()
            err = (work / f"{method}.err").read_text()[-4000:]
            print(f"{method} worker {what} (exit {p.returncode}):\n{err}", file=sys.stderr)
            for q in procs.values():
                if q.poll() is None:
                    q.kill()
                    q.wait()
            return 1

        def ask(method, cmd=None):
            p = procs[method]
            if cmd is not None:
                p.stdin.write(cmd + "\n")
                p.stdin.flush()
            line = p.stdout.readline()
            return json.loads(line) if line.strip() else None

        try:
            for method in METHODS:  # start + warm up one at a time
                cmd = [sys.executable, "-m", "volfm.bench.sliding_window", "--size", ",".join(map(str, size)),
                       "--patch", ",".join(map(str, patch)), "--overlap", repr(args.overlap), "--mode", args.mode,
                       "--batch", str(args.batch), "--repeats", str(args.repeats), "--device", args.device,
                       "--seed", str(args.seed), "--worker", method, "--work-dir", str(work)]
                errs[method] = open(work / f"{method}.err", "w")
                t0 = time.perf_counter()
                procs[method] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                 stderr=errs[method], text=True, env=dict(os.environ))
                if ask(method) is None:
                    return fail(method, "failed during set-up/warm-up")
                print(f"  {method:<6} set up + warm-up: {time.perf_counter() - t0:.1f} s")
            for r in range(args.repeats):  # alternate, and alternate who goes first
                for method in (METHODS if r % 2 == 0 else METHODS[::-1]):
                    time.sleep(0.5)  # let the other process's idle OpenMP threads stop spinning
                    if ask(method, "run") is None:
                        return fail(method, f"failed in timed run {r + 1}")
            for method in METHODS:
                procs[method].stdin.write("done\n")
                procs[method].stdin.close()
                if procs[method].wait() != 0:
                    return fail(method, "failed at the end")
                results[method] = json.loads((work / f"{method}.json").read_text())
                print(f"  {method:<6} runs: {', '.join(f'{t:.2f}' for t in results[method]['times'])} s")
        finally:
            for f in errs.values():
                f.close()
        diff = _max_abs_diff(work / "volfm.npy", work / "MONAI.npy")
        diff_cl = _max_abs_diff(work / "MONAI-cl.npy", work / "MONAI.npy")
    v, m, mcl = results["volfm"], results["MONAI"], results["MONAI-cl"]
    ratio = m["median_s"] / v["median_s"]
    mem_key = "peak_cuda_bytes" if cuda else "peak_rss_rise_bytes"
    mem_name = "peak CUDA (MiB)" if cuda else "peak RSS rise (MiB)"
    print()
    print(f"{'method':<8} {'median s':>9} {mem_name:>20} {'accumulators (MiB)':>19}  {'accumulate on':<13} "
          f"{'max |diff| vs MONAI':>19}")
    for name, r in (("volfm", v), ("MONAI", m), ("MONAI-cl", mcl)):
        d = {"volfm": f"{diff:.3g}", "MONAI": "0 (reference)", "MONAI-cl": f"{diff_cl:.3g}"}[name]
        print(f"{name:<8} {r['median_s']:9.3f} {_mib(r.get(mem_key)):>20} {_mib(r['accumulator_bytes']):>19}  "
              f"{r['accumulate_on']:<13} {d:>19}")
    print(f"windows: {v['windows']}; ratio MONAI/volfm time: {ratio:.3f}; volfm ran the model "
          f"{v.get('memory_format', 'as given')}; MONAI-cl (model converted to channels_last_3d by hand)/volfm: "
          f"{mcl['median_s'] / v['median_s']:.3f}")
    fast, same = ratio >= 1.0, diff < MATCH_TOL
    print(f"goal: at least as fast: {'PASS' if fast else 'FAIL'} (x{ratio:.2f}), identical within {MATCH_TOL:g}: "
          f"{'PASS' if same else 'FAIL'} (max |diff| {diff:.3g})")
    if args.json:
        doc = {"size": size, "patch": patch, "overlap": args.overlap, "mode": args.mode, "batch": args.batch,
               "device": args.device, "repeats": args.repeats, "results": results, "max_abs_diff": diff,
               "ratio_monai_over_volfm": ratio,
               "goals": {"at_least_as_fast": {"pass": fast, "ratio": ratio},
                         "identical": {"pass": same, "max_abs_diff": diff, "tol": MATCH_TOL}}}
        write_results(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
