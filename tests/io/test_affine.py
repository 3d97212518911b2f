"""Geometry helpers: LPS<->RAS, spacing/direction, obliquity/shear, grids, SimpleITK geometry."""
import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from volfm.io import affine as geo


def rot(axis, deg):
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    m = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
         "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
    return np.array(m, dtype=np.float64)


def affine(mat, origin=(0.0, 0.0, 0.0)):
    a = np.eye(4)
    a[:3, :3] = mat
    a[:3, 3] = origin
    return a


OBLIQUE = affine(rot("z", 30) @ rot("x", -20) @ np.diag([0.7, 0.9, 3.0]), (-12.0, 40.0, 5.5))
PERMUTED = affine(np.array([[0.0, 0.0, -2.0], [1.5, 0.0, 0.0], [0.0, 1.0, 0.0]]), (3.0, 4.0, 5.0))
SHEARED = affine(np.array([[1.0, 0.25, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]), (1.0, 1.0, 1.0))


def test_lps_to_ras_is_involution_and_flips_xy():
    a = np.random.default_rng(0).normal(size=(4, 4))
    a[3] = [0, 0, 0, 1]
    np.testing.assert_array_equal(geo.lps_to_ras(geo.lps_to_ras(a)), a)
    np.testing.assert_array_equal(geo.ras_to_lps(geo.lps_to_ras(a)), a)
    b = geo.lps_to_ras(a)
    np.testing.assert_array_equal(b[:2], -a[:2])
    np.testing.assert_array_equal(b[2:], a[2:])
    # a world point moves accordingly
    p = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(geo.voxel_to_world(b, p), geo.voxel_to_world(a, p) * [-1, -1, 1])


def test_spacing_and_direction():
    np.testing.assert_allclose(geo.spacing_from_affine(OBLIQUE), [0.7, 0.9, 3.0])
    d = geo.direction_from_affine(OBLIQUE)
    np.testing.assert_allclose(d, rot("z", 30) @ rot("x", -20), atol=1e-12)
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(geo.spacing_from_affine(PERMUTED), [1.5, 1.0, 2.0])
    np.testing.assert_allclose(geo.spacing_from_affine(np.diag([-2.0, 3.0, -4.0, 1.0])), [2.0, 3.0, 4.0])


def test_is_oblique_and_is_sheared():
    assert not geo.is_oblique(np.diag([1.0, 2.0, 3.0, 1.0]))
    assert not geo.is_oblique(np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert not geo.is_oblique(PERMUTED)
    assert geo.is_oblique(OBLIQUE)
    assert geo.is_oblique(affine(rot("y", 1.0)))  # 1 degree: sin = 0.017 > 1e-3
    assert not geo.is_oblique(affine(rot("y", 0.01)))  # below the tolerance
    for a in (np.eye(4), OBLIQUE, PERMUTED, geo.lps_to_ras(OBLIQUE)):
        assert not geo.is_sheared(a)
        assert geo.shear_of(a) < 1e-12
    assert geo.is_sheared(SHEARED)
    # |cos| between columns 0 and 1 of SHEARED
    assert geo.shear_of(SHEARED) == pytest.approx(0.25 / np.hypot(1.0, 0.25))


def test_axcodes():
    assert geo.axcodes(np.eye(4)) == "RAS"
    assert geo.axcodes(np.diag([-1.0, -1.0, 1.0, 1.0])) == "LPS"
    assert geo.axcodes(PERMUTED) == "ASL"


def test_voxel_world_inverse():
    ijk = np.random.default_rng(1).uniform(-5, 50, size=(20, 3))
    xyz = geo.voxel_to_world(OBLIQUE, ijk)
    np.testing.assert_allclose(xyz, (OBLIQUE[:3, :3] @ ijk.T).T + OBLIQUE[:3, 3])
    np.testing.assert_allclose(geo.world_to_voxel(OBLIQUE, xyz), ijk, atol=1e-9)
    np.testing.assert_allclose(geo.world_to_voxel(SHEARED, geo.voxel_to_world(SHEARED, ijk)), ijk, atol=1e-9)


def corners_world(aff, shape):
    """World positions of the outer corners (voxel edges) of a grid."""
    c = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                  for k in (-0.5, shape[2] - 0.5)])
    return geo.voxel_to_world(aff, c)


