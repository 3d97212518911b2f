"""The QC gallery of a store: ``qc/index.html`` (one self-contained page) and ``qc/index.json`` (the same index, for
scripts), written by :func:`write_gallery` at the end of every ``volfm preprocess`` run and by
``volfm inspect STORE --html``.

The index has one row per manifest row: the manifest's columns (text cells cut at :data:`MAX_TEXT` characters), the
case's features, their robust z-scores, an outlier score and the feature that drove it. Features of an ok case:
its stored grid (``shape.i|j|k``, ``spacing.i|j|k``), its reference input's source grid (``source.shape.*``,
``source.spacing.*``) and the ``stats`` block meta.json records (volfm.preprocess.stats: ``<input>.mean|std|p1|p50|
p99``, ``foreground``, ``<label>.ml`` and, for labels of at most :data:`MAX_CLASS_FEATURES` classes across the
cohort, ``<label>.ml.<class>``; a class a case lacks counts 0 mL). Cases stored before volfm recorded ``stats`` get
them from their arrays, once: every case's features are cached in ``qc/stats_cache.json`` under its meta.json's
size and mtime, so a store's meta.json files are read once, not at every run. A case whose arrays could not be read
for them is not cached: it keeps its grid features and a ``qc_note`` saying why, and the next gallery tries again.

Robust z-score of a feature: ``(x - median) / scale`` over the cohort's ok cases, ``scale = max(1.4826 MAD, 1 % of
|median|, floor)``, the floor being 1 voxel for shapes, 0.01 mm for spacings, 0.01 for the foreground fraction,
1 mL for label volumes and 1 % of the cohort's median p1-p99 range of the input for intensity statistics (so a
feature every case shares does not turn rounding noise into outliers); clipped to +-:data:`Z_CLIP`. Outlier score
= max |z| over a case's features.

Order: failed cases first (by case id), then ok cases by outlier score, highest first. The page shows the failed
cases with their errors at the top whatever the sort, then each case's QC picture (``qc/<id>.png``, loaded lazily)
with its manifest columns and its most deviant features; it sorts by outlier score, case id or any numeric column,
filters by split, status and text, and renders one page of rows at a time, so 20,000 cases stay responsive. The
index is embedded in the page (``<script type="application/json">``): a page opened from ``file://`` cannot fetch
a sibling file. Every manifest text reaches the page through ``textContent`` only.
"""
from __future__ import annotations

import datetime
import html
import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from volfm import VolfmError
from volfm.io.atomic import write_text_atomic
from volfm.preprocess.stats import STATS_VERSION, case_statistics, stat_features
from volfm.store.arrays import open_array, read_case_meta
from volfm.store.layout import MANIFEST_FIRST, CohortStore
from volfm.utils import progress_bar

__all__ = ["CACHE_NAME", "INDEX_FORMAT", "MAX_CLASS_FEATURES", "MAX_TEXT", "Z_CLIP", "build_index", "case_features",
           "render_html", "robust_z", "write_gallery"]

INDEX_FORMAT = "volfm.qc-index/1"
CACHE_NAME = "stats_cache.json"
MAX_TEXT = 300
MAX_CLASS_FEATURES = 32
Z_CLIP = 999.0
_MAD_SIGMA = 1.4826  # MAD -> standard deviation of a normal distribution
_AXES = "ijk"
_STATS = ("mean", "std", "p1", "p50", "p99")
_GRID = frozenset(f"{k}.{a}" for k in ("shape", "spacing", "source.shape", "source.spacing") for a in _AXES)


# ------------------------------------------------------------------------------------------- features
def case_features(meta: dict, stats: dict | None = None) -> dict[str, float]:
    """Flat numeric features of an ok case: its grid and its reference's source grid from ``meta`` and the
    ``stats`` block (``meta["stats"]`` when not given; see volfm.preprocess.stats.stat_features)."""
    feats: dict[str, float] = {}
    for key, values in (("shape", meta.get("shape")), ("spacing", meta.get("spacing"))):
        for a, v in zip(_AXES, values or ()):
            feats[f"{key}.{a}"] = float(v)
    src = (meta.get("source") or {}).get(meta.get("reference") or "") or {}
    for key in ("shape", "spacing"):
        for a, v in zip(_AXES, (src.get(key) or ())[-3:]):
            feats[f"source.{key}.{a}"] = float(v)
    feats.update(stat_features(stats if stats is not None else meta.get("stats")))
    return feats


def _floor(feature: str, ranges: dict[str, float]) -> float:
    """The smallest scale of a feature's z-score (see the module docstring)."""
    parts = feature.split(".")
    if parts[0] in ("shape", "source") and "shape" in parts:
        return 1.0
    if "spacing" in parts[:2]:
        return 0.01
    if feature == "foreground":
        return 0.01
    if len(parts) >= 2 and parts[1] == "ml":
        return 1.0
    if len(parts) == 2 and parts[1] in _STATS:
        return max(0.01 * ranges.get(parts[0], 0.0), 1e-6)
    return 1e-6


