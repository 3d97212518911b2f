"""`volfm bench preprocess`: volfm's CT pipeline against SimpleITK, MONAI and TorchIO.

One CT-like volume (default 512 x 512 x 300 at 0.7 x 0.7 x 1.0 mm, int16, stored LPS on disk) is
written as NIfTI and every pipeline reads that same file and produces an RAS image at the target
spacing with HU [-1000, 1000] -> [0, 1] (clipped), linear interpolation:

* volfm      -- :class:`volfm.preprocess.pipeline.Pipeline` with ``preprocessing/ct_merlin.yaml``
                minus the crop, reading included;
* SimpleITK  -- ReadImage, ResampleImageFilter (linear) onto volfm's target grid (same origin,
                spacing, direction via :func:`volfm.io.affine.sitk_geometry`), IntensityWindowing;
                this is the value reference;
* MONAI      -- LoadImaged (nibabel), EnsureChannelFirstd, Orientationd(RAS), Spacingd(bilinear),
                ScaleIntensityRanged(clip=True), all with MONAI's defaults otherwise;
* TorchIO    -- ScalarImage, ToCanonical, Resample(target), RescaleIntensity(in_min_max) + Clamp
                (RescaleIntensity does not clip when in_min_max is given).

Each is timed end to end (read included; the file is in the OS page cache for all of them), median
of ``--repeats`` runs after one warm-up. The max |diff| column is against SimpleITK: directly when a
peer's output grid is volfm's grid (or the same lattice shifted by whole voxels: compared on the
overlap), otherwise against SimpleITK resampled onto that peer's own grid (values are then checked,
grids are reported as different). A cohort-throughput part runs :func:`run_cohort` on smaller cases
with 1 and ``--workers`` worker processes.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import monai.transforms as mt
import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio
import yaml

from volfm.bench.common import floats_arg, ints_arg, parse_skip, quiet_import, scratch_dir, timed, write_results
from volfm.io.affine import (
    fov_center,
    sitk_geometry,
    spacing_from_affine,
    voxel_to_world,
)
from volfm.io.readers import read_volume
from volfm.preprocess.intensity import apply_intensity
from volfm.preprocess.pipeline import Pipeline, file_sha256
from volfm.preprocess.resample import resample_to_grid
from volfm.preprocess.spatial import reoriented_grid
from volfm.preprocess.spec import resolve_spec_path
from volfm.store.build import run_cohort

HU_MIN, HU_MAX = -1000.0, 1000.0
FILL_HU = -1000.0
MATCH_TOL = 1e-3


# --- data ------------------------------------------------------------------------------------------

def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def make_ct_array(shape=(512, 512, 300), spacing=(0.7, 0.7, 1.0), seed: int = 0) -> np.ndarray:
    """A smooth CT-like int16 volume (I, J, K) in HU: air outside a body ellipse (~40 HU), lungs,
    an off-centre liver-like blob and a bone column (700 HU), plus noise.

    The anatomy is left/right and front/back asymmetric so that an orientation mistake in any
    pipeline shows up as a large difference.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = (int(s) for s in shape)
    sp = np.asarray(spacing, np.float64)
    # millimetres from the centre of the field of view
    x = ((np.arange(nx) - (nx - 1) / 2) * sp[0]).astype(np.float32)[:, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * sp[1]).astype(np.float32)[None, :]
    half = np.array([nx * sp[0], ny * sp[1], nz * sp[2]], np.float32) / 2
    a, b = 0.80 * half[0], 0.62 * half[1]  # body semi-axes (mm)
    edge = max(1.0, 2.0 * float(sp[0]))  # mm over which the skin goes from air to tissue
    out = np.empty((nx, ny, nz), np.int16)
    zs = ((np.arange(nz) - (nz - 1) / 2) * sp[2]).astype(np.float32)
    for k0 in range(0, nz, 16):
        z = zs[k0:k0 + 16][None, None, :]
        s = 1.0 - 0.15 * (z / half[2]) ** 2  # body narrows towards both ends
        r = np.sqrt((x[..., None] / (a * s)) ** 2 + (y[..., None] / (b * s)) ** 2)
        body = _sigmoid((1.0 - r) * (a / edge))
        hu = -1000.0 + 1040.0 * body
        # lungs in the upper half: two ellipsoids at -850 HU
        for cx in (-0.45 * a, 0.40 * a):
            rl = np.sqrt(((x[..., None] - cx) / (0.30 * a)) ** 2 + ((y[..., None] + 0.05 * b) / (0.55 * b)) ** 2
                         + ((z - 0.45 * half[2]) / (0.40 * half[2])) ** 2)
            hu += (-890.0) * _sigmoid((1.0 - rl) * 12.0)
        # liver-like blob on one side, lower half: +25 HU over soft tissue
        rv = np.sqrt(((x[..., None] + 0.35 * a) / (0.35 * a)) ** 2 + ((y[..., None] - 0.1 * b) / (0.45 * b)) ** 2
                     + ((z + 0.15 * half[2]) / (0.30 * half[2])) ** 2)
        hu += 25.0 * _sigmoid((1.0 - rv) * 10.0)
        # bone column (spine) towards the back, full length: 700 HU
        rs = np.sqrt((x[..., None] / (0.1 * a)) ** 2 + ((y[..., None] + 0.70 * b) / (0.1 * a)) ** 2)
        hu = hu + (700.0 - hu) * _sigmoid((1.0 - rs) * 8.0)
        hu += rng.normal(0.0, 12.0, size=hu.shape).astype(np.float32)
        out[:, :, k0:k0 + 16] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return out