@pytest.mark.parametrize("aff", [OBLIQUE, PERMUTED, np.diag([-0.8, -0.8, 2.5, 1.0])], ids=["oblique", "permuted", "lps"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 0.6, 2.0)])
def test_grid_with_spacing_keeps_centre_extent_and_directions(aff, spacing):
    shape = (64, 50, 21)
    new, new_shape = geo.grid_with_spacing(aff, shape, spacing)
    np.testing.assert_allclose(geo.fov_center(new, new_shape), geo.fov_center(aff, shape), atol=1e-9)
    np.testing.assert_allclose(geo.spacing_from_affine(new), spacing, atol=1e-12)
    np.testing.assert_allclose(geo.direction_from_affine(new), geo.direction_from_affine(aff), atol=1e-12)
    old_extent = np.array(shape) * geo.spacing_from_affine(aff)
    new_extent = np.array(new_shape) * np.array(spacing)
    assert np.all(np.abs(new_extent - old_extent) <= np.array(spacing) / 2 + 1e-9)
    np.testing.assert_array_equal(new_shape, np.round(old_extent / np.array(spacing)).astype(int))


def test_grid_with_spacing_same_spacing_is_identity():
    shape = (10, 11, 12)
    new, new_shape = geo.grid_with_spacing(OBLIQUE, shape, geo.spacing_from_affine(OBLIQUE))
    assert new_shape == shape
    np.testing.assert_allclose(new, OBLIQUE, atol=1e-9)


@pytest.mark.parametrize("aff", [OBLIQUE, SHEARED, affine(rot("z", 45) @ np.diag([1.0, 1.0, 1.0]))],
                         ids=["oblique", "sheared", "z45"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.3, 0.7)])
def test_axis_aligned_grid_encloses_corners(aff, spacing):
    shape = (17, 23, 9)
    new, new_shape = geo.axis_aligned_grid(aff, shape, spacing)
    assert not geo.is_oblique(new) and not geo.is_sheared(new)
    np.testing.assert_allclose(new[:3, :3], np.diag(spacing))
    np.testing.assert_allclose(geo.fov_center(new, new_shape), geo.fov_center(aff, shape), atol=1e-9)
    # every outer corner of the source grid lies inside the new grid's outer box (in continuous voxels)
    ijk = geo.world_to_voxel(new, corners_world(aff, shape))
    assert np.all(ijk >= -0.5 - 1e-9)
    assert np.all(ijk <= np.array(new_shape) - 0.5 + 1e-9)
    # and not wastefully: less than one extra voxel per axis
    world = corners_world(aff, shape)
    extent = world.max(0) - world.min(0)
    assert np.all(np.array(new_shape) * np.array(spacing) < extent + np.array(spacing) + 1e-9)


def test_axis_aligned_grid_of_aligned_grid_is_itself():
    aff = affine(np.diag([1.0, 2.0, 3.0]), (5.0, 6.0, 7.0))
    new, new_shape = geo.axis_aligned_grid(aff, (10, 20, 30), (1.0, 2.0, 3.0))
    assert new_shape == (10, 20, 30)
    np.testing.assert_allclose(new, aff, atol=1e-9)


@pytest.mark.parametrize("aff", [OBLIQUE, PERMUTED, geo.lps_to_ras(OBLIQUE), np.diag([-1.0, 2.0, -3.0, 1.0])],
                         ids=["oblique", "permuted", "oblique_lps", "flipped"])
def test_sitk_geometry_round_trip(aff):
    origin, spacing, direction = geo.sitk_geometry(aff)
    img = sitk.Image(4, 5, 6, sitk.sitkFloat32)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    np.testing.assert_allclose(geo.affine_from_sitk(img), aff, atol=1e-9)
    # LPS origin is the RAS origin with x, y negated
    np.testing.assert_allclose(origin, aff[:3, 3] * [-1, -1, 1])
    for ijk in itertools.product((0, 3), (0, 4), (0, 5)):
        p = np.array(img.TransformIndexToPhysicalPoint(ijk)) * [-1, -1, 1]
        np.testing.assert_allclose(geo.voxel_to_world(aff, np.array(ijk)), p, atol=1e-9)


def test_affine_from_real_sitk_image():
    img = sitk.Image(3, 4, 5, sitk.sitkInt16)
    d = rot("x", 15) @ rot("z", -40)
    img.SetDirection(tuple(d.ravel()))
    img.SetSpacing((0.5, 0.75, 2.0))
    img.SetOrigin((10.0, -20.0, 30.0))
    aff = geo.affine_from_sitk(img)
    expect = np.eye(4)
    expect[:3, :3] = d @ np.diag([0.5, 0.75, 2.0])
    expect[:3, 3] = (10.0, -20.0, 30.0)
    np.testing.assert_allclose(aff, np.diag([-1.0, -1.0, 1.0, 1.0]) @ expect, atol=1e-12)
    origin, spacing, direction = geo.sitk_geometry(aff)
    np.testing.assert_allclose(origin, img.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(spacing, img.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(direction, img.GetDirection(), atol=1e-12)


def test_sitk_geometry_refuses_shear():
    with pytest.raises(ValueError, match="sheared"):
        geo.sitk_geometry(SHEARED)
