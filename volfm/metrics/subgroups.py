"""Subgroup breakdown: metrics per value of any cohort column the user names (e.g. sex, age band,
scanner), so bias is visible.

Protocol of :func:`subgroup_breakdown`:

- Cases are the manifest ``rows`` (one dict per evaluated case, in the same order as the arrays the
  metric function indexes). A case's group is its cell in ``column``.
- Missing cells (absent key, ``None``, NaN, blank, or ``NA``/``N/A``/``nan``/``none``/``null`` in any
  case) form the group ``"(missing)"``.
- Without bins each distinct stripped cell text is a group (sorted numerically when every value is a
  number, else as text). With ``bins`` (increasing edges ``e_0 < ... < e_k``) numeric cells fall into
  left-closed bands ``[e_i, e_{i+1})`` labelled ``"40-59"`` when both edges are integers (the band
  holds 40 <= v < 60) and ``"[0.5, 1.5)"`` otherwise; values below ``e_0`` are ``"<e_0"``, values at
  or above ``e_k`` are ``">=e_k"``. A non-numeric cell in a banded column is an error.
- The first row is ``"all"`` (every case); then the groups in band/sorted order, ``"(missing)"`` last.
- ``metric_fn`` is called once per group with the sorted int64 indices of its cases. A group with fewer
  than ``min_cases`` cases is still listed with its ``n`` but its metrics are NaN and ``note`` says why.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from volfm import VolfmError
from volfm.store.cohort import write_table

__all__ = ["MISSING", "ALL", "parse_column_spec", "band_label", "subgroup_breakdown", "format_table", "write_csv"]

MISSING = "(missing)"
ALL = "all"
_MISSING_TOKENS = {"", "na", "n/a", "nan", "none", "null"}


def parse_column_spec(spec: str) -> tuple[str, list[float] | None]:
    """``"sex"`` -> ``("sex", None)``; ``"age:0,40,60,80"`` -> ``("age", [0.0, 40.0, 60.0, 80.0])``.

    The part after the last ``:`` is comma-separated, strictly increasing bin edges (at least two).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise VolfmError(f"column spec {spec!r} is empty; pass a column name such as 'sex' or 'age:0,40,60,80'")
    if ":" not in spec:
        return spec.strip(), None
    column, _, edges_text = spec.rpartition(":")
    column = column.strip()
    if not column:
        raise VolfmError(f"column spec {spec!r} has no column name before ':'; write it as 'age:0,40,60,80'")
    try:
        edges = [float(e) for e in edges_text.split(",") if e.strip()]
    except ValueError:
        raise VolfmError(f"column spec {spec!r}: bin edges {edges_text!r} are not all numbers; "
                         "write them as 'age:0,40,60,80'") from None
    return column, _check_bins(edges, spec)


