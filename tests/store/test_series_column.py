"""The cohort's series column (`<input>_series_uid`): one series out of a folder that holds several, by raw UID or by
its `--hash-uids` hash, through volfm scan -> volfm preprocess; a hashed table leaves no raw UID in the store."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from volfm import VolfmError
from volfm.cli.main import main
from volfm.configs import SPECS_DIR
from volfm.io import Volume, VolumeReadError, read_volume, write_nifti
from volfm.io.dicomscan import hash_id, scan_tree
from volfm.io.readers import GeometryWarning
from volfm.preprocess.pipeline import Pipeline
from volfm.preprocess.spec import validate_spec
from volfm.store.arrays import case_is_current
from volfm.store.build import process_case
from volfm.store.cohort import CohortError, load_cohort
from volfm.store.selection import COHORT_COLUMNS, cohort_rows, load_rules, select_series, series_column
from volfm.testing import write_shared_folder_study

RULES = {"modality": "CT", "orientation": "axial", "max_slice_thickness": 3}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared") / "root"
    uids = write_shared_folder_study(root / "export" / "s1")
    return root, uids


@pytest.fixture(scope="module")
def spec():
    raw = yaml.safe_load((SPECS_DIR / "ct_merlin.yaml").read_text())
    raw.update(spacing=[2.0, 2.0, 2.0], crop={"size": [4, 4, 4], "mode": "center"})
    return raw


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_series_column_is_named_after_the_input():
    assert series_column("image") == "image_series_uid" and series_column("pet") == "pet_series_uid"
    assert "image_series_uid" in COHORT_COLUMNS and "series_uid" not in COHORT_COLUMNS


def test_shared_folder_series_are_usable_and_named_in_the_cohort(tree):
    root, uids = tree
    rows, problems = scan_tree(root)
    assert problems == [] and len(rows) == 2
    assert all(r["usable"] and r["folder_series"] == 2 and r["folder"] == "export/s1" for r in rows)
    rules = load_rules(overrides=RULES)
    chosen, unmatched = select_series(rows, rules)
    assert unmatched == [] and [r["series_uid"] for r in chosen] == [uids["thin"]]  # the thinnest wins
    cohort = cohort_rows(chosen, root, rules)
    assert cohort[0]["image_series_uid"] == uids["thin"] and cohort[0]["image"] == str(root / "export" / "s1")


def test_reader_takes_a_raw_or_hashed_series_id(tree):
    root, uids = tree
    folder = root / "export" / "s1"
    thick = read_volume(folder, series_id=uids["thick"])
    assert thick.shape == (4, 4, 4) and thick.meta["series_id"] == uids["thick"]
    hashed = read_volume(folder, series_id=hash_id(uids["thick"]).upper())  # case does not matter
    assert hashed.shape == (4, 4, 4) and hashed.meta["series_id"] == hash_id(uids["thick"])
    np.testing.assert_array_equal(hashed.array, thick.array)
    assert read_volume(folder, series_id=hash_id(uids["thin"])).shape == (4, 4, 10)
    with pytest.raises(VolumeReadError) as info:
        read_volume(folder, series_id="0123456789abcdef")
    msg = str(info.value)
    assert "no DICOM series here hashes to 0123456789abcdef" in msg and hash_id(uids["thin"]) in msg
    assert uids["thin"] not in msg and uids["thick"] not in msg and "\n" not in msg  # misses listed hashed


def test_pipeline_reads_the_named_series_and_records_it_as_given(tree, spec):
    root, uids = tree
    folder = str(root / "export" / "s1")
    pipe = Pipeline(spec)
    case = pipe({"image": folder}, case_id="c1", series={"image": hash_id(uids["thick"])}, hash_sources=False)
    assert case.meta["source"]["image"]["series_id"] == hash_id(uids["thick"])
    assert case.meta["source"]["image"]["shape"] == [4, 4, 4]
    assert uids["thick"] not in json.dumps(case.meta)
    case = pipe({"image": folder}, case_id="c1", series={"image": uids["thin"]}, hash_sources=False)
    assert case.meta["source"]["image"]["series_id"] == uids["thin"] and case.meta["source"]["image"]["shape"] == [
        4, 4, 10]
    with pytest.warns(GeometryWarning, match="2 DICOM series found; reading the largest"):  # an empty cell
        case = pipe({"image": folder}, case_id="c1", series={"image": " "}, hash_sources=False)
    assert case.meta["source"]["image"]["series_id"] == uids["thin"]


def test_series_cell_on_a_nifti_input_fails_the_case_in_one_line(tmp_path, spec):
    nii = tmp_path / "ct.nii.gz"
    write_nifti(Volume(np.zeros((1, 4, 4, 4), np.float32), np.eye(4)), nii)
    row = {"case_id": "n1", "image": str(nii), "image_series_uid": "1.2.3"}
    res = process_case(validate_spec(spec), row, str(tmp_path / "store"), write_qc=False)
    assert res["status"] == "failed" and "\n" not in res["error"]
    assert res["error"].startswith("case n1: a DICOM series (1.2.3) is named for input 'image'")
    assert "image_series_uid" in res["error"]
    with pytest.raises(VolfmError, match="case v1: .* is an image already read"):
        Pipeline(spec)({"image": Volume(np.zeros((1, 4, 4, 4), np.float32), np.eye(4))}, case_id="v1",
                       series={"image": "1.2.3"})


def test_hashed_scan_to_store_keeps_raw_uids_out_of_every_byte(tree, spec, tmp_path, capsys):
    root, uids = tree
    series, cohort = tmp_path / "series.csv", tmp_path / "cohort.csv"
    assert main(["scan", str(root), "--out", str(series), "--cohort", str(cohort), "--hash-uids", "--modality", "CT",
                 "--max-thickness", "3"]) == 0
    table = read_csv(cohort)
    assert len(table) == 1 and table[0]["image_series_uid"] == hash_id(uids["thin"])
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    store = tmp_path / "store"
    assert main(["preprocess", "--spec", str(tmp_path / "spec.yaml"), "--cohort", str(cohort), "--out", str(store),
                 "--quiet"]) == 0
    capsys.readouterr()
    manifest = read_csv(store / "manifest.csv")
    assert [r["status"] for r in manifest] == ["ok"] and manifest[0]["warnings"] == ""  # no "2 DICOM series" note
    meta = json.loads((store / "cases" / table[0]["case_id"] / "meta.json").read_text())
    assert meta["source"]["image"]["series_id"] == hash_id(uids["thin"])
    assert meta["source"]["image"]["series_requested"] == hash_id(uids["thin"])
    assert meta["source"]["image"]["shape"] == [4, 4, 10]  # the thin series, not the folder's other one
    assert meta["table"]["image_series_uid"] == hash_id(uids["thin"])
    written = [series, cohort, *(f for f in store.rglob("*") if f.is_file())]
    assert any(f.suffix == ".png" for f in written) and any(f.name == "meta.json" for f in written)
    for f in written:
        data = f.read_bytes()
        for uid in (uids["study"], uids["thin"], uids["thick"], "P010", "Doe", "19700101"):
            assert uid.encode() not in data, (f, uid)


def test_rerun_redoes_a_case_whose_series_cell_changed(tree, spec, tmp_path, capsys):
    """A folder has no size or mtime to compare: the series cell itself decides whether a stored case is current."""
    root, uids = tree
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    cohort, store = tmp_path / "cohort.csv", tmp_path / "store"

    def run(series_uid):
        """One preprocess run of a one-row table; ``series_uid=None``: a table without the series column."""
        if series_uid is None:
            cohort.write_text(f"case_id,image\nc1,{root / 'export' / 's1'}\n")
        else:
            cohort.write_text(f"case_id,image,image_series_uid\nc1,{root / 'export' / 's1'},{series_uid}\n")
        assert main(["preprocess", "--spec", str(tmp_path / "spec.yaml"), "--cohort", str(cohort), "--out",
                     str(store), "--quiet"]) == 0
        capsys.readouterr()
        return json.loads((store / "cases" / "c1" / "meta.json").read_text())

    first = run(uids["thin"])
    assert first["source"]["image"]["shape"] == [4, 4, 10]
    assert first["source"]["image"]["series_requested"] == uids["thin"]
    assert run(uids["thin"])["written_at"] == first["written_at"]  # same series: skipped as done
    second = run(hash_id(uids["thick"]))  # the other series of the same folder: redone, not skipped
    assert second["written_at"] > first["written_at"] and second["source"]["image"]["shape"] == [4, 4, 4]
    assert run(hash_id(uids["thick"]).upper())["written_at"] == second["written_at"]  # a hash in capitals: the same
    # the cell emptied: the folder's largest series (the thin one) is what the row now asks for, so the case is redone
    cleared = run("")
    assert cleared["written_at"] > second["written_at"] and cleared["source"]["image"]["shape"] == [4, 4, 10]
    assert cleared["source"]["image"]["series_requested"] == ""
    assert run("")["written_at"] == cleared["written_at"]  # still empty: done
    assert run(None)["written_at"] == cleared["written_at"]  # no column is an empty cell
    third = run(hash_id(uids["thick"]))
    assert third["written_at"] > cleared["written_at"] and third["source"]["image"]["shape"] == [4, 4, 4]
    dropped = run(None)  # the column dropped: the largest series again, redone
    assert dropped["written_at"] > third["written_at"] and dropped["source"]["image"]["shape"] == [4, 4, 10]


def test_mistyped_series_column_fails_the_table_before_anything_is_written(tree, spec, tmp_path, capsys):
    """imag_series_uid would be ignored and the folder's largest series read: the table is refused in one line."""
    root, uids = tree
    spec = {**spec, "inputs": {"image": {"kind": "image"}, "label": {"kind": "label", "required": False}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    cohort, store = tmp_path / "cohort.csv", tmp_path / "store"
    cohort.write_text(f"case_id,image,label,imag_series_uid\nc1,{root / 'export' / 's1'},,{uids['thick']}\n")
    assert main(["preprocess", "--spec", str(tmp_path / "spec.yaml"), "--cohort", str(cohort), "--out", str(store),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{cohort}: column 'imag_series_uid'" in err, err
    assert "(inputs: image, label)" in err and "did you mean 'image_series_uid'?" in err
    assert not store.exists()
    cohort.write_text(f"case_id,image,Image_series_uid\nc1,{root / 'export' / 's1'},{uids['thick']}\n")
    with pytest.raises(CohortError, match="column 'Image_series_uid' names the DICOM series of no input of spec "
                                          ".*did you mean 'image_series_uid'"):
        load_cohort(cohort, validate_spec(spec))
    # the series of an input column the spec does not use (a PET beside the CT) is metadata, as that column is
    cohort.write_text(f"case_id,image,pet,pet_series_uid\nc1,{root / 'export' / 's1'},{root},{uids['thick']}\n")
    assert [r["pet_series_uid"] for r in load_cohort(cohort, validate_spec(spec))] == [uids["thick"]]


def test_meta_without_series_requested_keeps_the_older_rule():
    """meta.json written before volfm recorded ``series_requested``: only a set cell is compared, with series_id."""
    meta = {"spec_hash": "h", "source": {"image": {"path": "/d/s1", "series_id": "ABC"}}}
    row = {"case_id": "c1", "image": "/d/s1", "image_series_uid": "abc"}
    assert case_is_current(meta, row, ["image"], "h", None)
    assert not case_is_current(meta, {**row, "image_series_uid": "other"}, ["image"], "h", None)
    assert case_is_current(meta, {**row, "image_series_uid": ""}, ["image"], "h", None)
    assert case_is_current(meta, {"case_id": "c1", "image": "/d/s1"}, ["image"], "h", None)
    meta["source"]["image"]["series_requested"] = "abc"  # written now: an emptied cell is a change
    assert case_is_current(meta, row, ["image"], "h", None)
    assert not case_is_current(meta, {**row, "image_series_uid": ""}, ["image"], "h", None)
