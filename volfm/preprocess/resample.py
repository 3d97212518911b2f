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
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

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


_CHUNK_ELEMS = 1 << 20  # ~4 MB float32 per block: gathers and weighted sums stay in cache


def _interp_axis(x: torch.Tensor, axis: int, idx: np.ndarray, w: np.ndarray) -> torch.Tensor:
    """Weighted sum of gathers along one axis, in cache-sized blocks along dim 1 (the outermost
    spatial axis). Integer input is gathered first and converted per block, so the (large) source
    is never copied to float as a whole. Nearest (one tap) keeps the dtype exactly."""
    idx_t = [torch.from_numpy(np.ascontiguousarray(idx[:, t])) for t in range(idx.shape[1])]
    if len(idx_t) == 1:
        return x.index_select(axis, idx_t[0])
    w_t = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    shape = [1] * x.ndim
    out_shape = list(x.shape)
    out_shape[axis] = idx.shape[0]
    dtype = x.dtype if x.is_floating_point() else torch.float32
    w_t = w_t.to(dtype)
    out = torch.empty(out_shape, dtype=dtype)
    n1 = out_shape[1]
    step = max(1, _CHUNK_ELEMS // max(1, out.numel() // max(1, n1)))
    for a in range(0, n1, step):
        b = min(n1, a + step)
        if axis == 1:  # blocks of output planes along the interpolated axis itself
            src, sel = x, slice(a, b)
        else:  # blocks of the outer axis; the interpolated axis is inside each block
            src, sel = x.narrow(1, a, b - a), slice(None)
        o = out.narrow(1, a, b - a)
        for t, it in enumerate(idx_t):
            g = src.index_select(axis, it[sel])
            if g.dtype != dtype:
                g = g.to(dtype)
            wv = w_t[sel, t]
            shape[axis] = wv.numel()
            wv = wv.view(shape)
            if t == 0:
                torch.mul(g, wv, out=o)
            else:
                o.addcmul_(g, wv)
    return out


def antialias_sigmas(steps) -> list[float]:
    """Gaussian sigma (in source voxels) per axis before downsampling by ``steps`` (skimage's rule)."""
    return [max(0.0, (abs(s) - 1.0) / 2.0) for s in steps]


def _separable(src: torch.Tensor, perm, scale, offset, shape, order, antialias) -> tuple[torch.Tensor, torch.Tensor]:
    """src (C, I, J, K) -> (C, *shape) for a scaled-permutation index map. Returns (values, valid).

    Works on a view whose axes follow the source's memory order (NIfTI data is i-fastest) and
    interpolates the outermost axis first, so gathers copy whole contiguous planes and every
    intermediate stays contiguous; the result is permuted to the target axis order at the end.
    """
    mem = sorted(range(3), key=lambda a: -src.stride(1 + a))  # source axes, outermost first
    x = src.permute(0, *[1 + a for a in mem])
    masks = [None, None, None]
    target_of = {int(perm[t]): t for t in range(3)}  # source axis -> target axis it becomes
    for pos, s_ax in enumerate(mem):
        t = target_of[s_ax]
        coords = scale[t] * np.arange(shape[t], dtype=np.float64) + offset[s_ax]
        sigma = antialias_sigmas([scale[t]])[0] if antialias else 0.0
        idx, w, valid = _taps(coords, src.shape[1 + s_ax], order, sigma)
        x = _interp_axis(x, 1 + pos, idx, w)
        masks[t] = valid
    x = x.permute(0, *[1 + mem.index(int(perm[t])) for t in range(3)])
    valid = torch.from_numpy(masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :])
    return x.contiguous(), valid


