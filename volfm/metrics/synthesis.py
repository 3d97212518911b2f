"""Image-to-image synthesis metrics (e.g. MRI -> PET): MAE, PSNR, 3D SSIM, 3D MS-SSIM and regional uptake.

The formulas are the standard ones (and equal MONAI's ``PSNRMetric``, ``SSIMMetric`` and
``MultiScaleSSIMMetric`` with ``spatial_dims=3``, Gaussian kernel, sigma 1.5, k1 0.01, k2 0.03, on
unmasked volumes). This module fixes the intensity range, the mask rule, the window and the
reporting, so every volfm synthesis report computes them the same way.

Inputs: ``pred`` and ``target`` are ``(I, J, K)`` or ``(C, I, J, K)`` float arrays (numpy or torch)
of the same shape, finite everywhere. ``mask`` (brain/body) is an ``(I, J, K)``, ``(1, I, J, K)`` or
``(C, I, J, K)`` array, nonzero inside, applied to every channel; ``None`` means every voxel. With
several channels, every number pools all channels' voxels (no per-channel average).

Protocol
--------
- Intensity range: ``data_range=(lo, hi)`` in the images' own units (e.g. SUV ``(0, 10)``, MRI
  scanner units). Both images are clipped to ``[lo, hi]`` and scaled with ``(x - lo) / (hi - lo)``
  to ``[0, 1]`` before PSNR, SSIM and MS-SSIM, which then use a data range of 1. ``data_range=None``
  takes the target's ``[min, max]`` inside the mask; the range used and where it came from are
  recorded (``protocol.data_range``, ``protocol.data_range_source``). A per-case range makes cases
  less comparable (and clips predictions above the target's maximum): give one fixed range per
  cohort and modality when numbers are to be compared.
- MAE: mean ``|pred - target|`` over the mask voxels, in the ORIGINAL units (no clipping, no scaling).
- PSNR: ``10 log10(1 / MSE)`` dB, MSE over the mask voxels of the scaled images. Identical images
  (MSE 0) give ``+inf`` as a float (``float("inf")``; ``json.dumps`` writes it as ``Infinity``, as it
  writes ``NaN`` for missing values); ``mse_scaled`` is reported alongside.
- SSIM (3D): Gaussian window of ``w`` samples per axis at integer offsets ``-r..r`` (``r = (w-1)/2``),
  sigma 1.5 voxels, normalised to sum 1 (separable, MONAI's kernel); ``C1 = (0.01)^2``,
  ``C2 = (0.03)^2`` (K1, K2 times the data range 1); local variances are the biased
  ``E[x^2] - E[x]^2`` (as MONAI). Local statistics use valid filtering (no padding), so the SSIM map
  exists at the voxels whose window fits inside the volume -- at least ``r`` voxels from every face
  -- as in MONAI (and scikit-image, which crops that rim before averaging). The map is computed on
  the FULL scaled images and only AVERAGED inside the mask: the SSIM of a mask voxel near the mask's
  edge sees the outside voxels within ``r`` (Chebyshev distance) of it, never voxels farther away.
  Mask voxels in the border rim have no SSIM value; their count is ``ssim_unscored_mask_voxels``
  (and a note is added). No scored voxel -> NaN.
- Window: ``w = 11`` (the standard); when the smallest side is below 22 voxels ``w = 7`` (sigma
  stays 1.5), so the map still covers about half of every side; a side below 7 is refused (pass
  ``win_size`` to choose another odd window).
- MS-SSIM (3D): 5 scales, weights ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)`` (Wang et al. 2003).
  Between scales both images are 2x2x2 average-pooled (odd sides floored). Scales 1-4 contribute the
  mean contrast-structure term ``cs``, scale 5 the mean SSIM; each is clamped at 0 (as MONAI) and
  MS-SSIM is the weighted geometric product. With a mask, the mask is pooled the same way and a voxel
  counts at a scale where its pooled mask is >= 0.5. The window is 11 unless ``win_size`` is given
  (no small-volume reduction); every side must keep a full window at the coarsest scale,
  ``floor(side / 16) >= w`` (side >= 176 for w = 11; MONAI's condition -- the often quoted
  ``(w - 1) * 16 + 1`` leaves a coarsest side of ``w - 1``, smaller than the window). Too small:
  NaN and a note, no error.
- Regional uptake (``labels`` given): an integer ``(I, J, K)`` label map on the same grid, single-
  channel images only. For each label value v != 0 present, the region is ``labels == v`` (the mask
  is not applied); the region means of pred and target in original units give ``error = pred - target``
  (signed bias), ``abs_error``, ``rel_error_pct = 100 * error / |target mean|`` and its absolute value
  (NaN when the target mean is 0). With ``reference_label`` (e.g. cerebellum or whole brain for FDG)
  each image is divided by its own reference-region mean (SUVR) and the same errors are given for the
  SUVRs (``suvr_*`` keys). Summary: the mean over regions of the absolute errors; the SUVR summary
  leaves out the reference region (its SUVR is 1 in both images).

Results are plain Python numbers (NaN for "not computable", inf only for PSNR of identical images)
and lists, so ``json.dumps`` writes them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

from volfm import VolfmError
from volfm.metrics.segmentation import as_numeric_array, case_prefix  # one copy of the input checks

__all__ = [
    "SSIM_SIGMA",
    "SSIM_K1",
    "SSIM_K2",
    "MS_SSIM_WEIGHTS",
    "default_win_size",
    "resolve_data_range",
    "masked_mae",
    "masked_psnr",
    "ssim3d",
    "ms_ssim3d",
    "regional_uptake_error",
    "synthesis_metrics",
]

SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_WIN = 11
SSIM_SMALL_WIN = 7
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# ----------------------------------------------------------------------------------- inputs

def _images(pred, target, where: str) -> tuple[np.ndarray, np.ndarray]:
    """pred, target as float64 (C, I, J, K), checked for shape and finiteness."""
    p = as_numeric_array(pred, "prediction", where).astype(np.float64)
    t = as_numeric_array(target, "target", where).astype(np.float64)
    if p.shape != t.shape:
        raise VolfmError(f"{where}prediction shape {tuple(p.shape)} differs from target shape {tuple(t.shape)}; "
                         "resample the prediction onto the target's grid first")
    if t.ndim not in (3, 4):
        raise VolfmError(f"{where}images have shape {tuple(t.shape)}; expected (I, J, K) or (C, I, J, K)")
    for name, a in (("prediction", p), ("target", t)):
        bad = ~np.isfinite(a)
        if bad.any():
            raise VolfmError(f"{where}{name} has {int(bad.sum())} NaN/inf voxel(s) (first at "
                             f"{tuple(int(i) for i in np.argwhere(bad)[0])}); fill them before scoring")
    if t.ndim == 3:
        p, t = p[None], t[None]
    return p, t


def _mask(mask, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Boolean (C, I, J, K) mask broadcast to the images' shape (all True for None)."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = as_numeric_array(mask, "mask", where)
    if m.ndim == 3:
        m = m[None]
    if m.ndim != 4 or m.shape[1:] != shape[1:] or m.shape[0] not in (1, shape[0]):
        raise VolfmError(f"{where}mask shape {tuple(m.shape)} does not fit images of shape {shape}; give an "
                         f"(I, J, K) mask on the images' grid {shape[1:]}")
    m = np.broadcast_to(m != 0, shape)
    if not m.any():
        raise VolfmError(f"{where}mask is empty; nothing to score (check the brain/body mask)")
    return m


def resolve_data_range(target, mask=None, data_range=None, *, case_id=None) -> tuple[tuple[float, float], str]:
    """``((lo, hi), source)``: the given range (source ``"given"``) or the target's [min, max] inside the
    mask (``"target_min_max_in_mask"``)."""
    where = case_prefix(case_id)
    if data_range is None:
        t = as_numeric_array(target, "target", where).astype(np.float64)
        t4 = t[None] if t.ndim == 3 else t
        vals = t4[_mask(mask, t4.shape, where)]
        lo, hi, source = float(vals.min()), float(vals.max()), "target_min_max_in_mask"
        if not hi > lo:
            raise VolfmError(f"{where}the target is constant ({lo:g}) inside the mask, so it gives no intensity "
                             "range; pass data_range=(lo, hi) explicitly")
        return (lo, hi), source
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise VolfmError(f"{where}data_range must be a pair (lo, hi) in the images' units, got {data_range!r}; "
                         "e.g. (0, 10) for SUV") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise VolfmError(f"{where}data_range must have finite lo < hi, got {data_range!r}")
    return (lo, hi), "given"


def _scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip(x, lo, hi) - lo) / (hi - lo)


def default_win_size(shape: Sequence[int]) -> int:
    """SSIM window for a volume of spatial ``shape``: 11, or 7 when the smallest side is below 22."""
    return SSIM_WIN if min(shape) >= 2 * SSIM_WIN else SSIM_SMALL_WIN


def _win_size(win_size, spatial: tuple[int, ...], where: str) -> int:
    w = default_win_size(spatial) if win_size is None else win_size
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1 or w % 2 == 0:
        raise VolfmError(f"{where}win_size must be a positive odd integer, got {win_size!r}")
    if min(spatial) < w:
        raise VolfmError(f"{where}volume {spatial} is smaller than the {w}-voxel SSIM window along an axis; "
                         "pass a smaller odd win_size or score a larger volume")
    return int(w)


# ----------------------------------------------------------------------------------- SSIM core
def _gaussian_1d(w: int, sigma: float) -> np.ndarray:
    d = np.arange(w, dtype=np.float64) - (w - 1) / 2
    g = np.exp(-0.5 * (d / sigma) ** 2)
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable filtering of a (N, I, J, K) float64 array with ``g`` along I, J, K, valid part only (no padding)."""
    r = (len(g) - 1) // 2
    for axis in (1, 2, 3):
        x = ndi.correlate1d(x, g, axis=axis, mode="constant")  # padded values only reach the cropped rim
        x = x[(slice(None),) * axis + (slice(r, x.shape[axis] - r),)]
    return x


