"""Label maps: which label values of a source dataset make up each class of a segmentation task.

A fine-tuning task rarely takes a source dataset's labels as they are: it picks one organ out of a
multi-organ map (``pancreas`` from a 13-organ atlas), merges left and right kidneys, or marks labels
it cannot trust as "ignore". A label map YAML says so::

    # target classes of the fine-tuning task: name -> the source labels that make them up
    source:                  # optional: the source dataset's labels, name -> value (0-255)
      background: 0
      liver: 1
      spleen: 2
      kidney_left: 3
      kidney_right: 4
    classes:                 # ordered: class index = position, background is always class 0
      background: 0          # implicit when absent
      kidney: [kidney_left, kidney_right]   # merge: source names (need `source`) ...
      spleen: 2                             # ... or source values, used directly
    ignore: [liver]          # optional: source labels set to ignore_index instead of background
    ignore_index: 255        # optional (default 255); must not be a class index

Rules:

- ``classes`` maps a class name to a source name, a source value (0-255) or a list of them; a plain
  list of names (``classes: [spleen]``) gives each class the source label of the same name.
- ``background`` is class 0 whether listed or not, and holds source value 0 unless another class or
  ``ignore`` claims 0; listing it lets more source labels join the background explicitly.
- Each source value belongs to at most one class (or to ``ignore``). Class names are unique.
- Remapping (:meth:`LabelMap.remap`) sends every source value not named by a class or ``ignore`` to
  background: that is how unwanted organs are dropped. Values the map does not know at all (absent
  from ``source`` and not named anywhere) are what :meth:`LabelMap.check` reports, and what
  ``remap(strict=True)`` refuses: usually a label map written for another dataset or version.
- ``source`` may come from the YAML, from ``source_labels=`` (a name -> value or value -> name
  mapping such as :data:`volfm.synth.ct.LABELS`, or a path for :func:`load_source_labels`), or
  both if they agree. Without one, classes must name source values.

Label arrays are the store's ``(1, I, J, K)`` uint8 (any shape works); the output is uint8 of the same
shape with values ``0..num_classes-1`` and ``ignore_index``.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml

from volfm import VolfmError
from volfm.io.atomic import write_text_atomic
from volfm.io.yamlfile import UniqueKeyLoader  # SafeLoader that rejects duplicate keys
from volfm.store.cohort import read_table
from volfm.utils import did_you_mean

__all__ = ["LabelMap", "load_source_labels", "normalize_source_labels", "DEFAULT_IGNORE_INDEX"]

DEFAULT_IGNORE_INDEX = 255
BACKGROUND = "background"
_TOP_KEYS = ("source", "classes", "ignore", "ignore_index")


def _ranges(values: Iterable[int]) -> str:
    """'0-4, 7, 9-10' for a set of integers."""
    vals = sorted(set(int(v) for v in values))
    if not vals:
        return "none"
    out, start, prev = [], vals[0], vals[0]
    for v in vals[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_value(v, where: str) -> int:
    if not _is_int(v):
        raise VolfmError(f"{where}: {v!r} is not a label value (an integer 0-255) or a name")
    if not 0 <= int(v) <= 255:
        raise VolfmError(f"{where}: label value {int(v)} is outside 0-255; label arrays are uint8")
    return int(v)


def normalize_source_labels(mapping, origin: str = "source labels") -> dict[str, int]:
    """A source label map as ``{name: value}`` ordered by value.

    Accepts name -> value, or value -> name (int keys, or digit-string keys as JSON writes them, e.g.
    :data:`volfm.synth.ct.LABELS`). Values must be 0-255 and unique, names unique.
    """
    if not isinstance(mapping, Mapping) or not mapping:
        raise VolfmError(f"{origin}: expected a non-empty mapping of label name -> value, got {type(mapping).__name__}")
    items = list(mapping.items())

    def _intlike(k):
        return _is_int(k) or (isinstance(k, str) and k.strip().isdigit())

    if all(_intlike(k) for k, _ in items) and all(isinstance(v, str) for _, v in items):
        items = [(v, int(k)) for k, v in items]  # value -> name: invert
    out: dict[str, int] = {}
    by_value: dict[int, str] = {}
    for name, value in items:
        if not isinstance(name, str) or not name.strip():
            raise VolfmError(f"{origin}: label name {name!r} is not a text; write name: value pairs")
        if isinstance(value, list):
            raise VolfmError(f"{origin}: label {name!r} has a list of values {value!r} (an nnU-Net region); "
                             "give one value per source label name")
        v = _check_value(value, f"{origin}: label {name!r}")
        if name in out:
            raise VolfmError(f"{origin}: label name {name!r} appears twice")
        if v in by_value:
            raise VolfmError(f"{origin}: labels {by_value[v]!r} and {name!r} share value {v}; give each its own value")
        out[name], by_value[v] = v, name
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def _read_labels_file(path: Path) -> dict[str, int]:
    try:
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=UniqueKeyLoader)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise VolfmError(f"{path}: unreadable label names file ({exc}); write a JSON/YAML mapping "
                         "name -> value") from exc
    if isinstance(doc, Mapping) and isinstance(doc.get("labels"), Mapping):  # MSD / nnU-Net dataset.json
        doc = doc["labels"]
    return normalize_source_labels(doc, str(path))


def _store_label_candidates(store: Path) -> list[Path]:
    """labels.json next to the source label files of a store (their folder, then its parent)."""
    spec = {}
    if (store / "spec.yaml").is_file():
        try:
            spec = (yaml.safe_load((store / "spec.yaml").read_text()) or {}).get("spec") or {}
        except yaml.YAMLError:
            spec = {}
    inputs = spec.get("inputs") or {}
    columns = [c for c, cfg in inputs.items() if isinstance(cfg, Mapping) and cfg.get("kind") == "label"] or ["label"]
    table = store / "cohort.csv"
    if not table.is_file():
        return []
    for row in read_table(table):
        for col in columns:
            if (row.get(col) or "").strip():
                src = Path(row[col].strip())
                return [src.parent / "labels.json", src.parent.parent / "labels.json",
                        src.parent.parent / "dataset.json"]
    return []


def load_source_labels(path) -> dict[str, int]:
    """The label names of a source dataset, ``{name: value}``.

    ``path`` may be:

    - a labels file: ``.json``/``.yaml`` mapping name -> value or value -> name, or a Medical Segmentation
      Decathlon / nnU-Net ``dataset.json`` (its ``labels`` entry);
    - a cohort folder (the one that holds ``cohort.csv``; a path to the table works too): its
      ``labels.json``, which ``volfm synth ct`` / ``volfm synth mripet`` write, else its ``dataset.json``;
    - a store (a folder with ``manifest.csv``): ``STORE/labels.json`` if present, else the ``labels.json``
      next to the store's source label files (their folder or its parent, where the synthetic cohorts
      write it), found through the store's ``cohort.csv`` and the spec's label inputs.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
        p = p.parent
    if p.is_file():
        return _read_labels_file(p)
    if not p.is_dir():
        raise VolfmError(f"{p}: not found; give a labels.json, a cohort folder or a store")
    tried = [p / "labels.json", p / "dataset.json"]
    if (p / "manifest.csv").is_file():
        tried += _store_label_candidates(p)
    for cand in tried:
        if cand.is_file():
            try:
                return _read_labels_file(cand)
            except VolfmError:
                if cand.name != "dataset.json":
                    raise
                # a dataset.json without usable labels: keep looking
    raise VolfmError(f"{p}: no label names found (looked for {', '.join(str(c) for c in tried)}); write a "
                     "labels.json (name -> value) there or pass source_labels to LabelMap explicitly")


