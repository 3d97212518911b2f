"""Pipeline: apply a validated spec to one case (a dict of input name -> file path or Volume).

The spec's reorientation, new spacing and crop/pad are planned as one target grid from the
reference image; every input is then resampled once, straight from its source grid to that
target grid (labels by nearest or one-hot-linear), and intensities are normalised last. Planning
first means an input is interpolated once, paired modalities on different grids land on the same
stored grid through world coordinates, and meta.json can map predictions back exactly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from volfm import VolfmError, __version__
from volfm.io import affine as geo
from volfm.io.atomic import file_sha256  # models.package and bench.preprocess import it from here too
from volfm.io.readers import read_volume
from volfm.io.volume import Volume
from volfm.preprocess import spatial
from volfm.preprocess.intensity import apply_intensity
from volfm.preprocess.resample import resample_to_grid
from volfm.preprocess.spec import load_spec, spec_hash, validate_spec

GRID_ATOL_MM = 1e-3


@dataclass
class ProcessedCase:
    arrays: dict[str, np.ndarray]  # name -> (C, I, J, K) on the stored grid
    affine: np.ndarray  # stored grid, RAS
    meta: dict = field(default_factory=dict)

    @property
    def shape(self):
        return tuple(next(iter(self.arrays.values())).shape[1:])


def grids_match(a: Volume, b: Volume, atol: float = GRID_ATOL_MM) -> tuple[bool, str]:
    if a.shape != b.shape:
        return False, f"shape {b.shape} vs {a.shape}"
    corners = np.array([[i, j, k] for i in (0, a.shape[0] - 1) for j in (0, a.shape[1] - 1)
                        for k in (0, a.shape[2] - 1)], float)
    d = float(np.abs(geo.voxel_to_world(a.affine, corners) - geo.voxel_to_world(b.affine, corners)).max())
    if d > atol:
        return False, f"voxel positions differ by up to {d:.3g} mm (same shape {a.shape})"
    return True, ""


class Pipeline:
    """Harmonise one case according to a spec (path, built-in name or already validated dict)."""

    def __init__(self, spec, source: str = "<spec>"):
        # validate_spec is idempotent, so an already resolved spec (e.g. from spec.yaml) passes through
        self.spec = load_spec(spec) if isinstance(spec, (str, Path)) else validate_spec(spec, source)
        self.hash = spec_hash(self.spec)

    # -- checks --------------------------------------------------------------------------------
    def _check(self, name: str, vol: Volume, case_id: str) -> Volume:
        spec = self.spec
        cfg = spec["inputs"][name]
        where = f"case {case_id}, {name} {vol.source}"
        if spec["channels"] == 1 and vol.num_channels != 1:
            raise VolfmError(f"{where}: 4D image with {vol.num_channels} channels/time points, but spec "
                             f"'{spec['name']}' wants 3D (channels: 1); split the series or set channels: any")
        # integer voxels cannot be NaN/inf: skip a full pass over them
        finite = np.isfinite(vol.array) if np.issubdtype(vol.array.dtype, np.floating) else None
        if finite is not None and not finite.all():
            bad = int((~finite).sum())
            if spec["nonfinite"] == "error":
                raise VolfmError(f"{where}: {bad} NaN/inf voxels; fix the export or set nonfinite: zero in the spec")
            vol = vol.replace(array=np.where(finite, vol.array, 0).astype(vol.array.dtype))
        if vol.is_sheared and spec["shear"] == "refuse":
            raise VolfmError(f"{where}: sheared voxel grid (shear {geo.shear_of(vol.affine):.3g}, e.g. CT gantry "
                             "tilt); set shear: resample in the spec to resample it in world space")
        if cfg["kind"] == "label":
            arr = vol.array
            if not np.issubdtype(arr.dtype, np.integer):
                if np.any(arr != np.round(arr)):
                    raise VolfmError(f"{where}: label map has non-integer values; a label must hold class ids")
                vol = vol.replace(array=arr.astype(np.int32))
            if vol.array.min() < 0:
                raise VolfmError(f"{where}: label map has negative values; class ids must be >= 0")
        return vol

    # -- grid ----------------------------------------------------------------------------------
    def plan_grid(self, ref: Volume, volumes: dict[str, Volume]) -> tuple[np.ndarray, tuple, dict]:
        spec = self.spec
        orientation = spec["orientation"]
        # spacing is per axis of the output (reoriented) grid; spacing: null keeps the reference's
        # spacing along each of those axes, not in the reference's own (possibly permuted) axis order
        ref_aff, ref_shape = spatial.reoriented_grid(ref.affine, ref.shape, orientation)
        spacing = spec["spacing"] if spec["spacing"] is not None else geo.spacing_from_affine(ref_aff).tolist()
        info: dict = {}
        if ref.is_sheared or (ref.is_oblique and spec["oblique"] == "resample"):
            # axis_aligned_grid takes spacing per world axis (x, y, z); output axis a runs along the
            # world axis named by orientation[a]
            world_sp = [0.0, 0.0, 0.0]
            for a, code in enumerate(orientation):
                world_sp["LRPAIS".index(code) // 2] = spacing[a]
            aff, shape = geo.axis_aligned_grid(ref.affine, ref.shape, world_sp)
            info["world_resampled"] = "sheared" if ref.is_sheared else "oblique"
            aff, shape = spatial.reoriented_grid(aff, shape, orientation)
        else:
            aff, shape = geo.grid_with_spacing(ref_aff, ref_shape, spacing)
        info["resampled_affine"] = aff.tolist()
        info["resampled_shape"] = list(shape)
        crop = spec["crop"]
        if crop is not None:
            start, size = None, crop["size"]
            if crop["mode"] == "foreground":
                fg_vol = volumes.get(crop["input"])
                if fg_vol is None:
                    raise VolfmError(f"{ref.source}: crop.input '{crop['input']}' is missing for this case")
                mask = fg_vol.array[0] > crop["threshold"]
                if size is None:
                    b = spatial.world_bbox_in(mask, fg_vol.affine, aff)
                    if b is None:
                        raise VolfmError(f"{fg_vol.source}: no voxel above crop.threshold {crop['threshold']}; "
                                         "cannot crop to the foreground")
                    lo = np.maximum(b[0] - crop["margin"], 0)
                    hi = np.minimum(b[1] + crop["margin"], np.asarray(shape) - 1)
                    start, size = lo, (hi - lo + 1).tolist()
                else:
                    c = spatial.world_bbox_center_in(mask, fg_vol.affine, aff)
                    start = spatial.center_crop_start(shape, size) if c is None else spatial.window_start_around(c, size)
            if start is None:
                start = spatial.center_crop_start(shape, size)
            info["crop_start"] = [int(s) for s in start]
            info["crop_size"] = [int(s) for s in size]
            aff, shape = spatial.crop_grid(aff, start, size), tuple(int(s) for s in size)
        return aff, tuple(int(s) for s in shape), info

    # -- run -----------------------------------------------------------------------------------
    def __call__(self, inputs: dict, case_id: str = "case", hash_sources: bool = True,
                 series: dict | None = None) -> ProcessedCase:
        """``inputs``: input name -> file path, DICOM folder or Volume. ``series``: input name -> the DICOM series
        to read from that input's folder (a SeriesInstanceUID or its ``volfm scan --hash-uids`` hash; the cohort
        table's ``<input>_series_uid`` column); empty or absent = the folder's only (or largest) series. A series
        for an input that is not a DICOM folder is an error naming the case. meta.json's ``source.<input>.series_id``
        is the series as given (a hash stays a hash), ``series_requested`` the cell itself ("" when empty), recorded
        for every DICOM input."""
        spec = self.spec
        t0 = time.perf_counter()
        series = {k: str(v).strip() for k, v in (series or {}).items() if v is not None and str(v).strip()}
        volumes: dict[str, Volume] = {}
        for name, cfg in spec["inputs"].items():
            src = inputs.get(name)
            if src is None or (isinstance(src, str) and not src.strip()):
                if cfg["required"]:
                    raise VolfmError(f"case {case_id}: required input '{name}' is empty in the cohort table")
                continue
            sid = series.get(name)
            if sid is not None and (isinstance(src, Volume) or not Path(src).is_dir()):
                what = "an image already read" if isinstance(src, Volume) else f"{src}, a file"
                raise VolfmError(f"case {case_id}: a DICOM series ({sid}) is named for input '{name}', but '{name}' "
                                 f"is {what}, not a DICOM series folder; clear the series cell "
                                 f"({name}_series_uid) or point '{name}' at the series folder")
            # native dtype and memory order: resampling converts to float only what it samples
            vol = src if isinstance(src, Volume) else read_volume(src, dtype=None, writable=False, series_id=sid)
            volumes[name] = self._check(name, vol, case_id)
        ref_name = spec["reference"]
        if ref_name not in volumes:
            raise VolfmError(f"case {case_id}: reference input '{ref_name}' is missing")
        ref = volumes[ref_name]
        for name, vol in volumes.items():
            if spec["inputs"][name]["kind"] == "label":
                ok, why = grids_match(ref, vol)
                if not ok:
                    raise VolfmError(f"case {case_id}: {name} {vol.source} is not on the grid of {ref_name} "
                                     f"{ref.source} ({why}); resample the label onto the image or fix the export")
        affine, shape, grid_info = self.plan_grid(ref, volumes)
        arrays, sources, intensity = {}, {}, {}
        for name, vol in volumes.items():
            cfg = spec["inputs"][name]
            if cfg["kind"] == "label":
                out = resample_to_grid(vol, affine, shape, order=cfg["interpolation"])
                n = int(out.array.max()) if out.array.size else 0
                arrays[name] = out.array.astype(np.uint8 if n < 256 else np.int16 if n < 32768 else np.int32)
            else:
                fill = float(vol.array.min()) if cfg["fill"] == "min" else float(cfg["fill"])
                out = resample_to_grid(vol, affine, shape, order=cfg["interpolation"], fill=fill,
                                       antialias=spec["antialias"])
                out, params = apply_intensity(out, cfg["intensity"])
                intensity[name] = params
                arrays[name] = out.array.astype(cfg["dtype"])
            sources[name] = {"path": vol.source, "affine": vol.affine.tolist(), "shape": list(vol.shape),
                             "spacing": vol.spacing.tolist(), "orientation": vol.orientation,
                             "dtype": str(vol.array.dtype), "affine_source": vol.meta.get("affine_source")}
            if Path(vol.source).is_file():  # size + mtime let a rerun notice a replaced file cheaply
                st = Path(vol.source).stat()
                sources[name].update(size=st.st_size, mtime_ns=st.st_mtime_ns)
            if hash_sources and Path(vol.source).exists():
                sources[name]["sha256"] = vol.meta.get("sha256") or file_sha256(vol.source)
            for k in ("suv_factor", "modality", "series_id"):
                if k in vol.meta:
                    sources[name][k] = vol.meta[k]
            if name in series or "series_id" in vol.meta:  # what the row asked for: a rerun compares the cell with it
                sources[name]["series_requested"] = series.get(name, "")
        meta = {"case_id": case_id, "spec_name": spec["name"], "spec_hash": self.hash, "volfm_version": __version__,
                "affine": affine.tolist(), "shape": list(shape),
                "spacing": geo.spacing_from_affine(affine).tolist(), "orientation": geo.axcodes(affine),
                "reference": ref_name, "source": sources, "grid": grid_info, "intensity": intensity,
                "elapsed_s": round(time.perf_counter() - t0, 3)}
        return ProcessedCase(arrays, affine, meta)


def to_source_grid(array: np.ndarray, meta: dict, input_name: str | None = None, order: str = "nearest",
                   fill: float = 0.0) -> Volume:
    """Map an array on the stored grid (C, I, J, K) back onto a source image's grid via meta.json.

    order: "nearest" for label predictions, "linear" for continuous outputs.
    """
    name = input_name or meta["reference"]
    src = meta["source"][name]
    vol = Volume(np.asarray(array), np.asarray(meta["affine"]), {"path": f"prediction for {meta['case_id']}"})
    return resample_to_grid(vol, np.asarray(src["affine"]), src["shape"], order=order, fill=fill)
