"""`volfm bench loader`: random 3D patches per second from a store vs TorchIO and MONAI, warm and cold, npy and blosc2,
and whole Merlin-size volumes per second.

A synthetic CT cohort (:func:`volfm.synth.ct.make_ct_cohort`, default 50 cases of 128x128x64) is
preprocessed into a store with ``preprocessing/ct_seg.yaml`` (1.5 mm isotropic, RAS, foreground crop,
labels) by :func:`volfm.store.build.run_cohort`; when TorchIO or MONAI run, every stored case (image float32 +
label uint8) is then also written as .nii.gz with :func:`volfm.io.write_nifti` and the stored affine, so every
loader reads the same voxels. Loaders, all with the same worker count (``--workers``) and patch size:

* raw memmap -- the limit: a torch Dataset doing ``np.load(mmap_mode='r')`` of image.npy and label.npy
  and ``np.ascontiguousarray`` of a random window fully inside the volume, in a DataLoader with the
  same workers, batch size and (default) collate;
* volfm      -- ``PatchDataset(StoreDataset(store), LabelWeightedPatchSampler(patch, 1/3), spv)`` in a
  DataLoader with ``collate_cases`` (as StoreDataModule builds it);
* volfm blosc2 (``--encoding blosc2``) -- the same on a copy of the store converted by
  :func:`volfm.store.arrays.convert_store` to ``{codec: blosc2, dtype: compact, chunk_patch: patch, clevel: 5}``;
* TorchIO    -- ``SubjectsDataset`` of ScalarImage/LabelMap (.nii.gz) + ``tio.Queue(max_length,
  spv, LabelSampler(patch, label_probabilities: background 2/3, each class 1/3 / n_classes),
  num_workers=workers)`` -> ``DataLoader(queue, num_workers=0)``, as TorchIO documents;
* MONAI      -- ``CacheDataset(cache_rate=1.0)`` over LoadImaged + EnsureChannelFirstd (cached: the
  decoded volumes, in RAM) + RandCropByPosNegLabeld(pos=1, neg=2, num_samples=spv) (per item),
  ``monai.data.DataLoader`` with the same workers; a MONAI batch holds batch_size x spv patches.

Throughput counts patches (items), not batches. Every file is read once before any warm timing (so all
loaders start from the same warm OS page cache), each loader's iterator then yields ``--warmup``
batches untimed (worker start-up, first queue fill, caches), then ``--repeats`` timed chunks of
``--batches`` x ``--batch-size`` patches in all; patches/s = timed patches / timed seconds. The store loaders
(raw memmap, volfm, volfm blosc2) are timed side by side, one chunk of each in turn (the batches a loader's
workers prefetched meanwhile are taken untimed first), so load from other jobs on a shared machine falls on all
of them alike; TorchIO and MONAI are timed one after the other. Loaders
loop over epochs (persistent workers where the DataLoader has them). Each loader's first batch is
checked: patch shapes, and the patch voxels against the float32 stored arrays at the patch's position (a blosc2
compact image within the conversion error its meta.json records; labels exactly).

``--cold`` also times the store loaders (raw memmap, volfm, volfm blosc2) cold: in the worker, right before a
case's arrays are opened, their files are evicted from the OS page cache (``posix_fadvise(DONTNEED)``, see
:mod:`volfm.bench.pagecache`), so every item reads from disk. Each item's memmaps are dropped when the item is
built (mapped pages would stay cached), and the cohort should hold >= 20 cases so that the workers rarely read
the same case at the same time. The bytes read from disk during the timed chunks are reported beside each rate.

``--whole`` adds whole-volume loading on a Merlin-like store (``ct_merlin``: 1.5 x 1.5 x 3 mm, centre crop/pad to
``--whole-size``, default 224x224x160, image only): raw memmap, ``PatchDataset(StoreDataset(label=None),
WholeVolumeSampler())`` on float32 and (with blosc2) the converted store; volumes/s, decoded and stored bytes/s per
worker core, and those figures extrapolated to a ``--host-cores`` (16) GPU host.

Bytes per case are the sizes of the stored array files (:func:`volfm.store.arrays.array_file`). Goals are
printed as PASS/FAIL lines: volfm >= 10x TorchIO and >= 0.5x raw memmap (warm); with blosc2, the store at
<= 35% of the float32 bytes, and blosc2 patches/s >= 0.85x the float32 rates warm and >= 1.5x cold.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import logging
import math
import os
import shutil
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

from volfm.bench.common import ints_arg, parse_skip, quiet_import, scratch_dir, write_results
from volfm.bench.pagecache import CAN_EVICT, disk_read_bytes, evict, flush, readahead_kib, resident_fraction
from volfm.data.datamodules import collate_cases
from volfm.data.dataset import StoreDataset
from volfm.data.samplers import LabelWeightedPatchSampler, PatchDataset, WholeVolumeSampler, extract_patch
from volfm.io import Volume, write_nifti
from volfm.preprocess.spec import resolve_spec_path
from volfm.store.arrays import array_file, convert_store
from volfm.store.build import run_cohort
from volfm.store.cohort import read_table, write_table
from volfm.store.layout import CohortStore
from volfm.synth.ct import LABELS, make_ct_cohort

LOADERS = ("raw memmap", "volfm", "volfm blosc2", "TorchIO Queue", "MONAI CacheDataset")
COLD_LOADERS = ("raw memmap", "volfm", "volfm blosc2")
ENCODINGS = ("npy", "blosc2")
GOAL_VS_TORCHIO = 10.0
GOAL_VS_RAW = 0.5
GOAL_BYTES = 0.35  # blosc2 store bytes / float32 store bytes
GOAL_WARM = 0.85  # blosc2 patches/s / float32 patches/s, warm
GOAL_COLD = 1.5  # the same, cold
MIN_COLD_CASES = 20
MAX_RESIDENT_AFTER_EVICT = 0.05
MiB = 2**20


def blosc2_storage(patch) -> dict:
    """The encoding ``--encoding blosc2`` converts to: integer CT levels, LZ4HC 5, chunks from the patch size."""
    return {"codec": "blosc2", "dtype": "compact", "chunk_patch": [int(p) for p in patch], "clevel": 5}


# --- data ------------------------------------------------------------------------------------------

def seg_spec(spacing) -> dict:
    """preprocessing/ct_seg.yaml (built-in copy as fallback), with ``spacing`` (mm) substituted."""
    path = resolve_spec_path("ct_seg")
    raw = yaml.safe_load(path.read_text())
    raw["spacing"] = [float(s) for s in spacing]
    return raw


def whole_spec(size) -> dict:
    """preprocessing/ct_merlin.yaml (Merlin's 1.5 x 1.5 x 3 mm, centre crop/pad) with crop ``size``, image only."""
    raw = yaml.safe_load(resolve_spec_path("ct_merlin").read_text())
    raw["crop"]["size"] = [int(s) for s in size]
    raw["inputs"] = {"image": raw["inputs"]["image"]}
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


def _preprocess(spec: dict, spec_path: Path, csv, store: Path, workers: int) -> float:
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.perf_counter()
    summary = run_cohort(spec_path, store, cohort=csv, workers=max(1, workers), progress=False, qc=False,
                         log=lambda *a, **k: None)
    if summary["failed"]:
        raise RuntimeError(f"preprocessing failed for {summary['failed']} case(s): {summary['failures'][:3]}")
    return time.perf_counter() - t0


def build_data(root: Path, n_cases: int, shape, spacing, workers: int, log=print, nifti: bool = True) -> dict:
    """Synthesise the cohort, preprocess it into ``root/store`` and (``nifti``) write ``root/nifti``; returns
    {store, cases: [{case_id, image_npy, label_npy, image_nii, label_nii, affine, shape}], timings}."""
    t0 = time.perf_counter()
    csv = make_ct_cohort(root / "cohort", n_cases, seed=0, shape=tuple(shape), workers=max(1, workers),
                         progress=False)
    t_synth = time.perf_counter() - t0
    store = root / "store"
    t_prep = _preprocess(seg_spec(spacing), root / "ct_seg_bench.yaml", csv, store, workers)

    ids = CohortStore(store).ok_ids
    t0 = time.perf_counter()
    if nifti:
        nii = root / "nifti"
        nii.mkdir(parents=True, exist_ok=True)
        jobs = [(str(store / "cases" / cid), str(nii), cid) for cid in ids]
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as ex:
                written = list(ex.map(_write_case_nifti, jobs))
        else:
            written = [_write_case_nifti(j) for j in jobs]
    else:
        written = [(cid, {"image": None, "label": None},
                    json.loads((store / "cases" / cid / "meta.json").read_text())["affine"]) for cid in ids]
    t_nii = time.perf_counter() - t0
    cases = []
    for cid, paths, affine in written:
        img = np.load(store / "cases" / cid / "image.npy", mmap_mode="r")
        cases.append({"case_id": cid, "image_npy": str(store / "cases" / cid / "image.npy"),
                      "label_npy": str(store / "cases" / cid / "label.npy"), "image_nii": paths["image"],
                      "label_nii": paths["label"], "affine": affine, "shape": list(img.shape[1:])})
    return {"store": store, "cases": cases,
            "timings": {"synth_s": t_synth, "preprocess_s": t_prep, "write_nifti_s": t_nii}}


def build_whole(root: Path, n_cases: int, shape, size, workers: int) -> dict:
    """A Merlin-like store (``whole_spec(size)``, image only) of ``n_cases`` synthetic CTs of grid ``shape`` in
    ``root/store``; returns {store, cases: [{case_id, image_npy, shape}], timings}."""
    t0 = time.perf_counter()
    csv = make_ct_cohort(root / "cohort", n_cases, seed=1, shape=tuple(shape), workers=max(1, workers),
                         progress=False)
    rows = read_table(csv)
    for r in rows:
        r.pop("label", None)
    image_only = csv.with_name("cohort_image_only.csv")  # beside cohort.csv: its relative paths still hold
    write_table(image_only, rows)
    t_synth = time.perf_counter() - t0
    store = root / "store"
    t_prep = _preprocess(whole_spec(size), root / "ct_merlin_bench.yaml", image_only, store, workers)
    cases = []
    for cid in CohortStore(store).ok_ids:
        p = store / "cases" / cid / "image.npy"
        cases.append({"case_id": cid, "image_npy": str(p), "shape": list(np.load(p, mmap_mode="r").shape[1:])})
    return {"store": store, "cases": cases, "timings": {"synth_s": t_synth, "preprocess_s": t_prep}}


def convert_copy(store: Path, dest: Path, patch, workers: int) -> float:
    """Copy ``store`` to ``dest`` and convert the copy to :func:`blosc2_storage`; returns the conversion seconds."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(store, dest)
    t0 = time.perf_counter()
    convert_store(dest, blosc2_storage(patch), workers=max(1, workers), progress=False)
    return time.perf_counter() - t0


def store_files(store: Path, names) -> dict[str, dict[str, Path]]:
    """{case_id: {array name: its stored file}} of a store's ok cases (the real files: .npy or .b2nd)."""
    out = {}
    for cid in CohortStore(store).ok_ids:
        case_dir = Path(store) / "cases" / cid
        files = {}
        for n in names:
            f = array_file(case_dir, n)
            if f is None:
                raise RuntimeError(f"{case_dir}: no stored file for array '{n}'")
            files[n] = Path(f)
        out[cid] = files
    return out


def store_bytes(store: Path, names) -> dict:
    """Bytes of a store's array files: total and mean per case, per array and all together."""
    files = store_files(store, names)
    per = {n: [os.path.getsize(f[n]) for f in files.values()] for n in names}
    total = sum(sum(v) for v in per.values())
    return {"store": str(store), "cases": len(files), "total_bytes": total, "bytes_per_case": total / len(files),
            "arrays": {n: {"total_bytes": sum(v), "bytes_per_case": sum(v) / len(v),
                           "suffix": next(iter(files.values()))[n].suffix} for n, v in per.items()}}


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


def disk_rate(paths) -> float:
    """Sequential cold read of ``paths`` (evicted first), in bytes/s; evicts them again afterwards."""
    evict(paths)
    t0 = time.perf_counter()
    n = read_all(paths)
    dt = time.perf_counter() - t0
    evict(paths)
    return n / dt


def evict_and_check(paths) -> float | None:
    """Evict ``paths`` and return the mean fraction of their pages still cached (None: cannot be measured)."""
    evict(paths)
    fr = [resident_fraction(p) for p in paths]
    return None if any(f is None for f in fr) else float(np.mean(fr))


# --- the raw limit, and cold datasets -------------------------------------------------------------

class RawMemmapPatches:
    """Item i: a uniformly random window, fully inside the volume, of case i // spv's image.npy and
    label.npy, read with np.load(mmap_mode='r') + np.ascontiguousarray (the least any store loader does).
    cold: evict both files from the page cache right before opening them."""

    def __init__(self, cases, patch, samples_per_volume: int, seed: int = 0, cold: bool = False):
        self.cases = [(c["image_npy"], c["label_npy"]) for c in cases]
        self.patch = tuple(int(p) for p in patch)
        self.spv = int(samples_per_volume)
        self.seed = int(seed)
        self.cold = bool(cold)

    def __len__(self):
        return len(self.cases) * self.spv

    def __getitem__(self, i):
        ci = int(i) // self.spv
        img_p, lab_p = self.cases[ci]
        if self.cold:
            evict((img_p, lab_p))
        img = np.load(img_p, mmap_mode="r")
        lab = np.load(lab_p, mmap_mode="r")
        rng = np.random.default_rng([self.seed, int(i)])
        shape = img.shape[1:]
        start = [int(rng.integers(0, max(d - p, 0) + 1)) for d, p in zip(shape, self.patch)]
        sl = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        a, b = np.ascontiguousarray(img[sl]), np.ascontiguousarray(lab[sl])
        del img, lab  # unmapped here, so the next eviction of these files drops every page
        if a.shape[1:] != self.patch:  # volume smaller than the patch: pad at the end (not in the default run)
            pad = [(0, 0)] + [(0, p - s) for s, p in zip(a.shape[1:], self.patch)]
            a, b = np.pad(a, pad), np.pad(b, pad)
        return {"image": torch.from_numpy(a), "label": torch.from_numpy(b), "start": torch.tensor(start),
                "case": ci}


class RawWholeVolumes:
    """Item i: case i's whole image.npy, read with np.load(mmap_mode='r') + np.array (cold: evicted first)."""

    def __init__(self, cases, cold: bool = False):
        self.paths = [c["image_npy"] for c in cases]
        self.cold = bool(cold)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        p = self.paths[int(i)]
        if self.cold:
            evict((p,))
        mm = np.load(p, mmap_mode="r")
        v = np.array(mm)
        del mm
        return {"image": torch.from_numpy(v), "case": int(i)}


class ColdStoreDataset(StoreDataset):
    """A StoreDataset whose every array file is evicted from the OS page cache right before it is opened (in the
    process that reads it: the DataLoader worker). Bench-only: the item's arrays are not kept once the patch is cut,
    so no mapping of a previous item holds pages in the cache."""

    def array(self, case_id: str, name: str):
        record = (self.meta(case_id).get("storage") or {}).get(name)  # the file this read will open
        f = array_file(self.root / "cases" / case_id, name, record)
        if f is not None:
            evict((f,))
        return super().array(case_id, name)


# --- loaders ---------------------------------------------------------------------------------------

def _dl_kwargs(workers: int) -> dict:
    return {"num_workers": workers, "persistent_workers": workers > 0}


def make_raw(data, args, cold: bool = False):
    ds = RawMemmapPatches(data["cases"], args.patch, args.samples_per_volume, cold=cold)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, **_dl_kwargs(args.workers))
    cases = data["cases"]

    def inspect(batch):
        n = _check_shapes(batch["image"], batch["label"], args.patch, "raw memmap")
        for b in range(n):
            c = cases[int(batch["case"][b])]
            _check_window(batch["image"][b], batch["label"][b], c, [int(s) for s in batch["start"][b]], "raw memmap")
        return n

    note = "DataLoader(shuffle=True), default collate" + (", image.npy and label.npy evicted before each item"
                                                           if cold else "")
    return loader, inspect, lambda batch: batch["image"].shape[0], note


