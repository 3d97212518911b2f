"""NRRD/MHA (SimpleITK-written) and DICOM series (pydicom-written) read through volfm.io, compared with
SimpleITK's own reading and with geometry computed by hand from the tags."""
import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from volfm.io import GeometryWarning, VolumeReadError, read_volume
from volfm.io.affine import affine_from_sitk
from volfm.testing import DOSE_BQ, HALF_LIFE_S, WEIGHT_KG, pet_tags, write_dicom_series


def oblique_direction():
    """An orthonormal, right-handed, oblique LPS direction matrix (columns = axis directions)."""
    a, b = np.deg2rad(25.0), np.deg2rad(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


ORIGIN_LPS = (-80.5, 42.0, 17.25)
SPACING = (0.75, 1.25, 2.0)


def sitk_oblique_image(kji_array, direction=None, origin=ORIGIN_LPS, spacing=SPACING, vector=False):
    img = sitk.GetImageFromArray(kji_array, isVector=vector)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(tuple((oblique_direction() if direction is None else direction).ravel()))
    return img


def expected_ras_affine(direction, spacing, origin):
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction) @ np.diag(spacing)
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def sample_indices(shape, seed=2):
    corners = [(i, j, k) for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    rng = np.random.default_rng(seed)
    return corners + [tuple(int(rng.integers(0, s)) for s in shape) for _ in range(5)]


def assert_world_matches(vol, image, atol=1e-4):
    for ijk in sample_indices(vol.shape):
        p = np.array(image.TransformIndexToPhysicalPoint(ijk), dtype=np.float64)[:3]
        p[:2] *= -1.0  # LPS -> RAS
        np.testing.assert_allclose(vol.world_of(np.array(ijk)), p, atol=atol, err_msg=str(ijk))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_sitk_file_oblique(tmp_path, suffix):
    kji = np.random.default_rng(0).integers(-500, 500, (5, 6, 7)).astype(np.int16)  # (K, J, I)
    img = sitk_oblique_image(kji)
    path = tmp_path / f"ob{suffix}"
    sitk.WriteImage(img, str(path))

    vol = read_volume(path, dtype=None)
    ref = sitk.ReadImage(str(path))
    assert vol.array.shape == (1, 7, 6, 5)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array[0], sitk.GetArrayFromImage(ref).transpose(2, 1, 0))
    np.testing.assert_array_equal(vol.array[0], kji.transpose(2, 1, 0))
    np.testing.assert_allclose(vol.affine, expected_ras_affine(oblique_direction(), SPACING, ORIGIN_LPS), atol=1e-6)
    np.testing.assert_allclose(vol.affine, affine_from_sitk(ref), atol=1e-12)
    assert vol.is_oblique and not vol.is_sheared
    np.testing.assert_allclose(vol.spacing, SPACING, atol=1e-9)
    assert vol.meta["format"] == suffix.lstrip(".")
    assert_world_matches(vol, ref)


def test_lps_aligned_mha_is_lps(tmp_path):
    kji = np.zeros((3, 4, 5), np.float32)
    img = sitk_oblique_image(kji, direction=np.eye(3))
    sitk.WriteImage(img, str(tmp_path / "a.mha"))
    vol = read_volume(tmp_path / "a.mha")
    assert vol.orientation == "LPS"
    np.testing.assert_allclose(vol.affine[:3, 3], [80.5, -42.0, 17.25])


def test_vector_mha_channels(tmp_path):
    kjic = np.random.default_rng(1).normal(size=(4, 5, 6, 3)).astype(np.float32)  # (K, J, I, C)
    img = sitk_oblique_image(kjic, vector=True)
    assert img.GetNumberOfComponentsPerPixel() == 3
    path = tmp_path / "vec.mha"
    sitk.WriteImage(img, str(path))
    vol = read_volume(path)
    assert vol.array.shape == (3, 6, 5, 4)
    for c in range(3):
        np.testing.assert_array_equal(vol.array[c], kjic[..., c].transpose(2, 1, 0))
    assert_world_matches(vol, sitk.ReadImage(str(path)))


