"""Spatial operations on Volume: reorientation, crop/pad, foreground bounding boxes.

Reorientation, cropping and padding change only array indices and the affine (exact, no
interpolation). Grid planning (:func:`plan_grid`) composes them with a new spacing into the one
target grid the Pipeline resamples every input onto.
"""
from __future__ import annotations

import itertools

import numpy as np
from nibabel import orientations as nor

from volfm import VolfmError
from volfm.io import affine as geo
from volfm.io.volume import Volume


def _ornt_transform(affine: np.ndarray, orientation: str):
    if sorted(orientation.upper()) not in (sorted(c) for c in _valid_codes()):
        raise ValueError(f"orientation must be a 3-letter code such as RAS or LPS, got {orientation!r}")
    return nor.ornt_transform(nor.io_orientation(affine), nor.axcodes2ornt(tuple(orientation.upper())))


def _valid_codes():
    for a, b, c in itertools.product("LR", "PA", "IS"):
        yield a + b + c


def reoriented_grid(affine: np.ndarray, shape, orientation: str = "RAS") -> tuple[np.ndarray, tuple]:
    """Affine and shape after permuting/flipping array axes to the closest ``orientation``."""
    t = _ornt_transform(affine, orientation)
    new_affine = np.asarray(affine, np.float64) @ nor.inv_ornt_aff(t, tuple(shape[:3]))
    new_shape = [0, 0, 0]
    for src_ax, (dst_ax, _flip) in enumerate(t):
        new_shape[int(dst_ax)] = int(shape[src_ax])
    return new_affine, tuple(new_shape)


def reorient(volume: Volume, orientation: str = "RAS") -> Volume:
    """Permute/flip array axes so they run closest to ``orientation`` (exact; no interpolation)."""
    t = _ornt_transform(volume.affine, orientation)
    arr = nor.apply_orientation(np.moveaxis(volume.array, 0, -1), t)
    arr = np.ascontiguousarray(np.moveaxis(arr, -1, 0))
    new_affine, _ = reoriented_grid(volume.affine, volume.shape, orientation)
    return volume.replace(array=arr, affine=new_affine)


def crop_grid(affine: np.ndarray, start, size) -> np.ndarray:
    """Affine of the sub-grid whose voxel (0, 0, 0) is voxel ``start`` of the grid (start may be < 0)."""
    t = np.eye(4)
    t[:3, 3] = np.asarray(start, np.float64)
    return np.asarray(affine, np.float64) @ t


def center_crop_start(shape, size) -> np.ndarray:
    """Start index of a centred window of ``size`` (negative where the window pads)."""
    return (np.asarray(shape[:3]) - np.asarray(size)) // 2


def window_start_around(center, size) -> np.ndarray:
    """Start index of a window of ``size`` centred on a continuous index ``center``."""
    return np.round(np.asarray(center, np.float64) - (np.asarray(size, np.float64) - 1) / 2).astype(int)


def crop_or_pad(volume: Volume, size, start=None, fill: float = 0.0) -> tuple[Volume, np.ndarray]:
    """Crop and/or pad to ``size`` (centred unless ``start`` is given). Returns (volume, start)."""
    size = np.asarray(size, dtype=int)
    start = center_crop_start(volume.shape, size) if start is None else np.asarray(start, dtype=int)
    out = np.full((volume.num_channels, *size), fill, dtype=volume.array.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, volume.shape)
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        out[:, dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
            volume.array[:, src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    return volume.replace(array=out, affine=crop_grid(volume.affine, start, size)), start


def bbox(mask: np.ndarray):
    """(lo, hi) inclusive index bounds of the True voxels of a 3D mask, or None if empty."""
    if not mask.any():
        return None
    lo, hi = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]))
    return np.array(lo), np.array(hi)


def crop_foreground(volume: Volume, mask: np.ndarray, margin=0) -> tuple[Volume, np.ndarray]:
    """Crop to the bounding box of ``mask`` (I, J, K) plus ``margin`` voxels, clipped to the volume."""
    b = bbox(mask)
    if b is None:
        raise VolfmError(f"{volume.source}: foreground mask is empty; cannot crop to it")
    lo = np.maximum(b[0] - np.asarray(margin), 0)
    hi = np.minimum(b[1] + np.asarray(margin), np.asarray(volume.shape) - 1)
    return crop_or_pad(volume, hi - lo + 1, start=lo)


def world_bbox_center_in(mask: np.ndarray, mask_affine: np.ndarray, grid_affine: np.ndarray):
    """Centre of a mask's bounding box, as a continuous index of another grid (None if empty)."""
    b = bbox(mask)
    if b is None:
        return None
    centre_src = (b[0] + b[1]) / 2.0
    return geo.world_to_voxel(grid_affine, geo.voxel_to_world(mask_affine, centre_src))


def world_bbox_in(mask: np.ndarray, mask_affine: np.ndarray, grid_affine: np.ndarray):
    """Index bounds (lo, hi) in another grid enclosing a mask's bounding box (None if empty)."""
    b = bbox(mask)
    if b is None:
        return None
    corners = np.array([[x, y, z] for x in (b[0][0], b[1][0]) for y in (b[0][1], b[1][1])
                        for z in (b[0][2], b[1][2])], dtype=np.float64)
    idx = geo.world_to_voxel(grid_affine, geo.voxel_to_world(mask_affine, corners))
    return np.floor(idx.min(axis=0) + 1e-6).astype(int), np.ceil(idx.max(axis=0) - 1e-6).astype(int)