def make_volfm(data, args, store_key: str = "store", cold: bool = False):
    cls = ColdStoreDataset if cold else StoreDataset
    ds = PatchDataset(cls(data[store_key], arrays=("image",), label="label"),
                      LabelWeightedPatchSampler(args.patch, foreground_fraction=1 / 3),
                      samples_per_volume=args.samples_per_volume, seed=0)
    kw = {"collate_fn": collate_cases} if collate_cases is not None else {}
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, **_dl_kwargs(args.workers), **kw)
    by_id = {c["case_id"]: c for c in data["cases"]}
    atol = data.get("atol", {}).get(store_key, 0.0)
    who = "volfm" if store_key == "store" else "volfm blosc2"

    def inspect(batch):
        n = _check_shapes(batch["image"], batch["label"], args.patch, who)
        for b in range(n):
            c = by_id[batch["case_id"][b]]
            _check_window(batch["image"][b], batch["label"][b], c, [int(s) for s in batch["patch_start"][b]],
                          who, pad=(0.0, 0), atol=atol)
        return n

    note = (f"PatchDataset({cls.__name__}, LabelWeightedPatchSampler(fg 1/3)), DataLoader(shuffle=True, "
            f"collate={'collate_cases' if collate_cases else 'default'})")
    if store_key != "store":
        note += f"; store converted to {blosc2_storage(args.patch)}"
    return loader, inspect, lambda batch: batch["image"].shape[0], note