def test_4d_mha_channels(tmp_path):
    tkji = np.random.default_rng(2).normal(size=(2, 4, 5, 6)).astype(np.float32)  # (T, K, J, I)
    img = sitk.GetImageFromArray(tkji, isVector=False)
    assert img.GetDimension() == 4
    d4 = np.eye(4)
    d4[:3, :3] = oblique_direction()
    img.SetDirection(tuple(d4.ravel()))
    img.SetSpacing((*SPACING, 1.0))
    img.SetOrigin((*ORIGIN_LPS, 0.0))
    path = tmp_path / "t.mha"
    sitk.WriteImage(img, str(path))
    vol = read_volume(path)
    assert vol.array.shape == (2, 6, 5, 4)
    for t in range(2):
        np.testing.assert_array_equal(vol.array[t], tkji[t].transpose(2, 1, 0))
    np.testing.assert_allclose(vol.affine, expected_ras_affine(oblique_direction(), SPACING, ORIGIN_LPS), atol=1e-6)


# --- DICOM -------------------------------------------------------------------------------------

def dicom_geometry():
    row = np.array([np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20)), 0.0])
    col = np.array([0.0, np.cos(0.3), -np.sin(0.3)])
    col -= row * (row @ col)
    col /= np.linalg.norm(col)
    return row, col


def sitk_series(folder):
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(folder)))
    return r.Execute()


def test_dicom_ct_series_oblique(tmp_path):
    kji = np.random.default_rng(3).integers(-1000, 2000, (6, 5, 7)).astype(np.int16)  # (slices, rows, cols)
    row, col = dicom_geometry()
    origin, ps, dz = np.array([-100.0, 50.0, 30.0]), (0.7, 0.9), 2.5
    folder = tmp_path / "ct"
    # file names in reverse slice order: the reader must sort by position, not by name
    write_dicom_series(folder, kji, origin, row, col, ps, dz, intercept=-1024.0, reverse_files=True)

    vol = read_volume(folder)
    ref = sitk_series(folder)
    assert vol.meta["format"] == "dicom" and vol.meta["modality"] == "CT" and vol.meta["num_files"] == 6
    assert "suv_factor" not in vol.meta
    assert vol.array.shape == (1, 7, 5, 6)  # (C, columns, rows, slices)
    np.testing.assert_array_equal(vol.array[0], sitk.GetArrayFromImage(ref).transpose(2, 1, 0))
    np.testing.assert_array_equal(vol.array[0], (kji.astype(np.float32) - 1024.0).transpose(2, 1, 0))
    np.testing.assert_allclose(vol.affine, affine_from_sitk(ref), atol=1e-9)

    # geometry from the tags by hand: i runs along the row direction with the column spacing (PixelSpacing[1])
    normal = np.cross(row, col)
    expected = expected_ras_affine(np.stack([row, col, normal], axis=1), (ps[1], ps[0], dz), origin)
    np.testing.assert_allclose(vol.affine, expected, atol=1e-4)
    assert vol.is_oblique and not vol.is_sheared
    assert_world_matches(vol, ref)


def test_dicom_dtype_none_keeps_integer(tmp_path):
    kji = np.random.default_rng(4).integers(0, 3000, (3, 4, 5)).astype(np.int16)
    write_dicom_series(tmp_path / "s", kji, [0, 0, 0], [1, 0, 0], [0, 1, 0], (1.0, 1.0), 2.0, intercept=-1024.0)
    vol = read_volume(tmp_path / "s", dtype=None)
    assert np.issubdtype(vol.array.dtype, np.integer)
    np.testing.assert_array_equal(vol.array[0], kji.astype(np.int32).transpose(2, 1, 0) - 1024)
    assert vol.orientation == "LPS"


