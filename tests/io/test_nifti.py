"""NIfTI reading/writing: round trips, world coordinates vs SimpleITK, qfac, endianness, scaling, 4D,
sform/qform rules and sheared affines. All fixtures are made in code under tmp_path."""
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from volfm.io import GeometryWarning, Volume, read_volume, write_nifti
from volfm.io.readers import describe_nifti_header


def rotation(ax, ay, az):
    """Rotation matrix from Euler angles in degrees (x then y then z), built by hand."""
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(mat, origin):
    a = np.eye(4)
    a[:3, :3] = mat
    a[:3, 3] = origin
    return a


AFFINES = {
    "ras": make_affine(np.diag([0.9, 1.2, 2.5]), [-30.0, 12.5, 40.0]),
    "lps": make_affine(np.diag([-0.8, -0.8, 3.0]), [100.0, 90.0, -50.0]),
    "flipped": make_affine(np.diag([1.0, -1.5, -2.0]), [5.0, 60.0, 33.0]),
    # array axes permuted: i -> S, j -> R, k -> P
    "permuted": make_affine(np.array([[0.0, 1.5, 0.0], [0.0, 0.0, -1.0], [2.0, 0.0, 0.0]]), [-20.0, 10.0, -5.0]),
    "oblique": make_affine(rotation(20, -15, 30) @ np.diag([0.8, 1.1, 2.5]), [-40.0, 12.0, 7.0]),
    "oblique_lefthanded": make_affine(rotation(-10, 25, 5) @ np.diag([1.0, 1.0, -2.0]), [3.0, -7.0, 11.0]),
}
SHAPE = (7, 6, 5)


def random_array(shape=SHAPE, dtype=np.int16, seed=0):
    return np.random.default_rng(seed).integers(-1000, 1000, shape).astype(dtype)


def sample_indices(shape, n_random=6, seed=1):
    corners = [(i, j, k) for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    rng = np.random.default_rng(seed)
    rand = [tuple(int(rng.integers(0, s)) for s in shape) for _ in range(n_random)]
    return corners + rand


def sitk_world_ras(image, ijk):
    """SimpleITK's physical point of an index, converted LPS -> RAS by negating x and y."""
    p = np.array(image.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk)), dtype=np.float64)
    p[:2] *= -1.0
    return p


def assert_world_matches_sitk(vol, path, atol=1e-3):
    image = sitk.ReadImage(str(path))
    assert tuple(image.GetSize()[:3]) == vol.shape
    for ijk in sample_indices(vol.shape):
        np.testing.assert_allclose(vol.world_of(np.array(ijk)), sitk_world_ras(image, ijk), atol=atol,
                                   err_msg=f"voxel {ijk} of {path}")


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_round_trip_and_world_points(tmp_path, name):
    aff = AFFINES[name]
    arr = random_array()
    path = tmp_path / f"{name}.nii.gz"
    write_nifti(Volume(arr[None], aff), path)

    vol = read_volume(path, dtype=None)
    assert vol.array.shape == (1, *SHAPE)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array[0], arr)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    assert vol.meta["affine_source"] == "sform"
    assert vol.meta["format"] == "nifti1"

    hdr = nib.load(str(path)).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    # the qform (quaternion + qfac) encodes the same affine as the sform
    np.testing.assert_allclose(hdr.get_qform(), aff, atol=1e-4)
    np.testing.assert_allclose(hdr.get_sform(), aff, atol=1e-5)

    assert_world_matches_sitk(vol, path)
    # default read gives float32 with the same values
    vol32 = read_volume(path)
    assert vol32.array.dtype == np.float32
    np.testing.assert_array_equal(vol32.array[0], arr.astype(np.float32))


def test_orientation_codes_of_fixtures(tmp_path):
    expected = {"ras": "RAS", "lps": "LPS", "flipped": "RPI", "permuted": "SRP"}
    for name, code in expected.items():
        path = tmp_path / f"{name}.nii"
        write_nifti(Volume(random_array()[None], AFFINES[name]), path)
        vol = read_volume(path)
        assert vol.orientation == code
        assert not vol.is_oblique and not vol.is_sheared
    write_nifti(Volume(random_array()[None], AFFINES["oblique"]), tmp_path / "ob.nii")
    assert read_volume(tmp_path / "ob.nii").is_oblique