def make_whole_raw(data, args, cold: bool = False):
    ds = RawWholeVolumes(data["cases"], cold=cold)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, **_dl_kwargs(args.workers))
    cases = data["cases"]

    def inspect(batch):
        n = _check_volumes(batch["image"], args.whole_size, "raw memmap")
        for b in range(n):
            _check_volume(batch["image"][b], cases[int(batch["case"][b])], "raw memmap")
        return n

    note = "np.array(np.load(image.npy, mmap_mode='r')), DataLoader(shuffle=True), default collate" + (
        ", image.npy evicted before each item" if cold else "")
    return loader, inspect, lambda batch: batch["image"].shape[0], note


def make_whole_volfm(data, args, store_key: str = "store", cold: bool = False):
    cls = ColdStoreDataset if cold else StoreDataset
    ds = PatchDataset(cls(data[store_key], arrays=("image",), label=None), WholeVolumeSampler(),
                      samples_per_volume=1, seed=0)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, collate_fn=collate_cases,
                        **_dl_kwargs(args.workers))
    by_id = {c["case_id"]: c for c in data["cases"]}
    atol = data.get("atol", {}).get(store_key, 0.0)
    who = "volfm" if store_key == "store" else "volfm blosc2"

    def inspect(batch):
        n = _check_volumes(batch["image"], args.whole_size, who)
        for b in range(n):
            _check_volume(batch["image"][b], by_id[batch["case_id"][b]], who, atol=atol)
        return n

    note = f"PatchDataset({cls.__name__}(label=None), WholeVolumeSampler()), DataLoader(collate_cases)"
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


