"""volfm.preprocess.resample: physical-space resampling checked against SimpleITK and scipy references.

Conventions under test: arrays are (C, I, J, K), affines map voxel centres to RAS mm, target grids
keep the field-of-view centre, and the boundary rule is ITK's (a point within half a voxel of the
edge voxels is interpolated with clamped/mirrored neighbours; further out it gets ``fill``).
"""
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from volfm.io import Volume, read_volume, write_nifti
from volfm.io import affine as geo
from volfm.preprocess import resample as rs
from volfm.preprocess.resample import index_map, resample_axis_aligned, resample_to_grid, resample_to_spacing
from volfm.preprocess.spatial import crop_grid
from volfm.testing import centred_affine, index_grid
from volfm.testing import rotation as rot

FILL = -7.0
SHAPE = (40, 36, 12)
ANISO = (0.7, 0.7, 5.0)


# --- fixtures --------------------------------------------------------------------------------------

def smooth(xyz):
    """A smooth world-space field with values around 100."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    return 100 + 20 * np.sin(x / 9.0) + 15 * np.cos(y / 7.0) + 10 * np.sin(z / 13.0 + 0.3) + 0.01 * x * y


def grid_affine(directions, spacing, shape, centre=(3.0, -5.0, 10.0)):
    return centred_affine(directions, spacing, shape, centre)


def sample_volume(affine, shape, fn=smooth):
    arr = fn(geo.voxel_to_world(affine, index_grid(shape))).astype(np.float32)
    return Volume(arr[None], affine)


SOURCES = {
    # name: (unit direction columns in RAS, spacing, shape)
    "aniso_ras": (np.eye(3), ANISO, SHAPE),
    "lps_on_disk": (np.diag([-1.0, -1.0, 1.0]), ANISO, SHAPE),
    "permuted": (np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), (0.8, 5.0, 0.9), (36, 12, 40)),
    "oblique": (rot(2, 8.0) @ rot(0, -7.0), ANISO, SHAPE),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> (path, Volume read back from disk). Reading back means volfm and SimpleITK see the same file."""
    d = tmp_path_factory.mktemp("resample_src")
    out = {}
    for name, (dirs, sp, shape) in SOURCES.items():
        path = d / f"{name}.nii.gz"
        write_nifti(sample_volume(grid_affine(dirs, sp, shape), shape), path)
        out[name] = (str(path), read_volume(path))
    return out


def sitk_resample(path, affine, shape, interpolator, fill=FILL):
    image = sitk.ReadImage(path)
    origin, spacing, direction = geo.sitk_geometry(affine)
    f = sitk.ResampleImageFilter()
    f.SetOutputOrigin(origin)
    f.SetOutputSpacing(spacing)
    f.SetOutputDirection(direction)
    f.SetSize([int(s) for s in shape])
    f.SetInterpolator(interpolator)
    f.SetDefaultPixelValue(fill)
    f.SetOutputPixelType(sitk.sitkFloat32)
    return sitk.GetArrayFromImage(f.Execute(image)).transpose(2, 1, 0)  # (K, J, I) -> (I, J, K)


def source_coords(src_affine, tgt_affine, shape):
    m = index_map(src_affine, tgt_affine)
    return index_grid(shape) @ m[:3, :3].T + m[:3, 3]


def ambiguous(coords, src_shape, ties=False, tol=1e-4):
    """Target voxels whose source index sits (within float noise of the two libraries' geometry
    arithmetic) on the half-voxel boundary of the source, or for nearest on any .5 tie: there the
    two implementations may legitimately round differently."""
    n = np.asarray(src_shape, float)
    near_edge = (np.abs(coords + 0.5) < tol) | (np.abs(coords - (n - 0.5)) < tol)
    if ties:
        frac = coords - np.floor(coords)
        near_edge |= np.abs(frac - 0.5) < tol
    return near_edge.any(axis=-1)