def lps_affine(shape, spacing, origin_shift=(12.5, -30.25, 80.0)) -> np.ndarray:
    """RAS affine of an LPS-on-disk grid: diag(-sx, -sy, sz) with the FOV centre at ``origin_shift``."""
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]).astype(np.float64)
    centre = (np.asarray(shape, np.float64) - 1) / 2
    aff[:3, 3] = np.asarray(origin_shift, np.float64) - aff[:3, :3] @ centre
    return aff


def write_ct(path, array: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return Path(path)


# --- pipelines -------------------------------------------------------------------------------------

def merlin_spec_nocrop() -> dict:
    """preprocessing/ct_merlin.yaml with crop: null (falls back to the built-in copy in volfm/configs/specs)."""
    path = resolve_spec_path("ct_merlin")
    raw = yaml.safe_load(path.read_text())
    raw["crop"] = None
    return raw


def run_volfm(path, pipe, hash_sources: bool = True):
    case = pipe({"image": str(path)}, case_id="bench", hash_sources=hash_sources)
    return case.arrays["image"][0], case.affine


def run_sitk(path, grid_affine, grid_shape):
    img = sitk.ReadImage(str(path))
    origin, spacing, direction = sitk_geometry(grid_affine)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in grid_shape])
    f.SetOutputOrigin(origin)
    f.SetOutputSpacing(spacing)
    f.SetOutputDirection(direction)
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(FILL_HU)
    f.SetOutputPixelType(sitk.sitkFloat32)
    out = f.Execute(img)
    out = sitk.IntensityWindowing(out, windowMinimum=HU_MIN, windowMaximum=HU_MAX, outputMinimum=0.0,
                                  outputMaximum=1.0)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0), grid_affine


def make_monai(target):
    logging.disable(logging.WARNING)  # LoadImaged logs that nvImageCodec is absent (irrelevant on CPU)
    try:
        return _monai_compose(mt, target)
    finally:
        logging.disable(logging.NOTSET)


def _monai_compose(mt, target):
    return mt.Compose([
        mt.LoadImaged(keys="image", reader="NibabelReader"),
        mt.EnsureChannelFirstd(keys="image"),
        mt.Orientationd(keys="image", axcodes="RAS"),
        mt.Spacingd(keys="image", pixdim=tuple(target), mode="bilinear"),
        mt.ScaleIntensityRanged(keys="image", a_min=HU_MIN, a_max=HU_MAX, b_min=0.0, b_max=1.0, clip=True),
    ])


def run_monai(path, tf):
    out = tf({"image": str(path)})["image"]
    aff = np.asarray(out.affine, np.float64)
    return np.asarray(out[0]), aff


def make_torchio(target):
    return tio.Compose([
        tio.ToCanonical(),
        tio.Resample(tuple(target), image_interpolation="linear"),
        tio.RescaleIntensity(out_min_max=(0.0, 1.0), in_min_max=(HU_MIN, HU_MAX)),
        tio.Clamp(out_min=0.0, out_max=1.0),
    ])