def test_float64_and_multichannel_round_trip(tmp_path):
    arr = np.random.default_rng(3).normal(size=(2, *SHAPE))
    path = tmp_path / "two.nii.gz"
    write_nifti(Volume(arr, AFFINES["oblique"]), path)
    assert nib.load(str(path)).shape == (*SHAPE, 2)
    vol = read_volume(path, dtype=None)
    assert vol.array.dtype == np.float64
    np.testing.assert_array_equal(vol.array, arr)


@pytest.mark.parametrize("dtype,expect", [(np.int64, np.int32), (np.bool_, np.uint8), (np.float16, np.float32),
                                          (np.uint8, np.uint8)])
def test_write_dtypes_nibabel_refuses(tmp_path, dtype, expect):
    arr = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 5).astype(dtype)
    path = tmp_path / "lab.nii.gz"
    write_nifti(Volume(arr[None], AFFINES["ras"]), path)
    vol = read_volume(path, dtype=None)
    assert vol.array.dtype == expect
    np.testing.assert_array_equal(vol.array[0], arr.astype(expect))


def test_write_dtype_argument(tmp_path):
    arr = np.random.default_rng(4).normal(size=SHAPE) * 100
    path = tmp_path / "i16.nii"
    write_nifti(Volume(arr[None], AFFINES["lps"]), path, dtype=np.int16)
    assert nib.load(str(path)).get_data_dtype() == np.int16
    np.testing.assert_array_equal(read_volume(path, dtype=None).array[0], arr.astype(np.int16))


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "x.nii.gz"
    write_nifti(Volume(random_array()[None], AFFINES["ras"]), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.nii.gz"]


def test_nifti2(tmp_path):
    arr = random_array(seed=5)
    aff = AFFINES["oblique"]
    path = tmp_path / "n2.nii"
    nib.save(nib.Nifti2Image(arr, aff), str(path))
    assert nib.load(str(path)).header.sizeof_hdr == 540
    vol = read_volume(path, dtype=None)
    assert vol.meta["format"] == "nifti2"
    np.testing.assert_array_equal(vol.array[0], arr)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    # SimpleITK (ITK's NIfTI IO) cannot read NIfTI-2: check world points against the affine by hand
    for ijk in sample_indices(SHAPE):
        np.testing.assert_allclose(vol.world_of(np.array(ijk)), aff[:3, :3] @ np.array(ijk) + aff[:3, 3], atol=1e-4)


def test_qfac_minus_one_qform_only(tmp_path):
    arr = random_array(seed=6)
    # left-handed (negative determinant) affine: stored as a quaternion with qfac = pixdim[0] = -1
    aff = make_affine(rotation(12, 0, -20) @ np.diag([1.0, 2.0, -3.0]), [10.0, 20.0, 30.0])
    assert np.linalg.det(aff[:3, :3]) < 0
    img = nib.Nifti1Image(arr, None)
    img.set_qform(aff, code=1)
    img.set_sform(None, code=0)
    path = tmp_path / "qfac.nii.gz"
    nib.save(img, str(path))
    hdr = nib.load(str(path)).header
    assert float(hdr["pixdim"][0]) == -1.0
    assert int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 1
    assert describe_nifti_header(path)["qfac"] == -1.0

    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        vol = read_volume(path, dtype=None)
    assert vol.meta["affine_source"] == "qform"
    np.testing.assert_allclose(vol.affine, aff, atol=1e-4)
    np.testing.assert_array_equal(vol.array[0], arr)
    assert_world_matches_sitk(vol, path)


def _big_endian_image(arr, aff):
    hdr = nib.Nifti1Header(endianness=">")
    hdr.set_data_dtype(arr.dtype)
    return nib.Nifti1Image(arr.astype(arr.dtype.newbyteorder(">")), aff, header=hdr)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_big_endian(tmp_path, suffix):
    arr = random_array(seed=7)
    path = tmp_path / f"be{suffix}"
    nib.save(_big_endian_image(arr, AFFINES["lps"]), str(path))
    assert nib.load(str(path)).header.endianness == ">"
    assert describe_nifti_header(path)["byteorder"] == ">"
    vol = read_volume(path, dtype=None)
    assert vol.array.dtype.isnative and vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array[0], arr)
    np.testing.assert_allclose(vol.affine, AFFINES["lps"], atol=1e-5)
    np.testing.assert_array_equal(read_volume(path).array[0], arr.astype(np.float32))
    # big-endian data passed to nibabel's default (native) header also reads back equal
    path2 = tmp_path / f"be2{suffix}"
    nib.save(nib.Nifti1Image(arr.astype(">i2"), AFFINES["lps"]), str(path2))
    vol2 = read_volume(path2, dtype=None)
    assert vol2.array.dtype.isnative
    np.testing.assert_array_equal(vol2.array[0], arr)


