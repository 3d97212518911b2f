"""The on-disk store of preprocessed cases (layout in docs/ARCHITECTURE.md).

    STORE/manifest.csv   one row per case: case_id, status, error, shape, spacing, table columns
    STORE/spec.yaml      resolved spec (with its storage block), its hash, the volfm version
    STORE/cohort.csv     the cohort table the store was built from (for shard merging)
    STORE/cases/<id>/    <input>.npy or <input>.b2nd arrays (C, I, J, K) + meta.json (``storage``: each array's
                         encoding, see volfm.store.arrays)
    STORE/qc/<id>.png    orthogonal slices with the label overlaid

A case folder is built under a temporary name and renamed into place, so a case folder that
exists is complete.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import yaml

from volfm.io.atomic import write_json_atomic
from volfm.store.arrays import (
    StoreError,
    install_case_dir,
    open_array,
    read_case_meta,
    remove_stale_temp,
    storage_record,
    write_array,
)
from volfm.store.cohort import read_table

# StoreError, read_case_meta and remove_stale_temp live in volfm.store.arrays (which converts case folders too)
__all__ = ["MANIFEST_FIRST", "CohortStore", "StoreError", "read_case_meta", "remove_stale_temp", "write_case_dir"]

MANIFEST_FIRST = ["case_id", "status", "error", "shape", "spacing", "elapsed_s", "warnings"]


def write_case_dir(cases_dir: Path, case_id: str, arrays: dict[str, np.ndarray], meta: dict,
                   extras: dict | None = None, storage: dict | None = None) -> Path:
    """Write arrays + meta.json to cases/<id> atomically (build in a temp folder, then rename).

    storage: the spec's storage block (None: npy as the pipeline made them); each array's record (encoding, sha256,
    measured error) goes to meta.json ``storage.<name>``; a CT window in ``meta["intensity"]`` lets ``compact``
    store integer levels. extras: {file name: writer(path)} for side files built with the case (e.g.
    label_fg.npz), written after the arrays."""
    cases_dir = Path(cases_dir)
    tmp = cases_dir / f".{case_id}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    intensity = meta.get("intensity") or {}
    records = {}
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        records[name] = write_array(tmp, name, arr, storage_record(storage, arr.dtype, intensity.get(name)))
    for fname, writer in (extras or {}).items():
        writer(tmp / fname)
    write_json_atomic(tmp / "meta.json", {**meta, "storage": records})
    return install_case_dir(cases_dir, case_id, tmp)


class CohortStore:
    """Read access to a store: manifest rows, spec, and memory-mapped case arrays."""

    def __init__(self, root):
        self.root = Path(root)
        if not (self.root / "manifest.csv").exists():
            hint = " (a sharded run: join shards with volfm preprocess --merge --out STORE)" \
                if (self.root / "manifests").is_dir() else ""
            raise StoreError(f"{self.root}: not a volfm store (no manifest.csv){hint}")

        self.rows = read_table(self.root / "manifest.csv")
        self.spec_doc = {}
        if (self.root / "spec.yaml").exists():
            try:
                self.spec_doc = yaml.safe_load((self.root / "spec.yaml").read_text()) or {}
            except yaml.YAMLError as exc:
                raise StoreError(f"{self.root / 'spec.yaml'}: unreadable store spec ({exc}); "
                                 "rerun volfm preprocess with --overwrite") from exc

    def spec_record(self) -> dict:
        """``{"store", "spec", "spec_hash"}``: where the store is and the resolved spec it was built with (``spec``
        None when spec.yaml holds none): what a model trained on it puts new images through."""
        return {"store": str(self.root.resolve()), "spec": self.spec_doc.get("spec"),
                "spec_hash": self.spec_doc.get("spec_hash")}

    @property
    def ok_ids(self) -> list[str]:
        return [r["case_id"] for r in self.rows if r.get("status") == "ok"]

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r.get("status") != "ok"]

    def meta(self, case_id: str) -> dict:
        m = read_case_meta(self.root / "cases" / case_id)
        if m is None:
            raise StoreError(f"{self.root}: case {case_id} has no readable meta.json; rerun volfm preprocess")
        return m

    def array(self, case_id: str, name: str = "image", mmap: bool = True, meta: dict | None = None):
        """Array ``name`` of a case, decoded as the pipeline made it: an ``np.memmap`` for ``.npy`` files written as
        is, a :class:`volfm.store.arrays.StoredArray` (decodes on read, partial reads of compressed chunks) for
        other encodings; ``mmap=False`` reads it whole. ``meta``: the case's meta.json when the caller has it."""
        case_dir = self.root / "cases" / case_id
        meta = meta if meta is not None else read_case_meta(case_dir)
        record = ((meta or {}).get("storage") or {}).get(name)
        return open_array(case_dir, name, record, case_id=case_id, mmap=mmap)
