"""QC pictures are drawn in the radiological display convention whatever the input's voxel order.

Reference, independent of the code under test: one synthetic RAS volume with a bright block at the patient's
anterior-right-superior corner, written (with nibabel, affines built by hand) in RAS voxel order, in LPS voxel order
and in a permuted (S, L, P) voxel order under an oblique (12 degrees) rotation. All three must give pixel-equal
display slices and pixel-equal PNGs, and the block must sit in the top-left quadrant of every view: axial (anterior
up, patient right on the image's left), coronal (superior up, right on the left), sagittal (superior up, anterior on
the left).
"""
from __future__ import annotations

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from volfm.io import read_volume
from volfm.preprocess.qc import display_views, render_case_png
from volfm.testing import rotation

SHAPE = (20, 24, 16)  # (R, A, S) voxels of the reference
SPACING = (1.0, 1.5, 2.0)


def _reference():
    i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    img = (0.2 + 0.01 * i + 0.02 * j + 0.03 * k).astype(np.float32)  # a gentle ramp, no symmetry
    block = (i >= 14) & (j >= 17) & (k >= 11)  # high i = right, high j = anterior, high k = superior
    img[block] = 5.0
    aff = np.diag([*SPACING, 1.0])
    aff[:3, 3] = (-10.0, -20.0, 5.0)
    return img, block.astype(np.uint8), aff


def _orders():
    """(name, array transform, index map): ``index(a, b, c)`` -> the RAS voxel index shown at voxel (a, b, c)."""
    n0, n1, _ = SHAPE
    return [
        ("RAS", lambda x: x, np.eye(4)),
        # LPS: i and j reversed
        ("LPS", lambda x: x[::-1, ::-1, :],
         np.array([[-1, 0, 0, n0 - 1], [0, -1, 0, n1 - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)),
        # (S, L, P): axis 0 = k, axis 1 = reversed i, axis 2 = reversed j
        ("SLP", lambda x: np.transpose(x, (2, 0, 1))[:, ::-1, ::-1],
         np.array([[0, -1, 0, n0 - 1], [0, 0, -1, n1 - 1], [1, 0, 0, 0], [0, 0, 0, 1]], float)),
    ]


def _write_cases(tmp_path):
    img, lab, ras_aff = _reference()
    oblique = np.eye(4)
    oblique[:3, :3] = rotation(0, 12.0) @ rotation(2, -12.0)
    cases = {}
    for name, tf, index_map in _orders():
        aff = ras_aff @ index_map
        for tag, world in ((name, np.eye(4)), (f"{name}-oblique", oblique)):
            if tag == "RAS-oblique":
                continue
            a = world @ aff
            nib.save(nib.Nifti1Image(np.ascontiguousarray(tf(img)), a), tmp_path / f"{tag}.nii.gz")
            nib.save(nib.Nifti1Image(np.ascontiguousarray(tf(lab)), a), tmp_path / f"{tag}_lab.nii.gz")
            cases[tag] = (tmp_path / f"{tag}.nii.gz", tmp_path / f"{tag}_lab.nii.gz")
    return cases


def _read(paths):
    vol = read_volume(str(paths[0]))
    lab = read_volume(str(paths[1]), dtype=None)
    return vol.array[0], vol.affine, lab.array[0]


def test_display_views_are_the_same_for_every_voxel_order(tmp_path):
    cases = _write_cases(tmp_path)
    assert set(cases) == {"RAS", "LPS", "LPS-oblique", "SLP", "SLP-oblique"}
    ref = display_views(*_read(cases["RAS"]))
    for tag, paths in cases.items():
        v = display_views(*_read(paths))
        assert v["views"] == ref["views"], tag
        np.testing.assert_allclose(v["aspect"], ref["aspect"], rtol=1e-5, err_msg=tag)
        for a, b in zip(v["image"], ref["image"]):
            np.testing.assert_array_equal(a, b, err_msg=tag)
        for a, b in zip(v["label"], ref["label"]):
            np.testing.assert_array_equal(a, b, err_msg=tag)
    # physical aspect: axial rows are A (1.5 mm) over columns R (1 mm); coronal S/R; sagittal S/A
    np.testing.assert_allclose(ref["aspect"], [1.5, 2.0, 2.0 / 1.5], rtol=1e-5)


@pytest.mark.parametrize("tag", ["RAS", "LPS", "SLP-oblique"])
def test_marker_is_top_left_in_every_view(tmp_path, tag):
    """Anterior-right-superior block: axial top-left (anterior up, right on the left), coronal top-left (superior
    up, right on the left), sagittal top-left (superior up, anterior on the left)."""
    v = display_views(*_read(_write_cases(tmp_path)[tag]))
    for (name, _), sl in zip(v["views"], v["image"]):
        rows, cols = np.nonzero(sl == 5.0)
        assert rows.size, name
        h, w = sl.shape
        assert rows.max() < h / 2 and cols.max() < w / 2, (tag, name, rows.mean(), cols.mean(), sl.shape)
    # the slices are those of the RAS reference: axial (A rows x R cols), coronal (S x R), sagittal (S x A)
    assert [s.shape for s in v["image"]] == [(24, 20), (16, 20), (16, 24)]


def test_png_is_pixel_equal_for_every_voxel_order(tmp_path):
    cases = _write_cases(tmp_path)
    pictures = {}
    for tag, paths in cases.items():
        img, aff, lab = _read(paths)
        out = render_case_png(tmp_path / f"{tag}.png", img, aff, lab, title="marker",
                              extra=[("second", img * 2.0)])
        pictures[tag] = mpimg.imread(out)
    ref = pictures.pop("RAS")
    for tag, pic in pictures.items():
        np.testing.assert_array_equal(pic, ref, err_msg=tag)
