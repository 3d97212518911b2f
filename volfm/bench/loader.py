"""`volfm bench loader`: random 3D patches per second from a store vs TorchIO and MONAI.

A synthetic CT cohort (:func:`volfm.synth.ct.make_ct_cohort`, default 50 cases of 128x128x64) is
preprocessed into a store with ``preprocessing/ct_seg.yaml`` (1.5 mm isotropic, RAS, foreground crop,
labels) by :func:`volfm.store.build.run_cohort`; every stored case (image float32 + label uint8)
is then also written as .nii.gz with :func:`volfm.io.write_nifti` and the stored affine, so every
loader reads the same voxels. Loaders, all with the same worker count (``--workers``) and patch size:

* raw memmap -- the limit: a torch Dataset doing ``np.load(mmap_mode='r')`` of image.npy and label.npy
  and ``np.ascontiguousarray`` of a random window fully inside the volume, in a DataLoader with the
  same workers, batch size and (default) collate;
* volfm      -- ``PatchDataset(StoreDataset(store), LabelWeightedPatchSampler(patch, 1/3), spv)`` in a
  DataLoader with ``collate_cases`` (as StoreDataModule builds it);
* TorchIO    -- ``SubjectsDataset`` of ScalarImage/LabelMap (.nii.gz) + ``tio.Queue(max_length,
  spv, LabelSampler(patch, label_probabilities: background 2/3, each class 1/3 / n_classes),
  num_workers=workers)`` -> ``DataLoader(queue, num_workers=0)``, as TorchIO documents;
* MONAI      -- ``CacheDataset(cache_rate=1.0)`` over LoadImaged + EnsureChannelFirstd (cached: the
  decoded volumes, in RAM) + RandCropByPosNegLabeld(pos=1, neg=2, num_samples=spv) (per item),
  ``monai.data.DataLoader`` with the same workers; a MONAI batch holds batch_size x spv patches.

Throughput counts patches (items), not batches. Every file is read once before any timing (so all
loaders start from the same warm OS page cache), each loader's iterator then yields ``--warmup``
batches untimed (worker start-up, first queue fill, caches), then ``--repeats`` timed chunks of
``--batches`` x ``--batch-size`` patches in all; patches/s = timed patches / timed seconds. Loaders
loop over epochs (persistent workers where the DataLoader has them). Each loader's first batch is
checked: patch shapes, and the patch voxels against the stored arrays at the patch's position.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import monai.transforms as mt
import numpy as np
import torch
import torchio as tio
import yaml
from monai.data import CacheDataset
from monai.data import DataLoader as MonaiDataLoader
from torch.utils.data import DataLoader

from volfm.bench.common import ints_arg, parse_skip, quiet_import, scratch_dir, timed, write_results
from volfm.data.datamodules import collate_cases
from volfm.data.dataset import StoreDataset
from volfm.data.samplers import LabelWeightedPatchSampler, PatchDataset, extract_patch
from volfm.io import Volume, write_nifti
from volfm.preprocess.spec import resolve_spec_path
from volfm.store.build import run_cohort
from volfm.store.layout import CohortStore
from volfm.synth.ct import LABELS, make_ct_cohort

LOADERS = ("raw memmap", "volfm", "TorchIO Queue", "MONAI CacheDataset")
GOAL_VS_TORCHIO = 10.0
GOAL_VS_RAW = 0.5


# --- data ------------------------------------------------------------------------------------------

def seg_spec(spacing) -> dict:
    """preprocessing/ct_seg.yaml (built-in copy as fallback), with ``spacing`` (mm) substituted."""
    path = resolve_spec_path("ct_seg")
    raw = yaml.safe_load(path.read_text())
    raw["spacing"] = [float(s) for s in spacing]
    return raw


def _write_case_nifti(job):
    case_dir, out_dir, cid = job
    case_dir, out_dir = Path(case_dir), Path(out_dir)
    affine = np.asarray(json.loads((case_dir / "meta.json").read_text())["affine"], np.float64)
    paths = {}
    for name in ("image", "label"):
        arr = np.load(case_dir / f"{name}.npy")
        p = out_dir / f"{cid}_{name}.nii.gz"
        write_nifti(Volume(arr, affine, {}), p)
        paths[name] = str(p)
    return cid, paths, affine.tolist()


def build_data(root: Path, n_cases: int, shape, spacing, workers: int, log=print) -> dict:
    """Synthesise the cohort, preprocess it into ``root/store`` and write ``root/nifti``; returns
    {store, cases: [{case_id, image_npy, label_npy, image_nii, label_nii, affine, shape}], timings}."""
    t0 = time.perf_counter()
    csv = make_ct_cohort(root / "cohort", n_cases, seed=0, shape=tuple(shape), workers=max(1, workers),
                         progress=False)
    t_synth = time.perf_counter() - t0
    spec_path = root / "ct_seg_bench.yaml"
    spec_path.write_text(yaml.safe_dump(seg_spec(spacing), sort_keys=False))
    t0 = time.perf_counter()
    summary = run_cohort(spec_path, root / "store", cohort=csv, workers=max(1, workers), progress=False, qc=False,
                         log=lambda *a, **k: None)
    t_prep = time.perf_counter() - t0
    if summary["failed"]:
        raise RuntimeError(f"preprocessing failed for {summary['failed']} case(s): {summary['failures'][:3]}")
    store = root / "store"

    ids = CohortStore(store).ok_ids
    nii = root / "nifti"
    nii.mkdir(parents=True, exist_ok=True)
    jobs = [(str(store / "cases" / cid), str(nii), cid) for cid in ids]
    t0 = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            written = list(ex.map(_write_case_nifti, jobs))
    else:
        written = [_write_case_nifti(j) for j in jobs]
    t_nii = time.perf_counter() - t0
    cases = []
    for cid, paths, affine in written:
        img = np.load(store / "cases" / cid / "image.npy", mmap_mode="r")
        cases.append({"case_id": cid, "image_npy": str(store / "cases" / cid / "image.npy"),
                      "label_npy": str(store / "cases" / cid / "label.npy"), "image_nii": paths["image"],
                      "label_nii": paths["label"], "affine": affine, "shape": list(img.shape[1:])})
    return {"store": store, "cases": cases,
            "timings": {"synth_s": t_synth, "preprocess_s": t_prep, "write_nifti_s": t_nii}}


def read_all(paths) -> int:
    """Read every file once (the OS page cache then holds all of them for every loader)."""
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while True:
                b = f.read(1 << 23)
                if not b:
                    break
                total += len(b)
    return total


def _file_sizes(paths) -> int:
    return sum(os.path.getsize(p) for p in paths)


# --- the raw limit ---------------------------------------------------------------------------------

class RawMemmapPatches:
    """Item i: a uniformly random window, fully inside the volume, of case i // spv's image.npy and
    label.npy, read with np.load(mmap_mode='r') + np.ascontiguousarray (the least any store loader does)."""

    def __init__(self, cases, patch, samples_per_volume: int, seed: int = 0):
        self.cases = [(c["image_npy"], c["label_npy"]) for c in cases]
        self.patch = tuple(int(p) for p in patch)
        self.spv = int(samples_per_volume)
        self.seed = int(seed)

    def __len__(self):
        return len(self.cases) * self.spv

    def __getitem__(self, i):
        ci = int(i) // self.spv
        img_p, lab_p = self.cases[ci]
        img = np.load(img_p, mmap_mode="r")
        lab = np.load(lab_p, mmap_mode="r")
        rng = np.random.default_rng([self.seed, int(i)])
        shape = img.shape[1:]
        start = [int(rng.integers(0, max(d - p, 0) + 1)) for d, p in zip(shape, self.patch)]
        sl = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        a, b = np.ascontiguousarray(img[sl]), np.ascontiguousarray(lab[sl])
        if a.shape[1:] != self.patch:  # volume smaller than the patch: pad at the end (not in the default run)
            pad = [(0, 0)] + [(0, p - s) for s, p in zip(a.shape[1:], self.patch)]
            a, b = np.pad(a, pad), np.pad(b, pad)
        return {"image": torch.from_numpy(a), "label": torch.from_numpy(b), "start": torch.tensor(start),
                "case": ci}


# --- loaders ---------------------------------------------------------------------------------------

def _dl_kwargs(workers: int) -> dict:
    return {"num_workers": workers, "persistent_workers": workers > 0}


def make_raw(data, args):
    ds = RawMemmapPatches(data["cases"], args.patch, args.samples_per_volume)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, **_dl_kwargs(args.workers))
    cases = data["cases"]

    def inspect(batch):
        n = _check_shapes(batch["image"], batch["label"], args.patch, "raw memmap")
        for b in range(n):
            c = cases[int(batch["case"][b])]
            _check_window(batch["image"][b], batch["label"][b], c, [int(s) for s in batch["start"][b]], "raw memmap")
        return n

    return loader, inspect, lambda batch: batch["image"].shape[0], "DataLoader(shuffle=True), default collate"


def make_volfm(data, args):
    ds = PatchDataset(StoreDataset(data["store"], arrays=("image",), label="label"),
                      LabelWeightedPatchSampler(args.patch, foreground_fraction=1 / 3),
                      samples_per_volume=args.samples_per_volume, seed=0)
    kw = {"collate_fn": collate_cases} if collate_cases is not None else {}
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, **_dl_kwargs(args.workers), **kw)
    by_id = {c["case_id"]: c for c in data["cases"]}

    def inspect(batch):
        n = _check_shapes(batch["image"], batch["label"], args.patch, "volfm")
        for b in range(n):
            c = by_id[batch["case_id"][b]]
            _check_window(batch["image"][b], batch["label"][b], c, [int(s) for s in batch["patch_start"][b]],
                          "volfm", pad=(0.0, 0))
        return n

    note = ("PatchDataset(StoreDataset, LabelWeightedPatchSampler(fg 1/3)), DataLoader(shuffle=True, "
            f"collate={'collate_cases' if collate_cases else 'default'})")
    return loader, inspect, lambda batch: batch["image"].shape[0], note


def _torchio_probabilities(n_classes: int = 9) -> dict:
    """Background 2/3, each foreground class (1/3) / n_classes: volfm's fg 1/3 (classes uniform)."""
    probs = {0: 2.0 / 3.0}
    probs.update({c: (1.0 / 3.0) / n_classes for c in range(1, n_classes + 1)})
    return probs


