"""Cohort tables: CSV/TSV with case_id, one column per input file, and free metadata columns.

Relative paths are resolved against the table's own folder. A ``report`` cell that names an
existing .txt file is replaced by the file's text.
"""
from __future__ import annotations

import csv
import math
import re
import warnings
from pathlib import Path

from volfm import VolfmError
from volfm.io.atomic import atomic_path
from volfm.io.readers import IMAGE_SUFFIXES
from volfm.utils import did_you_mean

KNOWN_META = ("icd_codes", "report", "split")
SERIES_SUFFIX = "_series_uid"  # column <input>_series_uid: which DICOM series of that input's folder to read
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CohortError(VolfmError):
    pass


def series_column(input_name: str) -> str:
    """The cohort column that names the DICOM series of input ``input_name``: ``image`` -> ``image_series_uid``
    (a SeriesInstanceUID, or its 16-hex hash as ``volfm scan --hash-uids`` writes it)."""
    return f"{input_name}{SERIES_SUFFIX}"


def parse_icd_codes(cell) -> list[str]:
    """A case's ICD codes as a list: ``'K76.0; I10;'`` -> ``['K76.0', 'I10']`` (';'-separated, stripped, empty
    parts dropped); an iterable of codes is stripped likewise; None/NaN (cell or item) means no codes."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return []
    if isinstance(cell, str):
        return [c.strip() for c in cell.split(";") if c.strip()]
    out = []
    for c in cell:
        if c is None or (isinstance(c, float) and math.isnan(c)):
            continue
        s = str(c).strip()
        if s:
            out.append(s)
    return out


def _dialect(path: Path) -> str:
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def read_table(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise CohortError(f"{path}: cohort table not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, delimiter=_dialect(path)))
    except UnicodeDecodeError as exc:
        raise CohortError(f"{path}: not a UTF-8 text table ({exc.reason} at byte {exc.start}); "
                          "save it as CSV/TSV in UTF-8") from exc
    except csv.Error as exc:
        raise CohortError(f"{path}: not a readable CSV/TSV table ({exc})") from exc
    return rows


def write_table(path, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", delimiter=_dialect(Path(path)))
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def _looks_like_image(value: str) -> bool:
    return value.lower().endswith(IMAGE_SUFFIXES)


def load_cohort(path, spec: dict) -> list[dict]:
    """Read and check a cohort table against a spec; returns rows with absolute input paths.

    Table-level problems (no case_id column, duplicate or unsafe ids, a required input column
    missing, a ``<x>_series_uid`` column whose ``x`` is neither an input of the spec nor a column) raise
    CohortError naming the table; per-case problems (empty cell, missing file) are
    left for the runner to record as that case's failure.
    """
    path = Path(path)
    rows = read_table(path)
    if not rows:
        raise CohortError(f"{path}: cohort table has no rows")
    columns = [c for c in rows[0].keys() if c is not None]
    if "case_id" not in columns:
        raise CohortError(f"{path}: no 'case_id' column (columns: {', '.join(columns)}); add one with a unique id per case")
    inputs = spec["inputs"]
    missing = [c for c, cfg in inputs.items() if cfg["required"] and c not in columns]
    if missing:
        raise CohortError(f"{path}: column(s) {', '.join(missing)} required by spec '{spec['name']}' are missing "
                          f"(columns: {', '.join(columns)}); rename the column or edit the spec's inputs")
    # a series column of no input would be ignored, the folder's largest series read: a typo (imag_series_uid)
    # fails the table; one of an input column the spec does not use (pet_series_uid beside pet) is metadata
    stray = [c for c in columns if c.endswith(SERIES_SUFFIX) and c[: -len(SERIES_SUFFIX)] not in inputs
             and c[: -len(SERIES_SUFFIX)] not in columns]
    if stray:
        wanted = [series_column(k) for k in inputs]
        raise CohortError(f"{path}: column {stray[0]!r} names the DICOM series of no input of spec '{spec['name']}' "
                          f"(inputs: {', '.join(inputs)}){did_you_mean(stray[0], wanted)}; rename it to "
                          f"<input>{SERIES_SUFFIX} ({', '.join(wanted)}) or drop it")
    seen: dict[str, int] = {}
    for n, row in enumerate(rows, start=2):
        cid = (row.get("case_id") or "").strip()
        if not cid:
            raise CohortError(f"{path}: row {n} has an empty case_id")
        if not _CASE_ID.match(cid):
            raise CohortError(f"{path}: row {n}: case_id {cid!r} must be letters, digits, '.', '_' or '-' "
                              "(it becomes a folder name)")
        if cid in seen:
            raise CohortError(f"{path}: duplicate case_id {cid!r} on rows {seen[cid]} and {n}; case ids must be unique")
        if any((x or "").strip() for x in row.get(None) or []):
            raise CohortError(f"{path}: row {n} (case {cid}) has {len(columns) + len(row[None])} cells but the header "
                              f"has {len(columns)} columns; quote cells that contain the delimiter (e.g. a report "
                              "with commas)")
        seen[cid] = n
        row["case_id"] = cid
    unknown_images = [c for c in columns if c not in inputs and c != "case_id"
                      and any(_looks_like_image((r.get(c) or "").strip()) for r in rows)]
    if unknown_images:
        warnings.warn(f"{path}: column(s) {', '.join(unknown_images)} hold image paths but spec '{spec['name']}' "
                      "has no input for them; they are carried as metadata only. Add them to the spec's inputs "
                      "to preprocess them.", UserWarning, stacklevel=2)
    base = path.absolute().parent
    out = []
    for row in rows:
        r = {k: (v if v is not None else "") for k, v in row.items() if k is not None}
        for c in inputs:
            v = (r.get(c) or "").strip()
            if v:
                p = Path(v).expanduser()
                r[c] = str(p if p.is_absolute() else (base / p))
        rep = (r.get("report") or "").strip()
        if rep.lower().endswith(".txt"):
            p = Path(rep) if Path(rep).is_absolute() else base / rep
            if p.exists():
                r["report"] = p.read_text(encoding="utf-8", errors="replace").strip()
        out.append(r)
    return out


def table_from_dir(folder, spec: dict) -> list[dict]:
    """Build a cohort from a folder of images (nnU-Net style imagesTr/labelsTr or flat).

    Each image file (or DICOM sub-folder) becomes a case named after its file stem (nnU-Net's
    ``_0000`` channel suffix dropped); a file of the same name in labels/ or labelsTr/ is its label.
    """
    folder = Path(folder).expanduser().absolute()
    if not folder.is_dir():
        raise CohortError(f"{folder}: --input-dir is not a folder")
    img_dir = next((folder / d for d in ("imagesTr", "images") if (folder / d).is_dir()), folder)
    lab_dir = next((folder / d for d in ("labelsTr", "labels") if (folder / d).is_dir()), None)
    ref = spec["reference"]
    rows = []
    for p in sorted(img_dir.iterdir()):
        name = p.name
        if name.startswith("."):  # hidden files, e.g. macOS "._case.nii.gz" resource forks
            continue
        if p.is_dir():
            if lab_dir is not None and p == lab_dir:
                continue
            if not any(f.is_file() for f in p.iterdir()):
                continue
            stem = name
        elif _looks_like_image(name):
            stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else p.stem
        else:
            continue
        cid = re.sub(r"_0000$", "", stem)
        row = {"case_id": cid, ref: str(p)}
        if lab_dir is not None and "label" in spec["inputs"]:
            cands = [f for f in lab_dir.iterdir() if f.name.startswith(cid + ".") or f.name == cid]
            if cands:
                row["label"] = str(cands[0])
        rows.append(row)
    if not rows:
        raise CohortError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM folders)")
    ids = [r["case_id"] for r in rows]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise CohortError(f"{folder}: several files map to the same case id(s) {', '.join(dups)}; rename them")
    return rows