def _ssim_cs_maps(x: np.ndarray, y: np.ndarray, w: int, sigma: float, k1: float, k2: float):
    """Valid SSIM and cs maps, (C, I-w+1, J-w+1, K-w+1), of two [0, 1]-scaled (C, I, J, K) images."""
    c = x.shape[0]
    stats = _filter_valid(np.concatenate([x, y, x * x, y * y, x * y]), _gaussian_1d(w, sigma))
    mu_x, mu_y, m_xx, m_yy, m_xy = (stats[i * c:(i + 1) * c] for i in range(5))
    var_x, var_y, cov = m_xx - mu_x * mu_x, m_yy - mu_y * mu_y, m_xy - mu_x * mu_y
    c1, c2 = k1 ** 2, k2 ** 2  # data range 1
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs
    return ssim, cs


def _avg_pool2(a: np.ndarray) -> np.ndarray:
    """2x2x2 average pooling of a (C, I, J, K) array, odd sides floored (torch ``avg_pool3d(2)``)."""
    c, i, j, k = a.shape[0], a.shape[1] // 2, a.shape[2] // 2, a.shape[3] // 2
    return a[:, :2 * i, :2 * j, :2 * k].reshape(c, i, 2, j, 2, k, 2).mean(axis=(2, 4, 6))


