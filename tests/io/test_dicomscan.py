"""volfm.io.dicomscan: series discovery in a DICOM tree built in code (DICOMDIR part + nested folders)."""
from __future__ import annotations

import hashlib

import pytest

from volfm.io.dicomscan import HEADER_TAGS, SERIES_COLUMNS, ScanError, find_dicom_files, orientation_name, scan_tree
from volfm.testing import write_study_tree


def by_description(rows):
    return {r["series_description"] or r["modality"]: r for r in rows}


def test_scan_matches_the_built_tree(dicom_study_tree):
    root, uids = dicom_study_tree
    rows, problems = scan_tree(root)
    assert problems == []
    assert all(list(r) == list(SERIES_COLUMNS) for r in rows)
    got = by_description(rows)
    assert set(got) == {"loc", "thin_sharp", "thin_soft", "thick", "gap", "coronal", "derived", "ok", "SR", "mixed"}
    assert {r["series_uid"] for r in rows} == {v for k, v in uids.items() if not k.startswith("study_")}
    assert {k: got[k]["slice_count"] for k in got} == {"loc": 1, "thin_sharp": 12, "thin_soft": 12, "thick": 4,
                                                       "gap": 7, "coronal": 6, "derived": 6, "ok": 6, "SR": 1,
                                                       "mixed": 5}
    usable = {k for k, r in got.items() if r["usable"]}
    assert usable == {"thin_sharp", "thin_soft", "thick", "coronal", "derived", "ok"}
    assert all(r["reason"] == "" for k, r in got.items() if k in usable)
    assert got["loc"]["reason"] == "localizer; single slice" and got["loc"]["localizer"]
    assert got["gap"]["reason"].startswith("missing slices (1 gap(s) of up to 4 mm")
    assert got["SR"]["reason"] == "non-image SOP class (Comprehensive SR Storage)"
    assert got["mixed"]["reason"] == "mixed orientations" and got["mixed"]["orientation"] == "mixed"
    # geometry and description columns
    assert got["thin_soft"]["spacing_between_slices"] == 1.0 and got["ok"]["spacing_between_slices"] == 2.5
    assert got["ok"]["slice_thickness"] == 2.5 and got["gap"]["spacing_between_slices"] == 2.0
    assert {k: got[k]["orientation"] for k in ("loc", "thick", "coronal")} == {
        "loc": "coronal", "thick": "axial", "coronal": "coronal"}
    assert got["thin_soft"]["contrast"] and not got["thin_sharp"]["contrast"]
    assert got["thin_sharp"]["kernel"] == "B70f" and got["ok"]["kernel"] == "STANDARD"
    assert got["derived"]["image_type"] == "DERIVED\\SECONDARY\\AXIAL" and not got["derived"]["original"]
    assert got["ok"]["acquisition_date"] == "20240102" and got["ok"]["modality"] == "CT"
    # the DICOMDIR part keeps pydicom's FileSet layout; the rest its nested folders
    assert got["thin_soft"]["folder"].startswith("cdrom/PT000000/ST000000/SE")
    assert got["ok"]["folder"] == "P002/20240102/series/ok/deeper"
    assert {r["study_uid"] for r in rows} == {uids["study_a"], uids["study_b"], uids["study_c"]}
    assert {r["patient_id"] for r in rows} == {"P001", "P002", "P003"}
    assert all(r["folder_series"] == 1 for r in rows)
    assert "Doe" not in repr(rows) and "19700101" not in repr(rows)


def test_hashed_ids_are_sha256_prefixes(dicom_study_tree):
    root, uids = dicom_study_tree
    rows, _ = scan_tree(root, hash_uids=True)
    text = repr(rows)
    assert not any(u in text for u in uids.values()) and "P001" not in text
    assert hashlib.sha256(uids["ok"].encode()).hexdigest()[:16] in {r["series_uid"] for r in rows}
    assert hashlib.sha256(b"P002").hexdigest()[:16] in {r["patient_id"] for r in rows}


def test_identifying_tags_are_never_read():
    for tag in ("PatientName", "PatientBirthDate", "PatientSex", "PatientAddress", "AccessionNumber",
                "InstitutionName", "ReferringPhysicianName", "OtherPatientIDs"):
        assert tag not in HEADER_TAGS


def test_dicomdir_lists_files_and_reports_missing_ones(tmp_path):
    root = tmp_path / "root"
    write_study_tree(root, tmp_path / "staging")
    listed = [f for f in find_dicom_files(root) if "cdrom" in f.parts]
    victim = sorted(f for f in listed if f.name != "DICOMDIR")[-1]
    victim.unlink()
    problems: list[str] = []
    find_dicom_files(root, problems)
    assert len(problems) == 1 and "1 file(s) listed in the DICOMDIR are missing on disk" in problems[0]
    rows, problems = scan_tree(root)
    assert len(problems) == 1 and len(rows) == 10


def test_orientation_names():
    assert orientation_name([1, 0, 0, 0, 1, 0]) == "axial"
    assert orientation_name([1, 0, 0, 0, 0, -1]) == "coronal"
    assert orientation_name([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert orientation_name([1, 0, 0, 0, 0.9, 0.4358899]) == "oblique"  # 25.8 degrees off axial


def test_no_dicom_is_one_error(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ScanError, match="no DICOM files"):
        scan_tree(tmp_path)
    with pytest.raises(ScanError, match="not a folder"):
        scan_tree(tmp_path / "a.txt")


@pytest.mark.parametrize("dates, want", [("full", "20240102"), ("year", "2024"), ("none", "")])
def test_dates_are_full_year_or_none(dicom_study_tree, dates, want):
    root, _ = dicom_study_tree
    rows, _ = scan_tree(root, dates=dates)
    assert {r["acquisition_date"] for r in rows if r["modality"] == "CT"} == {want}
    if dates != "full":
        assert "20240102" not in repr([{k: v for k, v in r.items() if k != "folder"} for r in rows])


def test_bad_dates_choice_is_one_error(dicom_study_tree):
    with pytest.raises(ScanError, match=r"dates='month': expected one of full, year, none"):
        scan_tree(dicom_study_tree[0], dates="month")
