"""ICD-10-CM class vocabularies for the ICD-code multi-label pretext task.

Each training case carries ICD-10-CM codes (the cohort manifest's ``icd_codes`` column, ';'-separated,
e.g. ``"K76.0;I10"``). :class:`IcdVocabulary` turns them into a fixed list of classes, either by
rolling every code up the ICD-10-CM hierarchy (``level``: ``"full"``, ``"category"``, ``"block"`` or
``"chapter"``, using :mod:`simple_icd_10_cm`) or through a user-supplied mapping table (e.g. a Phecode
map, matched by the longest code prefix), and encodes a case's codes as a multi-hot vector.

Bad input never stops a run: malformed codes, well-formed codes that ICD-10-CM does not know, codes a
mapping table does not cover and classes seen in fewer than ``min_count`` cases are ignored, counted
in :attr:`IcdVocabulary.stats` and reported by :meth:`IcdVocabulary.summary`.

Notes on :mod:`simple_icd_10_cm` (1.5, ICD-10-CM April 2026 release) that shape this module:

* ``is_valid_item`` is case- and whitespace-sensitive (``"k76.0"`` and ``" K76.0"`` are invalid) and
  also accepts chapters (``"11"``) and blocks (``"K80-K87"``), so codes are shape-checked first.
* ``add_dot`` raises ``ValueError`` for codes not in the release, so well-formed unknown codes are
  dotted here by hand (a dot after the third character).
* 78 items are both a category and a block of the same name (e.g. ``"C50"``, ``"B99"``):
  ``get_ancestors("C50.911")`` lists ``"C50"`` twice (category, then block).
* ICD-10-CM has no nested blocks, so each code has at most one block ancestor.
"""
from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import simple_icd_10_cm as _icd

from volfm import VolfmError
from volfm.io.atomic import write_json_atomic
from volfm.store.cohort import parse_icd_codes

__all__ = ["LEVELS", "normalize_code", "normalize_code_prefix", "roll_up", "describe", "load_mapping", "IcdMapping",
           "IcdVocabulary"]

LEVELS = ("full", "category", "block", "chapter")
_MAPPING_LEVEL = "mapping"
_FORMAT = "volfm.icd_vocabulary"
_FORMAT_VERSION = 1
_N_EXAMPLES = 5
_SHAPE = re.compile(r"[A-Z][0-9][0-9A-Z]{1,5}")
_STRIP = re.compile(r"[\s.]+")

# Header names auto-detected in mapping tables (compared case-insensitively, '-'/' ' read as '_').
_CODE_COLUMNS = ("icd10cm", "icd10_cm", "icd_10_cm", "icd10", "icd_10", "icd10cm_code", "icd10_code",
                 "icd_code", "icd", "code", "source", "source_code")
_TARGET_COLUMNS = ("phecode", "phe_code", "target", "target_code", "class", "class_id", "label", "group",
                   "category", "mapped_code")
_DESC_SUFFIXES = ("_str", "_string", "_description", "_desc", "_name", "_label")
_DESC_COLUMNS = ("target_description", "description", "desc")


def _icd_release() -> str:
    try:
        data_dir = Path(_icd.__file__).parent / "data"
        names = sorted(p.name for p in data_dir.glob("code-list-*.txt"))
        return names[-1][len("code-list-"):-len(".txt")] if names else "unknown"
    except Exception:  # pragma: no cover - only provenance
        return "unknown"


def _lib_version() -> str:
    try:
        return version("simple_icd_10_cm")
    except Exception:  # pragma: no cover - only provenance
        return "unknown"


# ---------------------------------------------------------------------------------------------- codes
def normalize_code(code) -> str | None:
    """Canonical dotted ICD-10-CM code, or None when ``code`` does not have an ICD-10-CM shape.

    Strips, uppercases and drops dots/whitespace, checks the shape (a letter, a digit, then 1-5
    letters/digits) and puts the dot back after the third character: ``"k760"``, ``" K76.0 "`` ->
    ``"K76.0"``; ``"K8020"`` -> ``"K80.20"``; ``"J90"`` -> ``"J90"``; ``""``, ``"12.3"``, ``"hello"``,
    ``"K7"`` -> None. Whether the code exists in ICD-10-CM is not checked here (see :func:`roll_up`).
    """
    if not isinstance(code, str):
        return None
    flat = normalize_code_prefix(code)
    if not _SHAPE.fullmatch(flat):
        return None
    if _icd.is_valid_item(flat):
        return _icd.add_dot(flat)
    return flat if len(flat) == 3 else f"{flat[:3]}.{flat[3:]}"