def _interior(m: np.ndarray, w: int) -> np.ndarray:
    """The part of a (C, I, J, K) array at the voxels where a w-window fits (the valid-map grid)."""
    r = (w - 1) // 2
    return m[:, r:m.shape[1] - r, r:m.shape[2] - r, r:m.shape[3] - r]


def _prepare(pred, target, mask, data_range, case_id):
    where = case_prefix(case_id)
    p, t = _images(pred, target, where)
    m = _mask(mask, t.shape, where)
    (lo, hi), source = resolve_data_range(t, m, data_range, case_id=case_id)
    return p, t, m, (lo, hi), source, where


# ----------------------------------------------------------------------------------- metrics
def masked_mae(pred, target, mask=None, *, case_id=None) -> float:
    """Mean absolute error over the mask voxels, in the images' original units (no clipping)."""
    where = case_prefix(case_id)
    p, t = _images(pred, target, where)
    m = _mask(mask, t.shape, where)
    return float(np.abs(p[m] - t[m]).mean())


def _mse_psnr(p, t, m, lo, hi) -> tuple[float, float]:
    mse = float(np.mean((_scale(p[m], lo, hi) - _scale(t[m], lo, hi)) ** 2))
    return mse, (math.inf if mse == 0.0 else float(10.0 * math.log10(1.0 / mse)))


def masked_psnr(pred, target, mask=None, data_range=None, *, case_id=None) -> float:
    """PSNR in dB, ``10 log10(1 / MSE)`` over the mask voxels of the images clipped to ``data_range`` and
    scaled to [0, 1]; ``inf`` for identical images. ``data_range=None``: the target's range in the mask."""
    p, t, m, (lo, hi), _, _ = _prepare(pred, target, mask, data_range, case_id)
    return _mse_psnr(p, t, m, lo, hi)[1]


