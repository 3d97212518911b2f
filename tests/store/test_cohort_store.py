"""Cohort tables (volfm.store.cohort) and read access to a store (volfm.store.layout.CohortStore)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from volfm.io import Volume, write_nifti
from volfm.preprocess.spec import validate_spec
from volfm.store.build import run_cohort
from volfm.store.cohort import CohortError, load_cohort, read_table, table_from_dir, write_table
from volfm.store.layout import CohortStore, StoreError, read_case_meta, write_case_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_slurm_array(monkeypatch):
    """Tests run inside a SLURM array job must not be sharded by its environment."""
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)


def small_spec() -> dict:
    spec = yaml.safe_load((REPO / "preprocessing" / "ct_merlin.yaml").read_text())
    spec["crop"]["size"] = [24, 24, 12]
    spec["spacing"] = [4.0, 4.0, 8.0]
    return spec


def make_ct(seed, shape=(40, 40, 16), sp=(2.0, 2.0, 5.0)):
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = np.array(shape) / 2
    r = (((ii - c[0]) * sp[0]) / 25) ** 2 + (((jj - c[1]) * sp[1]) / 20) ** 2 + (((kk - c[2]) * sp[2]) / 30) ** 2
    img = np.where(r < 1, 40.0, -1000.0) + rng.normal(0, 10, shape)
    aff = np.diag([*sp, 1.0])
    return Volume(img[None].astype(np.float32), aff), Volume((r < 0.3).astype(np.uint8)[None], aff)


def write_rows(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return Path(path)


@pytest.fixture(scope="module")
def spec():
    return validate_spec(small_spec(), "small_spec")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    (d / "img").mkdir()
    (d / "reports").mkdir()
    for i in range(2):
        img, lab = make_ct(i)
        write_nifti(img, d / "img" / f"c{i}.nii.gz", dtype=np.int16)
        write_nifti(lab, d / "img" / f"c{i}_seg.nii.gz")
    (d / "reports" / "c0.txt").write_text("  CT abdomen: no acute findings.\nLiver normal.\n")
    return d


# ----------------------------------------------------------------------------------- load_cohort
def test_relative_paths_resolve_against_the_table_folder(data_dir, spec, monkeypatch, tmp_path):
    rows = [{"case_id": "c0", "image": "img/c0.nii.gz", "label": "img/c0_seg.nii.gz", "report": "reports/c0.txt",
             "icd_codes": "K76.0;I10", "split": "train", "site": "A"},
            {"case_id": "c1", "image": str(data_dir / "img" / "c1.nii.gz"), "label": "", "report": "Inline report.",
             "icd_codes": "", "split": "val", "site": "B"}]
    write_rows(data_dir / "cohort.csv", rows)
    monkeypatch.chdir(tmp_path)  # somewhere else, with a relative path to the table
    rel_table = Path("..") / data_dir.name / "cohort.csv"
    assert (tmp_path / rel_table).exists()
    out = load_cohort(rel_table, spec)
    assert [r["case_id"] for r in out] == ["c0", "c1"]
    for r in out:
        assert Path(r["image"]).is_absolute() and Path(r["image"]).exists()
    assert Path(out[0]["image"]).resolve() == (data_dir / "img" / "c0.nii.gz").resolve()
    assert Path(out[0]["label"]).resolve() == (data_dir / "img" / "c0_seg.nii.gz").resolve()
    assert out[1]["image"] == str(data_dir / "img" / "c1.nii.gz")
    assert out[1]["label"] == ""
    assert out[0]["report"] == "CT abdomen: no acute findings.\nLiver normal."  # .txt path -> its text
    assert out[1]["report"] == "Inline report."
    assert out[0]["icd_codes"] == "K76.0;I10" and out[0]["split"] == "train" and out[0]["site"] == "A"


def test_report_txt_that_does_not_exist_stays_as_is(data_dir, spec, tmp_path):
    rows = [{"case_id": "c0", "image": str(data_dir / "img" / "c0.nii.gz"), "report": "missing.txt"}]
    out = load_cohort(write_rows(tmp_path / "t.csv", rows), spec)
    assert out[0]["report"] == "missing.txt"


def test_tsv_table_with_bom_and_commas(data_dir, spec, tmp_path):
    rows = [{"case_id": "c0", "image": "img/c0.nii.gz", "report": "Findings: liver, spleen, kidneys normal.",
             "split": "test"}]
    table = data_dir / "cohort.tsv"
    write_rows(table, rows, delimiter="\t")
    table.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())  # Excel's UTF-8 BOM
    out = load_cohort(table, spec)
    assert list(out[0]) == ["case_id", "image", "report", "split"]
    assert out[0]["report"] == "Findings: liver, spleen, kidneys normal."
    assert Path(out[0]["image"]) == data_dir / "img" / "c0.nii.gz"
    write_table(tmp_path / "copy.tsv", out)
    assert read_table(tmp_path / "copy.tsv") == out


@pytest.mark.parametrize("content, match", [
    (b"", "has no rows"),
    (b"case_id,image\n", "has no rows"),
    (b"id,image\na,x.nii.gz\n", "no 'case_id' column"),
    (b"case_id,label\na,x.nii.gz\n", r"column\(s\) image required by spec 'ct_merlin'"),
    (b"case_id,image\na,x.nii.gz\na,y.nii.gz\n", "duplicate case_id 'a' on rows 2 and 3"),
    (b"case_id,image\n,x.nii.gz\n", "row 2 has an empty case_id"),
    (b"case_id,image\na/b,x.nii.gz\n", "case_id 'a/b' must be"),
    (b"case_id,image,report\na,x.nii.gz,one, two\n", "row 2 .*has 4 cells but the header has 3"),
    (b"case_id,image\na,\xff\xfe.nii.gz\n", "not a UTF-8 text table"),
])
def test_table_level_errors_name_the_table(spec, tmp_path, content, match):
    table = tmp_path / "bad.csv"
    table.write_bytes(content)
    with pytest.raises(CohortError, match=match) as info:
        load_cohort(table, spec)
    assert str(table) in str(info.value)


def test_trailing_empty_cells_are_tolerated(spec, tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("case_id,image\na,x.nii.gz,\n")
    assert load_cohort(table, spec)[0]["case_id"] == "a"


def test_table_from_dir_flat_and_nnunet(spec, tmp_path):
    flat = tmp_path / "flat"
    (flat / "labels").mkdir(parents=True)
    img, lab = make_ct(0)
    write_nifti(img, flat / "b.nii.gz")
    write_nifti(img, flat / "a.nii")
    write_nifti(lab, flat / "labels" / "b.nii.gz")
    (flat / "notes.txt").write_text("ignored")
    rows = table_from_dir(flat, spec)
    assert [r["case_id"] for r in rows] == ["a", "b"]
    assert "label" not in rows[0] and rows[1]["label"] == str(flat / "labels" / "b.nii.gz")
    with pytest.raises(CohortError, match="is not a folder"):
        table_from_dir(tmp_path / "does_not_exist", spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CohortError, match="no images found"):
        table_from_dir(tmp_path / "empty", spec)
    dup = tmp_path / "dup"
    dup.mkdir()
    write_nifti(img, dup / "x.nii.gz")
    write_nifti(img, dup / "x_0000.nii.gz")
    with pytest.raises(CohortError, match="same case id"):
        table_from_dir(dup, spec)


# ----------------------------------------------------------------------------------- CohortStore
@pytest.fixture(scope="module")
def store(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    spec_path = root / "spec_small.yaml"
    spec_path.write_text(yaml.safe_dump(small_spec()))
    rows = [{"case_id": "c0", "image": "img/c0.nii.gz", "label": "img/c0_seg.nii.gz", "split": "train"},
            {"case_id": "c1", "image": "img/c1.nii.gz", "label": "", "split": "val"},
            {"case_id": "gone", "image": "img/gone.nii.gz", "label": "", "split": "test"}]
    table = write_rows(data_dir / "store_table.csv", rows)
    summary = run_cohort(spec_path, root / "store", cohort=table, progress=False)
    assert summary["ok"] == 2 and summary["failed"] == 1
    return root / "store"


def test_store_reads_manifest_meta_and_arrays(store):
    s = CohortStore(store)
    assert [r["case_id"] for r in s.rows] == ["c0", "c1", "gone"]
    assert s.ok_ids == ["c0", "c1"]
    assert [r["case_id"] for r in s.failed] == ["gone"]
    assert "file not found" in s.failed[0]["error"]
    assert s.spec_doc["spec"]["name"] == "ct_merlin" and s.spec_doc["spec_hash"]
    m = s.meta("c0")
    assert m["case_id"] == "c0" and m["shape"] == [24, 24, 12] and m["spec_hash"] == s.spec_doc["spec_hash"]
    img = s.array("c0")
    assert isinstance(img, np.memmap) and img.dtype == np.float32 and img.shape == (1, 24, 24, 12)
    full = s.array("c0", "label", mmap=False)
    assert not isinstance(full, np.memmap) and full.dtype == np.uint8
    with pytest.raises(StoreError, match="missing array 'label' for case c1"):
        s.array("c1", "label")
    with pytest.raises(StoreError, match="case gone has no readable meta.json"):
        s.meta("gone")


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
def test_corrupt_npy_gives_a_store_error(store, tmp_path, damage):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(store, root)
    p = root / "cases" / "c0" / "image.npy"
    data = p.read_bytes()
    p.write_bytes({"garbage": b"\x00garbage bytes, not an npy file" * 20, "empty": b"",
                   "truncated": data[: len(data) // 3]}[damage])
    s = CohortStore(root)
    for mmap in (True, False):
        with pytest.raises(StoreError, match=r"corrupt array for case c0.*rerun volfm preprocess") as info:
            s.array("c0", mmap=mmap)
        assert str(p) in str(info.value)
    assert s.array("c1").shape == (1, 24, 24, 12)  # other cases are unaffected


def test_corrupt_meta_and_not_a_store(store, tmp_path):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(store, root)
    (root / "cases" / "c0" / "meta.json").write_text('{"case_id": "c0", "aff')
    assert read_case_meta(root / "cases" / "c0") is None
    with pytest.raises(StoreError, match="no readable meta.json"):
        CohortStore(root).meta("c0")
    (root / "spec.yaml").write_text("spec: [unclosed\n")
    with pytest.raises(StoreError, match="spec.yaml"):
        CohortStore(root)
    with pytest.raises(StoreError, match="not a volfm store"):
        CohortStore(tmp_path)
    (tmp_path / "manifests").mkdir()
    with pytest.raises(StoreError, match="--merge"):
        CohortStore(tmp_path)


def test_write_case_dir_replaces_atomically(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    a = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    write_case_dir(cases, "x", {"image": a}, {"case_id": "x", "v": 1})
    write_case_dir(cases, "x", {"image": a * 2}, {"case_id": "x", "v": 2})
    assert sorted(p.name for p in cases.iterdir()) == ["x"]
    assert sorted(p.name for p in (cases / "x").iterdir()) == ["image.npy", "meta.json"]
    np.testing.assert_array_equal(np.load(cases / "x" / "image.npy", mmap_mode="r"), a * 2)
    assert json.loads((cases / "x" / "meta.json").read_text())["v"] == 2
