"""DICOM SEG output (volfm.io.dicomseg): read back with pydicom and highdicom, every frame equals the label map's
section through its source slice, computed independently of the writer: each source pixel's world position (from its
file's ImagePositionPatient, ImageOrientationPatient and PixelSpacing) is mapped through the NIfTI prediction's
affine with nibabel. Axial, oblique and sagittal series with shuffled file names; references, geometry, segment codes
and colours; empty segments; a multi-frame source; files named by their SOPInstanceUID; the series chosen by the
reader's rule and named by its hash when asked by hash; grids that do not match, and sources highdicom cannot use,
are refused in one line."""
import shutil
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from volfm.io import GeometryWarning, Volume, read_volume, write_nifti
from volfm.io.dicomscan import hash_id
from volfm.io.dicomseg import DicomSegError, read_series_headers, segment_code, write_dicom_seg
from volfm.testing import index_grid, rotation, write_dicom_series, write_multiframe

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
NAMES = ["background", "spleen", "kidney_left", "liver"]  # liver (3) is named but absent from the labels
OBLIQUE = rotation(2, 20.0) @ rotation(0, 15.0)
GEOMETRIES = {  # LPS row (along a row) and column directions of the series
    "axial": ((1, 0, 0), (0, 1, 0)),
    "oblique": (tuple(OBLIQUE[:, 0]), tuple(OBLIQUE[:, 1])),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
}


def make_series(folder, kind: str, seed: int = 0, nz: int = 7, patient=True) -> str:
    """A 7-slice series of 10 rows x 12 columns, pixel spacing 2.0 (rows) x 1.5 (columns), 3 mm slices, whose file
    names are shuffled (name order is not slice order)."""
    rng = np.random.default_rng(seed)
    kji = rng.integers(-100, 100, (nz, 10, 12)).astype(np.int16)
    row, col = GEOMETRIES[kind]

    def extra(ds):
        if patient:
            ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.AccessionNumber = "19700101", "F", "20240102", "A1"

    uid = write_dicom_series(folder, kji, (-20.0, -15.0, -10.0), row, col, (2.0, 1.5), 3.0, extra=extra)
    files = sorted(folder.glob("*.dcm"))
    for f, k in zip(files, rng.permutation(len(files))):
        f.rename(folder / f"x{k:03d}.dcm")
    return uid


def make_labels(vol: Volume) -> np.ndarray:
    """Label 1: a ball of 9 mm around a point off the centre; label 2: a slab in world space (both cut the slices
    unevenly, and neither lines up with the array axes of the oblique series)."""
    ijk = index_grid(vol.shape)
    xyz = ijk @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    centre = vol.affine[:3, :3] @ ((np.asarray(vol.shape) - 1) / 2) + vol.affine[:3, 3]
    lab = np.zeros(vol.shape, np.uint8)
    lab[np.linalg.norm(xyz - centre - [2.0, -3.0, 1.0], axis=-1) < 9.0] = 1
    lab[(xyz[..., 0] - centre[0] > 4.0) & (xyz[..., 2] - centre[2] < 2.0)] = 2
    assert (lab == 1).sum() > 20 and (lab == 2).sum() > 20
    return lab[None]


def expected_sections(nifti, folder) -> dict:
    """{SOPInstanceUID: (ImagePositionPatient, labels of its pixels (Rows, Columns))}: each source pixel's world
    position (DICOM PS3.3 C.7.6.2.1.1) mapped through the NIfTI's affine to its nearest voxel."""
    img = nib.load(str(nifti))
    data = np.asarray(img.dataobj)
    inv = np.linalg.inv(img.affine)
    out = {}
    for f in folder.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ipp, iop, ps = (np.asarray(ds[t].value, float) for t in ("ImagePositionPatient", "ImageOrientationPatient",
                                                                  "PixelSpacing"))
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        lps = ipp + c[..., None] * ps[1] * iop[:3] + r[..., None] * ps[0] * iop[3:]
        ijk_f = (lps * [-1.0, -1.0, 1.0]) @ inv[:3, :3].T + inv[:3, 3]
        ijk = np.rint(ijk_f).astype(int)
        assert np.abs(ijk_f - ijk).max() < 1e-3 and (ijk >= 0).all() and (ijk < data.shape).all()
        out[str(ds.SOPInstanceUID)] = (ipp, data[ijk[..., 0], ijk[..., 1], ijk[..., 2]])
    return out


