"""volfm.io.multiframe: enhanced and legacy-converted enhanced multi-frame DICOM files read as one volume.

The reference is independent of the code under test: a single-frame series written in code and read by SimpleITK
(the series reader), converted by highdicom into one Legacy Converted Enhanced file; and Enhanced files written by
hand (volfm.testing.write_multiframe) whose expected values and affine are computed here from the tags.
"""
import json
import math

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage, LegacyConvertedEnhancedPETImage
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1, RLELossless, generate_uid

from volfm import VolfmError
from volfm.io import VolumeReadError, read_volume
from volfm.io.dicomscan import hash_id, scan_tree
from volfm.io.multiframe import FORMAT, dicom_files
from volfm.testing import pet_tags, write_dicom_series, write_multiframe, write_sr


def oblique():
    row = np.array([np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20)), 0.0])
    col = np.array([0.0, np.cos(0.3), -np.sin(0.3)])
    col -= row * (row @ col)
    return row, col / np.linalg.norm(col)


# oblique, and a sagittal one whose array axes are LPS's permuted (i -> posterior, j -> inferior, k -> left)
GEOMETRIES = {"oblique": oblique(), "sagittal_permuted": (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]))}
ORIGIN, PS, DZ = np.array([-100.0, 50.0, 30.0]), (0.7, 0.9), 2.5  # PixelSpacing = (row, column) spacing