def _check_bins(bins, where) -> list[float]:
    try:
        edges = [float(e) for e in bins]
    except (TypeError, ValueError):
        raise VolfmError(f"bins for {where!r} must be numbers (got {bins!r}); "
                         "pass increasing edges such as [0, 40, 60, 80]") from None
    if len(edges) < 2 or any(not math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise VolfmError(f"bins for {where!r} must be at least two finite, strictly increasing edges (got {bins!r}); "
                         "e.g. [0, 40, 60, 80]")
    return edges


def _fmt_edge(e: float) -> str:
    return str(int(e)) if float(e).is_integer() else repr(float(e))


def band_label(lo: float, hi: float) -> str:
    """Label of the band ``[lo, hi)``: ``"40-59"`` for integer edges, else ``"[0.5, 1.5)"``."""
    if float(lo).is_integer() and float(hi).is_integer():
        return f"{int(lo)}-{int(hi) - 1}"
    return f"[{_fmt_edge(lo)}, {_fmt_edge(hi)})"


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING_TOKENS


def _as_number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        v = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _case_name(row: dict, i: int) -> str:
    cid = row.get("case_id")
    return f"row {i} (case_id {cid})" if cid not in (None, "") else f"row {i}"


def _assign_groups(rows: Sequence[dict], column: str, bins: list[float] | None) -> tuple[list[str], list[str]]:
    """Group label per case, and the ordered list of group labels present."""
    labels: list[str] = []
    if bins is not None:
        bands = [band_label(lo, hi) for lo, hi in zip(bins, bins[1:])]
        below, above = f"<{_fmt_edge(bins[0])}", f">={_fmt_edge(bins[-1])}"
        order = [below, *bands, above, MISSING]
        for i, row in enumerate(rows):
            value = row.get(column)
            if _is_missing(value):
                labels.append(MISSING)
                continue
            v = _as_number(value)
            if v is None:
                raise VolfmError(f"{_case_name(row, i)}: column {column!r} value {value!r} is not a number, so it "
                                 "cannot be banded; fix the cell, leave it empty, or drop the bins")
            k = int(np.searchsorted(bins, v, side="right"))  # bins[k-1] <= v < bins[k]
            labels.append(below if k == 0 else above if k == len(bins) else bands[k - 1])
    else:
        for row in rows:
            value = row.get(column)
            labels.append(MISSING if _is_missing(value) else str(value).strip())
        present = sorted(set(labels) - {MISSING})
        numbers = [_as_number(v) for v in present]
        if present and all(n is not None for n in numbers):
            present = [v for _, v in sorted(zip(numbers, present))]
        order = [*present, MISSING]
    seen = set(labels)
    return labels, [g for g in order if g in seen]


def _check_metrics(out, group: str) -> dict:
    if not isinstance(out, dict):
        raise VolfmError(f"metric_fn returned {type(out).__name__} for group {group!r}; it must return a flat "
                         "dict of numbers, e.g. {'macro_auroc': 0.81}")
    for k, v in out.items():
        if not (v is None or isinstance(v, (str, bool, int, float, np.integer, np.floating))):
            raise VolfmError(f"metric_fn returned a {type(v).__name__} for {k!r} (group {group!r}); return only "
                             "numbers or text (pick the scalar entries of nested results)")
    return {k: (v.item() if isinstance(v, (np.integer, np.floating)) else v) for k, v in out.items()}


def subgroup_breakdown(rows: Sequence[dict], column: str, metric_fn: Callable[[np.ndarray], dict],
                       bins: Sequence[float] | None = None, min_cases: int = 10) -> list[dict]:
    """Metrics per group of ``column`` (see the module docstring for the exact grouping rules).

    ``column`` may also be a spec such as ``"age:0,40,60,80"`` (parsed by :func:`parse_column_spec`)
    when ``bins`` is not given. ``metric_fn(idx)`` gets the sorted int64 indices of a group's cases
    into the arrays aligned with ``rows`` and returns a flat ``{name: number}`` dict (e.g. scalar
    entries of :func:`~volfm.metrics.classification.multilabel_metrics` on ``y[idx], s[idx]``).

    Returns one dict per group, ``"all"`` first: ``{"column", "group", "n", <metrics>..., "note"}``.
    Groups below ``min_cases`` cases carry NaN for every metric name seen in the other groups.
    """
    if not rows:
        raise VolfmError("subgroup_breakdown got no rows; pass the manifest rows of the evaluated cases")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    if bins is None and column not in columns and ":" in str(column):
        column, bins = parse_column_spec(column)
    if column not in columns:
        raise VolfmError(f"column {column!r} is not in the manifest (columns: {', '.join(map(str, columns))}); "
                         "pick one of those, optionally with bins as 'age:0,40,60,80'")
    edges = _check_bins(bins, column) if bins is not None else None
    if int(min_cases) < 1:
        raise VolfmError(f"min_cases must be >= 1 (got {min_cases})")

    labels, order = _assign_groups(rows, column, edges)
    labels_arr = np.asarray(labels, dtype=object)
    groups = [(ALL, np.arange(len(rows), dtype=np.int64))]
    groups += [(g, np.flatnonzero(labels_arr == g).astype(np.int64)) for g in order]

    results: list[tuple[str, int, dict | None]] = []
    metric_names: dict[str, None] = {}
    for group, idx in groups:
        if idx.size < min_cases:
            results.append((group, int(idx.size), None))
            continue
        metrics = _check_metrics(metric_fn(idx), group)
        metric_names.update(dict.fromkeys(k for k in metrics if k not in ("column", "group", "n", "note")))
        results.append((group, int(idx.size), metrics))

    out = []
    for group, n, metrics in results:
        row = {"column": column, "group": group, "n": n}
        if metrics is None:
            row.update({k: math.nan for k in metric_names})
            row["note"] = f"fewer than {min_cases} cases; metrics not computed"
        else:
            row.update({k: metrics.get(k, math.nan) for k in metric_names})
            row["note"] = str(metrics.get("note", "") or "")
        out.append(row)
    return out


def _cell(v, digits: int) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def format_table(rows: Sequence[dict], digits: int = 3) -> str:
    """Aligned plain-text table of ``rows`` (columns in first-seen key order; numbers right-aligned,
    floats with ``digits`` decimals, text left-aligned)."""
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(k), digits) for k in keys] for r in rows]
    numeric = [all(isinstance(r.get(k), (int, float, np.integer, np.floating)) and not isinstance(r.get(k), bool)
                   for r in rows if r.get(k) is not None) for k in keys]
    widths = [max(len(str(k)), *(len(c[j]) for c in cells)) for j, k in enumerate(keys)]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    header = line([str(k) for k in keys])
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([header, rule, *(line(c) for c in cells)])


def write_csv(rows: Sequence[dict], path) -> None:
    """Write ``rows`` as CSV (TSV for a .tsv/.tab path), atomically; NaN is written as ``nan``."""
    write_table(path, list(rows))