def target_grid(kind, vol, spacing=(1.13, 0.97, 1.9)):
    """Target grids that reach past the source (to exercise fill) and sit off the symmetric centre
    (to keep nearest-neighbour ties and exact boundary hits away)."""
    if kind == "same_directions":
        aff, shape = geo.grid_with_spacing(vol.affine, vol.shape, spacing)
    else:
        aff, shape = geo.axis_aligned_grid(vol.affine, vol.shape, spacing)
    aff = crop_grid(aff, (-2, -3, -2), None)
    shape = tuple(s + 5 for s in shape)
    aff[:3, 3] += (0.123, -0.217, 0.311)
    return aff, shape


# --- agreement with SimpleITK ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("grid", ["same_directions", "axis_aligned"])
@pytest.mark.parametrize("order,interp", [("linear", sitk.sitkLinear), ("bspline", sitk.sitkBSpline)],
                         ids=["linear", "bspline"])
def test_matches_simpleitk(sources, name, grid, order, interp):
    path, vol = sources[name]
    aff, shape = target_grid(grid, vol)
    ours = resample_to_grid(vol, aff, shape, order=order, fill=FILL)
    ref = sitk_resample(path, aff, shape, interp)
    assert ours.array.shape == (1, *shape)
    np.testing.assert_array_equal(ours.affine, aff)
    keep = ~ambiguous(source_coords(vol.affine, aff, shape), vol.shape)
    assert keep.mean() > 0.99
    diff = np.abs(ours.array[0] - ref)[keep]
    assert diff.max() < 1e-3, f"max |volfm - SimpleITK| = {diff.max()}"
    # the grid reaches outside the source: both fill the same voxels, and interpolate the rest
    outside = ref[keep] == FILL
    assert 0 < outside.sum() < outside.size
    np.testing.assert_array_equal(ours.array[0][keep] == FILL, outside)


def test_oblique_axis_aligned_uses_general_path(sources):
    """The oblique source onto a world-aligned grid is not a scaled permutation: the non-separable path."""
    _, vol = sources["oblique"]
    aff, _ = target_grid("axis_aligned", vol)
    assert rs._as_permutation(index_map(vol.affine, aff)[:3, :3]) is None
    _, vol = sources["lps_on_disk"]
    aff, _ = target_grid("axis_aligned", vol)
    assert rs._as_permutation(index_map(vol.affine, aff)[:3, :3]) is not None


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("grid", ["same_directions", "axis_aligned"])
def test_nearest_matches_simpleitk_away_from_ties(sources, name, grid):
    """Nearest neighbour on a float image equals sitkNearestNeighbor exactly. Voxels whose source
    index is within 1e-4 of a .5 tie are excluded: there the choice depends on float noise in each
    library's geometry (ITK goes through LPS physical points, volfm through one index map), and
    torch's grid_sample rounds half to even where ITK rounds half up. The shifted grids leave few or none."""
    path, vol = sources[name]
    aff, shape = target_grid(grid, vol)
    ours = resample_to_grid(vol, aff, shape, order="nearest", fill=FILL).array[0]
    ref = sitk_resample(path, aff, shape, sitk.sitkNearestNeighbor)
    keep = ~ambiguous(source_coords(vol.affine, aff, shape), vol.shape, ties=True)
    assert keep.mean() > 0.99
    np.testing.assert_array_equal(ours[keep], ref[keep])


def test_resample_to_spacing_matches_simpleitk(sources):
    path, vol = sources["lps_on_disk"]
    out = resample_to_spacing(vol, (1.13, 0.97, 1.9), order="linear", fill=FILL)
    ref = sitk_resample(path, out.affine, out.shape, sitk.sitkLinear)
    assert np.abs(out.array[0] - ref).max() < 1e-3


