"""Quick run of `volfm bench preprocess` on a tiny volume: the table prints and volfm matches SimpleITK."""
import json

import numpy as np
import pytest

from volfm.bench import preprocess as bp


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out_json = root / "results.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bp.main(["--size", "64,64,40", "--repeats", "1", "--cohort-cases", "2", "--cohort-size", "48,48,24",
                      "--workers", "1", "--out", str(root / "work"), "--json", str(out_json)])
    return rc, buf.getvalue(), json.loads(out_json.read_text())


def test_main_prints_table_and_goal(tiny_run):
    rc, text, _ = tiny_run
    assert rc == 0
    assert "pipeline" in text and "max |diff| vs SimpleITK" in text
    for name in ("volfm", "SimpleITK", "MONAI", "TorchIO"):
        assert f"\n{name} " in text
    assert "cases/min" in text
    assert text.count("goal:") == 1


def test_volfm_matches_simpleitk(tiny_run):
    _, _, doc = tiny_run
    rows = {r["pipeline"]: r for r in doc["pipelines"]}
    assert rows["volfm"]["diff_method"] == "same grid"
    assert rows["volfm"]["max_abs_diff"] < 1e-3
    assert rows["volfm"]["shape"] == rows["SimpleITK"]["shape"] == doc["grid"]["shape"]
    # peers are checked against SimpleITK on their own grids; TorchIO resamples in int16 (<= 1 HU)
    assert rows["MONAI"]["max_abs_diff"] < 1e-3
    assert rows["TorchIO"]["max_abs_diff"] <= 1.0 / 2000 + 1e-6
    assert doc["goals"]["values_match_sitk"]["pass"] is True
    assert [c["workers"] for c in doc["cohort"]] == [1]
    assert doc["cohort"][0]["cases_per_min"] > 0


def test_ct_phantom_and_lps_affine():
    arr = bp.make_ct_array((32, 30, 20), (0.7, 0.7, 1.0), seed=1)
    assert arr.dtype == np.int16 and arr.shape == (32, 30, 20)
    assert arr[0, 0, 0] < -900 and arr.max() > 500  # air in the corner, bone somewhere
    aff = bp.lps_affine((32, 30, 20), (0.7, 0.7, 1.0))
    from volfm.io import axcodes

    assert axcodes(aff) == "LPS"


def test_integer_offset_comparison():
    ref_aff = np.diag([1.5, 1.5, 3.0, 1.0])
    ref = np.random.default_rng(0).random((10, 9, 8)).astype(np.float32)
    aff = ref_aff.copy()
    aff[:3, 3] = [1.5 * 2, 0.0, -3.0]  # shifted by (2, 0, -1) voxels
    arr = np.zeros((6, 9, 8), np.float32)
    arr[:, :, 1:] = ref[2:8, :, :7]
    assert tuple(bp._integer_offset(ref_aff, aff)) == (2, 0, -1)
    d, how = bp.compare_to_sitk("x", arr, aff, ref, ref_aff, None, None, None)
    assert d == 0.0 and "offset (2, 0, -1)" in how
