"""Choosing series from a scan (`volfm scan --cohort`): selection rules -> a cohort table for `volfm preprocess`.

Rules come from a YAML file (``--rules``) and/or flags (a flag replaces the file's key):

```yaml
per: study                 # one series per study (or: patient, series = every series that passes)
modality: CT               # one value or a list
orientation: axial         # axial, coronal, sagittal, oblique (one or a list)
image_type: ORIGINAL       # ORIGINAL, DERIVED or any
max_slice_thickness: 3.0   # mm (SliceThickness; the spacing between slices when the tag is absent)
min_slices: 20
contrast: any              # yes (ContrastBolusAgent present), no, any
prefer_kernels: [B30f, STANDARD, SOFT]   # ConvolutionKernel values, best first (case-insensitive)
```

Only usable series (see :mod:`volfm.io.dicomscan`) are candidates; a series that shares its folder with others is
one too, because the cohort row names it. Among a group's candidates the thinnest slices win, then the earliest
kernel in ``prefer_kernels`` (unlisted kernels after the listed ones), then the most slices, then the series UID (so
the choice is deterministic). Each chosen series becomes a row of :data:`COHORT_COLUMNS`: ``case_id, image,
image_series_uid, patient_id, study_uid, modality, selected_reason``; ``case_id`` is the group's id (the study UID,
patient id or series UID as the scan wrote it, hashed or not), made safe as a folder name; ``image`` is the absolute
series folder.

**Series columns.** A cohort table may name, for any input column ``<input>`` (``image``, ``pet``, ...), the DICOM
series to read from that input's folder in a column ``<input>_series_uid`` (:func:`series_column`): a
SeriesInstanceUID, or its 16-hex-digit hash as ``volfm scan --hash-uids`` writes it (the reader hashes the ids of
the folder's series to find it). Empty or absent: the folder's only series (the largest, with a warning, when there
are several). A series cell for an input that is not a DICOM folder fails that case with one line naming it. The
series id recorded in meta.json (``source.<input>.series_id``) is the cell's value, so a hashed table gives a store
without raw UIDs.

**Re-selection.** :func:`load_series_table` reads a series table that ``volfm scan --out`` wrote (only the columns
:data:`SELECTION_COLUMNS` are needed; ``acquisition_date`` and the others may have been dropped), checks it and
gives rows :func:`select_series` takes, so ``volfm scan ROOT --from-series series.csv --cohort cohort.csv`` chooses
again with other rules without walking the tree (``folder`` stays relative to ROOT).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import yaml

from volfm import VolfmError
from volfm.io.yamlfile import UniqueKeyLoader
from volfm.store.cohort import SERIES_SUFFIX, read_table, series_column
from volfm.utils import did_you_mean

ORIENTATIONS = ("axial", "coronal", "sagittal", "oblique")
PER = {"study": "study_uid", "patient": "patient_id", "series": "series_uid"}
DEFAULT_RULES = {"per": "study", "modality": [], "orientation": [], "image_type": "any", "max_slice_thickness": None,
                 "min_slices": None, "contrast": "any", "prefer_kernels": []}
COHORT_COLUMNS = ("case_id", "image", "image" + SERIES_SUFFIX, "patient_id", "study_uid", "modality",
                  "selected_reason")
# the series-table columns selection reads (volfm scan --from-series needs these; the others may be dropped)
SELECTION_COLUMNS = ("patient_id", "study_uid", "series_uid", "modality", "image_type", "original", "slice_count",
                     "slice_thickness", "spacing_between_slices", "orientation", "kernel", "contrast", "folder",
                     "usable", "reason")
_BOOL_COLUMNS = ("usable", "original", "contrast", "localizer")
_FLOAT_COLUMNS = ("slice_thickness", "spacing_between_slices")
_INT_COLUMNS = ("slice_count", "folder_series")


class SelectionError(VolfmError):
    pass


def _str_list(value, key: str, where: str, choices=None) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str | int | float) for v in items):
        raise SelectionError(f"{where}: key '{key}' must be a name or a list of names, got {value!r}")
    out = [str(v).strip() for v in items if str(v).strip()]
    for v in out:
        if choices is not None and v.lower() not in choices:
            raise SelectionError(f"{where}: key '{key}': {v!r} is not one of {', '.join(choices)}"
                                 f"{did_you_mean(v.lower(), choices)}")
    return [v.lower() for v in out] if choices is not None else out


def _number(value, key: str, where: str, integer: bool = False):
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (integer and not float(value).is_integer()):
        kind = "a positive whole number" if integer else "a positive number (mm)"
        raise SelectionError(f"{where}: key '{key}' must be {kind}, got {value!r}")
    return int(value) if integer else float(value)


def _choice(value, key: str, where: str, choices) -> str:
    v = str(value).strip().lower()
    if v not in choices:
        raise SelectionError(f"{where}: key '{key}': {value!r} is not one of {', '.join(choices)}"
                             f"{did_you_mean(v, choices)}")
    return v


def validate_rules(raw: dict, where: str) -> dict:
    """Rules with defaults filled in; an unknown key or a bad value raises one line naming ``where`` and the key."""
    if not isinstance(raw, dict):
        raise SelectionError(f"{where}: selection rules must be a mapping of keys ({', '.join(DEFAULT_RULES)}), "
                             f"got {type(raw).__name__}")
    for key in raw:
        if key not in DEFAULT_RULES:
            raise SelectionError(f"{where}: unknown key '{key}'{did_you_mean(key, DEFAULT_RULES)}; "
                                 f"known keys: {', '.join(DEFAULT_RULES)}")
    r = dict(DEFAULT_RULES)
    r.update({k: v for k, v in raw.items() if v is not None})
    return {"per": _choice(r["per"], "per", where, tuple(PER)),
            "modality": [m.upper() for m in _str_list(r["modality"], "modality", where)],
            "orientation": _str_list(r["orientation"], "orientation", where, ORIENTATIONS),
            "image_type": _choice(r["image_type"], "image_type", where, ("original", "derived", "any")),
            "max_slice_thickness": _number(r["max_slice_thickness"], "max_slice_thickness", where),
            "min_slices": _number(r["min_slices"], "min_slices", where, integer=True),
            "contrast": _choice(r["contrast"], "contrast", where, ("yes", "no", "any")),
            "prefer_kernels": _str_list(r["prefer_kernels"], "prefer_kernels", where)}


def load_rules(path=None, overrides: dict | None = None) -> dict:
    """Rules from a YAML file (optional) with ``overrides`` (flag values; None = not given) on top."""
    raw: dict = {}
    where = "selection rules"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise SelectionError(f"{path}: rules file not found")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise SelectionError(f"{path}: not valid YAML{at}: {' '.join(str(problem).split())}") from exc
        if not isinstance(raw, dict):
            raise SelectionError(f"{path}: selection rules must be a mapping of keys ({', '.join(DEFAULT_RULES)})")
        validate_rules(raw, where)  # the file's own errors name the file
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given:
        where = f"{where} with flags {', '.join(sorted(given))}" if path is not None else "flags"
    return validate_rules({**raw, **given}, where)


def _as_bool(v) -> bool:
    return v is True or str(v).strip().lower() in ("true", "1", "yes")


def _as_float(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _thickness(row):
    t = _as_float(row.get("slice_thickness"))
    return t if t is not None else _as_float(row.get("spacing_between_slices"))


def _why_not(row: dict, rules: dict) -> str | None:
    if not _as_bool(row.get("usable")):
        return f"not usable ({row.get('reason')})"
    if rules["modality"] and str(row.get("modality", "")).upper() not in rules["modality"]:
        return f"modality {row.get('modality')}"
    if rules["orientation"] and row.get("orientation") not in rules["orientation"]:
        return f"orientation {row.get('orientation')}"
    if rules["image_type"] != "any" and _as_bool(row.get("original")) != (rules["image_type"] == "original"):
        return f"image type {row.get('image_type')}"
    t = _thickness(row)
    if rules["max_slice_thickness"] is not None and (t is None or t > rules["max_slice_thickness"] + 1e-6):
        return f"slice thickness {t} mm"
    if rules["min_slices"] is not None and int(_as_float(row.get("slice_count")) or 0) < rules["min_slices"]:
        return f"{row.get('slice_count')} slices"
    if rules["contrast"] != "any" and _as_bool(row.get("contrast")) != (rules["contrast"] == "yes"):
        return "contrast" if _as_bool(row.get("contrast")) else "no contrast"
    return None


def _kernel_rank(row: dict, kernels: list[str]) -> int:
    values = [k.strip().lower() for k in str(row.get("kernel") or "").split("\\")]
    ranks = [i for i, k in enumerate(kernels) if k.lower() in values]
    return min(ranks) if ranks else len(kernels)


def _rules_text(rules: dict) -> str:
    parts = [", ".join(rules["modality"])] if rules["modality"] else []
    parts += [", ".join(rules["orientation"])] if rules["orientation"] else []
    parts += [rules["image_type"].upper()] if rules["image_type"] != "any" else []
    if rules["max_slice_thickness"] is not None:
        parts.append(f"thickness <= {rules['max_slice_thickness']:g} mm")
    if rules["min_slices"] is not None:
        parts.append(f">= {rules['min_slices']} slices")
    if rules["contrast"] != "any":
        parts.append(f"contrast {rules['contrast']}")
    return "; ".join(parts) or "usable"


def select_series(rows: list[dict], rules: dict) -> tuple[list[dict], list[str]]:
    """The chosen series rows (each with ``selected_reason``), one per group of ``rules['per']``, and a line per
    group that has no candidate."""
    key = PER[rules["per"]]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[str(r.get(key) or "")].append(r)
    chosen, unmatched = [], []
    kernels = rules["prefer_kernels"]
    for gid, members in groups.items():
        cands = [r for r in members if _why_not(r, rules) is None]
        if not cands:
            why = "; ".join(sorted({f"{r.get('folder')}: {_why_not(r, rules)}" for r in members}))
            unmatched.append(f"{rules['per']} {gid}: no series passes the rules ({why})")
            continue
        cands.sort(key=lambda r: (_thickness(r) if _thickness(r) is not None else math.inf, _kernel_rank(r, kernels),
                                  -int(_as_float(r.get("slice_count")) or 0), str(r.get("series_uid"))))
        best = cands[0]
        t = _thickness(best)
        why = [f"{len(cands)} candidate(s) of {len(members)} series ({_rules_text(rules)})",
               f"thinnest: {t:g} mm" if t is not None else "no slice thickness"]
        if kernels:
            rank = _kernel_rank(best, kernels)
            why.append(f"kernel {best.get('kernel') or '(none)'}"
                       + (f" (preferred #{rank + 1})" if rank < len(kernels) else " (not in prefer_kernels)"))
        chosen.append({**best, "selected_reason": "; ".join(why)})
    return chosen, unmatched


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def case_id_for(value: str) -> str:
    """A group id made safe as a case id (letters, digits, '.', '_', '-'; starting with a letter or digit)."""
    cid = _UNSAFE.sub("_", str(value).strip()).lstrip("._-")
    return cid or "unnamed"


def cohort_rows(chosen: list[dict], root, rules: dict) -> list[dict]:
    """Rows of a cohort table for `volfm preprocess --cohort`: ``image`` is the absolute series folder and
    ``image_series_uid`` the series (as the scan wrote it, hashed or not), so folders holding several series work."""
    root = Path(root).absolute()
    key = PER[rules["per"]]
    out, seen = [], defaultdict(int)
    for r in chosen:
        cid = case_id_for(r.get(key) or "")
        seen[cid] += 1
        if seen[cid] > 1:  # two ids that differ only in unsafe characters
            cid = f"{cid}-{seen[cid]}"
        out.append({"case_id": cid, "image": str(root / r["folder"]), series_column("image"): r.get("series_uid", ""),
                    "patient_id": r.get("patient_id", ""), "study_uid": r.get("study_uid", ""),
                    "modality": r.get("modality", ""), "selected_reason": r["selected_reason"]})
    return out


def _typed(value: str, column: str, path: Path, n: int):
    """A series-table cell as the scan wrote it: bools, whole numbers, numbers or empty; else one line naming the
    file, row and column."""
    v = (value or "").strip()
    if column in _BOOL_COLUMNS:
        if v.lower() in ("true", "1", "yes"):
            return True
        if v.lower() in ("false", "0", "no"):
            return False
        kind = "True or False"
    elif column in _INT_COLUMNS:
        f = _as_float(v)
        if f is not None and f >= 0 and f.is_integer():
            return int(f)
        kind = "a whole number >= 0"
    else:  # _FLOAT_COLUMNS: empty when the scan had no value
        if not v:
            return None
        f = _as_float(v)
        if f is not None and f > 0:
            return f
        kind = "a positive number or empty"
    raise SelectionError(f"{path}: row {n}, column '{column}': {value!r} is not {kind}; use the series table "
                         "volfm scan --out wrote, or fix the cell")


def load_series_table(path) -> list[dict]:
    """Rows of a series table written by ``volfm scan --out``, checked and typed for :func:`select_series`.

    A missing file, a table without rows, a missing column of :data:`SELECTION_COLUMNS`, an empty ``series_uid`` or
    ``folder``, a repeated ``series_uid`` or a cell that is not what the scan writes (``usable``, ``original``,
    ``contrast``: True/False; ``slice_count``: a whole number; thickness and spacing: a number or empty) raise one
    line naming the file (and the row and column)."""
    path = Path(path)
    if not path.is_file():
        raise SelectionError(f"{path}: series table not found; write one with volfm scan ROOT --out {path.name}")
    rows = read_table(path)
    if not rows:
        raise SelectionError(f"{path}: series table has no rows")
    columns = [c for c in rows[0] if c is not None]
    missing = [c for c in SELECTION_COLUMNS if c not in columns]
    if missing:
        raise SelectionError(f"{path}: column(s) {', '.join(repr(c) for c in missing)} missing (columns: "
                             f"{', '.join(columns)}); --from-series takes a series table written by volfm scan --out")
    out, seen = [], {}
    for n, row in enumerate(rows, start=2):
        if any((x or "").strip() for x in row.get(None) or []):
            raise SelectionError(f"{path}: row {n} has more cells than the header has columns; quote cells that "
                                 "contain the delimiter")
        r = {k: ("" if v is None else v) for k, v in row.items() if k is not None}
        for col in ("series_uid", "folder"):
            if not r[col].strip():
                raise SelectionError(f"{path}: row {n}, column '{col}' is empty; every series needs one")
        uid = r["series_uid"].strip()
        if uid in seen:
            raise SelectionError(f"{path}: series_uid {uid} on rows {seen[uid]} and {n}; a series is one row")
        seen[uid] = n
        for col in (*_BOOL_COLUMNS, *_INT_COLUMNS, *_FLOAT_COLUMNS):
            if col in r and (col in SELECTION_COLUMNS or r[col].strip()):
                r[col] = _typed(r[col], col, path, n)
        r["series_uid"], r["folder"] = uid, r["folder"].strip()
        out.append(r)
    return out
