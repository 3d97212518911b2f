"""Segmentation metrics: per-class Dice and percentile Hausdorff distance (HD95) in millimetres.

The numbers come from MONAI, the reference: ``monai.metrics.compute_dice`` and
``monai.metrics.compute_hausdorff_distance(..., percentile=, spacing=)``. This module fixes the
input formats, the voxel spacing, the empty-mask protocol and the averaging, so every volfm
report computes them the same way.

Inputs: a case is an ``(I, J, K)`` or ``(1, I, J, K)`` integer label map (values ``0..C-1``) or a
``(C, I, J, K)`` binary one-hot array, as numpy arrays or torch tensors; prediction and target may
use different forms. ``spacing`` is the voxel size in mm along I, J, K (the store's
``meta.json["spacing"]``); surface distances are Euclidean in mm.

Protocol
--------
- Dice of class c is ``2 |P & T| / (|P| + |T|)`` (MONAI ``compute_dice``). A target that holds the
  class (``|T| > 0``) always has a Dice; a missed class (nothing predicted) scores 0.
- Target without the class, ``ignore_empty=True`` (default, MONAI's default): Dice is NaN whatever was
  predicted -- there is nothing to overlap with. ``ignore_empty=False`` (MONAI's other option): Dice
  is 1 when the prediction is empty too, 0 when something was predicted. Either way the values are
  exactly MONAI's ``DiceMetric(ignore_empty=...)``. (nnU-Net v2 differs only in the both-empty
  case: NaN, with 0 for a false positive.)
- HD is the larger of the two directed ``percentile``-th percentile distances between the surface
  voxels of P and T (``percentile=None`` gives the maximum, the plain Hausdorff distance), exactly
  MONAI's ``compute_hausdorff_distance``. It needs both surfaces: when the prediction or the target
  (or both) is empty the HD is NaN, never inf, and ``status`` says which side was empty.
- ``status`` per class: ``ok`` (both present), ``pred_empty`` (in the target, nothing predicted: a
  miss), ``target_empty`` (predicted, absent from the target: a false positive), ``both_empty``.
- Case means (``mean_dice``, ``mean_hd95_mm``) average the scored classes that are present in the
  target (so they do not depend on ``ignore_empty``); a missed class counts with Dice 0 in the Dice
  mean but has no HD, so the HD mean is over the present classes that were also predicted. With no
  such class the mean is NaN. The names behind each rule are listed in ``present``, ``missed`` and
  ``false_positive``.
- ``ignore_index`` (label-map targets only, e.g. 255 from :class:`volfm.targets.labelmap.LabelMap`):
  voxels whose target is that value are removed from the prediction and the target of every class
  before counting, as MONAI's ``ignore_index``; a prediction may also carry the value (no class).
- Across cases (:func:`aggregate_segmentation_metrics`): per class, the mean, sample standard
  deviation (ddof=1; NaN below 2 values) and n of the finite values, plus the count of each status.

The HD key is ``hd95_mm`` for ``percentile=95``, ``hd{p}_mm`` for another percentile and ``hd_mm``
for ``percentile=None`` (see :func:`hd_key`); the mean is ``mean_`` + that key.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from volfm import VolfmError

__all__ = [
    "STATUSES",
    "hd_key",
    "segmentation_metrics",
    "batch_segmentation_metrics",
    "aggregate_segmentation_metrics",
    "as_numeric_array",
    "case_prefix",
]

STATUSES = ("ok", "pred_empty", "target_empty", "both_empty")


def hd_key(percentile: float | None) -> str:
    """Result key of the Hausdorff distance: ``hd95_mm`` for 95, ``hd99.5_mm``, ``hd_mm`` for None (maximum)."""
    return "hd_mm" if percentile is None else f"hd{float(percentile):g}_mm"


def case_prefix(case_id) -> str:
    """``"case <id>: "`` to start an error message with, or ``""`` when ``case_id`` is None."""
    return f"case {case_id}: " if case_id is not None else ""


def as_numeric_array(x, name: str, where: str) -> np.ndarray:
    """A numpy array of numbers or bools from an array or tensor; other dtypes are an error naming ``where`` + ``name``."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object or not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
        raise VolfmError(f"{where}{name} has dtype {arr.dtype}; give a numeric array (image, label map or one-hot)")
    return arr


def _integral_labels(arr: np.ndarray, name: str, where: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64, copy=False)
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise VolfmError(f"{where}{name} is a label map with non-integer values; take the argmax (or threshold) "
                         "of the network output before computing segmentation metrics")
    return arr.astype(np.int64)