def ras_affine(row, col, ps, dz, origin):
    """The RAS affine of a DICOM grid by hand: i along the row direction with the column spacing (PixelSpacing[1]),
    j along the column direction, k along row x column."""
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = np.asarray(row) * ps[1], np.asarray(col) * ps[0]
    lps[:3, 2] = np.cross(row, col) * dz
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def legacy_convert(series, out, order, cls=LegacyConvertedEnhancedCTImage):
    """One legacy-converted enhanced file from the series' files, stored in ``order`` (highdicom keeps the order
    it is given when it writes no dimension index)."""
    files = sorted(series.iterdir())
    mf = cls([pydicom.dcmread(files[i]) for i in order], generate_uid(), 1, generate_uid(), 1,
             include_dimension_index=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    mf.save_as(out)
    return out


def one_line_error(path, **kwargs) -> str:
    with pytest.raises(VolumeReadError) as info:
        read_volume(path, **kwargs)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg and "\r" not in msg
    assert isinstance(info.value, VolfmError)
    return msg


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_legacy_converted_file_matches_the_series_reader(tmp_path, geometry):
    row, col = GEOMETRIES[geometry]
    kji = np.random.default_rng(3).integers(-1000, 2000, (6, 5, 7)).astype(np.int16)  # (slices, rows, columns)
    write_dicom_series(tmp_path / "series", kji, ORIGIN, row, col, PS, DZ, intercept=-1024.0)
    order = [3, 0, 5, 1, 4, 2]  # the file stores the slices shuffled
    path = legacy_convert(tmp_path / "series", tmp_path / "mf" / "ct.dcm", order)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SOPClassUID.name == "Legacy Converted Enhanced CT Image Storage" and int(ds.NumberOfFrames) == 6
    normal = np.cross(row, col)
    stored = [float(np.asarray(g.PlanePositionSequence[0].ImagePositionPatient, float) @ normal)
              for g in ds.PerFrameFunctionalGroupsSequence]
    assert np.argsort(stored).tolist() == np.argsort(order).tolist()  # really out of order in the file

    ref = read_volume(tmp_path / "series")  # SimpleITK/GDCM
    vol = read_volume(path)
    assert ref.meta["format"] == "dicom"
    assert vol.meta["format"] == FORMAT == "dicom-multiframe"
    assert vol.meta["num_frames"] == 6 and vol.meta["modality"] == "CT"
    assert vol.meta["series_id"] == ds.SeriesInstanceUID and vol.meta["path"] == str(path)
    assert vol.array.shape == ref.array.shape == (1, 7, 5, 6) and vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(vol.affine, ras_affine(row, col, PS, DZ, ORIGIN), atol=1e-4)
    # dtype=None keeps integers, as the series reader does
    raw, ref_raw = read_volume(path, dtype=None), read_volume(tmp_path / "series", dtype=None)
    assert np.issubdtype(raw.array.dtype, np.integer) and raw.array.dtype == ref_raw.array.dtype
    np.testing.assert_array_equal(raw.array, ref_raw.array)
    # a folder whose only image series is the file reads it too
    folder = read_volume(tmp_path / "mf")
    assert folder.meta["format"] == FORMAT
    np.testing.assert_array_equal(folder.array, ref.array)
    np.testing.assert_allclose(folder.affine, vol.affine, atol=0)


def test_legacy_converted_pet_keeps_the_suv_factor(tmp_path):
    kji = np.random.default_rng(5).integers(0, 30000, (4, 5, 6)).astype(np.int16)
    slopes = [1.0, 0.37, 2.5, 0.013]  # per-slice RescaleSlope: per-frame groups in the converted file
    write_dicom_series(tmp_path / "pet", kji, [10, -20, 5], [1, 0, 0], [0, 1, 0], (2.0, 2.0), 3.0, modality="PT",
                       slopes=slopes, extra=pet_tags)
    path = legacy_convert(tmp_path / "pet", tmp_path / "pet.dcm", [2, 0, 3, 1], LegacyConvertedEnhancedPETImage)
    ref, vol = read_volume(tmp_path / "pet"), read_volume(path)
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    assert vol.meta["modality"] == "PT" and vol.meta["pet_units"] == "BQML"
    assert vol.meta["suv_factor"] == pytest.approx(ref.meta["suv_factor"], rel=1e-12)
    assert math.isfinite(vol.meta["suv_factor"])


@pytest.mark.parametrize("per_frame_geometry", [False, True], ids=["shared_groups", "per_frame_groups"])
def test_enhanced_file_with_per_frame_rescale_stored_in_reverse(tmp_path, per_frame_geometry):
    row, col = GEOMETRIES["oblique"]
    kji = np.random.default_rng(7).integers(-2000, 3000, (5, 3, 4)).astype(np.int16)
    slopes = np.array([1.0, 0.5, 2.0, 0.25, 1.5])
    intercepts = np.array([-1024.0, -1000.0, 0.0, 3.5, -7.25])
    path = tmp_path / "enh.dcm"
    write_multiframe(path, kji, ORIGIN, row, col, PS, DZ, frame_order=[4, 3, 2, 1, 0], slopes=slopes,
                     intercepts=intercepts, per_frame_geometry=per_frame_geometry)
    expected = (kji * slopes[:, None, None] + intercepts[:, None, None]).transpose(2, 1, 0)  # float64, (I, J, K)
    vol = read_volume(path)
    assert vol.array.shape == (1, 4, 3, 5) and vol.meta["sop_class"] == "Enhanced CT Image Storage"
    np.testing.assert_array_equal(vol.array[0], expected.astype(np.float32))
    np.testing.assert_allclose(vol.affine, ras_affine(row, col, PS, DZ, ORIGIN), atol=1e-5)
    assert "gantry_tilt_deg" not in vol.meta
    full = read_volume(path, dtype=None)  # non-integer rescale: float64, as the series reader
    assert full.array.dtype == np.float64
    np.testing.assert_array_equal(full.array[0], expected)
    # a vendor-numbered file without a suffix is recognised by its DICM preamble
    bare = tmp_path / "IM0001"
    bare.write_bytes(path.read_bytes())
    np.testing.assert_array_equal(read_volume(bare).array, vol.array)


def test_rle_compressed_file_is_decoded_by_pydicom(tmp_path):
    kji = np.random.default_rng(8).integers(-1000, 2000, (4, 3, 5)).astype(np.int16)
    plain, rle = tmp_path / "plain.dcm", tmp_path / "rle.dcm"
    write_multiframe(plain, kji, ORIGIN, [1, 0, 0], [0, 1, 0], PS, DZ)
    write_multiframe(rle, kji, ORIGIN, [1, 0, 0], [0, 1, 0], PS, DZ, extra=lambda ds: ds.compress(RLELossless))
    assert pydicom.dcmread(rle, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read_volume(rle).array, read_volume(plain).array)
    np.testing.assert_array_equal(read_volume(plain).array[0], kji.transpose(2, 1, 0) - 1024.0)


def _item(**values):
    out = Dataset()
    for key, value in values.items():
        setattr(out, key, value)
    return out


def _temporal(ds):
    for f, groups in enumerate(ds.PerFrameFunctionalGroupsSequence):
        groups.FrameContentSequence[0].TemporalPositionIndex = f % 2 + 1


def _echoes(ds):  # frames stored as (position 0, echo 1), (position 0, echo 2), (position 1, echo 1), ...
    ds.DimensionIndexSequence = [
        _item(DimensionIndexPointer=0x00200032, FunctionalGroupPointer=0x00209113),
        _item(DimensionIndexPointer=0x00189082, FunctionalGroupPointer=0x00189114, DimensionDescriptionLabel="Echo")]
    for f, groups in enumerate(ds.PerFrameFunctionalGroupsSequence):
        groups.FrameContentSequence[0].DimensionIndexValues = [f // 2 + 1, f % 2 + 1]


def _no_orientation(ds):
    del ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence


def _jpeg_lossless(ds):  # a transfer syntax no installed decoder reads (no pylibjpeg/gdcm in the test environment)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(20) + b"\xff\xd9"] * int(ds.NumberOfFrames))
    ds["PixelData"].VR = "OB"


BAD = {
    "missing_frame": (dict(frame_order=[0, 1, 3, 4, 5]), "uneven frame gaps (2.5 to 5 mm): frames are missing"),
    "duplicate_frame": (dict(frame_order=[0, 1, 2, 2, 3]), "two frames at the same position"),
    "two_stacks": (dict(stack_ids=[1, 1, 1, 2, 2, 2]), "more than one volume (2 stacks (StackID 1, 2))"),
    "temporal": (dict(extra=_temporal), "2 temporal positions"),
    "echoes": (dict(frame_order=[0, 0, 1, 1, 2, 2], extra=_echoes), "6 frames at 3 positions, varying in Echo"),
    "no_positions": (dict(positions=False), "no per-frame ImagePositionPatient (PlanePositionSequence)"),
    "no_orientation": (dict(extra=_no_orientation), "no ImageOrientationPatient"),
    "compressed": (dict(extra=_jpeg_lossless), "which no installed decoder reads; pip install"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_multiframe_files_are_one_line_errors(tmp_path, case):
    kwargs, expected = BAD[case]
    kji = np.random.default_rng(9).integers(0, 100, (6, 3, 4)).astype(np.int16)
    path = tmp_path / f"{case}.dcm"
    write_multiframe(path, kji, ORIGIN, [1, 0, 0], [0, 1, 0], PS, DZ, **kwargs)
    assert expected in one_line_error(path)


@pytest.mark.parametrize("keep", [0.9, 0.5])
def test_truncated_file_is_one_line_error(tmp_path, keep):
    kji = np.random.default_rng(10).integers(0, 100, (6, 8, 8)).astype(np.int16)
    full = tmp_path / "full.dcm"
    write_multiframe(full, kji, ORIGIN, [1, 0, 0], [0, 1, 0], PS, DZ)
    data = full.read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * keep)])  # 0.9: inside the pixel data; 0.5: inside the frame groups
    assert "truncated" in one_line_error(path)


def test_single_frame_file_points_at_its_folder(tmp_path):
    write_dicom_series(tmp_path / "s", np.zeros((3, 2, 2), np.int16), ORIGIN, [1, 0, 0], [0, 1, 0], PS, DZ)
    assert "point at the folder" in one_line_error(tmp_path / "s" / "001.dcm")


def test_folder_with_a_multiframe_file_and_another_series(tmp_path):
    folder = tmp_path / "mixed"
    kji = np.random.default_rng(11).integers(0, 100, (4, 3, 3)).astype(np.int16)
    uid = write_multiframe(folder / "enh.dcm", kji, ORIGIN, [1, 0, 0], [0, 1, 0], PS, DZ)
    write_sr(folder / "sr.dcm", study_uid=generate_uid())  # not an image: does not count
    assert read_volume(folder).meta["format"] == FORMAT
    other = write_dicom_series(folder, np.ones((1, 3, 3), np.int16), ORIGIN, [1, 0, 0], [0, 1, 0], PS, DZ)
    assert "give series_id" in one_line_error(folder)
    by_uid = read_volume(folder, series_id=uid)
    assert by_uid.meta["format"] == FORMAT and by_uid.meta["series_id"] == uid and by_uid.shape == (3, 3, 4)
    np.testing.assert_array_equal(by_uid.array[0], kji.transpose(2, 1, 0) - 1024.0)
    hashed = read_volume(folder, series_id=hash_id(uid))  # as `volfm scan --hash-uids` writes it
    assert hashed.meta["series_id"] == hash_id(uid) and uid not in repr(hashed.meta)
    np.testing.assert_array_equal(hashed.array, by_uid.array)
    single = read_volume(folder, series_id=other)  # the other series goes to the series reader
    assert single.meta["format"] == "dicom" and single.shape == (3, 3, 1)


def test_scan_lists_an_enhanced_file_as_usable(tmp_path):
    root = tmp_path / "root"
    kji = np.random.default_rng(12).integers(0, 100, (6, 3, 4)).astype(np.int16)
    good = write_multiframe(root / "P1" / "enh" / "ct.dcm", kji, ORIGIN, [1, 0, 0], [0, 0, -1], PS, DZ,
                            frame_order=[5, 4, 3, 2, 1, 0])
    nopos = write_multiframe(root / "P1" / "nopos" / "ct.dcm", kji, ORIGIN, [1, 0, 0], [0, 1, 0], PS, DZ,
                             positions=False)
    stacks = write_multiframe(root / "P1" / "stacks" / "ct.dcm", kji, ORIGIN, [1, 0, 0], [0, 1, 0], PS, DZ,
                              stack_ids=[1, 1, 1, 2, 2, 2])
    gap = write_multiframe(root / "P1" / "gap" / "ct.dcm", kji, ORIGIN, [1, 0, 0], [0, 1, 0], PS, DZ,
                           frame_order=[0, 1, 3, 4, 5])
    rows, problems = scan_tree(root)
    assert problems == []
    got = {r["series_uid"]: r for r in rows}
    row = got[good]
    assert row["usable"] and row["reason"] == "" and row["slice_count"] == 6
    assert row["spacing_between_slices"] == DZ and row["slice_thickness"] == DZ
    assert row["orientation"] == "coronal" and row["modality"] == "CT" and row["folder"] == "P1/enh"
    assert not got[nopos]["usable"]
    assert got[nopos]["reason"] == "multi-frame object without per-frame positions (PlanePositionSequence)"
    assert not got[stacks]["usable"] and "multi-frame object with 2 stacks (StackID 1, 2)" in got[stacks]["reason"]
    assert not got[gap]["usable"] and got[gap]["reason"].startswith("missing slices (1 gap(s) of up to 5 mm")
    assert got[gap]["slice_count"] == 5
    # what the scan calls usable, the reader reads
    vol = read_volume(root / "P1" / "enh")
    assert vol.shape == (4, 3, 6) and vol.meta["series_id"] == good


def test_dicom_files_take_every_dicom_file_whatever_its_name(tmp_path):
    """PACS exports name files by SOPInstanceUID (``1.2.840.123``: suffix ``.123``) or ``*.IMA``: every regular,
    non-hidden, non-DICOMDIR file with the DICOM preamble counts, not only ``*.dcm`` and suffix-less names."""
    folder = tmp_path / "export"
    write_dicom_series(folder, np.zeros((3, 2, 2), np.int16), ORIGIN, [1, 0, 0], [0, 1, 0], PS, DZ)
    names = {"000.dcm": "1.2.840.5555.1.7", "001.dcm": "IM0002.IMA", "002.dcm": "IM0003"}
    for old, new in names.items():
        (folder / old).rename(folder / new)
    for name in (".hidden", "DICOMDIR"):  # DICOM by preamble, left out by name
        (folder / name).write_bytes((folder / "IM0003").read_bytes())
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "raw.123").write_bytes(b"\0" * 300)  # no DICM preamble: not DICOM here, as for volfm scan
    (folder / "sub").mkdir()
    (folder / "sub" / "x.dcm").write_bytes((folder / "IM0003").read_bytes())
    assert [f.name for f in dicom_files(folder)] == sorted(names.values())