def test_scl_slope_inter(tmp_path):
    raw = random_array(seed=8)
    img = nib.Nifti1Image(raw, AFFINES["ras"])
    img.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    # on disk: scl_slope at byte 112, scl_inter at 116 (nibabel resets them to NaN in a loaded header)
    import gzip
    import struct

    with gzip.open(path, "rb") as f:
        assert struct.unpack("<ff", f.read(348)[112:120]) == (2.0, -1024.0)
    desc = describe_nifti_header(path)
    assert (desc["scl_slope"], desc["scl_inter"]) == (2.0, -1024.0)

    expected = raw.astype(np.float64) * 2.0 - 1024.0
    vol = read_volume(path)
    assert vol.meta["scaled"] is True
    np.testing.assert_array_equal(vol.array[0], expected.astype(np.float32))
    vol_raw_type = read_volume(path, dtype=None)
    np.testing.assert_allclose(vol_raw_type.array[0], expected)
    # SimpleITK applies the same scaling
    sitk_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
    np.testing.assert_allclose(vol.array[0], sitk_arr)
    # unscaled file: meta says so
    nib.save(nib.Nifti1Image(raw, AFFINES["ras"]), str(tmp_path / "plain.nii"))
    assert read_volume(tmp_path / "plain.nii").meta["scaled"] is False


def test_4d_channels_last_become_channels_first(tmp_path):
    arr = np.stack([random_array(seed=s) for s in (10, 11, 12)], axis=-1)  # (I, J, K, 3)
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(arr, AFFINES["oblique"]), str(path))
    vol = read_volume(path, dtype=None)
    assert vol.array.shape == (3, *SHAPE)
    assert vol.num_channels == 3 and vol.shape == SHAPE
    for c in range(3):
        np.testing.assert_array_equal(vol.array[c], arr[..., c])
    np.testing.assert_allclose(vol.affine, AFFINES["oblique"], atol=1e-5)
    # and back out: written (I, J, K, C)
    out = tmp_path / "rgb_out.nii.gz"
    write_nifti(vol, out)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj), arr)


def test_5d_vector_intent_layout(tmp_path):
    arr = random_array(shape=(*SHAPE, 1, 2), seed=13)  # NIfTI vector layout (I, J, K, 1, C)
    path = tmp_path / "vec.nii"
    nib.save(nib.Nifti1Image(arr, AFFINES["ras"]), str(path))
    vol = read_volume(path, dtype=None)
    assert vol.array.shape == (2, *SHAPE)
    np.testing.assert_array_equal(vol.array[1], arr[:, :, :, 0, 1])


def _disagreeing_file(path):
    sform = AFFINES["ras"]
    qform = AFFINES["flipped"]
    img = nib.Nifti1Image(random_array(seed=14), None)
    img.set_sform(sform, code=1)
    img.set_qform(qform, code=1)
    nib.save(img, str(path))
    return sform, qform