def seg_frames(path) -> tuple[pydicom.Dataset, dict]:
    """The SEG read with pydicom: {(referenced SOPInstanceUID, segment number): (ImagePositionPatient, frame)}."""
    ds = pydicom.dcmread(path)
    px = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    shared = ds.SharedFunctionalGroupsSequence[0]
    frames = {}
    for i, pf in enumerate(ds.PerFrameFunctionalGroupsSequence):
        def group(keyword, pf=pf):  # a frame's own functional group, else the shared one (one segment: shared)
            return (pf.get(keyword) or shared.get(keyword))[0]
        src = group("DerivationImageSequence").SourceImageSequence[0]
        key = (str(src.ReferencedSOPInstanceUID), int(group("SegmentIdentificationSequence").ReferencedSegmentNumber))
        assert key not in frames
        frames[key] = (np.asarray(group("PlanePositionSequence").ImagePositionPatient, float), px[i])
    return ds, frames


def check_frames(frames: dict, expected: dict, values: list[int]) -> int:
    """Every (source slice, segment) frame equals its expected mask; absent frames are empty masks. Returns the
    number of frames that hold voxels."""
    assert {k[0] for k in frames} <= set(expected)
    full = 0
    for sop, (ipp, lab) in expected.items():
        for number, value in enumerate(values, start=1):
            want = (lab == value).astype(np.uint8)
            if (sop, number) in frames:
                pos, frame = frames[(sop, number)]
                np.testing.assert_allclose(pos, ipp, atol=1e-4)
                np.testing.assert_array_equal(frame, want)
                full += int(want.any())
            else:
                assert not want.any(), f"segment {number} missing on slice {sop}"
    return full


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """{kind: (folder, series uid, NIfTI prediction on the series' grid)} for the three geometries."""
    root = tmp_path_factory.mktemp("seg")
    out = {}
    for i, kind in enumerate(GEOMETRIES):
        folder = root / kind
        uid = make_series(folder, kind, seed=i)
        vol = read_volume(folder)
        nifti = write_nifti(Volume(make_labels(vol), vol.affine), root / f"{kind}_seg.nii.gz")
        out[kind] = (folder, uid, nifti)
    return out


@pytest.mark.parametrize("kind", list(GEOMETRIES))
def test_seg_frames_equal_the_prediction_on_each_source_slice(series, kind, tmp_path):
    folder, uid, nifti = series[kind]
    out = write_dicom_seg(nifti, folder, NAMES, tmp_path / "scan_seg.dcm", series_id=uid, algorithm_name="spleen-net",
                          algorithm_version="1.2")
    ds, frames = seg_frames(out)
    expected = expected_sections(nifti, folder)
    assert check_frames(frames, expected, [1, 2, 3]) > 4
    assert not any(k[1] == 3 for k in frames)  # liver: described, no voxels, no frames

    src = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in folder.iterdir())}
    first = next(iter(src.values()))
    assert ds.SOPClassUID == SEG_STORAGE and ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID and ds.StudyInstanceUID == first.StudyInstanceUID
    assert ds.SeriesInstanceUID != uid and ds.PatientID == first.PatientID and (ds.Rows, ds.Columns) == (10, 12)
    shared = ds.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float),
                               np.asarray(first.ImageOrientationPatient, float), atol=1e-6)
    np.testing.assert_allclose(np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float), [2.0, 1.5])
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == uid
    assert {str(r.ReferencedSOPInstanceUID) for r in referenced.ReferencedInstanceSequence} == set(src)

    seg = hd.seg.segread(out)  # highdicom reads it back: same references, segments, codes and colours
    assert {u[2] for u in seg.get_source_image_uids()} == set(src)
    assert seg.get_segment_numbers() == [1, 2, 3]
    descs = [seg.get_segment_description(n) for n in (1, 2, 3)]
    assert [d.segment_label for d in descs] == NAMES[1:]
    assert descs[0].segmented_property_type == codes.SCT.Spleen
    assert descs[0].segmented_property_category == codes.SCT.AnatomicalStructure
    assert descs[1].segmented_property_type == codes.SCT.Kidney
    modifier = ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
    assert modifier[0].CodeValue == codes.SCT.Left.value
    assert descs[2].segmented_property_type == codes.SCT.Liver
    colours = {tuple(s.RecommendedDisplayCIELabValue) for s in ds.SegmentSequence}
    assert len(colours) == 3
    assert all(d.algorithm_identification[0].AlgorithmName == "spleen-net" for d in descs)
    assert [s.SegmentDescription for s in ds.SegmentSequence] == ["volfm label 1", "volfm label 2", "volfm label 3"]
    # highdicom's own reading of the frames, by source instance, agrees with the pydicom one
    sops = sorted(src)
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=sops, combine_segments=False)
    for i, sop in enumerate(sops):
        for number in (1, 2):
            np.testing.assert_array_equal(px[i, :, :, number - 1], expected[sop][1] == number)