# --- checks ----------------------------------------------------------------------------------------

def _check_shapes(img, lab, patch, who) -> int:
    n = int(img.shape[0])
    want = (n, 1, *[int(p) for p in patch])
    if tuple(img.shape) != want or tuple(lab.shape) != want:
        raise AssertionError(f"{who}: patch shapes image {tuple(img.shape)} label {tuple(lab.shape)}, expected {want}")
    return n


def _check_window(img, lab, case, start, who, pad=(0.0, 0), atol: float = 0.0):
    """The patch equals the float32 stored arrays at ``start`` (padded with the background where outside); the
    image within ``atol`` (a compact encoding's recorded error), the label exactly."""
    patch = [int(s) for s in img.shape[1:]]
    ref_i = extract_patch(np.load(case["image_npy"], mmap_mode="r"), start, patch, pad[0])
    ref_l = extract_patch(np.load(case["label_npy"], mmap_mode="r"), start, patch, pad[1])
    a = np.asarray(img, np.float32)
    b = np.asarray(lab).astype(np.int64)
    err = float(np.abs(a.astype(np.float64) - ref_i).max()) if a.shape == ref_i.shape else math.inf
    if not err <= atol or not np.array_equal(b, ref_l.astype(np.int64)):
        raise AssertionError(f"{who}: patch at {start} of case {case['case_id']} differs from the stored arrays "
                             f"(max |diff| image {err:.3g}, allowed {atol:.3g})")


def _check_volumes(img, size, who) -> int:
    n = int(img.shape[0])
    want = (n, 1, *[int(s) for s in size])
    if tuple(img.shape) != want or img.dtype != torch.float32:
        raise AssertionError(f"{who}: volumes {tuple(img.shape)} {img.dtype}, expected {want} float32")
    return n


def _check_volume(img, case, who, atol: float = 0.0):
    ref = np.load(case["image_npy"], mmap_mode="r")
    err = float(np.abs(np.asarray(img, np.float64) - ref).max())
    del ref
    if not err <= atol:
        raise AssertionError(f"{who}: volume of case {case['case_id']} differs from the float32 store "
                             f"(max |diff| {err:.3g}, allowed {atol:.3g})")


def recorded_error(store: Path, name: str = "image") -> float:
    """The largest conversion error the store's meta.json files record for array ``name`` (0 when none does)."""
    worst = 0.0
    cs = CohortStore(store)
    for cid in cs.ok_ids:
        rec = ((cs.meta(cid).get("storage") or {}).get(name) or {})
        worst = max(worst, float(rec.get("max_abs_error") or 0.0))
    return worst


# --- timing ----------------------------------------------------------------------------------------

def _forever(loader):
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("loader yielded no batch")


def measure_group(entries, data, args, log=print, cache: str = "warm", batches: int | None = None,
                  warmup: int | None = None) -> list[dict]:
    """Time loaders side by side. Each ``(name, maker)`` of ``entries`` is built, yields its first batch (checked:
    shapes and content) and ``warmup`` (default ``--warmup``) untimed batches; then ``--repeats`` rounds each time
    one chunk of every loader in turn, ``batches`` (default ``--batches``) x ``--batch-size`` items per loader over
    all rounds, so load from other jobs on a shared machine falls on every loader alike. Before each chunk the
    batches its workers prefetched while the others ran are taken untimed, so no chunk starts with a full queue.
    Bytes read from the block devices during a loader's chunks are summed."""
    warmup = args.warmup if warmup is None else warmup
    runs = []
    for name, maker in entries:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            loader, inspect, count, note = maker(data, args)  # MONAI's reader registration chatter
        setup = time.perf_counter() - t0
        it = _forever(loader)
        t0 = time.perf_counter()
        first = next(it)
        first_s = time.perf_counter() - t0
        n_first = inspect(first)  # shapes + content against the store
        shape = first["image"]["data"].shape if name.startswith("TorchIO") else first["image"].shape
        del first
        for _ in range(max(0, warmup - 1)):
            count(next(it))
        workers = getattr(loader, "num_workers", 0)
        prefetched = workers * (getattr(loader, "prefetch_factor", None) or 2) if len(entries) > 1 else 0
        runs.append({"name": name, "loader": loader, "it": it, "count": count, "note": note, "setup": setup,
                     "first_s": first_s, "n_first": n_first, "patch_shape": list(shape[1:]), "prefetched": prefetched,
                     "times": [], "counts": [], "disk": 0})
    target = max(1, math.ceil((batches or args.batches) * args.batch_size / args.repeats))
    for _ in range(args.repeats):
        for r in runs:
            for _ in range(r["prefetched"]):
                r["count"](next(r["it"]))
            d0 = disk_read_bytes()
            t0 = time.perf_counter()
            n = 0
            while n < target:
                n += r["count"](next(r["it"]))
            r["times"].append(time.perf_counter() - t0)
            r["counts"].append(n)
            d1 = disk_read_bytes()
            r["disk"] = None if d0 is None or d1 is None or r["disk"] is None else r["disk"] + d1 - d0
    results = []
    for r in runs:
        rate = sum(r["counts"]) / sum(r["times"])
        res = {"loader": r["name"], "cache": cache, "patches_per_s": rate, "setup_s": r["setup"],
               "first_batch_s": r["first_s"], "timed_patches": sum(r["counts"]), "timed_s": sum(r["times"]),
               "chunk_s": r["times"], "chunk_patches": r["counts"], "patches_per_batch": r["n_first"],
               "patch_shape": r["patch_shape"], "content_checked": True, "note": r["note"],
               "disk_read_bytes": r["disk"], "interleaved_with": [e[0] for e in entries if e[0] != r["name"]]}
        cb = getattr(r["loader"], "_bench_cache_bytes", None)
        if cb is not None:
            res["cache_bytes"] = cb
        dtxt = "" if r["disk"] is None else f", {r['disk'] / MiB:.0f} MiB read from disk"
        log(f"  {r['name']:<20} {cache:<5} {rate:9.1f} items/s  (setup {r['setup']:.2f} s, first batch "
            f"{r['first_s']:.2f} s, {sum(r['counts'])} items in {sum(r['times']):.2f} s{dtxt})")
        results.append(res)
        r["it"].close()
    del runs
    gc.collect()
    return results


