"""Classification metrics for phenotype / findings evaluation (numpy only; tensors are accepted).

Protocol, as used by every volfm report:

- AUROC is the Mann-Whitney statistic: the probability that a random positive scores higher than
  a random negative, ties counting one half (average ranks). Undefined (NaN) unless both classes
  are present.
- AUPRC is average precision, the step-wise sum ``sum_k (R_k - R_{k-1}) * P_k`` over the distinct
  score thresholds taken in decreasing order (predict positive when ``score >= threshold``; tied
  scores enter together), exactly as scikit-learn's ``average_precision_score``. Undefined (NaN)
  without positives (scikit-learn returns 0 there).
- Multi-label macro values average the per-class values over the *scored* classes only (those with
  at least ``min_positives`` positives and ``min_negatives`` negatives); micro values pool every
  cell of the scored classes into one binary problem.
- F1 is ``2 TP / (2 TP + FP + FN)``; ``zero_division`` (default 0, as scikit-learn) when the
  denominator is 0 (no positives, none predicted).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from volfm import VolfmError

__all__ = [
    "binary_auroc",
    "binary_auprc",
    "multilabel_metrics",
    "binary_f1",
    "macro_f1",
    "best_threshold_f1",
    "as_binary_labels",
    "as_scores",
    "resolve_class_names",
]


def _to_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise VolfmError(f"{name} is not array-like ({exc}); pass a numpy array or torch tensor") from exc


def as_binary_labels(y, name: str) -> np.ndarray:
    """0/1 (or bool) labels as a bool array; anything else is a user error."""
    y = _to_numpy(y, name)
    if y.dtype == bool:
        return y
    if y.size and not np.issubdtype(y.dtype, np.number):
        raise VolfmError(f"{name} has dtype {y.dtype}; pass 0/1 or bool labels")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise VolfmError(f"{name} has {int(bad.sum())} value(s) other than 0/1 (e.g. {y[bad].flat[0]!r}); "
                         "pass binary labels (multi-hot for multi-label)")
    return y.astype(bool)


def as_scores(s, name: str) -> np.ndarray:
    """Numeric (or bool) scores as float64; non-numeric or NaN/inf values are a user error naming ``name``."""
    s = _to_numpy(s, name)
    if s.size and not np.issubdtype(s.dtype, np.number) and s.dtype != bool:
        raise VolfmError(f"{name} has dtype {s.dtype}; pass numeric scores (logits or probabilities)")
    s = s.astype(np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        raise VolfmError(f"{name} has {int(bad.sum())} NaN/inf value(s); check the model outputs before scoring")
    return s


def _binary_pair(y_true, y_score, what: str = "y_score") -> tuple[np.ndarray, np.ndarray]:
    y = as_binary_labels(y_true, "y_true").ravel()
    s = as_scores(y_score, what).ravel()
    if y.shape != s.shape:
        raise VolfmError(f"y_true has {y.size} values but {what} has {s.size}; pass one score per label")
    return y, s


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s``; tied values share the mean of their ranks."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def binary_auroc(y_true, y_score) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic.

    ``AUROC = (sum of average ranks of the positives - P (P + 1) / 2) / (P N)`` with ``P``
    positives and ``N`` negatives; ties get average ranks, so a tied positive/negative pair counts
    1/2. Equals scikit-learn's ``roc_auc_score`` (trapezoidal ROC). Returns NaN when only one class
    is present. Inputs are flattened; labels must be 0/1 or bool, scores finite.
    """
    y, s = _binary_pair(y_true, y_score)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _threshold_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (decreasing) and TP/FP counts when predicting ``score >= threshold``."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s.size - 1]
    tps = np.cumsum(y_sorted, dtype=np.float64)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return s_sorted[last_of_tie], tps, fps


