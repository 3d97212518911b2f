"""Resampling in physical space: one routine maps any source grid onto any target grid.

``resample_to_grid`` computes, for every target voxel centre, its continuous index in the source
(through both RAS affines) and interpolates there. When the source-to-target index map is a scaled
axis permutation (the usual case: reorientation, new spacing, crop/pad) interpolation is separable
and runs as three 1D passes of gathers and weighted sums in torch; an oblique or sheared mapping
falls back to ``grid_sample`` (linear/nearest) or scipy (B-spline) in memory-bounded slabs
(anti-aliasing there blurs the source first, along each source axis).

Boundary rule, as ITK's ResampleImageFilter: a point within half a voxel of the source's edge
voxels is interpolated with edge-clamped neighbours (B-spline: mirrored); a point further out
gets ``fill``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from volfm.io import affine as geo
from volfm.io.volume import Volume

ORDERS = ("nearest", "linear", "bspline", "onehot_linear")
_PERM_TOL = 1e-6


def _as_permutation(m: np.ndarray):
    """If the 3x3 block maps each target axis to exactly one source axis, return (perm, scale)."""
    a = np.abs(m)
    perm = np.argmax(a, axis=0)  # source axis feeding each target axis
    if len(set(perm.tolist())) != 3:
        return None
    off = a.copy()
    off[perm, np.arange(3)] = 0.0
    if off.max() > _PERM_TOL * max(1.0, a.max()):
        return None
    return perm, m[perm, np.arange(3)]


def _taps(coords: np.ndarray, n: int, order: str, sigma: float = 0.0):
    """Source indices (n_out, T), weights (n_out, T) and validity (n_out,) for 1D coordinates.

    sigma > 0 folds a Gaussian pre-filter (mirror boundary) into the taps: blurring the source and
    then interpolating equals one wider kernel evaluated only at the output points.
    """
    valid = (coords >= -0.5 - 1e-6) & (coords <= n - 0.5 + 1e-6)
    c = np.clip(coords, 0.0, n - 1.0) if order != "bspline" else coords
    if order == "nearest":
        idx = np.floor(c + 0.5).astype(np.int64)[:, None]
        w = np.ones_like(idx, dtype=np.float32)
    elif order == "linear":
        i0 = np.clip(np.floor(c).astype(np.int64), 0, max(n - 2, 0))
        t = (c - i0).astype(np.float32)
        idx = np.stack([i0, np.minimum(i0 + 1, n - 1)], axis=1)
        w = np.stack([1.0 - t, t], axis=1)
    elif order == "bspline":
        base = np.floor(c).astype(np.int64)
        idx = base[:, None] + np.arange(-1, 3)[None, :]
        t = (c[:, None] - idx).astype(np.float64)
        w = _cubic_bspline(t).astype(np.float32)
        idx = _mirror(idx, n)
    else:
        raise ValueError(f"unknown interpolation order {order!r}")
    if sigma > 0 and order != "nearest":
        off, g = _gaussian_kernel(sigma)
        idx = _mirror(idx[:, :, None] - off[None, None, :], n).reshape(len(coords), -1)
        w = (w[:, :, None] * g[None, None, :]).reshape(len(coords), -1).astype(np.float32)
    return idx, w, valid


def _gaussian_kernel(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and normalised weights of the anti-aliasing Gaussian, truncated at ceil(3 sigma)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    off = np.arange(-radius, radius + 1)
    g = np.exp(-0.5 * (off / sigma) ** 2)
    return off, g / g.sum()


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    a = np.abs(t)
    out = np.where(a < 1, 2.0 / 3.0 - a ** 2 + a ** 3 / 2.0, 0.0)
    return np.where((a >= 1) & (a < 2), (2.0 - a) ** 3 / 6.0, out)


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Whole-sample mirror (ITK/scipy 'mirror'): -1 -> 1, n -> n-2."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def _interp_axis(x: torch.Tensor, axis: int, idx: np.ndarray, w: np.ndarray) -> torch.Tensor:
    shape = [1] * x.ndim
    shape[axis] = idx.shape[0]
    out = None
    for t in range(idx.shape[1]):
        g = x.index_select(axis, torch.from_numpy(np.ascontiguousarray(idx[:, t])))
        if idx.shape[1] == 1:
            return g
        wt = torch.from_numpy(np.ascontiguousarray(w[:, t])).to(x.dtype).view(shape)
        out = g * wt if out is None else out.addcmul_(g, wt)
    return out


def antialias_sigmas(steps) -> list[float]:
    """Gaussian sigma (in source voxels) per axis before downsampling by ``steps`` (skimage's rule)."""
    return [max(0.0, (abs(s) - 1.0) / 2.0) for s in steps]


def _separable(src: torch.Tensor, perm, scale, offset, shape, order, antialias) -> tuple[torch.Tensor, torch.Tensor]:
    """src (C, I, J, K) -> (C, *shape) for a scaled-permutation index map. Returns (values, valid)."""
    x = src
    masks = [None, None, None]
    # Interpolate along source axes; target axis t reads source axis perm[t].
    for t in np.argsort([-abs(s) for s in scale]):  # largest step (most shrinking) first: less work later
        s_ax = int(perm[t])
        n_in = src.shape[1 + s_ax]
        coords = scale[t] * np.arange(shape[t], dtype=np.float64) + offset[s_ax]
        sigma = antialias_sigmas([scale[t]])[0] if antialias else 0.0
        idx, w, valid = _taps(coords, n_in, order, sigma)
        x = _interp_axis(x, 1 + s_ax, idx, w)
        masks[t] = valid
    # Source axis perm[t] now holds target axis t: reorder to target axis order.
    x = x.permute(0, *[1 + int(p) for p in perm])
    valid = torch.from_numpy(masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :])
    return x.contiguous(), valid


