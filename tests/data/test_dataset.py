"""StoreDataset (volfm.data.dataset): split/status filtering, memory-mapped arrays, metadata, pad values, errors."""
import csv
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from volfm.data.dataset import StoreDataset
from volfm.preprocess.spec import validate_spec
from volfm.store.build import run_cohort
from volfm.store.cohort import parse_icd_codes
from volfm.store.layout import CohortStore, StoreError, write_case_dir
from volfm.synth.ct import make_ct_cohort

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_slurm_array(monkeypatch):
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """5 synthetic CT cases through a small ct_merlin: ct_0002 (the only 'val' case) has a truncated image
    and fails; ct_0004 ('test') has no label; ct_0000/ct_0001 get hand-written ICD cells."""
    d = tmp_path_factory.mktemp("ds")
    table = make_ct_cohort(d / "cohort", 5, seed=0, shape=(48, 48, 24), progress=False)
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["split"] for r in rows] == ["train", "train", "val", "train", "test"]
    rows[0]["icd_codes"] = " K76.0 ; ;I10;"
    rows[1]["icd_codes"] = ""
    rows[4]["label"] = ""
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    bad = d / "cohort" / rows[2]["image"]
    bad.write_bytes(bad.read_bytes()[:300])
    spec = yaml.safe_load((REPO / "preprocessing" / "ct_merlin.yaml").read_text())
    spec["spacing"], spec["crop"] = [4.0, 4.0, 6.0], None
    (d / "spec.yaml").write_text(yaml.safe_dump(spec))
    summary = run_cohort(d / "spec.yaml", d / "store", cohort=table, progress=False, qc=False, log=lambda *a: None)
    assert summary["ok"] == 4 and [c for c, _ in summary["failures"]] == ["ct_0002"]
    return d / "store"


@pytest.fixture
def store_copy(store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(store, dst)
    return dst


# ------------------------------------------------------------------------------------------- selection
def test_only_ok_cases_of_the_requested_splits(store):
    ds = StoreDataset(store)
    assert ds.case_ids == ["ct_0000", "ct_0001", "ct_0003", "ct_0004"]  # the failed ct_0002 is left out
    assert len(ds) == 4
    assert StoreDataset(store, split="train").case_ids == ["ct_0000", "ct_0001", "ct_0003"]
    assert StoreDataset(store, split=["test", "train"], label=None).case_ids == ["ct_0000", "ct_0001", "ct_0003",
                                                                                 "ct_0004"]
    assert StoreDataset(CohortStore(store), split="test").case_ids == ["ct_0004"]
    # picklable (DataLoader workers started with spawn receive a copy)
    again = pickle.loads(pickle.dumps(ds))
    assert again.case_ids == ds.case_ids and again[0]["case_id"] == "ct_0000"


def test_items_are_memory_mapped_arrays_with_metadata(store):
    ds = StoreDataset(store, split="train")
    rows = {r["case_id"]: r for r in CohortStore(store).rows}
    item = ds[0]
    assert item["case_id"] == "ct_0000"
    img, lab = item["image"], item["label"]
    assert isinstance(img, np.memmap) and isinstance(lab, np.memmap)
    shape = tuple(int(x) for x in rows["ct_0000"]["shape"].split("x"))
    assert img.shape == (1, *shape) and lab.shape == (1, *shape)
    assert img.dtype == np.float32 and lab.dtype == np.uint8
    np.testing.assert_array_equal(img, np.load(store / "cases" / "ct_0000" / "image.npy"))
    assert lab.max() > 0
    assert item["report"] == rows["ct_0000"]["report"] and item["report"].startswith("TECHNIQUE")
    assert item["meta"]["case_id"] == "ct_0000"
    assert np.asarray(item["meta"]["affine"]).shape == (4, 4)
    assert item["meta"]["spacing"] == pytest.approx([4.0, 4.0, 6.0])
    assert item["row"]["split"] == "train" and item["row"]["status"] == "ok"
    assert item["pad_values"] == {"image": 0.0, "label": 0}
    assert ds[-1]["case_id"] == "ct_0003"
    with pytest.raises(IndexError):
        ds[3]
    loaded = StoreDataset(store, split="train", mmap=False)[0]["image"]
    assert not isinstance(loaded, np.memmap) and loaded.flags.writeable
    # several arrays and no label
    nolab = StoreDataset(store, arrays=("image",), label=None, columns=())[1]
    assert "label" not in nolab and "icd_codes" not in nolab and "report" not in nolab


def test_icd_codes_and_report_columns(store):
    ds = StoreDataset(store, label=None, columns=["icd_codes", "report", "sex", "findings"])
    by_id = {ds.case_ids[i]: ds[i] for i in range(len(ds))}
    assert by_id["ct_0000"]["icd_codes"] == ["K76.0", "I10"]
    assert by_id["ct_0001"]["icd_codes"] == []
    codes = by_id["ct_0003"]["icd_codes"]
    assert codes and all(isinstance(c, str) and c == c.strip() and c for c in codes)
    assert by_id["ct_0003"]["sex"] in ("F", "M")
    assert isinstance(by_id["ct_0003"]["findings"], str)
    assert parse_icd_codes(None) == [] and parse_icd_codes(" ;  ") == []
    assert parse_icd_codes("R16.0;R16.1") == ["R16.0", "R16.1"]
    # default columns: icd_codes and report
    assert StoreDataset(store).columns == ("icd_codes", "report")


# ------------------------------------------------------------------------------------------- pad values
def test_pad_value_of_the_real_store(store):
    ds = StoreDataset(store)
    assert ds.pad_value("image") == 0.0  # fill -1000 HU -> out_min of the window
    assert ds.pad_value("label") == 0
    with pytest.raises(StoreError, match="no input 'pet'"):
        ds.pad_value("pet")


def _direct_store(root: Path, inputs: dict, shape=(6, 5, 4)) -> Path:
    """A store written by hand: the given spec inputs, one ok case 'a' holding every input."""
    raw = {"name": "hand", "spacing": [2.0, 2.0, 2.0], "inputs": inputs}
    spec = validate_spec(raw, "hand")
    (root / "cases").mkdir(parents=True)
    arrays = {n: (np.zeros((1, *shape), np.uint8) if c["kind"] == "label" else np.ones((1, *shape), np.float32))
              for n, c in spec["inputs"].items()}
    write_case_dir(root / "cases", "a", arrays, {"affine": np.eye(4).tolist(), "spacing": [2.0, 2.0, 2.0]})
    (root / "spec.yaml").write_text(yaml.safe_dump({"spec": spec, "spec_hash": "x", "volfm_version": "0"}))
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "status", "error", "split"])
        w.writeheader()
        w.writerow({"case_id": "a", "status": "ok", "error": "", "split": "train"})
    return root


