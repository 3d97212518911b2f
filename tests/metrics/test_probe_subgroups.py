"""volfm.metrics.probe (against scikit-learn's LogisticRegression) and volfm.metrics.subgroups (hand-built tables)."""
import csv
import math

import numpy as np
import pytest
import sklearn.linear_model as lm  # the reference (a dev dependency)

from volfm import VolfmError
from volfm.metrics.classification import binary_auroc, multilabel_metrics
from volfm.metrics.probe import fit_linear_probe, linear_probe
from volfm.metrics.subgroups import format_table, parse_column_spec, subgroup_breakdown, write_csv


def _linear_data(seed, n, d=24, c=3, signal_dims=6, noise=0.0):
    """Features: N(0, 1) with per-dim scale/offset; labels: a linear rule on the first dims (+ label noise)."""
    fixed = np.random.default_rng(1234)  # feature scales/offsets and the rule are shared by train and test
    scale, offset = fixed.uniform(0.5, 5.0, size=d), fixed.uniform(-3, 3, size=d)
    w = fixed.normal(size=(signal_dims, c))
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n, d))
    x = u * scale + offset
    z = u[:, :signal_dims] @ w
    y = (z + noise * rng.normal(size=z.shape)) > 0
    return x, y


def test_probe_separable_data_scores_near_one():
    tx, ty = _linear_data(0, 300)
    vx, vy = _linear_data(1, 300)
    out = linear_probe(tx, ty, vx, vy, class_names=["a", "b", "c"], C=1.0)
    assert out["macro_auroc"] > 0.97
    assert all(out["per_class"][k]["auroc"] > 0.95 for k in "abc")
    assert out["weights_shape"] == [24, 3] and out["classes_fitted"] == ["a", "b", "c"]
    assert out["test_scores"].shape == (300, 3)
    assert out["grad_max"] < 1e-6


def test_probe_shuffled_labels_score_near_half():
    tx, ty = _linear_data(2, 400)
    vx, vy = _linear_data(3, 400)
    rng = np.random.default_rng(7)
    out = linear_probe(tx, ty[rng.permutation(400)], vx, vy[rng.permutation(400)], C=1.0)
    # Under the null a class's AUROC has sd sqrt((n+1) / (12 P N)) ~= 0.03 for 400 cases near
    # balance, so the macro mean over 3 classes has sd ~= 0.017: 0.1 is ~6 sd, whatever the seed.
    assert abs(out["macro_auroc"] - 0.5) < 0.1


@pytest.mark.parametrize("C", [0.05, 1.0])
def test_probe_matches_sklearn_logistic_regression(C):
    tx, ty = _linear_data(4, 250, noise=1.0)
    vx, vy = _linear_data(5, 200, noise=1.0)
    probe = fit_linear_probe(tx, ty, C=C)
    mean, std = tx.mean(0), tx.std(0)
    ours = probe.predict_proba(vx)
    for k in range(ty.shape[1]):
        ref = lm.LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit((tx - mean) / std, ty[:, k])
        ref_p = ref.predict_proba((vx - mean) / std)[:, 1]
        np.testing.assert_allclose(ours[:, k], ref_p, atol=1e-5)
        np.testing.assert_allclose(probe.weight[:, k], ref.coef_[0], atol=1e-4)
        assert binary_auroc(vy[:, k], ours[:, k]) == pytest.approx(binary_auroc(vy[:, k], ref_p), abs=1e-3)


def test_probe_skips_classes_without_both_labels_in_train():
    tx, ty = _linear_data(6, 120)
    vx, vy = _linear_data(7, 80)
    ty = np.concatenate([ty, np.zeros((120, 1), bool), np.ones((120, 1), bool)], axis=1)
    vy = np.concatenate([vy, vy[:, :2]], axis=1)
    out = linear_probe(tx, ty, vx, vy, class_names=["a", "b", "c", "never", "always"], C=0.5)
    assert out["classes_skipped_train"] == ["never", "always"]
    assert out["classes_fitted"] == ["a", "b", "c"] and out["weights_shape"] == [24, 3]
    assert set(out["per_class"]) == {"a", "b", "c"}
    assert "never, always" in out["note"]
    direct = multilabel_metrics(vy[:, :3], out["test_scores"], ["a", "b", "c"])
    assert out["macro_auroc"] == direct["macro_auroc"]