def _general(src: torch.Tensor, m: np.ndarray, shape, order, slab_voxels=8_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Any affine index map, in slabs along the first target axis to bound memory.

    A source coordinate is affine in the target index, c = p[i, j] + d * k: one float64 broadcast add
    per component gives the grid (normalised, then float32 for grid_sample). Which points lie inside
    the source is decided per (i, j) row as a range of k by :func:`inside_interval`.
    """
    out = torch.empty((src.shape[0], *shape), dtype=src.dtype)
    valid = torch.empty(tuple(shape), dtype=torch.bool)
    step = max(1, slab_voxels // max(1, shape[1] * shape[2]))
    mt = torch.from_numpy(np.asarray(m, np.float64))
    jj = torch.arange(shape[1], dtype=torch.float64)
    kk = torch.arange(shape[2], dtype=torch.float64)
    tol = 1e-6
    coeffs = None
    if order == "bspline":
        coeffs = [ndimage.spline_filter(c.numpy().astype(np.float64), order=3, mode="mirror") for c in src]
    for i0 in range(0, shape[0], step):
        ii = torch.arange(i0, min(shape[0], i0 + step), dtype=torch.float64)
        comps, ok = [], None
        for ax in range(3):  # source index along axis ax for every target voxel of the slab
            partial = ii[:, None] * mt[ax, 0] + jj[None, :] * mt[ax, 1] + mt[ax, 3]  # float64 (i, j)
            d = float(mt[ax, 2])
            c = partial[:, :, None] + (kk * d)[None, None, :]
            inside = inside_interval(partial, d, shape[2], -0.5 - tol, src.shape[1 + ax] - 0.5 + tol)
            ok = inside if ok is None else ok.logical_and_(inside)
            comps.append(c)
        valid[i0:i0 + ii.shape[0]] = ok
        if coeffs is not None:
            pts = np.stack([c.numpy().astype(np.float64).ravel() for c in comps])
            for ch, co in enumerate(coeffs):
                v = ndimage.map_coordinates(co, pts, order=3, mode="mirror", prefilter=False)
                out[ch, i0:i0 + ii.shape[0]] = torch.from_numpy(v.reshape(ok.shape).astype(np.float32))
            continue
        # grid_sample wants (x, y, z) = (k, j, i) in [-1, 1] (align_corners=True); its "border" padding
        # clamps to the edge voxels, which is ITK's rule inside the half-voxel rim
        norm = []
        for ax in (2, 1, 0):
            n = src.shape[1 + ax]
            norm.append((comps[ax].mul_(2.0 / (n - 1)).sub_(1.0) if n > 1 else comps[ax].zero_()).to(src.dtype))
        grid = torch.stack(norm, dim=-1)[None]
        mode = "nearest" if order == "nearest" else "bilinear"
        res = F.grid_sample(src[None], grid, mode=mode, padding_mode="border", align_corners=True)
        out[:, i0:i0 + ii.shape[0]] = res[0]
    return out, valid


def inside_interval(partial: torch.Tensor, d: float, n_k: int, lo: float, hi: float) -> torch.Tensor:
    """Mask (I, J, K) of lo <= partial[i, j] + d * k <= hi, evaluated in float64 per (i, j) row as a
    range of k, so the full-size work is two integer comparisons."""
    k = torch.arange(n_k, dtype=torch.int64)
    if d == 0.0:
        row = (partial >= lo) & (partial <= hi)
        return row[:, :, None].expand(-1, -1, n_k).clone()
    if abs(d) * n_k < 1e-6:
        # nearly constant along k (an oblique map's "zero" coefficient comes out ~1e-18): the quotients below
        # would be ~1e19 and overflow int64, and a far-off bound cannot be settled by the +-2 steps; evaluate
        # directly (full size, but this case is rare)
        c = partial[:, :, None] + d * k.to(torch.float64)[None, None, :]
        return (c >= lo) & (c <= hi)
    a, b = ((lo - partial) / d).clamp(-1, n_k), ((hi - partial) / d).clamp(-1, n_k)
    kmin = torch.ceil(torch.minimum(a, b)).to(torch.int64)
    kmax = torch.floor(torch.maximum(a, b)).to(torch.int64)
    # the divisions may round across an integer: settle each bound with the float64 sum itself
    for bound, shift in ((kmin, -1), (kmax, 1)):
        for _ in range(2):
            inner = partial + d * bound.to(torch.float64)
            bad = (inner < lo) | (inner > hi)
            bound.sub_(shift * bad.to(torch.int64))  # move inwards where the bound is outside
            outer = partial + d * (bound + shift).to(torch.float64)
            good = (outer >= lo) & (outer <= hi)
            bound.add_(shift * good.to(torch.int64))  # move outwards where the next k is still inside
    return (k[None, None, :] >= kmin[:, :, None]) & (k[None, None, :] <= kmax[:, :, None])


def _blur_general(src: torch.Tensor, m: np.ndarray, order: str) -> torch.Tensor:
    """Anti-aliasing before a non-separable resample: a Gaussian along each source axis (mirror
    boundary), sigma from the source-voxel step per target voxel along that axis (the norm of the
    index map's row; for a scaled permutation this is the separable path's |scale|)."""
    if order == "nearest":
        return src
    sigmas = antialias_sigmas(np.sqrt((np.asarray(m[:3, :3], np.float64) ** 2).sum(axis=1)))
    if not any(s > 0 for s in sigmas):
        return src

    x = src.numpy()
    for ax, sigma in enumerate(sigmas):
        if sigma > 0:
            _, g = _gaussian_kernel(sigma)
            x = ndimage.correlate1d(x, g, axis=1 + ax, mode="mirror")
    return torch.from_numpy(np.ascontiguousarray(x))


_GATHER_DTYPES = (np.float32, np.float64, np.int8, np.uint8, np.int16, np.int32, np.int64)


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    """Zero-copy view of the source where torch can take it as is (any positive strides, native byte
    order, a dtype index_select supports); otherwise a float32 copy in the array's own memory order."""
    a = np.asarray(arr)
    if (a.dtype.type in _GATHER_DTYPES and a.dtype.isnative and all(st >= 0 for st in a.strides)):
        with warnings.catch_warnings():  # read-only sources (inflated files, memmaps) are only read here
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t if t.dtype != torch.float64 else t.float()


def _resample_array(src: torch.Tensor, m: np.ndarray, shape, order: str, antialias: bool):
    pm = _as_permutation(m[:3, :3])
    if pm is None or order == "bspline":
        # grid_sample/scipy need floats; integer class ids beyond 2**24 need float64 to stay exact
        exact = order == "nearest" and not src.is_floating_point()
        src = src.double() if exact else (src if src.dtype == torch.float32 else src.float())
    if pm is None:
        if antialias:
            src = _blur_general(src, m, order)
        return _general(src, m, shape, order)
    perm, scale = pm
    if order == "bspline":
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
        src = _as_tensor(volume.array)
        vals, valid = _resample_array(src, m, shape, order, antialias)
        vals = vals if vals.dtype == torch.float32 else vals.float()
        vals.masked_fill_(~valid[None], float(fill))
        out = vals.numpy()
    meta = dict(volume.meta)
    return Volume(out, np.asarray(affine, np.float64), meta)


def _resample_labels(arr: np.ndarray, m, shape, order) -> np.ndarray:
    dtype = arr.dtype if (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool) else np.int32
    if order == "nearest":
        # float32 holds integers exactly only up to 2**24; larger class ids go through float64
        # gathers copy class ids exactly in their own integer dtype (no float round trip)
        vals, valid = _resample_array(_as_tensor(arr), m, shape, "nearest", False)
        vals.masked_fill_(~valid[None], 0)
        vals = vals.numpy()
        return (vals.round() if vals.dtype.kind == "f" else vals).astype(dtype)
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