def test_pad_value_from_each_intensity_kind(tmp_path):
    root = _direct_store(tmp_path / "s", {
        "ct": {"kind": "image", "fill": -1000, "intensity": {"type": "ct_window", "hu_min": -1000, "hu_max": 1000,
                                                             "out_min": -1.0, "out_max": 1.0}},
        "water": {"kind": "image", "fill": 0, "intensity": {"type": "ct_window", "hu_min": -1000, "hu_max": 1000}},
        "ctmin": {"kind": "image", "intensity": {"type": "ct_window", "out_min": 0.25, "out_max": 1.0}},
        "mri": {"kind": "image", "fill": 0, "intensity": {"type": "mri_zscore", "background": -3.0}},
        "mri2": {"kind": "image", "fill": 0, "intensity": {"type": "mri_zscore"}},
        "pet": {"kind": "image", "fill": 0, "intensity": {"type": "pet", "factor": 2.0}},
        "raw": {"kind": "image", "fill": 5},
        "rawmin": {"kind": "image"},
        "seg": {"kind": "label"},
    })
    with pytest.warns(UserWarning, match="no icd_codes or report column"):
        ds = StoreDataset(root, arrays=("ct", "mri"), label="seg")
    assert ds[0]["icd_codes"] == [] and ds[0]["report"] == ""
    assert ds.pad_value("ct") == -1.0
    assert ds.pad_value("water") == pytest.approx(0.5)
    assert ds.pad_value("ctmin") == 0.25
    assert ds.pad_value("mri") == -3.0
    assert ds.pad_value("mri2") == 0.0
    assert ds.pad_value("pet") == 0.0
    assert ds.pad_value("raw") == 5.0
    assert ds.pad_value("rawmin") == 0.0
    assert ds.pad_value("seg") == 0
    assert ds[0]["pad_values"] == {"ct": -1.0, "mri": -3.0, "seg": 0}


# ------------------------------------------------------------------------------------------- errors
def test_missing_array_names_case_file_and_fix(store_copy):
    (store_copy / "cases" / "ct_0001" / "label.npy").unlink()
    ds = StoreDataset(store_copy, split="train")
    ds[0]
    with pytest.raises(StoreError) as e:
        ds[1]
    msg = str(e.value)
    assert "ct_0001" in msg and "label.npy" in msg and "volfm preprocess" in msg and "redone" in msg


def test_case_folder_missing(store_copy):
    shutil.rmtree(store_copy / "cases" / "ct_0003")
    ds = StoreDataset(store_copy, split="train")
    with pytest.raises(StoreError, match=r"ct_0003.*folder is missing.*volfm preprocess"):
        ds[2]


def test_case_without_label_in_the_table(store):
    ds = StoreDataset(store, split="test")
    with pytest.raises(StoreError) as e:
        ds[0]
    msg = str(e.value)
    assert "ct_0004" in msg and "label" in msg and "label=None" in msg
    assert StoreDataset(store, split="test", label=None)[0]["image"].ndim == 4


def test_corrupt_npy_names_the_case(store_copy):
    p = store_copy / "cases" / "ct_0003" / "image.npy"
    p.write_bytes(p.read_bytes()[:1000])
    ds = StoreDataset(store_copy)
    with pytest.raises(StoreError) as e:
        ds[ds.case_ids.index("ct_0003")]
    msg = str(e.value)
    assert "ct_0003" in msg and "image.npy" in msg and "corrupt" in msg and "volfm preprocess" in msg
    with pytest.raises(StoreError, match="ct_0003"):
        StoreDataset(store_copy, mmap=False)[ds.case_ids.index("ct_0003")]


def test_empty_split_lists_the_splits_present(store):
    with pytest.raises(StoreError) as e:
        StoreDataset(store, split="val")  # its only case failed
    msg = str(e.value)
    assert str(store) in msg and "val" in msg and "train: 3" in msg and "test: 1" in msg and "failed cases: 1" in msg
    with pytest.raises(StoreError, match="train: 3"):
        StoreDataset(store, split=["validation"])


def test_bad_names_and_columns(store, tmp_path):
    with pytest.raises(StoreError, match=r"no input\(s\) 'mri'.*image, label"):
        StoreDataset(store, arrays=("mri",))
    with pytest.raises(StoreError, match="not a label"):
        StoreDataset(store, arrays=(), label="image")
    with pytest.raises(StoreError, match="given twice"):
        StoreDataset(store, arrays=("image", "label"))
    with pytest.raises(StoreError, match=r"no column\(s\) diagnosis"):
        StoreDataset(store, columns=("report", "diagnosis"))
    with pytest.raises(StoreError, match="not a volfm store"):
        StoreDataset(tmp_path)