def _one_hot(x, num_classes: int, name: str, where: str, ignore_index: int | None):
    """(C, I, J, K) bool masks of ``x`` and, for a label map, the values of ``x`` (else None)."""
    arr = as_numeric_array(x, name, where)
    if arr.ndim == 4 and arr.shape[0] == 1 and num_classes > 1:
        arr = arr[0]
    if arr.ndim == 3:
        labels = _integral_labels(arr, name, where)
        bad = (labels < 0) | (labels >= num_classes)
        if ignore_index is not None:
            bad &= labels != ignore_index
        if bad.any():
            vals = np.unique(labels[bad])
            shown = ", ".join(str(v) for v in vals[:10]) + (", ..." if len(vals) > 10 else "")
            raise VolfmError(f"{where}{name} holds label values [{shown}] outside 0..{num_classes - 1} "
                             f"(num_classes={num_classes}); remap them with volfm.targets.labelmap.LabelMap or "
                             "raise num_classes")
        masks = labels[None] == np.arange(num_classes).reshape(-1, 1, 1, 1)
        return masks, labels
    if arr.ndim == 4 and arr.shape[0] == num_classes:
        if arr.dtype != bool:
            if not np.isin(arr, (0, 1)).all():
                raise VolfmError(f"{where}{name} is one-hot (C={num_classes}) but holds values other than 0 and 1; "
                                 "threshold or argmax the network output first")
            arr = arr.astype(bool)
        return arr, None
    raise VolfmError(f"{where}{name} has shape {tuple(arr.shape)}; expected (I, J, K) or (1, I, J, K) labels or "
                     f"(C, I, J, K) one-hot with C = num_classes = {num_classes}")


def _spacing(spacing, where: str) -> tuple[float, float, float]:
    try:
        sp = tuple(float(s) for s in np.asarray(spacing, dtype=float).reshape(-1))
    except (TypeError, ValueError):
        sp = ()
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise VolfmError(f"{where}spacing must be three positive voxel sizes in mm (along I, J, K), got {spacing!r}; "
                         "take it from the store's meta.json 'spacing'")
    return sp


def _class_names(class_names, num_classes: int) -> list[str]:
    if class_names is None:
        return ["background"] + [f"class_{c}" for c in range(1, num_classes)]
    if hasattr(class_names, "class_names"):  # a LabelMap
        class_names = class_names.class_names
    if isinstance(class_names, Mapping):  # value -> name, as volfm.synth.ct.LABELS
        missing = [c for c in range(num_classes) if c not in class_names]
        if missing:
            raise VolfmError(f"class_names has no name for label value(s) {missing}; give a name for each of "
                             f"0..{num_classes - 1}")
        names = [str(class_names[c]) for c in range(num_classes)]
    else:
        names = [str(n) for n in class_names]
        if len(names) != num_classes:
            raise VolfmError(f"class_names has {len(names)} names for num_classes={num_classes} (background "
                             "included); give one name per class")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise VolfmError(f"class_names has duplicates ({', '.join(dupes)}); names must be unique")
    return names


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def segmentation_metrics(pred, target, num_classes: int, spacing, class_names=None, *,
                         include_background: bool = False, percentile: float | None = 95,
                         ignore_empty: bool = True, ignore_index: int | None = None, case_id=None) -> dict:
    """Per-class Dice and HD (mm) of one case, with the case means; protocol in the module docstring.

    pred, target: ``(I, J, K)`` / ``(1, I, J, K)`` label maps or ``(C, I, J, K)`` one-hot (numpy or torch).
    num_classes: C, background included. spacing: voxel size (mm) along I, J, K.
    class_names: one name per class (a list, a value -> name mapping such as ``synth_ct.LABELS``, or a
    ``LabelMap``); default ``background, class_1, ...``.

    Returns ``{"case_id", "classes": {name: {"label", "dice", <hd key>, "pred_voxels", "target_voxels",
    "status"}}, "mean_dice", "mean_<hd key>", "present", "missed", "false_positive", "spacing",
    "percentile", "ignore_empty"}`` with plain Python numbers.
    """
    where = case_prefix(case_id)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise VolfmError(f"{where}num_classes must be an integer >= 2 (background included), got {num_classes!r}")
    num_classes = int(num_classes)
    if percentile is not None and not 0 <= float(percentile) <= 100:
        raise VolfmError(f"{where}percentile must be in [0, 100] or None (maximum), got {percentile!r}")
    sp = _spacing(spacing, where)
    names = _class_names(class_names, num_classes)
    p, _ = _one_hot(pred, num_classes, "prediction", where, ignore_index)
    t, t_labels = _one_hot(target, num_classes, "target", where, ignore_index)
    if p.shape[1:] != t.shape[1:]:
        raise VolfmError(f"{where}prediction grid {tuple(p.shape[1:])} differs from target grid {tuple(t.shape[1:])}; "
                         "resample the prediction onto the target's grid first")
    if ignore_index is not None:
        if t_labels is None:
            raise VolfmError(f"{where}ignore_index={ignore_index} needs the target as a label map, not one-hot")
        valid = t_labels != ignore_index
        if not valid.all():
            p = p & valid
            t = t & valid

    dice = compute_dice(torch.from_numpy(p[None]), torch.from_numpy(t[None]), include_background=True,
                        ignore_empty=ignore_empty)[0]
    key = hd_key(percentile)
    first = 0 if include_background else 1
    classes, present, missed, false_pos = {}, [], [], []
    for c in range(first, num_classes):
        n_pred, n_target = int(p[c].sum()), int(t[c].sum())
        status = ("ok" if n_target else "target_empty") if n_pred else ("pred_empty" if n_target else "both_empty")
        hd = math.nan
        if status == "ok":
            with warnings.catch_warnings():  # MONAI's own use of its deprecated get_mask_edges argument
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
                hd = float(compute_hausdorff_distance(
                    torch.from_numpy(p[c][None, None]), torch.from_numpy(t[c][None, None]), include_background=True,
                    percentile=percentile, spacing=list(sp))[0, 0])
        classes[names[c]] = {"label": c, "dice": float(dice[c]), key: hd, "pred_voxels": n_pred,
                             "target_voxels": n_target, "status": status}
        if n_target:
            present.append(names[c])
        if status == "pred_empty":
            missed.append(names[c])
        elif status == "target_empty":
            false_pos.append(names[c])
    return {
        "case_id": case_id,
        "classes": classes,
        "mean_dice": _mean([classes[n]["dice"] for n in present]),
        f"mean_{key}": _mean([classes[n][key] for n in present if classes[n]["status"] == "ok"]),
        "present": present,
        "missed": missed,
        "false_positive": false_pos,
        "spacing": list(sp),
        "percentile": percentile,
        "ignore_empty": bool(ignore_empty),
    }


