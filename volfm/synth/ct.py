"""Synthetic abdominal CT phantoms with visible findings, ICD-10-CM codes and free-text reports.

SIMULATED data (not patients): the embedded default cohort for the demo and the tests, meant for
pretraining 3D encoders on ICD-code prediction and report matching, so every finding changes the image.

Per case (one seed -> one case; independent random streams for the grid, the anatomy, each finding,
the finding draws, the wording and the noise, so forcing a finding on or off changes nothing else):

* a voxel grid: field of view 300-380 mm in-plane (centred within 6 mm of the body axis; the body,
  skin included, is at most 316 mm wide, so it fits the 336 mm in-plane crop of the Merlin
  preprocessing) x ~255-340 mm cranio-caudal, derived from the anatomy: 45-70 mm of lung above the
  right dome down to 15-30 mm below the lowest of the enlarged liver and spleen (drawn whether or not
  hepatomegaly/splenomegaly is present), the kidneys and the infrarenal aorta, measured along the
  grid's own (possibly tilted) axis, so no organ a finding depends on leaves the volume. ``shape``
  splits it (the default 128x128x64 gives ~2.3-3.0 mm in-plane and ~4-5.3 mm slices); orientation
  RAS, LPS, LAS, LPI, RPI or an axis permutation (coronal/sagittal slices), some oblique (3-12
  degrees). The affine is the nibabel RAS+ voxel-to-world map (+x towards the patient's right,
  +y anterior, +z superior), so the liver has a larger world x than the spleen;
* anatomy evaluated analytically at each voxel centre's WORLD position (patient frame = RAS offsets
  from a random body centre), so labels land at the same world place whatever the grid: body outline,
  subcutaneous fat, muscle wall, ribs, lung bases, diaphragm, heart, liver (+ vessels), gallbladder,
  spleen, kidneys (cortex, medulla, sinus fat), stomach, bowel, IVC, aorta, spine; non-contrast or
  portal-venous phase; then partial-volume blur, a slight intensity drift and Gaussian noise (10-20 HU);
* findings (each independent, default probability 0.3), see :data:`FINDINGS`; ``findings=`` forces a
  set. Organ sizes never overlap between normal and enlarged: liver span (liver dome to inferior
  tip) 11.2-15.8 cm normal vs 18.5-21.5 cm (and >= 1.22x the normal span) with hepatomegaly; spleen
  length 9-11 cm normal vs 14.5-17.5 cm with splenomegaly; the report quotes these spans. Focal
  lesions are at least ~2.2 voxels across (stones and nodules grow on coarse grids), and the report
  quotes the simulated sizes.

Label map (uint8, :data:`LABELS`): organ segmentation. Lesions inside an organ take that organ's label
(renal cyst and stone -> kidney, gallstone -> gallbladder, lung nodule and atelectasis -> lung,
aneurysm and mural thrombus -> aorta, fatty liver / hepatomegaly -> liver); fluid collections outside
organs (pleural effusion, ascites) are background (0), and pleural fluid replaces lung.
"""
from __future__ import annotations

import csv
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

from volfm import VolfmError
from volfm.io import Volume, write_nifti
from volfm.io.affine import world_to_voxel
from volfm.io.atomic import atomic_path, write_json_atomic, write_text_atomic
from volfm.store.splits import SPLIT_FRACTIONS  # noqa: F401 - re-exported
from volfm.store.splits import assign_splits as _assign_splits
from volfm.utils import parse_triple, progress_bar


class FindingSpec(NamedTuple):
    code: str          # ICD-10-CM code
    section: str       # report section that describes it
    description: str
    prob: float = 0.3  # default per-case probability


FINDINGS: dict[str, FindingSpec] = {
    "hepatomegaly": FindingSpec("R16.0", "LIVER AND BILIARY", "Hepatomegaly"),
    "splenomegaly": FindingSpec("R16.1", "SPLEEN", "Splenomegaly"),
    "fatty_liver": FindingSpec("K76.0", "LIVER AND BILIARY", "Fatty liver"),
    "renal_cyst": FindingSpec("N28.1", "KIDNEYS AND URETERS", "Cyst of kidney"),
    "kidney_stone": FindingSpec("N20.0", "KIDNEYS AND URETERS", "Calculus of kidney"),
    "gallstone": FindingSpec("K80.20", "GALLBLADDER", "Calculus of gallbladder"),
    "pleural_effusion": FindingSpec("J90", "LOWER THORAX", "Pleural effusion"),
    "ascites": FindingSpec("R18.8", "PERITONEUM", "Ascites"),
    "lung_nodule": FindingSpec("R91.1", "LOWER THORAX", "Solitary pulmonary nodule"),
    "atelectasis": FindingSpec("J98.11", "LOWER THORAX", "Atelectasis"),
    "aortic_aneurysm": FindingSpec("I71.40", "VASCULATURE", "Abdominal aortic aneurysm"),
}
# Codes of the clinical history: added at random, unrelated to the image (label noise).
HISTORY_CODES: dict[str, str] = {"I10": "Essential hypertension", "E11.9": "Type 2 diabetes mellitus",
                                 "E78.5": "Hyperlipidemia", "Z87.891": "History of nicotine dependence"}
LABELS: dict[int, str] = {0: "background", 1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right",
                          5: "lung_left", 6: "lung_right", 7: "aorta", 8: "spine", 9: "gallbladder"}
LABEL_IDS: dict[str, int] = {name: value for value, name in LABELS.items()}
REPORT_SECTIONS = ("LOWER THORAX", "LIVER AND BILIARY", "GALLBLADDER", "SPLEEN", "KIDNEYS AND URETERS",
                   "VASCULATURE", "PERITONEUM", "MUSCULOSKELETAL")
CSV_COLUMNS = ("case_id", "image", "label", "icd_codes", "report", "findings", "split", "sex", "age")
DEFAULT_SHAPE = (128, 128, 64)
# Size limits (mm) keeping findings verifiable from the image: normal vs enlarged organs never overlap,
# and the body fits the 336 mm in-plane crop of the Merlin preprocessing.
LIVER_SPAN_NORMAL_MAX, LIVER_SPAN_ENLARGED = 158.0, (185.0, 215.0)
SPLEEN_LENGTH_NORMAL_MAX, SPLEEN_LENGTH_ENLARGED = 110.0, (145.0, 175.0)
BODY_HALF_WIDTH_MAX, FOV_SHIFT_MAX = 158.0, 6.0

# Orientation codes (nibabel axcodes: the world direction each array axis points to) and their weights.
ORIENTATIONS: dict[str, float] = {"RAS": 0.2, "LPS": 0.25, "LAS": 0.15, "LPI": 0.05, "RPI": 0.05,
                                  "PLS": 0.05, "RSA": 0.06, "LIP": 0.05, "ASL": 0.07, "PIR": 0.07}
OBLIQUE_PROB = 0.2
CONTRAST_PROB = 0.7
_AXIS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
# Independent random streams of one case (spawn keys).
_GRID, _ANAT, _PRESENT, _WORDS, _NOISE, _CODES, _FIND0 = range(7)