def test_label_map_in_another_axis_order_gives_the_same_seg(series, tmp_path):
    """The writer maps slices through the label map's affine: the same prediction reoriented to RAS (axes permuted
    and flipped) gives the same frames."""
    folder, uid, nifti = series["sagittal"]
    canon = nib.as_closest_canonical(nib.load(str(nifti)))
    assert nib.aff2axcodes(canon.affine) != nib.aff2axcodes(nib.load(str(nifti)).affine)
    relaid = Volume(np.asarray(canon.dataobj)[None], canon.affine, {"path": "canonical"})
    out = write_dicom_seg(relaid, folder, NAMES[:3], tmp_path / "c.dcm")
    _, frames = seg_frames(out)
    _, want = seg_frames(write_dicom_seg(nifti, folder, NAMES[:3], tmp_path / "n.dcm"))
    assert frames.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(frames[key][1], want[key][1])


def test_empty_prediction_keeps_every_frame_empty(series, tmp_path):
    folder, uid, nifti = series["axial"]
    vol = read_volume(nifti, dtype=None)
    out = write_dicom_seg(vol.replace(array=np.zeros_like(vol.array)), folder, {1: "spleen", 4: "tumour"},
                          tmp_path / "e.dcm")
    ds, frames = seg_frames(out)
    assert len(frames) == 7 * 2 and not any(f.any() for _, f in frames.values())
    assert ds.SegmentSequence[1].SegmentedPropertyCategoryCodeSequence[0].CodeValue == \
        codes.SCT.MorphologicallyAbnormalStructure.value


def test_multiframe_source_references_its_frames(series, tmp_path):
    """A legacy-converted enhanced CT of the same slices: the SEG references the file's frames by number."""
    folder, uid, nifti = series["oblique"]
    slices = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    for ds in slices:
        ds.StudyTime, ds.StudyID, ds.ReferringPhysicianName, ds.Manufacturer = "101500", "1", "", "ACME"
        ds.SeriesDate, ds.SeriesTime, ds.ImageType = "20240102", "101500", ["ORIGINAL", "PRIMARY", "AXIAL"]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(slices, hd.UID(), 2, hd.UID(), 1)
    (tmp_path / "mf").mkdir()
    mf.save_as(tmp_path / "mf" / "ct.dcm")
    out = write_dicom_seg(nifti, tmp_path / "mf", NAMES[:3], tmp_path / "mf_seg.dcm")
    check_multiframe_seg(out, mf, expected_sections(nifti, folder), [1, 2])


