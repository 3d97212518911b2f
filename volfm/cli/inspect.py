"""`volfm inspect PATH`: geometry and intensity of an image file, a store, or one stored case (with how its arrays
are stored: codec, encoding, bytes; ``--verify`` checks every array file against the sha256 recorded when it was
written); ``--html`` writes a store's QC gallery (volfm.store.gallery)."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np

from volfm.io import affine as geo
from volfm.io.readers import describe_nifti_header, read_volume
from volfm.store.arrays import case_records, open_array, storage_summary, verify_case
from volfm.store.gallery import write_gallery
from volfm.store.layout import CohortStore, StoreError, read_case_meta


def _stats(arr: np.ndarray) -> str:
    a = np.asarray(arr)
    finite = np.isfinite(a)
    bad = int(a.size - finite.sum())
    v = a[finite] if bad else a.ravel()
    if v.size == 0:
        return "all voxels are NaN/inf"
    p = np.percentile(v[:: max(1, v.size // 2_000_000)], [0.5, 50, 99.5])
    s = (f"min {v.min():.4g}  p0.5 {p[0]:.4g}  median {p[1]:.4g}  p99.5 {p[2]:.4g}  max {v.max():.4g}  "
         f"mean {v.mean():.4g}  std {v.std():.4g}")
    if bad:
        s += f"  NaN/inf voxels: {bad}"
    if np.issubdtype(a.dtype, np.integer) and len(np.unique(v[: 5_000_000])) <= 32:
        vals, counts = np.unique(v, return_counts=True)
        s += "\n  values: " + ", ".join(f"{int(x)}:{int(c)}" for x, c in zip(vals, counts))
    return s


def describe_geometry(affine, shape) -> list[str]:
    sp = geo.spacing_from_affine(affine)
    lines = [f"shape       {tuple(int(s) for s in shape)}",
             f"spacing     {' x '.join(f'{s:.4g}' for s in sp)} mm",
             f"orientation {geo.axcodes(affine)}"
             f"{'  (oblique)' if geo.is_oblique(affine) else ''}"
             f"{f'  (SHEARED, shear {geo.shear_of(affine):.3g})' if geo.is_sheared(affine) else ''}",
             f"FOV centre  {np.array2string(geo.fov_center(affine, shape), precision=2)} mm (RAS)",
             "affine (voxel -> RAS mm)", geo.format_affine(affine)]
    return lines


def inspect_file(path: Path) -> str:
    vol = read_volume(path, dtype=None)
    lines = [f"{path}", f"format      {vol.meta.get('format')}  dtype {vol.array.dtype}  channels {vol.num_channels}"]
    lines += describe_geometry(vol.affine, vol.shape)
    if vol.meta.get("format", "").startswith("nifti"):
        h = describe_nifti_header(path)
        lines.append(f"header      sform_code {h['sform_code']}  qform_code {h['qform_code']}  qfac {h['qfac']}  "
                     f"scl_slope {h['scl_slope']}  scl_inter {h['scl_inter']}  on-disk {h['datatype']} "
                     f"({'big' if h['byteorder'] == '>' else 'little'}-endian); affine from {vol.meta['affine_source']}")
    for k in ("series_id", "modality", "suv_factor", "suv_missing"):
        if k in vol.meta:
            lines.append(f"{k:<11} {vol.meta[k]}")
    for c in range(vol.num_channels):
        lines.append(f"intensity[{c}] {_stats(vol.array[c])}")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB"


def describe_storage(arr, record: dict | None, path: Path | None = None) -> str:
    """``"stored as blosc2 ct_level int16 in 1x96x96x96 chunks (lz4hc 5): 7.1 MiB, 0.23 of the decoded float32
    (30.6 MiB); max abs error 0"``: how one array is kept on disk."""
    rec = record or {}
    codec = rec.get("codec") or ("blosc2" if path is not None and path.suffix == ".b2nd" else "npy")
    stored_dtype = rec.get("stored_dtype") or str(arr.dtype)
    size = int(rec.get("nbytes") or 0) or (path.stat().st_size if path is not None and path.is_file() else 0)
    decoded = int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
    how = f"{codec} {rec.get('encoding', 'raw')} {stored_dtype}"
    if rec.get("chunks"):
        how += f" in {'x'.join(map(str, rec['chunks']))} chunks ({rec.get('cname', 'lz4hc')} {rec.get('clevel')})"
    if not record:
        how += " (no storage record: written before volfm recorded encodings)"
    out = f"stored as {how}: {_mib(size)}"
    if decoded:
        out += f", {size / decoded:.3g} of the decoded {arr.dtype} ({_mib(decoded)})"
    if "max_abs_error" in rec:
        out += f"; max abs error {rec['max_abs_error']:.3g}"
    if rec.get("note"):
        out += f" ({rec['note']})"
    return out