def robust_z(values: np.ndarray, features: list[str]) -> np.ndarray:
    """Robust z-scores of ``values`` (cases x features, NaN where a case lacks a feature), per column:
    ``(x - median) / max(1.4826 MAD, 1 % of |median|, floor)``, clipped to +-Z_CLIP; NaN stays NaN."""
    x = np.asarray(values, dtype=np.float64)
    z = np.full_like(x, np.nan)
    if x.size == 0:
        return z
    col = {f: i for i, f in enumerate(features)}
    ranges = {}
    for f in features:  # the cohort's typical p1-p99 range of each input, the floor of its intensity statistics
        if f.endswith(".p99") and f[:-4] + ".p1" in col:
            span = x[:, col[f]] - x[:, col[f[:-4] + ".p1"]]
            span = span[np.isfinite(span)]
            ranges[f[:-4]] = float(np.median(span)) if span.size else 0.0
    for j, f in enumerate(features):
        v = x[:, j]
        ok = np.isfinite(v)
        if not ok.any():
            continue
        med = float(np.median(v[ok]))
        mad = float(np.median(np.abs(v[ok] - med)))
        scale = max(_MAD_SIGMA * mad, 0.01 * abs(med), _floor(f, ranges))
        z[ok, j] = np.clip((v[ok] - med) / scale, -Z_CLIP, Z_CLIP)
    return z


# ------------------------------------------------------------------------------------------- cache
def _meta_key(meta_path: str) -> list[int] | None:
    try:
        st = os.stat(meta_path)
    except OSError:
        return None
    return [int(st.st_mtime_ns), int(st.st_size)]


