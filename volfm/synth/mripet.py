"""Simulated paired brain MRI (T1-like) and FDG-PET volumes for MRI<->PET synthesis experiments.

The anatomy is real: the MNI ICBM152 2009a (symmetric) T1, grey-matter and white-matter maps that
ship inside nilearn (``nilearn/datasets/data``), read directly with nibabel (no network). CSF is the
filled brain mask minus GM minus WM. Everything else is SIMULATED -- these are not patient data.

Per case (all random draws come from one seeded generator, so a seed gives the same case):

* a subject transform -- random rotation (a few degrees), per-axis scale (about +-5%), translation
  and a smooth random displacement field (a few mm) -- applied once to all template maps, so MRI, PET
  and labels are co-registered by construction;
* resampling (trilinear, torch ``grid_sample``) onto an output grid at ``spacing`` mm whose field of
  view is shifted a little and whose orientation is RAS, LPS or LAS; the written affine is the RAS
  voxel-to-world map actually used for sampling, so world positions are right in every case;
* MRI: brain-extracted T1-like image, WM > GM > CSF with per-case contrast, the template's residual
  texture, a smooth multiplicative bias field and Rician noise; integer-valued scanner units (~0..1000);
* PET: FDG-like SUV map (WM ~2-3, GM ~3-4x WM, CSF ~0.1x WM), a smooth +-5% regional variation, in
  some cases one hypometabolic lobe-like region, blurred to PET resolution (FWHM 5-7 mm), Poisson
  noise on counts and a light post-reconstruction filter;
* a label map (uint8): 0 background, 1 CSF, 2 GM, 3 WM, from the same resampled tissue maps.

Scalar draws and the coarse random fields do not depend on ``spacing``: the same seed at 2 mm and
3 mm gives the same simulated subject (only the noise realisation differs).
"""
from __future__ import annotations

import csv
import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from volfm import VolfmError
from volfm.io import Volume, write_nifti
from volfm.io.atomic import atomic_path, write_json_atomic, write_text_atomic
from volfm.store.splits import SPLIT_FRACTIONS  # noqa: F401 - re-exported
from volfm.store.splits import assign_splits as _assign_splits
from volfm.utils import parse_triple, progress_bar

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
LABELS = {"background": 0, "csf": 1, "gray_matter": 2, "white_matter": 3}
SIMULATED_NOTE = ("simulated data (volfm.synth.mripet, from the MNI ICBM152 2009a template); "
                  "not real patient images")
CSV_COLUMNS = ("case_id", "mri", "pet", "label", "split", "age", "sex", "hypometabolism", "note")

# Lobe-like regions in MNI millimetres: (centre, semi-axes). x < 0 is the subject's left.
HYPO_REGIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "left_temporal": ((-50.0, -20.0, -15.0), (18.0, 32.0, 18.0)),
    "right_temporal": ((50.0, -20.0, -15.0), (18.0, 32.0, 18.0)),
    "left_parietal": ((-40.0, -55.0, 40.0), (20.0, 26.0, 22.0)),
    "right_parietal": ((40.0, -55.0, 40.0), (20.0, 26.0, 22.0)),
    "posterior_cingulate_precuneus": ((0.0, -58.0, 32.0), (14.0, 20.0, 18.0)),
    "left_frontal": ((-35.0, 35.0, 20.0), (20.0, 28.0, 25.0)),
    "right_frontal": ((35.0, 35.0, 20.0), (20.0, 28.0, 25.0)),
    "occipital": ((0.0, -88.0, 5.0), (30.0, 16.0, 20.0)),
}
ORIENTATIONS = {"RAS": (1.0, 1.0, 1.0), "LPS": (-1.0, -1.0, 1.0), "LAS": (-1.0, 1.0, 1.0)}
_ORIENTATION_P = (0.6, 0.25, 0.15)
DEFAULT_FOV_MM = (180.0, 216.0, 180.0)

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
# World box (MNI mm) spanned by the control points of the smooth random fields.
_CTRL_BOX = ((-95.0, 95.0), (-130.0, 95.0), (-85.0, 115.0))
_CTRL_DEFORM = (5, 6, 5)
_CTRL_SMOOTH = (3, 4, 3)
_TISSUE_SHARPEN = 2.0


