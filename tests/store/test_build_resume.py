"""Resume semantics: a stored case is reused only when it still matches its inputs and the spec."""
import csv
import os
import time

import nibabel as nib
import numpy as np
import pytest
import yaml

from volfm.io import Volume, write_nifti
from volfm.store.build import run_cohort

SPEC = {"name": "tiny", "spacing": [4.0, 4.0, 6.0], "crop": {"size": [16, 16, 8], "mode": "center"},
        "inputs": {"image": {"kind": "image", "fill": -1000,
                             "intensity": {"type": "ct_window", "hu_min": -1000, "hu_max": 1000}},
                   "label": {"kind": "label", "required": False}}}


def _case(folder, name, seed, with_label=True):
    rng = np.random.default_rng(seed)
    aff = np.diag([2.0, 2.0, 5.0, 1.0])
    img = rng.integers(-1000, 1000, (1, 24, 24, 10)).astype(np.int16)
    write_nifti(Volume(img, aff), folder / f"{name}.nii.gz")
    if with_label:
        lab = np.zeros((1, 24, 24, 10), np.uint8)
        lab[0, 6:18, 6:18, 3:7] = 1
        write_nifti(Volume(lab, aff), folder / f"{name}_label.nii.gz")


def _table(path, rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture()
def cohort(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        _case(data, f"c{i}", i)
    _case(data, "other", 99)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    rows = [{"case_id": f"c{i}", "image": f"c{i}.nii.gz", "label": f"c{i}_label.nii.gz"} for i in range(3)]
    return tmp_path, data, spec, rows


def _run(spec, store, table, **kw):
    return run_cohort(spec, store, cohort=table, progress=False, qc=False, **kw)


def test_changed_input_path_is_redone(cohort):
    root, data, spec, rows = cohort
    store = root / "store"
    assert _run(spec, store, _table(data / "t1.csv", rows))["processed"] == 3
    rows[0]["image"] = "other.nii.gz"
    s = _run(spec, store, _table(data / "t2.csv", rows))
    assert (s["processed"], s["skipped"]) == (1, 2)
    meta = yaml.safe_load((store / "cases" / "c0" / "meta.json").read_text())
    assert meta["source"]["image"]["path"].endswith("other.nii.gz")


def test_added_label_column_is_redone(cohort):
    root, data, spec, rows = cohort
    store = root / "store"
    no_label = [{k: v for k, v in r.items() if k != "label"} for r in rows]
    _run(spec, store, _table(data / "t1.csv", no_label))
    assert not (store / "cases" / "c1" / "label.npy").exists()
    s = _run(spec, store, _table(data / "t2.csv", rows))
    assert s["processed"] == 3
    assert (store / "cases" / "c1" / "label.npy").exists()


def test_replaced_file_is_redone(cohort):
    root, data, spec, rows = cohort
    store = root / "store"
    table = _table(data / "t.csv", rows)
    _run(spec, store, table)
    time.sleep(0.01)
    _case(data, "c2", 1234)  # same path, new content
    s = _run(spec, store, table)
    assert (s["processed"], s["skipped"]) == (1, 2)


def test_interrupted_overwrite_is_finished_by_a_plain_rerun(cohort):
    root, data, spec, rows = cohort
    store = root / "store"
    table = _table(data / "t.csv", rows)
    _run(spec, store, table)
    # an --overwrite run that was killed right after writing spec.yaml: its marker is in place
    doc = yaml.safe_load((store / "spec.yaml").read_text())
    doc["redo_before"] = time.time() + 1.0
    (store / "spec.yaml").write_text(yaml.safe_dump(doc))
    time.sleep(1.1)
    s = _run(spec, store, table)
    assert s["processed"] == 3
    assert _run(spec, store, table)["skipped"] == 3


def test_geometry_warnings_are_recorded_with_workers(cohort):
    root, data, spec, rows = cohort
    img = nib.load(str(data / "c1.nii.gz"))
    q = img.affine.copy()
    q[:3, 3] += 5.0  # qform 5 mm away from the sform
    img.set_qform(q, code=1)
    nib.save(img, str(data / "c1.nii.gz"))
    store = root / "store"
    s = _run(spec, store, _table(data / "t.csv", rows), workers=2)
    assert s["ok"] == 3
    notes = dict(s["warnings"])
    assert "c1" in notes and "sform and qform disagree" in notes["c1"]
    with open(store / "manifest.csv", newline="") as f:
        manifest = {r["case_id"]: r for r in csv.DictReader(f)}
    assert "disagree" in manifest["c1"]["warnings"] and manifest["c0"]["warnings"] == ""
    meta = yaml.safe_load((store / "cases" / "c1" / "meta.json").read_text())
    assert any("disagree" in w for w in meta["warnings"])
    assert os.path.exists(store / "cases" / "c1" / "image.npy")


def test_deleted_array_is_redone(cohort):
    root, data, spec, rows = cohort
    store = root / "store"
    table = _table(data / "t.csv", rows)
    _run(spec, store, table)
    (store / "cases" / "c1" / "label.npy").unlink()
    s = _run(spec, store, table)
    assert (s["processed"], s["skipped"]) == (1, 2)
    assert (store / "cases" / "c1" / "label.npy").exists()