def test_resample_axis_aligned_matches_simpleitk(sources):
    path, vol = sources["oblique"]
    out = resample_axis_aligned(vol, (1.1, 1.1, 1.6), order="bspline", fill=FILL)
    assert not geo.is_oblique(out.affine) and geo.axcodes(out.affine) == "RAS"
    ref = sitk_resample(path, out.affine, out.shape, sitk.sitkBSpline)
    keep = ~ambiguous(source_coords(vol.affine, out.affine, out.shape), vol.shape)
    assert np.abs(out.array[0] - ref)[keep].max() < 1e-3


def test_values_match_the_world_function(sources):
    """Independent of any library: trilinear samples of a smooth field are close to the field itself
    wherever the target point lies inside the source."""
    _, vol = sources["oblique"]
    aff, shape = geo.axis_aligned_grid(vol.affine, vol.shape, (1.0, 1.0, 1.0))
    out = resample_to_grid(vol, aff, shape, fill=np.nan).array[0]
    truth = smooth(geo.voxel_to_world(aff, index_grid(shape)))
    c = source_coords(vol.affine, aff, shape)
    interior = np.all((c >= 0) & (c <= np.asarray(vol.shape) - 1), axis=-1)  # no edge clamping
    assert interior.mean() > 0.3 and np.isfinite(out[interior]).all()
    # trilinear error ~ h^2 |f''| / 8: about 0.2 across the 5 mm slices of this field
    assert np.abs(out[interior] - truth[interior]).max() < 0.5
    edge = np.isfinite(out) & ~interior
    assert edge.any() and np.isnan(out[~np.isfinite(out)]).all()


# --- geometry: identity, FOV centre ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(SOURCES))
def test_same_grid_is_identity(sources, name):
    _, vol = sources[name]
    for order in ("linear", "nearest"):
        out = resample_to_grid(vol, vol.affine, vol.shape, order=order, fill=FILL)
        np.testing.assert_array_equal(out.array, vol.array)
        np.testing.assert_array_equal(out.affine, vol.affine)
    out = resample_to_grid(vol, vol.affine, vol.shape, order="bspline", fill=FILL)
    np.testing.assert_allclose(out.array, vol.array, atol=1e-3)  # spline filter + evaluation at the nodes


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("spacing", [(1.5, 1.5, 3.0), (0.5, 2.0, 7.0)])
def test_fov_centre_preserved(sources, name, spacing):
    _, vol = sources[name]
    out = resample_to_spacing(vol, spacing)
    np.testing.assert_allclose(geo.fov_center(out.affine, out.shape), geo.fov_center(vol.affine, vol.shape),
                               atol=1e-9)
    np.testing.assert_allclose(geo.spacing_from_affine(out.affine), spacing, rtol=1e-12)
    np.testing.assert_allclose(geo.direction_from_affine(out.affine), geo.direction_from_affine(vol.affine),
                               atol=1e-12)
    # the extent is the old physical extent rounded to whole voxels
    extent = np.asarray(vol.shape) * vol.spacing
    assert np.all(np.abs(np.asarray(out.shape) * np.asarray(spacing) - extent) <= np.asarray(spacing) / 2 + 1e-9)
    aff, shape = geo.axis_aligned_grid(vol.affine, vol.shape, spacing)
    np.testing.assert_allclose(geo.fov_center(aff, shape), geo.fov_center(vol.affine, vol.shape), atol=1e-9)


def test_meta_is_copied_not_shared(sources):
    _, vol = sources["aniso_ras"]
    out = resample_to_spacing(vol, (2.0, 2.0, 2.0))
    out.meta["x"] = 1
    assert "x" not in vol.meta and out.meta["path"] == vol.meta["path"]


def test_rejects_unknown_order(sources):
    _, vol = sources["aniso_ras"]
    with pytest.raises(ValueError, match="order"):
        resample_to_grid(vol, vol.affine, vol.shape, order="cubic")


def test_multichannel_resamples_each_channel(sources):
    _, vol = sources["oblique"]
    two = vol.replace(array=np.concatenate([vol.array, 2 * vol.array + 1]))
    for kind in ("same_directions", "axis_aligned"):
        aff, shape = target_grid(kind, vol)
        a = resample_to_grid(vol, aff, shape, fill=FILL).array[0]
        b = resample_to_grid(two, aff, shape, fill=FILL).array
        np.testing.assert_array_equal(b[0], a)
        np.testing.assert_allclose(b[1][a != FILL], 2 * a[a != FILL] + 1, rtol=1e-5)


