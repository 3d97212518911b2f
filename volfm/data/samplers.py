"""Patch samplers over store cases, and the PatchDataset that feeds training.

A sampler turns a case (an item of :class:`volfm.data.dataset.StoreDataset`: memory-mapped
``(C, I, J, K)`` arrays plus metadata) into a patch: every array of the case (images, paired
modalities and the label) is cut from the SAME window of the stored grid, only that window is read
from disk, and whatever part of the window lies outside the volume is filled with the array's
background value (``case["pad_values"]``, from :meth:`StoreDataset.pad_value`). The result keeps the
case's keys, with the arrays replaced by the patches, plus ``patch_start``: the window's first voxel
as ``np.int64`` (3,) in stored-grid index (negative when the window starts before the volume).

The patch "centre" is the voxel ``patch_start + patch_size // 2`` (for even sizes the voxel just past
the middle), the voxel that label-weighted sampling puts on the chosen foreground voxel.

    UniformPatchSampler(96)                            # centre uniform over the volume's voxels
    LabelWeightedPatchSampler(96, foreground_fraction=1/3, classes=None)   # nnU-Net oversampling
    WholeVolumeSampler()                               # the stored volume (or a centre crop/pad to size)
    PatchDataset(StoreDataset(store, split="train"), sampler, samples_per_volume=4, seed=0)
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from volfm.store.arrays import StoredArray, array_file
from volfm.store.foreground import (
    FG_MAX_PER_CLASS,
    ForegroundError,
    case_seed,
    foreground_locations,
    load_foreground_locations,
)
from volfm.utils import parse_triple


class SamplerError(ForegroundError):
    pass


# ------------------------------------------------------------------------------------------------ patches
def extract_patch(array: np.ndarray, start, size, pad_value=0) -> np.ndarray:
    """The window ``[start, start + size)`` of a ``(C, I, J, K)`` array as a new ``(C, *size)`` array of
    the same dtype. Only the part of the window inside the volume is read (so a memmap reads just
    those pages and a :class:`volfm.store.arrays.StoredArray` decodes just those blocks); the rest,
    including all of it when the window misses the volume, is ``pad_value``.
    ``start`` may be negative or beyond the end."""
    if array.ndim != 4:
        raise SamplerError(f"extract_patch expects a (C, I, J, K) array, got shape {array.shape}")
    size = parse_triple(size, "size", integer=True, at_least=1, error=SamplerError)
    start = np.asarray(start, dtype=np.int64).reshape(-1)
    if start.shape != (3,):
        raise SamplerError(f"start must hold 3 voxel indices, got {start.tolist()}")
    shape = array.shape[1:]
    lo = [max(int(s), 0) for s in start]
    hi = [min(int(s) + n, d) for s, n, d in zip(start, size, shape)]
    if tuple(size) == tuple(shape) and not start.any():
        return np.array(array)  # the whole volume: one contiguous read
    out = np.empty((array.shape[0], *size), dtype=array.dtype)
    if any(h <= lw for lw, h in zip(lo, hi)):
        out.fill(pad_value)
        return out
    dst = tuple(slice(lw - int(s), h - int(s)) for lw, h, s in zip(lo, hi, start))
    inside = all(d.start == 0 and d.stop == n for d, n in zip(dst, size))
    if inside and isinstance(array, StoredArray):  # decoded into a new array already: no second copy
        return array[(slice(None), *(slice(lw, h) for lw, h in zip(lo, hi)))]
    if not inside:
        out.fill(pad_value)
    out[(slice(None), *dst)] = array[(slice(None), *(slice(lw, h) for lw, h in zip(lo, hi)))]
    return out


def _array_keys(case: dict) -> dict:
    """{name: pad value} of the arrays a case carries (``pad_values`` from StoreDataset; else every 4D
    ndarray, padded with 0)."""
    pads = case.get("pad_values")
    if pads is not None:
        missing = [k for k in pads if k not in case]
        if missing:
            raise SamplerError(f"case {case.get('case_id', '?')}: pad_values names array(s) {missing} that the "
                               "case does not hold")
        return dict(pads)
    return {k: 0 for k, v in case.items() if isinstance(v, (np.ndarray, StoredArray)) and v.ndim == 4}


def _grid_shape(case: dict, names) -> tuple[int, int, int]:
    if not names:
        raise SamplerError(f"case {case.get('case_id', '?')}: no (C, I, J, K) arrays to sample a patch from")
    shapes = {n: tuple(case[n].shape[1:]) for n in names}
    first = next(iter(shapes.values()))
    if any(s != first for s in shapes.values()):
        raise SamplerError(f"case {case.get('case_id', '?')}: arrays lie on different grids {shapes}; "
                           "all arrays of a case must share the stored grid")
    return first


def crop_case(case: dict, start, size) -> dict:
    """The case with every array cut to the same window (see :func:`extract_patch`) and ``patch_start``."""
    pads = _array_keys(case)
    out = dict(case)
    for name, pad in pads.items():
        out[name] = extract_patch(case[name], start, size, pad)
    out["patch_start"] = np.asarray(start, dtype=np.int64).reshape(3).copy()
    return out


class PatchSampler:
    """Base class: ``sample(case, rng) -> case`` with every array cut to one window."""

    patch_size: tuple[int, int, int] | None = None

    def sample(self, case: dict, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def __call__(self, case: dict, rng: np.random.Generator) -> dict:
        return self.sample(case, rng)


class UniformPatchSampler(PatchSampler):
    """Patches whose centre voxel (``start + size // 2``) is uniform over the volume's voxels; patches
    near the border cross it and are padded with the background value."""

    def __init__(self, patch_size):
        self.patch_size = parse_triple(patch_size, "patch_size", integer=True, at_least=1, error=SamplerError)

    def start_for(self, shape, rng: np.random.Generator) -> np.ndarray:
        centre = np.array([rng.integers(0, d) for d in shape], dtype=np.int64)
        return centre - np.array(self.patch_size, dtype=np.int64) // 2

    def sample(self, case: dict, rng: np.random.Generator) -> dict:
        shape = _grid_shape(case, list(_array_keys(case)))
        return crop_case(case, self.start_for(shape, rng), self.patch_size)

    def __repr__(self) -> str:
        return f"UniformPatchSampler(patch_size={self.patch_size})"


class LabelWeightedPatchSampler(UniformPatchSampler):
    """nnU-Net-style foreground oversampling: with probability ``foreground_fraction`` the patch is
    centred on a random voxel of a foreground class, else it is drawn as by :class:`UniformPatchSampler`.

    classes: the label values to oversample (None: every value > 0 present in the case); the class is
    chosen uniformly among the requested classes present in the case, or in proportion to
    ``class_weights`` (a list aligned with ``classes``, or a {class: weight} dict). A case with none of
    them present gets a uniform patch. label_key: the case's label array.

    Foreground locations are computed once per case (one pass over its label; at most
    ``max_per_class`` voxels kept per class, ~80 kB each) and cached by case id; ``cache_size`` bounds
    the number of cases kept (None: all). Each DataLoader worker holds its own cache; the subsets are
    drawn from the case id, so a patch never depends on which worker built it.
    """

    def __init__(self, patch_size, foreground_fraction: float = 1 / 3, classes: Sequence[int] | None = None,
                 class_weights: Sequence[float] | dict | None = None, label_key: str = "label",
                 max_per_class: int = 10_000, cache_size: int | None = None):
        super().__init__(patch_size)
        f = float(foreground_fraction)
        if not 0.0 <= f <= 1.0:
            raise SamplerError(f"foreground_fraction must be in [0, 1], got {foreground_fraction!r}")
        self.foreground_fraction = f
        self.classes = None if classes is None else [int(c) for c in classes]
        if self.classes is not None and (not self.classes or any(c <= 0 for c in self.classes)):
            raise SamplerError(f"classes must be foreground label values (> 0), got {classes!r}")
        self.class_weights = None
        if class_weights is not None:
            if isinstance(class_weights, dict):
                w = {int(k): float(v) for k, v in class_weights.items()}
                if self.classes is None:
                    self.classes = sorted(w)
                unknown = [c for c in w if c not in self.classes]
                if unknown:
                    raise SamplerError(f"class_weights names classes {unknown} that are not in classes {self.classes}")
                w = {c: w.get(c, 0.0) for c in self.classes}
            else:
                if self.classes is None or len(class_weights) != len(self.classes):
                    raise SamplerError("class_weights given as a list needs classes of the same length "
                                       f"(classes={self.classes}, class_weights={list(class_weights)})")
                w = {c: float(x) for c, x in zip(self.classes, class_weights)}
            if any(not np.isfinite(x) or x < 0 for x in w.values()) or sum(w.values()) <= 0:
                raise SamplerError(f"class_weights must be >= 0 with a positive sum, got {w}")
            self.class_weights = w
        self.label_key = label_key
        self.max_per_class = int(max_per_class)
        self.cache_size = None if cache_size is None else int(cache_size)
        self._cache: OrderedDict = OrderedDict()

    def locations(self, case: dict) -> dict[int, np.ndarray]:
        """{class: flat voxel indices} of the case's label (cached by case id and grid shape)."""
        if self.label_key not in case:
            raise SamplerError(f"case {case.get('case_id', '?')}: label-weighted sampling needs the label array "
                               f"'{self.label_key}' (StoreDataset(label='{self.label_key}')), the case has "
                               f"{sorted(k for k, v in case.items() if isinstance(v, (np.ndarray, StoredArray)))}")
        label = case[self.label_key]
        cid = case.get("case_id")
        key = (cid, tuple(label.shape))
        if cid is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        locs = None
        fg_path = case.get(f"{self.label_key}_fg_path")  # precomputed by the cohort runner: no label scan
        if fg_path is not None and self.max_per_class == FG_MAX_PER_CLASS:
            label_file = array_file(Path(fg_path).parent, self.label_key)  # <label>.npy or .b2nd
            if label_file is not None:
                locs = load_foreground_locations(fg_path, label, label_file)
        if locs is None:
            locs = foreground_locations(label, self.max_per_class, case_seed(cid))
        if cid is not None:
            self._cache[key] = locs
            if self.cache_size is not None:
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return locs

    def _choose_class(self, locs: dict, rng: np.random.Generator) -> int | None:
        present = [c for c in (self.classes if self.classes is not None else sorted(locs)) if c in locs]
        if self.class_weights is not None:
            present = [c for c in present if self.class_weights[c] > 0]
        if not present:
            return None
        if self.class_weights is None:
            return present[int(rng.integers(len(present)))]
        w = np.array([self.class_weights[c] for c in present], dtype=np.float64)
        return present[int(rng.choice(len(present), p=w / w.sum()))]

    def start_for_case(self, case: dict, shape, rng: np.random.Generator) -> np.ndarray:
        force = rng.random() < self.foreground_fraction
        if force:
            locs = self.locations(case)
            cls = self._choose_class(locs, rng)
            if cls is not None:
                idx = locs[cls]
                flat = int(idx[int(rng.integers(len(idx)))])
                centre = np.array(np.unravel_index(flat, shape), dtype=np.int64)
                return centre - np.array(self.patch_size, dtype=np.int64) // 2
        return self.start_for(shape, rng)

    def sample(self, case: dict, rng: np.random.Generator) -> dict:
        shape = _grid_shape(case, list(_array_keys(case)))
        return crop_case(case, self.start_for_case(case, shape, rng), self.patch_size)

    def __repr__(self) -> str:
        return (f"LabelWeightedPatchSampler(patch_size={self.patch_size}, foreground_fraction="
                f"{self.foreground_fraction:.3g}, classes={self.classes}, class_weights={self.class_weights})")


class WholeVolumeSampler(PatchSampler):
    """The whole stored volume (size=None; read into memory), or a centre crop/pad of it to ``size``
    (the window keeps the volume's centre; start = (shape - size) // 2, negative where padded)."""

    def __init__(self, size=None):
        self.patch_size = None if size is None else parse_triple(size, "size", integer=True, at_least=1, error=SamplerError)

    def sample(self, case: dict, rng: np.random.Generator | None = None) -> dict:
        shape = _grid_shape(case, list(_array_keys(case)))
        size = shape if self.patch_size is None else self.patch_size
        start = (np.array(shape, dtype=np.int64) - np.array(size, dtype=np.int64)) // 2
        return crop_case(case, start, size)

    def __repr__(self) -> str:
        return f"WholeVolumeSampler(size={self.patch_size})"


# ------------------------------------------------------------------------------------------------ dataset
_LABEL_DTYPES = {"uint8": torch.uint8, "int64": torch.int64, "long": torch.int64}


class PatchDataset(Dataset):
    """Map-style dataset of patches: item ``i`` is a patch of case ``i // samples_per_volume`` drawn by
    ``sampler`` with ``np.random.default_rng([seed, epoch, i])``, so an item depends only on
    (seed, epoch, i): not on the worker, the batch or the order items are read in. Call
    :meth:`set_epoch` every epoch (with persistent workers, before the epoch's iterator is made).

    An item (to_tensor=True) is a dict:
      - each image array of the dataset -> ``torch.float32`` tensor ``(C, *patch)``;
      - the label -> ``torch.uint8`` tensor ``(1, *patch)`` by default (4-8x less to move between
        processes than int64; call ``.long()`` on the device for losses that need class indices),
        or ``label_dtype="int64"``;
      - ``patch_start`` -> ``torch.int64`` tensor (3,) in stored-grid index (may be negative);
      - ``case_id`` (str), ``index`` (int) and the dataset's columns (``icd_codes`` -> list[str],
        ``report`` -> str, others str).
    With to_tensor=False the sampler's numpy dict is returned as is (with ``meta`` and ``row``).
    ``transform`` (optional) is applied last to the item dict (e.g. augmentation on the tensors).
    Batch variable-length fields with a collate that keeps lists (e.g. ``datamodules.collate_cases``).
    """

    def __init__(self, dataset, sampler: PatchSampler, samples_per_volume: int = 1, seed: int = 0,
                 to_tensor: bool = True, transform: Callable | None = None, label_dtype: str = "uint8"):
        if int(samples_per_volume) < 1:
            raise SamplerError(f"samples_per_volume must be >= 1, got {samples_per_volume!r}")
        if int(seed) < 0:
            raise SamplerError(f"seed must be >= 0, got {seed!r}")
        if label_dtype not in _LABEL_DTYPES:
            raise SamplerError(f"label_dtype must be one of {', '.join(_LABEL_DTYPES)}, got {label_dtype!r}")
        if isinstance(sampler, LabelWeightedPatchSampler) and getattr(dataset, "label", None) is None:
            raise SamplerError(f"{sampler!r} needs labels but the dataset has label=None; "
                               "use StoreDataset(..., label='label') or a UniformPatchSampler")
        self.dataset = dataset
        self.sampler = sampler
        self.samples_per_volume = int(samples_per_volume)
        self.seed = int(seed)
        self.epoch = 0
        self.to_tensor = bool(to_tensor)
        self.transform = transform
        self.label_dtype = _LABEL_DTYPES[label_dtype]

    @property
    def num_cases(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) < 0:
            raise SamplerError(f"epoch must be >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset) * self.samples_per_volume

    def rng_for(self, index: int, epoch: int | None = None) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch), int(index)])

    def __getitem__(self, index) -> dict:
        """``index`` or ``(epoch, index)``: a sampler that yields pairs carries the epoch to DataLoader
        workers, which keep their own copy of this dataset (persistent workers never see set_epoch)."""
        epoch = None
        if isinstance(index, tuple):
            epoch, index = index
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"PatchDataset index {index} out of range for {n} items")
        case = self.dataset[index // self.samples_per_volume]
        patch = self.sampler.sample(case, self.rng_for(index, epoch))
        if self.to_tensor:
            patch = self._tensors(patch, index)
            patch["epoch"] = self.epoch if epoch is None else int(epoch)
        if self.transform is not None:
            patch = self.transform(patch)
        return patch

    def _tensors(self, patch: dict, index: int) -> dict:
        ds = self.dataset
        label = getattr(ds, "label", None)
        images = getattr(ds, "arrays", None)
        if images is None:
            images = [k for k in _array_keys(patch) if k != label]
        out: dict = {"case_id": patch.get("case_id"), "index": index}
        for name in images:
            out[name] = torch.from_numpy(np.ascontiguousarray(patch[name], dtype=np.float32))
        if label is not None:
            out[label] = torch.from_numpy(np.ascontiguousarray(patch[label])).to(self.label_dtype)
        out["patch_start"] = torch.as_tensor(np.asarray(patch["patch_start"], dtype=np.int64))
        spacing = (patch.get("meta") or {}).get("spacing")
        if spacing is not None:  # lets augmentation work in millimetres (volfm.data.augment reads it)
            out["spacing"] = [float(v) for v in spacing]
        for col in getattr(ds, "columns", ()):
            out[col] = patch.get(col)
        return out