# ----------------------------------------------------------------------------------- geometry helpers
def _rot(axis: int, deg: float) -> np.ndarray:
    """Rotation matrix about world axis 0/1/2 by ``deg`` degrees."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


class _Ell:
    """Ellipsoid in the patient frame: centre c, semi-axes, rotation R (columns = local axes)."""

    def __init__(self, c, semi, R=None):
        self.c = np.asarray(c, float)
        self.semi = np.asarray(semi, float)
        self.R = np.eye(3) if R is None else np.asarray(R, float)

    def local(self, p):
        d = [p[i] - self.c[i] for i in range(3)]
        if np.allclose(self.R, np.eye(3)):
            return d
        return [self.R[0, k] * d[0] + self.R[1, k] * d[1] + self.R[2, k] * d[2] for k in range(3)]

    def q(self, p):
        """Normalised squared radius: <= 1 inside."""
        u = self.local(p)
        return (u[0] / self.semi[0]) ** 2 + (u[1] / self.semi[1]) ** 2 + (u[2] / self.semi[2]) ** 2

    def __call__(self, p):
        return self.q(p) <= 1.0

    def point(self, u):
        """Patient-frame position of local coordinates u (mm)."""
        return self.c + self.R @ np.asarray(u, float)

    def box(self, pad=0.0):
        ext = np.sqrt(((self.R * self.semi[None, :]) ** 2).sum(axis=1)) + pad
        return self.c - ext, self.c + ext


def _seg_d2(p, a, b):
    """Squared distance from points p to the segment a-b."""
    ab = np.asarray(b, float) - np.asarray(a, float)
    t = ((p[0] - a[0]) * ab[0] + (p[1] - a[1]) * ab[1] + (p[2] - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    return sum((p[i] - (a[i] + t * ab[i])) ** 2 for i in range(3))


class _Grid:
    """Voxel grid whose coordinates are given in the patient frame (RAS mm relative to the body centre).

    Coordinates are built by broadcasting, so on axis-aligned grids each one is a thin (n,1,1)-like array.
    """

    def __init__(self, affine, shape, centre):
        self.affine, self.shape, self.centre = affine, tuple(int(n) for n in shape), np.asarray(centre, float)
        self.full = tuple(slice(0, n) for n in self.shape)

    def block(self, lo, hi):
        """Slices of the voxel block covering the patient-frame box [lo, hi]; None when outside the grid."""
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        ijk = world_to_voxel(self.affine, corners + self.centre)
        a = np.maximum(np.floor(ijk.min(axis=0)).astype(int) - 1, 0)
        b = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 2, self.shape)
        if np.any(b <= a):
            return None
        return tuple(slice(int(x), int(y)) for x, y in zip(a, b))

    def coords(self, sl):
        A = self.affine[:3, :3]
        t = self.affine[:3, 3] - self.centre
        idx = [np.arange(s.start, s.stop, dtype=np.float32).reshape([-1 if k == ax else 1 for k in range(3)])
               for ax, s in enumerate(sl)]
        out = []
        for c in range(3):
            v = np.full((1, 1, 1), t[c], np.float32)
            for ax in range(3):
                if abs(A[c, ax]) > 1e-9:
                    v = v + np.float32(A[c, ax]) * idx[ax]
            out.append(v)
        return out

    def inside(self, pts, margin=1.0):
        """Whether patient-frame points lie inside the grid, ``margin`` voxels from its border."""
        ijk = world_to_voxel(self.affine, np.atleast_2d(pts) + self.centre)
        return np.all((ijk >= margin) & (ijk <= np.asarray(self.shape) - 1 - margin), axis=1)


class _Canvas:
    def __init__(self, grid: _Grid):
        self.grid = grid
        self.img = np.full(grid.shape, -1000.0, np.float32)
        self.lab = np.zeros(grid.shape, np.uint8)

    def paint(self, sl, mask, hu=None, label=None):
        if sl is None:
            return
        if hu is not None:
            np.copyto(self.img[sl], np.asarray(hu, np.float32), where=mask)
        if label is not None:
            np.copyto(self.lab[sl], np.uint8(label), where=mask)


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


# ----------------------------------------------------------------------------------- anatomy
class _Anatomy:
    """Per-case anatomy in the patient frame (r: + patient right, a: + anterior, s: + superior; mm)."""

    def __init__(self, rng: np.random.Generator):
        self.sex = "M" if rng.random() < 0.5 else "F"
        self.age = int(rng.integers(25, 91))
        size = float(np.clip(rng.normal(1.0, 0.06), 0.88, 1.12)) * (1.03 if self.sex == "M" else 0.97)
        self.size = size
        self.world_centre = np.array([_u(rng, -15, 15), _u(rng, -60, 20), _u(rng, -350, 50)])
        self.contrast = bool(rng.random() < CONTRAST_PROB)
        # Body outline (superellipse), fat and muscle layers, abdominal/thoracic cavity.
        # Half-width capped so that the body (skin included) fits the 336 mm in-plane crop of the Merlin
        # preprocessing (224 x 1.5 mm, centred on the field of view) with the FOV shift of _make_grid.
        self.Bx = float(np.clip(143.0 * size * _u(rng, 0.95, 1.05), 118.0, BODY_HALF_WIDTH_MAX))
        self.By = self.Bx * 0.72 * _u(rng, 0.94, 1.06)
        self.pw = _u(rng, 2.2, 2.8)
        self.fat = _u(rng, 8, 28) + (6.0 if self.sex == "F" else 0.0)
        self.muscle = _u(rng, 8, 14)
        self.Cx, self.Cy = self.Bx - self.fat - self.muscle, self.By - self.fat - self.muscle
        Cx, Cy = self.Cx, self.Cy
        # Diaphragm domes (right higher than left).
        self.hR = _u(rng, 45, 65)
        self.hL = self.hR - _u(rng, 5, 15)
        self.dome_depth = _u(rng, 35, 50)
        # Spine.
        self.sp_a = -Cy + _u(rng, 22, 30)
        self.vb_rx = _u(rng, 18, 23)
        self.vb_ry = self.vb_rx * _u(rng, 0.8, 0.9)
        self.canal_r = _u(rng, 7.5, 9.5)
        self.canal_a = self.sp_a - self.vb_ry - self.canal_r - 2.0
        self.vert_period, self.vert_phase, self.disc = _u(rng, 28, 34), _u(rng, 0, 34), _u(rng, 6, 9)
        self.rib_period, self.rib_phase, self.rib_width = _u(rng, 24, 32), _u(rng, 0, 32), _u(rng, 8, 11)
        self.rib_slope = _u(rng, 35, 45)  # mm of descent per radian around the body
        # Aorta and IVC.
        self.ao_r0 = -_u(rng, 8, 15)
        self.ao_rad = float(np.clip(_u(rng, 9, 12) + 0.03 * (self.age - 50), 8.5, 14))
        self.ao_a0 = self.sp_a + self.vb_ry + self.ao_rad + 3.0
        self.ivc = (_u(rng, 18, 26), self.ao_a0 + _u(rng, 0, 8), _u(rng, 10, 14), _u(rng, 7, 10))
        # Liver (right lobe + left lobe, top under the right dome), gallbladder, spleen.
        # Normal cranio-caudal liver span (liver dome to inferior tip), <= LIVER_SPAN_NORMAL_MAX.
        self.liver_span = float(np.clip(_u(rng, 122, 148) * (1.0 + 0.5 * (size - 1.0)), 112.0,
                                        LIVER_SPAN_NORMAL_MAX))
        self.liver_r = 0.42 * Cx * _u(rng, 0.9, 1.1)
        self.liver_a = Cy * _u(rng, -0.05, 0.1)
        self.liver_semi = (0.55 * Cx * _u(rng, 0.9, 1.05), 0.85 * Cy * _u(rng, 0.9, 1.0))
        self.left_lobe = (-0.05 * Cx * _u(rng, 0, 2), 0.45 * Cy * _u(rng, 0.9, 1.1), 0.45 * Cx * _u(rng, 0.8, 1.1),
                          0.35 * Cy * _u(rng, 0.85, 1.1), _u(rng, 0.18, 0.26))
        self.gb = (0.3 * Cx * _u(rng, 0.85, 1.15), 0.3 * Cy * _u(rng, 0.8, 1.2), _u(rng, 0.3, 0.4),
                   (_u(rng, 13, 17), _u(rng, 13, 17), _u(rng, 28, 38)), _u(rng, 20, 40))
        self.spleen_semi = (_u(rng, 22, 28), _u(rng, 36, 46), _u(rng, 45, 55))  # normal length 9-11 cm
        self.spleen_a = -0.3 * Cy * _u(rng, 0.8, 1.2)
        self.spleen_rot, self.spleen_gap = _u(rng, 20, 35), _u(rng, 0, 8)
        # Kidneys: centre, semi-axes, coronal tilt, axial rotation (hilum antero-medial).
        self.kidneys = {}
        s_left = -_u(rng, 35, 45)
        for side, sign in (("left", -1.0), ("right", 1.0)):
            c = (sign * _u(rng, 60, 75) * size, self.sp_a + _u(rng, -5, 10),
                 s_left - (_u(rng, 8, 15) if side == "right" else 0.0))
            semi = (_u(rng, 22, 28), _u(rng, 25, 30), _u(rng, 48, 58))
            R = _rot(2, sign * _u(rng, 20, 35)) @ _rot(1, -sign * _u(rng, 8, 18))
            self.kidneys[side] = _Ell(c, semi, R)
        self.sinus = (_u(rng, 0.4, 0.5), _u(rng, 0.4, 0.5))
        # Lungs (hemithorax ellipses) and heart.
        self.hemi = (0.52 * Cx, -0.05 * Cy, 0.45 * Cx * _u(rng, 0.95, 1.05), 0.92 * Cy)
        self.heart = _Ell((-0.12 * Cx, 0.28 * Cy, self.hL + _u(rng, 40, 55)), (0.42 * Cx, 0.5 * Cy, 55.0),
                          _rot(2, _u(rng, 15, 30)))
        self.lung_vessels = {side: [tuple(rng.uniform(0, 1, 3)) + (_u(rng, 1.5, 3.0),) for _ in range(7)]
                             for side in ("left", "right")}
        self.liver_vessels = [(_u(rng, 0, 1), _u(rng, 0, 1), _u(rng, 0, 1), _u(rng, 3, 5)) for _ in range(4)]
        # Stomach and bowel loops.
        self.stomach = _Ell((-0.3 * Cx, 0.35 * Cy, self.hL - _u(rng, 40, 55)), (0.3 * Cx, 0.3 * Cy, _u(rng, 35, 50)))
        self.bowel = [(_u(rng, -0.65, 0.65) * Cx, _u(rng, 0, 1), _u(rng, -150, self.hL - 40),
                       (_u(rng, 12, 28), _u(rng, 12, 28), _u(rng, 12, 28)), rng.random() < 0.35)
                      for _ in range(int(rng.integers(8, 15)))]
        # Attenuation (HU).
        self.hu_fat = _u(rng, -110, -85)
        self.hu_muscle = _u(rng, 40, 55)
        self.hu_lung = _u(rng, -880, -820)
        self.hu_bone = _u(rng, 600, 900)
        self.hu_cancellous = float(np.clip(_u(rng, 200, 320) - 2.0 * max(self.age - 40, 0), 90, 320))
        self.hu_bile = _u(rng, 0, 15)
        self.hu_bowel = _u(rng, 15, 35)
        if self.contrast:
            self.hu_blood = _u(rng, 150, 220)
            self.hu_liver, self.hu_spleen = _u(rng, 95, 115), _u(rng, 105, 125)
            self.hu_cortex = _u(rng, 150, 190)
            self.hu_medulla = self.hu_cortex - _u(rng, 30, 50)
        else:
            self.hu_blood = _u(rng, 35, 45)
            self.hu_liver, self.hu_spleen = _u(rng, 55, 65), _u(rng, 42, 50)
            self.hu_cortex = self.hu_medulla = _u(rng, 28, 36)
        self.noise_sd = _u(rng, 10, 20)
        self.drift = rng.uniform(-5, 5, size=3)  # HU per 100 mm

    # ---- analytic regions, all functions of patient-frame coordinates p = (r, a, s)
    def _super(self, r, a, X, Y):
        return np.abs(r / X) ** self.pw + np.abs(a / Y) ** self.pw

    def body(self, p):
        return self._super(p[0], p[1], self.Bx, self.By) <= 1.0

    def inner(self, p):
        return self._super(p[0], p[1], self.Bx - self.fat, self.By - self.fat) <= 1.0

    def cavity(self, p):
        return self._super(p[0], p[1], self.Cx, self.Cy) <= 1.0

    def s_dia(self, r, a):
        """Cranio-caudal height of the diaphragm above (r, a): two domes, lowest posteriorly and laterally."""
        rc, wx, wy, ac = 0.5 * self.Cx, 0.5 * self.Cx, self.Cy, 0.1 * self.Cy
        right = self.hR - self.dome_depth * (((r - rc) / wx) ** 2 + ((a - ac) / wy) ** 2)
        left = self.hL - self.dome_depth * (((r + rc) / wx) ** 2 + ((a - ac) / wy) ** 2)
        return np.where(r >= 0, right, left)

    def below_dia(self, p, gap=3.0):
        return p[2] < self.s_dia(p[0], p[1]) - gap

    def hemithorax(self, p, side):
        rc, ac, sx, sy = self.hemi
        rc = rc if side == "right" else -rc
        return ((p[0] - rc) / sx) ** 2 + ((p[1] - ac) / sy) ** 2 <= 1.0

    def hemi_posterior(self, r, side):
        """Anterior-posterior position of the posterior wall of a hemithorax at r."""
        rc, ac, sx, sy = self.hemi
        rc = rc if side == "right" else -rc
        return ac - sy * np.sqrt(np.clip(1.0 - ((r - rc) / sx) ** 2, 0.0, 1.0))

    def lung(self, p, side):
        return (self.hemithorax(p, side) & self.cavity(p) & (p[2] > self.s_dia(p[0], p[1]) + 2.0)
                & ~self.heart(p))


# ----------------------------------------------------------------------------------- organs and findings
class _Phantom:
    """Anatomy + finding parameters -> organ geometry, rendering and measurements.

    Built in two steps: the constructor draws every parameter (so :meth:`coverage_points` can size the
    field of view before the grid exists), then :meth:`fit` adapts lesion sizes to the grid's spacing and
    builds the geometry.
    """

    def __init__(self, anat: _Anatomy, frngs: dict[str, np.random.Generator], present: set[str]):
        self.A, self.present = anat, present
        A = anat
        # Finding parameters are always drawn (each from its own stream), used only when present.
        f = {name: frngs[name] for name in FINDINGS}
        g = f["hepatomegaly"]  # in-plane scales (r, a) and the enlarged span (liver dome to tip, mm)
        sr, sa, span = _u(g, 1.1, 1.2), _u(g, 1.05, 1.1), _u(g, *LIVER_SPAN_ENLARGED)
        self.hepato = (sr, sa, max(span, 1.22 * A.liver_span))
        g = f["splenomegaly"]  # in-plane scales and the enlarged length (mm)
        fr, fa, length = _u(g, 1.1, 1.2), _u(g, 1.35, 1.55), _u(g, *SPLEEN_LENGTH_ENLARGED)
        self.spleno = (fr, fa, max(length, 1.35 * 2.0 * A.spleen_semi[2]))
        self.fat_drop = _u(f["fatty_liver"], 50, 75)
        g = f["renal_cyst"]
        self.cyst = dict(side=("left", "right")[int(g.integers(2))], diameter=_u(g, 15, 30), hu=_u(g, 0, 12),
                         dir=self._lateral_dir(g), depth=_u(g, 0.5, 0.7))
        g = f["kidney_stone"]
        self.stone = dict(side=("left", "right")[int(g.integers(2))], drawn=_u(g, 4, 10),
                          hu=_u(g, 800, 1200), s=_u(g, -0.55, 0.55))
        g = f["gallstone"]
        self.gallstone = dict(drawn=_u(g, 6, 18), hu=_u(g, 400, 900))
        g = f["pleural_effusion"]
        self.effusion = dict(side=("left", "right", "bilateral")[int(g.choice(3, p=[0.35, 0.35, 0.3]))],
                             depth=_u(g, 20, 55), hu=_u(g, 5, 15))
        g = f["ascites"]
        self.ascites = dict(depth=_u(g, 6, 25), hu=_u(g, 0, 15))
        g = f["lung_nodule"]
        self.nodule = dict(side=("left", "right")[int(g.integers(2))],
                           drawn=_u(g, 8, 20), hu=_u(g, 20, 50),
                           cand=g.random((256, 3)))
        g = f["atelectasis"]
        self.atel = dict(side=("left", "right", "bilateral")[int(g.choice(3, p=[0.3, 0.3, 0.4]))],
                         height=_u(g, 20, 40), a_c=_u(g, -0.1, 0.2) * A.Cy, hu=_u(g, 15, 40))
        g = f["aortic_aneurysm"]
        k_s = 0.5 * (A.kidneys["left"].c[2] + A.kidneys["right"].c[2])
        self.aneurysm = dict(diameter=_u(g, 40, 60), s=k_s - _u(g, 30, 40), half_len=_u(g, 30, 45),
                             lumen=_u(g, 0.3, 0.45))

    def fit(self, grid: _Grid, max_sp: float) -> None:
        """Grow focal lesions to at least ~2.2 voxels (``max_sp``: coarsest spacing), build the geometry and
        place the lung nodule inside the field of view."""
        self.max_sp = max_sp
        self.stone["diameter"] = max(self.stone["drawn"], 2.2 * max_sp)
        self.gallstone["diameter"] = max(self.gallstone["drawn"], 2.2 * max_sp)
        self.nodule["diameter"] = float(np.clip(max(self.nodule["drawn"], 2.2 * max_sp), 8, 25))
        self._build()
        self.place_nodule(grid)

    def _liver(self, enlarged: bool):
        """Right and left lobe ellipsoids and the cranio-caudal span (visible dome to inferior tip, mm).

        The ellipsoid top is anchored just above the right dome, which clips the liver 3 mm under the dome's
        apex (hR - 3: the liver's visible top); hepatomegaly lengthens the liver caudally and widens it."""
        A = self.A
        sr, sa, span = self.hepato if enlarged else (1.0, 1.0, A.liver_span)
        top = A.hR + 5.0
        height = span + 8.0
        right = _Ell((A.liver_r, A.liver_a, top - height / 2),
                     (A.liver_semi[0] * sr, A.liver_semi[1] * sa, height / 2))
        lr, la, lsx, lsy, lfrac = A.left_lobe
        lss = height * lfrac
        left = _Ell((lr, la, top - 10.0 - lss), (lsx * sr, lsy * sa, lss))
        return right, left, span

    def _spleen(self, enlarged: bool):
        """Spleen ellipsoid, top anchored just under the left hemidiaphragm above its centre, and its length."""
        A = self.A
        fr, fa, length = self.spleno if enlarged else (1.0, 1.0, 2.0 * A.spleen_semi[2])
        semi = (A.spleen_semi[0] * fr, A.spleen_semi[1] * fa, length / 2)
        r, a = -(A.Cx - semi[0] - A.spleen_gap), A.spleen_a
        top = float(A.s_dia(r, a)) - 3.0  # where below_dia clips
        return _Ell((r, a, top - semi[2]), semi, _rot(2, -A.spleen_rot)), length

    def coverage_points(self) -> np.ndarray:
        """Patient-frame points the field of view must contain whether or not a finding is present: the
        bounding-box corners of the enlarged liver and spleen, the kidneys and the infrarenal aorta."""
        A, boxes = self.A, []
        right, left, _ = self._liver(True)
        spleen, _ = self._spleen(True)
        boxes += [right.box(), left.box(), spleen.box(), self._spleen(False)[0].box()]
        boxes += [k.box(pad=3.0) for k in A.kidneys.values()]
        an = self.aneurysm
        rad = an["diameter"] / 2
        boxes.append((np.array([A.ao_r0 - rad, A.ao_a0 - rad, an["s"] - an["half_len"]]),
                      np.array([A.ao_r0 + rad, A.ao_a0 + 2 * rad, an["s"] + an["half_len"]])))
        return np.array([[lo[0] if i else hi[0], lo[1] if j else hi[1], lo[2] if k else hi[2]]
                         for lo, hi in boxes for i in (0, 1) for j in (0, 1) for k in (0, 1)])

    @staticmethod
    def _lateral_dir(g):
        """A unit direction in kidney-local coordinates pointing away from the hilum (local -x is medial)."""
        v = np.array([_u(g, 0.2, 1.0), _u(g, -0.6, 0.6), _u(g, -1.0, 1.0)])
        return v / np.linalg.norm(v)

    def on(self, name):
        return name in self.present

    def _build(self):
        A = self.A
        self.liver_right, self.liver_left, self.liver_span_mm = self._liver(self.on("hepatomegaly"))
        self.liver_bottom = A.hR - 3.0 - self.liver_span_mm
        height = self.liver_span_mm + 8.0
        gr, ga, gfrac, gsemi, gtilt = A.gb
        rad = self.gallstone["diameter"] / 2
        if self.on("gallstone"):  # room for a stone at least ~2 voxels wide
            gsemi = tuple(max(x, rad + 4.0) for x in gsemi)
        ga = max(ga, A.ivc[1] + A.ivc[3] + max(gsemi[:2]) + 4.0)  # keep it anterior to the IVC
        self.gb = _Ell((gr, ga, self.liver_bottom + gfrac * height), gsemi, _rot(0, -gtilt))
        # Gallstone in the dependent (posterior) part of the gallbladder, local y ~ anterior.
        self.gallstone_c = self.gb.point((0.0, -(gsemi[1] - rad - 1.5), -0.3 * (gsemi[2] - rad)))
        self.spleen, self.spleen_len_mm = self._spleen(self.on("splenomegaly"))
        # Kidney lesions.
        k = A.kidneys[self.cyst["side"]]
        sign = -1.0 if self.cyst["side"] == "left" else 1.0
        d = self.cyst["dir"] * self.cyst["depth"] * k.semi * np.array([sign, 1.0, 1.0])
        self.cyst_local = d
        self.cyst_c = k.point(d)
        k = A.kidneys[self.stone["side"]]
        sign = -1.0 if self.stone["side"] == "left" else 1.0
        # Local x of the kidney points to the patient's right; the hilum is medial.
        self.stone_local = np.array([-sign * 0.3 * k.semi[0], 0.1 * k.semi[1], self.stone["s"] * k.semi[2]])
        self.stone_c = k.point(self.stone_local)
        self._place_nodule()

    def _place_nodule(self):
        A, nd = self.A, self.nodule
        side, rad = nd["side"], nd["diameter"] / 2
        rc, ac, sx, sy = A.hemi
        rc = rc if side == "right" else -rc
        c = nd["cand"]
        pts = np.stack([rc + (2 * c[:, 0] - 1) * 0.7 * sx, ac + (2 * c[:, 1] - 1) * 0.7 * sy,
                        A.hR - 10 + c[:, 2] * 90.0], axis=1)
        offs = np.array([[0, 0, 0]] + [list(v) for v in (np.vstack([np.eye(3), -np.eye(3)]) * (rad + 3.0))])
        score = np.zeros(len(pts), int)
        for o in offs:
            q = pts + o
            score += A.lung((q[:, 0], q[:, 1], q[:, 2]), side)
        self._nodule_score = score
        self._nodule_pts = pts

    def place_nodule(self, grid: _Grid):
        """First candidate inside the field of view with the whole sphere (+3 mm) in the lung; else the
        in-view candidate with most of it in the lung."""
        score = self._nodule_score + 10 * grid.inside(self._nodule_pts, margin=2.0)
        self.nodule_c = self._nodule_pts[int(np.argmax(score))]

    def aorta_geom(self, s):
        """Outer centre (r, a), outer radius, lumen centre and lumen radius of the aorta at heights s."""
        A = self.A
        r0, a0, rad0 = A.ao_r0, A.ao_a0, A.ao_rad
        if not self.on("aortic_aneurysm"):
            return r0, a0, rad0, r0, a0, rad0
        an = self.aneurysm
        bump = np.clip(1.6 * (1.0 - ((s - an["s"]) / an["half_len"]) ** 2), 0.0, 1.0)
        rad = rad0 + (an["diameter"] / 2 - rad0) * bump
        da, dr = 0.85 * (rad - rad0), -0.15 * (rad - rad0)
        if A.contrast:  # eccentric lumen, the rest is mural thrombus
            lum = rad0 + an["lumen"] * (rad - rad0)
            return r0 + dr, a0 + da, rad, r0 + 0.5 * dr, a0 + 0.6 * da, lum
        return r0 + dr, a0 + da, rad, r0 + dr, a0 + da, rad

    # ---- rendering
    def render(self, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
        A, cv = self.A, _Canvas(grid)
        full = grid.full
        p = grid.coords(full)
        r, a, s = p
        body = A.body(p)
        cv.paint(full, body, A.hu_fat)
        inner = A.inner(p)
        cv.paint(full, inner, A.hu_muscle)
        cav = A.cavity(p)
        # Ribs in the wall of the lower chest / upper abdomen: bands descending from the spine towards
        # the front (phi = angle from the posterior midline), none at the spine and sternum.
        phi = np.arctan2(np.abs(r), -a)
        band = np.mod(s + A.rib_slope * phi - A.rib_phase, A.rib_period) < A.rib_width
        ribs = inner & ~cav & band & (s > A.hL - 100.0) & (phi > 0.3) & (phi < 2.6)
        cv.paint(full, ribs, _lerp(A.hu_bone, A.hu_muscle, 0.3))
        sd = A.s_dia(r, a)
        thorax = s > sd
        cv.paint(full, cav & thorax, A.hu_fat + 15.0)             # mediastinal fat
        cv.paint(full, cav & ~thorax, A.hu_fat + 10.0)            # intra-abdominal fat
        cv.paint(full, cav & (np.abs(s - sd + 0.5) < 2.5), A.hu_muscle)  # diaphragm
        self._paint_wall_muscles(grid, cv)
        self._paint_bowel(grid, cv)
        if self.on("ascites"):
            self._paint_ascites(grid, cv)
        self._paint_liver(grid, cv)
        self._paint_spleen(grid, cv)
        self._paint_kidneys(grid, cv)
        self._paint_lungs(grid, cv)
        self._paint_heart_vessels_spine(grid, cv)
        return cv.img, cv.lab

    def _paint_wall_muscles(self, grid, cv):
        A = self.A
        for sign in (-1.0, 1.0):
            e = _Ell((sign * 32.0, A.sp_a - 38.0, 0.0), (26.0, 22.0, 400.0))   # paraspinal muscles
            sl = grid.block(*e.box())
            if sl:
                cv.paint(sl, e(grid.coords(sl)), A.hu_muscle)
            lo, hi = (sign * 45.0 - 35, A.sp_a - 20, -400.0), (sign * 45.0 + 35, A.sp_a + 40, 0.0)
            sl = grid.block(lo, hi)                                              # psoas, growing caudally
            if sl:
                q = grid.coords(sl)
                rad = 6.0 + 16.0 * np.clip((A.kidneys["left"].c[2] - q[2]) / 90.0, 0.0, 1.0)
                m = ((q[0] - sign * 42.0) ** 2 + (q[1] - A.sp_a - 8.0) ** 2 < rad ** 2) & A.below_dia(q)
                cv.paint(sl, m, A.hu_muscle)

    def _paint_bowel(self, grid, cv):
        A = self.A
        st = A.stomach
        sl = grid.block(*st.box())
        if sl:
            q = grid.coords(sl)
            m = st(q) & A.cavity(q) & A.below_dia(q)
            cv.paint(sl, m, A.hu_bowel, 0)
            cv.paint(sl, m & (q[1] > st.c[1] + 0.35 * st.semi[1]), -950.0)   # air-fluid level (supine)
        a_lo = A.sp_a + A.vb_ry + 15.0
        for br, af, bs, semi, gas in A.bowel:
            e = _Ell((br, a_lo + af * (0.75 * A.Cy - a_lo), bs), semi)
            sl = grid.block(*e.box())
            if not sl:
                continue
            q = grid.coords(sl)
            m = e(q) & A.cavity(q) & A.below_dia(q)
            cv.paint(sl, m, A.hu_bowel + (25.0 if A.contrast else 0.0))
            if gas:
                g = _Ell(e.c + np.array([0, 0.45 * semi[1], 0]), np.array(semi) * 0.45)
                cv.paint(sl, m & g(q), -950.0)

    def _paint_ascites(self, grid, cv):
        A, t, hu = self.A, self.ascites["depth"], self.ascites["hu"]
        sl = grid.block((-A.Cx, -A.Cy, -400.0), (A.Cx, A.Cy, A.hR + 5))
        if not sl:
            return
        q = grid.coords(sl)
        where = A.cavity(q) & A.below_dia(q)
        # Rim along the peritoneal wall anterior to the retroperitoneum, and shells around liver and spleen.
        rim = A._super(q[0], q[1], A.Cx - t, A.Cy - t) > 1.0
        rim &= q[1] > A.sp_a + A.vb_ry + 10.0
        shell = np.zeros(np.broadcast_shapes(*(x.shape for x in q)), bool)
        for e in (self.liver_right, self.liver_left, self.spleen):
            grow = (1.0 + t / e.semi.min()) ** 2
            shell |= e.q(q) <= grow
        cv.paint(sl, where & (rim | shell), hu, 0)

    def _paint_liver(self, grid, cv):
        A = self.A
        lo = np.minimum(self.liver_right.box()[0], self.liver_left.box()[0])
        hi = np.maximum(self.liver_right.box()[1], self.liver_left.box()[1])
        sl = grid.block(lo, hi)
        if sl:
            q = grid.coords(sl)
            m = (self.liver_right(q) | self.liver_left(q)) & A.cavity(q) & A.below_dia(q)
            hu = A.hu_liver - (self.fat_drop if self.on("fatty_liver") else 0.0)
            cv.paint(sl, m, hu, LABEL_IDS["liver"])
            # Hepatic/portal veins from the confluence near the IVC, blood attenuation (label stays liver).
            base = np.array([A.ivc[0], A.ivc[1], A.hR - 15.0])
            e = self.liver_right
            for u, v, w, rad in A.liver_vessels:
                tip = e.point(((2 * u - 1) * 0.7 * e.semi[0], (2 * v - 1) * 0.6 * e.semi[1], (w - 0.6) * e.semi[2]))
                cv.paint(sl, m & (_seg_d2(q, base, tip) < rad ** 2),
                         A.hu_blood * (0.85 if A.contrast else 1.0))
        sl = grid.block(*self.gb.box())
        if sl:
            q = grid.coords(sl)
            m = self.gb(q) & A.cavity(q)
            cv.paint(sl, m, A.hu_bile, LABEL_IDS["gallbladder"])
            if self.on("gallstone"):
                rad = self.gallstone["diameter"] / 2
                st = _Ell(self.gallstone_c, (rad, rad, rad))
                cv.paint(sl, st(q), self.gallstone["hu"], LABEL_IDS["gallbladder"])

    def _paint_spleen(self, grid, cv):
        A = self.A
        sl = grid.block(*self.spleen.box())
        if sl:
            q = grid.coords(sl)
            m = self.spleen(q) & A.cavity(q) & A.below_dia(q)
            cv.paint(sl, m, A.hu_spleen, LABEL_IDS["spleen"])

    def _paint_kidneys(self, grid, cv):
        A = self.A
        for side, k in A.kidneys.items():
            lab = LABEL_IDS[f"kidney_{side}"]
            sl = grid.block(*k.box(pad=20.0))
            if not sl:
                continue
            q = grid.coords(sl)
            qq = k.q(q)
            m = qq <= 1.0
            cortex_in = (1.0 - 6.0 / k.semi.min()) ** 2
            cv.paint(sl, m, A.hu_cortex, lab)
            cv.paint(sl, m & (qq < cortex_in), A.hu_medulla)
            sign = -1.0 if side == "left" else 1.0
            sx, sz = A.sinus
            sinus = _Ell(k.point((-sign * 0.55 * k.semi[0], 0.15 * k.semi[1], 0.0)),
                         (sx * k.semi[0], 0.35 * k.semi[1], sz * k.semi[2]), k.R)
            cv.paint(sl, m & sinus(q), A.hu_fat + 30.0)
            if self.on("renal_cyst") and self.cyst["side"] == side:
                rad = self.cyst["diameter"] / 2
                cv.paint(sl, _Ell(self.cyst_c, (rad, rad, rad))(q), self.cyst["hu"], lab)
            if self.on("kidney_stone") and self.stone["side"] == side:
                rad = self.stone["diameter"] / 2
                cv.paint(sl, _Ell(self.stone_c, (rad, rad, rad))(q), self.stone["hu"], lab)

    def _paint_lungs(self, grid, cv):
        A = self.A
        rc, ac, sx, sy = A.hemi
        eff_sides = {"bilateral": ("left", "right")}.get(self.effusion["side"], (self.effusion["side"],))
        atel_sides = {"bilateral": ("left", "right")}.get(self.atel["side"], (self.atel["side"],))
        for side in ("left", "right"):
            sgn = 1.0 if side == "right" else -1.0
            lo, hi = (sgn * rc - sx, ac - sy, A.hL - A.dome_depth - 10), (sgn * rc + sx, ac + sy, 400.0)
            sl = grid.block(np.minimum(lo, hi), np.maximum(lo, hi))
            if not sl:
                continue
            q = grid.coords(sl)
            lab = LABEL_IDS[f"lung_{side}"]
            lung = A.lung(q, side)
            cv.paint(sl, lung, A.hu_lung, lab)
            hilum = np.array([sgn * 0.22 * A.Cx, 0.05 * A.Cy, A.hL + 70.0])
            for u, v, w, rad in A.lung_vessels[side]:
                tip = np.array([sgn * (rc + (2 * u - 1) * 0.8 * sx), ac + (2 * v - 1) * 0.8 * sy, A.hL - 20 + 80 * w])
                cv.paint(sl, lung & (_seg_d2(q, hilum, tip) < rad ** 2), A.hu_blood * 0.8)
            if self.on("pleural_effusion") and side in eff_sides:
                taper = np.clip(1.0 - (q[2] - A.hL) / 200.0, 0.5, 1.0)
                eff = (A.hemithorax(q, side) & A.cavity(q) & (q[2] > A.s_dia(q[0], q[1]) + 2.0)
                       & (q[1] - A.hemi_posterior(q[0], side) < self.effusion["depth"] * taper))
                cv.paint(sl, eff, self.effusion["hu"], 0)
                lung = lung & ~eff
            if self.on("atelectasis") and side in atel_sides:
                w = np.clip((self.atel["a_c"] - q[1]) / (self.atel["a_c"] + A.Cy), 0.0, 1.0)
                m = lung & (q[2] - A.s_dia(q[0], q[1]) < self.atel["height"] * w + 2.0) & (w > 0)
                cv.paint(sl, m, self.atel["hu"], lab)
            if self.on("lung_nodule") and self.nodule["side"] == side:
                rad = self.nodule["diameter"] / 2
                cv.paint(sl, _Ell(self.nodule_c, (rad, rad, rad))(q), self.nodule["hu"], lab)

    def _paint_heart_vessels_spine(self, grid, cv):
        A = self.A
        h = A.heart
        sl = grid.block(*h.box())
        if sl:
            q = grid.coords(sl)
            m = h(q) & A.cavity(q) & (q[2] > A.s_dia(q[0], q[1]) - 2.0)
            cv.paint(sl, m, A.hu_blood * 0.8 if A.contrast else A.hu_blood, 0)
        ir, ia, irx, iry = A.ivc
        sl = grid.block((ir - irx, ia - iry, -400.0), (ir + irx, ia + iry, A.hR))
        if sl:
            q = grid.coords(sl)
            m = ((q[0] - ir) / irx) ** 2 + ((q[1] - ia) / iry) ** 2 <= 1.0
            m = m & (q[2] < A.hR - 10.0) & (cv.lab[sl] != LABEL_IDS["gallbladder"])
            cv.paint(sl, m, A.hu_blood * (0.8 if A.contrast else 1.0), 0)
        rmax = max(A.ao_rad, self.aneurysm["diameter"] / 2 if self.on("aortic_aneurysm") else 0.0) + 2.0
        sl = grid.block((A.ao_r0 - 2 * rmax, A.ao_a0 - rmax, -400.0),
                        (A.ao_r0 + 2 * rmax, A.ao_a0 + 2.2 * rmax, 400.0))
        if sl:
            q = grid.coords(sl)
            orr, oa, orad, lr, la, lrad = self.aorta_geom(q[2])
            d2 = (q[0] - orr) ** 2 + (q[1] - oa) ** 2
            outer = d2 <= orad ** 2
            # Retroperitoneal fat around the aorta (only over unlabelled soft tissue / fluid).
            halo = (d2 <= (orad + 5.0) ** 2) & (cv.lab[sl] == 0) & (cv.img[sl] < 100.0) & (cv.img[sl] > -500.0)
            cv.paint(sl, halo & (q[2] < A.s_dia(q[0], q[1]) - 3.0), A.hu_fat + 15.0)
            cv.paint(sl, outer, A.hu_muscle - 5.0, LABEL_IDS["aorta"])  # wall / mural thrombus
            cv.paint(sl, outer & ((q[0] - lr) ** 2 + (q[1] - la) ** 2 <= lrad ** 2), A.hu_blood)
        # Spine: vertebral bodies (cortical rim, cancellous core, discs), posterior arch, canal.
        bone = A.hu_bone
        sl = grid.block((-60.0, A.canal_a - A.canal_r - 35.0, -400.0), (60.0, A.sp_a + A.vb_ry + 2.0, 400.0))
        if not sl:
            return
        q = grid.coords(sl)
        lab = LABEL_IDS["spine"]
        ca = A.canal_a
        arch = ((q[0] ** 2 + (q[1] - ca) ** 2) <= (A.canal_r + 5.0) ** 2)
        spinous = (q[0] / 4.5) ** 2 + ((q[1] - (ca - A.canal_r - 14.0)) / 13.0) ** 2 <= 1.0
        transverse = ((np.abs(q[0]) - A.canal_r - 14.0) / 14.0) ** 2 + ((q[1] - ca - 2.0) / 4.5) ** 2 <= 1.0
        cv.paint(sl, arch | spinous | transverse, bone, lab)
        cv.paint(sl, (q[0] ** 2 + (q[1] - ca) ** 2) <= A.canal_r ** 2, 15.0, 0)
        vq = (q[0] / A.vb_rx) ** 2 + ((q[1] - A.sp_a) / A.vb_ry) ** 2
        vb = vq <= 1.0
        cv.paint(sl, vb, bone, lab)
        cv.paint(sl, vb & (vq < (1.0 - 2.5 / A.vb_ry) ** 2), A.hu_cancellous)
        disc = np.mod(q[2] - A.vert_phase, A.vert_period) < A.disc
        cv.paint(sl, vb & disc, 90.0)

    # ---- measurements and descriptions used by the report and returned as metadata
    def details(self, grid: _Grid) -> dict:
        A, c0 = self.A, grid.centre
        d: dict = {"liver_span_cm": round(self.liver_span_mm / 10, 1),
                   "spleen_length_cm": round(self.spleen_len_mm / 10, 1),
                   "liver_hu": round(A.hu_liver - (self.fat_drop if self.on("fatty_liver") else 0.0), 1),
                   "spleen_hu": round(A.hu_spleen, 1)}
        if self.on("renal_cyst"):
            side = self.cyst["side"]
            d["renal_cyst"] = {"side": side, "pole": _pole(self.cyst_local, A.kidneys[side]),
                               "diameter_mm": round(self.cyst["diameter"], 1),
                               "centre_ras": (self.cyst_c + c0).tolist()}
        if self.on("kidney_stone"):
            d["kidney_stone"] = {"side": self.stone["side"],
                                 "pole": _pole(self.stone_local, A.kidneys[self.stone["side"]]),
                                 "diameter_mm": round(self.stone["diameter"], 1),
                                 "centre_ras": (self.stone_c + c0).tolist()}
        if self.on("gallstone"):
            d["gallstone"] = {"diameter_mm": round(self.gallstone["diameter"], 1),
                              "centre_ras": (self.gallstone_c + c0).tolist()}
        if self.on("pleural_effusion"):
            t = self.effusion["depth"]
            d["pleural_effusion"] = {"side": self.effusion["side"], "depth_mm": round(t, 1),
                                     "size": "small" if t < 30 else "moderate" if t < 43 else "large"}
        if self.on("ascites"):
            t = self.ascites["depth"]
            d["ascites"] = {"depth_mm": round(t, 1), "size": "small" if t < 11 else "moderate" if t < 19 else "large"}
        if self.on("lung_nodule"):
            side = self.nodule["side"]
            anterior = self.nodule_c[1] > 0.15 * A.Cy
            lobe = {("right", True): "right middle lobe", ("right", False): "right lower lobe",
                    ("left", True): "lingula", ("left", False): "left lower lobe"}[(side, bool(anterior))]
            d["lung_nodule"] = {"side": side, "lobe": lobe, "diameter_mm": round(self.nodule["diameter"], 1),
                                "centre_ras": (self.nodule_c + c0).tolist()}
        if self.on("atelectasis"):
            d["atelectasis"] = {"side": self.atel["side"]}
        if self.on("aortic_aneurysm"):
            an = self.aneurysm
            r, a, _, _, _, _ = self.aorta_geom(an["s"])
            d["aortic_aneurysm"] = {"diameter_mm": round(an["diameter"], 1), "mural_thrombus": A.contrast,
                                    "centre_ras": (np.array([r, a, an["s"]]) + c0).tolist()}
        return d


def _lerp(x, y, t):
    return (1 - t) * x + t * y


def _pole(local, k: _Ell) -> str:
    z = local[2] / k.semi[2]
    return "upper pole" if z > 0.3 else "lower pole" if z < -0.3 else "interpolar region"


# ----------------------------------------------------------------------------------- grid
def _make_grid(rng: np.random.Generator, anat: _Anatomy, shape, orientation, oblique_deg, cover):
    """Random field of view, orientation and obliquity -> (affine, code, oblique tilt in degrees).

    In-plane: 300-380 mm, centred within FOV_SHIFT_MAX mm of the body axis. Cranio-caudal (along the
    grid's own, possibly tilted, S axis): from 15-30 mm below the lowest of the patient-frame points
    ``cover`` (enlarged liver and spleen, kidneys, infrarenal aorta) to 45-70 mm of lung above the right
    dome, so every finding stays inside the volume whatever the tilt.
    """
    codes = list(ORIENTATIONS)
    w = np.array([ORIENTATIONS[c] for c in codes])
    code = codes[int(rng.choice(len(codes), p=w / w.sum()))]
    tilt = _u(rng, 3, 12) * (1 if rng.random() < 0.5 else -1)
    tilt_axis = int(rng.choice(3, p=[0.6, 0.2, 0.2]))
    is_oblique = rng.random() < OBLIQUE_PROB
    fov_xy = float(np.clip(2 * anat.Bx * _u(rng, 1.1, 1.25), 300, 380))
    shift = rng.uniform(-FOV_SHIFT_MAX, FOV_SHIFT_MAX, size=2)
    lung_top, m_lo, m_hi = _u(rng, 45, 70), _u(rng, 15, 30), _u(rng, 0, 10)
    if orientation is not None:
        code = str(orientation).upper()
    if oblique_deg is not None:
        is_oblique, tilt = bool(oblique_deg), float(oblique_deg)
    if (len(code) != 3 or any(c not in _AXIS for c in code)
            or sorted(_AXIS[c][0] for c in code) != [0, 1, 2]):
        raise VolfmError(f"orientation must be a 3-letter axis code such as 'RAS' or 'LPS', got {orientation!r}")
    R = _rot(tilt_axis, tilt) if is_oblique else np.eye(3)
    # Extent along the grid's S axis n (world direction of R e_z): project the points to cover and the
    # top of the lung slab (the cavity's corners at lung_top above the right dome), relative to (shift, 0).
    top = np.array([[x, y, anat.hR + lung_top] for x in (-anat.Cx, anat.Cx) for y in (-anat.Cy, anat.Cy)])
    pts = np.vstack([np.asarray(cover, float), top])
    n = R[:, 2]
    t = (pts - np.array([shift[0], shift[1], 0.0])) @ n
    t_lo, t_hi = float(t.min()) - m_lo, float(t.max()) + m_hi
    fov = np.array([fov_xy, fov_xy, t_hi - t_lo])
    # Grid centre at (shift, zc) in the patient frame, zc putting the middle of [t_lo, t_hi] at its projection.
    zc = 0.5 * (t_lo + t_hi) / n[2]
    D = np.zeros((3, 3))
    sp = np.zeros(3)
    for ax, c in enumerate(code):
        world, sign = _AXIS[c]
        D[world, ax] = sign
        sp[ax] = fov[world] / shape[ax]
    affine = np.eye(4)
    affine[:3, :3] = R @ D @ np.diag(sp)
    centre = anat.world_centre + np.array([shift[0], shift[1], zc])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape, float) - 1.0) / 2.0)
    return affine, code, (tilt if is_oblique else 0.0)