def _load_cache(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != STATS_VERSION or not isinstance(doc.get("cases"), dict):
        return {}
    return doc["cases"]


def _arrays_stats(case_dir: Path, cid: str, meta: dict, spec: dict) -> dict:
    records = meta.get("storage") or {}
    arrays = {}
    for name in meta.get("source") or {}:
        arr = open_array(case_dir, name, records.get(name), case_id=cid)
        arrays[name] = arr if isinstance(arr, np.ndarray) else np.asarray(arr)
    return case_statistics(arrays, spec, meta.get("spacing") or (1.0, 1.0, 1.0))


def _features_of(root: Path, ok_ids: list[str], spec: dict | None, progress: bool) -> tuple[dict, dict, dict]:
    """({case id: features}, {case id: note}, counts) of the ok cases, from the cache, meta.json, or the arrays
    (stores written before meta.json recorded ``stats``); updates qc/stats_cache.json."""
    cache_path = root / "qc" / CACHE_NAME
    cache = _load_cache(cache_path)
    new_cache, feats, notes, todo = {}, {}, {}, []
    counts = {"cached": 0, "from_meta": 0, "from_arrays": 0}
    cases_dir = os.path.join(str(root), "cases")
    for cid in ok_ids:
        meta_path = os.path.join(cases_dir, cid, "meta.json")
        key = _meta_key(meta_path)
        hit = cache.get(cid)
        if key is not None and isinstance(hit, dict) and hit.get("key") == key and isinstance(hit.get("features"), dict):
            feats[cid], new_cache[cid] = hit["features"], hit
            counts["cached"] += 1
            continue
        meta = read_case_meta(Path(cases_dir, cid)) if key is not None else None
        if meta is None:
            notes[cid] = "no readable meta.json: no statistics"
            continue
        if isinstance(meta.get("stats"), dict):
            feats[cid] = case_features(meta)
            new_cache[cid] = {"key": key, "features": feats[cid], "from": "meta"}
            counts["from_meta"] += 1
        else:
            todo.append((cid, key, meta))
    if todo and spec is None:
        for cid, _, _ in todo:
            notes[cid] = "no statistics in meta.json and no spec in spec.yaml to compute them"
        todo = []
    bar = progress_bar(todo, desc="QC statistics (from the arrays)", unit="case",
                       disable=not progress or not todo)
    for cid, key, meta in bar:
        try:
            stats = _arrays_stats(root / "cases" / cid, cid, meta, spec)
        except (VolfmError, OSError, ValueError) as exc:  # not cached: the next gallery tries again, noted again
            notes[cid] = f"statistics not computed: {' '.join(str(exc).split())}"
            feats[cid] = case_features(meta, {})
        else:
            feats[cid] = case_features(meta, stats)
            counts["from_arrays"] += 1
            new_cache[cid] = {"key": key, "features": feats[cid], "from": "arrays"}
    if new_cache != cache:
        write_text_atomic(cache_path, json.dumps({"version": STATS_VERSION, "cases": new_cache}, separators=(",", ":")))
    return feats, notes, counts


# ------------------------------------------------------------------------------------------- index
def _round_sig(a: np.ndarray, digits: int) -> np.ndarray:
    with np.errstate(all="ignore"):
        mag = np.floor(np.log10(np.abs(a)))
        mag = np.where(np.isfinite(mag), mag, 0.0)
        scale = 10.0 ** (digits - 1 - mag)
        return np.where(np.isfinite(a), np.round(a * scale) / scale, np.nan)


def _json_column(a: np.ndarray) -> list:
    """A float column as JSON-ready values (NaN -> None)."""
    return [None if v != v else v for v in a.tolist()]


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _numeric_columns(rows: list[dict], columns: list[str]) -> list[str]:
    """Manifest columns whose non-empty cells are numbers (at least 90 % of them: elapsed_s holds "skipped")."""
    out = []
    for c in columns:
        if c in ("case_id", "status", "error"):
            continue
        cells = [r.get(c) or "" for r in rows]
        filled = [v for v in cells if v.strip()]
        if filled and sum(_is_number(v) for v in filled) >= 0.9 * len(filled):
            out.append(c)
    return out


def _cut(text) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "\u2026"


def _thumb_size(qc_dir: Path, ids: list[str]) -> dict | None:
    """Width and height of the first QC picture (all of a store's are drawn alike): the page reserves that box
    before a lazy image loads."""
    for cid in ids[:20]:
        try:
            with open(qc_dir / f"{cid}.png", "rb") as f:
                head = f.read(24)
        except OSError:
            continue
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            w, h = struct.unpack(">II", head[16:24])
            return {"width": int(w), "height": int(h)}
    return None


def build_index(store_root, progress: bool = False) -> dict:
    """The gallery's index of a store (what qc/index.json holds): ``fields`` and one row per case (failed first by
    case id, then ok by outlier score, highest first), with ``columns`` (the manifest's), ``numeric_columns``,
    ``features``, counts (``with_statistics``: ok cases with statistics beyond their grid) and the store's name
    and spec. StoreError when ``store_root`` is not a store."""
    store = CohortStore(store_root)
    root = store.root
    rows = store.rows
    present: dict = {}
    for r in rows:  # csv rows share their keys: this is the header (a union, should a caller's rows differ)
        if r.keys() != present.keys():
            present.update(dict.fromkeys(r))
    columns = [*(c for c in MANIFEST_FIRST if c in present), *(c for c in present if c not in MANIFEST_FIRST)]
    columns = columns or list(MANIFEST_FIRST)
    failed = sorted((r for r in rows if r.get("status") != "ok"), key=lambda r: r.get("case_id", ""))
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    ok_ids = [r["case_id"] for r in ok_rows]
    spec = store.spec_doc.get("spec") if isinstance(store.spec_doc.get("spec"), dict) else None
    feats, notes, counts = _features_of(root, ok_ids, spec, progress)

    # features: the grid first, then the stats blocks' in first-seen order; per-class volumes by class
    names = list(dict.fromkeys(f for cid in ok_ids for f in feats.get(cid, {})))
    per_class: dict[str, list[str]] = {}
    for f in names:
        parts = f.split(".")
        if len(parts) == 3 and parts[1] == "ml":
            per_class.setdefault(parts[0], []).append(f)
    drop = {f for fs in per_class.values() if len(fs) > MAX_CLASS_FEATURES for f in fs}
    order = {f: i for i, f in enumerate(names)}

    def rank(f: str):
        parts = f.split(".")
        if len(parts) == 3 and parts[1] == "ml" and parts[2].lstrip("-").isdigit():
            return (order[f"{parts[0]}.ml"] if f"{parts[0]}.ml" in order else order[f], int(parts[2]))
        return (order[f], -1)

    features = sorted((f for f in names if f not in drop), key=rank)
    col = {f: j for j, f in enumerate(features)}
    x = np.full((len(ok_ids), len(features)), np.nan)
    for i, cid in enumerate(ok_ids):
        fc = feats.get(cid) or {}
        for f, v in fc.items():
            j = col.get(f)
            if j is not None and v is not None:
                x[i, j] = v
        for lab, fs in per_class.items():  # a class a labelled case lacks is 0 mL
            if f"{lab}.ml" in fc:
                for f in fs:
                    if f in col and f not in fc:
                        x[i, col[f]] = 0.0
    z = robust_z(x, features)
    absz = np.where(np.isfinite(z), np.abs(z), -1.0)
    has = (absz >= 0).any(axis=1) if len(features) else np.zeros(len(ok_ids), dtype=bool)
    best = absz.argmax(axis=1) if len(features) else np.zeros(len(ok_ids), dtype=int)
    score = np.where(has, absz[np.arange(len(ok_ids)), best] if len(features) else 0.0, np.nan)
    # cases with statistics beyond their grid (meta.json's stats or the arrays'): every ok case has a grid
    with_stats = sum(any(f not in _GRID and v is not None for f, v in (feats.get(cid) or {}).items()) for cid in ok_ids)
    by_score = sorted(range(len(ok_ids)), key=lambda i: (-score[i] if score[i] == score[i] else math.inf, ok_ids[i]))

    xr, zr, sr = _round_sig(x, 5), np.round(z, 2), np.round(score, 2)
    x_cols = [_json_column(xr[:, j]) for j in range(len(features))]
    z_cols = [_json_column(zr[:, j]) for j in range(len(features))]
    qc_dir = root / "qc"
    pngs = {e.name for e in os.scandir(qc_dir)} if qc_dir.is_dir() else set()
    fields = [*columns, "qc_png", "qc_note", "outlier_score", "outlier_feature", *features,
              *(f"z:{f}" for f in features)]
    out_rows = []
    blank = [None] * (2 + 2 * len(features))
    for r in failed:
        out_rows.append([_cut(r.get(c)) for c in columns] + [False, ""] + blank)
    for i in by_score:
        r, cid = ok_rows[i], ok_ids[i]
        s = None if sr[i] != sr[i] else float(sr[i])
        out_rows.append([_cut(r.get(c)) for c in columns]
                        + [f"{cid}.png" in pngs, notes.get(cid, ""), s, features[best[i]] if s is not None else None]
                        + [xc[i] for xc in x_cols] + [zc[i] for zc in z_cols])
    return {"format": INDEX_FORMAT, "store": str(root.resolve()), "name": root.resolve().name,
            "spec": (spec or {}).get("name"), "spec_hash": store.spec_doc.get("spec_hash"),
            "written_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "counts": {"cases": len(rows), "ok": len(ok_rows), "failed": len(failed),
                       "with_statistics": with_stats, **counts},
            "columns": columns, "numeric_columns": _numeric_columns(rows, columns), "features": features,
            "thumb": _thumb_size(qc_dir, ok_ids), "fields": fields, "rows": out_rows}


