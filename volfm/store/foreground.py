"""Per-class foreground voxel locations of a stored label (``cases/<id>/<label>_fg.npz``).

The cohort runner computes them once per case so that label-weighted patch sampling never scans a label while
training; the sampler checks them against the label file and recomputes them when they are stale.
"""
from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np

from volfm import VolfmError

__all__ = ["FG_MAX_PER_CLASS", "ForegroundError", "case_seed", "foreground_locations", "load_foreground_locations",
           "save_foreground_locations"]


class ForegroundError(VolfmError):
    pass


FG_MAX_PER_CLASS = 10_000


def case_seed(case_id) -> int:
    """Seed of a case's foreground subsample: the same in the cohort runner and in every loader worker."""
    return zlib.crc32(str(case_id).encode()) if case_id is not None else 0


def _label_stamp(label_path) -> np.ndarray:
    st = Path(label_path).stat()
    return np.array([st.st_size, st.st_mtime_ns], dtype=np.int64)


def save_foreground_locations(path, locs: dict[int, np.ndarray], label_shape, label_path) -> None:
    """Write {class: flat indices} as an .npz (keys 'c<class>'; no pickle) with a fingerprint of the
    label it was computed from (shape, max_per_class, the label file's size and mtime)."""
    meta = {"shape": np.asarray(label_shape, dtype=np.int64), "max_per_class": np.int64(FG_MAX_PER_CLASS),
            "label_stamp": _label_stamp(label_path)}
    with open(path, "wb") as f:
        np.savez(f, **meta, **{f"c{int(c)}": np.asarray(v, dtype=np.int64) for c, v in locs.items()})


def load_foreground_locations(path, label: np.ndarray, label_path) -> dict[int, np.ndarray] | None:
    """The stored locations if they still describe ``label`` (same shape, same label file, indices in
    range, a few spot checks), else None (with a warning) so the caller recomputes them."""
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            shape, cap, stamp = z["shape"], int(z["max_per_class"]), z["label_stamp"]
            locs = {int(k[1:]): z[k] for k in files if k.startswith("c")}
        ok = (tuple(shape) == tuple(label.shape[-3:]) and cap == FG_MAX_PER_CLASS
              and np.array_equal(stamp, _label_stamp(label_path)))
        grid = tuple(label.shape[-3:])
        n = int(np.prod(grid))
        single = label.ndim == 3 or label.shape[0] == 1
        lead = (0,) * (label.ndim - 3)
        for c, idx in locs.items():
            if not ok or not single:
                break
            ok = idx.size > 0 and int(idx.max()) < n and int(idx.min()) >= 0
            # spot checks voxel by voxel: a compressed label decodes only the blocks holding them
            ok = ok and all(int(np.asarray(label[(*lead, *np.unravel_index(int(i), grid))])) == c for i in idx[:8])
    except Exception as exc:  # noqa: BLE001 - a bad side file must never stop training; recompute instead
        warnings.warn(f"{path}: unreadable foreground locations ({type(exc).__name__}: {exc}); recomputing them "
                      "from the label", UserWarning, stacklevel=2)
        return None
    if not ok:
        warnings.warn(f"{path}: foreground locations do not match {Path(label_path).name} (changed since the "
                      "store was built); recomputing them from the label", UserWarning, stacklevel=2)
        return None
    return locs


def foreground_locations(label: np.ndarray, max_per_class: int = FG_MAX_PER_CLASS, seed: int = 0) -> dict[int, np.ndarray]:
    """{class value: flat voxel indices (sorted, int64)} of every foreground class (> 0) of a label
    ``(1, I, J, K)`` or ``(I, J, K)``; classes with more than ``max_per_class`` voxels keep a random
    subset of that many, drawn with ``seed`` (so the result depends only on the label and the seed).
    One pass over the label plus a sort of its foreground voxels' values."""
    lab = np.asarray(label)
    if lab.ndim == 4:
        if lab.shape[0] != 1:
            raise ForegroundError(f"label-weighted sampling needs a single-channel label map, got shape {lab.shape}")
        lab = lab[0]
    if lab.ndim != 3:
        raise ForegroundError(f"label must be (1, I, J, K) or (I, J, K), got shape {label.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        lab = lab.astype(np.int64)
    flat = lab.reshape(-1)
    nz = np.flatnonzero(flat)
    if nz.size == 0:
        return {}
    vals = flat[nz]
    order = np.argsort(vals, kind="stable")  # radix sort for small integer types
    vals_sorted = vals[order]
    first = np.concatenate([[0], np.flatnonzero(vals_sorted[1:] != vals_sorted[:-1]) + 1])
    counts = np.diff(np.concatenate([first, [vals_sorted.size]]))
    classes = vals_sorted[first]
    out = {}
    for cls, a, n in zip(classes.tolist(), first.tolist(), counts.tolist()):
        if cls <= 0:
            continue  # negative values (e.g. an 'ignore' label) are not foreground
        idx = nz[order[a:a + n]]
        if n > max_per_class:
            pick = np.random.default_rng([int(seed), int(cls) & 0xFFFFFFFF]).choice(n, max_per_class, replace=False)
            idx = idx[np.sort(pick)]
        out[int(cls)] = np.ascontiguousarray(idx, dtype=np.int64)
    return out