def make_torchio(data, args):
    subjects = [tio.Subject(image=tio.ScalarImage(c["image_nii"]), label=tio.LabelMap(c["label_nii"]),
                            case_id=c["case_id"]) for c in data["cases"]]
    sd = tio.SubjectsDataset(subjects)
    sampler = tio.LabelSampler(tuple(args.patch), label_name="label",
                               label_probabilities=_torchio_probabilities(len(LABELS) - 1))
    queue = tio.Queue(sd, max_length=args.queue_length, samples_per_volume=args.samples_per_volume, sampler=sampler,
                      num_workers=args.workers, shuffle_subjects=True, shuffle_patches=True)
    loader = DataLoader(queue, batch_size=args.batch_size, num_workers=0)
    by_id = {c["case_id"]: c for c in data["cases"]}

    def inspect(batch):
        img, lab = batch["image"][tio.DATA], batch["label"][tio.DATA]
        n = _check_shapes(img, lab, args.patch, "TorchIO")
        for b in range(n):
            c = by_id[batch["case_id"][b]]
            _check_window(img[b], lab[b], c, [int(s) for s in batch[tio.LOCATION][b][:3]], "TorchIO")
        return n

    note = (f"Queue(max_length={args.queue_length}, samples_per_volume={args.samples_per_volume}, LabelSampler, "
            f"num_workers={args.workers}) -> DataLoader(num_workers=0)")
    return loader, inspect, lambda batch: batch["image"][tio.DATA].shape[0], note


