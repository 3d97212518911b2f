"""Quick run of `volfm bench sliding-window` on a tiny volume: the table prints and volfm matches MONAI."""
import contextlib
import io
import json

import pytest

from volfm.bench import sliding_window as bsw


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_json = tmp_path_factory.mktemp("bench_sw") / "results.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bsw.main(["--size", "40,40,40", "--patch", "16,16,16", "--repeats", "1", "--device", "cpu",
                       "--json", str(out_json)])
    return rc, buf.getvalue(), json.loads(out_json.read_text())


def test_main_prints_table_and_goal(tiny_run):
    rc, text, _ = tiny_run
    assert rc == 0
    assert "median s" in text and "max |diff| vs MONAI" in text and "peak RSS rise (MiB)" in text
    for name in ("volfm", "MONAI"):
        assert f"\n{name} " in text
    assert "ratio MONAI/volfm time:" in text
    assert text.count("goal: at least as fast: ") == 1 and "identical within 0.0001: PASS" in text


def test_volfm_matches_monai(tiny_run):
    _, _, doc = tiny_run
    assert doc["max_abs_diff"] < 1e-4
    assert doc["goals"]["identical"]["pass"] is True
    v, m = doc["results"]["volfm"], doc["results"]["MONAI"]
    assert v["shape"] == m["shape"] == [2, 40, 40, 40]
    assert v["windows"] == 4 ** 3  # starts 0, 8, 16, 24 per axis (24 + 16 = 40: flush with the end)
    assert len(v["times"]) == len(m["times"]) == 1 and v["median_s"] > 0 and m["median_s"] > 0
    assert v["accumulator_bytes"] == 3 * 40 ** 3 * 4  # 2 output channels + the weight sum, float32
    assert doc["ratio_monai_over_volfm"] > 0


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bsw.main(["--size", "40,40"])
    assert bsw.main(["--repeats", "0"]) == 2
