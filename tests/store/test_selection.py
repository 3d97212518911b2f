"""volfm.store.selection and `volfm scan`: rules -> one series per study -> a cohort table `volfm preprocess`
takes unchanged; no identifying header value in any output."""
from __future__ import annotations

import csv
import json

import pytest
import yaml

from volfm.cli.main import main
from volfm.configs import SPECS_DIR
from volfm.io.dicomscan import scan_tree
from volfm.store.selection import SelectionError, load_rules, load_series_table, select_series


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


CT_RULES = {"modality": "CT", "orientation": "axial", "image_type": "ORIGINAL", "max_slice_thickness": 3,
            "prefer_kernels": ["B30f", "STANDARD"]}


def test_rules_choose_one_series_per_study(dicom_study_tree):
    root, uids = dicom_study_tree
    rows, _ = scan_tree(root)
    chosen, unmatched = select_series(rows, load_rules(overrides=CT_RULES))
    assert {r["study_uid"]: r["series_uid"] for r in chosen} == {uids["study_a"]: uids["thin_soft"],
                                                                 uids["study_b"]: uids["ok"]}
    a = next(r for r in chosen if r["study_uid"] == uids["study_a"])
    assert a["selected_reason"] == ("2 candidate(s) of 4 series (CT; axial; ORIGINAL; thickness <= 3 mm); "
                                    "thinnest: 1 mm; kernel B30f (preferred #1)")
    # study C's only series is unusable
    assert len(unmatched) == 1 and uids["study_c"] in unmatched[0] and "mixed orientations" in unmatched[0]
    # the kernel list decides between the two 1 mm series; thickness comes first
    chosen, _ = select_series(rows, load_rules(overrides={**CT_RULES, "prefer_kernels": ["B70f"]}))
    assert uids["thin_sharp"] in {r["series_uid"] for r in chosen}
    chosen, _ = select_series(rows, load_rules(overrides={**CT_RULES, "max_slice_thickness": None,
                                                         "prefer_kernels": ["STANDARD"]}))
    picked = {r["series_uid"] for r in chosen}
    assert uids["ok"] in picked and uids["thick"] not in picked  # the thinnest wins before any kernel
    # per series: every series that passes
    chosen, _ = select_series(rows, load_rules(overrides={**CT_RULES, "per": "series"}))
    assert {r["series_uid"] for r in chosen} == {uids["thin_soft"], uids["thin_sharp"], uids["ok"]}
    # DERIVED only; contrast only
    chosen, _ = select_series(rows, load_rules(overrides={"image_type": "derived"}))
    assert [r["series_uid"] for r in chosen] == [uids["derived"]]
    chosen, _ = select_series(rows, load_rules(overrides={"contrast": "yes"}))
    assert [r["series_uid"] for r in chosen] == [uids["thin_soft"]]


@pytest.mark.parametrize("text, message", [
    ("per: study\nmodality: [CT\n", r"rules\.yaml: not valid YAML at line 3"),
    ("per: study\nmax_thickness: 3\n", r"rules\.yaml: unknown key 'max_thickness' \(did you mean 'max_slice_thickness'"),
    ("max_slice_thickness: thin\n", r"rules\.yaml: key 'max_slice_thickness' must be a positive number"),
    ("orientation: [axial, axail]\n", r"rules\.yaml: key 'orientation': 'axail' is not one of .*did you mean 'axial'"),
    ("per: study\nper: patient\n", r"rules\.yaml: not valid YAML at line 2: duplicate key 'per'"),
    ("- CT\n", r"rules\.yaml: selection rules must be a mapping"),
])
def test_malformed_rules_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(SelectionError, match=message) as info:
        load_rules(path)
    assert "\n" not in str(info.value)