def _verify_lines(case_dir: Path, meta: dict) -> list[str]:
    problems = verify_case(case_dir, meta)
    unchecked = [p for p in problems if "no sha256 recorded" in p]
    bad = [p for p in problems if p not in unchecked]
    if bad:
        raise StoreError(f"{case_dir}: case {meta.get('case_id', case_dir.name)} fails verification: "
                         + "; ".join(bad))
    return unchecked


def inspect_store(root: Path, verify: bool = False) -> str:
    store = CohortStore(root)
    doc = store.spec_doc
    lines = [f"store {root}", f"spec  {doc.get('spec', {}).get('name')}  hash {doc.get('spec_hash')}  "
             f"volfm {doc.get('volfm_version')}",
             f"cases {len(store.rows)}: {len(store.ok_ids)} ok, {len(store.failed)} failed"]
    storage = (doc.get("spec") or {}).get("storage") or doc.get("storage")
    lines.append(f"storage  {storage_summary(storage) if storage else 'npy float32 (written before storage blocks)'}")
    shapes = collections.Counter(r.get("shape") for r in store.rows if r.get("status") == "ok")
    spacings = collections.Counter(r.get("spacing") for r in store.rows if r.get("status") == "ok")
    if shapes:
        lines.append("shapes   " + ", ".join(f"{s} ({n})" for s, n in shapes.most_common(5)))
        lines.append("spacings " + ", ".join(f"{s} mm ({n})" for s, n in spacings.most_common(5)))
    if "split" in (store.rows[0] if store.rows else {}):
        splits = collections.Counter(r.get("split") for r in store.rows if r.get("status") == "ok")
        lines.append("splits   " + ", ".join(f"{k}: {v}" for k, v in sorted(splits.items())))
    if store.ok_ids:
        cid = store.ok_ids[0]
        try:  # a damaged sample case must not hide the store's counts and failures
            meta = store.meta(cid)
            records = case_records(store.root / "cases" / cid, meta)
            for name in meta.get("source", {}):
                arr = store.array(cid, name, meta=meta)
                lines.append(f"{name:<8} (case {cid}) {arr.dtype} {arr.shape}: {_stats(arr)}")
                how = describe_storage(arr, (meta.get("storage") or {}).get(name) or None,
                                       store.root / "cases" / cid / records[name]["file"])
                lines.append(f"         {how}")
        except StoreError as exc:
            lines.append(f"UNREADABLE case {cid}: {exc}")
    if verify:
        bad, unchecked = [], 0
        for cid in store.ok_ids:
            case_dir = store.root / "cases" / cid
            meta = read_case_meta(case_dir)
            if meta is None:
                bad.append(f"{cid}: no readable meta.json")
                continue
            try:
                unchecked += len(_verify_lines(case_dir, meta))
            except StoreError as exc:
                bad.append(str(exc))
        if bad:
            raise StoreError(f"{root}: {len(bad)} of {len(store.ok_ids)} ok cases fail verification: " + "; ".join(bad))
        lines.append(f"verified {len(store.ok_ids)} ok cases: every array file matches its recorded sha256"
                     + (f" ({unchecked} files without a recorded sha256 not checked)" if unchecked else ""))
    if store.failed:
        lines.append("failures:")
        lines += [f"  {r['case_id']}: {r.get('error')}" for r in store.failed]
    lines.append(f"QC images: {root / 'qc'}")
    return "\n".join(lines)


