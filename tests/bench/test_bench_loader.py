"""Quick run of `volfm bench loader` on a tiny cohort: the table and goal lines print, every loader's
patches have the requested shape (and were checked against the store by the benchmark itself)."""
import contextlib
import io
import json

import pytest

from volfm.bench import loader as bl

PATCH = [16, 16, 16]
NAMES = ("raw memmap", "volfm", "TorchIO Queue", "MONAI CacheDataset")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_loader")
    out_json = root / "results.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bl.main(["--cases", "3", "--shape", "40,40,24", "--spacing", "6", "--patch", ",".join(map(str, PATCH)),
                      "--batches", "4", "--warmup", "1", "--workers", "0", "--out", str(root / "work"),
                      "--json", str(out_json)])
    return rc, buf.getvalue(), json.loads(out_json.read_text())


def test_table_and_goal_lines(tiny_run):
    rc, text, _ = tiny_run
    assert rc == 0
    assert "patches/s" in text and "vs TorchIO" in text and "of raw" in text and "setup s" in text
    for name in NAMES:
        assert f"\n{name} " in text
    assert text.count("volfm >= 10x TorchIO Queue: ") == 1
    assert text.count("volfm >= 0.5 x raw memmap: ") == 1
    for line in text.splitlines():
        if line.startswith("volfm >= "):
            assert ("PASS" in line) or ("FAIL" in line)


def test_each_loader_patch_shape(tiny_run):
    _, _, doc = tiny_run
    rows = {r["loader"]: r for r in doc["loaders"]}
    assert set(rows) == set(NAMES)
    for name, r in rows.items():
        assert r["patch_shape"] == [1] + PATCH, name
        assert r["content_checked"] is True
        assert r["patches_per_s"] > 0 and r["timed_patches"] >= 8
    assert rows["MONAI CacheDataset"]["patches_per_batch"] == 2 * 4  # batch_size items x num_samples
    assert rows["volfm"]["patches_per_batch"] == 2
    assert rows["TorchIO Queue"]["vs_torchio"] == pytest.approx(1.0)
    assert rows["raw memmap"]["frac_raw"] == pytest.approx(1.0)
    assert set(doc["goals"]) == {"volfm_10x_torchio", "volfm_half_raw"}


def test_skip_peers(tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bl.main(["--cases", "2", "--shape", "32,32,16", "--spacing", "8", "--patch", "8", "--batches", "2",
                      "--warmup", "1", "--repeats", "1", "--workers", "0", "--skip", "torchio,monai",
                      "--out", str(tmp_path / "w")])
    text = buf.getvalue()
    assert rc == 0
    assert "\nraw memmap " in text and "\nvolfm " in text
    assert "\nTorchIO Queue " not in text and "\nMONAI CacheDataset " not in text
    assert "volfm >= 0.5 x raw memmap: " in text and "TorchIO Queue: " not in text


def test_bad_skip_is_an_error(capsys):
    assert bl.main(["--skip", "sitk"]) == 2
    assert "--skip" in capsys.readouterr().err