def measure(name, maker, data, args, log=print, cache: str = "warm", batches: int | None = None) -> dict:
    """Time one loader on its own (:func:`measure_group` of one)."""
    return measure_group([(name, maker)], data, args, log=log, cache=cache, batches=batches)[0]


# --- main ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="volfm bench loader",
                                description="random 3D patches/s and whole volumes/s: volfm store (npy, blosc2; warm, "
                                            "cold) vs raw memmap, TorchIO Queue, MONAI")
    p.add_argument("--cases", type=int, default=50, help="synthetic CT cases (default 50)")
    p.add_argument("--shape", type=ints_arg, default=[128, 128, 64], help="synthetic CT grid (default 128,128,64)")
    p.add_argument("--spacing", type=float, default=1.5, help="store spacing in mm, isotropic (ct_seg: 1.5)")
    p.add_argument("--patch", type=ints_arg, default=[96, 96, 96],
                   help="patch size (default 96,96,96; also the blosc2 chunk_patch)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    p.add_argument("--batch-size", type=int, default=2, help="patches (or volumes) per batch (MONAI: items per batch)")
    p.add_argument("--samples-per-volume", type=int, default=4,
                   help="patches per loaded volume: PatchDataset, tio.Queue and MONAI num_samples (default 4)")
    p.add_argument("--queue-length", type=int, default=32, help="tio.Queue max_length (default 32)")
    p.add_argument("--batches", type=int, default=150, help="timed batches x batch size = timed patches (default 150)")
    p.add_argument("--warmup", type=int, default=100,
                   help="untimed batches first (default 100: about one pass over the default cohort's patches, so the "
                        "workers hold the cases' foreground locations, as in training after the first epoch)")
    p.add_argument("--whole-warmup", type=int, default=10, help="untimed whole-volume batches first (default 10)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed chunks the timed patches are split into; the store loaders take turns chunk by chunk "
                        "(default 5)")
    p.add_argument("--encoding", choices=ENCODINGS, default="npy",
                   help="npy: the float32 store only (default); blosc2: also convert a copy to blosc2 compact "
                        "(volfm.store.arrays.convert_store) and time it beside float32 in the same run")
    p.add_argument("--cold", action="store_true",
                   help="also time the store loaders cold: each case's array files evicted from the page cache "
                        "(posix_fadvise DONTNEED) in the worker right before they are read")
    p.add_argument("--whole", action="store_true",
                   help="also time whole volumes/s on a Merlin-like ct_merlin store (WholeVolumeSampler)")
    p.add_argument("--whole-cases", type=int, default=24, help="cases of the whole-volume store (default 24)")
    p.add_argument("--whole-shape", type=ints_arg, default=[256, 256, 128],
                   help="synthetic CT grid of the whole-volume cohort (default 256,256,128)")
    p.add_argument("--whole-size", type=ints_arg, default=[224, 224, 160],
                   help="ct_merlin crop/pad size of the whole-volume store (default Merlin's 224,224,160)")
    p.add_argument("--whole-batches", type=int, default=40, help="timed whole-volume batches (default 40)")
    p.add_argument("--host-cores", type=int, default=16,
                   help="worker cores of the GPU host the whole-volume figures are extrapolated to (default 16)")
    p.add_argument("--out", help="folder for the cohort/store/NIfTI (default: a temp dir, removed afterwards)")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--skip", default="", help="comma-separated loaders to skip: torchio,monai")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for k in ("cases", "batch_size", "samples_per_volume", "queue_length", "batches", "repeats", "warmup",
              "whole_cases", "whole_batches", "whole_warmup", "host_cores"):
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
    if args.cold and not CAN_EVICT:
        print("volfm bench loader: --cold needs os.posix_fadvise (Linux)", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    with scratch_dir(args.out, "volfm_bench_loader_") as root:
        return _run(args, root, skip)


def _mib(b) -> str:
    return f"{b / MiB:.1f}"


def _goal(goals: dict, key: str, text: str, value: float | None, ok: bool | None, detail: str) -> None:
    """One goal line, PASS/FAIL (or 'not measured' when ``value`` is None), and its JSON entry."""
    if value is None:
        goals[key] = {"pass": None, "value": None, "note": detail}
        print(f"{text}: not measured ({detail})")
        return
    goals[key] = {"pass": bool(ok), "value": float(value), "note": detail}
    print(f"{text}: {'PASS' if ok else 'FAIL'} ({detail})")


def _bytes_table(rows) -> None:
    """rows: (label, store_bytes doc, float32 doc)."""
    names = list(dict.fromkeys(n for _, d, _ in rows for n in d["arrays"]))
    head = f"{'store':<28} {'cases':>5} " + " ".join(f"{n + ' MiB':>11}" for n in names) + \
        f" {'total MiB':>10} {'of float32':>11}"
    print(head)
    print("-" * len(head))
    for label, d, ref in rows:
        cells = " ".join(f"{_mib(d['arrays'][n]['bytes_per_case']):>11}" if n in d["arrays"] else f"{'-':>11}"
                         for n in names)
        print(f"{label:<28} {d['cases']:>5} {cells} {_mib(d['bytes_per_case']):>10} "
              f"{d['total_bytes'] / ref['total_bytes']:11.3f}")
    print("bytes per case: mean size of the stored array files (array_file: .npy or .b2nd) over the store's cases; "
          "of float32 = total bytes / the float32 store's")


def _cold_setup(label: str, files: list, evicted: dict, disk: dict) -> None:
    """Flush and evict ``files`` (the store's array files), check with mincore that they left the page cache, and
    (once) time a sequential cold read of a few of them."""
    flush(files)
    if "bytes_per_s" not in disk:
        sample = files[:8]
        disk["bytes_per_s"] = disk_rate(sample)
        disk["sample_bytes"] = sum(os.path.getsize(f) for f in sample)
        disk["readahead_kib"] = readahead_kib(sample[0])
        ra = "" if disk["readahead_kib"] is None else f"; kernel readahead {disk['readahead_kib']} KiB"
        print(f"disk: sequential cold read {disk['bytes_per_s'] / MiB:.0f} MiB/s ({len(sample)} array files, "
              f"{disk['sample_bytes'] / MiB:.0f} MiB, evicted first; on a VM the host may still cache them){ra}")
    fr = evict_and_check(files)
    ok = fr is not None and fr <= MAX_RESIDENT_AFTER_EVICT
    evicted[label] = {"resident_fraction": fr, "ok": ok, "files": len(files)}
    fr_txt = "unknown (mincore unavailable)" if fr is None else f"{100 * fr:.1f}%"
    print(f"eviction check ({label}): {fr_txt} of {len(files)} array files' pages still cached after "
          f"posix_fadvise(DONTNEED){'' if ok else ' -- EVICTION DID NOT WORK, cold figures are not cold'}")


def _run(args, root: Path, skip: set) -> int:
    quiet_import("monai.transforms", "monai.data", "torchio", "volfm.data.datamodules")
    blosc = args.encoding == "blosc2"
    patch = "x".join(map(str, args.patch))
    print(f"volfm bench loader: random {patch} patches/s from {args.cases} synthetic CT cases "
          f"({'x'.join(map(str, args.shape))} -> ct_seg store @ {args.spacing:g} mm), {args.workers} workers, "
          f"batch {args.batch_size}, {args.samples_per_volume} samples per volume")
    print(f"{os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads in the main process; timed: "
          f"{args.batches} x {args.batch_size} patches in {args.repeats} chunks after {args.warmup} warm-up batches")
    print(f"encoding: {args.encoding}" + (f" (float32 store, and a copy converted to {blosc2_storage(args.patch)})"
                                          if blosc else " (float32 store)")
          + f"; cold: {'yes' if args.cold else 'no'}; whole volumes: "
          + (f"yes ({args.whole_cases} cases -> {'x'.join(map(str, args.whole_size))})" if args.whole else "no"))
    if args.cold and (args.cases < MIN_COLD_CASES or (args.whole and args.whole_cases < MIN_COLD_CASES)):
        print(f"note: fewer than {MIN_COLD_CASES} cases: workers may read a case another worker has just cached, "
              "so cold figures lean warm")
    peers = [n for n in ("TorchIO Queue", "MONAI CacheDataset")
             if not (n.startswith("TorchIO") and "torchio" in skip) and not (n.startswith("MONAI") and "monai" in skip)]
    data = build_data(root, args.cases, args.shape, [args.spacing] * 3, args.workers, nifti=bool(peers))
    t = data["timings"]
    shapes = np.array([c["shape"] for c in data["cases"]])
    nii = [c[k] for c in data["cases"] for k in ("image_nii", "label_nii") if c[k]]
    nii_bytes = sum(os.path.getsize(p) for p in nii)
    stores = {"ct_seg float32": store_bytes(data["store"], ("image", "label"))}
    print(f"data: synth {t['synth_s']:.1f} s, run_cohort {t['preprocess_s']:.1f} s"
          + (f", write .nii.gz {t['write_nifti_s']:.1f} s" if peers else "")
          + f"; {len(data['cases'])} stored cases, grid {shapes.min(0).tolist()} .. {shapes.max(0).tolist()} voxels; "
          f"store arrays {stores['ct_seg float32']['total_bytes'] / MiB:.0f} MiB"
          + (f", .nii.gz {nii_bytes / MiB:.0f} MiB" if peers else ""))
    if blosc:
        data["store_blosc2"] = root / "store_blosc2"
        t["convert_s"] = convert_copy(data["store"], data["store_blosc2"], args.patch, args.workers)
        stores["ct_seg blosc2"] = store_bytes(data["store_blosc2"], ("image", "label"))
        data["atol"] = {"store_blosc2": recorded_error(data["store_blosc2"])}
        print(f"convert_store to blosc2 compact: {t['convert_s']:.1f} s for {len(data['cases'])} cases with "
              f"{max(1, args.workers)} workers; largest recorded image error {data['atol']['store_blosc2']:.3g}")
    print()
    _bytes_table([(k, v, stores["ct_seg float32"]) for k, v in stores.items()])
    print()

    arr_files = {k: [str(f) for fs in store_files(Path(v["store"]), ("image", "label")).values() for f in fs.values()]
                 for k, v in stores.items()}
    t0 = time.perf_counter()
    nbytes = read_all([f for fs in arr_files.values() for f in fs] + nii)
    print(f"page cache: read all {nbytes / MiB:.0f} MiB once in {time.perf_counter() - t0:.2f} s before timing")

    makers = {"raw memmap": make_raw, "volfm": make_volfm,
              "volfm blosc2": functools.partial(make_volfm, store_key="store_blosc2"),
              "TorchIO Queue": make_torchio, "MONAI CacheDataset": make_monai}
    names = [n for n in LOADERS if (n != "volfm blosc2" or blosc) and (n in COLD_LOADERS or n in peers)]
    print("timing ...")
    store_names = [n for n in names if n in COLD_LOADERS]
    results = measure_group([(n, makers[n]) for n in store_names], data, args)
    results += [measure(n, makers[n], data, args) for n in names if n not in COLD_LOADERS]
    evicted, disk = {}, {}
    if args.cold:
        _cold_setup("ct_seg stores", [f for fs in arr_files.values() for f in fs], evicted, disk)
        results += measure_group([(n, functools.partial(makers[n], cold=True)) for n in store_names], data, args,
                                 cache="cold")

    by = {(r["loader"], r["cache"]): r for r in results}
    raw = {c: by[("raw memmap", c)]["patches_per_s"] for c in ("warm", "cold") if ("raw memmap", c) in by}
    tio_rate = by[("TorchIO Queue", "warm")]["patches_per_s"] if ("TorchIO Queue", "warm") in by else None
    per_case = {"raw memmap": stores["ct_seg float32"]["bytes_per_case"],
                "volfm": stores["ct_seg float32"]["bytes_per_case"],
                "volfm blosc2": stores.get("ct_seg blosc2", {}).get("bytes_per_case"),
                "TorchIO Queue": nii_bytes / len(data["cases"]), "MONAI CacheDataset": nii_bytes / len(data["cases"])}
    for r in results:
        r["vs_torchio"] = r["patches_per_s"] / tio_rate if tio_rate and r["cache"] == "warm" else None
        r["frac_raw"] = r["patches_per_s"] / raw[r["cache"]]
        r["stored_bytes_per_case"] = per_case[r["loader"]]

    print()
    head = (f"{'loader':<20} {'cache':<5} {'patches/s':>10} {'vs TorchIO':>11} {'of raw':>7} {'MiB/case':>9} "
            f"{'disk MiB/patch':>15} {'setup s':>8} {'1st batch s':>12}  {'patch':<12}")
    print(head)
    print("-" * len(head))
    for r in results:
        vt = f"{r['vs_torchio']:10.2f}x" if r["vs_torchio"] is not None else f"{'-':>11}"
        dk = f"{r['disk_read_bytes'] / r['timed_patches'] / MiB:15.2f}" if r["disk_read_bytes"] is not None \
            else f"{'-':>15}"
        print(f"{r['loader']:<20} {r['cache']:<5} {r['patches_per_s']:10.1f} {vt} {r['frac_raw']:7.2f} "
              f"{r['stored_bytes_per_case'] / MiB:9.1f} {dk} {r['setup_s']:8.2f} "
              f"{r['first_batch_s']:12.2f}  {'x'.join(map(str, r['patch_shape'])):<12}")
    print("patches/s = timed patches / timed seconds; vs TorchIO = patches/s / TorchIO Queue's; of raw = fraction "
          "of the raw memmap rate in the same cache state; MiB/case = stored array files per case (TorchIO, MONAI: "
          ".nii.gz; MONAI decodes them once into RAM); disk MiB/patch = bytes read from the block device during the "
          "timed chunks (/proc/diskstats, every process on the machine) / timed patches; setup = building the dataset "
          "(MONAI: its cache); 1st batch includes worker start-up")
    print("every loader's first batch: image and label patches (N, 1, " + ", ".join(map(str, args.patch))
          + ") equal to the float32 stored arrays at the patch's position (blosc2 image: within the recorded "
            "conversion error)")
    print("notes:")
    for r in results:
        print(f"  {r['loader']} ({r['cache']}): {r['note']}")

    whole = _run_whole(args, root, blosc, evicted, disk) if args.whole else None

    goals = {}
    print()
    v = by[("volfm", "warm")]["patches_per_s"]
    if tio_rate:
        x = v / tio_rate
        goals["volfm_10x_torchio"] = {"pass": bool(x >= GOAL_VS_TORCHIO), "value": x}
        print(f"volfm >= {GOAL_VS_TORCHIO:g}x TorchIO Queue: {'PASS' if x >= GOAL_VS_TORCHIO else 'FAIL'} ({x:.2f}x)")
    x = v / raw["warm"]
    goals["volfm_half_raw"] = {"pass": bool(x >= GOAL_VS_RAW), "value": x}
    print(f"volfm >= {GOAL_VS_RAW:g} x raw memmap: {'PASS' if x >= GOAL_VS_RAW else 'FAIL'} ({x:.2f})")
    if blosc:
        pairs = [("ct_seg", stores["ct_seg blosc2"], stores["ct_seg float32"])]
        if whole:
            pairs.append(("ct_merlin", whole["stores"]["ct_merlin blosc2"], whole["stores"]["ct_merlin float32"]))
        for label, b2, f32 in pairs:
            x = b2["total_bytes"] / f32["total_bytes"]
            _goal(goals, f"blosc2_bytes_{label}", f"blosc2 {label} store <= {GOAL_BYTES:.0%} of the float32 bytes", x,
                  x <= GOAL_BYTES, f"{x:.3f}: {_mib(b2['total_bytes'])} of {_mib(f32['total_bytes'])} MiB")
        for cache, goal in (("warm", GOAL_WARM), ("cold", GOAL_COLD)):
            for ref, key in (("raw memmap", "raw"), ("volfm", "volfm")):
                text = f"volfm blosc2 >= {goal:g}x {ref} float32 patches/s, {cache}"
                b2r, fr = by.get(("volfm blosc2", cache)), by.get((ref, cache))
                if b2r is None or fr is None:
                    _goal(goals, f"blosc2_{cache}_vs_{key}", text, None, None, "run with --cold")
                    continue
                x = b2r["patches_per_s"] / fr["patches_per_s"]
                ok = x >= goal
                detail = f"{x:.2f}x: {b2r['patches_per_s']:.1f} vs {fr['patches_per_s']:.1f}"
                if cache == "cold" and not evicted.get("ct_seg stores", {}).get("ok"):
                    ok, detail = False, detail + "; page-cache eviction was not confirmed"
                _goal(goals, f"blosc2_{cache}_vs_{key}", text, x, ok, detail)

    if args.json:
        cfg = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items()
               if k not in ("json", "out")}
        doc = {"config": cfg, "cpus": os.cpu_count(), "data": {**data["timings"], "cases": len(data["cases"]),
                                                               "grid_min": shapes.min(0).tolist(),
                                                               "grid_max": shapes.max(0).tolist(),
                                                               "nifti_bytes": nii_bytes},
               "stores": stores, "loaders": results, "whole": whole, "disk": disk, "eviction": evicted,
               "goals": goals}
        write_results(args.json, doc)
    return 0


