"""volfm.preprocess.spatial: exact (index + affine only) reorientation, crop/pad and foreground boxes."""
import itertools

import numpy as np
import pytest

from volfm import VolfmError
from volfm.io import Volume
from volfm.io import affine as geo
from volfm.preprocess import spatial
from volfm.preprocess.spatial import crop_foreground, crop_or_pad, reorient, reoriented_grid
from volfm.testing import rotation as rot

SHAPE = (10, 8, 6)


def make_affine(directions, spacing=(0.7, 0.9, 5.0), origin=(-12.0, 30.0, 7.5)):
    a = np.eye(4)
    a[:3, :3] = np.asarray(directions, float) * np.asarray(spacing)[None, :]
    a[:3, 3] = origin
    return a


def labelled(affine, shape=SHAPE, channels=1):
    """Every voxel holds its own flat index (channel c adds c * 10_000)."""
    base = np.arange(np.prod(shape), dtype=np.int64).reshape(shape)
    arr = np.stack([base + 10_000 * c for c in range(channels)])
    return Volume(arr, affine, {"path": "labelled.nii.gz"})


def index_grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)


DIRECTIONS = {
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "PIR": np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "oblique_LAI": np.diag([-1.0, 1.0, -1.0]) @ rot(2, 9.0) @ rot(1, -6.0),
}
TARGETS = ["RAS", "LPS", "LAS", "PIR", "SAL", "IRP"]


def assert_same_world(before: Volume, after: Volume):
    """Each value sits at the same world position before and after (affine @ index of that value)."""
    flat = after.array[0].reshape(-1)
    old_idx = np.stack(np.unravel_index(flat, before.shape), axis=-1).astype(float)
    new_idx = index_grid(after.shape).reshape(-1, 3).astype(float)
    np.testing.assert_allclose(geo.voxel_to_world(after.affine, new_idx), geo.voxel_to_world(before.affine, old_idx),
                               atol=1e-9)


@pytest.mark.parametrize("src", list(DIRECTIONS))
@pytest.mark.parametrize("code", TARGETS)
def test_reorient_keeps_world_positions(src, code):
    vol = labelled(make_affine(DIRECTIONS[src]))
    out = reorient(vol, code)
    assert out.orientation == code
    assert geo.axcodes(out.affine) == code
    assert out.array.dtype == vol.array.dtype
    assert sorted(out.shape) == sorted(vol.shape)
    assert sorted(out.spacing.round(9)) == sorted(vol.spacing.round(9))
    assert_same_world(vol, out)
    np.testing.assert_allclose(geo.fov_center(out.affine, out.shape), geo.fov_center(vol.affine, vol.shape),
                               atol=1e-9)
    assert out.meta == vol.meta and out.meta is not vol.meta


@pytest.mark.parametrize("src", list(DIRECTIONS))
def test_reorient_round_trip(src):
    vol = labelled(make_affine(DIRECTIONS[src]))
    code = vol.orientation
    for other in TARGETS:
        back = reorient(reorient(vol, other), code)
        np.testing.assert_array_equal(back.array, vol.array)
        np.testing.assert_allclose(back.affine, vol.affine, atol=1e-9)


def test_reorient_to_own_orientation_is_a_no_op():
    vol = labelled(make_affine(DIRECTIONS["PIR"]))
    out = reorient(vol, "PIR")
    np.testing.assert_array_equal(out.array, vol.array)
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-12)


def test_reorient_lowercase_and_multichannel():
    vol = labelled(make_affine(DIRECTIONS["LPS"]), channels=3)
    out = reorient(vol, "ras")
    assert out.orientation == "RAS" and out.num_channels == 3
    # each channel moved the same way
    for c in range(3):
        np.testing.assert_array_equal(out.array[c] - out.array[0], 10_000 * c)
    np.testing.assert_array_equal(out.array[0], vol.array[0, ::-1, ::-1, :])


@pytest.mark.parametrize("bad", ["RAX", "RRS", "RA", "RASL", "LRS", ""])
def test_reorient_rejects_bad_codes(bad):
    vol = labelled(make_affine(np.eye(3)))
    with pytest.raises(ValueError, match="orientation"):
        reorient(vol, bad)