def test_sform_qform_disagree_warns_and_sform_wins(tmp_path):
    path = tmp_path / "disagree.nii.gz"
    sform, qform = _disagreeing_file(path)
    with pytest.warns(GeometryWarning) as rec:
        vol = read_volume(path)
    msgs = [str(w.message) for w in rec if issubclass(w.category, GeometryWarning)]
    assert any(str(path) in m and "disagree" in m for m in msgs)
    np.testing.assert_allclose(vol.affine, sform, atol=1e-5)
    assert vol.meta["affine_source"] == "sform"

    with pytest.warns(GeometryWarning, match="disagree"):
        vq = read_volume(path, prefer="qform")
    np.testing.assert_allclose(vq.affine, qform, atol=1e-5)
    assert vq.meta["affine_source"] == "qform"


def test_prefer_is_validated(tmp_path):
    path = tmp_path / "x.nii"
    write_nifti(Volume(random_array()[None], AFFINES["ras"]), path)
    with pytest.raises(ValueError, match="prefer"):
        read_volume(path, prefer="both")


def test_agreeing_sform_qform_no_warning(tmp_path):
    path = tmp_path / "agree.nii.gz"
    write_nifti(Volume(random_array()[None], AFFINES["oblique"]), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        vs = read_volume(path)
        vq = read_volume(path, prefer="qform")
    assert vq.meta["affine_source"] == "qform"
    np.testing.assert_allclose(vs.affine, vq.affine, atol=1e-4)


def test_sform_only_file(tmp_path):
    aff = AFFINES["oblique"]
    img = nib.Nifti1Image(random_array(), None)
    img.set_sform(aff, code=2)
    img.set_qform(None, code=0)
    path = tmp_path / "sonly.nii"
    nib.save(img, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        vol = read_volume(path, prefer="qform")  # no qform to prefer: the sform is used silently
    assert vol.meta["affine_source"] == "sform"
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)


def test_no_sform_no_qform_warns(tmp_path):
    img = nib.Nifti1Image(random_array(), None)
    img.header.set_zooms((1.5, 2.0, 3.0))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    path = tmp_path / "bare.nii.gz"
    nib.save(img, str(path))
    hdr = nib.load(str(path)).header
    assert int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0
    with pytest.warns(GeometryWarning) as rec:
        vol = read_volume(path)
    assert any(str(path) in str(w.message) for w in rec)
    assert vol.meta["affine_source"] == "pixdim"
    np.testing.assert_allclose(vol.spacing, [1.5, 2.0, 3.0])
    np.testing.assert_allclose(vol.affine, hdr.get_base_affine())


def test_sheared_sform(tmp_path):
    aff = make_affine(np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.1, 2.0]]), [1.0, 2.0, 3.0])
    arr = random_array(seed=15)
    img = nib.Nifti1Image(arr, None)
    img.set_sform(aff, code=1)
    img.set_qform(None, code=0)
    path = tmp_path / "sheared.nii.gz"
    nib.save(img, str(path))

    vol = read_volume(path, dtype=None)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-6)
    assert vol.is_sheared

    out = tmp_path / "sheared_out.nii.gz"
    write_nifti(vol, out)
    hdr = nib.load(str(out)).header
    assert int(hdr["qform_code"]) == 0
    assert int(hdr["sform_code"]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        back = read_volume(out, dtype=None)
    np.testing.assert_allclose(back.affine, aff, atol=1e-6)
    assert back.is_sheared
    np.testing.assert_array_equal(back.array[0], arr)


def test_volume_validation_and_replace():
    with pytest.raises(ValueError):
        Volume(np.zeros((2, 3, 4)), np.eye(4))
    with pytest.raises(ValueError):
        Volume(np.zeros((1, 2, 3, 4)), np.eye(3))
    v = Volume(np.zeros((1, 2, 3, 4)), AFFINES["ras"], {"path": "a.nii"})
    w = v.replace(array=np.ones((1, 2, 3, 4)))
    w.meta["path"] = "b.nii"
    assert v.meta["path"] == "a.nii" and v.source == "a.nii"
    np.testing.assert_allclose(v.spacing, [0.9, 1.2, 2.5])
    assert "RAS" in repr(v)