def normalize_code_prefix(code) -> str:
    """ICD-10-CM code or code prefix in the undotted form used for prefix matching, without checking its shape:
    whitespace and dots dropped, uppercased (``" k80.20 "`` -> ``"K8020"``, ``"K80.2"`` -> ``"K802"``)."""
    return _STRIP.sub("", str(code)).upper()


def roll_up(code: str, level: str) -> str | None:
    """The class of a normalized code at ``level``, or None when ICD-10-CM does not know the code.

    ``"full"``: the code itself (``"K80.20"``); ``"category"``: its 3-character category (``"K80"``);
    ``"block"``: its block (``"K80-K87"``); ``"chapter"``: its chapter number (``"11"``). Un-normalized
    input is normalized first; malformed input gives None. An unknown ``level`` is a VolfmError.
    """
    _check_level(level)
    norm = normalize_code(code)
    if norm is None or not _icd.is_valid_item(norm):
        return None
    if level == "full":
        return norm
    ancestors = _icd.get_ancestors(norm)
    if level == "chapter":
        return ancestors[-1] if ancestors else None
    if level == "category":
        for item in [norm, *ancestors]:
            if _icd.is_category(item):
                return item
        return None
    # block: the nearest block ancestor (for 'C50'-style items, a block of the same name as the category)
    for item in ancestors:
        if _icd.is_block(item):
            return item
    return None


def describe(class_id: str, level: str) -> str:
    """simple_icd_10_cm's description of a class at ``level`` ('' when it has none)."""
    try:
        return _icd.get_description(class_id, prioritize_blocks=(level == "block"))
    except Exception:
        return ""


def _check_level(level, allow_mapping: bool = False) -> None:
    valid = LEVELS + ((_MAPPING_LEVEL,) if allow_mapping else ())
    if level not in valid:
        raise VolfmError(f"unknown ICD level {level!r}; valid levels: {', '.join(valid)}")


# ------------------------------------------------------------------------------------------- mapping
class IcdMapping:
    """A code -> targets table matched by the longest code prefix.

    ``entries`` maps an undotted normalized code prefix (``"K8020"``, ``"K80"``) to its targets. A code is
    looked up by its longest prefix present in the table, so an entry ``"K80"`` covers ``"K80.20"`` unless
    a more specific entry exists; one code may map to several targets.
    """

    def __init__(self, entries: dict[str, list[str]], descriptions: dict[str, str] | None = None,
                 info: dict | None = None):
        self.entries = {k: list(v) for k, v in entries.items()}
        self.descriptions = dict(descriptions or {})
        self.info = dict(info or {})
        self._max_len = max((len(k) for k in self.entries), default=0)

    def lookup(self, code: str) -> list[str] | None:
        """Targets of a normalized (dotted or not) code by longest prefix; None when no entry covers it."""
        flat = normalize_code_prefix(code)
        for n in range(min(len(flat), self._max_len), 2, -1):
            hit = self.entries.get(flat[:n])
            if hit is not None:
                return hit
        return None

    def __len__(self) -> int:
        return len(self.entries)