def batch_segmentation_metrics(pred, target, num_classes: int, spacing, class_names=None, *,
                               include_background: bool = False, percentile: float | None = 95,
                               ignore_empty: bool = True, ignore_index: int | None = None,
                               case_ids: Sequence | None = None) -> dict:
    """:func:`segmentation_metrics` for each case of a batch, and their aggregate.

    pred, target: ``(B, I, J, K)`` / ``(B, 1, I, J, K)`` label maps or ``(B, C, I, J, K)`` one-hot.
    spacing: one ``(3,)`` spacing for all cases or ``(B, 3)``, one per case. case_ids: B ids (default 0..B-1).
    Returns ``{"cases": [per-case results], "aggregate": aggregate_segmentation_metrics(cases)}``.
    """
    n = len(pred)
    if len(target) != n:
        raise VolfmError(f"prediction batch has {n} cases but target batch has {len(target)}")
    sp = np.asarray(spacing, dtype=float)
    if sp.ndim == 2 and sp.shape[0] != n:
        raise VolfmError(f"spacing has {sp.shape[0]} rows for a batch of {n} cases; give one (3,) spacing or (B, 3)")
    ids = list(range(n)) if case_ids is None else list(case_ids)
    if len(ids) != n:
        raise VolfmError(f"case_ids has {len(ids)} ids for a batch of {n} cases")
    cases = [segmentation_metrics(pred[b], target[b], num_classes, sp[b] if sp.ndim == 2 else sp, class_names,
                                  include_background=include_background, percentile=percentile,
                                  ignore_empty=ignore_empty, ignore_index=ignore_index, case_id=ids[b])
             for b in range(n)]
    return {"cases": cases, "aggregate": aggregate_segmentation_metrics(cases)}


def _stats(values: Iterable[float]) -> dict:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    return {"mean": float(v.mean()) if len(v) else math.nan,
            "std": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
            "n": int(len(v))}


def aggregate_segmentation_metrics(case_results: Iterable[dict]) -> dict:
    """Per-class mean, std (ddof=1) and n over cases of the finite Dice/HD values, and status counts.

    Returns ``{"n_cases", "classes": {name: {"dice": {mean, std, n}, <hd key>: {...}, "status": {status:
    count}}}, "mean_dice": {...}, "mean_<hd key>": {...}}``; the last two summarise the case means.
    """
    cases = list(case_results)
    keys = {hd_key(c.get("percentile")) for c in cases}
    if len(keys) > 1:
        raise VolfmError(f"cannot aggregate cases computed with different percentiles ({', '.join(sorted(keys))})")
    key = keys.pop() if keys else hd_key(95)
    names = list(dict.fromkeys(n for c in cases for n in c["classes"]))
    classes = {}
    for name in names:
        rows = [c["classes"][name] for c in cases if name in c["classes"]]
        classes[name] = {"dice": _stats(r["dice"] for r in rows), key: _stats(r[key] for r in rows),
                         "status": {s: sum(r["status"] == s for r in rows) for s in STATUSES}}
    return {"n_cases": len(cases), "classes": classes,
            "mean_dice": _stats(c["mean_dice"] for c in cases),
            f"mean_{key}": _stats(c[f"mean_{key}"] for c in cases)}