def _ssim(p, t, m, lo, hi, w, sigma, k1, k2):
    ssim_map, _ = _ssim_cs_maps(_scale(p, lo, hi), _scale(t, lo, hi), w, sigma, k1, k2)
    inside = _interior(m, w)
    value = float(ssim_map[inside].mean()) if inside.any() else math.nan
    return value, ssim_map, int(m.sum() - inside.sum())


def ssim3d(pred, target, mask=None, data_range=None, *, win_size: int | None = None, sigma: float = SSIM_SIGMA,
           k1: float = SSIM_K1, k2: float = SSIM_K2, return_map: bool = False, case_id=None):
    """3D SSIM averaged over the mask (protocol in the module docstring).

    ``return_map=True`` returns ``(ssim, map)``: the SSIM map on the images' shape (``(I, J, K)`` or
    ``(C, I, J, K)``), NaN in the border rim where the window does not fit.
    """
    p, t, m, (lo, hi), _, where = _prepare(pred, target, mask, data_range, case_id)
    w = _win_size(win_size, t.shape[1:], where)
    value, ssim_map, _ = _ssim(p, t, m, lo, hi, w, sigma, k1, k2)
    if not return_map:
        return value
    r = (w - 1) // 2
    full = np.full(t.shape, np.nan)
    full[:, r:t.shape[1] - r, r:t.shape[2] - r, r:t.shape[3] - r] = ssim_map
    return value, (full[0] if np.ndim(target) == 3 else full)


def _ms_ssim_size_note(spatial, w, n_scales) -> str | None:
    need = w * 2 ** (n_scales - 1)
    if min(spatial) < need:
        return (f"MS-SSIM not computed: every side must be >= {need} voxels ({n_scales} scales, window {w}: the "
                f"coarsest scale must hold a full window), volume is {tuple(int(s) for s in spatial)}")
    return None


def _ms_ssim(p, t, m, lo, hi, w, sigma, k1, k2, weights):
    x, y = _scale(p, lo, hi), _scale(t, lo, hi)
    mk = m.astype(np.float64)
    values = []
    for s in range(len(weights)):
        ssim_map, cs_map = _ssim_cs_maps(x, y, w, sigma, k1, k2)
        inside = _interior(mk >= 0.5, w)
        if not inside.any():
            return math.nan
        values.append((ssim_map if s == len(weights) - 1 else cs_map)[inside].mean())
        if s < len(weights) - 1:
            x, y, mk = _avg_pool2(x), _avg_pool2(y), _avg_pool2(mk)
    v = np.maximum(np.asarray(values), 0.0)
    return float(np.prod(v ** np.asarray(weights, dtype=np.float64)))


def ms_ssim3d(pred, target, mask=None, data_range=None, *, win_size: int = SSIM_WIN, sigma: float = SSIM_SIGMA,
              k1: float = SSIM_K1, k2: float = SSIM_K2, weights: Sequence[float] = MS_SSIM_WEIGHTS,
              case_id=None) -> float:
    """3D multi-scale SSIM (module docstring); NaN when a side is below ``win_size * 2**(len(weights)-1)``."""
    p, t, m, (lo, hi), _, where = _prepare(pred, target, mask, data_range, case_id)
    w = _win_size(win_size, t.shape[1:], where)
    if _ms_ssim_size_note(t.shape[1:], w, len(weights)):
        return math.nan
    return _ms_ssim(p, t, m, lo, hi, w, sigma, k1, k2, tuple(weights))


# ----------------------------------------------------------------------------------- regions
def _region_names(names, values: list[int]) -> dict[int, str]:
    if names is None:
        return {v: f"label_{v}" for v in values}
    if hasattr(names, "class_names"):  # a volfm LabelMap
        names = names.class_names
    if isinstance(names, Mapping):
        items = list(names.items())
        if items and all(isinstance(k, str) for k, _ in items):  # name -> value, as synth_mripet.LABELS
            out = {int(v): str(k) for k, v in items}
        else:
            out = {int(k): str(v) for k, v in items}
    else:
        out = {i: str(n) for i, n in enumerate(names)}
    missing = [v for v in values if v not in out]
    if missing:
        raise VolfmError(f"names has no name for label value(s) {missing}; give a name for every region value "
                         "(a list indexed by value, or a value -> name / name -> value mapping)")
    chosen = [out[v] for v in values]
    dupes = sorted({n for n in chosen if chosen.count(n) > 1})
    if dupes:
        raise VolfmError(f"names has duplicates ({', '.join(dupes)}); region names must be unique")
    return {v: out[v] for v in values}