def test_uid_named_multiframe_file_in_a_folder_is_read_by_the_multiframe_reader(tmp_path):
    """A folder whose one file, named by its SOPInstanceUID, is an Enhanced CT with per-frame rescale: read by the
    multi-frame reader (GDCM would ignore the per-frame rescale), values by hand; meta names the folder, not the
    file (a cohort cell is the folder, and the file name is a raw UID)."""
    row, col = GEOMETRIES["oblique"]
    kji = np.random.default_rng(13).integers(-2000, 3000, (5, 3, 4)).astype(np.int16)
    slopes, intercepts = np.array([1.0, 0.5, 2.0, 0.25, 1.5]), np.array([-1024.0, -1000.0, 0.0, 3.5, -7.25])
    folder = tmp_path / "series"
    uid = write_multiframe(folder / "x.dcm", kji, ORIGIN, row, col, PS, DZ, frame_order=[2, 0, 4, 1, 3],
                           slopes=slopes, intercepts=intercepts)
    sop = str(pydicom.dcmread(folder / "x.dcm", stop_before_pixels=True).SOPInstanceUID)
    (folder / "x.dcm").rename(folder / sop)
    expected = (kji * slopes[:, None, None] + intercepts[:, None, None]).transpose(2, 1, 0)
    for series_id in (None, hash_id(uid)):
        vol = read_volume(folder, series_id=series_id, dtype=None)
        assert vol.meta["format"] == FORMAT == "dicom-multiframe" and vol.meta["path"] == str(folder)
        np.testing.assert_array_equal(vol.array[0], expected)
        np.testing.assert_allclose(vol.affine, ras_affine(row, col, PS, DZ, ORIGIN), atol=1e-5)
        assert sop not in json.dumps(vol.meta)
    assert vol.meta["series_id"] == hash_id(uid) and uid not in json.dumps(vol.meta)
    # a corrupt file read through its folder is named by the folder too
    (folder / sop).write_bytes((folder / sop).read_bytes()[:-40])
    msg = one_line_error(folder)
    assert "truncated" in msg and sop not in msg