# ----------------------------------------------------------------------------------- report
def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _report(rng: np.random.Generator, present: set[str], d: dict, anat: _Anatomy) -> str:
    """Free-text report: one line per section, varied phrasing, negations for absent findings."""
    sec: dict[str, list[str]] = {k: [] for k in REPORT_SECTIONS}
    imp: list[str] = []

    def add(section, pos, neg, impression=None, present_=False):
        sec[section].append(_pick(rng, pos) if present_ else _pick(rng, neg))
        if present_ and impression:
            imp.append(_pick(rng, impression))

    # LOWER THORAX
    if "pleural_effusion" in present:
        e = d["pleural_effusion"]
        size, side = e["size"], e["side"]
        plural = "s" if side == "bilateral" else ""
        pos = [f"{size.capitalize()} {side} pleural effusion{plural}.",
               f"There {'are' if plural else 'is a'} {size} {side} pleural effusion{plural}.",
               f"{side.capitalize()} pleural effusion{plural}, {size} in volume, layering posteriorly."]
        impr = [f"{size.capitalize()} {side} pleural effusion{plural}.",
                f"{side.capitalize()} pleural effusion{plural}."]
    else:
        pos, impr = [], []
    add("LOWER THORAX", pos, ["No pleural effusion.", "No pleural effusions.", "There is no pleural effusion."],
        impr, "pleural_effusion" in present)
    if "lung_nodule" in present:
        n = d["lung_nodule"]
        mm, lobe = int(round(n["diameter_mm"])), n["lobe"]
        pos = [f"There is a {mm} mm solid nodule in the {lobe}.",
               f"{mm} mm noncalcified pulmonary nodule in the {lobe}.",
               f"A solid pulmonary nodule measuring {mm} mm is present in the {lobe}."]
        impr = [f"{mm} mm {lobe} pulmonary nodule; follow-up chest CT is recommended.",
                f"Solitary {mm} mm pulmonary nodule in the {lobe}.", f"{lobe.capitalize()} nodule measuring {mm} mm."]
    else:
        pos, impr = [], []
    add("LOWER THORAX", pos, ["No suspicious pulmonary nodules.", "No pulmonary nodule at the lung bases.",
                              "No focal pulmonary nodule."], impr, "lung_nodule" in present)
    if "atelectasis" in present:
        side = d["atelectasis"]["side"]
        where = "bibasilar" if side == "bilateral" else f"{side} basilar"
        pos = [f"{where.capitalize()} atelectasis.", f"Dependent {where} atelectasis.",
               f"Subsegmental atelectasis at the {'lung bases' if side == 'bilateral' else side + ' lung base'}."]
        impr = [f"{where.capitalize()} atelectasis.", f"Dependent {where} atelectasis."]
    else:
        pos, impr = [], []
    add("LOWER THORAX", pos, ["No focal consolidation or atelectasis.", "No atelectasis.",
                              "The lung bases are clear without atelectasis."], impr, "atelectasis" in present)
    # LIVER AND BILIARY
    span = d["liver_span_cm"]
    add("LIVER AND BILIARY",
        [f"The liver is enlarged, measuring {span} cm in craniocaudal span.",
         f"Hepatomegaly, with the liver measuring {span} cm craniocaudally.", f"Enlarged liver ({span} cm)."],
        [f"The liver is normal in size ({span} cm).", "Normal liver size.", "The liver is not enlarged."],
        [f"Hepatomegaly ({span} cm).", "Hepatomegaly.", f"Enlarged liver measuring {span} cm."],
        "hepatomegaly" in present)
    add("LIVER AND BILIARY",
        ["The liver is diffusely hypoattenuating relative to the spleen, consistent with hepatic steatosis.",
         "Diffuse fatty infiltration of the liver.",
         "Hepatic steatosis, with liver attenuation lower than the spleen."],
        ["Normal hepatic attenuation without steatosis.", "No hepatic steatosis.",
         "The liver parenchyma has normal attenuation."],
        ["Hepatic steatosis.", "Diffuse fatty liver.", "Fatty infiltration of the liver."], "fatty_liver" in present)
    sec["LIVER AND BILIARY"].append(_pick(rng, ["No focal hepatic lesion.", "No biliary ductal dilatation.",
                                                "No intrahepatic or extrahepatic biliary dilatation."]))
    # GALLBLADDER
    if "gallstone" in present:
        g = d["gallstone"]
        cm, mm = round(g["diameter_mm"] / 10, 1), int(round(g["diameter_mm"]))
        pos = [f"Cholelithiasis: a {cm} cm calcified gallstone.",
               f"There is a {cm} cm gallstone within the gallbladder.",
               f"Calcified gallstone measuring {mm} mm in the dependent gallbladder lumen."]
        impr = ["Cholelithiasis without evidence of cholecystitis.", f"{cm} cm gallstone.", "Cholelithiasis."]
    else:
        pos, impr = [], []
    add("GALLBLADDER", pos, ["The gallbladder is unremarkable without gallstones.", "No cholelithiasis.",
                             "No radiopaque gallstones."], impr, "gallstone" in present)
    sec["GALLBLADDER"].append(_pick(rng, ["No gallbladder wall thickening.", "No pericholecystic fluid."]))
    # SPLEEN
    ln = d["spleen_length_cm"]
    add("SPLEEN", [f"The spleen is enlarged, measuring {ln} cm.", f"Splenomegaly ({ln} cm).",
                   f"Enlarged spleen measuring {ln} cm in length."],
        ["The spleen is normal in size.", f"Normal spleen size ({ln} cm).", "No splenomegaly."],
        [f"Splenomegaly ({ln} cm).", "Splenomegaly.", "Enlarged spleen."], "splenomegaly" in present)
    # KIDNEYS AND URETERS
    if "renal_cyst" in present:
        c = d["renal_cyst"]
        cm, side, pole = round(c["diameter_mm"] / 10, 1), c["side"], c["pole"]
        pos = [f"Simple cyst in the {pole} of the {side} kidney measuring {cm} cm.",
               f"{cm} cm fluid-attenuation cyst arising from the {side} kidney, {pole}.",
               f"There is a {cm} cm simple renal cyst in the {side} kidney."]
        impr = [f"{side.capitalize()} renal cyst ({cm} cm), likely simple.", f"{cm} cm simple {side} renal cyst.",
                "Simple renal cyst, no follow-up needed."]
    else:
        pos, impr = [], []
    add("KIDNEYS AND URETERS", pos, ["No renal cysts or masses.", "No focal renal lesion.", "No renal mass or cyst."],
        impr, "renal_cyst" in present)
    if "kidney_stone" in present:
        k = d["kidney_stone"]
        mm, side, pole = int(round(k["diameter_mm"])), k["side"], k["pole"]
        pos = [f"{mm} mm nonobstructing calculus in the {pole} of the {side} kidney.",
               f"Nephrolithiasis: a {mm} mm stone in the {side} kidney. No hydronephrosis.",
               f"There is a {mm} mm {side} renal calculus without hydronephrosis."]
        impr = [f"Nonobstructing {side} nephrolithiasis ({mm} mm).", f"{mm} mm {side} renal calculus.",
                f"{side.capitalize()} kidney stone, {mm} mm, without hydronephrosis."]
    else:
        pos, impr = [], []
    add("KIDNEYS AND URETERS", pos, ["No hydronephrosis or renal calculi.", "No nephrolithiasis or hydronephrosis.",
                                     "No renal stones or hydronephrosis."], impr, "kidney_stone" in present)
    # VASCULATURE
    if "aortic_aneurysm" in present:
        an = d["aortic_aneurysm"]
        cm = round(an["diameter_mm"] / 10, 1)
        thr = " with eccentric mural thrombus" if an["mural_thrombus"] else ""
        pos = [f"Infrarenal abdominal aortic aneurysm measuring {cm} cm in maximal diameter{thr}.",
               f"The infrarenal abdominal aorta is aneurysmal, measuring {cm} cm{thr}.",
               f"Fusiform aneurysm of the infrarenal aorta, {cm} cm in diameter{thr}."]
        impr = [f"{cm} cm infrarenal abdominal aortic aneurysm.", f"Abdominal aortic aneurysm measuring {cm} cm.",
                f"Fusiform infrarenal aortic aneurysm ({cm} cm); vascular surgery follow-up is suggested."]
    else:
        pos, impr = [], []
    add("VASCULATURE", pos, ["The abdominal aorta is normal in caliber.", "No abdominal aortic aneurysm.",
                             "Normal caliber abdominal aorta without aneurysm."], impr, "aortic_aneurysm" in present)
    # PERITONEUM
    if "ascites" in present:
        size = d["ascites"]["size"]
        pos = [f"{size.capitalize()} volume ascites, predominantly perihepatic.", f"{size.capitalize()} ascites.",
               f"There is {size} volume free fluid in the abdomen (ascites)."]
        impr = [f"{size.capitalize()} ascites.", f"{size.capitalize()} volume ascites.", "Ascites."]
    else:
        pos, impr = [], []
    add("PERITONEUM", pos, ["No ascites.", "No free fluid.", "No free intraperitoneal fluid."], impr,
        "ascites" in present)
    sec["PERITONEUM"].append(_pick(rng, ["No bowel obstruction.", "No pneumoperitoneum.",
                                         "Bowel loops are normal in caliber."]))
    # MUSCULOSKELETAL
    sec["MUSCULOSKELETAL"].append(_pick(rng, ["No acute osseous abnormality.", "No suspicious osseous lesion.",
                                              "No aggressive osseous lesion."]))
    if anat.age >= 60:
        sec["MUSCULOSKELETAL"].append(_pick(rng, ["Mild degenerative changes of the spine.",
                                                  "Multilevel degenerative disc disease."]))
    for k in sec:  # vary sentence order within a section
        order = rng.permutation(len(sec[k]))
        sec[k] = [sec[k][i] for i in order]
    technique = (_pick(rng, ["CT of the abdomen with intravenous contrast in the portal venous phase.",
                             "Contrast-enhanced CT of the abdomen, portal venous phase."]) if anat.contrast else
                 _pick(rng, ["CT of the abdomen without intravenous contrast.", "Noncontrast CT of the abdomen."]))
    lines = [f"TECHNIQUE: {technique}", "FINDINGS:"]
    lines += [f"{k}: {' '.join(v)}" for k, v in sec.items()]
    imp = [imp[i] for i in rng.permutation(len(imp))]
    if not imp:
        imp = [_pick(rng, ["No acute abnormality in the abdomen.", "Normal CT of the abdomen.",
                           "No significant abnormality."])]
    lines.append("IMPRESSION: " + " ".join(f"{i + 1}. {t}" for i, t in enumerate(imp)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- public API
def _seed_sequence(rng_or_seed) -> np.random.SeedSequence:
    if isinstance(rng_or_seed, np.random.SeedSequence):
        return rng_or_seed
    if isinstance(rng_or_seed, np.random.Generator):
        return np.random.SeedSequence(int(rng_or_seed.integers(2 ** 63)))
    return np.random.SeedSequence(int(rng_or_seed))


def _stream(ss: np.random.SeedSequence, key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + (key,)))


def _probabilities(finding_prob) -> dict[str, float]:
    if finding_prob is None:
        return {n: spec.prob for n, spec in FINDINGS.items()}
    if isinstance(finding_prob, dict):
        unknown = set(finding_prob) - set(FINDINGS)
        if unknown:
            raise VolfmError(f"unknown finding(s) {sorted(unknown)}; known: {', '.join(FINDINGS)}")
        return {n: float(finding_prob.get(n, spec.prob)) for n, spec in FINDINGS.items()}
    return {n: float(finding_prob) for n in FINDINGS}


def make_ct_case(rng_or_seed, case_id: str = "ct_0000", shape=DEFAULT_SHAPE, *, findings=None,
                 finding_prob=None, orientation: str | None = None, oblique_deg: float | None = None) -> dict:
    """Simulate one CT case.

    rng_or_seed: int, ``np.random.SeedSequence`` or ``np.random.Generator`` (one draw is taken from it).
    findings: None draws each finding independently (``finding_prob``: None = defaults, a float or a
        dict name -> probability); an iterable of names makes exactly those present -- everything else
        (anatomy, grid, noise) is unchanged, so a case can be compared with and without a finding.
    orientation / oblique_deg: force the axis code (e.g. 'LPS', 'ASL') or the tilt (0 = not oblique);
        the anatomy does not depend on them.

    Returns {"case_id", "image": Volume (int16 HU), "label": Volume (uint8, :data:`LABELS`),
    "findings": names in :data:`FINDINGS` order, "icd_codes": shuffled codes (findings + 0-2 history codes),
    "report": str, "sex": 'M'/'F', "age": int, "metadata": {orientation, oblique_deg, contrast, spacing,
    details (measurements and lesion world positions, RAS mm)}}.
    """
    shape = parse_triple(shape, "shape (voxels)", integer=True, at_least=8)
    ss = _seed_sequence(rng_or_seed)
    anat = _Anatomy(_stream(ss, _ANAT))
    probs = _probabilities(finding_prob)
    u = _stream(ss, _PRESENT).random(len(FINDINGS))
    if findings is None:
        present = {n for n, x in zip(FINDINGS, u) if x < probs[n]}
    else:
        present = {findings} if isinstance(findings, str) else set(findings)
        unknown = present - set(FINDINGS)
        if unknown:
            raise VolfmError(f"unknown finding(s) {sorted(unknown)}; known: {', '.join(FINDINGS)}")
    frngs = {n: _stream(ss, _FIND0 + i) for i, n in enumerate(FINDINGS)}
    ph = _Phantom(anat, frngs, present)
    # The field of view covers the anatomy the findings depend on, enlarged organs included, whether or
    # not they are present (so forcing a finding changes nothing else).
    affine, code, tilt = _make_grid(_stream(ss, _GRID), anat, shape, orientation, oblique_deg,
                                    ph.coverage_points())
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    grid = _Grid(affine, shape, anat.world_centre)
    ph.fit(grid, float(spacing.max()))
    img, lab = ph.render(grid)
    # Partial volume, slight smooth drift inside the body, quantum noise.
    img = ndi.gaussian_filter(img, 0.5, truncate=2.5)
    p = grid.coords(grid.full)
    drift = (anat.drift[0] * p[0] + anat.drift[1] * p[1] + anat.drift[2] * p[2]) / 100.0
    img += np.where(anat.body(p), drift, 0.0).astype(np.float32)
    img += _stream(ss, _NOISE).standard_normal(img.shape, dtype=np.float32) * np.float32(anat.noise_sd)
    img = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    ordered = [n for n in FINDINGS if n in present]
    details = ph.details(grid)
    crng = _stream(ss, _CODES)
    history = list(crng.choice(list(HISTORY_CODES), size=int(crng.integers(0, 3)), replace=False))
    codes = [FINDINGS[n].code for n in ordered] + [str(h) for h in history]
    codes = [codes[i] for i in crng.permutation(len(codes))]
    report = _report(_stream(ss, _WORDS), present, details, anat)
    common = {"case_id": case_id, "synthetic": True}
    meta = {"orientation": code, "oblique_deg": float(tilt), "contrast": anat.contrast,
            "spacing": [float(x) for x in spacing], "details": details}
    return {
        "case_id": case_id,
        "image": Volume(img[None], affine, {**common, "modality": "CT", "units": "HU"}),
        "label": Volume(lab[None], affine.copy(), {**common, "modality": "SEG", "labels": dict(LABELS)}),
        "findings": ordered,
        "icd_codes": codes,
        "report": report,
        "sex": anat.sex,
        "age": anat.age,
        "metadata": meta,
    }


def assign_splits(n_cases: int, seed: int = 0) -> list[str]:
    """Deterministic ~70/15/15 train/val/test split of this cohort's case indices."""
    return _assign_splits(n_cases, seed, salt=0xC7)


def _write_case(job) -> dict:
    out, seed, index, case_id, shape, split = job
    case = make_ct_case(np.random.SeedSequence(int(seed), spawn_key=(int(index),)), case_id, shape)
    image, label = f"images/{case_id}.nii.gz", f"labels/{case_id}.nii.gz"
    write_nifti(case["image"], Path(out) / image)
    write_nifti(case["label"], Path(out) / label)
    return {"case_id": case_id, "image": image, "label": label, "icd_codes": ";".join(case["icd_codes"]),
            "report": case["report"], "findings": ";".join(case["findings"]), "split": split,
            "sex": case["sex"], "age": case["age"]}


def _readme(n_cases, seed, shape) -> str:
    return (
        "SIMULATED abdominal CT cohort -- NOT real patient data.\n\n"
        f"Made by volfm.synth.ct.make_ct_cohort(n_cases={n_cases}, seed={seed}, shape={tuple(shape)}).\n"
        "images/<id>.nii.gz: int16 HU; labels/<id>.nii.gz: uint8 organ labels (labels.json: name -> value).\n"
        "cohort.csv columns: " + ", ".join(CSV_COLUMNS) + ".\n"
        "image/label paths are relative to the folder that holds cohort.csv; icd_codes and findings are\n"
        "';'-separated; report is multi-line free text (one line per section).\n"
        "Findings (ICD-10-CM): " + ", ".join(f"{n} {s.code}" for n, s in FINDINGS.items()) + ".\n"
        "History codes added at random, unrelated to the image: " + ", ".join(HISTORY_CODES) + ".\n"
    )


def make_ct_cohort(out_dir, n_cases: int, seed: int = 0, shape=DEFAULT_SHAPE, workers: int = 1,
                   progress: bool = True) -> Path:
    """Write a synthetic CT cohort and return the path of its ``cohort.csv``.

    Layout: out_dir/images/<id>.nii.gz (int16 HU), out_dir/labels/<id>.nii.gz (uint8), out_dir/labels.json
    (label name -> value), out_dir/README.txt, out_dir/cohort.csv (columns :data:`CSV_COLUMNS`; image and
    label paths relative to the CSV's folder, POSIX separators). Case i depends only on (seed, i), so the
    result is the same for any ``workers``.
    """
    n_cases = int(n_cases)
    if n_cases < 1:
        raise VolfmError(f"n_cases must be at least 1, got {n_cases!r}")
    shape = parse_triple(shape, "shape (voxels)", integer=True, at_least=8)
    out = Path(out_dir)
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    splits = assign_splits(n_cases, seed)
    width = max(4, len(str(n_cases - 1)))
    jobs = [(str(out), int(seed), i, f"ct_{i:0{width}d}", shape, splits[i]) for i in range(n_cases)]
    bar = dict(total=n_cases, desc="synth CT", unit="case", disable=not progress)
    if int(workers) > 1:
        with ProcessPoolExecutor(max_workers=int(workers)) as ex:
            rows = list(progress_bar(ex.map(_write_case, jobs), **bar))
    else:
        rows = [_write_case(j) for j in progress_bar(jobs, **bar)]
    write_json_atomic(out / "labels.json", LABEL_IDS)
    write_text_atomic(out / "README.txt", _readme(n_cases, seed, shape))
    csv_path = out / "cohort.csv"
    with atomic_path(csv_path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
    return csv_path