# ----------------------------------------------------------------------------------- templates
def nilearn_data_dir() -> Path:
    """The folder inside the installed nilearn package that holds the ICBM152 maps."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise VolfmError("nilearn is not installed; the MRI/PET simulator needs its bundled MNI ICBM152 "
                         "template files (pip install nilearn)")
    return Path(spec.origin).parent / "datasets" / "data"


def template_paths(data_dir=None) -> dict[str, Path]:
    """Paths of the T1/GM/WM template files; a VolfmError names any that is missing."""
    folder = Path(data_dir) if data_dir is not None else nilearn_data_dir()
    paths = {key: folder / name for key, name in TEMPLATE_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise VolfmError(f"MNI ICBM152 template file(s) not found: {', '.join(missing)}; they ship with "
                         "nilearn (>=0.10) in nilearn/datasets/data -- reinstall nilearn or pass data_dir= "
                         "pointing at a folder that holds them")
    return paths


@lru_cache(maxsize=1)
def _raw_template(data_dir: str | None):
    """(channels (4, I, J, K) float32 = [gm, wm, brain mask, T1 residual], affine, brain centroid mm)."""
    paths = template_paths(data_dir)
    maps, affine = {}, None
    for key, path in paths.items():
        img = nib.load(str(path))
        maps[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        if affine is None:
            affine = np.asarray(img.affine, dtype=np.float64)
        elif not np.allclose(affine, img.affine, atol=1e-4):
            raise VolfmError(f"{path}: affine differs from the T1 template's; the ICBM152 files must share a grid")
    # Crop to the brain's bounding box (plus a margin) before the morphology, for speed.
    nonzero = np.argwhere(maps["gm"] + maps["wm"] > 0.01)
    lo = np.maximum(nonzero.min(axis=0) - 10, 0)
    hi = np.minimum(nonzero.max(axis=0) + 11, maps["gm"].shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    gm, wm, t1 = (np.ascontiguousarray(maps[k][crop]) for k in ("gm", "wm", "t1"))
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    hard = ndi.binary_fill_holes(ndi.binary_closing((gm + wm) > 0.5, iterations=3))
    idx = np.argwhere(hard)
    centroid = affine[:3, :3] @ idx.mean(axis=0) + affine[:3, 3]
    mask = np.clip(ndi.gaussian_filter(hard.astype(np.float32), 1.0), 0.0, 1.0)
    mask = np.maximum(mask, np.minimum(gm + wm, 1.0))
    # The population-average maps are blurrier than one brain: sharpen the tissue mixture (power 2,
    # renormalised within the mask) so the cortex of a simulated subject is crisper.
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    power = [p ** _TISSUE_SHARPEN for p in (csf, gm, wm)]
    norm = mask / np.maximum(power[0] + power[1] + power[2], 1e-6)
    gm, wm = power[1] * norm, power[2] * norm
    # T1 texture not explained by the tissue mixture (deep grey nuclei, local contrast).
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    design = np.stack([csf[hard], gm[hard], wm[hard]], axis=1)
    beta, *_ = np.linalg.lstsq(design, t1[hard], rcond=None)
    resid = ((t1 - (beta[0] * csf + beta[1] * gm + beta[2] * wm)) * hard) / float(beta[2])
    lo = np.maximum(np.argwhere(mask > 1e-3).min(axis=0) - 6, 0)
    hi = np.minimum(np.argwhere(mask > 1e-3).max(axis=0) + 7, mask.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    chans = np.stack([gm[crop], wm[crop], mask[crop], resid[crop].astype(np.float32)])
    aff = affine.copy()
    aff[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return np.ascontiguousarray(chans), aff, centroid


@lru_cache(maxsize=2)
def _template_for_spacing(data_dir: str | None, spacing: tuple[float, float, float]):
    """The cached template pre-smoothed against aliasing at ``spacing``, as a (1, 4, I, J, K) tensor."""
    chans, affine, centroid = _raw_template(data_dir)
    tsp = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    sigma = np.sqrt(np.maximum(np.asarray(spacing) ** 2 - tsp ** 2, 0.0)) * _FWHM_TO_SIGMA / tsp
    if np.any(sigma > 0.05):
        chans = np.stack([ndi.gaussian_filter(c, sigma, truncate=3.0) for c in chans])
    return torch.from_numpy(np.ascontiguousarray(chans))[None], affine, centroid


# ----------------------------------------------------------------------------------- helpers
def _rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def _rotation(deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _basis(coords: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    """(len(coords), n) Gaussian bumps on n control points, rows L2-normalised so that a field with
    i.i.d. N(0, sd^2) coefficients has standard deviation sd everywhere."""
    centres = np.linspace(lo, hi, n)
    width = centres[1] - centres[0]
    w = np.exp(-0.5 * ((coords[:, None] - centres[None, :]) / width) ** 2)
    return w / np.sqrt((w ** 2).sum(axis=1, keepdims=True))


def _smooth_fields(coef: np.ndarray, axes_mm) -> np.ndarray:
    """Evaluate tensor-product fields coef (C, a, b, c) on the grid spanned by per-axis world coords."""
    wi, wj, wk = (_basis(x, lo, hi, n) for x, (lo, hi), n in zip(axes_mm, _CTRL_BOX, coef.shape[1:]))
    t = np.tensordot(coef, wk, axes=([3], [1]))            # (C, a, b, K)
    t = np.tensordot(t, wj, axes=([2], [1]))               # (C, a, K, J)
    t = np.tensordot(t, wi, axes=([1], [1]))               # (C, K, J, I)
    return np.ascontiguousarray(t.transpose(0, 3, 2, 1), dtype=np.float32)


def _output_grid(spacing, fov_mm, centre_mm, orientation: str):
    """RAS affine and shape of an axis-aligned grid (flips only) centred on ``centre_mm``."""
    signs = np.asarray(ORIENTATIONS[orientation])
    sp = np.asarray(spacing)
    shape = tuple(int(max(1, round(f / s))) for f, s in zip(fov_mm, sp))
    affine = np.eye(4)
    affine[:3, :3] = np.diag(signs * sp)
    affine[:3, 3] = np.asarray(centre_mm) - affine[:3, :3] @ ((np.asarray(shape) - 1.0) / 2.0)
    return affine, shape


# ----------------------------------------------------------------------------------- one case
def make_mripet_case(seed_or_rng, case_id: str, spacing=2.0, *, orientation: str | None = None,
                     hypometabolism: str | None = None, hypometabolism_prob: float = 0.3,
                     fov_mm=DEFAULT_FOV_MM, data_dir=None) -> dict:
    """Simulate one co-registered MRI/PET/label case.

    seed_or_rng: int, SeedSequence or np.random.Generator (a Generator is consumed).
    spacing: output voxel size in mm (a number or three numbers).
    orientation: 'RAS', 'LPS' or 'LAS'; None draws one (RAS 60%, LPS 25%, LAS 15%).
    hypometabolism: a key of HYPO_REGIONS or 'none' to force; None draws one with ``hypometabolism_prob``.
    data_dir: folder holding the ICBM152 files (default: nilearn's bundled data folder).

    Returns {"mri": Volume, "pet": Volume, "label": Volume, "metadata": dict}; the three volumes share
    shape and affine. MRI is integer-valued float32 (scanner units), PET float32 SUV, label uint8.
    """
    sp = parse_triple(spacing, "spacing (mm)", above=0)
    if orientation is not None and orientation not in ORIENTATIONS:
        raise VolfmError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    if hypometabolism is not None and hypometabolism != "none" and hypometabolism not in HYPO_REGIONS:
        raise VolfmError(f"hypometabolism must be 'none' or one of {', '.join(HYPO_REGIONS)}, got {hypometabolism!r}")
    data_key = None if data_dir is None else str(Path(data_dir))
    template, t_aff, t_centre = _template_for_spacing(data_key, sp)
    rng = _rng(seed_or_rng)

    # --- scalar draws (independent of spacing, always in this order)
    age = int(rng.integers(55, 86))
    sex = str(rng.choice(["F", "M"]))
    drawn_orient = str(rng.choice(list(ORIENTATIONS), p=_ORIENTATION_P))
    orient = orientation or drawn_orient
    fov_shift = rng.uniform(-6.0, 6.0, 3)
    rot_deg = rng.uniform(-4.0, 4.0, 3)
    scale = np.clip(rng.uniform(0.96, 1.04) + (0.012 if sex == "M" else -0.012) + rng.uniform(-0.015, 0.015, 3),
                    0.93, 1.07)
    translation = rng.uniform(-3.0, 3.0, 3)
    disp_sd = rng.uniform(1.5, 3.0)
    mri_wm = rng.uniform(650.0, 850.0)
    mri_gm = mri_wm * rng.uniform(0.58, 0.72)
    mri_csf = mri_wm * rng.uniform(0.15, 0.35)
    texture = rng.uniform(0.6, 1.2)
    bias_sd = rng.uniform(0.04, 0.10)
    mri_noise = mri_wm * rng.uniform(0.01, 0.03)
    suv_wm = rng.uniform(2.2, 2.8)
    gm_ratio = rng.uniform(3.2, 3.9) * (1.0 - 0.004 * (age - 70))
    suv_gm = suv_wm * gm_ratio
    suv_csf = suv_wm * rng.uniform(0.08, 0.12)
    regional_sd = rng.uniform(0.03, 0.06)
    fwhm = rng.uniform(5.0, 7.0)
    post_fwhm = rng.uniform(2.0, 3.0)
    counts_per_suv = rng.uniform(6.0, 15.0)
    drawn_hypo = list(HYPO_REGIONS)[int(rng.integers(len(HYPO_REGIONS)))] \
        if rng.random() < hypometabolism_prob else "none"
    hypo = hypometabolism or drawn_hypo
    hypo_depth = rng.uniform(0.2, 0.4) * (hypo != "none")   # always drawn: forcing keeps the stream
    coef_disp = rng.normal(0.0, disp_sd, (3, *_CTRL_DEFORM))
    coef_smooth = rng.normal(0.0, 1.0, (2, *_CTRL_SMOOTH)) * np.array([bias_sd, regional_sd])[:, None, None, None]

    # --- output grid and the subject-world -> template-voxel map
    affine, shape = _output_grid(sp, fov_mm, t_centre + fov_shift, orient)
    axes_mm = [affine[d, d] * np.arange(shape[d]) + affine[d, 3] for d in range(3)]
    disp = _smooth_fields(coef_disp, axes_mm)                         # (3, I, J, K) mm, template side
    bias, regional = _smooth_fields(coef_smooth, axes_mm)
    # template_mm = c + R^T (x - c - t) / s + u(x): the subject is the template scaled, rotated, moved.
    lin = _rotation(rot_deg).T / scale[:, None]
    off = t_centre - lin @ (t_centre + translation)
    t_inv = np.linalg.inv(t_aff)
    to_vox = t_inv[:3, :3] @ lin
    vox_off = t_inv[:3, :3] @ off + t_inv[:3, 3]
    ax = [a.astype(np.float32) for a in axes_mm]
    bshape = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    tshape = template.shape[2:]
    grid = np.empty((*shape, 3), dtype=np.float32)
    vox = []
    for r in range(3):
        v = sum(np.float32(to_vox[r, c]) * ax[c].reshape(bshape[c]) for c in range(3)) + np.float32(vox_off[r])
        v = v + sum(np.float32(t_inv[r, c]) * disp[c] for c in range(3))
        vox.append(v)
        grid[..., 2 - r] = v * np.float32(2.0 / (tshape[r] - 1)) - 1.0   # grid_sample wants (k, j, i)
    with torch.no_grad():
        sampled = F.grid_sample(template, torch.from_numpy(grid)[None], mode="bilinear",
                                padding_mode="zeros", align_corners=True)[0].numpy()
    gm, wm, mask, resid = (np.clip(sampled[c], 0.0, 1.0) if c < 3 else sampled[c] for c in range(4))
    wm = np.minimum(wm, mask)
    gm = np.minimum(gm, mask - wm)
    csf = mask - gm - wm

    label = np.argmax(np.stack([1.0 - mask, csf, gm, wm]), axis=0).astype(np.uint8)

    # --- MRI: tissue mixture + texture, bias field, Rician noise, brain-extracted
    signal = mri_wm * wm + mri_gm * gm + mri_csf * csf + texture * mri_wm * resid
    signal *= np.exp(bias)
    n1 = rng.standard_normal(shape, dtype=np.float32)
    n2 = rng.standard_normal(shape, dtype=np.float32)
    mri = np.sqrt((signal + np.float32(mri_noise) * n1) ** 2 + (np.float32(mri_noise) * n2) ** 2)
    mri = np.where(mask > 0.02, np.rint(np.clip(mri, 0.0, 32767.0)), 0.0).astype(np.float32)

    # --- PET: tissue SUVs, regional variation, hypometabolism, resolution, counts noise, post-filter
    gm_act = np.float32(suv_gm) * np.exp(regional)
    if hypo != "none":
        centre, radii = HYPO_REGIONS[hypo]
        rr2 = 0.0
        for r in range(3):   # distance in template (MNI) coordinates, so the region follows the anatomy
            world = sum(np.float32(t_aff[r, c]) * vox[c] for c in range(3)) + np.float32(t_aff[r, 3])
            rr2 = rr2 + ((world - np.float32(centre[r])) / np.float32(radii[r])) ** 2
        weight = 1.0 / (1.0 + np.exp((np.sqrt(rr2) - 1.0) / 0.15))
        gm_act = gm_act * (1.0 - np.float32(hypo_depth) * weight)
    activity = gm_act * gm + np.float32(suv_wm) * wm + np.float32(suv_csf) * csf
    sys_fwhm = math.sqrt(fwhm ** 2 - post_fwhm ** 2)
    activity = ndi.gaussian_filter(activity.astype(np.float32), sys_fwhm * _FWHM_TO_SIGMA / np.asarray(sp),
                                   truncate=3.0, mode="constant")
    kappa = counts_per_suv * float(np.prod(sp)) / 8.0                 # counts per SUV per voxel
    counts = rng.poisson(np.clip(activity, 0.0, None) * kappa).astype(np.float32)
    pet = ndi.gaussian_filter(counts / np.float32(kappa), post_fwhm * _FWHM_TO_SIGMA / np.asarray(sp),
                              truncate=3.0, mode="constant").astype(np.float32)

    meta = {
        "case_id": case_id, "simulated": True, "note": SIMULATED_NOTE,
        "template": "MNI ICBM152 2009a symmetric (nilearn bundled)",
        "age": age, "sex": sex, "hypometabolism": hypo, "hypometabolism_depth": float(hypo_depth),
        "orientation": orient, "spacing_mm": list(sp), "shape": list(shape), "affine": affine.tolist(),
        "fov_centre_mm": (t_centre + fov_shift).tolist(),
        "subject_transform": {"rotation_deg": rot_deg.tolist(), "scale": scale.tolist(),
                              "translation_mm": translation.tolist(), "displacement_sd_mm": float(disp_sd)},
        "mri": {"wm": float(mri_wm), "gm": float(mri_gm), "csf": float(mri_csf), "texture": float(texture),
                "bias_sd": float(bias_sd), "noise_sd": float(mri_noise)},
        "pet": {"suv_wm": float(suv_wm), "suv_gm": float(suv_gm), "suv_csf": float(suv_csf),
                "regional_sd": float(regional_sd), "fwhm_mm": float(fwhm), "post_filter_fwhm_mm": float(post_fwhm),
                "counts_per_suv_per_8mm3": float(counts_per_suv)},
    }
    common = {"case_id": case_id, "simulated": True}
    return {
        "mri": Volume(mri[None], affine, {**common, "modality": "MR", "units": "a.u. (T1-like)"}),
        "pet": Volume(pet[None], affine, {**common, "modality": "PT", "units": "SUVbw", "fwhm_mm": float(fwhm)}),
        "label": Volume(label[None], affine, {**common, "modality": "SEG", "labels": dict(LABELS)}),
        "metadata": meta,
    }


# ----------------------------------------------------------------------------------- cohort
def assign_splits(n_cases: int, seed: int = 0) -> list[str]:
    """Deterministic ~70/15/15 train/val/test split of this cohort's case indices."""
    return _assign_splits(n_cases, seed, salt=0x5EED5)


def _readme(n_cases: int, seed: int, spacing) -> str:
    return (
        "SIMULATED paired brain MRI / FDG-PET cohort -- NOT real patient data.\n\n"
        f"Made by volfm.synth.mripet.make_mripet_cohort(n_cases={n_cases}, seed={seed}, spacing={spacing}).\n"
        "Anatomy: the MNI ICBM152 2009a symmetric T1/GM/WM templates (bundled with nilearn), randomly\n"
        "deformed per case; MRI is a brain-extracted T1-like image (arbitrary units), PET an FDG-like map\n"
        "in SUV, label a tissue map. MRI, PET and label of a case share one grid (shape and RAS affine).\n\n"
        "cohort.csv columns: " + ", ".join(CSV_COLUMNS) + ".\n"
        "The mri/pet/label paths are relative to the folder that holds cohort.csv.\n"
        "hypometabolism: the lobe-like region whose grey-matter uptake was lowered, or 'none'.\n"
        "labels.json: label value of each tissue (0 background, 1 CSF, 2 grey matter, 3 white matter).\n"
    )


def make_mripet_cohort(out_dir, n_cases: int, seed: int = 0, spacing=2.0, progress: bool = True) -> Path:
    """Write a simulated cohort and return the path of its ``cohort.csv``.

    Layout: out_dir/mri/<id>.nii.gz (int16), out_dir/pet/<id>.nii.gz (float32 SUV),
    out_dir/label/<id>.nii.gz (uint8), out_dir/labels.json, out_dir/README.txt, out_dir/cohort.csv.
    CSV paths are relative to the CSV's folder (POSIX separators). Case i depends only on (seed, i).
    """
    if int(n_cases) < 1:
        raise VolfmError(f"n_cases must be at least 1, got {n_cases!r}")
    n_cases = int(n_cases)
    sp = parse_triple(spacing, "spacing (mm)", above=0)
    out = Path(out_dir)
    for sub in ("mri", "pet", "label"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    splits = assign_splits(n_cases, seed)
    seeds = np.random.SeedSequence(int(seed)).spawn(n_cases)
    width = max(4, len(str(n_cases - 1)))
    rows = []
    for i in progress_bar(range(n_cases), desc="synth MRI/PET", unit="case", disable=not progress):
        case_id = f"mripet_{i:0{width}d}"
        case = make_mripet_case(seeds[i], case_id, spacing=sp)
        rel = {key: f"{key}/{case_id}.nii.gz" for key in ("mri", "pet", "label")}
        write_nifti(case["mri"], out / rel["mri"], dtype=np.int16)
        write_nifti(case["pet"], out / rel["pet"], dtype=np.float32)
        write_nifti(case["label"], out / rel["label"], dtype=np.uint8)
        meta = case["metadata"]
        rows.append({"case_id": case_id, **rel, "split": splits[i], "age": meta["age"], "sex": meta["sex"],
                     "hypometabolism": meta["hypometabolism"], "note": "simulated"})
    write_json_atomic(out / "labels.json", LABELS)
    write_text_atomic(out / "README.txt", _readme(n_cases, seed, spacing))
    csv_path = out / "cohort.csv"
    with atomic_path(csv_path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
    return csv_path