def test_dicom_two_series_reads_largest_and_warns(tmp_path):
    folder = tmp_path / "mixed"
    small = np.ones((2, 4, 4), np.int16)
    big = np.full((4, 4, 4), 7, np.int16)
    uid_small = write_dicom_series(folder / "a", small, [0, 0, 0], [1, 0, 0], [0, 1, 0], (1.0, 1.0), 1.0)
    uid_big = write_dicom_series(folder / "b", big, [0, 0, 0], [1, 0, 0], [0, 1, 0], (1.0, 1.0), 1.0)
    for sub in ("a", "b"):
        for f in (folder / sub).iterdir():
            f.rename(folder / f"{sub}{f.name}")
        (folder / sub).rmdir()
    with pytest.warns(GeometryWarning, match="2 DICOM series"):
        vol = read_volume(folder)
    assert vol.meta["series_id"] == uid_big and vol.shape == (4, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        vol_small = read_volume(folder, series_id=uid_small)
    assert vol_small.shape == (4, 4, 2)
    np.testing.assert_array_equal(vol_small.array, 1.0)


def test_unknown_series_id_is_one_line_error(tmp_path):
    folder = tmp_path / "ct"
    write_dicom_series(folder, np.zeros((2, 3, 3), np.int16), [0, 0, 0], [1, 0, 0], [0, 1, 0], (1.0, 1.0), 1.0)
    with pytest.raises(VolumeReadError) as info:
        read_volume(folder, series_id="1.2.3.4")
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


# --- PET / SUV ---------------------------------------------------------------------------------

def expected_suv_factor(decay=True):
    t_inj = 9 * 3600 + 35 * 60 + 12.5
    t_ser = 10 * 3600 + 30 * 60 + 0.0
    dt = t_ser - t_inj  # 3287.5 s
    assert dt == 3287.5
    dose = DOSE_BQ * math.exp(-math.log(2) * dt / HALF_LIFE_S) if decay else DOSE_BQ
    return WEIGHT_KG * 1000.0 / dose


def test_pet_suv_factor_and_per_slice_rescale(tmp_path):
    kji = np.random.default_rng(5).integers(0, 30000, (4, 5, 6)).astype(np.int16)
    slopes = [1.0, 0.37, 2.5, 0.013]  # per-slice RescaleSlope, the first an integer one
    folder = tmp_path / "pet"
    write_dicom_series(folder, kji, [10, -20, 5], [1, 0, 0], [0, 1, 0], (2.0, 2.0), 3.0, modality="PT",
                       slopes=slopes, extra=pet_tags)
    vol = read_volume(folder)
    assert vol.meta["modality"] == "PT" and vol.meta["pet_units"] == "BQML"
    assert "suv_missing" not in vol.meta
    assert vol.meta["suv_factor"] == pytest.approx(expected_suv_factor(), rel=1e-9)
    # activity = stored * slope of its own slice (ITK alone would take slice 0's integer type and wrap)
    expected = (kji * np.asarray(slopes)[:, None, None]).transpose(2, 1, 0)
    np.testing.assert_allclose(vol.array[0], expected, rtol=1e-6)


def test_pet_decay_correction_admin_uses_undecayed_dose(tmp_path):
    kji = np.ones((2, 3, 3), np.int16)
    write_dicom_series(tmp_path / "pet", kji, [0, 0, 0], [1, 0, 0], [0, 1, 0], (2.0, 2.0), 3.0, modality="PT",
                       extra=lambda ds: pet_tags(ds, decay="ADMIN"))
    vol = read_volume(tmp_path / "pet")
    assert vol.meta["suv_factor"] == pytest.approx(expected_suv_factor(decay=False), rel=1e-9)


@pytest.mark.parametrize("kind", ["no_weight", "no_sequence", "counts"])
def test_pet_missing_tags_leave_suv_absent(tmp_path, kind):
    def extra(ds):
        if kind == "no_weight":
            pet_tags(ds, weight=False)
        elif kind == "no_sequence":
            pet_tags(ds)
            del ds.RadiopharmaceuticalInformationSequence
        else:
            pet_tags(ds, units="CNTS")

    write_dicom_series(tmp_path / "pet", np.ones((2, 3, 3), np.int16), [0, 0, 0], [1, 0, 0], [0, 1, 0],
                       (2.0, 2.0), 3.0, modality="PT", extra=extra)
    vol = read_volume(tmp_path / "pet")
    assert vol.meta["modality"] == "PT"
    assert "suv_factor" not in vol.meta
    assert isinstance(vol.meta["suv_missing"], str) and vol.meta["suv_missing"]
    if kind == "counts":
        assert "BQML" in vol.meta["suv_missing"]


def test_hand_written_nrrd_in_ras_space(tmp_path):
    """A NRRD whose header says RAS: ITK converts to LPS, volfm back to RAS; the result is the header's
    own geometry, computed by hand."""
    data = np.arange(4 * 3 * 2, dtype="<i2")  # fastest axis first: i, then j, then k
    header = ("NRRD0004\ntype: short\ndimension: 3\nspace: right-anterior-superior\nsizes: 4 3 2\n"
              "space directions: (2,0,0) (0,3,0) (0,0,4)\nkinds: domain domain domain\nendian: little\n"
              "encoding: raw\nspace origin: (10,20,30)\n\n")
    path = tmp_path / "ras.nrrd"
    path.write_bytes(header.encode() + data.tobytes())
    vol = read_volume(path, dtype=None)
    np.testing.assert_allclose(vol.affine, [[2, 0, 0, 10], [0, 3, 0, 20], [0, 0, 4, 30], [0, 0, 0, 1]], atol=1e-9)
    assert vol.orientation == "RAS"
    np.testing.assert_array_equal(vol.array[0], data.reshape(2, 3, 4).transpose(2, 1, 0))
    assert vol.array[0][3, 2, 1] == 3 + 4 * 2 + 12 * 1


def _tilted_series(folder, tilt_deg=20.0, nz=8, dz=2.5):
    """Axial slices whose positions also move along the column direction (gantry tilt)."""
    rng = np.random.default_rng(3)
    kji = rng.integers(-500, 500, (nz, 12, 10)).astype(np.int16)
    origin = np.array([-30.0, -40.0, 100.0])
    shift = dz * math.tan(math.radians(tilt_deg))

    def tilt(ds):
        k = int(ds.InstanceNumber) - 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + [0.0, k * shift, k * dz]]

    write_dicom_series(folder, kji, origin, [1, 0, 0], [0, 1, 0], (0.8, 0.9), dz, extra=tilt)
    positions = np.array([origin + [0.0, k * shift, k * dz] for k in range(nz)])
    return kji, positions


