"""Cohort runner: preprocess every case of a table into a store, in parallel, resumably.

One bad case never stops the cohort: it gets status=failed and the reason in the manifest.
A rerun skips cases whose meta.json carries the same spec hash and whose QC image exists (so a
run killed with -9 resumes); it first removes the temp leftovers of its own cases. Storage: a spec file's ``storage`` block or
``storage=`` (``--storage``) asks for an encoding, and a done case stored in another one is converted
(volfm.store.arrays.convert_case), not redone; when neither sets one, the existing store's own storage (its
spec.yaml) is kept, for new cases too, and nothing is converted (a new store gets the defaults, npy float32).
``shard=(i, n)`` processes the cases whose stable hash falls in shard i of n and writes
manifests/shard-i-of-n.csv; :func:`merge_shards` joins them into manifest.csv.
Every case's meta.json records ``stats`` (volfm.preprocess.stats); every run with QC pictures ends by writing the
store's QC gallery, qc/index.html (volfm.store.gallery), a --shard run excepted: --merge writes it.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import re
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
import yaml

from volfm import VolfmError, __version__
from volfm.io.atomic import write_text_atomic
from volfm.preprocess.pipeline import Pipeline
from volfm.preprocess.qc import render_case_png
from volfm.preprocess.spec import read_spec_yaml, spec_hash, validate_spec, with_storage
from volfm.preprocess.stats import case_statistics
from volfm.store.arrays import array_file, case_is_current, needs_conversion, storage_summary, try_convert_case
from volfm.store.cohort import (
    CohortError,
    load_cohort,
    read_table,
    series_column,
    table_from_dir,
    write_table,
)
from volfm.store.foreground import (
    FG_MAX_PER_CLASS,
    case_seed,
    foreground_locations,
    save_foreground_locations,
)
from volfm.store.gallery import write_gallery
from volfm.store.layout import (
    MANIFEST_FIRST,
    StoreError,
    read_case_meta,
    remove_stale_temp,
    write_case_dir,
)
from volfm.utils import progress_bar


def shard_of(case_id: str, n: int) -> int:
    return int(hashlib.sha1(case_id.encode()).hexdigest(), 16) % n


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/n' (0-based) or, when unset, SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT from the environment."""
    if text:
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise VolfmError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4") from None
    elif os.environ.get("SLURM_ARRAY_TASK_ID") and os.environ.get("SLURM_ARRAY_TASK_COUNT"):
        i = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        n = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        return None
    if not 0 <= i < n:
        raise VolfmError(f"shard {i}/{n}: i must satisfy 0 <= i < n")
    return i, n


def _init_worker(threads: int):
    torch.set_num_threads(threads)
    # geometry warnings are recorded per case in meta.json and the manifest; library noise is not
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)


def process_case(spec: dict, row: dict, store: str, write_qc: bool = True) -> dict:
    """Run the pipeline on one row and write its case folder and QC image. Never raises."""
    case_id = row["case_id"]
    t0 = time.perf_counter()
    result = {"case_id": case_id, "status": "failed", "error": "", "shape": "", "spacing": "", "warnings": ""}
    caught: list = []
    try:
        pipe = Pipeline(spec)
        for name in spec["inputs"]:
            v = (row.get(name) or "").strip()
            if v and not Path(v).exists():
                raise VolfmError(f"case {case_id}: {name} file not found: {v}; fix the path in the cohort table "
                                 "(relative paths are read from the table's folder)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            case = pipe({k: row.get(k) for k in spec["inputs"]}, case_id=case_id,
                        series={k: row.get(series_column(k)) for k in spec["inputs"]})
        notes = list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught
                                   if issubclass(w.category, UserWarning)))
        result["warnings"] = " | ".join(notes)
        meta = dict(case.meta)
        meta["warnings"] = notes
        meta["written_at"] = time.time()
        meta["table"] = {k: v for k, v in row.items() if k not in spec["inputs"]}
        meta["stats"] = case_statistics(case.arrays, spec, meta["spacing"])  # the QC gallery's outlier features
        root = Path(store)
        write_case_dir(root / "cases", case_id, case.arrays, meta, extras=_foreground_files(spec, case, case_id),
                       storage=spec.get("storage"))
        if write_qc:
            _write_qc(root, case_id, case, spec)
        result.update(status="ok", shape="x".join(map(str, case.shape)),
                      spacing="x".join(f"{s:.4g}" for s in meta["spacing"]))
    except VolfmError as exc:
        msg = str(exc).replace("\n", " ")
        # reader errors name the file only; the manifest and the summary must name the case too
        named = re.search(rf"\bcase {re.escape(case_id)}[:,]", msg)
        result["error"] = msg if named else f"case {case_id}: {msg}"
    except Exception as exc:  # noqa: BLE001 - the cohort goes on; the reason lands in the manifest
        last = traceback.extract_tb(exc.__traceback__)[-1]
        result["error"] = (f"case {case_id}: unexpected {type(exc).__name__}: {exc} "
                           f"(at {Path(last.filename).name}:{last.lineno}); please report it").replace("\n", " ")
    result["elapsed_s"] = f"{time.perf_counter() - t0:.2f}"
    return result


