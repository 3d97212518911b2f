"""Geometry in one place: RAS+ voxel-to-world affines, LPS<->RAS, obliquity and shear, grids.

Convention (nibabel's): a 4x4 ``affine`` maps a voxel index (i, j, k) -- voxel centres are the
sample points -- to RAS+ world millimetres. SimpleITK/DICOM/ITK work in LPS+; conversion happens
only through :func:`lps_to_ras` / :func:`affine_from_sitk` / :func:`sitk_geometry`.
"""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np

# RAS <-> LPS flips the sign of the first two world axes; the matrix is its own inverse.
LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])

SHEAR_TOL = 1e-4  # |cos| between direction columns above which an affine counts as sheared
OBLIQUE_TOL = 1e-3  # |off-axis component| of a unit direction above which it counts as oblique


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """Convert an LPS voxel-to-world affine to RAS (and back: the operation is an involution)."""
    return LPS_RAS_FLIP @ np.asarray(affine, dtype=np.float64)


ras_to_lps = lps_to_ras


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each array axis (mm): the norms of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def direction_from_affine(affine: np.ndarray) -> np.ndarray:
    """3x3 matrix whose columns are the unit world directions of the array axes."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return a / spacing_from_affine(affine)[None, :]


def shear_of(affine: np.ndarray) -> float:
    """Largest |cos| between two direction columns: 0 for an orthogonal grid."""
    d = direction_from_affine(affine)
    g = d.T @ d
    return float(np.abs(g - np.eye(3)).max())


def is_sheared(affine: np.ndarray, tol: float = SHEAR_TOL) -> bool:
    return shear_of(affine) > tol


def is_oblique(affine: np.ndarray, tol: float = OBLIQUE_TOL) -> bool:
    """True when the array axes are not aligned with world axes (up to permutation and sign)."""
    d = np.abs(direction_from_affine(affine))
    off = d.copy()
    off[np.argmax(d, axis=0), np.arange(3)] = 0.0
    return bool(off.max() > tol)


def axcodes(affine: np.ndarray) -> str:
    """Closest anatomical orientation code of the array axes, e.g. 'RAS', 'LPS'."""
    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Map (..., 3) voxel indices to (..., 3) RAS millimetres."""
    ijk = np.asarray(ijk, dtype=np.float64)
    a = np.asarray(affine, dtype=np.float64)
    return ijk @ a[:3, :3].T + a[:3, 3]


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Map (..., 3) RAS millimetres to (..., 3) continuous voxel indices."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return np.asarray(xyz, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]


def fov_center(affine: np.ndarray, shape) -> np.ndarray:
    """World position of the centre of the field of view (midpoint of the corner voxel centres)."""
    return voxel_to_world(affine, (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0)


def grid_with_spacing(affine: np.ndarray, shape, spacing) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A grid with the same axis directions and field-of-view centre, at a new voxel spacing.

    The new shape covers the old physical extent (``shape * old_spacing``) rounded to whole voxels.
    """
    old_sp = spacing_from_affine(affine)
    new_sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    extent = np.asarray(shape[:3], dtype=np.float64) * old_sp
    new_shape = tuple(int(max(1, round(e))) for e in extent / new_sp)
    new = np.eye(4)
    new[:3, :3] = direction_from_affine(affine) * new_sp[None, :]
    centre = fov_center(affine, shape)
    new[:3, 3] = centre - new[:3, :3] @ ((np.asarray(new_shape, dtype=np.float64) - 1.0) / 2.0)
    return new, new_shape


def axis_aligned_grid(affine: np.ndarray, shape, spacing) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An RAS-aligned grid at ``spacing`` enclosing the world bounding box of a (possibly oblique or
    sheared) grid, centred on the same field-of-view centre."""
    shape = np.asarray(shape[:3], dtype=np.float64)
    corners = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)])
    world = voxel_to_world(affine, corners)
    extent = world.max(axis=0) - world.min(axis=0)
    sp = np.asarray(spacing, dtype=np.float64)
    # ceil (not round): the new grid must enclose the box; the 1e-6 keeps exact fits from gaining a voxel
    new_shape = tuple(int(max(1, math.ceil(e - 1e-6))) for e in extent / sp)
    new = np.diag([*sp, 1.0])
    centre = fov_center(affine, shape)
    new[:3, 3] = centre - sp * (np.asarray(new_shape, dtype=np.float64) - 1.0) / 2.0
    return new, new_shape


def affine_from_sitk(image) -> np.ndarray:
    """RAS voxel-to-world affine of a SimpleITK image, for an array indexed (i, j, k) = (x, y, z)."""
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    sp = np.asarray(image.GetSpacing(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = d * sp[None, :]
    lps[:3, 3] = image.GetOrigin()
    return lps_to_ras(lps)


def sitk_geometry(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(origin, spacing, direction) in SimpleITK's LPS convention for a RAS affine.

    Sheared affines cannot be represented by ITK (orthonormal direction) and raise ValueError.
    """
    if is_sheared(affine):
        raise ValueError("a sheared affine cannot be expressed as an ITK origin/spacing/direction")
    lps = ras_to_lps(affine)
    sp = spacing_from_affine(lps)
    d = lps[:3, :3] / sp[None, :]
    return tuple(lps[:3, 3]), tuple(sp), tuple(d.ravel())


def format_affine(affine: np.ndarray) -> str:
    rows = np.asarray(affine, dtype=np.float64)[:3]
    return "\n".join("  [" + " ".join(f"{v:9.3f}" for v in r) + " ]" for r in rows)