def test_gantry_tilt_gives_a_sheared_grid_at_the_true_positions(tmp_path):
    kji, positions = _tilted_series(tmp_path / "tilt")
    vol = read_volume(tmp_path / "tilt")
    assert vol.is_sheared
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(20.0, abs=0.01)
    # the first voxel of every slice sits at that slice's ImagePositionPatient (LPS -> RAS)
    for k, p in enumerate(positions):
        np.testing.assert_allclose(vol.world_of([0, 0, k]), [-p[0], -p[1], p[2]], atol=1e-4)
    np.testing.assert_array_equal(vol.array[0], kji.transpose(2, 1, 0))


def test_gantry_tilt_is_refused_by_default_and_resampled_on_request(tmp_path):
    from volfm import VolfmError
    from volfm.preprocess.pipeline import Pipeline

    _tilted_series(tmp_path / "tilt")
    spec = {"spacing": [2.0, 2.0, 2.5], "inputs": {"image": {"kind": "image"}}}
    with pytest.raises(VolfmError, match="shear"):
        Pipeline(spec)({"image": str(tmp_path / "tilt")}, case_id="c1")
    out = Pipeline({**spec, "shear": "resample"})({"image": str(tmp_path / "tilt")}, case_id="c1")
    assert out.meta["grid"]["world_resampled"] == "sheared"


def test_missing_slice_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    kji = rng.integers(0, 100, (8, 6, 5)).astype(np.int16)
    write_dicom_series(tmp_path / "s", kji, [0.0, 0.0, 0.0], [1, 0, 0], [0, 1, 0], (1.0, 1.0), 2.0)
    (tmp_path / "s" / "004.dcm").unlink()
    with pytest.raises(VolumeReadError, match="uneven slice gaps") as err:
        read_volume(tmp_path / "s")
    assert "\n" not in str(err.value) and str(tmp_path / "s") in str(err.value)
