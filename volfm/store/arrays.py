"""The array files of a store case and their encodings: written, read back, checked and re-encoded.

A case's arrays are ``cases/<id>/<name>.npy`` (numpy, memory-mapped) or ``cases/<id>/<name>.b2nd`` (blosc2: LZ4HC
with byte shuffle, in chunks sized from the training patch, each chunk split into ~16 KiB blocks that are
decompressed on their own, so a patch read touches only its blocks). How each array is encoded is recorded in
``meta.json`` under ``storage.<name>``, written from the spec's ``storage`` block::

    storage: {codec: npy|blosc2, dtype: float32|compact, chunk_patch: [96, 96, 96], clevel: 5}

``dtype: compact`` stores a CT window (a ``ct_window`` intensity record stating ``hu_min``, ``hu_max`` (integers),
``out_min`` and ``out_max``; none is assumed) as its integer level ``0..width`` (int16; uint16 when the width
exceeds 32767) and decodes it with the same float32 operations as :func:`volfm.preprocess.intensity.ct_window`, so
integer HU come back bit-equal; an array whose levels would be off by more than half a level (it does not hold
that window's values) is stored raw, the record saying why. Other float images become float16. Every record
carries the measured ``max_abs_error`` of its encoding and the file's ``sha256``. Labels stay as the pipeline made
them (uint8), compressed when the codec is blosc2.

    open_array(case_dir, "image", meta["storage"]["image"])   # np.memmap (npy, not re-encoded) or StoredArray
    write_array(folder, "image", arr, storage_record(storage, arr.dtype, meta["intensity"]["image"]))
    convert_store(store, {"codec": "blosc2", "dtype": "compact"})   # re-encode a store, no resampling

A case without a ``storage`` record (stores written before encodings existed) holds float32/uint8 ``.npy`` files.
Readers decode on read, so every part of volfm sees the dtype the pipeline made, whatever the encoding.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import blosc2
import numpy as np
import yaml

from volfm import VolfmError
from volfm.io.atomic import atomic_path, file_sha256, write_json_atomic, write_text_atomic
from volfm.preprocess.spec import STORAGE_DEFAULTS, parse_storage_text, validate_storage, with_storage
from volfm.store.cohort import read_table, series_column, write_table
from volfm.store.foreground import FG_MAX_PER_CLASS, case_seed, foreground_locations, save_foreground_locations
from volfm.utils import is_number, progress_bar

__all__ = ["StoreError", "DamagedCaseError", "StoredArray", "array_file", "open_array", "write_array",
           "storage_record", "decode", "blosc2_layout", "case_records", "needs_conversion", "verify_case",
           "convert_case", "try_convert_case", "convert_store", "case_is_current", "install_case_dir",
           "read_case_meta", "remove_stale_temp", "storage_summary", "SUFFIXES", "BLOCK_BYTES"]


class StoreError(VolfmError):
    pass


class DamagedCaseError(StoreError):
    """A case's files are missing, truncated, corrupt or no longer what meta.json recorded: the case cannot be read
    (or re-encoded) until it is rebuilt from its source files. Other failures (a full disk, a bad storage block)
    leave a case whole."""


SUFFIXES = {"npy": ".npy", "blosc2": ".b2nd"}
BLOCK_BYTES = 16 * 1024  # blosc2 block: the unit decompressed on its own (a patch read decodes only those it touches)
CNAME, FILTER = "lz4hc", "shuffle"
# what makes two records the same encoding (a case whose records match the wanted storage needs no conversion)
_ENCODING_KEYS = ("codec", "encoding", "dtype", "width", "hu_min", "out_min", "out_max")


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _fix_hint(case_dir: Path) -> str:
    return (f"delete {case_dir} and rerun volfm preprocess on this store to rebuild the case from its source files "
            "(or rerun it with --overwrite)")


# ------------------------------------------------------------------------------------------------ planning
def storage_record(storage: dict | None, dtype, intensity: dict | None = None) -> dict:
    """The planned record of one array: how an array of ``dtype`` (the pipeline's: float32 images, uint8 labels) is
    written under ``storage`` (a spec's storage block, None: the defaults). ``intensity``: what the pipeline applied
    to the input (meta.json ``intensity.<name>``); a CT window there lets ``compact`` store integer levels.
    :func:`write_array` completes the record (file, shape, chunks, max_abs_error, sha256, ...)."""
    st = validate_storage(storage, "storage")
    dtype = np.dtype(dtype)
    rec: dict = {"codec": st["codec"], "encoding": "raw", "dtype": dtype.name, "stored_dtype": dtype.name}
    if st["dtype"] == "compact" and dtype.kind == "f" and dtype.itemsize > 2:
        window = _ct_window(intensity) if dtype == np.float32 else None
        if window is not None:
            lo, hi, out_min, out_max = window
            width = int(hi - lo)
            rec.update(encoding="ct_level", stored_dtype="int16" if width <= 32767 else "uint16", width=width,
                       hu_min=lo, out_min=out_min, out_max=out_max)
        else:
            rec.update(encoding="float16", stored_dtype="float16")
    if st["codec"] == "blosc2":
        rec.update(chunk_patch=list(st["chunk_patch"]), clevel=st["clevel"], cname=CNAME, filter=FILTER)
    return rec


def _ct_window(intensity: dict | None) -> tuple | None:
    """(hu_min, hu_max, out_min, out_max) of a ``ct_window`` intensity record that states its whole window (the
    pipeline's always does) with integer HU bounds at most 65535 apart; None otherwise (then ``compact`` means
    float16): integer levels are exact only for the window the values were made with, so none is assumed."""
    it = intensity or {}
    keys = ("hu_min", "hu_max", "out_min", "out_max")
    if it.get("type") != "ct_window" or not all(is_number(it.get(k)) for k in keys):
        return None
    lo, hi, out_min, out_max = (it[k] for k in keys)
    if not (float(lo).is_integer() and float(hi).is_integer() and 0 < hi - lo <= 65535 and out_max > out_min):
        return None
    return lo, hi, out_min, out_max


def ct_level_bound(rec: dict) -> float:
    """The largest |decoded - original| a ``ct_level`` record may have: half a level, ``0.5 * (out_max - out_min) /
    width``, plus float32 rounding (a few ulps of the output range: both the pipeline's window and the decoding
    round each of their float32 operations)."""
    out_min, out_max = float(rec["out_min"]), float(rec["out_max"])
    return 0.5 * (out_max - out_min) / rec["width"] + 4 * float(np.finfo(np.float32).eps) * max(
        abs(out_min), abs(out_max), out_max - out_min)


def blosc2_layout(shape, itemsize: int, chunk_patch=(96, 96, 96)) -> tuple[tuple, tuple]:
    """(chunks, blocks) of an array ``(C, I, J, K)`` (any number of leading axes, each chunked by 1).

    Blocks hold about :data:`BLOCK_BYTES` (16x16x32 at 2 bytes, 16x32x32 at 1, 16x16x16 at 4: the contiguous last
    axis longest); chunks are ``chunk_patch`` rounded up to a multiple of the block, clipped to the volume, so a
    patch of that size read at a random place touches at most 2 chunks per axis and decodes only its blocks."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise ValueError(f"blosc2_layout needs at least 3 (spatial) axes, got shape {shape}")
    target = max(1, BLOCK_BYTES // max(1, int(itemsize)))
    b = [16, 16, 16]
    while math.prod(b) * 2 <= target:  # double the shortest axis, the last one first
        i = min(range(3), key=lambda a: (b[a], -a))
        b[i] *= 2
    while math.prod(b) > target and max(b) > 1:  # wide items: halve the longest axis, the first one first
        i = max(range(3), key=lambda a: (b[a], -a))
        b[i] //= 2
    spatial, patch = shape[-3:], [int(p) for p in chunk_patch]
    chunks = [max(1, min(-(-p // bb) * bb, n)) for p, bb, n in zip(patch, b, spatial)]
    blocks = [max(1, min(bb, c)) for bb, c in zip(b, chunks)]
    lead = (1,) * (len(shape) - 3)
    return lead + tuple(chunks), lead + tuple(blocks)


# ------------------------------------------------------------------------------------------------ encoding
def _encode(arr: np.ndarray, rec: dict) -> tuple[np.ndarray, float, dict]:
    """(stored values, max |decoded - arr|, record changes)."""
    enc = rec["encoding"]
    if enc == "raw":
        return arr, 0.0, {}
    if enc == "ct_level":
        width, lo, hi = rec["width"], rec["out_min"], rec["out_max"]
        level = np.rint((arr.astype(np.float64) - lo) * (width / (hi - lo)))
        np.clip(level, 0, width, out=level)
        with np.errstate(invalid="ignore"):  # NaN levels: caught by the error check below
            stored = level.astype(rec["stored_dtype"])
        del level
        back = decode(stored, rec)
        err = float(np.max(np.abs(back.astype(np.float64) - arr))) if arr.size else 0.0
        bound = ct_level_bound(rec)
        if not err <= bound:  # also NaN
            # the values are not this window's levels (the record does not describe the array): keep them as they
            # are, so compact never changes a value by more than it promises
            return arr, 0.0, {"encoding": "raw", "stored_dtype": arr.dtype.name, "requested_encoding": "ct_level",
                              "note": f"integer levels would change values by up to {err:.3g}, more than half a "
                                      f"level ({bound:.3g}): the array does not hold this CT window's values; "
                                      "stored uncompacted"}
        return stored, err, {}
    elif enc == "float16":
        with np.errstate(over="ignore"):
            stored = arr.astype(np.float16)
        if not np.isfinite(stored).all() and np.isfinite(arr).all():
            # beyond float16's range (|x| > 65504): keep the pipeline's dtype, so compact never changes a value
            return arr, 0.0, {"encoding": "raw", "stored_dtype": arr.dtype.name, "requested_encoding": "float16",
                              "note": "values beyond the float16 range; stored uncompacted"}
    else:
        raise ValueError(f"unknown storage encoding {enc!r}")
    back = decode(stored, rec)
    err = float(np.max(np.abs(back.astype(np.float64) - arr))) if arr.size else 0.0
    return stored, err, {}


def decode(stored: np.ndarray, rec: dict) -> np.ndarray:
    """Stored values -> the array the pipeline made (its dtype, ``rec["dtype"]``); ``stored`` itself when it is
    already that (a raw encoding).

    ``ct_level``: the same float32 operations, in the same order, as ``ct_window`` (level / width, times the output
    span when it is not 1, plus out_min), so for integer HU the floats are those of an uncompacted store."""
    enc = rec.get("encoding", "raw")
    dtype = np.dtype(rec.get("dtype", stored.dtype))
    if enc == "ct_level":
        x = stored.astype(np.float32)
        x /= np.float32(rec["width"])
        span = rec["out_max"] - rec["out_min"]
        if span != 1.0:
            x *= np.float32(span)
        x += rec["out_min"]
        return x if x.dtype == dtype else x.astype(dtype)
    if enc in ("raw", "float16"):
        return stored.astype(dtype) if stored.dtype != dtype else stored
    raise StoreError(f"unknown storage encoding {enc!r} in meta.json; this store was written by a newer volfm")


def write_array(directory, name: str, arr: np.ndarray, record_or_storage: dict | None = None, *,
                nthreads: int = 1) -> dict:
    """Write ``arr`` as ``directory/<name>.npy`` or ``.b2nd`` (write-then-rename) and return its meta.json record.

    ``record_or_storage``: a planned record from :func:`storage_record`, or a storage block (None: the defaults;
    then no CT window is known and ``compact`` means float16 for float arrays). The record states the codec, the
    encoding and its parameters, the decoded and stored dtypes, the shape, blosc2's chunks/blocks/clevel, the
    measured ``max_abs_error``, the file's size (``nbytes``) and ``sha256``. A file of the same name with the other
    suffix is removed, so one encoding of an array is on disk at a time. ``nthreads``: blosc2 compression threads;
    with one (the default; cohort runs parallelise over cases) the file's bytes depend on the array alone, with
    more blosc2 may lay the chunks out in another order (same values, other bytes and sha256)."""
    arr = np.asarray(arr)
    rec = dict(record_or_storage or {})
    if "encoding" not in rec:
        rec = storage_record(rec or None, arr.dtype)
    if np.dtype(rec["dtype"]) != arr.dtype:
        raise ValueError(f"write_array({name!r}): the record is for {rec['dtype']}, the array is {arr.dtype}")
    stored, err, changes = _encode(arr, rec)
    rec.update(changes)
    path = Path(directory) / f"{name}{SUFFIXES[rec['codec']]}"
    with atomic_path(path) as tmp:
        if rec["codec"] == "npy":
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(stored), allow_pickle=False)
        else:
            chunks, blocks = blosc2_layout(stored.shape, stored.dtype.itemsize, rec["chunk_patch"])
            cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": int(rec["clevel"]), "filters": [blosc2.Filter.SHUFFLE],
                       "nthreads": max(1, int(nthreads))}
            nd = blosc2.asarray(np.ascontiguousarray(stored), urlpath=str(tmp), mode="w", chunks=chunks,
                                blocks=blocks, cparams=cparams)
            del nd
            rec.update(chunks=list(chunks), blocks=list(blocks))
        rec.update(file=path.name, shape=list(arr.shape), max_abs_error=err, nbytes=tmp.stat().st_size,
                   sha256=file_sha256(tmp))
    for other in SUFFIXES.values():
        if other != path.suffix:
            Path(directory, f"{name}{other}").unlink(missing_ok=True)
    return rec


# ------------------------------------------------------------------------------------------------ reading
def array_file(case_dir, name: str, record: dict | None = None) -> Path | None:
    """The file holding array ``name`` of a case: the one ``record`` names, else ``<name>.npy`` or ``<name>.b2nd``
    (whichever exists); None when there is none."""
    case_dir = Path(case_dir)
    if record and record.get("file"):
        p = case_dir / record["file"]
        return p if p.is_file() else None
    for suffix in SUFFIXES.values():
        p = case_dir / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def _basic_key(key, shape) -> tuple[list[slice], list]:
    """Basic indices (ints, slices, one Ellipsis) -> (step-1 slices to read, indices applied after the read)."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        fill = len(shape) - (len(key) - 1)
        key = key[:i] + (slice(None),) * fill + key[i + 1:]
    if len(key) > len(shape):
        raise IndexError(f"too many indices for a stored array of shape {shape}")
    key = key + (slice(None),) * (len(shape) - len(key))
    read, post = [], []
    for k, n in zip(key, shape):
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer, slice)):
            raise TypeError(f"a stored array takes basic indices (ints and slices), got {type(k).__name__}")
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            idx = range(start, stop, step)
            if len(idx) == 0:
                read.append(slice(0, 0))
                post.append(slice(None))
            elif step > 0:  # read [first, last] with step 1, then take every step-th voxel of it
                read.append(slice(idx[0], idx[-1] + 1))
                post.append(slice(None, None, step) if step > 1 else slice(None))
            else:  # a reversed slice: read [last, first], then walk it backwards
                read.append(slice(idx[-1], idx[0] + 1))
                post.append(slice(None, None, step))
        else:
            i = int(k) + (n if int(k) < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {int(k)} is out of bounds for an axis of size {n}")
            read.append(slice(i, i + 1))
            post.append(0)
    return read, post


class StoredArray:
    """A read-only stored array that decodes on read: ``shape``, ``ndim``, ``dtype`` (the decoded dtype, the
    pipeline's), ``nbytes_stored``; ``a[basic index]`` -> a decoded ndarray, reading only the blosc2 blocks the
    window touches; ``np.asarray(a)`` -> the whole decoded volume. One decompression thread per reader (DataLoader
    workers are the parallelism); a copy moved to another process (pickled, or forked) reopens the file there.

    blosc2 files are opened without memory mapping (``mmap_mode=None``): faster overall unless nearly every read hits
    the page cache. Measured here (blosc2 4.15, 2 CPU cores, ext4; a 224x224x160 compact CT, 6.9 MiB; 300 random 96^3
    patches per run, plain and mmap interleaved patch by patch, 3 repetitions, decoding included; median ms per
    patch, two runs): page cache warm, one open file 1.22/1.16 plain vs 0.93/0.88 mmap, opened per patch (as
    ``StoreDataset`` does, a new StoredArray per item) 1.47/1.46 vs 1.36/1.38; cold (the file evicted with
    POSIX_FADV_DONTNEED before each open) 6.0/5.8 plain vs 8.3/7.9 mmap. mmap saves 0.1-0.3 ms per patch warm and costs
    ~2 ms cold (through mmap the file is read by page faults, not by one read call per compressed block), so it
    wins only when fewer than ~5% (opened per patch) to ~12% (one open file) of patch reads miss the page cache;
    volfm's loader is meant for cohorts larger than RAM."""

    def __init__(self, path, record: dict, case_id: str | None = None):
        self.path = Path(path)
        self.record = dict(record)
        self.case_id = case_id if case_id is not None else self.path.parent.name
        self._src, self._pid = None, None
        src = self._source()
        self.stored_dtype = np.dtype(src.dtype)
        self.shape = tuple(int(s) for s in src.shape)
        if "stored_dtype" in self.record and np.dtype(self.record["stored_dtype"]) != self.stored_dtype:
            raise DamagedCaseError(f"{self.path}: case {self.case_id}: the file holds {self.stored_dtype}, meta.json "
                                   f"says {self.record['stored_dtype']}; {_fix_hint(self.path.parent)}")
        if "shape" in self.record and tuple(self.record["shape"]) != self.shape:
            raise DamagedCaseError(f"{self.path}: case {self.case_id}: the file holds shape {self.shape}, meta.json "
                                   f"says {tuple(self.record['shape'])}; {_fix_hint(self.path.parent)}")
        self.dtype = np.dtype(self.record.get("dtype", self.stored_dtype))

    # -- the file
    def _source(self):
        if self._src is None or self._pid != os.getpid():
            try:
                if self.path.suffix == SUFFIXES["blosc2"]:  # not memory-mapped: faster cold (see the class)
                    self._src = blosc2.open(str(self.path), mode="r", dparams={"nthreads": 1})
                else:
                    self._src = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except Exception as exc:  # noqa: BLE001 - blosc2 reports damage as RuntimeError, numpy as ValueError/OSError
                raise self._corrupt(exc) from exc
            self._pid = os.getpid()
        return self._src

    def _corrupt(self, exc: BaseException) -> DamagedCaseError:
        what = "compressed array" if self.path.suffix == SUFFIXES["blosc2"] else "array"
        return DamagedCaseError(f"{self.path}: case {self.case_id}: corrupt or truncated {what} ({_one_line(exc)}); "
                                f"{_fix_hint(self.path.parent)}")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_src"], state["_pid"] = None, None
        return state

    # -- ndarray-like
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def nbytes_stored(self) -> int:
        return self.path.stat().st_size

    @property
    def encoding(self) -> str:
        return self.record.get("encoding", "raw")

    def __len__(self) -> int:
        return self.shape[0]

    def read_stored(self, key=Ellipsis) -> np.ndarray:
        """The stored values (integer levels, float16, ...) of a basic index, not decoded."""
        read, post = _basic_key(key, self.shape)
        if any(s.stop <= s.start for s in read):
            return np.empty(tuple(s.stop - s.start for s in read), dtype=self.stored_dtype)[tuple(post)]
        src = self._source()
        try:
            raw = src[tuple(read)]
            # a memory-mapped .npy gives a view of the file: copy it when decoding would not
            raw = np.array(raw) if isinstance(raw, np.memmap) and self.encoding == "raw" else np.asarray(raw)
        except Exception as exc:  # noqa: BLE001 - any failure to decompress a block is damage to the file
            raise self._corrupt(exc) from exc
        if raw.shape != tuple(s.stop - s.start for s in read):
            raise self._corrupt(ValueError(f"read {raw.shape} for window {read}"))
        return raw[tuple(post)]

    def __getitem__(self, key) -> np.ndarray:
        return decode(self.read_stored(key), {**self.record, "dtype": self.dtype.name})

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:
            raise ValueError("a StoredArray is decoded on read, so np.asarray(..., copy=False) cannot avoid a copy")
        out = self[...]
        return out if dtype is None or np.dtype(dtype) == out.dtype else out.astype(dtype)

    def __repr__(self) -> str:
        return (f"StoredArray({self.path}, shape={self.shape}, dtype={self.dtype}, encoding={self.encoding}, "
                f"stored {self.stored_dtype}, {self.nbytes_stored} bytes)")


def open_array(case_dir, name: str, record: dict | None = None, *, case_id: str | None = None, mmap: bool = True):
    """Array ``name`` of a case: an ``np.memmap`` for an ``.npy`` file stored as the pipeline made it (every case
    written before encodings existed; ``record`` None), else a :class:`StoredArray` that decodes on read.
    ``mmap=False`` reads it whole into memory. StoreError naming the file and the case when it is missing or
    damaged."""
    case_dir = Path(case_dir)
    cid = case_id if case_id is not None else case_dir.name
    path = array_file(case_dir, name, record)
    if path is None:
        expected = case_dir / ((record or {}).get("file") or f"{name}.npy")
        raise DamagedCaseError(f"{expected}: missing array '{name}' for case {cid}; rerun volfm preprocess")
    rec = dict(record or {})
    rec.setdefault("codec", "blosc2" if path.suffix == SUFFIXES["blosc2"] else "npy")
    if path.suffix == SUFFIXES["npy"] and rec.get("encoding", "raw") == "raw":
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DamagedCaseError(f"{path}: corrupt array for case {cid} ({' '.join(str(exc).split())}); rerun "
                                   "volfm preprocess with --overwrite for this store") from exc
    arr = StoredArray(path, rec, case_id=cid)
    return arr if mmap else np.asarray(arr)


# ------------------------------------------------------------------------------------------------ case folders
def read_case_meta(case_dir: Path) -> dict | None:
    """A case folder's meta.json as a dict; None when it is missing, unreadable, not JSON or not a JSON object."""
    try:
        meta = json.loads(Path(case_dir, "meta.json").read_bytes())
    except (OSError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return None
    return meta if isinstance(meta, dict) else None


def install_case_dir(cases_dir: Path, case_id: str, tmp: Path) -> Path:
    """Rename a complete case folder ``tmp`` into ``cases/<id>``, replacing what is there (the old one is renamed
    away first and removed last, so a case folder that exists is always complete)."""
    final = Path(cases_dir) / case_id
    if final.exists():
        old = Path(cases_dir) / f".{case_id}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


_LEFTOVER = re.compile(r"^\.(?P<case_id>.+)\.(tmp|old)-\d+(\.png)?$")


def remove_stale_temp(store_root, case_ids) -> list[Path]:
    """Remove what a killed run left of the given cases: cases/.<id>.tmp-<pid>/, cases/.<id>.old-<pid>/
    and qc/.<id>.tmp-<pid>.png (an .old folder whose case folder is missing, the run having been killed between
    its two renames, is renamed back: it is a complete case). Call it only for cases this process is about to (re)write or skip,
    never for another shard's cases (a concurrent run may be writing those)."""
    wanted = set(case_ids)
    removed = []
    for d in (Path(store_root) / "cases", Path(store_root) / "qc"):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            m = _LEFTOVER.match(p.name)
            if m and m["case_id"] in wanted:
                if p.is_dir() and ".old-" in p.name and not (d / m["case_id"]).exists():
                    os.replace(p, d / m["case_id"])  # killed between the two renames: the old case is complete
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def case_records(case_dir, meta: dict) -> dict[str, dict]:
    """{array name: storage record} of a case; arrays without a record (stores written before encodings existed)
    get the record of what is on disk (codec npy, raw, their dtype)."""
    case_dir = Path(case_dir)
    stored = meta.get("storage") or {}
    out = {}
    for name in meta.get("source", {}):
        rec = stored.get(name)
        if rec is None:
            path = array_file(case_dir, name)
            codec = "blosc2" if path is not None and path.suffix == SUFFIXES["blosc2"] else "npy"
            rec = {"codec": codec, "encoding": "raw", "file": f"{name}{SUFFIXES[codec]}"}
            if path is not None:
                try:
                    arr = (np.load(path, mmap_mode="r", allow_pickle=False) if codec == "npy"
                           else StoredArray(path, rec, case_dir.name))
                    rec.update(dtype=arr.dtype.name, stored_dtype=arr.dtype.name, shape=list(arr.shape))
                except (ValueError, OSError, EOFError, StoreError):
                    pass  # reported as damaged when the array is read
        out[name] = rec
    return out


def _encoding_key(rec: dict) -> dict:
    key = {k: rec.get(k) for k in _ENCODING_KEYS}
    key["encoding"] = rec.get("requested_encoding", rec.get("encoding", "raw"))
    if rec.get("codec") == "blosc2":
        key.update(chunk_patch=list(rec.get("chunk_patch") or []), clevel=rec.get("clevel"))
    return key


def _plans(meta: dict, records: dict, storage: dict) -> dict[str, dict]:
    intensity = meta.get("intensity") or {}
    return {name: storage_record(storage, rec.get("dtype", "float32"), intensity.get(name))
            for name, rec in records.items()}


def needs_conversion(case_dir, meta: dict, storage: dict | None) -> bool:
    """Whether a complete case is stored in another encoding than ``storage`` asks for."""
    st = validate_storage(storage, "storage")
    if not meta.get("storage") and st["codec"] == "npy" and st["dtype"] == "float32":
        return False  # a case from before encodings existed: npy as the pipeline made it, what the defaults write
    records = case_records(case_dir, meta)
    plans = _plans(meta, records, st)
    return any(_encoding_key(records[n]) != _encoding_key(plans[n]) for n in records)


def verify_case(case_dir, meta: dict | None = None) -> list[str]:
    """Check every array file of a case against the sha256 meta.json recorded when it was written: [] when all
    match, else one line per problem (missing file, no recorded hash, mismatch)."""
    case_dir = Path(case_dir)
    meta = meta if meta is not None else read_case_meta(case_dir)
    if meta is None:
        return [f"{case_dir / 'meta.json'}: unreadable"]
    problems = []
    stored = meta.get("storage") or {}
    for name in meta.get("source", {}):
        rec = stored.get(name) or {}
        path = array_file(case_dir, name, rec or None)
        if path is None:
            problems.append(f"{case_dir / (rec.get('file') or name + '.npy')}: missing")
        elif not rec.get("sha256"):
            problems.append(f"{path}: no sha256 recorded (written before volfm recorded them); not checked")
        elif file_sha256(path) != rec["sha256"]:
            problems.append(f"{path}: sha256 mismatch: the file changed or was damaged after it was written; "
                            f"{_fix_hint(case_dir)}")
    return problems


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same size and mtime, so a foreground stamp of it stays valid
    except OSError:
        shutil.copy2(src, dst)


def _check_sha256(path: Path, rec: dict, case_id: str, case_dir: Path, what: str = "") -> None:
    if rec.get("sha256") and file_sha256(path) != rec["sha256"]:
        raise DamagedCaseError(f"{path}: case {case_id}: sha256 mismatch (the file changed or was damaged after it "
                               f"was written){what}; {_fix_hint(case_dir)}")


def convert_case(store_root, case_id: str, storage: dict | None, *, nthreads: int = 1, verify: bool = False) -> dict:
    """Re-encode one case of a store into ``storage`` without resampling: decode every array (its recorded sha256
    checked first), write it in the new encoding into a temporary folder with the case's other files, recompute the
    foreground locations of re-encoded labels (stamped with the new file), rewrite meta.json's ``storage`` and
    rename the folder into place, so the case is either all old or all new. A case already in that encoding is
    left alone (``verify``: its files are still checked against their sha256). Returns {case_id, status:
    converted|skipped, bytes_before, bytes_after}; :class:`DamagedCaseError` naming the case on a missing or damaged
    array or meta.json."""
    root = Path(store_root)
    cases = root / "cases"
    case_dir = cases / case_id
    st = validate_storage(storage, "storage")
    meta = read_case_meta(case_dir)
    if meta is None:
        raise DamagedCaseError(f"{case_dir}: case {case_id}: no readable meta.json (folder missing or damaged); "
                               "rerun volfm preprocess on this store to rebuild it")
    records = case_records(case_dir, meta)
    paths = {}
    for name, rec in records.items():
        paths[name] = array_file(case_dir, name, rec)
        if paths[name] is None:
            raise DamagedCaseError(f"{case_dir / rec.get('file', name + '.npy')}: missing array '{name}' for case "
                                   f"{case_id}; {_fix_hint(case_dir)}")
    before = sum(p.stat().st_size for p in paths.values())
    plans = _plans(meta, records, st)
    change = [n for n in records if _encoding_key(records[n]) != _encoding_key(plans[n])]
    if not change and meta.get("storage"):
        if verify:
            for name, rec in records.items():
                _check_sha256(paths[name], rec, case_id, case_dir)
        return {"case_id": case_id, "status": "skipped", "bytes_before": before, "bytes_after": before}
    tmp = cases / f".{case_id}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        new_records, relabelled = {}, {}
        for name, rec in records.items():
            path = paths[name]
            _check_sha256(path, rec, case_id, case_dir, ", not converted")
            if name not in change:
                _link_or_copy(path, tmp / path.name)
                new_records[name] = {**rec, "file": path.name}
                new_records[name].setdefault("sha256", rec.get("sha256") or file_sha256(path))
                new_records[name].setdefault("nbytes", path.stat().st_size)
                new_records[name].setdefault("max_abs_error", 0.0)
                continue
            data = np.asarray(open_array(case_dir, name, rec, case_id=case_id))
            new = write_array(tmp, name, data, plans[name], nthreads=nthreads)
            # errors add up: the old encoding's (vs the pipeline's floats) plus this one's (vs the decoded values)
            new["max_abs_error"] = float(new["max_abs_error"]) + float(rec.get("max_abs_error") or 0.0)
            new_records[name] = new
            relabelled[name] = data
        known = {p.name for p in paths.values()} | {"meta.json"}
        for p in case_dir.iterdir():
            if p.name in known or p.is_dir():
                continue
            label = p.name[: -len("_fg.npz")] if p.name.endswith("_fg.npz") else None
            if label in relabelled and relabelled[label].ndim == 4 and relabelled[label].shape[0] == 1:
                lab = relabelled[label]
                locs = foreground_locations(lab, FG_MAX_PER_CLASS, case_seed(case_id))
                save_foreground_locations(tmp / p.name, locs, lab.shape[1:], tmp / new_records[label]["file"])
            else:
                _link_or_copy(p, tmp / p.name)
        meta = dict(meta)
        meta["storage"] = new_records
        write_json_atomic(tmp / "meta.json", meta)
        install_case_dir(cases, case_id, tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    after = sum(int(r["nbytes"]) for r in new_records.values())
    return {"case_id": case_id, "status": "converted", "bytes_before": before, "bytes_after": after}


def _names_case(msg: str, case_id: str) -> str:
    msg = " ".join(str(msg).split())
    return msg if re.search(rf"\bcase {re.escape(case_id)}[:,;]", msg) else f"case {case_id}: {msg}"


def try_convert_case(store_root, case_id: str, storage: dict | None, *, verify: bool = False) -> dict:
    """:func:`convert_case` that never raises (one bad case never stops a cohort run): its result, or ``{case_id,
    status: "failed", damaged, error}`` with the reason on one line naming the case. ``damaged``: the case's files are
    missing or damaged (:class:`DamagedCaseError`), so it cannot be read until rebuilt; otherwise (a full disk, a bad
    storage block, a bug) the case is still whole in its old encoding, and the error says so. Always has
    ``elapsed_s``. The one wrapper both ``convert_store`` and ``volfm preprocess`` use."""
    t0 = time.perf_counter()
    kept = "; the case is left whole in its old encoding, rerun to retry"
    try:
        res = convert_case(store_root, case_id, storage, verify=verify)
    except DamagedCaseError as exc:
        res = {"case_id": case_id, "status": "failed", "damaged": True, "error": _names_case(exc, case_id)}
    except VolfmError as exc:
        res = {"case_id": case_id, "status": "failed", "damaged": False, "error": _names_case(exc, case_id) + kept}
    except Exception as exc:  # noqa: BLE001 - the reason goes to the manifest and the summary
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(last.filename).name}:{last.lineno}"
        res = {"case_id": case_id, "status": "failed", "damaged": False,
               "error": f"case {case_id}: unexpected {_one_line(exc)} while converting its encoding (at {where}); "
                        f"please report it{kept}"}
    res["elapsed_s"] = time.perf_counter() - t0
    return res


def case_is_current(meta: dict | None, row: dict, inputs, h: str | None, redo_before: float | None) -> bool:
    """Whether a case folder's meta.json still stands for a cohort-table row: made with the spec of hash ``h``,
    after the last ``--overwrite`` run began (``redo_before``), from the same set of ``inputs`` (the spec's input
    names; the row's non-empty cells count), from the same files (path, and size and mtime when the file is
    there) and from the same ``<input>_series_uid`` cell (compared, case-insensitively, with meta.json's
    ``source.<input>.series_requested``, so a cell set, changed, emptied or dropped redoes the case; meta.json
    without that key is compared with ``series_id`` where the cell is set). Whether its arrays are whole is not
    checked here."""
    if meta is None or h is None or meta.get("spec_hash") != h:
        return False
    if redo_before is not None and float(meta.get("written_at", 0.0)) < float(redo_before):
        return False
    given = {n: (row.get(n) or "").strip() for n in inputs}
    given = {n: v for n, v in given.items() if v}
    sources = meta.get("source", {})
    if set(given) != set(sources):
        return False
    for name, path in given.items():
        src = sources[name]
        if Path(src.get("path", "")) != Path(path):
            return False
        series = (row.get(series_column(name)) or "").strip().lower()
        if "series_requested" in src:  # what the row asked for when the case was made, "" for the folder's largest
            if series != str(src["series_requested"]).strip().lower():
                return False  # another series of the same DICOM folder (a folder has no size/mtime to compare)
        elif series and series != str(src.get("series_id", "")).lower():
            return False  # meta.json written before volfm recorded series_requested: compare with what was read
        p = Path(path)
        if p.is_file() and "size" in src:
            stat = p.stat()
            if stat.st_size != src["size"] or stat.st_mtime_ns != src.get("mtime_ns"):
                return False
    return True


def convert_store(root, storage, *, workers: int = 1, progress: bool = True) -> dict:
    """Re-encode a store into ``storage`` (a storage block or a ``--storage`` text such as
    ``"codec=blosc2,dtype=compact"``) without resampling, case by case (:func:`convert_case`): a killed run leaves
    every case whole and a rerun skips the cases already converted.

    Which cases: every ok case, and every failed one whose folder still has a readable meta.json that stands for its
    manifest row (this store's spec hash, the same source files: :func:`case_is_current`), so a case failed by an
    earlier conversion is retried (its files checked against their sha256 even when it needs no re-encoding) and
    set back to ok once it converts. A case whose files are missing or damaged is marked failed in manifest.csv with
    the reason; one that fails for another reason (a full disk, a dead worker) stays as it was; the run goes on.
    spec.yaml's ``storage`` is set to the new block (its hash does not change) only when every case converted: while
    any failed, it keeps the old one and the summary's ``note`` says so. Returns a summary: converted, skipped,
    failed, failures [(case, error)], marked_failed, retried, recovered, spec_updated, note, bytes before/after of
    the arrays, elapsed_s, storage."""
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        hint = (" (a sharded run: join shards with volfm preprocess --merge --out STORE first)"
                if (root / "manifests").is_dir() else "")
        raise StoreError(f"{root}: not a volfm store (no manifest.csv){hint}")
    spec_path = root / "spec.yaml"
    try:
        doc = yaml.safe_load(spec_path.read_text()) if spec_path.is_file() else {}
    except yaml.YAMLError as exc:
        raise StoreError(f"{spec_path}: unreadable store spec ({exc}); rerun volfm preprocess with --overwrite") from exc
    doc = doc or {}
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else None
    old_block = (spec or {}).get("storage") or doc.get("storage")
    where = f"{spec_path} with --storage"
    block = parse_storage_text(storage, where) if isinstance(storage, str) else validate_storage(storage, where)
    if spec is not None:
        spec = with_storage(spec, block, where)  # compact needs integer CT windows
        block = spec["storage"]
    rows = read_table(manifest)
    remove_stale_temp(root, [r["case_id"] for r in rows])  # before looking for failed cases' folders
    ok = [r["case_id"] for r in rows if r.get("status") == "ok"]
    h, redo_before = doc.get("spec_hash"), doc.get("redo_before")
    retry = []
    for r in rows:
        if r.get("status") != "ok":
            meta = read_case_meta(root / "cases" / r["case_id"])
            inputs = (spec or {}).get("inputs") or (meta or {}).get("source", {})
            if case_is_current(meta, r, inputs, h, redo_before):
                retry.append(r["case_id"])
    todo = ok + retry
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    bar = progress_bar(total=len(todo), desc=f"convert {root.name} to {block['codec']} {block['dtype']}", unit="case",
               disable=not progress)
    workers = max(1, int(workers))
    retried = set(retry)
    if workers == 1 or len(todo) <= 1:
        for cid in todo:
            results[cid] = try_convert_case(root, cid, block, verify=cid in retried)
            _tick(bar, results[cid])
    else:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(try_convert_case, str(root), cid, block, verify=cid in retried): cid for cid in todo}
            for f in as_completed(futs):
                cid = futs[f]
                try:
                    results[cid] = f.result()
                except Exception as exc:  # noqa: BLE001 - a dead worker fails its case, not the run
                    results[cid] = {"case_id": cid, "status": "failed", "damaged": False, "elapsed_s": 0.0,
                                    "error": f"case {cid}: worker process failed ({_one_line(exc)}); the case is left "
                                             "whole in its old encoding, rerun to retry"}
                _tick(bar, results[cid])
    bar.close()
    failed = [results[c] for c in todo if results[c]["status"] == "failed"]
    changed = 0
    for row in rows:
        res = results.get(row["case_id"])
        if res is None:
            continue
        if res["status"] == "failed" and (res.get("damaged") or row["case_id"] in retried):
            new = {"status": "failed", "error": res["error"]}
        elif res["status"] != "failed" and row["case_id"] in retried:
            new = {"status": "ok", "error": ""}
        else:
            continue
        changed += any(row.get(k) != v for k, v in new.items())
        row.update(new)
    if changed:
        write_table(manifest, rows, list(dict.fromkeys(k for r in rows for k in r)))
    note = ""
    if failed and doc:
        note = (f"spec.yaml keeps storage {storage_summary(old_block)} while {len(failed)} case(s) failed; fix them "
                f"and rerun the conversion to finish it")
    elif doc:
        if spec is not None:
            doc["spec"] = spec
        else:
            doc["storage"] = block
        write_text_atomic(spec_path, yaml.safe_dump(doc, sort_keys=False))
    done = [results[c] for c in todo if results[c]["status"] != "failed"]
    return {"store": str(root), "storage": block, "elapsed_s": time.perf_counter() - t0,
            "converted": sum(r["status"] == "converted" for r in done),
            "skipped": sum(r["status"] == "skipped" for r in done), "failed": len(failed),
            "failures": [(r["case_id"], r["error"]) for r in failed],
            "marked_failed": sum(bool(r.get("damaged")) and r["case_id"] not in retried for r in failed),
            "retried": len(retry), "recovered": sum(r["case_id"] in retried for r in done),
            "spec_updated": bool(doc) and not failed, "note": note,
            "bytes_before": sum(r["bytes_before"] for r in done), "bytes_after": sum(r["bytes_after"] for r in done)}


def _tick(bar, res: dict) -> None:
    bar.update(1)
    if res["status"] == "failed" and not bar.disable:  # quiet: the caller reports failures from the summary
        bar.write(f"  failed: {res['error']}")


def storage_summary(block: dict) -> str:
    """``"blosc2 compact (chunks for 96x96x96 patches, clevel 5)"``: a storage block in words."""
    st = {**STORAGE_DEFAULTS, **(block or {})}
    extra = (f" (chunks for {'x'.join(map(str, st['chunk_patch']))} patches, clevel {st['clevel']})"
             if st["codec"] == "blosc2" else "")
    return f"{st['codec']} {st['dtype']}{extra}"