def run_torchio(path, tf):
    img = tf(tio.ScalarImage(str(path)))
    return img.data[0].numpy(), np.asarray(img.affine, np.float64)


# --- comparison ------------------------------------------------------------------------------------

def _integer_offset(ref_affine, affine, tol=1e-3):
    """Whole-voxel offset of ``affine``'s grid within ``ref_affine``'s lattice, or None."""
    if not np.allclose(ref_affine[:3, :3], affine[:3, :3], atol=1e-6):
        return None
    off = np.linalg.solve(ref_affine[:3, :3], affine[:3, 3] - ref_affine[:3, 3])
    if np.abs(off - np.round(off)).max() > tol:
        return None
    return np.round(off).astype(int)


def _inside_source(src_affine, src_shape, affine, shape):
    """Boolean (I, J, K) of target voxels within half a voxel of the source's edge voxel centres."""
    m = np.linalg.inv(src_affine) @ affine
    ok = None
    for t in range(3):  # axis-aligned grids: each target axis maps to one source axis
        s = int(np.argmax(np.abs(m[:3, t])))
        c = m[s, t] * np.arange(shape[t]) + m[s, 3]
        v = (c >= -0.5 - 1e-6) & (c <= src_shape[s] - 0.5 + 1e-6)
        sh = [1, 1, 1]
        sh[t] = shape[t]
        v = v.reshape(sh)
        ok = v if ok is None else ok & v
    return np.broadcast_to(ok, tuple(shape))


def compare_to_sitk(name, arr, affine, ref, ref_affine, path, src_affine, src_shape):
    """(max |diff|, how) of a pipeline's output against the SimpleITK result."""
    arr = np.asarray(arr, np.float32)
    off = _integer_offset(ref_affine, affine)
    if off is not None:
        lo_r = np.maximum(off, 0)
        hi_r = np.minimum(off + np.asarray(arr.shape), ref.shape)
        if np.any(hi_r <= lo_r):
            return float("nan"), "no overlap with the SimpleITK grid"
        lo_a, hi_a = lo_r - off, hi_r - off
        a = arr[lo_a[0]:hi_a[0], lo_a[1]:hi_a[1], lo_a[2]:hi_a[2]]
        r = ref[lo_r[0]:hi_r[0], lo_r[1]:hi_r[1], lo_r[2]:hi_r[2]]
        d = float(np.abs(a - r).max())
        if np.all(off == 0) and arr.shape == ref.shape:
            return d, "same grid"
        return d, f"same lattice, offset {tuple(int(o) for o in off)} voxels: compared on the overlap {a.shape}"
    # Different lattice: check the values by resampling the source with SimpleITK onto this grid.
    ref2, _ = run_sitk(path, affine, arr.shape)
    inside = _inside_source(src_affine, src_shape, affine, arr.shape)
    d = float(np.abs(arr - ref2)[inside].max()) if inside.any() else float("nan")
    return d, "grid differs: vs SimpleITK resampled onto this pipeline's own grid (inside the source FOV)"


def describe_grids(grids, src_affine, src_shape, orientation="RAS") -> list[str]:
    """Lines describing where each output grid sits relative to the (reoriented) source grid."""
    s_aff, s_shape = reoriented_grid(src_affine, src_shape, orientation)
    s_first = voxel_to_world(s_aff, np.zeros(3))
    s_corner = voxel_to_world(s_aff, np.full(3, -0.5))
    s_centre = fov_center(s_aff, s_shape)
    fmt = lambda v: "(" + ", ".join(f"{x:8.2f}" for x in v) + ")"  # noqa: E731
    lines = [f"{'grid (RAS mm)':<20} {'shape':<14} {'first voxel centre':<30} {'FOV centre':<30} keeps source's",
             f"{'source (as RAS)':<20} {'x'.join(map(str, s_shape)):<14} {fmt(s_first):<30} {fmt(s_centre):<30}"]
    for name, aff, shape in grids:
        aff = np.asarray(aff, np.float64)
        first = voxel_to_world(aff, np.zeros(3))
        corner = voxel_to_world(aff, np.full(3, -0.5))
        centre = fov_center(aff, shape)
        keeps = [what for what, a, b in (("FOV centre", centre, s_centre), ("first voxel centre", first, s_first),
                                        ("first voxel corner", corner, s_corner))
                 if np.abs(a - b).max() < 1e-3]
        sp = spacing_from_affine(aff)
        extent = np.asarray(shape) * sp
        s_extent = np.asarray(s_shape) * spacing_from_affine(s_aff)
        cover = "x".join(f"{e:.1f}" for e in extent)
        lines.append(f"{name:<20} {'x'.join(map(str, shape)):<14} {fmt(first):<30} {fmt(centre):<30} "
                     f"{', '.join(keeps) or 'none of these'}; extent {cover} mm "
                     f"(source {'x'.join(f'{e:.1f}' for e in s_extent)})")
    return lines