def _general(src: torch.Tensor, m: np.ndarray, shape, order, slab_voxels=8_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Any affine index map, in slabs along the first target axis to bound memory."""
    n_in = np.array(src.shape[1:], dtype=np.float64)
    out = torch.empty((src.shape[0], *shape), dtype=src.dtype)
    valid = torch.empty(tuple(shape), dtype=torch.bool)
    jj, kk = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    step = max(1, slab_voxels // max(1, shape[1] * shape[2]))
    coeffs = None
    if order == "bspline":
        from scipy import ndimage

        coeffs = [ndimage.spline_filter(c.numpy().astype(np.float64), order=3, mode="mirror") for c in src]
    for i0 in range(0, shape[0], step):
        ii = np.arange(i0, min(shape[0], i0 + step), dtype=np.float64)
        tgt = np.stack(np.broadcast_arrays(ii[:, None, None], jj[None], kk[None]), axis=-1)
        c = tgt @ m[:3, :3].T + m[:3, 3]  # (n, J, K, 3) source indices
        ok = np.all((c >= -0.5 - 1e-6) & (c <= n_in - 0.5 + 1e-6), axis=-1)
        valid[i0:i0 + len(ii)] = torch.from_numpy(ok)
        if coeffs is not None:
            from scipy import ndimage

            pts = c.reshape(-1, 3).T
            for ch, co in enumerate(coeffs):
                v = ndimage.map_coordinates(co, pts, order=3, mode="mirror", prefilter=False)
                out[ch, i0:i0 + len(ii)] = torch.from_numpy(v.reshape(c.shape[:3]).astype(np.float32))
            continue
        cc = np.clip(c, 0.0, n_in - 1.0)
        norm = np.where(n_in > 1, 2.0 * cc / np.maximum(n_in - 1.0, 1.0) - 1.0, 0.0)
        grid = torch.from_numpy(norm[..., ::-1].astype(np.float32).copy())[None]  # (1, n, J, K, 3) as (k, j, i)
        mode = "nearest" if order == "nearest" else "bilinear"
        res = F.grid_sample(src[None], grid.to(src.dtype), mode=mode, padding_mode="border", align_corners=True)
        out[:, i0:i0 + len(ii)] = res[0]
    return out, valid


def _blur_general(src: torch.Tensor, m: np.ndarray, order: str) -> torch.Tensor:
    """Anti-aliasing before a non-separable resample: a Gaussian along each source axis (mirror
    boundary), sigma from the source-voxel step per target voxel along that axis (the norm of the
    index map's row; for a scaled permutation this is the separable path's |scale|)."""
    if order == "nearest":
        return src
    sigmas = antialias_sigmas(np.sqrt((np.asarray(m[:3, :3], np.float64) ** 2).sum(axis=1)))
    if not any(s > 0 for s in sigmas):
        return src
    from scipy import ndimage

    x = src.numpy()
    for ax, sigma in enumerate(sigmas):
        if sigma > 0:
            _, g = _gaussian_kernel(sigma)
            x = ndimage.correlate1d(x, g, axis=1 + ax, mode="mirror")
    return torch.from_numpy(np.ascontiguousarray(x))


def _resample_array(src: torch.Tensor, m: np.ndarray, shape, order: str, antialias: bool):
    pm = _as_permutation(m[:3, :3])
    if pm is None:
        if antialias:
            src = _blur_general(src, m, order)
        return _general(src, m, shape, order)
    perm, scale = pm
    if order == "bspline":
        from scipy import ndimage

        src = torch.from_numpy(np.stack([ndimage.spline_filter(c.numpy().astype(np.float64), order=3, mode="mirror")
                                         for c in src]).astype(np.float32))
    return _separable(src, perm, scale, m[:3, 3], shape, order, antialias)


def index_map(source_affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """4x4 matrix taking target voxel indices to source voxel indices."""
    return np.linalg.inv(np.asarray(source_affine, np.float64)) @ np.asarray(target_affine, np.float64)


def resample_to_grid(volume: Volume, affine: np.ndarray, shape, *, order: str = "linear", fill: float = 0.0,
                     antialias: bool = False) -> Volume:
    """Resample ``volume`` onto the grid (affine, shape), matching values at the same world points.

    order: "linear" or "bspline" (cubic, ITK-compatible) for images, "nearest" or "onehot_linear"
    (each label's indicator interpolated linearly, argmax) for label maps.
    antialias: Gaussian pre-filter along axes that are downsampled (sigma = (step - 1) / 2 voxels).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    shape = tuple(int(s) for s in shape)
    m = index_map(volume.affine, affine)
    is_int = np.issubdtype(volume.array.dtype, np.integer) or volume.array.dtype == bool
    if order == "onehot_linear" or (order == "nearest" and is_int):
        out = _resample_labels(volume.array, m, shape, order)
    else:
        src = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))
        vals, valid = _resample_array(src, m, shape, order, antialias)
        vals.masked_fill_(~valid[None], float(fill))
        out = vals.numpy()
    meta = dict(volume.meta)
    return Volume(out, np.asarray(affine, np.float64), meta)