def _foreground_files(spec: dict, case, case_id: str) -> dict:
    """Per-class foreground voxel locations of each label, so label-weighted patch sampling never scans
    the label at training time (nnU-Net keeps the same in its preprocessed data)."""
    out = {}
    for name, cfg in spec["inputs"].items():
        if cfg["kind"] == "label" and name in case.arrays and case.arrays[name].shape[0] == 1:
            locs = foreground_locations(case.arrays[name], FG_MAX_PER_CLASS, case_seed(case_id))
            shape = case.arrays[name].shape[1:]
            # written after the arrays: stamped with the label file as encoded (<name>.npy or .b2nd)
            out[f"{name}_fg.npz"] = lambda path, locs=locs, shape=shape, name=name: save_foreground_locations(
                path, locs, shape, array_file(path.parent, name))
    return out


def _write_qc(root: Path, case_id: str, case, spec: dict):
    ref = spec["reference"]
    labels = [n for n, c in spec["inputs"].items() if c["kind"] == "label" and n in case.arrays]
    others = [(n, case.arrays[n][0]) for n, c in spec["inputs"].items()
              if c["kind"] == "image" and n != ref and n in case.arrays]
    img = case.arrays[ref][0].astype(np.float32)
    it = spec["inputs"][ref]["intensity"]
    vmin, vmax = (it.get("out_min", 0.0), it.get("out_max", 1.0)) if it["type"] == "ct_window" else (None, None)
    sp = "x".join(f"{s:.3g}" for s in case.meta["spacing"])
    render_case_png(root / "qc" / f"{case_id}.png", img, case.affine,
                    label=case.arrays[labels[0]][0] if labels else None,
                    title=f"{case_id}  {spec['name']}  {'x'.join(map(str, case.shape))} @ {sp} mm",
                    vmin=vmin, vmax=vmax, extra=others)


def _check_store_spec(out: Path, spec: dict, h: str, overwrite: bool):
    existing = out / "spec.yaml"
    if existing.exists() and not overwrite:
        doc = yaml.safe_load(existing.read_text()) or {}
        if doc.get("spec_hash") != h:
            raise StoreError(f"{out}: store was built with another spec ({doc.get('spec', {}).get('name')}, hash "
                             f"{doc.get('spec_hash')}; this one is {h}); use --overwrite to rebuild it or a new --out")


def case_is_done(meta: dict | None, row: dict, spec: dict, h: str, redo_before: float | None,
                 case_dir: Path | None = None) -> bool:
    """A stored case can be skipped when it was made with this spec, from the same input files (path,
    size, mtime), with the same set of inputs, after the last --overwrite run began
    (:func:`volfm.store.arrays.case_is_current`), and all its arrays are still on disk (in any encoding: a case
    stored in another one is converted when the run asks for a storage, see
    :func:`volfm.store.arrays.needs_conversion`)."""
    if not case_is_current(meta, row, spec["inputs"], h, redo_before):
        return False
    records = meta.get("storage") or {}
    return case_dir is None or all(array_file(case_dir, n, records.get(n)) is not None for n in meta.get("source", {}))


def _done_result(case_id: str, meta: dict, elapsed: str) -> dict:
    """The manifest result of a case whose folder is complete (skipped as done, or converted)."""
    return {"case_id": case_id, "status": "ok", "error": "", "shape": "x".join(map(str, meta.get("shape", ()))),
            "spacing": "x".join(f"{s:.4g}" for s in meta.get("spacing", ())), "elapsed_s": elapsed,
            "warnings": " | ".join(meta.get("warnings", []))}


def convert_row(spec: dict, row: dict, store: str) -> dict:
    """Re-encode a done case into the spec's storage (no resampling; volfm.store.arrays.try_convert_case, which
    never raises); the manifest result, like process_case's."""
    case_id = row["case_id"]
    res = try_convert_case(store, case_id, spec["storage"])
    elapsed = f"{res['elapsed_s']:.2f}"
    if res["status"] == "failed":
        return {"case_id": case_id, "status": "failed", "error": res["error"], "shape": "", "spacing": "",
                "warnings": "", "elapsed_s": elapsed}
    return _done_result(case_id, read_case_meta(Path(store) / "cases" / case_id) or {}, elapsed)


def _run_job(kind: str, spec: dict, row: dict, store: str, qc: bool) -> dict:
    return convert_row(spec, row, store) if kind == "convert" else process_case(spec, row, store, qc)