class LabelMap:
    """Target classes of a task as sets of source label values; see the module docstring for the YAML.

    ``classes``: ordered ``{name: source values}`` (background first or implicit); ``ignore``: source
    values sent to ``ignore_index``; ``source``: the source dataset's ``{name: value}`` (optional);
    ``origin``: where the map came from, for messages.
    """

    def __init__(self, classes: Mapping[str, Sequence[int]], ignore: Sequence[int] = (),
                 ignore_index: int = DEFAULT_IGNORE_INDEX, source: Mapping | None = None,
                 origin: str = "label map"):
        self.origin = str(origin)
        if not isinstance(classes, Mapping) or not classes:
            raise VolfmError(f"{self.origin}: 'classes' must name at least one class")
        self.source = None if source is None else normalize_source_labels(source, f"{self.origin}: source")
        owner: dict[int, str] = {}
        resolved: dict[str, tuple[int, ...]] = {}
        for name, values in classes.items():
            if not isinstance(name, str) or not name.strip():
                raise VolfmError(f"{self.origin}: class name {name!r} is not a text")
            vals = [values] if _is_int(values) else list(values)
            out = []
            for v in vals:
                v = _check_value(v, f"{self.origin}: class {name!r}")
                if owner.get(v) == name:  # listed twice in the same class
                    continue
                if v in owner:
                    raise VolfmError(f"{self.origin}: source value {v} is in both {owner[v]!r} and {name!r}; "
                                     "a source label can go to one class only")
                owner[v] = name
                out.append(v)
            if not out and name != BACKGROUND:
                raise VolfmError(f"{self.origin}: class {name!r} names no source label")
            resolved[name] = tuple(sorted(out))
        ign = []
        for v in ignore:
            v = _check_value(v, f"{self.origin}: ignore")
            if owner.get(v) == "ignore":
                continue
            if v in owner:
                raise VolfmError(f"{self.origin}: source value {v} is both ignored and in class {owner[v]!r}")
            owner[v] = "ignore"
            ign.append(v)
        bg = resolved.pop(BACKGROUND, ())
        if 0 not in owner:
            bg = (0,) + tuple(bg)
        self.classes: dict[str, tuple[int, ...]] = {BACKGROUND: tuple(sorted(bg)), **resolved}
        self.ignore: tuple[int, ...] = tuple(sorted(set(ign)))
        if not _is_int(ignore_index) or not 0 <= int(ignore_index) <= 255:
            raise VolfmError(f"{self.origin}: ignore_index must be an integer 0-255, got {ignore_index!r}")
        self.ignore_index = int(ignore_index)
        if self.ignore_index < self.num_classes:
            raise VolfmError(f"{self.origin}: ignore_index {self.ignore_index} is a class index "
                             f"(0..{self.num_classes - 1}); use a value >= {self.num_classes}, e.g. 255")
        lut = np.zeros(256, dtype=np.uint8)
        for index, vals in enumerate(self.classes.values()):
            lut[list(vals)] = index
        lut[list(self.ignore)] = self.ignore_index
        self._lut = lut
        self._lut.flags.writeable = False
        known = set(owner) | {0}
        if self.source is not None:
            known |= set(self.source.values())
        self._known = np.zeros(256, dtype=bool)
        self._known[sorted(known)] = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_yaml(cls, path_or_dict, source_labels=None) -> LabelMap:
        """Read a label map from a YAML file or an already-parsed dict; ``source_labels`` as in the module doc."""
        if isinstance(path_or_dict, Mapping):
            doc, origin = dict(path_or_dict), "label map"
        else:
            path = Path(path_or_dict).expanduser()
            origin = str(path)
            if not path.is_file():
                raise VolfmError(f"{path}: label map not found; give a path to a label map YAML")
            try:
                doc = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
            except (yaml.YAMLError, UnicodeDecodeError) as exc:
                raise VolfmError(f"{path}: malformed label map YAML ({' '.join(str(exc).split())}); fix the file") \
                    from exc
        if not isinstance(doc, Mapping):
            raise VolfmError(f"{origin}: a label map is a mapping with 'classes' (and optional 'source', 'ignore', "
                             f"'ignore_index'), got {type(doc).__name__}")
        for key in doc:
            if key not in _TOP_KEYS:
                raise VolfmError(f"{origin}: unknown key {key!r}{did_you_mean(key, _TOP_KEYS, cutoff=0.6)}; a label map "
                                 f"has {', '.join(_TOP_KEYS)}")
        if "classes" not in doc:
            raise VolfmError(f"{origin}: no 'classes'; list the task's classes, e.g. classes: {{spleen: 2}}")
        source = cls._merge_source(doc.get("source"), source_labels, origin)
        classes = doc["classes"]
        if isinstance(classes, list):  # names only: each class takes the source label of the same name
            if not all(isinstance(n, str) for n in classes):
                raise VolfmError(f"{origin}: 'classes' as a list must hold source label names, got {classes!r}")
            dupes = sorted({n for n in classes if classes.count(n) > 1})
            if dupes:
                raise VolfmError(f"{origin}: class {dupes[0]!r} is listed twice")
            classes = {n: n for n in classes}
        if not isinstance(classes, Mapping) or not classes:
            raise VolfmError(f"{origin}: 'classes' must be a non-empty mapping name -> source labels or a list of "
                             f"source names, got {classes!r}")
        # `spleen:` with no value takes the source label of the same name
        resolved = {name: cls._resolve(name if spec is None else spec, source, origin, f"class {name!r}")
                    for name, spec in classes.items()}
        ignore = doc.get("ignore") or []
        ignore = cls._resolve(ignore, source, origin, "ignore") if ignore else []
        return cls(resolved, ignore=ignore, ignore_index=doc.get("ignore_index", DEFAULT_IGNORE_INDEX),
                   source=source, origin=origin)

    @classmethod
    def from_names(cls, names: Sequence[str], source_labels, ignore: Sequence = (),
                   ignore_index: int = DEFAULT_IGNORE_INDEX) -> LabelMap:
        """Pick organs by name from a multi-organ source map: ``from_names(["spleen"], LABELS)``.

        Classes are background plus ``names`` in order; every other source label becomes background.
        """
        if isinstance(names, str):
            names = [names]
        return cls.from_yaml({"classes": list(names), "ignore": list(ignore), "ignore_index": ignore_index},
                             source_labels=source_labels)

    @staticmethod
    def _merge_source(in_doc, given, origin: str) -> dict[str, int] | None:
        doc_src = None if in_doc is None else normalize_source_labels(in_doc, f"{origin}: source")
        if given is None:
            return doc_src
        if isinstance(given, (str, Path)):
            arg_src = load_source_labels(given)
        else:
            arg_src = normalize_source_labels(given, "source_labels")
        if doc_src is not None and doc_src != arg_src:
            diff = sorted(set(doc_src.items()) ^ set(arg_src.items()))
            raise VolfmError(f"{origin}: its 'source' disagrees with the source_labels given ({diff[:4]}); "
                             "drop one or make them match")
        return arg_src

    @staticmethod
    def _resolve(spec, source: dict[str, int] | None, origin: str, what: str) -> list[int]:
        items = spec if isinstance(spec, list) else [spec]
        out = []
        for item in items:
            if isinstance(item, str):
                if source is None:
                    raise VolfmError(f"{origin}: {what} names source label {item!r} but no source map is known; add "
                                     "'source: {name: value, ...}' to the YAML, pass source_labels=, or use values")
                if item not in source:
                    raise VolfmError(f"{origin}: {what}: unknown source label {item!r}"
                                     f"{did_you_mean(item, source, cutoff=0.6)}; known: {', '.join(source)}")
                out.append(source[item])
            else:
                out.append(_check_value(item, f"{origin}: {what}"))
        return out

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        """Number of target classes, background included."""
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """Target class names in class-index order (``class_names[0] == "background"``)."""
        return list(self.classes)

    @property
    def lut(self) -> np.ndarray:
        """Read-only (256,) uint8 lookup table: source value -> class index (or ignore_index)."""
        return self._lut

    @property
    def known_values(self) -> list[int]:
        """Source values the map knows: those of ``source``, of every class and ignore, and 0."""
        return [int(v) for v in np.flatnonzero(self._known)]

    # ------------------------------------------------------------------ use
    @staticmethod
    def _as_uint8(label_array, where: str) -> np.ndarray:
        arr = np.asarray(label_array.detach().cpu() if hasattr(label_array, "detach") else label_array)
        if arr.dtype == np.uint8:
            return arr
        if arr.dtype == bool:
            return arr.astype(np.uint8)
        if not np.issubdtype(arr.dtype, np.number):
            raise VolfmError(f"{where}: label array has dtype {arr.dtype}; expected integer label values")
        if not np.issubdtype(arr.dtype, np.integer) and arr.size and \
                not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise VolfmError(f"{where}: label array holds non-integer values; is it an image rather than labels?")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            out = np.unique(arr[(arr < 0) | (arr > 255)]).astype(np.int64)
            raise VolfmError(f"{where}: label values [{', '.join(str(v) for v in out[:10])}] are outside 0-255, "
                             "which no label map holds (labels are uint8); relabel them in the source data")
        return arr.astype(np.uint8)

    def values_in(self, label_array) -> list[int]:
        """Sorted distinct values of a label array (a 256-bin count, fast on large uint8 volumes)."""
        arr = self._as_uint8(label_array, "label array")
        return [int(v) for v in np.flatnonzero(np.bincount(arr.ravel(), minlength=256))]

    def check(self, label_array, source: str | None = None) -> list[int]:
        """Raise a VolfmError if ``label_array`` holds values this map does not know; return its values.

        ``source`` names the file or case in the message (e.g. ``"stores/ct case ct_0003 label.npy"``).
        """
        where = source or "label array"
        arr = self._as_uint8(label_array, where)
        values = [int(v) for v in np.flatnonzero(np.bincount(arr.ravel(), minlength=256))]
        unknown = [v for v in values if not self._known[v]]
        if unknown:
            raise VolfmError(
                f"{where}: label values [{', '.join(map(str, unknown))}] are missing from {self._named()} "
                f"(it knows {_ranges(self.known_values)}); add them to its 'source' or 'classes' (or 'ignore'), "
                "check that the map was written for this dataset, or remap with strict=False to send them to "
                "background")
        return values

    def remap(self, label_array, strict: bool = False, source: str | None = None) -> np.ndarray:
        """Source labels -> class indices (uint8, same shape) through the 256-entry lookup table.

        Source values named by no class go to background (0), ignored ones to ``ignore_index``; with
        ``strict=True`` values the map does not know raise the :meth:`check` error instead.
        """
        where = source or "label array"
        if strict:
            self.check(label_array, source=where)
        return self._lut[self._as_uint8(label_array, where)]

    def _named(self) -> str:
        return "the label map" if self.origin == "label map" else f"the label map {self.origin}"

    def to_dict(self) -> dict:
        """The YAML form: ``{"source"?, "classes": {name: value or [values]}, "ignore"?, "ignore_index"?}``."""
        doc: dict = {}
        if self.source is not None:
            doc["source"] = dict(self.source)
        doc["classes"] = {n: (v[0] if len(v) == 1 else list(v)) for n, v in self.classes.items()}
        if self.ignore:
            doc["ignore"] = list(self.ignore)
        if self.ignore_index != DEFAULT_IGNORE_INDEX:
            doc["ignore_index"] = self.ignore_index
        return doc

    def to_yaml(self, path=None) -> str:
        """YAML text of :meth:`to_dict`; written (atomically) to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if path is not None:
            write_text_atomic(Path(path), text)
        return text

    def __eq__(self, other) -> bool:
        if not isinstance(other, LabelMap):
            return NotImplemented
        return (self.classes == other.classes and self.ignore == other.ignore
                and self.ignore_index == other.ignore_index and self.source == other.source)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={list(v)}" for n, v in self.classes.items())
        ign = f", ignore={list(self.ignore)}->{self.ignore_index}" if self.ignore else ""
        return f"LabelMap({parts}{ign})"