def _resample_labels(arr: np.ndarray, m, shape, order) -> np.ndarray:
    dtype = arr.dtype if (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool) else np.int32
    if order == "nearest":
        # float32 holds integers exactly only up to 2**24; larger class ids go through float64
        big = arr.size > 0 and np.issubdtype(arr.dtype, np.integer) and \
            max(abs(int(arr.max())), abs(int(arr.min()))) >= 2 ** 24
        src = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64 if big else np.float32))
        vals, valid = _resample_array(src, m, shape, "nearest", False)
        vals.masked_fill_(~valid[None], 0.0)
        return vals.numpy().round().astype(dtype)
    out = np.zeros((arr.shape[0], *shape), dtype=dtype)
    for ch in range(arr.shape[0]):
        best = torch.zeros(shape, dtype=torch.float32)  # largest interpolated share of any label
        total = torch.zeros(shape, dtype=torch.float32)  # sum of label shares; background has 1 - total
        lab = torch.zeros(shape, dtype=torch.int64)
        for value in np.unique(arr[ch]):
            if value == 0:
                continue
            ind = torch.from_numpy((arr[ch] == value).astype(np.float32))[None]
            p, valid = _resample_array(ind, m, shape, "linear", False)
            p = p[0].masked_fill_(~valid, 0.0)
            take = p > best
            best = torch.where(take, p, best)
            lab = torch.where(take, torch.tensor(int(value)), lab)
            total += p
        lab[(1.0 - total) >= best] = 0
        out[ch] = lab.numpy().astype(dtype)
    return out


# --- functional wrappers -------------------------------------------------------------------------

def resample_to_spacing(volume: Volume, spacing, *, order: str = "linear", fill: float = 0.0,
                        antialias: bool = False) -> Volume:
    """Resample to a new voxel spacing, keeping axis directions and the field-of-view centre."""
    affine, shape = geo.grid_with_spacing(volume.affine, volume.shape, spacing)
    return resample_to_grid(volume, affine, shape, order=order, fill=fill, antialias=antialias)


def resample_axis_aligned(volume: Volume, spacing, *, order: str = "linear", fill: float = 0.0) -> Volume:
    """Resample an oblique or sheared volume in world space onto an RAS-aligned grid at ``spacing``."""
    affine, shape = geo.axis_aligned_grid(volume.affine, volume.shape, spacing)
    return resample_to_grid(volume, affine, shape, order=order, fill=fill)