# --- labels ---------------------------------------------------------------------------------------

def two_spheres(shape=SHAPE, spacing=(1.0, 1.0, 1.0)):
    aff = grid_affine(np.eye(3), spacing, shape)
    w = geo.voxel_to_world(aff, index_grid(shape))
    c = geo.fov_center(aff, shape)
    lab = np.zeros(shape, np.int16)
    lab[np.linalg.norm(w - (c + [-8.0, 0, 0]), axis=-1) < 6.5] = 1
    lab[np.linalg.norm(w - (c + [8.5, 2.0, 0]), axis=-1) < 5.2] = 3
    return Volume(lab[None], aff, {"path": "two_spheres"})


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64])
def test_label_nearest_keeps_dtype_and_values(dtype):
    lab = two_spheres()
    lab = lab.replace(array=lab.array.astype(dtype))
    aff = crop_grid(lab.affine @ _rot4(2, 9.0, lab), (-2, -2, -2), None)
    for target in [geo.grid_with_spacing(lab.affine, lab.shape, (1.7, 0.6, 2.3)), (aff, (44, 40, 16))]:
        out = resample_to_grid(lab, *target, order="nearest")
        assert out.array.dtype == dtype
        assert set(np.unique(out.array)) <= {0, 1, 3}
        assert {1, 3} <= set(np.unique(out.array))


def _rot4(axis, deg, vol):
    """Rotation about the FOV centre, as a right-multiplied index-space matrix."""
    c = (np.asarray(vol.shape) - 1) / 2
    t = np.eye(4)
    t[:3, :3] = rot(axis, deg)
    t[:3, 3] = c - rot(axis, deg) @ c
    return t


def test_label_nearest_matches_simpleitk(tmp_path):
    lab = two_spheres()
    path = tmp_path / "lab.nii.gz"
    write_nifti(lab, path)
    lab = read_volume(path, dtype=None)
    aff, shape = geo.grid_with_spacing(lab.affine, lab.shape, (1.7, 0.6, 2.3))
    aff[:3, 3] += (0.11, 0.07, -0.13)
    ours = resample_to_grid(lab, aff, shape, order="nearest").array[0]
    image = sitk.ReadImage(str(path))
    origin, spacing, direction = geo.sitk_geometry(aff)
    ref = sitk.Resample(image, [int(s) for s in shape], sitk.Transform(), sitk.sitkNearestNeighbor, origin, spacing,
                        direction, 0, image.GetPixelID())
    ref = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)
    keep = ~ambiguous(source_coords(lab.affine, aff, shape), lab.shape, ties=True)
    assert keep.mean() > 0.99
    np.testing.assert_array_equal(ours[keep], ref[keep])


def onehot_reference(lab: Volume, affine, shape):
    """Per-class trilinear interpolation of indicator maps (scipy, edge-clamped, fill 0 outside the
    half-voxel border), background included as a class, then argmax (ties -> lowest class id)."""
    coords = source_coords(lab.affine, affine, shape)
    n = np.asarray(lab.shape, float)
    inside = np.all((coords >= -0.5) & (coords <= n - 0.5), axis=-1)
    pts = np.clip(coords, 0, n - 1).reshape(-1, 3).T
    classes = np.unique(lab.array[0])
    assert classes[0] == 0
    probs = np.stack([ndimage.map_coordinates((lab.array[0] == c).astype(np.float64), pts, order=1, mode="nearest")
                      .reshape(shape) for c in classes])
    out = classes[np.argmax(probs, axis=0)]
    out[~inside] = 0
    return out