def make_monai(data, args):
    keys = ["image", "label"]
    tf = mt.Compose([
        mt.LoadImaged(keys=keys, reader="NibabelReader"),
        mt.EnsureChannelFirstd(keys=keys),
        mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=tuple(args.patch), pos=1, neg=2,
                                  num_samples=args.samples_per_volume),
    ])
    items = [{"image": c["image_nii"], "label": c["label_nii"], "case_id": c["case_id"]} for c in data["cases"]]
    logging.disable(logging.WARNING)  # LoadImaged: nvImageCodec absent (irrelevant here)
    try:
        ds = CacheDataset(items, transform=tf, cache_rate=1.0, num_workers=max(1, args.workers), progress=False)
    finally:
        logging.disable(logging.NOTSET)
    cache_bytes = 0
    for it in ds._cache:
        for k in keys:
            cache_bytes += int(np.asarray(it[k]).nbytes)
    loader = MonaiDataLoader(ds, batch_size=args.batch_size, shuffle=True, **_dl_kwargs(args.workers))
    by_id = {c["case_id"]: c for c in data["cases"]}

    def inspect(batch):
        img, lab = batch["image"], batch["label"]
        n = _check_shapes(img, lab, args.patch, "MONAI")
        affs = np.asarray(img.affine, np.float64).reshape(-1, 4, 4)
        for b in range(n):
            c = by_id[batch["case_id"][b]]
            A = np.asarray(c["affine"], np.float64)
            off = np.linalg.solve(A[:3, :3], affs[b][:3, 3] - A[:3, 3])
            if np.abs(off - np.round(off)).max() > 1e-3:
                raise AssertionError(f"MONAI: patch affine is not a whole-voxel shift of case {c['case_id']}'s grid")
            _check_window(img[b], lab[b], c, [int(round(o)) for o in off], "MONAI")
        return n

    note = (f"CacheDataset(cache_rate=1.0): {len(ds)} decoded volumes (image + label, float32) in RAM "
            f"({cache_bytes / 2**30:.2f} GiB); batch = {args.batch_size} items x {args.samples_per_volume} samples")
    loader._bench_cache_bytes = cache_bytes
    return loader, inspect, lambda batch: batch["image"].shape[0], note