def check_multiframe_seg(path, mf, expected: dict, values: list[int]) -> int:
    """Every frame of the SEG at ``path`` over the multi-frame source ``mf`` references one of its frames and equals
    the expected section there, and the SET of (source frame, segment) pairs with voxels is the expected one (a
    writer dropping frames fails). ``expected``: :func:`expected_sections` of the single-frame series the file was
    converted from. Returns the number of such pairs."""
    ds = pydicom.dcmread(path)
    px = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    by_position = {tuple(np.round(ipp, 3)): lab for ipp, lab in expected.values()}
    per_frame = mf.PerFrameFunctionalGroupsSequence
    shared, got = ds.SharedFunctionalGroupsSequence[0], set()
    for i, pf in enumerate(ds.PerFrameFunctionalGroupsSequence):
        def group(keyword, pf=pf):  # a frame's own functional group, else the shared one (one segment: shared)
            return (pf.get(keyword) or shared.get(keyword))[0]
        src = group("DerivationImageSequence").SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID == mf.SOPInstanceUID
        frame = int(src.ReferencedFrameNumber)
        ipp = np.asarray(per_frame[frame - 1].PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(np.asarray(group("PlanePositionSequence").ImagePositionPatient, float), ipp,
                                   atol=1e-4)
        number = int(group("SegmentIdentificationSequence").ReferencedSegmentNumber)
        np.testing.assert_array_equal(px[i], by_position[tuple(np.round(ipp, 3))] == number)
        if px[i].any():
            got.add((frame, number))
    want = set()
    for frame, pf in enumerate(per_frame, start=1):
        lab = by_position[tuple(np.round(np.asarray(pf.PlanePositionSequence[0].ImagePositionPatient, float), 3))]
        want |= {(frame, number) for number in values if (lab == number).any()}
    assert got == want and want
    return len(want)


def test_series_is_chosen_by_id_and_headers_are_sorted_by_position(series, tmp_path):
    folder = tmp_path / "two"
    a = make_series(folder / "a", "axial", seed=5, nz=4)
    b = make_series(folder / "b", "axial", seed=6, nz=6)
    for f in (folder / "a").iterdir():
        f.rename(folder / f"a_{f.name}")
    for f in (folder / "b").iterdir():
        f.rename(folder / f"b_{f.name}")
    with pytest.warns(GeometryWarning, match="2 DICOM series found; reading the largest"):
        largest = read_series_headers(folder)  # the larger, with the reader's warning
    assert [str(d.SeriesInstanceUID) for d in largest] == [b] * 6
    got = read_series_headers(folder, a)
    z = [float(d.ImagePositionPatient[2]) for d in got]
    assert len(got) == 4 and z == sorted(z)
    with pytest.raises(DicomSegError, match="series 1.2.3 not found"):
        read_series_headers(folder, "1.2.3")
    assert [str(d.SeriesInstanceUID) for d in read_series_headers(folder, hash_id(a).upper())] == [a] * 4


def test_a_tie_is_broken_as_the_reader_breaks_it(tmp_path):
    """Two series of as many files: the SEG writer takes the series the reader reads (the first by UID)."""
    for name in ("p", "q"):
        make_series(tmp_path / name, "axial", seed=7, nz=3)
        for f in (tmp_path / name).iterdir():
            f.rename(tmp_path / f"{name}_{f.name}")
    with pytest.warns(GeometryWarning):
        read = read_volume(tmp_path).meta["series_id"]
    with pytest.warns(GeometryWarning):
        headers = read_series_headers(tmp_path)
    assert {str(d.SeriesInstanceUID) for d in headers} == {read}


def rename_to_sop_uids(folder) -> list[str]:
    """Name every file of ``folder`` by its SOPInstanceUID (``1.2.826...``: the suffix is the UID's last part), as
    PACS exports do; returns the names."""
    names = []
    for f in sorted(folder.iterdir()):
        name = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        f.rename(folder / name)
        names.append(name)
    return names


def test_series_with_files_named_by_uid(series, tmp_path):
    folder, uid, nifti = series["axial"]
    uid_named = tmp_path / "export"
    shutil.copytree(folder, uid_named)
    names = rename_to_sop_uids(uid_named)
    assert all(Path(n).suffix not in (".dcm", "") for n in names)
    assert [str(d.SeriesInstanceUID) for d in read_series_headers(uid_named)] == [uid] * 7
    _, frames = seg_frames(write_dicom_seg(nifti, uid_named, NAMES, tmp_path / "u.dcm"))
    assert check_frames(frames, expected_sections(nifti, uid_named), [1, 2, 3]) > 4


def test_a_series_asked_by_hash_is_named_by_its_hash_in_every_message(series, tmp_path, monkeypatch):
    """A series asked for by its ``volfm scan --hash-uids`` hash: no message names its SeriesInstanceUID (misses
    list hashed ids; grid, geometry, mixed-file and highdicom errors show the hash)."""
    folder, uid, nifti = series["oblique"]
    other = tmp_path / "other"
    make_series(other, "axial", seed=9, nz=3)
    two = tmp_path / "two"
    shutil.copytree(folder, two)
    for f in other.iterdir():
        shutil.copy(f, two / f"o_{f.name}")
    other_uid = str(pydicom.dcmread(next(other.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    raw = (uid, other_uid)

    def message(call, *args, **kwargs) -> str:
        with pytest.raises(DicomSegError) as exc:
            call(*args, **kwargs)
        text = one_line(exc)
        assert not any(r in text for r in raw), text
        return text

    assert hash_id(other_uid) in message(read_series_headers, two, "0123456789abcdef")
    vol = read_volume(nifti, dtype=None)
    shifted = vol.replace(affine=vol.affine.copy())
    shifted.affine[:3, 3] += 0.3 * vol.affine[:3, 0]  # 0.3 voxel off the series' grid
    assert f"series {hash_id(uid)} in" in message(write_dicom_seg, shifted, two, NAMES, tmp_path / "x.dcm",
                                                 series_id=hash_id(uid))
    geometry = tmp_path / "geometry"
    shutil.copytree(folder, geometry)
    odd = sorted(geometry.iterdir())[2]
    ds = pydicom.dcmread(odd)
    ds.PixelSpacing = ["2.5", "1.5"]
    ds.save_as(odd)
    assert "differs from" in message(read_series_headers, geometry, hash_id(uid))
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    write_multiframe(mixed / "mf.dcm", np.zeros((3, 10, 12), np.int16), (0, 0, 0), (1, 0, 0), (0, 1, 0), (2.0, 1.5),
                     3.0, series_uid=uid)
    assert "mixes a multi-frame image" in message(read_series_headers, mixed, hash_id(uid))

    def broken(*args, **kwargs):
        raise KeyError(f"(0020,000E) of {uid} unreadable")

    monkeypatch.setattr(hd.seg, "Segmentation", broken)
    text = message(write_dicom_seg, nifti, two, NAMES, tmp_path / "x.dcm", series_id=hash_id(uid))
    assert "KeyError" in text and hash_id(uid) in text and not (tmp_path / "x.dcm").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked by id: no warning although the folder holds two series
        read_series_headers(two, hash_id(uid))


def test_a_source_highdicom_cannot_use_is_a_one_line_error(series, tmp_path):
    """Source slices without SliceThickness (type 2, so a malformed header) make highdicom raise AttributeError;
    an output folder that cannot be made is an OSError: both become one-line DicomSegErrors naming the folder."""
    folder, uid, nifti = series["axial"]
    thin = tmp_path / "no_thickness"
    shutil.copytree(folder, thin)
    for f in thin.iterdir():
        ds = pydicom.dcmread(f)
        del ds.SliceThickness
        ds.save_as(f)
    with pytest.raises(DicomSegError) as exc:
        write_dicom_seg(nifti, thin, NAMES, tmp_path / "x.dcm")
    assert str(thin) in one_line(exc) and "AttributeError" in one_line(exc) and "SliceThickness" in one_line(exc)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DicomSegError) as exc:
        write_dicom_seg(nifti, folder, NAMES, tmp_path / "file" / "x.dcm")
    assert str(folder) in one_line(exc) and "could not be written" in one_line(exc)
    assert not list(tmp_path.glob("**/*x.dcm"))


def test_segment_codes_come_from_the_dictionary():
    assert segment_code("spleen") == (codes.SCT.AnatomicalStructure, codes.SCT.Spleen, None, True)
    assert segment_code("kidney_right") == (codes.SCT.AnatomicalStructure, codes.SCT.Kidney, codes.SCT.Right, True)
    assert segment_code("Adrenal gland").type == codes.SCT.AdrenalGland
    assert segment_code("right_ventricle")[1:] == (codes.SCT.RightVentricle, None, True)  # a side in the type's name
    rib = segment_code("rib_left_3")  # the part's type; the number is not coded, so not a full match
    assert rib == (codes.SCT.AnatomicalStructure, codes.SCT.Rib, codes.SCT.Left, False)
    assert "number in the name is not coded" in rib.describe() and "generic" not in rib.describe()
    assert segment_code("Background") == segment_code("thing_42x")  # a foreground class so named: not a lesion
    assert segment_code("tumor")[:2] == (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm)
    generic = segment_code("thing_42x")
    assert generic == (codes.SCT.Tissue, codes.SCT.Tissue, None, False) and "generic" in generic.describe()


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_label_grid_that_does_not_match_is_refused_in_one_line(series, tmp_path):
    folder, uid, nifti = series["oblique"]
    vol = read_volume(nifti, dtype=None)
    shifted = vol.replace(affine=vol.affine @ np.array([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    shifted.meta["path"] = str(nifti)
    with pytest.raises(DicomSegError) as exc:
        write_dicom_seg(shifted, folder, NAMES, tmp_path / "x.dcm")
    msg = one_line(exc)
    assert str(nifti) in msg and str(folder) in msg and "does not match" in msg and "voxels off" in msg
    short = tmp_path / "short.nii.gz"  # one slice fewer than the series
    write_nifti(Volume(vol.array[..., :-1], vol.affine), short)
    with pytest.raises(DicomSegError) as exc:
        write_dicom_seg(short, folder, NAMES, tmp_path / "x.dcm")
    assert str(short) in one_line(exc) and "6 slices" in one_line(exc)
    with pytest.raises(DicomSegError) as exc:
        write_dicom_seg(nifti, folder, ["background", "spleen"], tmp_path / "x.dcm")
    assert "label value(s) [2] have no name" in one_line(exc)
    with pytest.raises(DicomSegError) as exc:
        write_dicom_seg(nifti, folder, ["background"], tmp_path / "x.dcm")
    assert "no foreground label" in one_line(exc)
    with pytest.raises(DicomSegError) as exc:
        write_dicom_seg(nifti, folder, "spleen", tmp_path / "x.dcm", algorithm_name="spleen-net")
    assert str(nifti) in one_line(exc) and "model spleen-net" in one_line(exc)
    not_dicom = tmp_path / "nifti_only"
    not_dicom.mkdir()
    shutil.copy(nifti, not_dicom / "x.nii.gz")
    with pytest.raises(DicomSegError) as exc:
        write_dicom_seg(nifti, not_dicom, NAMES, tmp_path / "x.dcm")
    assert "no DICOM image series found" in one_line(exc)
    assert not (tmp_path / "x.dcm").exists()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian's dicom3tools) is not installed")
@pytest.mark.parametrize("kind", list(GEOMETRIES))
def test_seg_passes_dciodvfy(series, kind, tmp_path):
    """David Clunie's DICOM validator (dicom3tools, independent of highdicom and pydicom) checks the SEG against the
    Segmentation IOD: no errors. (Its warnings are about attributes a DICOMDIR would need that the test series
    lacks, such as StudyDate; a real source series has them and highdicom copies them.)"""
    folder, uid, nifti = series[kind]
    out = write_dicom_seg(nifti, folder, NAMES, tmp_path / "seg.dcm", series_id=uid)
    run = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=60)
    report = (run.stdout + run.stderr).splitlines()
    assert "Segmentation" in report, report  # the IOD it recognised
    errors = [line for line in report if line.startswith(("Error", "Abort"))]
    assert errors == [], errors