def _errors(pred_v: float, target_v: float, prefix: str = "") -> dict:
    err = pred_v - target_v
    rel = 100.0 * err / abs(target_v) if target_v != 0 else math.nan
    return {f"{prefix}error": err, f"{prefix}abs_error": abs(err),
            f"{prefix}rel_error_pct": rel, f"{prefix}abs_rel_error_pct": abs(rel)}


def _mean_finite(values) -> float:
    v = [x for x in values if math.isfinite(x)]
    return float(sum(v) / len(v)) if v else math.nan


def regional_uptake_error(pred, target, labels, reference_label=None, names=None, *, case_id=None) -> dict:
    """Region-wise mean-uptake error (and SUVR error with ``reference_label``); protocol in the module docstring.

    labels: integer ``(I, J, K)`` (or ``(1, I, J, K)``) map on the images' grid; 0 is not a region.
    reference_label: a label value or its name. names: a list indexed by value, a value -> name or
    name -> value mapping (e.g. ``synth_mripet.LABELS``) or a LabelMap; default ``label_<v>``.

    Returns ``{"regions": {name: {"label", "voxels", "pred_mean", "target_mean", "error", "abs_error",
    "rel_error_pct", "abs_rel_error_pct"[, "pred_suvr", "target_suvr", "suvr_error", "suvr_abs_error",
    "suvr_rel_error_pct", "suvr_abs_rel_error_pct"]}}, "reference_label", "reference_name",
    "mean_abs_error", "mean_abs_rel_error_pct"[, "mean_suvr_abs_error", "mean_suvr_abs_rel_error_pct"]}``.
    """
    where = case_prefix(case_id)
    p, t = _images(pred, target, where)
    if p.shape[0] != 1:
        raise VolfmError(f"{where}regional uptake needs single-channel images, got {p.shape[0]} channels; "
                         "score one channel (e.g. pred[0], target[0]) at a time")
    p, t = p[0], t[0]
    lab = as_numeric_array(labels, "labels", where)
    if lab.ndim == 4 and lab.shape[0] == 1:
        lab = lab[0]
    if lab.shape != t.shape:
        raise VolfmError(f"{where}labels shape {tuple(lab.shape)} differs from the images' grid {tuple(t.shape)}; "
                         "resample the label map (nearest neighbour) onto the target's grid")
    if lab.dtype != bool and not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
            raise VolfmError(f"{where}labels holds non-integer values; give an integer label/atlas map")
    lab = lab.astype(np.int64)
    values = [int(v) for v in np.unique(lab) if v != 0]
    if not values:
        raise VolfmError(f"{where}labels has no region (only 0); give a label map with nonzero region values")
    region_names = _region_names(names, values)

    ref_value = None
    if reference_label is not None:
        if isinstance(reference_label, str):
            by_name = {n: v for v, n in region_names.items()}
            if reference_label not in by_name:
                raise VolfmError(f"{where}reference_label '{reference_label}' is not a region name here "
                                 f"({', '.join(by_name)})")
            ref_value = by_name[reference_label]
        else:
            ref_value = int(reference_label)
            if ref_value not in region_names:
                raise VolfmError(f"{where}reference_label {ref_value} does not occur in labels (values {values}); "
                                 "pick a region that is present, e.g. cerebellum or whole brain for FDG")
    regions = {}
    for v in values:
        sel = lab == v
        pm, tm = float(p[sel].mean()), float(t[sel].mean())
        regions[region_names[v]] = {"label": v, "voxels": int(sel.sum()), "pred_mean": pm, "target_mean": tm,
                                    **_errors(pm, tm)}
    out = {"regions": regions, "reference_label": ref_value,
           "reference_name": region_names[ref_value] if ref_value is not None else None,
           "mean_abs_error": _mean_finite(r["abs_error"] for r in regions.values()),
           "mean_abs_rel_error_pct": _mean_finite(r["abs_rel_error_pct"] for r in regions.values())}
    if ref_value is not None:
        ref = regions[region_names[ref_value]]
        if ref["pred_mean"] == 0 or ref["target_mean"] == 0:
            raise VolfmError(f"{where}reference region '{region_names[ref_value]}' has mean 0 in the "
                             f"{'prediction' if ref['pred_mean'] == 0 else 'target'}; SUVR is undefined -- "
                             "choose a reference region with uptake")
        for r in regions.values():
            ps, ts = r["pred_mean"] / ref["pred_mean"], r["target_mean"] / ref["target_mean"]
            r.update({"pred_suvr": ps, "target_suvr": ts, **_errors(ps, ts, "suvr_")})
        others = [r for v, r in zip(values, regions.values()) if v != ref_value]
        out["mean_suvr_abs_error"] = _mean_finite(r["suvr_abs_error"] for r in others)
        out["mean_suvr_abs_rel_error_pct"] = _mean_finite(r["suvr_abs_rel_error_pct"] for r in others)
    return out