MAKERS = {"raw memmap": make_raw, "volfm": make_volfm, "TorchIO Queue": make_torchio, "MONAI CacheDataset": make_monai}


# --- checks ----------------------------------------------------------------------------------------

def _check_shapes(img, lab, patch, who) -> int:
    n = int(img.shape[0])
    want = (n, 1, *[int(p) for p in patch])
    if tuple(img.shape) != want or tuple(lab.shape) != want:
        raise AssertionError(f"{who}: patch shapes image {tuple(img.shape)} label {tuple(lab.shape)}, expected {want}")
    return n


def _check_window(img, lab, case, start, who, pad=(0.0, 0)):
    """The patch equals the stored arrays at ``start`` (padded with the background where outside)."""
    patch = [int(s) for s in img.shape[1:]]
    ref_i = extract_patch(np.load(case["image_npy"], mmap_mode="r"), start, patch, pad[0])
    ref_l = extract_patch(np.load(case["label_npy"], mmap_mode="r"), start, patch, pad[1])
    a = np.asarray(img, np.float32)
    b = np.asarray(lab).astype(np.int64)
    if not np.array_equal(a, ref_i) or not np.array_equal(b, ref_l.astype(np.int64)):
        raise AssertionError(f"{who}: patch at {start} of case {case['case_id']} differs from the stored arrays "
                             f"(max |diff| image {float(np.abs(a - ref_i).max()):.3g})")


# --- timing ----------------------------------------------------------------------------------------

def _forever(loader):
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("loader yielded no batch")