def test_flags_replace_file_keys(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(CT_RULES))
    rules = load_rules(path, {"max_slice_thickness": 1.5, "orientation": None})
    assert rules["max_slice_thickness"] == 1.5 and rules["orientation"] == ["axial"] and rules["per"] == "study"
    with pytest.raises(SelectionError, match=r"rules\.yaml with flags min_slices: key 'min_slices'"):
        load_rules(path, {"min_slices": 0})


def test_scan_cli_cohort_preprocesses_end_to_end(dicom_study_tree, tmp_path, capsys):
    root, uids = dicom_study_tree
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(CT_RULES))
    out, cohort = tmp_path / "series.csv", tmp_path / "cohort.csv"
    assert main(["scan", str(root), "--out", str(out), "--cohort", str(cohort), "--rules", str(rules)]) == 0
    printed = capsys.readouterr()
    assert "10 series (6 usable) in 3 studies" in printed.out and "selected 2 series" in printed.out
    assert "\r" not in printed.err  # no progress bar off a terminal
    series = read_csv(out)
    assert len(series) == 10 and {r["usable"] for r in series} == {"True", "False"}
    table = read_csv(cohort)
    assert list(table[0]) == ["case_id", "image", "image_series_uid", "patient_id", "study_uid", "modality",
                              "selected_reason"]
    assert {r["case_id"]: r["image_series_uid"] for r in table} == {uids["study_a"]: uids["thin_soft"],
                                                                    uids["study_b"]: uids["ok"]}

    spec = yaml.safe_load((SPECS_DIR / "ct_merlin.yaml").read_text())
    spec.update(spacing=[2.0, 2.0, 2.0], crop={"size": [8, 8, 8], "mode": "center"})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    store = tmp_path / "store"
    assert main(["preprocess", "--spec", str(tmp_path / "spec.yaml"), "--cohort", str(cohort), "--out", str(store),
                 "--quiet"]) == 0
    manifest = read_csv(store / "manifest.csv")
    assert sorted(r["case_id"] for r in manifest) == sorted(r["case_id"] for r in table)
    assert all(r["status"] == "ok" for r in manifest)
    for r in table:
        meta = json.loads((store / "cases" / r["case_id"] / "meta.json").read_text())
        assert meta["source"]["image"]["series_id"] == r["image_series_uid"]

    # nothing identifying left the headers: not in the tables, the manifest, meta.json, spec or QC pictures
    files = [out, cohort, *store.rglob("*")]
    assert any(f.suffix == ".png" for f in files)
    for f in files:
        if f.is_file():
            data = f.read_bytes()
            assert b"Doe" not in data and b"Jane" not in data and b"19700101" not in data, f