@pytest.mark.parametrize("oblique", [False, True])
def test_onehot_linear_matches_dense_reference(oblique):
    lab = two_spheres()
    if oblique:
        aff, shape = geo.axis_aligned_grid(lab.affine @ _rot4(2, 10.0, lab), lab.shape, (2.0, 2.0, 2.0))
        lab = lab.replace(affine=lab.affine @ _rot4(2, 10.0, lab))
    else:
        aff, shape = geo.grid_with_spacing(lab.affine, lab.shape, (2.0, 2.0, 2.0))  # 2x downsample
    out = resample_to_grid(lab, aff, shape, order="onehot_linear")
    assert out.array.dtype == np.int16
    ref = onehot_reference(lab, aff, shape)
    np.testing.assert_array_equal(out.array[0], ref)
    assert set(np.unique(out.array)) == {0, 1, 3}
    # not simply nearest: the smooth partition differs from nearest somewhere on the boundary
    near = resample_to_grid(lab, aff, shape, order="nearest").array[0]
    assert (near != out.array[0]).any()


def test_onehot_linear_float_labels_become_int():
    lab = two_spheres()
    lab = lab.replace(array=lab.array.astype(np.float32))
    aff, shape = geo.grid_with_spacing(lab.affine, lab.shape, (2.0, 2.0, 2.0))
    out = resample_to_grid(lab, aff, shape, order="onehot_linear")
    assert np.issubdtype(out.array.dtype, np.integer)
    np.testing.assert_array_equal(out.array[0], onehot_reference(lab, aff, shape))


# --- anti-aliasing --------------------------------------------------------------------------------

def test_antialias_sigmas_rule():
    assert rs.antialias_sigmas([1.0, 0.5, 3.0, -2.0]) == [0.0, 0.0, 1.0, 0.5]


@pytest.mark.parametrize("name", ["aniso_ras", "lps_on_disk", "permuted"])
def test_antialias_equals_blur_then_linear(sources, name):
    """antialias=True is a Gaussian (sigma = (step - 1) / 2 source voxels along downsampled axes,
    mirror boundary) followed by plain linear resampling. volfm truncates the kernel at radius
    ceil(3 sigma); scipy's default is int(4 sigma + 0.5). With the same radius the two agree to float
    precision; with scipy's default radius they differ only by the Gaussian tail beyond 3 sigma
    (~0.3% of the weight, times the local variation of the image)."""
    _, vol = sources[name]
    spacing = (2.3, 1.9, 2.6)
    out = resample_to_spacing(vol, spacing, antialias=True, fill=FILL)
    m = index_map(vol.affine, out.affine)
    steps = np.abs(m[:3, :3]).max(axis=1)  # source-voxel step per source axis (scaled permutation)
    sigma = np.maximum(0.0, (steps - 1) / 2)
    assert (sigma > 0).sum() == 2 and (sigma == 0).sum() == 1
    same_radius = [int(np.ceil(3 * s)) if s > 0 else 0 for s in sigma]
    for radius, tol in ((same_radius, 1e-4), (None, 2e-3)):
        blurred = ndimage.gaussian_filter(vol.array[0].astype(np.float64), sigma, mode="mirror", radius=radius)
        ref = resample_to_grid(vol.replace(array=blurred[None].astype(np.float32)), out.affine, out.shape, fill=FILL)
        assert np.abs(out.array - ref.array).max() < tol
    plain = resample_to_spacing(vol, spacing, fill=FILL)
    assert np.abs(out.array - plain.array).max() > 0.05  # the filter did something


def test_antialias_only_along_downsampled_axes(sources):
    _, vol = sources["aniso_ras"]
    spacing = (0.5, 0.5, 2.0)  # every axis upsampled: antialias must be a no-op
    np.testing.assert_array_equal(resample_to_spacing(vol, spacing, antialias=True).array,
                                  resample_to_spacing(vol, spacing).array)


def checkerboard(affine=np.diag([0.7, 0.7, 5.0, 1.0])):
    i, j, _ = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    return Volume(((-1.0) ** (i + j)).astype(np.float32)[None], affine)