def measure(name, maker, data, args, log=print) -> dict:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        loader, inspect, count, note = maker(data, args)  # MONAI's reader registration chatter
    setup = time.perf_counter() - t0
    it = _forever(loader)
    t0 = time.perf_counter()
    first = next(it)
    first_s = time.perf_counter() - t0
    n_first = inspect(first)  # shapes + content against the store
    patch_shape = list(first["image"]["data"].shape[1:]) if name.startswith("TorchIO") else list(first["image"].shape[1:])
    del first
    for _ in range(max(0, args.warmup - 1)):
        count(next(it))
    target = max(1, math.ceil(args.batches * args.batch_size / args.repeats))
    counts = []

    def chunk():
        n = 0
        while n < target:
            n += count(next(it))
        counts.append(n)
        return n

    _, times, _ = timed(chunk, args.repeats, warmup=0)
    rate = sum(counts) / sum(times)
    res = {"loader": name, "patches_per_s": rate, "setup_s": setup, "first_batch_s": first_s,
           "timed_patches": sum(counts), "timed_s": sum(times), "chunk_s": times, "chunk_patches": counts,
           "patches_per_batch": n_first, "patch_shape": patch_shape, "content_checked": True, "note": note}
    cb = getattr(loader, "_bench_cache_bytes", None)
    if cb is not None:
        res["cache_bytes"] = cb
    log(f"  {name:<20} {rate:9.1f} patches/s  (setup {setup:.2f} s, first batch {first_s:.2f} s, "
        f"{sum(counts)} patches in {sum(times):.2f} s)")
    it.close()
    del loader
    gc.collect()
    return res