def binary_auprc(y_true, y_score) -> float:
    """Average precision, ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds in decreasing order.

    ``P_k``/``R_k`` are precision/recall when predicting positive for ``score >= t_k``; tied
    scores cross the threshold together (no interpolation), exactly as scikit-learn's
    ``average_precision_score``. Returns NaN when there is no positive (scikit-learn gives 0), and
    1.0 when every label is positive. Inputs are flattened.
    """
    y, s = _binary_pair(y_true, y_score)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    _, tps, fps = _threshold_counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _as_2d(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 1:
        return a[:, None]
    if a.ndim != 2:
        raise VolfmError(f"{name} has shape {tuple(a.shape)}; pass (N, C) arrays (cases x classes)")
    return a


def resolve_class_names(class_names, n_classes: int) -> list[str]:
    """``n_classes`` unique names: ``class_names`` checked, or ``class_0, class_1, ...`` for None."""
    if class_names is None:
        return [f"class_{i}" for i in range(n_classes)]
    names = [str(c) for c in class_names]
    if len(names) != n_classes:
        raise VolfmError(f"class_names has {len(names)} names but the arrays have {n_classes} classes; "
                         "pass one name per column")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise VolfmError(f"class_names has duplicates ({', '.join(dupes)}); names must be unique")
    return names


def multilabel_metrics(y_true, y_score, class_names: Sequence[str] | None = None,
                       min_positives: int = 1, min_negatives: int = 1) -> dict:
    """AUROC/AUPRC for multi-label (one-vs-rest) predictions, with the scored-class rule explicit.

    ``y_true`` is (N, C) multi-hot (0/1 or bool), ``y_score`` (N, C) scores of any monotone scale
    (logits or probabilities); a 1-D pair is one class. A class is *scored* when it has at least
    ``min_positives`` positives and ``min_negatives`` negatives in ``y_true``; the others are
    skipped (listed, never averaged as 0 or 0.5).

    Returns a JSON-serialisable dict:

    - ``macro_auroc`` / ``macro_auprc``: unweighted mean of the per-class values over scored classes.
    - ``micro_auroc`` / ``micro_auprc``: one binary problem from every cell of the scored classes
      (scikit-learn's ``average='micro'`` on those columns).
    - ``per_class``: ``{name: {auroc, auprc, positives, negatives, prevalence, scored}}`` for all
      classes (NaN metrics for skipped ones).
    - ``n_cases``, ``n_classes``, ``n_classes_scored``, ``n_classes_skipped``, ``skipped_classes``,
      ``min_positives``, ``min_negatives``, and ``note`` ("" or why values are missing/NaN).
    """
    y = _as_2d(as_binary_labels(y_true, "y_true"), "y_true")
    s = _as_2d(as_scores(y_score, "y_score"), "y_score")
    if y.shape != s.shape:
        raise VolfmError(f"y_true has shape {tuple(y.shape)} but y_score has {tuple(s.shape)}; "
                         "pass one score per label (cases x classes)")
    if int(min_positives) < 1 or int(min_negatives) < 1:
        raise VolfmError(f"min_positives and min_negatives must be >= 1 (got {min_positives}, {min_negatives}); "
                         "AUROC needs both classes")
    n_cases, n_classes = y.shape
    names = resolve_class_names(class_names, n_classes)
    positives = y.sum(axis=0).astype(int)
    negatives = n_cases - positives
    scored = (positives >= min_positives) & (negatives >= min_negatives)

    per_class: dict[str, dict] = {}
    aurocs, auprcs = [], []
    for c, name in enumerate(names):
        if scored[c]:
            auroc, auprc = binary_auroc(y[:, c], s[:, c]), binary_auprc(y[:, c], s[:, c])
            aurocs.append(auroc)
            auprcs.append(auprc)
        else:
            auroc = auprc = math.nan
        per_class[name] = {
            "auroc": auroc,
            "auprc": auprc,
            "positives": int(positives[c]),
            "negatives": int(negatives[c]),
            "prevalence": float(positives[c] / n_cases) if n_cases else math.nan,
            "scored": bool(scored[c]),
        }

    skipped = [n for n, ok in zip(names, scored) if not ok]
    rule = f"at least {min_positives} positive(s) and {min_negatives} negative(s)"
    if aurocs:
        cols = np.flatnonzero(scored)
        micro_auroc = binary_auroc(y[:, cols], s[:, cols])
        micro_auprc = binary_auprc(y[:, cols], s[:, cols])
        note = (f"{len(skipped)} of {n_classes} class(es) skipped, not {rule}: {', '.join(skipped)}"
                if skipped else "")
    else:
        micro_auroc = micro_auprc = math.nan
        note = (f"no class has {rule} among {n_cases} case(s); macro/micro values are NaN - "
                "evaluate on more cases or lower min_positives/min_negatives")
    return {
        "macro_auroc": float(np.mean(aurocs)) if aurocs else math.nan,
        "macro_auprc": float(np.mean(auprcs)) if auprcs else math.nan,
        "micro_auroc": micro_auroc,
        "micro_auprc": micro_auprc,
        "per_class": per_class,
        "n_cases": int(n_cases),
        "n_classes": int(n_classes),
        "n_classes_scored": int(scored.sum()),
        "n_classes_skipped": len(skipped),
        "skipped_classes": skipped,
        "min_positives": int(min_positives),
        "min_negatives": int(min_negatives),
        "note": note,
    }


def _f1_from_counts(tp, fp, fn, zero_division: float) -> float:
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else float(zero_division)


def binary_f1(y_true, y_pred, zero_division: float = 0.0) -> float:
    """F1 of hard predictions: ``2 TP / (2 TP + FP + FN)``.

    Both inputs are 0/1 or bool and are flattened. When there is no positive label and no positive
    prediction the ratio is 0/0 and ``zero_division`` is returned (0.0, as scikit-learn's default).
    """
    y = as_binary_labels(y_true, "y_true").ravel()
    p = as_binary_labels(y_pred, "y_pred").ravel()
    if y.shape != p.shape:
        raise VolfmError(f"y_true has {y.size} values but y_pred has {p.size}; pass one prediction per label")
    tp = int(np.sum(y & p))
    return _f1_from_counts(tp, int(np.sum(~y & p)), int(np.sum(y & ~p)), zero_division)


def macro_f1(y_true, y_pred, zero_division: float = 0.0) -> float:
    """Unweighted mean over the C columns of :func:`binary_f1` for (N, C) 0/1 or bool arrays.

    Every class counts (scikit-learn's ``f1_score(average='macro')``); a class with neither
    positives nor positive predictions contributes ``zero_division``. To average only over some
    classes, pass those columns.
    """
    y = _as_2d(as_binary_labels(y_true, "y_true"), "y_true")
    p = _as_2d(as_binary_labels(y_pred, "y_pred"), "y_pred")
    if y.shape != p.shape:
        raise VolfmError(f"y_true has shape {tuple(y.shape)} but y_pred has {tuple(p.shape)}; "
                         "pass one prediction per label")
    if y.shape[1] == 0:
        return math.nan
    tp = np.sum(y & p, axis=0)
    fp = np.sum(~y & p, axis=0)
    fn = np.sum(y & ~p, axis=0)
    return float(np.mean([_f1_from_counts(a, b, c, zero_division) for a, b, c in zip(tp, fp, fn)]))


def best_threshold_f1(y_true, y_score) -> dict:
    """The score threshold that maximises F1 when predicting positive for ``score >= threshold``.

    Candidates are the distinct score values (every achievable split); among equal F1 the highest
    threshold wins (fewest positive calls). Returns ``{threshold, f1, precision, recall}``; all NaN
    when there is no positive label (F1 is then 0 at every threshold, so no threshold is better).
    Choose the threshold on a validation set and apply it to the test set; picking it on the test
    set itself gives an optimistic F1.
    """
    y, s = _binary_pair(y_true, y_score)
    n_pos = int(y.sum())
    if n_pos == 0:
        return {"threshold": math.nan, "f1": math.nan, "precision": math.nan, "recall": math.nan}
    thresholds, tps, fps = _threshold_counts(y, s)
    f1 = 2 * tps / (tps + fps + n_pos)
    k = int(np.argmax(f1))  # thresholds decrease, so argmax's first hit is the highest threshold
    return {
        "threshold": float(thresholds[k]),
        "f1": float(f1[k]),
        "precision": float(tps[k] / (tps[k] + fps[k])),
        "recall": float(tps[k] / n_pos),
    }