def _canon(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _find_column(header: list[str], wanted: str) -> str | None:
    if wanted in header:
        return wanted
    hits = [h for h in header if _canon(h) == _canon(wanted)]
    return hits[0] if len(hits) == 1 else None


def _detect(header: list[str], candidates: Sequence[str], exclude: Sequence[str] = ()) -> str | None:
    canon = {}
    for h in header:
        if h not in exclude:
            canon.setdefault(_canon(h), h)
    for cand in candidates:
        if cand in canon:
            return canon[cand]
    return None


def _read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    except OSError as e:
        raise VolfmError(f"cannot read ICD mapping table {path}: {e}") from e
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None:
        raise VolfmError(f"ICD mapping table {path} is empty; it needs a header row (e.g. 'icd10cm,phecode') "
                         "and one row per code")
    if path.suffix.lower() in (".tsv", ".tab"):
        delim = "\t"
    else:
        counts = {d: first.count(d) for d in (",", "\t", ";", "|")}
        delim = max(counts, key=counts.get) if max(counts.values()) > 0 else ","
    rows = [r for r in csv.reader(lines, delimiter=delim) if any(c.strip() for c in r)]
    header = [h.strip() for h in rows[0]]
    return header, rows[1:]


def load_mapping(path, columns: Sequence[str] | None = None) -> IcdMapping:
    """Read a CSV/TSV mapping table with a header (e.g. a Phecode map) into an :class:`IcdMapping`.

    ``columns``: ``(code_column, target_column)`` or ``(code_column, target_column, description_column)``
    header names; None auto-detects them (codes: ``icd10cm``/``ICD10CM``/``icd10``/``code``...; targets:
    ``phecode``/``target``/``class``...; description: ``<target>_str``/``description``... when present).
    Header names match case-insensitively. Codes are normalized like :func:`normalize_code`; rows whose
    code is malformed or whose target is empty are skipped and counted in ``IcdMapping.info``.
    """
    path = Path(path)
    if not path.exists():
        raise VolfmError(f"ICD mapping table {path} does not exist; pass the path of a CSV/TSV file with a "
                         "header, e.g. a Phecode map with columns 'icd10cm' and 'phecode'")
    if not path.is_file():
        raise VolfmError(f"ICD mapping table {path} is not a file; pass the path of a CSV/TSV file")
    header, rows = _read_table(path)
    hint = ("pass mapping_columns=(code_column, target_column) or (code_column, target_column, "
            "description_column) naming columns of that header")
    desc_col = None
    if columns is not None:
        if isinstance(columns, str) or len(columns) not in (2, 3):
            raise VolfmError(f"mapping_columns must be 2 or 3 column names (code, target[, description]), "
                             f"got {columns!r}; the header of {path} is {header}")
        found = [_find_column(header, str(c)) for c in columns]
        missing = [c for c, f in zip(columns, found) if f is None]
        if missing:
            raise VolfmError(f"ICD mapping table {path} has no column(s) {missing}; its header is {header}; "
                             f"{hint}")
        code_col, target_col = found[0], found[1]
        desc_col = found[2] if len(found) == 3 else None
    else:
        code_col = _detect(header, _CODE_COLUMNS)
        target_col = _detect(header, _TARGET_COLUMNS, exclude=(code_col,) if code_col else ())
        if code_col is None or target_col is None:
            which = " and ".join(w for w, c in (("the ICD-10-CM code column", code_col),
                                                  ("the target column", target_col)) if c is None)
            raise VolfmError(f"cannot tell {which} of ICD mapping table {path}; its header is {header}; {hint}")
        t = _canon(target_col)
        desc_col = _detect(header, [t + s for s in _DESC_SUFFIXES] + list(_DESC_COLUMNS),
                           exclude=(code_col, target_col))
    ci, ti = header.index(code_col), header.index(target_col)
    di = header.index(desc_col) if desc_col is not None else None

    entries: dict[str, list[str]] = {}
    descriptions: dict[str, str] = {}
    malformed: list[str] = []
    n_malformed = n_empty = 0
    for row in rows:
        code = row[ci].strip() if ci < len(row) else ""
        target = row[ti].strip() if ti < len(row) else ""
        if not target:
            n_empty += 1
            continue
        norm = normalize_code(code)
        if norm is None:
            n_malformed += 1
            if code not in malformed and len(malformed) < _N_EXAMPLES:
                malformed.append(code)
            continue
        targets = entries.setdefault(normalize_code_prefix(norm), [])
        if target not in targets:
            targets.append(target)
        if di is not None and di < len(row) and row[di].strip() and target not in descriptions:
            descriptions[target] = row[di].strip()
    if not entries:
        raise VolfmError(f"ICD mapping table {path} has no usable rows (code column {code_col!r}, target "
                         f"column {target_col!r}; {len(rows)} data rows, {n_malformed} with a malformed code, "
                         f"{n_empty} with no target); check the columns or the file")
    info = {"path": str(path), "code_column": code_col, "target_column": target_col,
            "description_column": desc_col, "rows": len(rows), "codes": len(entries),
            "targets": len({t for v in entries.values() for t in v}),
            "malformed_rows": {"count": n_malformed, "examples": malformed}, "rows_without_target": n_empty}
    return IcdMapping(entries, descriptions, info)


# ---------------------------------------------------------------------------------------- vocabulary
class _Tally:
    def __init__(self):
        self.count = 0
        self.unique: set[str] = set()
        self.examples: list[str] = []

    def add(self, code: str) -> None:
        self.count += 1
        if code not in self.unique:
            self.unique.add(code)
            if len(self.examples) < _N_EXAMPLES:
                self.examples.append(code)

    def as_dict(self) -> dict:
        return {"count": self.count, "unique": len(self.unique), "examples": list(self.examples)}


def _empty_tally() -> dict:
    return {"count": 0, "unique": 0, "examples": []}


class IcdVocabulary:
    """A fixed, sorted list of ICD-derived classes and the code -> multi-hot encoding.

    Build it from the training cases with :meth:`build`; save it with :meth:`to_json` next to the model
    so that validation/test cases and inference are encoded with the same classes.

    Attributes: ``classes`` (sorted class ids), ``counts`` (class -> number of training cases with it),
    ``descriptions`` (class -> text), ``level`` (``"full"``/``"category"``/``"block"``/``"chapter"``, or
    ``"mapping"`` when built with a mapping table), ``min_count`` and ``stats`` (see :meth:`build`).
    """

    def __init__(self, classes: Sequence[str], level: str, *, counts: dict[str, int] | None = None,
                 descriptions: dict[str, str] | None = None, min_count: int = 1, stats: dict | None = None,
                 mapping: IcdMapping | None = None, source: str = ""):
        _check_level(level, allow_mapping=True)
        if level == _MAPPING_LEVEL and mapping is None:
            raise VolfmError("an ICD vocabulary at level 'mapping' needs its mapping table")
        self.classes = list(classes)
        if len(set(self.classes)) != len(self.classes):
            raise VolfmError(f"ICD vocabulary{' of ' + source if source else ''} has duplicate classes")
        self.level = level
        self.counts = {c: int((counts or {}).get(c, 0)) for c in self.classes}
        self.descriptions = {c: str((descriptions or {}).get(c, "")) for c in self.classes}
        self.min_count = int(min_count)
        self.stats = dict(stats or {})
        self.mapping = mapping
        self.source = source
        self._index = {c: i for i, c in enumerate(self.classes)}
        self._memo: dict[str, tuple[int, ...]] = {}

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, code_lists: Iterable, level: str = "category", mapping=None,
              mapping_columns: Sequence[str] | None = None, min_count: int = 1,
              source: str = "training cases") -> IcdVocabulary:
        """Build the vocabulary from each training case's codes.

        code_lists: one entry per case: a list of codes or a raw ';'-separated manifest cell (None/'' for
        a case without codes). level: how codes become classes without a mapping table (``"full"``,
        ``"category"``, ``"block"``, ``"chapter"``). mapping: a CSV/TSV table (path) or an
        :class:`IcdMapping`; when given, its targets are the classes and ``level`` is ignored (recorded as
        ``"mapping"``). mapping_columns: see :func:`load_mapping`. min_count: drop classes present in
        fewer cases. source: a name used in messages (e.g. the store path).

        ``stats``: ``cases``; ``cases_without_codes``; ``cases_without_classes`` (no kept class);
        ``codes`` (code entries seen); ``malformed``/``unknown`` (well-formed but not in ICD-10-CM; only
        without a mapping table)/``unmapped`` (not covered by the mapping table) as ``{count, unique,
        examples}``; ``classes_before_min_count``; ``dropped_classes`` ``{count, examples}``; and
        ``mapping`` (the table's info) when one is used.
        """
        if isinstance(level, str):
            level = level.strip().lower()
        _check_level(level, allow_mapping=True)
        if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
            raise VolfmError(f"min_count must be an integer >= 1, got {min_count!r}")
        min_count = int(min_count)
        if mapping is not None and not isinstance(mapping, IcdMapping):
            mapping = load_mapping(mapping, mapping_columns)
        if mapping is not None:
            level = _MAPPING_LEVEL
        elif level == _MAPPING_LEVEL:
            raise VolfmError(f"ICD level 'mapping' needs a mapping table (mapping=path); without one use one "
                             f"of {', '.join(LEVELS)}")

        malformed, unknown, unmapped = _Tally(), _Tally(), _Tally()
        case_counts: Counter = Counter()
        per_case: list[set[str]] = []
        n_cases = n_no_codes = n_codes = 0
        memo: dict[str, tuple[str, tuple[str, ...]]] = {}
        for case in code_lists:
            n_cases += 1
            codes = parse_icd_codes(case)
            if not codes:
                n_no_codes += 1
            found: set[str] = set()
            for raw in codes:
                n_codes += 1
                hit = memo.get(raw)
                if hit is None:
                    hit = memo[raw] = _classify(raw, level, mapping)
                status, targets = hit
                if status == "malformed":
                    malformed.add(raw)
                elif status == "unknown":
                    unknown.add(normalize_code(raw) or raw)
                elif status == "unmapped":
                    unmapped.add(normalize_code(raw) or raw)
                found.update(targets)
            per_case.append(found)
            case_counts.update(found)

        kept = sorted(c for c, n in case_counts.items() if n >= min_count)
        dropped = sorted((c for c, n in case_counts.items() if n < min_count), key=lambda c: (case_counts[c], c))
        name = f" of {source}" if source else ""
        if not kept:
            if case_counts:
                raise VolfmError(
                    f"ICD vocabulary{name} is empty: {len(case_counts)} classes at level {level!r} before the "
                    f"min_count filter, none in at least {min_count} cases (the most frequent is in "
                    f"{max(case_counts.values())}); lower min_count or use a coarser level")
            raise VolfmError(
                f"ICD vocabulary{name} is empty: 0 classes at level {level!r} from {n_cases} cases "
                f"({n_no_codes} without codes, {n_codes} codes: {malformed.count} malformed, "
                f"{unknown.count} not in ICD-10-CM, {unmapped.count} not in the mapping table); check the "
                f"icd_codes column" + (" and the mapping table's columns" if mapping is not None else ""))
        kept_set = set(kept)
        stats = {
            "source": source,
            "cases": n_cases,
            "cases_without_codes": n_no_codes,
            "cases_without_classes": sum(1 for s in per_case if not (s & kept_set)),
            "codes": n_codes,
            "malformed": malformed.as_dict(),
            "unknown": unknown.as_dict(),
            "unmapped": unmapped.as_dict(),
            "classes_before_min_count": len(case_counts),
            "dropped_classes": {"count": len(dropped), "examples": dropped[:_N_EXAMPLES]},
            "icd10cm_release": _icd_release(),
            "simple_icd_10_cm": _lib_version(),
        }
        if mapping is not None:
            stats["mapping"] = dict(mapping.info)
            descriptions = {c: mapping.descriptions.get(c, "") for c in kept}
            mapping = _trim_mapping(mapping, kept_set)
        else:
            descriptions = {c: describe(c, level) for c in kept}
        return cls(kept, level, counts={c: case_counts[c] for c in kept}, descriptions=descriptions,
                   min_count=min_count, stats=stats, mapping=mapping, source=source)

    # -- encoding -------------------------------------------------------------------------------
    def _indices(self, raw: str) -> tuple[int, ...]:
        hit = self._memo.get(raw)
        if hit is None:
            _, targets = _classify(raw, self.level, self.mapping)
            hit = tuple(sorted(self._index[t] for t in set(targets) if t in self._index))
            if len(self._memo) < 1_000_000:
                self._memo[raw] = hit
        return hit

    def encode(self, codes) -> np.ndarray:
        """Multi-hot float32 vector ``(len(self),)`` of a case's codes (a list or a ';'-separated string).

        Malformed, unknown, unmapped and dropped (rare) codes are ignored; this never raises on codes.
        """
        out = np.zeros(len(self.classes), dtype=np.float32)
        for raw in parse_icd_codes(codes):
            for i in self._indices(raw):
                out[i] = 1.0
        return out

    def encode_many(self, code_lists: Iterable) -> np.ndarray:
        """``(N, len(self))`` float32 multi-hot matrix, one row per case."""
        rows = [self.encode(c) for c in code_lists]
        if not rows:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.stack(rows)

    def decode(self, x, threshold: float = 0.5) -> list[str]:
        """Class ids of a multi-hot/score vector or of class indices.

        A float or bool vector of length ``len(self)`` gives the classes whose value is > ``threshold``
        (True for bool); an integer array/sequence is read as class indices (so pass an integer multi-hot
        as float or bool).
        """
        if hasattr(x, "detach"):  # a torch tensor
            x = x.detach().cpu().numpy()
        arr = np.asarray(x)
        if arr.dtype == bool or np.issubdtype(arr.dtype, np.floating):
            arr = arr.reshape(-1)
            if arr.shape[0] != len(self.classes):
                raise VolfmError(f"decode got a vector of length {arr.shape[0]}, the vocabulary has "
                                 f"{len(self.classes)} classes")
            hits = np.flatnonzero(arr) if arr.dtype == bool else np.flatnonzero(arr > threshold)
            return [self.classes[i] for i in hits]
        if arr.size == 0:
            return []
        if not np.issubdtype(arr.dtype, np.integer):
            raise VolfmError(f"decode takes a multi-hot vector or class indices, got dtype {arr.dtype}")
        out = []
        for i in arr.reshape(-1).tolist():
            if not 0 <= i < len(self.classes):
                raise VolfmError(f"class index {i} is out of range for a vocabulary of {len(self.classes)} "
                                 f"classes")
            out.append(self.classes[i])
        return out

    def index(self, class_id: str) -> int:
        """Position of a class id (for ICD levels also accepted un-normalized, e.g. ``"k80"``)."""
        i = self._index.get(class_id)
        if i is None and isinstance(class_id, str) and self.level in ("full", "category"):
            i = self._index.get(normalize_code(class_id) or "")
        if i is None:
            raise VolfmError(f"{class_id!r} is not a class of this ICD vocabulary (level {self.level!r}, "
                             f"{len(self.classes)} classes, e.g. {self.classes[:5]})")
        return i

    def __contains__(self, class_id) -> bool:
        try:
            self.index(class_id)
            return True
        except VolfmError:
            return False

    def __len__(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return f"IcdVocabulary(level={self.level!r}, classes={len(self.classes)}, min_count={self.min_count})"

    # -- reporting --------------------------------------------------------------------------------
    def summary(self) -> str:
        """A few human-readable lines: level, classes, bad codes with examples, dropped classes."""
        s = self.stats
        src = f" from {s['source']}" if s.get("source") else ""
        lines = [f"ICD vocabulary{src}: level {self.level!r}, {len(self.classes)} classes "
                 f"(min_count {self.min_count})"]
        if "cases" in s:
            lines.append(f"  {s['cases']} cases, {s.get('codes', 0)} codes; {s.get('cases_without_codes', 0)} "
                         f"cases without codes, {s.get('cases_without_classes', 0)} without any kept class")
        if s.get("mapping"):
            m = s["mapping"]
            lines.append(f"  mapping table {m.get('path')} ({m.get('code_column')} -> {m.get('target_column')}, "
                         f"{m.get('codes')} codes, {m.get('malformed_rows', {}).get('count', 0)} malformed rows)")
        for key, what in (("malformed", "malformed codes (ignored)"),
                          ("unknown", "codes not in ICD-10-CM (ignored)"),
                          ("unmapped", "codes not in the mapping table (ignored)")):
            t = s.get(key) or _empty_tally()
            if t["count"]:
                lines.append(f"  {t['count']} {what}, {t['unique']} distinct, e.g. {', '.join(t['examples'])}")
        d = s.get("dropped_classes") or {"count": 0, "examples": []}
        if d["count"]:
            lines.append(f"  {d['count']} of {s.get('classes_before_min_count')} classes dropped (in fewer than "
                         f"{self.min_count} cases), e.g. {', '.join(d['examples'])}")
        return "\n".join(lines)

    # -- persistence ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": _FORMAT, "version": _FORMAT_VERSION, "level": self.level, "min_count": self.min_count,
             "classes": list(self.classes), "counts": dict(self.counts),
             "descriptions": dict(self.descriptions), "stats": self.stats, "source": self.source}
        if self.mapping is not None:
            d["mapping"] = {"entries": self.mapping.entries, "info": self.mapping.info}
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> IcdVocabulary:
        where = f" in {source}" if source else ""
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise VolfmError(f"not an ICD vocabulary{where} (expected 'format': {_FORMAT!r}); write one with "
                             "IcdVocabulary.to_json")
        if d.get("version") != _FORMAT_VERSION:
            raise VolfmError(f"ICD vocabulary{where} has format version {d.get('version')!r}, this volfm reads "
                             f"version {_FORMAT_VERSION}; rebuild it")
        classes = d.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise VolfmError(f"ICD vocabulary{where} has no valid 'classes' list; rebuild it")
        mapping = None
        if d.get("mapping") is not None:
            m = d["mapping"]
            if not isinstance(m, dict) or not isinstance(m.get("entries"), dict):
                raise VolfmError(f"ICD vocabulary{where} has a corrupt 'mapping'; rebuild it")
            mapping = IcdMapping(m["entries"], info=m.get("info"))
        try:
            return cls(classes, d.get("level"), counts=d.get("counts"), descriptions=d.get("descriptions"),
                       min_count=d.get("min_count", 1), stats=d.get("stats"), mapping=mapping,
                       source=d.get("source", "") or source)
        except (TypeError, AttributeError) as e:
            raise VolfmError(f"ICD vocabulary{where} is corrupt ({e}); rebuild it") from e
        except VolfmError as e:
            raise VolfmError(f"ICD vocabulary{where} is invalid: {e}") from e

    def to_json(self, path) -> None:
        """Write the vocabulary (with its trimmed mapping table, if any) atomically as JSON."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path) -> IcdVocabulary:
        path = Path(path)
        if not path.is_file():
            raise VolfmError(f"ICD vocabulary file {path} does not exist; build one with IcdVocabulary.build "
                             "and save it with to_json")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VolfmError(f"ICD vocabulary file {path} is unreadable or corrupt ({e}); rebuild it") from e
        return cls.from_dict(d, source=str(path))


def _classify(raw: str, level: str, mapping: IcdMapping | None) -> tuple[str, tuple[str, ...]]:
    """(status, classes) of one raw code: status is 'ok', 'malformed', 'unknown' or 'unmapped'."""
    norm = normalize_code(raw)
    if norm is None:
        return "malformed", ()
    if mapping is not None:
        targets = mapping.lookup(norm)
        return ("unmapped", ()) if targets is None else ("ok", tuple(targets))
    cls_id = roll_up(norm, level)
    return ("unknown", ()) if cls_id is None else ("ok", (cls_id,))


def _trim_mapping(mapping: IcdMapping, kept: set[str]) -> IcdMapping:
    """The mapping restricted to kept targets, with the same lookup result for every code.

    An entry left with no kept target is still needed when a shorter prefix has kept targets (it stops
    the fallback to that prefix); otherwise it is dropped.
    """
    filtered = {k: [t for t in v if t in kept] for k, v in mapping.entries.items()}
    nonempty = {k for k, v in filtered.items() if v}
    entries = {}
    for k, v in filtered.items():
        if v or any(k[:n] in nonempty for n in range(3, len(k))):
            entries[k] = v
    return IcdMapping(entries, {t: d for t, d in mapping.descriptions.items() if t in kept}, mapping.info)
