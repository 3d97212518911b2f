"""The on-disk store of preprocessed cases (layout in docs/ARCHITECTURE.md).

    STORE/manifest.csv   one row per case: case_id, status, error, shape, spacing, table columns
    STORE/spec.yaml      resolved spec, its hash, the volfm version
    STORE/cohort.csv     the cohort table the store was built from (for shard merging)
    STORE/cases/<id>/    <input>.npy arrays (C, I, J, K) + meta.json
    STORE/qc/<id>.png    orthogonal slices with the label overlaid

A case folder is built under a temporary name and renamed into place, so a case folder that
exists is complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import yaml

from volfm import VolfmError
from volfm.io.atomic import save_npy_atomic, write_json_atomic
from volfm.store.cohort import read_table

MANIFEST_FIRST = ["case_id", "status", "error", "shape", "spacing", "elapsed_s", "warnings"]


class StoreError(VolfmError):
    pass


def write_case_dir(cases_dir: Path, case_id: str, arrays: dict[str, np.ndarray], meta: dict,
                   extras: dict | None = None) -> Path:
    """Write arrays + meta.json to cases/<id> atomically (build in a temp folder, then rename).

    extras: {file name: writer(path)} for side files built with the case (e.g. label_fg.npz)."""
    final = cases_dir / case_id
    tmp = cases_dir / f".{case_id}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, arr in arrays.items():
        save_npy_atomic(tmp / f"{name}.npy", arr)
    for fname, writer in (extras or {}).items():
        writer(tmp / fname)
    write_json_atomic(tmp / "meta.json", meta)
    if final.exists():
        old = cases_dir / f".{case_id}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


_LEFTOVER = re.compile(r"^\.(?P<case_id>.+)\.(tmp|old)-\d+(\.png)?$")


def remove_stale_temp(store_root, case_ids) -> list[Path]:
    """Remove what a killed run left of the given cases: cases/.<id>.tmp-<pid>/, cases/.<id>.old-<pid>/
    and qc/.<id>.tmp-<pid>.png. Call it only for cases this process is about to (re)write or skip,
    never for another shard's cases (a concurrent run may be writing those)."""
    wanted = set(case_ids)
    removed = []
    for d in (Path(store_root) / "cases", Path(store_root) / "qc"):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            m = _LEFTOVER.match(p.name)
            if m and m["case_id"] in wanted:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def read_case_meta(case_dir: Path) -> dict | None:
    p = Path(case_dir) / "meta.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, OSError):
        return None


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

    def array(self, case_id: str, name: str = "image", mmap: bool = True) -> np.ndarray:
        p = self.root / "cases" / case_id / f"{name}.npy"
        if not p.exists():
            raise StoreError(f"{p}: missing array '{name}' for case {case_id}; rerun volfm preprocess")
        try:
            return np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise StoreError(f"{p}: corrupt array for case {case_id} ({exc}); rerun volfm preprocess "
                             "with --overwrite for this store") from exc