def _store_storage(doc: dict | None) -> dict | None:
    """The storage block a store's spec.yaml records (None: none, a store from before storage blocks)."""
    doc = doc or {}
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    return spec.get("storage") or doc.get("storage")


def run_cohort(spec_path, out, cohort=None, input_dir=None, workers: int = 1, shard=None, overwrite: bool = False,
               progress: bool = True, qc: bool = True, log=print, storage=None) -> dict:
    """Preprocess a cohort into ``out``. Returns a summary dict (counts, failures, manifest path, the storage used
    and where it came from).

    storage: a storage block or ``--storage`` text replacing the spec's (the hash is the same, so a store built
    with another encoding is converted case by case, not resampled again). Only an asked-for storage (this
    argument, or a ``storage`` block in the spec file) converts done cases; otherwise the store's own storage
    (spec.yaml) is kept and written for new cases (a new store: the defaults, npy float32)."""
    raw, spec_file = read_spec_yaml(spec_path)
    spec = validate_spec(raw, str(spec_file))
    out = Path(out)
    previous = yaml.safe_load((out / "spec.yaml").read_text()) if (out / "spec.yaml").exists() else None
    convert = True  # storage asked for: done cases stored otherwise are converted
    if storage is not None:
        spec, storage_from = with_storage(spec, storage), "--storage"
    elif isinstance(raw, dict) and "storage" in raw:
        storage_from = f"the storage block of {spec_file}"
    elif _store_storage(previous) is not None:
        spec = with_storage(spec, _store_storage(previous), f"{out / 'spec.yaml'} (the store's storage, kept when "
                                                            "neither the spec nor --storage sets one)")
        storage_from, convert = "kept from the store's spec.yaml", False
    else:
        storage_from, convert = "the default", False
    h = spec_hash(spec)
    if (cohort is None) == (input_dir is None):
        raise VolfmError("give exactly one of --cohort TABLE or --input-dir DIR")
    rows = load_cohort(cohort, spec) if cohort is not None else table_from_dir(input_dir, spec)
    _check_store_spec(out, spec, h, overwrite)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    # --overwrite marks everything written before now as stale, so a killed overwrite run resumes as one
    redo_before = time.time() if overwrite else (previous or {}).get("redo_before")
    doc = {"spec": spec, "spec_hash": h, "volfm_version": __version__}
    if redo_before is not None:
        doc["redo_before"] = float(redo_before)
    write_text_atomic(out / "spec.yaml", yaml.safe_dump(doc, sort_keys=False))
    write_table(out / "cohort.csv", rows)
    if shard is not None:
        rows_here = [r for r in rows if shard_of(r["case_id"], shard[1]) == shard[0]]
    else:
        rows_here = rows
    # a run killed with -9 may have left temp folders/files of this run's cases; nothing else writes them now
    remove_stale_temp(out, [r["case_id"] for r in rows_here])
    todo, results = [], {}
    for r in rows_here:
        meta = None if overwrite else read_case_meta(out / "cases" / r["case_id"])
        # the QC image is written after the case folder: a run killed between the two redoes the case
        qc_done = not qc or (out / "qc" / f"{r['case_id']}.png").exists()
        if qc_done and case_is_done(meta, r, spec, h, redo_before, out / "cases" / r["case_id"]):
            if convert and needs_conversion(out / "cases" / r["case_id"], meta, spec["storage"]):
                todo.append(("convert", r))
                continue
            results[r["case_id"]] = _done_result(r["case_id"], meta, "skipped")
        else:
            todo.append(("process", r))
    skipped = len(results)
    converting = sum(kind == "convert" for kind, _ in todo)
    t0 = time.perf_counter()
    bar = None
    if progress:
        bar = progress_bar(total=len(todo), desc=f"preprocess {spec['name']}", unit="case")
    workers = max(1, int(workers))
    if workers == 1 or len(todo) <= 1:
        for kind, r in todo:
            results[r["case_id"]] = res = _run_job(kind, spec, r, str(out), qc)
            _tick(bar, res)
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as ex:
            futs = {ex.submit(_run_job, kind, spec, r, str(out), qc): r["case_id"] for kind, r in todo}
            for f in as_completed(futs):
                cid = futs[f]
                try:
                    res = f.result()
                except Exception as exc:  # noqa: BLE001 - a worker killed (e.g. out of memory) must not lose the run
                    res = {"case_id": cid, "status": "failed", "shape": "", "spacing": "", "elapsed_s": "",
                           "error": (f"case {cid}: worker process failed ({type(exc).__name__}: {exc}); it may have "
                                     "run out of memory on this or another case; rerun to retry, with fewer "
                                     "--workers").replace("\n", " ")}
                results[cid] = res
                _tick(bar, res)
    if bar is not None:
        bar.close()
    manifest_rows = []
    for r in rows_here:
        res = results[r["case_id"]]
        manifest_rows.append({**{k: v for k, v in r.items()}, **res})
    table_columns = dict.fromkeys(k for r in rows for k in r)  # union: --input-dir rows may lack 'label'
    columns = MANIFEST_FIRST + [c for c in table_columns if c not in MANIFEST_FIRST]
    target = out / "manifest.csv" if shard is None else out / "manifests" / f"shard-{shard[0]}-of-{shard[1]}.csv"
    write_table(target, manifest_rows, columns)
    failed = [m for m in manifest_rows if m["status"] != "ok"]
    elapsed = time.perf_counter() - t0
    summary = {"ok": len(manifest_rows) - len(failed), "failed": len(failed), "skipped": skipped,
               "processed": len(todo) - converting, "elapsed_s": elapsed,
               "converted": sum(kind == "convert" and results[r["case_id"]]["status"] == "ok" for kind, r in todo),
               "manifest": str(target), "store": str(out), "storage": spec["storage"], "storage_from": storage_from,
               "failures": [(m["case_id"], m["error"]) for m in failed],
               "warnings": [(m["case_id"], m["warnings"]) for m in manifest_rows if m.get("warnings")],
               "cases_per_min": ((len(todo) - converting) / elapsed * 60.0)
               if len(todo) > converting and elapsed > 0 else None}
    if qc and shard is None:  # a shard's cases join the gallery when --merge writes manifest.csv
        summary["gallery"] = str(write_gallery(out, progress=progress))
    return summary