# --- timing ----------------------------------------------------------------------------------------

def volfm_breakdown(path, pipe, repeats: int) -> dict:
    """Median seconds of volfm's stages, run one after another as Pipeline does."""
    cfg = pipe.spec["inputs"]["image"]
    names = ("read_volume (inflate + hash in parallel, native dtype/order)", "checks", "plan grid",
             "resample (int16 source, separable)", "intensity window", "astype output dtype")
    stages: dict[str, list] = {k: [] for k in names}
    nib_only, sha_only = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        raw = np.asanyarray(nib.load(str(path)).dataobj)
        nib_only.append(time.perf_counter() - t)
        del raw
        t = time.perf_counter()
        file_sha256(path)
        sha_only.append(time.perf_counter() - t)
        t = time.perf_counter()
        vol = read_volume(path, dtype=None)
        t1 = time.perf_counter()
        vol = pipe._check("image", vol, "bench")
        t2 = time.perf_counter()
        affine, shape, _ = pipe.plan_grid(vol, {"image": vol})
        t3 = time.perf_counter()
        fill = float(vol.array.min()) if cfg["fill"] == "min" else float(cfg["fill"])
        out = resample_to_grid(vol, affine, shape, order=cfg["interpolation"], fill=fill,
                               antialias=pipe.spec["antialias"])
        t4 = time.perf_counter()
        out, _ = apply_intensity(out, cfg["intensity"])
        t5 = time.perf_counter()
        out.array.astype(cfg["dtype"])
        t6 = time.perf_counter()
        for k, v in zip(stages, (t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            stages[k].append(v)
        del vol, out
    out = {k: statistics.median(v) for k, v in stages.items()}
    # not part of the sum: the same work done the plain way, for comparison
    out["  vs nibabel's own read (Python zlib)"] = statistics.median(nib_only)
    out["  vs sha256 of the file on its own"] = statistics.median(sha_only)
    return out


# --- cohort ----------------------------------------------------------------------------------------

def cohort_throughput(root: Path, n_cases: int, shape, spacing, spec: dict, workers_list, fmt: str,
                      log=print) -> list[dict]:
    data = root / "cohort"
    data.mkdir(parents=True, exist_ok=True)
    rows = ["case_id,image"]
    for i in range(n_cases):
        arr = make_ct_array(shape, spacing, seed=100 + i)
        p = data / f"case{i:03d}.{fmt}"
        write_ct(p, arr, lps_affine(shape, spacing, origin_shift=(5.0 * i, -3.0 * i, 10.0 * i)))
        rows.append(f"case{i:03d},{p.name}")
    (data / "cohort.csv").write_text("\n".join(rows) + "\n")
    spec_path = root / "ct_merlin_nocrop.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    results = []
    for w in workers_list:
        store = root / f"store_w{w}"
        if store.exists():
            shutil.rmtree(store)
        t0 = time.perf_counter()
        summary = run_cohort(str(spec_path), store, cohort=str(data / "cohort.csv"), workers=w, progress=False,
                             qc=True, overwrite=True, log=lambda *a, **k: None)
        wall = time.perf_counter() - t0
        if summary["failed"]:
            raise RuntimeError(f"cohort run with {w} workers: {summary['failed']} case(s) failed: "
                               f"{summary['failures'][:3]}")
        cpm = summary["cases_per_min"] or 0.0
        results.append({"workers": w, "cases": summary["processed"], "elapsed_s": summary["elapsed_s"],
                        "wall_s": wall, "cases_per_min": cpm})
        log(f"  workers={w}: {summary['processed']} cases in {summary['elapsed_s']:.2f} s "
            f"-> {cpm:.1f} cases/min (run_cohort wall incl. setup {wall:.2f} s)")
    return results


# --- main ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="volfm bench preprocess",
                                description="volfm CT preprocessing vs SimpleITK, MONAI and TorchIO")
    p.add_argument("--size", type=ints_arg, default=[512, 512, 300], help="volume size (default 512,512,300)")
    p.add_argument("--spacing-in", type=floats_arg, default=[0.7, 0.7, 1.0], help="input spacing mm (0.7,0.7,1.0)")
    p.add_argument("--target", type=floats_arg, default=[1.5, 1.5, 3.0], help="target spacing mm (Merlin 1.5,1.5,3.0)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline; the median is reported")
    p.add_argument("--workers", type=int, default=2, help="worker processes for the cohort part")
    p.add_argument("--cohort-cases", type=int, default=24, help="cases for the cohort part (0 skips it)")
    p.add_argument("--cohort-size", type=ints_arg, default=[256, 256, 150], help="cohort volume size")
    p.add_argument("--format", choices=["nii.gz", "nii"], default="nii.gz")
    p.add_argument("--out", help="folder for the temporary files (default: a temp dir, removed afterwards)")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--skip", default="", help="comma-separated peers to skip: sitk,monai,torchio")
    p.add_argument("--no-breakdown", action="store_true", help="skip volfm's per-stage timing")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        print("volfm bench preprocess: --repeats must be >= 1", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")

    with scratch_dir(args.out, "volfm_bench_") as root:
        return _run(args, root, parse_skip(args.skip), torch, sitk, Pipeline)


def _run(args, root, skip, torch, sitk, Pipeline) -> int:
    size, sp_in, target = tuple(args.size), tuple(args.spacing_in), tuple(args.target)
    threads = {"torch": torch.get_num_threads(), "sitk": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
               "cpus": os.cpu_count()}
    print(f"volfm bench preprocess: {'x'.join(map(str, size))} int16 @ {'x'.join(f'{s:g}' for s in sp_in)} mm "
          f"(LPS on disk, .{args.format}) -> RAS @ {'x'.join(f'{s:g}' for s in target)} mm, linear, "
          f"HU [{HU_MIN:g}, {HU_MAX:g}] -> [0, 1]")
    quiet_import("monai.transforms", "torchio")
    print(f"threads: torch {threads['torch']} (volfm, MONAI, TorchIO), SimpleITK {threads['sitk']} "
          f"(SimpleITK, TorchIO's resampler), {threads['cpus']} CPUs; median of {args.repeats} after 1 warm-up; "
          "file in the OS page cache")

    t0 = time.perf_counter()
    arr = make_ct_array(size, sp_in, seed=0)
    src_affine = lps_affine(size, sp_in)
    path = write_ct(root / f"ct.{args.format}", arr, src_affine)
    del arr
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")

    spec = merlin_spec_nocrop()
    pipe = Pipeline(spec, source="ct_merlin.yaml (crop: null)")

    ref_vol = read_volume(path)
    grid_affine, grid_shape, _ = pipe.plan_grid(ref_vol, {"image": ref_vol})
    del ref_vol

    results = []

    def record(name, fn, note=""):
        med, times, (out, aff) = timed(fn, args.repeats)
        results.append({"pipeline": name, "seconds": med, "times": times, "shape": list(out.shape),
                        "affine": np.asarray(aff).tolist(), "note": note, "_out": out, "_aff": aff})
        print(f"  {name:<22} {med:7.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times)})")

    print("timing ...")
    record("volfm", lambda: run_volfm(path, pipe, True), "Pipeline as the cohort runner calls it (sha256 of the source included)")
    record("volfm (no sha256)", lambda: run_volfm(path, pipe, False), "Pipeline(hash_sources=False)")
    if "sitk" not in skip:
        record("SimpleITK", lambda: run_sitk(path, grid_affine, grid_shape), "reference for values")
    if "monai" not in skip:
        mtf = make_monai(target)
        record("MONAI", lambda: run_monai(path, mtf), "MONAI defaults (Spacingd dtype float64, padding border)")
    if "torchio" not in skip:
        ttf = make_torchio(target)
        record("TorchIO", lambda: run_torchio(path, ttf),
               "TorchIO keeps the int16 on-disk dtype and resamples (with SimpleITK) into int16, so its values are "
               "quantised to whole HU (up to 1 HU = 5e-4 after the window)")

    by = {r["pipeline"]: r for r in results}
    t_volfm = by["volfm"]["seconds"]
    ref = by["SimpleITK"]["_out"] if "SimpleITK" in by else None
    ref_aff = grid_affine
    for r in results:
        r["ratio"] = r["seconds"] / t_volfm
        if ref is None:
            r["max_abs_diff"], r["diff_method"] = float("nan"), "SimpleITK skipped"
        elif r["pipeline"] == "SimpleITK":
            r["max_abs_diff"], r["diff_method"] = 0.0, "reference"
        else:
            r["max_abs_diff"], r["diff_method"] = compare_to_sitk(r["pipeline"], r["_out"], r["_aff"], ref, ref_aff,
                                                                  path, src_affine, size)

    print()
    head = f"{'pipeline':<20} {'seconds':>8} {'ratio':>7}  {'output shape':<16} {'max |diff| vs SimpleITK':>24}"
    print(head)
    print("-" * len(head))
    for r in results:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['pipeline']:<20} {r['seconds']:8.3f} {r['ratio']:7.2f}  {shape:<16} {r['max_abs_diff']:24.3g}")
    print("ratio = pipeline seconds / volfm seconds (> 1: volfm is faster)")
    print("max |diff| method:")
    for r in results:
        if r["pipeline"] not in ("SimpleITK",):
            print(f"  {r['pipeline']}: {r['diff_method']}")
    print("grids:")
    grids = [("volfm = SimpleITK", grid_affine, list(grid_shape))]
    grids += [(r["pipeline"], r["_aff"], r["shape"]) for r in results if r["pipeline"] in ("MONAI", "TorchIO")]
    for line in describe_grids(grids, src_affine, size):
        print("  " + line)
    notes = [f"  {r['pipeline']}: {r['note']}" for r in results if r["note"]]
    if notes:
        print("notes:")
        print("\n".join(notes))

    breakdown = None
    if not args.no_breakdown:
        breakdown = volfm_breakdown(path, pipe, args.repeats)
        print("\nvolfm stages (median s):")
        for k, v in breakdown.items():
            print(f"  {k:<40} {v:7.3f}")
        print(f"  {'sum of stages':<40} {sum(v for k, v in breakdown.items() if not k.startswith(' ')):7.3f}")

    cohort = []
    if args.cohort_cases > 0:
        workers_list = [1] if args.workers <= 1 else [1, args.workers]
        print(f"\ncohort throughput: {args.cohort_cases} cases of {'x'.join(map(str, args.cohort_size))} @ "
              f"{'x'.join(f'{s:g}' for s in sp_in)} mm (.{args.format}), run_cohort(qc=True), spec as above")
        cohort = cohort_throughput(root, args.cohort_cases, tuple(args.cohort_size), sp_in, spec, workers_list,
                                   args.format)

    goals = {}
    print()
    parts = []
    if "MONAI" in by:
        x = by["MONAI"]["ratio"]
        goals["monai_3x"] = {"pass": bool(x >= 3.0), "value": x}
        parts.append(f">= 3x MONAI: {'PASS' if x >= 3.0 else 'FAIL'} ({x:.2f}x)")
    if "SimpleITK" in by:
        x = by["SimpleITK"]["ratio"]
        goals["no_slower_than_sitk"] = {"pass": bool(x >= 1.0), "value": x}
        parts.append(f"no slower than SimpleITK: {'PASS' if x >= 1.0 else 'FAIL'} ({x:.2f}x)")
        d = by["volfm"]["max_abs_diff"]
        goals["values_match_sitk"] = {"pass": bool(d < MATCH_TOL), "value": d}
        parts.append(f"values match SimpleITK (max |diff| < {MATCH_TOL:g}): {'PASS' if d < MATCH_TOL else 'FAIL'} "
                     f"({d:.2g})")
    print("goal: " + ", ".join(parts))

    if args.json:
        doc = {"config": {"size": list(size), "spacing_in": list(sp_in), "target": list(target),
                          "repeats": args.repeats, "format": args.format, "workers": args.workers,
                          "cohort_cases": args.cohort_cases, "cohort_size": list(args.cohort_size)},
               "threads": threads, "grid": {"affine": grid_affine.tolist(), "shape": list(grid_shape)},
               "pipelines": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
               "volfm_stages": breakdown, "cohort": cohort, "goals": goals}
        write_results(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
