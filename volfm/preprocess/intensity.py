"""Intensity harmonisation: CT windowing, MRI percentile clip + z-score, PET SUV/scale.

Each function returns (Volume, params) where params records what was applied, so it can be
stored in meta.json and inverted later.
"""
from __future__ import annotations

import numpy as np

from volfm import VolfmError
from volfm.io.volume import Volume


def ct_window(volume: Volume, hu_min: float = -1000.0, hu_max: float = 1000.0, out_min: float = 0.0,
              out_max: float = 1.0) -> tuple[Volume, dict]:
    """Clip HU to [hu_min, hu_max] and map linearly to [out_min, out_max] (Merlin: [-1000, 1000] -> [0, 1])."""
    if hu_max <= hu_min:
        raise ValueError(f"ct_window needs hu_max > hu_min, got [{hu_min}, {hu_max}]")
    arr = np.clip(volume.array, hu_min, hu_max, dtype=np.float32)
    arr -= hu_min
    arr /= np.float32(hu_max - hu_min)  # divide (not multiply by a rounded 1/width): exact for [0, 1] outputs
    if out_max - out_min != 1.0:
        arr *= np.float32(out_max - out_min)
    arr += out_min
    return volume.replace(array=arr), {"type": "ct_window", "hu_min": hu_min, "hu_max": hu_max,
                                        "out_min": out_min, "out_max": out_max}


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (between-class variance maximised over a histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def foreground_mask(array: np.ndarray, method: str = "otsu") -> np.ndarray:
    """Boolean (I, J, K) foreground of a (C, I, J, K) image from its first channel."""
    x = array[0]
    if method == "all":
        return np.ones(x.shape, dtype=bool)
    if method == "nonzero":
        return x != 0
    if method == "otsu":
        sample = x[:: max(1, x.shape[0] // 64), :: max(1, x.shape[1] // 64), :: max(1, x.shape[2] // 64)].ravel()
        return x > otsu_threshold(sample)
    raise ValueError(f"foreground method must be otsu, nonzero or all, got {method!r}")


def mri_zscore(volume: Volume, lower_percentile: float = 0.5, upper_percentile: float = 99.5,
               foreground: str = "otsu", background: float | None = 0.0) -> tuple[Volume, dict]:
    """Clip to foreground percentiles, then z-score with the foreground's mean and std.

    background: value given to voxels outside the foreground after normalisation (None keeps them).
    """
    mask = foreground_mask(volume.array, foreground)
    if mask.sum() < 10:
        raise VolfmError(f"{volume.source}: MRI foreground is empty ({foreground} mask); "
                         "check the image or use foreground: all in the spec")
    out = np.empty_like(volume.array, dtype=np.float32)
    params = {"type": "mri_zscore", "foreground": foreground, "channels": []}
    for c in range(volume.num_channels):
        x = volume.array[c]
        fg = x[mask]
        lo, hi = np.percentile(fg, [lower_percentile, upper_percentile])
        fg = np.clip(fg, lo, hi)
        mean, std = float(fg.mean()), float(fg.std())
        std = std if std > 1e-8 else 1.0
        y = (np.clip(x, lo, hi) - mean) / std
        if background is not None:
            y[~mask] = background
        out[c] = y
        params["channels"].append({"clip": [float(lo), float(hi)], "mean": mean, "std": std})
    return volume.replace(array=out), params


def pet_normalize(volume: Volume, mode: str = "auto", factor: float = 1.0, clip_max: float | None = None
                  ) -> tuple[Volume, dict]:
    """PET to SUV when the DICOM tags gave a factor (mode auto/suv), else multiply by ``factor``.

    mode "suv" refuses images without an SUV factor; "scale" always uses ``factor`` (e.g. 1.0 for
    NIfTI exports already in SUV).
    """
    suv = volume.meta.get("suv_factor")
    if mode == "suv" and suv is None:
        raise VolfmError(f"{volume.source}: no SUV factor ({volume.meta.get('suv_missing', 'not a DICOM PET series')}); "
                         "use pet mode: scale with a factor in the spec")
    if mode in ("auto", "suv") and suv is not None:
        used, kind = float(suv), "suv"
    elif mode in ("auto", "scale"):
        used, kind = float(factor), "scale"
    else:
        raise ValueError(f"pet mode must be auto, suv or scale, got {mode!r}")
    arr = volume.array.astype(np.float32) * np.float32(used)
    if clip_max is not None:
        np.clip(arr, 0.0, clip_max, out=arr)
    return volume.replace(array=arr), {"type": "pet", "applied": kind, "factor": used, "clip_max": clip_max}


def apply_intensity(volume: Volume, cfg: dict | None) -> tuple[Volume, dict]:
    """Dispatch on a spec's ``intensity`` block: {type: ct_window|mri_zscore|pet|none, ...}."""
    if not cfg or cfg.get("type", "none") == "none":
        return volume, {"type": "none"}
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    fn = INTENSITY_FUNCTIONS[cfg["type"]]
    return fn(volume, **kwargs)


INTENSITY_FUNCTIONS = {"ct_window": ct_window, "mri_zscore": mri_zscore, "pet": pet_normalize}
