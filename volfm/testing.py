"""Geometry fixtures for tests (here and in user code): rotations, centred grid affines, index grids."""
from __future__ import annotations

import numpy as np


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about world axis ``axis`` (0 = x, 1 = y, 2 = z)."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def centred_affine(directions, spacing, shape, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS affine with unit ``directions`` (columns), ``spacing`` and its field-of-view centre at ``centre``."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(directions, float) * np.asarray(spacing, float)[None, :]
    a[:3, 3] = np.asarray(centre, float) - a[:3, :3] @ ((np.asarray(shape[:3], float) - 1) / 2)
    return a


def index_grid(shape) -> np.ndarray:
    """(I, J, K, 3) array of voxel indices."""
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape[:3]], indexing="ij"), axis=-1)