def inspect_case(case_dir: Path, verify: bool = False) -> str:
    meta = read_case_meta(case_dir)
    if meta is None:
        raise StoreError(f"{case_dir / 'meta.json'}: unreadable case metadata; rerun volfm preprocess")
    lines = [f"case {meta['case_id']} in {case_dir.parent.parent}  spec {meta['spec_name']} ({meta['spec_hash']})"]
    lines += describe_geometry(np.asarray(meta["affine"]), meta["shape"])
    records = case_records(case_dir, meta)
    if verify:  # before reading: a damaged file is reported as such, not as whatever decoding it gives
        unchecked = _verify_lines(case_dir, meta)
        lines.append("verify   every array file matches its recorded sha256"
                     + (f" ({len(unchecked)} without a recorded sha256 not checked)" if unchecked else ""))
    for name, src in meta["source"].items():
        record = (meta.get("storage") or {}).get(name)
        arr = open_array(case_dir, name, record, case_id=meta["case_id"])
        lines.append(f"{name}: {arr.dtype} {arr.shape} from {src['path']} ({src['orientation']}, "
                     f"{' x '.join(f'{s:.3g}' for s in src['spacing'])} mm, shape {tuple(src['shape'])})")
        lines.append(f"  {describe_storage(arr, record, case_dir / records[name]['file'])}")
        lines.append(f"  {_stats(arr)}")
    if meta.get("intensity"):
        lines.append(f"intensity {json.dumps(meta['intensity'])}")
    return "\n".join(lines)


def store_gallery(path, progress: bool = True) -> str:
    """``volfm inspect STORE --html``: write the store's QC gallery (qc/index.html, qc/index.json) and return the
    line naming it. StoreError (one line) when ``path`` is not a store."""
    path = Path(path)
    if not (path.is_dir() and (path / "manifest.csv").exists()):
        if path.is_dir() and (path / "manifests").is_dir():
            raise StoreError(f"{path}: sharded store without manifest.csv; run volfm preprocess --merge --out {path} "
                             "(it writes the gallery too)")
        raise StoreError(f"{path}: --html writes the QC gallery of a store (a folder with manifest.csv), not of "
                         f"{'a folder without one' if path.is_dir() else 'a file' if path.exists() else 'a missing path'}")
    page = write_gallery(path, progress=progress)
    with open(page.parent / "index.json", encoding="utf-8") as f:
        counts = json.load(f)["counts"]
    failed = f"{counts['failed']} failed, listed first; " if counts["failed"] else "none failed; "
    return f"QC gallery of {counts['cases']} cases ({failed}{counts['with_statistics']} with statistics): {page}"


def inspect_path(path, verify: bool = False) -> str:
    """What ``volfm inspect PATH`` prints for a store, a case folder or an image file; ``verify``: check the array
    files of the case (of every ok case of a store) against their recorded sha256 (StoreError listing mismatches)."""
    path = Path(path)
    if path.is_dir() and (path / "manifest.csv").exists():
        return inspect_store(path, verify)
    if path.is_dir() and (path / "meta.json").exists():
        return inspect_case(path, verify)
    if verify:
        raise StoreError(f"{path}: --verify checks a store or a case folder (cases/<id>), not an image file")
    if path.is_dir() and (path / "manifests").is_dir():
        raise StoreError(f"{path}: sharded store without manifest.csv; run volfm preprocess --merge --out {path}")
    return inspect_file(path)
