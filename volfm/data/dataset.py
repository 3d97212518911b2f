"""A map-style dataset over a volfm store (layout in docs/ARCHITECTURE.md): one item per ok case of the chosen splits.

    ds = StoreDataset("stores/ct", split="train", arrays=("image",), label="label")
    case = ds[0]
    case["image"]      # np.memmap (C, I, J, K) float32, read lazily from cases/<id>/image.npy (a StoredArray,
                       # decoded to float32 on read, when the store is compressed: image.b2nd)
    case["label"]      # np.memmap (1, I, J, K) uint8 (or a StoredArray)
    case["icd_codes"]  # ["K76.0", "I10"]; case["report"] -> str; case["meta"] -> meta.json; case["row"] -> manifest row
    ds.pad_value("image")   # the store's background value (what lies outside the scanned field of view)

Training code cuts patches from these arrays with :mod:`volfm.data.samplers`; nothing reads NIfTI here.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Sequence

from torch.utils.data import Dataset

from volfm.store.arrays import array_file
from volfm.store.cohort import parse_icd_codes
from volfm.store.layout import CohortStore, StoreError

DEFAULT_COLUMNS = ("icd_codes", "report")


def _as_list(v) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    return [str(x) for x in v]


class StoreDataset(Dataset):
    """The ok cases of a store (optionally only those of some splits), read memory-mapped.

    store: a store folder or a :class:`CohortStore`. split: a split name, a list of them, or None for
    all. arrays: image-like arrays to read (cohort-table input columns, e.g. ("image",) or ("mri", "pet")).
    label: the label array's name, or None for no label. columns: manifest columns to carry (None:
    ``icd_codes`` and ``report``); ``icd_codes`` becomes a list of codes, every other column stays a
    string. A requested column the manifest lacks is an error, except ``icd_codes``/``report``,
    which then come out empty ([] / "") with a warning (e.g. a segmentation store built without them).
    mmap: memory-map arrays (default) or read them into memory.

    An item is a dict: ``case_id``; one ``(C, I, J, K)`` array per name in ``arrays`` and under the
    label's name; the columns; ``meta`` (meta.json); ``row`` (the manifest row); ``pad_values``
    ({array name: background value}, what samplers pad with).
    """

    def __init__(self, store, split: str | Sequence[str] | None = None, arrays: Sequence[str] = ("image",),
                 label: str | None = "label", columns: Sequence[str] | None = None, mmap: bool = True):
        self.store = store if isinstance(store, CohortStore) else CohortStore(store)
        self.root = self.store.root
        self.arrays = tuple(_as_list(arrays) or ())
        self.label = label or None
        self.mmap = bool(mmap)
        if not self.arrays and self.label is None:
            raise StoreError(f"{self.root}: StoreDataset needs at least one array (arrays=... or label=...)")
        names = list(self.arrays) + ([self.label] if self.label else [])
        dup = [n for n, c in Counter(names).items() if c > 1]
        if dup:
            raise StoreError(f"{self.root}: array name(s) {', '.join(dup)} given twice (arrays={list(self.arrays)}, "
                             f"label={self.label!r})")
        self.array_names = tuple(names)
        inputs = self._spec_inputs()
        if inputs:
            unknown = [n for n in names if n not in inputs]
            if unknown:
                raise StoreError(f"{self.root}: the store has no input(s) {', '.join(map(repr, unknown))} (its spec "
                                 f"'{self.spec.get('name')}' stores: {', '.join(inputs)}); pick arrays/label among "
                                 "those, or label=None for a store without labels")
            kinds = {n: inputs[n].get("kind") for n in names}
            if self.label and kinds[self.label] != "label":
                raise StoreError(f"{self.root}: '{self.label}' is an image input, not a label; pass it in arrays "
                                 "and choose label among the spec's label inputs (or label=None)")
        manifest_cols = list(self.store.rows[0].keys()) if self.store.rows else []
        self.columns = DEFAULT_COLUMNS if columns is None else tuple(_as_list(columns))
        if self.store.rows:
            absent = [c for c in self.columns if c not in manifest_cols]
            missing = [c for c in absent if c not in DEFAULT_COLUMNS]
            if missing:
                raise StoreError(f"{self.root}: manifest.csv has no column(s) {', '.join(missing)} (columns: "
                                 f"{', '.join(manifest_cols)}); add them to the cohort table and rerun volfm "
                                 "preprocess, or pass columns without them")
            if absent:
                warnings.warn(f"{self.root}: manifest.csv has no {' or '.join(absent)} column; items carry empty "
                              "values for it (pass columns=() to leave it out)", UserWarning, stacklevel=2)
        self.split = _as_list(split)
        rows = [r for r in self.store.rows if r.get("status") == "ok"]
        if self.split is not None:
            if self.store.rows and "split" not in manifest_cols:
                raise StoreError(f"{self.root}: split={self.split} asked for but manifest.csv has no 'split' column; "
                                 "add a split column to the cohort table and rerun volfm preprocess, or use split=None")
            rows = [r for r in rows if (r.get("split") or "").strip() in self.split]
        if not rows:
            raise StoreError(self._empty_message())
        self.rows = rows
        self._ids = [r["case_id"] for r in rows]
        self._meta: dict[str, dict] = {}
        self._pad = {n: self.pad_value(n) for n in names}

    # -- description ----------------------------------------------------------------------------------------
    @property
    def spec(self) -> dict:
        return (self.store.spec_doc or {}).get("spec") or {}

    def _spec_inputs(self) -> dict:
        return self.spec.get("inputs") or {}

    def _empty_message(self) -> str:
        all_rows = self.store.rows
        if not all_rows:
            return f"{self.root}: manifest.csv lists no cases; run volfm preprocess into this store first"
        ok = Counter((r.get("split") or "").strip() or "(none)" for r in all_rows if r.get("status") == "ok")
        failed = sum(1 for r in all_rows if r.get("status") != "ok")
        present = ", ".join(f"{s}: {n}" for s, n in sorted(ok.items())) or "none"
        want = "any split" if self.split is None else f"split(s) {', '.join(self.split)}"
        return (f"{self.root}: no case with status ok in {want} (ok cases per split: {present}; failed cases: "
                f"{failed}); choose one of the splits present, or fix the failed cases (volfm inspect "
                f"{self.root}) and rerun volfm preprocess")

    def select(self, indices) -> StoreDataset:
        """A view of this dataset restricted to the cases at ``indices`` (in that order)."""
        idx = [int(i) for i in indices]
        if not idx:
            raise StoreError(f"{self.root}: selecting no case leaves nothing to train on; keep at least one case")
        view = copy.copy(self)
        view.rows = [self.rows[i] for i in idx]
        view._ids = [self._ids[i] for i in idx]
        return view

    @property
    def case_ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return (f"StoreDataset({str(self.root)!r}, split={self.split}, arrays={list(self.arrays)}, "
                f"label={self.label!r}, cases={len(self)})")

    def pad_value(self, name: str) -> float:
        """The store's background value for array ``name``: what a voxel outside the scanned field of
        view holds after preprocessing. Derived from spec.yaml: labels 0; ct_window the windowed ``fill``
        (its out_min when fill is 'min' or at/below hu_min); mri_zscore its ``background`` (default
        0.0); pet 0.0; no intensity step the numeric ``fill`` (else 0.0)."""
        inputs = self._spec_inputs()
        if not inputs:
            raise StoreError(f"{self.root}: no readable spec.yaml, so the background value of '{name}' is unknown; "
                             "rerun volfm preprocess --overwrite to rewrite the store")
        if name not in inputs:
            raise StoreError(f"{self.root}: the store has no input '{name}' (stored: {', '.join(inputs)})")
        cfg = inputs[name]
        if cfg.get("kind") == "label":
            return 0
        fill = cfg.get("fill", "min")
        numeric_fill = isinstance(fill, (int, float)) and not isinstance(fill, bool)
        it = cfg.get("intensity") or {"type": "none"}
        kind = it.get("type", "none")
        if kind == "ct_window":
            lo, hi = float(it.get("hu_min", -1000.0)), float(it.get("hu_max", 1000.0))
            out_lo, out_hi = float(it.get("out_min", 0.0)), float(it.get("out_max", 1.0))
            if not numeric_fill:
                return out_lo
            frac = (min(max(float(fill), lo), hi) - lo) / (hi - lo)
            return out_lo + frac * (out_hi - out_lo)
        if kind == "mri_zscore":
            bg = it.get("background", 0.0)
            return 0.0 if bg is None else float(bg)
        if kind == "pet":
            return 0.0
        return float(fill) if numeric_fill else 0.0

    # -- items ----------------------------------------------------------------------------------------------
    def meta(self, case_id: str) -> dict:
        m = self._meta.get(case_id)
        if m is None:
            m = self._meta[case_id] = self.store.meta(case_id)
        return m

    def _record(self, case_id: str, name: str) -> dict | None:
        try:
            return (self.meta(case_id).get("storage") or {}).get(name)
        except StoreError:
            return None  # no readable meta.json: the array is read as a plain .npy (and __getitem__ reports it)

    def array(self, case_id: str, name: str):
        """One stored array (C, I, J, K) of a case (an ``np.memmap``, or a ``StoredArray`` that decodes on read for
        compressed or compact encodings); StoreError naming the case, the file and the fix."""
        case_dir = self.root / "cases" / case_id
        record = self._record(case_id, name) if case_dir.is_dir() else None
        path = case_dir / ((record or {}).get("file") or f"{name}.npy")
        if array_file(case_dir, name, record) is None:
            row = next((r for r in self.rows if r["case_id"] == case_id), {})
            if name in row and not (row.get(name) or "").strip():
                use = "label=None" if name == self.label else "other arrays"
                raise StoreError(f"{path}: case {case_id} has no '{name}' (its cell in the cohort table is empty, "
                                 f"so it was never stored); use {use}, pick a split whose cases all have one, or "
                                 "add the file to the table and rerun volfm preprocess")
            case_dir = self.root / "cases" / case_id
            if not case_dir.is_dir():
                raise StoreError(f"{case_dir}: case {case_id} is listed ok in manifest.csv but its folder is "
                                 "missing; rerun volfm preprocess on this store to rebuild it")
            raise StoreError(f"{path}: missing array '{name}' for case {case_id}; rerun volfm preprocess on this "
                             "store (cases with missing arrays are redone)")
        arr = self.store.array(case_id, name, mmap=self.mmap, meta={"storage": {name: record}} if record else {})
        if arr.ndim != 4:
            raise StoreError(f"{path}: case {case_id}: array '{name}' has shape {arr.shape}, expected (C, I, J, K); "
                             "rerun volfm preprocess --overwrite for this store")
        return arr

    def __getitem__(self, index: int) -> dict:
        n = len(self._ids)
        if not -n <= int(index) < n:
            raise IndexError(f"StoreDataset index {index} out of range for {n} cases")
        row = self.rows[int(index)]
        cid = row["case_id"]
        item: dict = {"case_id": cid}
        shape = None
        for name in self.array_names:
            arr = self.array(cid, name)
            if shape is None:
                shape, first = arr.shape[1:], name
            elif arr.shape[1:] != shape:
                raise StoreError(f"{self.root / 'cases' / cid}: case {cid}: '{name}' has grid {arr.shape[1:]} but "
                                 f"'{first}' has {shape}; the store is inconsistent, rerun volfm preprocess "
                                 "--overwrite")
            item[name] = arr
        for col in self.columns:
            v = row.get(col)
            item[col] = parse_icd_codes(v) if col == "icd_codes" else ("" if v is None else str(v))
        if self.label is not None:
            fg = self.root / "cases" / cid / f"{self.label}_fg.npz"
            if fg.is_file():  # foreground locations precomputed by the cohort runner, read when needed
                item[f"{self.label}_fg_path"] = str(fg)
        item["meta"] = self.meta(cid)
        item["row"] = dict(row)
        item["pad_values"] = dict(self._pad)
        return item