def test_probe_C_grid_selection_is_documented_and_deterministic():
    tx, ty = _linear_data(8, 200, noise=2.0)
    vx, vy = _linear_data(9, 100, noise=2.0)
    grid = (0.01, 0.1, 1.0)
    a = linear_probe(tx, ty, vx, vy, C=grid, val_fraction=0.25, seed=3)
    b = linear_probe(tx, ty, vx, vy, C=grid, val_fraction=0.25, seed=3)
    assert a["C"] in grid and a["C_grid"] == list(grid)
    scores = {float(k): v for k, v in a["val_macro_auroc"].items()}
    assert a["C"] == min(c for c, v in scores.items() if v == max(scores.values()))
    assert "50/200" in a["C_selection"]
    np.testing.assert_array_equal(a["test_scores"], b["test_scores"])
    # the final probe is the single-C refit on all training cases
    single = linear_probe(tx, ty, vx, vy, C=a["C"])
    np.testing.assert_array_equal(a["test_scores"], single["test_scores"])
    given = linear_probe(tx, ty, vx, vy, C=grid, val_x=vx, val_y=vy)
    assert "given validation set (100 cases)" in given["C_selection"]


def test_probe_bad_inputs():
    tx, ty = _linear_data(10, 50)
    with pytest.raises(VolfmError, match="feature dims"):
        linear_probe(tx, ty, tx[:, :5], ty, C=1.0)
    with pytest.raises(VolfmError, match="same case order"):
        linear_probe(tx, ty[:40], tx, ty, C=1.0)
    with pytest.raises(VolfmError, match="C must be"):
        linear_probe(tx, ty, tx, ty, C=-1.0)


# --- subgroups -------------------------------------------------------------------------------

ROWS = [
    {"case_id": "c0", "sex": "F", "age": "39.9", "scanner": "GE"},
    {"case_id": "c1", "sex": "M", "age": "40", "scanner": "Siemens"},
    {"case_id": "c2", "sex": "F", "age": "59", "scanner": "GE"},
    {"case_id": "c3", "sex": "", "age": "60", "scanner": "GE"},
    {"case_id": "c4", "sex": "M", "age": "80", "scanner": "Philips"},
    {"case_id": "c5", "sex": "F", "age": "", "scanner": "GE"},
    {"case_id": "c6", "sex": None, "age": "-1", "scanner": "Siemens"},
    {"case_id": "c7", "sex": "M", "age": "NA"},
]


def _recorder():
    calls = []

    def metric_fn(idx):
        calls.append(idx.copy())
        return {"n_seen": float(idx.size), "first": int(idx[0])}

    return calls, metric_fn


def _by_group(rows):
    return {r["group"]: r for r in rows}


def test_subgroups_partition_and_indices():
    calls, fn = _recorder()
    out = subgroup_breakdown(ROWS, "sex", fn, min_cases=1)
    assert [r["group"] for r in out] == ["all", "F", "M", "(missing)"]
    assert [r["n"] for r in out] == [8, 3, 3, 2]
    expected = [[0, 1, 2, 3, 4, 5, 6, 7], [0, 2, 5], [1, 4, 7], [3, 6]]
    assert [c.tolist() for c in calls] == expected
    assert all(c.dtype == np.int64 for c in calls)
    assert [r["first"] for r in out] == [0, 0, 1, 3]
    assert all(r["column"] == "sex" and r["note"] == "" for r in out)


def test_subgroups_age_bands_edges_and_missing():
    calls, fn = _recorder()
    out = subgroup_breakdown(ROWS, "age", fn, bins=[0, 40, 60, 80], min_cases=1)
    groups = {r["group"]: r["n"] for r in out}
    assert [r["group"] for r in out] == ["all", "<0", "0-39", "40-59", "60-79", ">=80", "(missing)"]
    assert groups == {"all": 8, "<0": 1, "0-39": 1, "40-59": 2, "60-79": 1, ">=80": 1, "(missing)": 2}
    idx = dict(zip([r["group"] for r in out], (c.tolist() for c in calls)))
    assert idx["40-59"] == [1, 2] and idx["0-39"] == [0] and idx["60-79"] == [3] and idx[">=80"] == [4]
    assert idx["(missing)"] == [5, 7]  # blank and "NA"

    spec = subgroup_breakdown(ROWS, "age:0,40,60,80", _recorder()[1], min_cases=1)
    assert [(r["group"], r["n"]) for r in spec] == [(r["group"], r["n"]) for r in out]
    wide = _by_group(subgroup_breakdown(ROWS, "age", fn, bins=[0, 40, 60, 80, 200], min_cases=1))
    assert wide["80-199"]["n"] == 1 and ">=200" not in wide
    frac = _by_group(subgroup_breakdown(ROWS, "age", fn, bins=[0, 39.95, 70.5], min_cases=1))
    assert frac["[0, 39.95)"]["n"] == 1 and frac["[39.95, 70.5)"]["n"] == 3 and frac[">=70.5"]["n"] == 1