@pytest.mark.parametrize("src", list(DIRECTIONS))
@pytest.mark.parametrize("code", TARGETS)
def test_reoriented_grid_matches_reorient(src, code):
    vol = labelled(make_affine(DIRECTIONS[src]))
    aff, shape = reoriented_grid(vol.affine, vol.shape, code)
    out = reorient(vol, code)
    assert shape == out.shape
    np.testing.assert_array_equal(aff, out.affine)


def test_reorient_oblique_keeps_rotation():
    vol = labelled(make_affine(DIRECTIONS["oblique_LAI"]))
    out = reorient(vol, "RAS")
    assert out.is_oblique and out.orientation == "RAS"
    # the direction columns are the old ones, permuted and negated: no resampling happened
    d_old, d_new = geo.direction_from_affine(vol.affine), geo.direction_from_affine(out.affine)
    for col in d_new.T:
        assert min(np.abs(col - s * c).max() for c in d_old.T for s in (1, -1)) < 1e-12


# --- crop / pad -------------------------------------------------------------------------------------

def test_center_crop():
    vol = labelled(make_affine(DIRECTIONS["oblique_LAI"]))
    out, start = crop_or_pad(vol, (6, 5, 4))
    np.testing.assert_array_equal(start, [2, 1, 1])
    assert out.shape == (6, 5, 4)
    np.testing.assert_array_equal(out.array, vol.array[:, 2:8, 1:6, 1:5])
    assert_same_world(vol, out)
    np.testing.assert_allclose(out.affine[:3, :3], vol.affine[:3, :3])


def test_center_pad_with_fill():
    vol = labelled(make_affine(DIRECTIONS["LPS"]))
    out, start = crop_or_pad(vol, (13, 8, 9), fill=-5)
    np.testing.assert_array_equal(start, [-2, 0, -2])  # floor((shape - size) / 2): extra pad goes after
    assert out.shape == (13, 8, 9) and out.array.dtype == vol.array.dtype
    np.testing.assert_array_equal(out.array[:, 2:12, :, 2:8], vol.array)
    mask = np.ones(out.shape, bool)
    mask[2:12, :, 2:8] = False
    assert np.all(out.array[0][mask] == -5)
    # kept voxels sit at the same world positions
    kept = index_grid(vol.shape).reshape(-1, 3)
    np.testing.assert_allclose(geo.voxel_to_world(out.affine, kept + [2, 0, 2]), geo.voxel_to_world(vol.affine, kept),
                               atol=1e-9)
    half_voxel_back = geo.voxel_to_world(vol.affine, [-0.5, 0, -0.5]) - geo.voxel_to_world(vol.affine, [0, 0, 0])
    np.testing.assert_allclose(geo.fov_center(out.affine, out.shape) - geo.fov_center(vol.affine, vol.shape),
                               half_voxel_back, atol=1e-9)


def test_crop_in_one_axis_pad_in_another_and_explicit_start():
    vol = labelled(make_affine(DIRECTIONS["PIR"]))
    out, start = crop_or_pad(vol, (4, 12, 6), start=(-3, -1, 2), fill=-1)
    np.testing.assert_array_equal(start, [-3, -1, 2])
    expect = np.full((1, 4, 12, 6), -1, dtype=vol.array.dtype)
    expect[:, 3:4, 1:9, 0:4] = vol.array[:, 0:1, :, 2:6]
    np.testing.assert_array_equal(out.array, expect)
    np.testing.assert_allclose(geo.voxel_to_world(out.affine, [3, 1, 0]), geo.voxel_to_world(vol.affine, [0, 0, 2]))


def test_window_entirely_outside_is_all_fill():
    vol = labelled(make_affine(np.eye(3)))
    out, _ = crop_or_pad(vol, (3, 3, 3), start=(20, 0, 0), fill=7)
    assert np.all(out.array == 7)
    np.testing.assert_allclose(out.affine[:3, 3], geo.voxel_to_world(vol.affine, [20, 0, 0]))