def test_antialias_reduces_aliasing_of_checkerboard():
    """A +-1 checkerboard at the source Nyquist frequency has no content a 2.5x coarser grid can
    represent: the ideal result is flat 0. Plain linear sampling aliases it into a moire pattern."""
    vol = checkerboard()
    plain = resample_to_spacing(vol, (1.75, 1.75, 5.0)).array
    smooth_ = resample_to_spacing(vol, (1.75, 1.75, 5.0), antialias=True).array
    assert np.abs(plain).max() > 0.2
    assert np.abs(smooth_).max() < 0.02
    assert smooth_.std() < 0.1 * plain.std()


def test_antialias_applies_on_the_oblique_path():
    """The world-space (non-separable) path must honour antialias too (ct_seg uses oblique: resample
    with antialias: true)."""
    vol = checkerboard(grid_affine(rot(2, 8.0), (0.7, 0.7, 5.0), SHAPE))
    aff, shape = geo.axis_aligned_grid(vol.affine, vol.shape, (1.75, 1.75, 5.0))
    assert rs._as_permutation(index_map(vol.affine, aff)[:3, :3]) is None
    plain = resample_to_grid(vol, aff, shape, fill=0.0).array
    smooth_ = resample_to_grid(vol, aff, shape, fill=0.0, antialias=True).array
    assert np.abs(plain).max() > 0.2
    assert np.abs(smooth_).max() < 0.05


def test_antialias_on_the_oblique_path_equals_blur_then_linear(sources):
    """Non-separable path: the source is blurred along each source axis with sigma from that axis'
    source-voxel step per target voxel (norm of the index map's row), then resampled plainly."""
    _, vol = sources["oblique"]
    aff, shape = geo.axis_aligned_grid(vol.affine, vol.shape, (2.1, 1.8, 2.0))
    m = index_map(vol.affine, aff)
    assert rs._as_permutation(m[:3, :3]) is None
    sigma = np.maximum(0.0, (np.linalg.norm(m[:3, :3], axis=1) - 1) / 2)
    assert sigma[0] > 0.5 and sigma[1] > 0.5 and sigma[2] == 0
    radius = [int(np.ceil(3 * s)) if s > 0 else 0 for s in sigma]
    blurred = ndimage.gaussian_filter(vol.array[0].astype(np.float64), sigma, mode="mirror", radius=radius)
    ref = resample_to_grid(vol.replace(array=blurred[None].astype(np.float32)), aff, shape, fill=FILL)
    out = resample_to_grid(vol, aff, shape, fill=FILL, antialias=True)
    assert np.abs(out.array - ref.array).max() < 1e-4
    assert np.abs(out.array - resample_to_grid(vol, aff, shape, fill=FILL).array).max() > 0.05


@pytest.mark.parametrize("oblique", [False, True])
def test_label_nearest_keeps_large_ids_and_bool(oblique):
    """Class ids above 2**24 (not exact in float32) and boolean masks survive nearest resampling."""
    lab = two_spheres()
    aff, shape = geo.grid_with_spacing(lab.affine, lab.shape, (1.3, 1.3, 1.3))
    if oblique:
        aff = aff @ _rot4(2, 10.0, Volume(np.zeros((1, *shape)), aff))
    big = lab.replace(array=lab.array.astype(np.int64) * (2 ** 24 + 1))
    out = resample_to_grid(big, aff, shape, order="nearest")
    assert out.array.dtype == np.int64
    assert set(np.unique(out.array)) == {0, 2 ** 24 + 1, 3 * (2 ** 24 + 1)}
    ref = resample_to_grid(lab, aff, shape, order="nearest").array
    np.testing.assert_array_equal(out.array, ref.astype(np.int64) * (2 ** 24 + 1))
    mask = lab.replace(array=lab.array > 0)
    out = resample_to_grid(mask, aff, shape, order="nearest")
    assert out.array.dtype == bool
    np.testing.assert_array_equal(out.array, ref > 0)