# ----------------------------------------------------------------------------------- all together
def synthesis_metrics(pred, target, mask=None, data_range=None, labels=None, *, reference_label=None, names=None,
                      win_size: int | None = None, case_id=None) -> dict:
    """All synthesis metrics of one case and the protocol used (module docstring).

    Returns ``{"case_id", "mae", "psnr", "mse_scaled", "ssim", "ms_ssim", "n_mask_voxels",
    "ssim_unscored_mask_voxels", "regional" (regional_uptake_error result, or None), "notes": [...],
    "protocol": {...}}`` with plain Python numbers (JSON-serialisable).
    ``win_size``: SSIM and MS-SSIM window; None = 11 for MS-SSIM and the size rule for SSIM.
    """
    p, t, m, (lo, hi), source, where = _prepare(pred, target, mask, data_range, case_id)
    w = _win_size(win_size, t.shape[1:], where)
    w_ms = SSIM_WIN if win_size is None else w
    notes = []
    mse, psnr = _mse_psnr(p, t, m, lo, hi)
    ssim, _, unscored = _ssim(p, t, m, lo, hi, w, SSIM_SIGMA, SSIM_K1, SSIM_K2)
    if unscored:
        notes.append(f"SSIM: {unscored} mask voxel(s) lie within {(w - 1) // 2} voxels of the volume border, "
                     "where the window does not fit; they are not in the SSIM mean")
    if math.isnan(ssim):
        notes.append("SSIM is NaN: no mask voxel lies where the window fits")
    size_note = _ms_ssim_size_note(t.shape[1:], w_ms, len(MS_SSIM_WEIGHTS))
    if size_note:
        notes.append(size_note)
        ms = math.nan
    else:
        ms = _ms_ssim(p, t, m, lo, hi, w_ms, SSIM_SIGMA, SSIM_K1, SSIM_K2, MS_SSIM_WEIGHTS)
        if math.isnan(ms):
            notes.append("MS-SSIM is NaN: at some scale no (pooled) mask voxel lies where the window fits")
    if psnr == math.inf:
        notes.append("PSNR is inf: the clipped, scaled images are identical inside the mask (MSE 0)")
    regional = None
    if labels is not None:
        regional = regional_uptake_error(p[0] if p.shape[0] == 1 else p, t[0] if t.shape[0] == 1 else t, labels,
                                         reference_label=reference_label, names=names, case_id=case_id)
    return {
        "case_id": case_id,
        "mae": float(np.abs(p[m] - t[m]).mean()),
        "psnr": psnr,
        "mse_scaled": mse,
        "ssim": ssim,
        "ms_ssim": ms,
        "n_mask_voxels": int(m.sum()),
        "ssim_unscored_mask_voxels": unscored,
        "regional": regional,
        "notes": notes,
        "protocol": {
            "data_range": [lo, hi],
            "data_range_source": source,
            "scaling": "clip to data_range, then (x - lo) / (hi - lo); PSNR/SSIM/MS-SSIM use data range 1",
            "mask": "given" if mask is not None else "none (all voxels)",
            "mae_units": "original (unclipped)",
            "psnr": "10*log10(1/MSE) over mask voxels; inf when MSE is 0",
            "ssim_window": w,
            "ssim_sigma": SSIM_SIGMA,
            "k1": SSIM_K1,
            "k2": SSIM_K2,
            "ssim_average": "map on the full images (valid windows), averaged over mask voxels",
            "ms_ssim_window": w_ms,
            "ms_ssim_weights": list(MS_SSIM_WEIGHTS),
            "ms_ssim_pooling": "2x2x2 average; pooled mask >= 0.5",
            "regions": "labels == v for v != 0, original units; mask not applied",
        },
    }