# ------------------------------------------------------------------------------------------- page
def _script_json(text: str) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' outside their \\u escapes (no ``</script>``)."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(index: dict, index_json: str | None = None) -> str:
    """The self-contained page of an index (inline CSS and JS, the index embedded as JSON)."""
    data = index_json if index_json is not None else json.dumps(index, separators=(",", ":"), ensure_ascii=False,
                                                                allow_nan=False)
    c = index["counts"]
    title = f"QC {index['name']}: {c['cases']} cases, {c['failed']} failed"
    values = {"TITLE": html.escape(title), "STORE": html.escape(index["store"]),
              "SPEC": html.escape(str(index.get("spec") or "?")), "WRITTEN": html.escape(index["written_at"]),
              "ZCLIP": f"{Z_CLIP:g}", "INDEX": _script_json(data)}
    return re.sub(r"__([A-Z]+)__", lambda m: values[m[1]], _PAGE)  # one pass: no value is substituted again


def write_gallery(store_root, progress: bool = False) -> Path:
    """Write ``qc/index.html`` and ``qc/index.json`` of a store (each under a temporary name, then renamed) and
    return the page's path. StoreError when ``store_root`` is not a store."""
    index = build_index(store_root, progress=progress)
    qc_dir = Path(store_root) / "qc"
    qc_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(index, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    write_text_atomic(qc_dir / "index.json", text + "\n")
    page = qc_dir / "index.html"
    write_text_atomic(page, render_html(index, text))
    return page


_PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root { --fg: #1d2330; --muted: #5d6678; --line: #d9dee7; --bg: #f5f7fa; --card: #fff; --bad: #b3261e;
        --badbg: #fdecea; --hi: #b3261e; --mid: #c77700; --lo: #5d6678; --accent: #1f5fbf; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid var(--line);
         padding: 8px 16px; box-shadow: 0 1px 3px rgba(0,0,0,.06); }
h1 { font-size: 18px; margin: 0 12px 0 0; display: inline; }
.sub { color: var(--muted); font-size: 12px; }
.counts { margin-top: 2px; }
.counts b.bad { color: var(--bad); }
.controls { display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; margin-top: 6px; }
.controls label { color: var(--muted); font-size: 12px; }
.controls select, .controls input, .controls button, .pager button, .pager input { font: inherit; font-size: 13px; }
#q { width: 280px; padding: 3px 6px; }
.pager { display: flex; gap: 6px; align-items: center; font-size: 13px; color: var(--muted); margin-top: 6px; }
.pager input { width: 4.5em; }
.pager .shown { margin-left: 10px; }
main { padding: 10px 16px; }
.section { margin: 14px 0 6px; font-size: 15px; font-weight: 600; }
.section.bad { color: var(--bad); }
.case { display: flex; gap: 14px; background: var(--card); border: 1px solid var(--line); border-radius: 6px;
        padding: 8px; margin-bottom: 8px; align-items: flex-start; }
.case.failed { border-color: #f0b4ae; background: var(--badbg); }
.thumb { flex: 0 0 auto; width: 560px; max-width: 55vw; }
.thumb img { display: block; width: 100%; height: auto; background: #000; border-radius: 3px; }
.thumb img[data-error] { background: #eee; min-height: 60px; }
.nothumb { color: var(--muted); font-style: italic; padding: 20px 8px; background: #eef0f4; border-radius: 3px; }
.info { flex: 1 1 auto; min-width: 0; }
.head { display: flex; gap: 8px; align-items: baseline; flex-wrap: wrap; }
.rank { color: var(--muted); font-size: 12px; min-width: 3em; }
.cid { font-size: 15px; margin: 0; word-break: break-all; }
.badge { font-size: 11px; padding: 1px 7px; border-radius: 9px; background: #e6eaf0; color: var(--fg); }
.badge.good { background: #e3f3e6; color: #1e6b30; }
.badge.bad { background: var(--bad); color: #fff; }
.error { white-space: pre-wrap; word-break: break-word; color: var(--bad); background: #fff; border: 1px solid #f0b4ae;
         border-radius: 4px; padding: 6px 8px; margin: 6px 0; font: 12px/1.4 ui-monospace, Menlo, Consolas, monospace; }
.score { margin: 4px 0; }
.score b { font-size: 15px; }
.chips { display: flex; flex-wrap: wrap; gap: 4px; margin: 4px 0; }
.chip { font-size: 12px; border: 1px solid var(--line); border-radius: 4px; padding: 0 6px; background: #fafbfc; }
.chip.hi { border-color: var(--hi); color: var(--hi); }
.chip.mid { border-color: var(--mid); color: var(--mid); }
.chip.lo { color: var(--lo); }
dl.cols { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 1px 14px; margin: 6px 0 0;
          font-size: 12px; }
dl.cols div { min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
dl.cols div.wide { grid-column: 1 / -1; white-space: normal; display: -webkit-box; -webkit-line-clamp: 2;
                   -webkit-box-orient: vertical; }
dl.cols dt, dl.cols dd { display: inline; margin: 0; }
dl.cols dt { color: var(--muted); margin-right: 6px; }
details { font-size: 12px; margin-top: 4px; }
details table { border-collapse: collapse; }
details td { padding: 0 8px 0 0; }
.note { color: var(--mid); font-size: 12px; }
footer { color: var(--muted); font-size: 12px; padding: 8px 16px 24px; }
.empty { color: var(--muted); padding: 30px; text-align: center; }
@media (max-width: 900px) { .case { flex-direction: column; } .thumb { width: 100%; max-width: none; } }
</style>
</head>
<body>
<header>
  <div><h1>QC gallery</h1><span class="sub">store __STORE__ &middot; spec __SPEC__ &middot; written __WRITTEN__</span></div>
  <div class="sub counts" id="counts"></div>
  <div class="controls">
    <input id="q" type="search" placeholder="search case id, error, any column" aria-label="search">
    <label>split <select id="split"><option value="">all</option></select></label>
    <label>status <select id="status"><option value="">all</option><option value="ok">ok</option>
      <option value="failed">failed</option></select></label>
    <label>sort by <select id="sort"></select></label>
    <button id="dir" type="button"></button>
    <label>per page <select id="size"><option>50</option><option selected>100</option><option>200</option>
      </select></label>
  </div>
  <div class="pager" id="pager-top"></div>
</header>
<main id="list"></main>
<div class="pager" id="pager-bottom" style="padding: 0 16px"></div>
<footer>Failed cases are listed first, whatever the sort. Outlier score: the largest |z| of a case's features, each
z = (value &minus; cohort median) / max(1.4826 &times; MAD, 1&nbsp;% of |median|, a floor per feature), clipped at
__ZCLIP__; features: stored and source grid (shape, spacing), per input mean, std, p1, p50, p99 (stored units),
foreground fraction, label volumes in mL. The same index is in index.json beside this page.</footer>
<script type="application/json" id="qc-index">__INDEX__</script>
<script>
(function () {
"use strict";
var D = JSON.parse(document.getElementById("qc-index").textContent);
var F = D.fields, C = {};
F.forEach(function (f, i) { C[f] = i; });
var R = D.rows, N = R.length;
var collate = new Intl.Collator(undefined, {numeric: true, sensitivity: "base"}).compare;
var $ = function (id) { return document.getElementById(id); };
function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function isFailed(r) { return R[r][C.status] !== "ok"; }
var numCache = {};
function num(f) {
  if (!numCache[f]) {
    var i = C[f], a = new Float64Array(N);
    for (var r = 0; r < N; r++) {
      var v = R[r][i];
      a[r] = (v === null || v === "" || v === undefined || v === false) ? NaN : Number(v);
    }
    numCache[f] = a;
  }
  return numCache[f];
}
function fmt(v) {
  if (v === null || v === undefined || v !== v) return "";
  var a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
  return String(Math.round(v * 1000) / 1000);
}
function describe(f) {
  var p = f.split("."), ax = {i: "first", j: "second", k: "third"}[p[p.length - 1]] || p[p.length - 1];
  if (p[0] === "shape") return "stored grid: voxels along the " + ax + " axis";
  if (p[0] === "spacing") return "stored grid: voxel spacing (mm) along the " + ax + " axis";
  if (p[0] === "source") return "reference input's source image: " + (p[1] === "shape" ? "voxels" : "spacing (mm)")
    + " along its " + ax + " axis";
  if (f === "foreground") return "fraction of the reference image's voxels that are foreground (body, or not background)";
  if (p[1] === "ml") return p.length > 2 ? p[0] + ": volume of class " + p[2] + " (mL)" : p[0] + ": labelled volume (mL)";
  var st = {mean: "mean", std: "standard deviation", p1: "1st percentile", p50: "median", p99: "99th percentile"};
  if (st[p[1]]) return p[0] + ": " + st[p[1]] + " of the stored intensities";
  return f;
}
var hay = [];
function haystack(r) {
  if (hay[r] === undefined) {
    hay[r] = D.columns.map(function (c) { return R[r][C[c]]; }).join(" \u0001 ").toLowerCase();
  }
  return hay[r];
}

// ------------------------------------------------------------------ controls and state
var sortKeys = [["outlier_score", "outlier score"], ["case_id", "case id"]];
var sortSel = $("sort");
sortKeys.forEach(function (k) { var o = el("option", null, k[1]); o.value = k[0]; sortSel.appendChild(o); });
[["manifest columns", D.numeric_columns], ["case statistics", D.features]].forEach(function (g) {
  if (!g[1].length) return;
  var og = el("optgroup"); og.label = g[0];
  g[1].forEach(function (c) {
    var o = el("option", null, c); o.value = c; o.title = describe(c); og.appendChild(o); sortKeys.push([c, c]);
  });
  sortSel.appendChild(og);
});
var splits = {};
if (C.split !== undefined) R.forEach(function (row) { var s = row[C.split]; if (s) splits[s] = (splits[s] || 0) + 1; });
var splitSel = $("split");
Object.keys(splits).sort(collate).forEach(function (s) {
  var o = el("option", null, s + " (" + splits[s] + ")"); o.value = s; splitSel.appendChild(o);
});
if (C.split === undefined) splitSel.parentNode.style.display = "none";
$("status").options[1].textContent = "ok (" + D.counts.ok + ")";
$("status").options[2].textContent = "failed (" + D.counts.failed + ")";
var cnt = $("counts");
cnt.appendChild(document.createTextNode(D.counts.cases + " cases: " + D.counts.ok + " ok, "));
cnt.appendChild(el("b", D.counts.failed ? "bad" : null, D.counts.failed + " failed"));
cnt.appendChild(document.createTextNode(", " + D.counts.with_statistics + " with statistics"));

var state = {sort: "outlier_score", dir: "desc", split: "", status: "", q: "", page: 1, size: 100};
function readHash() {
  var p = new URLSearchParams(location.hash.replace(/^#/, ""));
  ["sort", "dir", "split", "status", "q"].forEach(function (k) { if (p.has(k)) state[k] = p.get(k); });
  if (p.has("page")) state.page = Math.max(1, parseInt(p.get("page"), 10) || 1);
  if (p.has("size")) state.size = Math.min(1000, Math.max(10, parseInt(p.get("size"), 10) || 100));
  if (state.sort !== "case_id" && C[state.sort] === undefined) state.sort = "outlier_score";
  if (state.dir !== "asc") state.dir = "desc";
}
function writeHash() {
  var p = new URLSearchParams();
  Object.keys(state).forEach(function (k) { p.set(k, state[k]); });
  history.replaceState(null, "", "#" + p.toString());
}
function syncControls() {
  sortSel.value = state.sort; splitSel.value = state.split; $("status").value = state.status;
  $("q").value = state.q; $("dir").textContent = state.dir === "asc" ? "ascending \u2191" : "descending \u2193";
  var size = $("size");
  if (!Array.prototype.some.call(size.options, function (o) { return o.value === String(state.size); })) {
    var o = el("option", null, state.size); o.value = String(state.size); size.appendChild(o);
  }
  size.value = String(state.size);
}

// ------------------------------------------------------------------ ordering (failed first, always)
var view = null;
function recompute() {
  var failed = [], ok = [], q = state.q.trim().toLowerCase(), si = C.split;
  for (var r = 0; r < N; r++) {
    var f = isFailed(r);
    if ((state.status === "ok" && f) || (state.status === "failed" && !f)) continue;
    if (state.split && R[r][si] !== state.split) continue;
    if (q && haystack(r).indexOf(q) < 0) continue;
    (f ? failed : ok).push(r);
  }
  var sign = state.dir === "asc" ? 1 : -1, id = C.case_id;
  if (state.sort === "case_id") {
    ok.sort(function (a, b) { return sign * collate(R[a][id], R[b][id]); });
  } else {
    var v = num(state.sort);
    ok.sort(function (a, b) {
      var x = v[a], y = v[b], xn = x !== x, yn = y !== y;
      if (xn || yn) return xn === yn ? collate(R[a][id], R[b][id]) : (xn ? 1 : -1);
      return x === y ? collate(R[a][id], R[b][id]) : sign * (x - y);
    });
  }
  view = {failed: failed, ok: ok};
}

// ------------------------------------------------------------------ rendering one page
var zKeys = D.features.map(function (f) { return [f, C[f], C["z:" + f]]; });
function topZ(row, n) {
  var all = [];
  zKeys.forEach(function (k) { var z = row[k[2]]; if (z !== null && z !== undefined) all.push([k[0], row[k[1]], z]); });
  all.sort(function (a, b) { return Math.abs(b[2]) - Math.abs(a[2]); });
  return all.slice(0, n);
}
function chipsOf(row) {  // the sorted feature first, then the most deviant ones (|z| >= 1), four in all
  var out = [], sorted = state.sort;
  if (C["z:" + sorted] !== undefined && row[C[sorted]] !== null) out.push([sorted, row[C[sorted]], row[C["z:" + sorted]]]);
  topZ(row, 5).forEach(function (z) { if (z[0] !== sorted && Math.abs(z[2]) >= 1 && out.length < 4) out.push(z); });
  return out;
}
function zClass(z) { var a = Math.abs(z); return a >= 5 ? "hi" : a >= 3 ? "mid" : "lo"; }
function zText(z) { return (z > 0 ? "+" : "") + z.toFixed(1); }
function markLoaded() { this.setAttribute("data-loaded", "1"); }
function markError() { this.setAttribute("data-error", "1"); this.alt = "QC picture missing: " + this.alt; }
var skipCols = {case_id: 1, status: 1, error: 1, split: 1};
function card(r, k) {
  var row = R[r], id = String(row[C.case_id]), failed = isFailed(r);
  var a = el("article", "case" + (failed ? " failed" : ""));
  a.setAttribute("data-case", id);
  a.setAttribute("data-status", failed ? "failed" : "ok");
  if (!failed) {
    var t = el("div", "thumb");
    if (row[C.qc_png]) {
      var link = el("a"); link.href = encodeURIComponent(id) + ".png"; link.target = "_blank"; link.rel = "noopener";
      var img = document.createElement("img");
      img.loading = "lazy"; img.decoding = "async"; img.alt = "QC picture of " + id;
      if (D.thumb) { img.width = D.thumb.width; img.height = D.thumb.height; }
      img.addEventListener("load", markLoaded);
      img.addEventListener("error", markError);
      img.src = encodeURIComponent(id) + ".png";
      link.appendChild(img); t.appendChild(link);
    } else {
      t.appendChild(el("div", "nothumb", "no QC picture (qc/" + id + ".png)"));
    }
    a.appendChild(t);
  }
  var info = el("div", "info"), head = el("div", "head");
  head.appendChild(el("span", "rank", "#" + (k + 1)));
  head.appendChild(el("h2", "cid", id));
  head.appendChild(el("span", "badge " + (failed ? "bad" : "good"), failed ? (row[C.status] || "failed") : "ok"));
  if (C.split !== undefined && row[C.split]) head.appendChild(el("span", "badge", row[C.split]));
  info.appendChild(head);
  if (failed) {
    info.appendChild(el("pre", "error", row[C.error] || "(no error recorded)"));
  } else {
    var s = row[C.outlier_score];
    if (s !== null && s !== undefined) {
      var sc = el("div", "score");
      sc.appendChild(document.createTextNode("outlier score "));
      sc.appendChild(el("b", null, s.toFixed(1)));
      sc.appendChild(document.createTextNode(" \u2014 " + row[C.outlier_feature]));
      info.appendChild(sc);
      var chips = el("div", "chips");
      chipsOf(row).forEach(function (z) {
        var c = el("span", "chip " + zClass(z[2]), z[0] + " = " + fmt(z[1]) + " (z " + zText(z[2]) + ")");
        c.title = describe(z[0]);
        chips.appendChild(c);
      });
      info.appendChild(chips);
    } else {
      info.appendChild(el("div", "note", "no statistics"));
    }
    if (row[C.qc_note]) info.appendChild(el("div", "note", row[C.qc_note]));
  }
  var dl = el("dl", "cols");
  D.columns.forEach(function (c) {
    var v = row[C[c]];
    if (skipCols[c] || v === null || v === undefined || v === "") return;
    var kv = el("div", String(v).length > 30 ? "wide" : null);
    kv.appendChild(el("dt", null, c));
    kv.appendChild(el("dd", null, v));
    kv.title = c + ": " + v;
    dl.appendChild(kv);
  });
  info.appendChild(dl);
  if (!failed && zKeys.length) {
    var det = el("details"), sum = el("summary", null, "all statistics");
    det.appendChild(sum);
    det.addEventListener("toggle", function () {
      if (!det.open || det.querySelector("table")) return;
      var tb = el("table");
      zKeys.forEach(function (kz) {
        var tr = el("tr"); tr.appendChild(el("td", null, kz[0])); tr.appendChild(el("td", null, fmt(row[kz[1]])));
        var z = row[kz[2]]; tr.appendChild(el("td", z === null ? null : "chip " + zClass(z), z === null ? "" : "z " + zText(z)));
        tb.appendChild(tr);
      });
      det.appendChild(tb);
    });
    info.appendChild(det);
  }
  a.appendChild(info);
  return a;
}
function pager(box, total, pages) {
  box.replaceChildren();
  function btn(label, page, disabled) {
    var b = el("button", null, label); b.type = "button"; b.disabled = disabled;
    b.addEventListener("click", function () { go(page); }); box.appendChild(b);
  }
  btn("\u00ab first", 1, state.page <= 1);
  btn("\u2039 prev", state.page - 1, state.page <= 1);
  box.appendChild(document.createTextNode("page"));
  var inp = el("input"); inp.type = "number"; inp.min = 1; inp.max = pages; inp.value = state.page;
  inp.addEventListener("change", function () { go(parseInt(inp.value, 10) || 1); });
  box.appendChild(inp);
  box.appendChild(document.createTextNode("of " + pages));
  btn("next \u203a", state.page + 1, state.page >= pages);
  btn("last \u00bb", pages, state.page >= pages);
  var start = (state.page - 1) * state.size;
  box.appendChild(el("span", "shown", total ? ("cases " + (start + 1) + "\u2013" + Math.min(total, start + state.size)
    + " of " + total + (total < N ? " (filtered from " + N + ")" : "")) : "no case matches"));
}
function render() {
  var nf = view.failed.length, total = nf + view.ok.length;
  var pages = Math.max(1, Math.ceil(total / state.size));
  state.page = Math.min(Math.max(1, state.page), pages);
  var start = (state.page - 1) * state.size, end = Math.min(total, start + state.size);
  var frag = document.createDocumentFragment();
  for (var k = start; k < end; k++) {
    if (k === 0 && nf) frag.appendChild(el("div", "section bad", "Failed cases (" + nf + ")"));
    if (k === nf && view.ok.length) {
      var label = sortKeys.filter(function (s) { return s[0] === state.sort; })[0];
      frag.appendChild(el("div", "section", "Cases by " + (label ? label[1] : state.sort) + ", "
        + (state.dir === "asc" ? "ascending" : "descending") + " (" + view.ok.length + ")"));
    }
    frag.appendChild(k < nf ? card(view.failed[k], k) : card(view.ok[k - nf], k));
  }
  if (!total) frag.appendChild(el("div", "empty", "No case matches the filters."));
  $("list").replaceChildren(frag);
  pager($("pager-top"), total, pages);
  pager($("pager-bottom"), total, pages);
  syncControls();
  writeHash();
  document.body.setAttribute("data-ready", "1");
  if (!document.body.hasAttribute("data-first-render-ms")) {
    document.body.setAttribute("data-first-render-ms", String(Math.round(performance.now())));
  }
}
function go(page) { state.page = page; render(); window.scrollTo(0, 0); }
function update() { state.page = 1; recompute(); render(); }
sortSel.addEventListener("change", function () {
  state.sort = sortSel.value; state.dir = state.sort === "case_id" ? "asc" : "desc"; update();
});
$("dir").addEventListener("click", function () { state.dir = state.dir === "asc" ? "desc" : "asc"; update(); });
splitSel.addEventListener("change", function () { state.split = splitSel.value; update(); });
$("status").addEventListener("change", function () { state.status = $("status").value; update(); });
$("size").addEventListener("change", function () { state.size = parseInt($("size").value, 10) || 100; update(); });
var timer = null;
$("q").addEventListener("input", function () {
  clearTimeout(timer);
  timer = setTimeout(function () { state.q = $("q").value; update(); }, 150);
});
window.addEventListener("hashchange", function () {
  var before = JSON.stringify(state); readHash();
  if (JSON.stringify(state) !== before) { recompute(); render(); }
});
readHash();
recompute();
render();
})();
</script>
</body>
</html>
"""