def test_subgroups_min_cases_gives_nan_with_note_and_skips_call():
    calls, fn = _recorder()
    out = _by_group(subgroup_breakdown(ROWS, "scanner", fn, min_cases=2))
    assert [c.tolist() for c in calls] == [list(range(8)), [0, 2, 3, 5], [1, 6]]  # Philips, (missing) not called
    assert out["Philips"]["n"] == 1 and math.isnan(out["Philips"]["n_seen"]) and math.isnan(out["Philips"]["first"])
    assert "fewer than 2 cases" in out["Philips"]["note"]
    assert out["(missing)"]["n"] == 1 and "fewer than 2" in out["(missing)"]["note"]
    assert out["GE"]["n_seen"] == 4.0


def test_subgroups_numeric_values_sort_numerically():
    rows = [{"site": s} for s in ["10", "9", "10", "2"]]
    out = subgroup_breakdown(rows, "site", lambda idx: {}, min_cases=1)
    assert [r["group"] for r in out] == ["all", "2", "9", "10"]


def test_subgroups_errors():
    with pytest.raises(VolfmError, match=r"'site' is not in the manifest \(columns: case_id, sex, age, scanner\)"):
        subgroup_breakdown(ROWS, "site", _recorder()[1])
    with pytest.raises(VolfmError, match=r"row 1 \(case_id c1\).*'male' is not a number"):
        subgroup_breakdown([{"case_id": "c0", "age": "3"}, {"case_id": "c1", "age": "male"}], "age", _recorder()[1],
                           bins=[0, 10])
    with pytest.raises(VolfmError, match="strictly increasing"):
        subgroup_breakdown(ROWS, "age", _recorder()[1], bins=[0, 60, 40])
    with pytest.raises(VolfmError, match="return only numbers or text"):
        subgroup_breakdown(ROWS, "sex", lambda idx: {"per_class": {"a": 1.0}}, min_cases=1)
    with pytest.raises(VolfmError, match="no rows"):
        subgroup_breakdown([], "sex", _recorder()[1])


def test_parse_column_spec():
    assert parse_column_spec("sex") == ("sex", None)
    assert parse_column_spec("age:0,40,60,80") == ("age", [0.0, 40.0, 60.0, 80.0])
    assert parse_column_spec(" bmi : 18.5, 25,30 ") == ("bmi", [18.5, 25.0, 30.0])
    for bad in ("age:", "age:40", "age:0,x", ":0,40", "age:60,40"):
        with pytest.raises(VolfmError):
            parse_column_spec(bad)


def test_subgroups_with_real_metrics_table_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    y = rng.random((n, 2)) < 0.4
    s = rng.random((n, 2)) + y
    rows = [{"case_id": f"c{i}", "sex": "FM"[i % 2]} for i in range(n)]

    def metric_fn(idx):
        m = multilabel_metrics(y[idx], s[idx])
        return {"macro_auroc": m["macro_auroc"], "n_classes_scored": m["n_classes_scored"]}

    out = subgroup_breakdown(rows, "sex", metric_fn, min_cases=10)
    female = np.arange(0, n, 2)
    assert _by_group(out)["F"]["macro_auroc"] == multilabel_metrics(y[female], s[female])["macro_auroc"]

    table = format_table(out)
    lines = table.splitlines()
    assert lines[0].split() == ["column", "group", "n", "macro_auroc", "n_classes_scored", "note"]
    assert len(lines) == 2 + 3 and len({len(line) for line in lines[:2]}) == 1
    auroc_col = lines[0].index("macro_auroc") + len("macro_auroc")
    assert all(line[auroc_col - 5:auroc_col] == f"{r['macro_auroc']:.3f}"[-5:] for line, r in zip(lines[2:], out))

    path = tmp_path / "sub" / "sex.csv"
    write_csv(out, path)
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["group"] for r in back] == ["all", "F", "M"]
    assert float(back[1]["macro_auroc"]) == out[1]["macro_auroc"]