def _tick(bar, res):
    if bar is not None:
        bar.update(1)
        if res["status"] != "ok":
            bar.write(f"  failed: {res['error']}")


def merge_shards(out) -> dict:
    """Join manifests/shard-*.csv into manifest.csv; refuse if some cases are in no shard manifest."""
    out = Path(out)
    shard_files = sorted((out / "manifests").glob("shard-*-of-*.csv"))
    if not shard_files:
        raise StoreError(f"{out}: no shard manifests under {out / 'manifests'}; run volfm preprocess --shard i/n first")
    counts = {int(p.stem.split("-of-")[1]) for p in shard_files}
    if len(counts) != 1:
        raise StoreError(f"{out}: shard manifests from different shard counts {sorted(counts)}; remove stale ones")
    table = read_table(out / "cohort.csv")
    by_id = {}
    for p in shard_files:
        for r in read_table(p):
            by_id[r["case_id"]] = r
    missing = [r["case_id"] for r in table if r["case_id"] not in by_id]
    if missing:
        n = counts.pop()
        absent = sorted({shard_of(c, n) for c in missing})
        raise StoreError(f"{out}: {len(missing)} case(s) are in no shard manifest (e.g. {missing[0]}); "
                         f"shards still to run: {', '.join(f'{i}/{n}' for i in absent)}")
    rows = [by_id[r["case_id"]] for r in table]
    # union of the shard manifests' columns (a shard with no cases has a header-only manifest)
    columns = list(dict.fromkeys(k for r in rows for k in r)) or MANIFEST_FIRST
    write_table(out / "manifest.csv", rows, columns)
    failed = [r for r in rows if r["status"] != "ok"]
    summary = {"ok": len(rows) - len(failed), "failed": len(failed), "skipped": 0, "processed": 0,
               "manifest": str(out / "manifest.csv"), "store": str(out),
               "failures": [(r["case_id"], r["error"]) for r in failed], "elapsed_s": 0.0, "cases_per_min": None}
    if (out / "qc").is_dir():  # the shards wrote QC pictures (not --no-qc)
        summary["gallery"] = str(write_gallery(out))
    return summary


__all__ = ["run_cohort", "merge_shards", "process_case", "parse_shard", "shard_of", "CohortError"]


def print_summary(summary: dict, log=print) -> None:
    rate = f", {summary['cases_per_min']:.1f} cases/min" if summary.get("cases_per_min") else ""
    conv = f", {summary['converted']} converted to the spec's storage" if summary.get("converted") else ""
    log(f"{summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} already done{conv} "
        f"({summary['processed']} processed in {summary['elapsed_s']:.1f} s{rate})")
    log(f"store:    {summary['store']}")
    if summary.get("storage"):
        log(f"storage:  {storage_summary(summary['storage'])} ({summary.get('storage_from')})")
    log(f"manifest: {summary['manifest']}")
    log(f"QC:       {Path(summary['store']) / 'qc'}")
    if summary.get("gallery"):
        log(f"gallery:  {summary['gallery']} (failed cases first, then every case by outlier score)")
    for cid, note in summary.get("warnings", []):
        log(f"warning {cid}: {note}")
    for cid, err in summary["failures"]:
        log(f"FAILED {cid}: {err}")