# --- main ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="volfm bench loader",
                                description="random 3D patches/s: volfm store vs raw memmap, TorchIO Queue, MONAI")
    p.add_argument("--cases", type=int, default=50, help="synthetic CT cases (default 50)")
    p.add_argument("--shape", type=ints_arg, default=[128, 128, 64], help="synthetic CT grid (default 128,128,64)")
    p.add_argument("--spacing", type=float, default=1.5, help="store spacing in mm, isotropic (ct_seg: 1.5)")
    p.add_argument("--patch", type=ints_arg, default=[96, 96, 96], help="patch size (default 96,96,96)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    p.add_argument("--batch-size", type=int, default=2, help="patches per batch (MONAI: items per batch)")
    p.add_argument("--samples-per-volume", type=int, default=4,
                   help="patches per loaded volume: PatchDataset, tio.Queue and MONAI num_samples (default 4)")
    p.add_argument("--queue-length", type=int, default=32, help="tio.Queue max_length (default 32)")
    p.add_argument("--batches", type=int, default=100, help="timed batches x batch size = timed patches (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches first (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed chunks the timed patches are split into")
    p.add_argument("--out", help="folder for the cohort/store/NIfTI (default: a temp dir, removed afterwards)")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--skip", default="", help="comma-separated loaders to skip: torchio,monai")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for k in ("cases", "batch_size", "samples_per_volume", "queue_length", "batches", "repeats", "warmup"):
        if getattr(args, k) < 1:
            print(f"volfm bench loader: --{k.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.workers < 0:
        print("volfm bench loader: --workers must be >= 0", file=sys.stderr)
        return 2
    skip = parse_skip(args.skip)
    bad = skip - {"torchio", "monai"}
    if bad:
        print(f"volfm bench loader: --skip takes torchio,monai, got {', '.join(sorted(bad))}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    with scratch_dir(args.out, "volfm_bench_loader_") as root:
        return _run(args, root, skip)


def _run(args, root: Path, skip: set) -> int:
    quiet_import("monai.transforms", "monai.data", "torchio", "volfm.data.datamodules")
    patch = "x".join(map(str, args.patch))
    print(f"volfm bench loader: random {patch} patches/s from {args.cases} synthetic CT cases "
          f"({'x'.join(map(str, args.shape))} -> ct_seg store @ {args.spacing:g} mm), {args.workers} workers, "
          f"batch {args.batch_size}, {args.samples_per_volume} samples per volume")
    print(f"{os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads in the main process; timed: "
          f"{args.batches} x {args.batch_size} patches in {args.repeats} chunks after {args.warmup} warm-up batches")
    data = build_data(root, args.cases, args.shape, [args.spacing] * 3, args.workers)
    t = data["timings"]
    shapes = np.array([c["shape"] for c in data["cases"]])
    npy = [c[k] for c in data["cases"] for k in ("image_npy", "label_npy")]
    nii = [c[k] for c in data["cases"] for k in ("image_nii", "label_nii")]
    print(f"data: synth {t['synth_s']:.1f} s, run_cohort {t['preprocess_s']:.1f} s, write .nii.gz "
          f"{t['write_nifti_s']:.1f} s; {len(data['cases'])} stored cases, grid {shapes.min(0).tolist()} .. "
          f"{shapes.max(0).tolist()} voxels; store .npy {_file_sizes(npy) / 2**20:.0f} MiB, "
          f".nii.gz {_file_sizes(nii) / 2**20:.0f} MiB")
    t0 = time.perf_counter()
    nbytes = read_all(npy + nii)
    print(f"page cache: read all {nbytes / 2**20:.0f} MiB once in {time.perf_counter() - t0:.2f} s before timing")

    names = [n for n in LOADERS if not (n.startswith("TorchIO") and "torchio" in skip)
             and not (n.startswith("MONAI") and "monai" in skip)]
    print("timing ...")
    results = [measure(n, MAKERS[n], data, args) for n in names]
    by = {r["loader"]: r for r in results}
    raw = by["raw memmap"]["patches_per_s"]
    tio_rate = by["TorchIO Queue"]["patches_per_s"] if "TorchIO Queue" in by else None
    for r in results:
        r["vs_torchio"] = r["patches_per_s"] / tio_rate if tio_rate else None
        r["frac_raw"] = r["patches_per_s"] / raw

    print()
    head = (f"{'loader':<20} {'patches/s':>10} {'vs TorchIO':>11} {'of raw':>7} {'setup s':>8} {'1st batch s':>12}"
            f"  {'patch':<12}")
    print(head)
    print("-" * len(head))
    for r in results:
        vt = f"{r['vs_torchio']:10.2f}x" if r["vs_torchio"] is not None else f"{'-':>11}"
        print(f"{r['loader']:<20} {r['patches_per_s']:10.1f} {vt} {r['frac_raw']:7.2f} {r['setup_s']:8.2f} "
              f"{r['first_batch_s']:12.2f}  {'x'.join(map(str, r['patch_shape'])):<12}")
    print("patches/s = timed patches / timed seconds; vs TorchIO = patches/s / TorchIO Queue's; of raw = fraction "
          "of the raw memmap rate; setup = building the dataset (MONAI: its cache); 1st batch includes worker "
          "start-up")
    print("every loader's first batch: image and label patches (N, 1, " + ", ".join(map(str, args.patch))
          + ") equal to the stored arrays at the patch's position")
    print("notes:")
    for r in results:
        print(f"  {r['loader']}: {r['note']}")

    goals = {}
    print()
    v = by["volfm"]["patches_per_s"]
    if tio_rate:
        x = v / tio_rate
        goals["volfm_10x_torchio"] = {"pass": bool(x >= GOAL_VS_TORCHIO), "value": x}
        print(f"volfm >= {GOAL_VS_TORCHIO:g}x TorchIO Queue: {'PASS' if x >= GOAL_VS_TORCHIO else 'FAIL'} ({x:.2f}x)")
    x = v / raw
    goals["volfm_half_raw"] = {"pass": bool(x >= GOAL_VS_RAW), "value": x}
    print(f"volfm >= {GOAL_VS_RAW:g} x raw memmap: {'PASS' if x >= GOAL_VS_RAW else 'FAIL'} ({x:.2f})")

    if args.json:
        cfg = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items()
               if k not in ("json", "out")}
        doc = {"config": cfg, "cpus": os.cpu_count(), "data": {**data["timings"], "cases": len(data["cases"]),
                                                               "grid_min": shapes.min(0).tolist(),
                                                               "grid_max": shapes.max(0).tolist()},
               "loaders": results, "goals": goals}
        write_results(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