def test_crop_or_pad_same_size_is_identity():
    vol = labelled(make_affine(DIRECTIONS["LPS"]))
    out, start = crop_or_pad(vol, vol.shape)
    np.testing.assert_array_equal(start, 0)
    np.testing.assert_array_equal(out.array, vol.array)
    np.testing.assert_array_equal(out.affine, vol.affine)


def test_crop_grid_and_start_helpers():
    aff = make_affine(DIRECTIONS["oblique_LAI"])
    np.testing.assert_allclose(spatial.crop_grid(aff, (2, -1, 3), None)[:3, 3], geo.voxel_to_world(aff, [2, -1, 3]))
    np.testing.assert_array_equal(spatial.center_crop_start((10, 8, 6), (4, 8, 9)), [3, 0, -2])
    np.testing.assert_array_equal(spatial.window_start_around((5.0, 5.0, 5.0), (4, 5, 1)), [4, 3, 5])


# --- foreground -------------------------------------------------------------------------------------

def box_mask(shape=SHAPE, lo=(2, 3, 1), hi=(5, 4, 3)):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
    return m


def test_bbox():
    m = box_mask()
    m[2, 3, 1] = False  # a bbox, not the mask's own extent per axis
    lo, hi = spatial.bbox(m)
    np.testing.assert_array_equal(lo, [2, 3, 1])
    np.testing.assert_array_equal(hi, [5, 4, 3])
    assert spatial.bbox(np.zeros(SHAPE, bool)) is None


def test_crop_foreground_bbox_and_margin():
    vol = labelled(make_affine(DIRECTIONS["LPS"]))
    out, start = crop_foreground(vol, box_mask())
    np.testing.assert_array_equal(start, [2, 3, 1])
    np.testing.assert_array_equal(out.array, vol.array[:, 2:6, 3:5, 1:4])
    assert_same_world(vol, out)
    out, start = crop_foreground(vol, box_mask(), margin=1)
    np.testing.assert_array_equal(start, [1, 2, 0])
    np.testing.assert_array_equal(out.array, vol.array[:, 1:7, 2:6, 0:5])
    # margin per axis, clipped to the volume (no padding)
    out, start = crop_foreground(vol, box_mask(), margin=(3, 0, 4))
    np.testing.assert_array_equal(start, [0, 3, 0])
    np.testing.assert_array_equal(out.array, vol.array[:, 0:9, 3:5, 0:6])
    assert_same_world(vol, out)


def test_crop_foreground_empty_mask_names_source():
    vol = labelled(make_affine(np.eye(3)))
    with pytest.raises(VolfmError, match="labelled.nii.gz.*empty"):
        crop_foreground(vol, np.zeros(SHAPE, bool))


def test_world_bbox_in_another_grid():
    src_aff = make_affine(DIRECTIONS["LPS"], spacing=(1.0, 1.0, 2.0))
    m = box_mask()
    # a grid with RAS axes and half the spacing, sharing the world
    grid, _ = reoriented_grid(src_aff, SHAPE, "RAS")
    grid = grid @ np.diag([0.5, 0.5, 0.5, 1.0])
    centre = spatial.world_bbox_center_in(m, src_aff, grid)
    world_centre = geo.voxel_to_world(src_aff, np.array([3.5, 3.5, 2.0]))
    np.testing.assert_allclose(geo.voxel_to_world(grid, centre), world_centre, atol=1e-9)
    lo, hi = spatial.world_bbox_in(m, src_aff, grid)
    corners = np.array(list(itertools.product(*zip((2, 3, 1), (5, 4, 3)))), float)
    idx = geo.world_to_voxel(grid, geo.voxel_to_world(src_aff, corners))
    np.testing.assert_array_equal(lo, np.round(idx.min(axis=0)))
    np.testing.assert_array_equal(hi, np.round(idx.max(axis=0)))
    assert spatial.world_bbox_in(np.zeros(SHAPE, bool), src_aff, grid) is None
    assert spatial.world_bbox_center_in(np.zeros(SHAPE, bool), src_aff, grid) is None