def _run_whole(args, root: Path, blosc: bool, evicted: dict, disk: dict) -> dict:
    """Whole volumes/s on a Merlin-like store (float32 and, with blosc2, its converted copy), warm and (--cold)
    cold, per worker core and extrapolated to ``--host-cores``."""
    size = "x".join(map(str, args.whole_size))
    print()
    print(f"whole volumes: {args.whole_cases} synthetic CTs of {'x'.join(map(str, args.whole_shape))} -> ct_merlin "
          f"store (1.5 x 1.5 x 3 mm, centre crop/pad to {size}, image only), WholeVolumeSampler, batch "
          f"{args.batch_size}, {args.workers} workers; timed {args.whole_batches} x {args.batch_size} volumes "
          f"after {args.whole_warmup} warm-up batches")
    wroot = root / "whole"
    wdata = build_whole(wroot, args.whole_cases, args.whole_shape, args.whole_size, args.workers)
    t = wdata["timings"]
    stores = {"ct_merlin float32": store_bytes(wdata["store"], ("image",))}
    bg = float(np.mean([np.mean(np.load(c["image_npy"], mmap_mode="r") == 0.0) for c in wdata["cases"]]))
    print(f"data: synth {t['synth_s']:.1f} s, run_cohort {t['preprocess_s']:.1f} s; {len(wdata['cases'])} cases; "
          f"{100 * bg:.0f}% of the voxels are air at -1000 HU or padding (the stored 0.0)")
    if blosc:
        wdata["store_blosc2"] = wroot / "store_blosc2"
        t["convert_s"] = convert_copy(wdata["store"], wdata["store_blosc2"], args.patch, args.workers)
        stores["ct_merlin blosc2"] = store_bytes(wdata["store_blosc2"], ("image",))
        wdata["atol"] = {"store_blosc2": recorded_error(wdata["store_blosc2"])}
        print(f"convert_store to blosc2 compact: {t['convert_s']:.1f} s; largest recorded image error "
              f"{wdata['atol']['store_blosc2']:.3g}")
    print()
    _bytes_table([(k, v, stores["ct_merlin float32"]) for k, v in stores.items()])
    files = {k: [str(fs["image"]) for fs in store_files(Path(v["store"]), ("image",)).values()]
             for k, v in stores.items()}
    read_all([f for fs in files.values() for f in fs])

    makers = {"raw memmap": make_whole_raw, "volfm": make_whole_volfm,
              "volfm blosc2": functools.partial(make_whole_volfm, store_key="store_blosc2")}
    names = [n for n in COLD_LOADERS if n != "volfm blosc2" or blosc]
    rows = measure_group([(n, makers[n]) for n in names], wdata, args, batches=args.whole_batches,
                         warmup=args.whole_warmup)
    if args.cold:
        _cold_setup("ct_merlin stores", [f for fs in files.values() for f in fs], evicted, disk)
        rows += measure_group([(n, functools.partial(makers[n], cold=True)) for n in names], wdata, args,
                              cache="cold", batches=args.whole_batches, warmup=args.whole_warmup)

    decoded = 4 * int(np.prod(args.whole_size))  # one float32 channel
    stored = {"raw memmap": stores["ct_merlin float32"], "volfm": stores["ct_merlin float32"],
              "volfm blosc2": stores.get("ct_merlin blosc2")}
    cores = min(max(1, args.workers), os.cpu_count() or 1)
    H = args.host_cores
    for r in rows:
        vps = r["patches_per_s"]
        sb = stored[r["loader"]]["bytes_per_case"]
        r.update({"volumes_per_s": vps, "decoded_bytes_per_volume": decoded, "stored_bytes_per_volume": sb,
                  "decoded_bytes_per_s": vps * decoded, "stored_bytes_per_s": vps * sb, "cores": cores,
                  "per_core": {"volumes_per_s": vps / cores, "decoded_bytes_per_s": vps * decoded / cores,
                               "stored_bytes_per_s": vps * sb / cores},
                  "host": {"cores": H, "volumes_per_s": vps / cores * H, "disk_bytes_per_s_needed": vps * sb / cores * H}})
    print()
    head = (f"{'loader':<20} {'cache':<5} {'volumes/s':>10} {'decoded MiB/s':>14} {'stored MiB/s':>13} "
            f"{'disk MiB/vol':>13} | {'per core: vol/s':>15} {'decoded MiB/s':>14} {'stored MiB/s':>13} | "
            f"{f'{H} cores: vol/s':>16} {'disk MiB/s':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        dk = f"{r['disk_read_bytes'] / r['timed_patches'] / MiB:13.1f}" if r["disk_read_bytes"] is not None \
            else f"{'-':>13}"
        pc, h = r["per_core"], r["host"]
        print(f"{r['loader']:<20} {r['cache']:<5} {r['volumes_per_s']:10.1f} {r['decoded_bytes_per_s'] / MiB:14.0f} "
              f"{r['stored_bytes_per_s'] / MiB:13.0f} {dk} | {pc['volumes_per_s']:15.1f} "
              f"{pc['decoded_bytes_per_s'] / MiB:14.0f} {pc['stored_bytes_per_s'] / MiB:13.0f} | "
              f"{h['volumes_per_s']:16.0f} {h['disk_bytes_per_s_needed'] / MiB:11.0f}")
    rate_here = disk.get("bytes_per_s")
    who_reads = f"the {args.workers} worker processes" if args.workers else "the main process, no workers"
    assumptions = [
        f"per core = measured rate / {cores} ({who_reads}; this machine's {os.cpu_count()} cores also ran the main "
        "process's batch collation and whatever else ran on this shared VM)",
        f"{H}-core host = per core x {H}: throughput scales linearly with cores, and all {H} cores serve the loader "
        "(none shared with the trainer process, augmentation or the GPU driver threads)",
        f"disk MiB/s = the stored bytes the {H} cores read per second: the disk (or network store) must deliver "
        "that when the cohort does not fit in the page cache (cold rows)"
        + (f"; this VM's sequential cold read was {rate_here / MiB:.0f} MiB/s" if rate_here else ""),
    ]
    print(f"decoded = {decoded / MiB:.1f} MiB float32 per {size} volume; stored = the case's stored image file; "
          "disk MiB/vol = block-device reads during the timed chunks / timed volumes")
    print(f"extrapolation to a {H}-core GPU host, assuming:")
    for a in assumptions:
        print(f"  - {a}")
    for r in rows:
        print(f"  {r['loader']} ({r['cache']}): {r['note']}")
    return {"stores": stores, "rows": rows, "timings": t, "background_fraction": bg, "assumptions": assumptions,
            "cases": len(wdata["cases"]), "size": list(args.whole_size)}


if __name__ == "__main__":
    sys.exit(main())