def test_scan_cli_hash_uids_and_errors(dicom_study_tree, tmp_path, capsys):
    root, uids = dicom_study_tree
    out, cohort = tmp_path / "series.csv", tmp_path / "cohort.csv"
    assert main(["scan", str(root), "--out", str(out), "--cohort", str(cohort), "--hash-uids", "--modality", "CT",
                 "--orientation", "axial", "--max-thickness", "3", "--prefer-kernels", "B70f,B30f"]) == 0
    text = out.read_text() + cohort.read_text()
    assert not any(u in text for u in uids.values()) and "P001" not in text
    assert all(len(r["case_id"]) == 16 for r in read_csv(cohort))
    capsys.readouterr()

    bad = tmp_path / "bad.yaml"
    bad.write_text("per: study\nprefer_kernel: [B30f]\n")
    assert main(["scan", str(root), "--out", str(tmp_path / "s2.csv"), "--cohort", str(cohort),
                 "--rules", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.yaml: unknown key 'prefer_kernel'" in err
    assert not (tmp_path / "s2.csv").exists()  # bad rules fail before the walk
    assert main(["scan", str(root), "--out", str(tmp_path / "s3.csv"), "--modality", "CT"]) == 2
    assert "need --cohort" in capsys.readouterr().err


def test_from_series_chooses_again_without_walking(dicom_study_tree, tmp_path, capsys):
    root, uids = dicom_study_tree
    series, first, again = tmp_path / "series.csv", tmp_path / "c1.csv", tmp_path / "c2.csv"
    assert main(["scan", str(root), "--out", str(series), "--cohort", str(first), "--modality", "CT",
                 "--orientation", "axial", "--max-thickness", "3", "--dates", "year"]) == 0
    assert {r["acquisition_date"] for r in read_csv(series) if r["modality"] == "CT"} == {"2024"}
    # the same rules from the saved table give the same cohort; the table may lose columns selection does not read
    rows = read_csv(series)
    with open(series, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, [c for c in rows[0] if c not in ("acquisition_date", "series_description")],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    capsys.readouterr()
    assert main(["scan", str(root), "--from-series", str(series), "--cohort", str(again), "--modality", "CT",
                 "--orientation", "axial", "--max-thickness", "3"]) == 0
    assert "10 series (6 usable) read from" in capsys.readouterr().out
    assert read_csv(again) == read_csv(first)
    # other rules on the same table; a root that does not hold the chosen folders is refused
    assert main(["scan", str(root), "--from-series", str(series), "--cohort", str(again), "--per", "series",
                 "--image-type", "derived"]) == 0
    assert [r["image_series_uid"] for r in read_csv(again)] == [uids["derived"]]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["scan", str(empty), "--from-series", str(series), "--cohort", str(again)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("volfm scan: error: ") and "none of the 2 chosen series folders is under it" in last


@pytest.mark.parametrize("edit, message", [
    (lambda rows: [{k: v for k, v in r.items() if k != "usable"} for r in rows],
     r"series\.csv: column\(s\) 'usable' missing \(columns: "),
    (lambda rows: [{**r, "slice_count": "many"} if i == 1 else r for i, r in enumerate(rows)],
     r"series\.csv: row 3, column 'slice_count': 'many' is not a whole number"),
    (lambda rows: [{**r, "usable": "maybe"} for r in rows], r"series\.csv: row 2, column 'usable': 'maybe' is not True"),
    (lambda rows: [{**r, "slice_thickness": "-1"} for r in rows], r"row 2, column 'slice_thickness': '-1' is not a"),
    (lambda rows: [{**r, "folder": ""} for r in rows], r"series\.csv: row 2, column 'folder' is empty"),
    (lambda rows: rows + rows[:1], r"series\.csv: series_uid .* on rows 2 and 12"),
    (lambda rows: [], r"series\.csv: series table has no rows"),
])
def test_from_series_malformed_table_names_file_and_column(dicom_study_tree, tmp_path, capsys, edit, message):
    root, _ = dicom_study_tree
    series = tmp_path / "series.csv"
    rows, _ = scan_tree(root)
    rows = edit([{k: "" if v is None else str(v) for k, v in r.items()} for r in rows])
    with open(series, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(rows[0]) if rows else ["series_uid"])
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(SelectionError, match=message) as info:
        load_series_table(series)
    assert "\n" not in str(info.value)
    assert main(["scan", str(root), "--from-series", str(series), "--cohort", str(tmp_path / "c.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "series.csv" in err


def test_from_series_flag_errors(dicom_study_tree, tmp_path, capsys):
    root, _ = dicom_study_tree
    assert main(["scan", str(root), "--from-series", str(tmp_path / "nope.csv"), "--cohort", str(tmp_path / "c.csv")]) == 2
    assert "nope.csv: series table not found" in capsys.readouterr().err
    assert main(["scan", str(root), "--from-series", "s.csv", "--out", "o.csv", "--hash-uids", "--cohort", "c.csv"]) == 2
    assert "drop --out, --hash-uids" in capsys.readouterr().err
    assert main(["scan", str(root), "--from-series", "s.csv"]) == 2
    assert "--from-series needs --cohort" in capsys.readouterr().err
    assert main(["scan", str(root)]) == 2
    assert "volfm scan needs --out" in capsys.readouterr().err
