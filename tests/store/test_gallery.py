"""QC gallery (volfm.store.gallery) and the per-case statistics behind its outlier scores (volfm.preprocess.stats).

Statistics are checked against numpy computed here; the ranking on a small store built by run_cohort where one
case's body is 400 HU denser than the others' (it must rank first) and two cases fail (they must come first); the
page's escaping on a hand-written manifest whose case id, error and split carry HTML; the layout and the ranking of a
20,000-row index, a tenth of it with meta.json statistics and one planted outlier (its speed is measured in the
README, not asserted; that the page holds one page of rows is checked in tests/cli/test_gallery_browser.py).
"""
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from volfm.cli.main import main
from volfm.io import Volume, write_nifti
from volfm.preprocess.spec import validate_spec
from volfm.preprocess.stats import MAX_SAMPLES, case_statistics, sample_step, stat_features
from volfm.store.build import run_cohort
from volfm.store.gallery import CACHE_NAME, build_index, robust_z, write_gallery
from volfm.store.layout import StoreError

REPO = Path(__file__).resolve().parents[2]
SHIFTED = "ct_shifted"
FAILED = ["bad_missing", "bad_trunc"]


def ct_spec(**intensity) -> dict:
    it = {"type": "ct_window", "hu_min": -1000, "hu_max": 1000, "out_min": 0.0, "out_max": 1.0, **intensity}
    return validate_spec({"name": "t", "spacing": [1.0, 1.0, 1.0], "crop": None,
                          "inputs": {"image": {"kind": "image", "intensity": it}, "label": {"kind": "label"}}}, "t")


def make_ct(seed, shape=(40, 40, 16), sp=(2.6, 2.6, 5.2), shift_hu=0.0):
    """A CT-like volume (HU: soft tissue ellipsoid in air) and a two-class label inside it."""
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = np.array(shape) / 2 + rng.uniform(-1, 1, 3)
    r = (((ii - c[0]) * sp[0]) / 30) ** 2 + (((jj - c[1]) * sp[1]) / 25) ** 2 + (((kk - c[2]) * sp[2]) / 30) ** 2
    img = np.where(r < 1, 40.0 + shift_hu, -1000.0) + rng.normal(0, 10, shape)
    lab = (r < 0.3).astype(np.uint8) + (r < 0.1).astype(np.uint8)
    aff = np.diag([*sp, 1.0])
    return Volume(img[None].astype(np.float32), aff), Volume(lab[None], aff)


def write_csv(path, rows) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def embedded_json(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="qc-index">(.*?)</script>', page, re.S)
    assert m, "no embedded index"
    return json.loads(m.group(1))


def as_records(index: dict) -> list[dict]:
    return [dict(zip(index["fields"], row)) for row in index["rows"]]


# ----------------------------------------------------------------------------------- statistics
def test_case_statistics_match_numpy():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1, (1, 30, 20, 10)).astype(np.float32)
    lab = rng.integers(0, 4, (1, 30, 20, 10)).astype(np.uint8)
    spacing = (1.5, 2.0, 3.0)
    s = case_statistics({"image": img, "label": lab}, ct_spec(), spacing)
    a = img.astype(np.float64).ravel()
    p1, p50, p99 = np.percentile(img.ravel(), [1, 50, 99])
    got = s["inputs"]["image"]
    for k, want in (("mean", a.mean()), ("std", a.std()), ("p1", p1), ("p50", p50), ("p99", p99)):
        assert got[k] == pytest.approx(want, rel=1e-5), k
    # ct_window [-1000, 1000] HU -> [0, 1]: the body threshold -500 HU is 0.25 in stored units
    assert s["foreground"]["threshold"] == pytest.approx(0.25)
    assert s["foreground"]["fraction"] == pytest.approx(float(np.mean(img > 0.25)), rel=1e-5)
    voxel_ml = 1.5 * 2.0 * 3.0 / 1000
    values, counts = np.unique(lab, return_counts=True)
    want = {str(v): n * voxel_ml for v, n in zip(values, counts) if v != 0}
    assert s["labels"]["label"]["classes"] == pytest.approx(want, rel=1e-5)
    assert s["labels"]["label"]["total_ml"] == pytest.approx(sum(want.values()), rel=1e-5)
    feats = stat_features(s)
    assert feats["image.p99"] == got["p99"] and feats["label.ml.2"] == s["labels"]["label"]["classes"]["2"]
    assert feats["foreground"] == s["foreground"]["fraction"]


def test_foreground_rules_per_modality():
    rng = np.random.default_rng(1)
    img = rng.normal(0, 1, (1, 16, 16, 16)).astype(np.float32)
    img[0, :8] = 0.0  # background of an mri_zscore image
    spec = validate_spec({"name": "m", "spacing": [1, 1, 1], "crop": None, "reference": "mri",
                          "inputs": {"mri": {"kind": "image", "intensity": {"type": "mri_zscore"}}}}, "m")
    fg = case_statistics({"mri": img}, spec, (1, 1, 1))["foreground"]
    assert fg["fraction"] == pytest.approx(float(np.mean(img != 0.0)), rel=1e-5)
    # a window above -500 HU counts what is above its lower bound
    fg = case_statistics({"image": img}, ct_spec(hu_min=-160, hu_max=240), (1, 1, 1))["foreground"]
    assert fg["threshold"] == pytest.approx(0.0)
    assert fg["fraction"] == pytest.approx(float(np.mean(img > 0.0)), rel=1e-5)
    # PET (or none): the Otsu threshold of the image, recorded
    pet = np.concatenate([rng.normal(1, 0.1, 2000), rng.normal(8, 0.5, 2096)]).astype(np.float32).reshape(1, 16, 16, 16)
    spec = validate_spec({"name": "p", "spacing": [1, 1, 1], "crop": None, "reference": "pet",
                          "inputs": {"pet": {"kind": "image", "intensity": {"type": "pet"}}}}, "p")
    fg = case_statistics({"pet": pet}, spec, (1, 1, 1))["foreground"]
    assert 1 < fg["threshold"] < 7 and "Otsu" in fg["rule"]
    assert fg["fraction"] == pytest.approx(float(np.mean(pet > fg["threshold"])), rel=1e-5)
    assert fg["fraction"] == pytest.approx(2096 / 4096, rel=1e-5)


def test_big_volumes_are_sampled_on_a_regular_grid():
    shape = (1, 200, 180, 96)
    step = sample_step(shape)
    assert math.prod(math.ceil(s / step) for s in shape[1:]) <= MAX_SAMPLES
    assert math.prod(math.ceil(s / (step - 1)) for s in shape[1:]) > MAX_SAMPLES  # the finest step that fits
    img = np.random.default_rng(2).normal(0, 1, shape).astype(np.float32)
    s = case_statistics({"image": img}, ct_spec(), (1, 1, 1))
    sub = img[:, ::step, ::step, ::step].astype(np.float64)
    assert s["sample_step"] == step
    assert s["inputs"]["image"]["mean"] == pytest.approx(sub.mean(), rel=1e-5, abs=1e-6)
    assert s["inputs"]["image"]["p99"] == pytest.approx(np.percentile(sub, 99), rel=1e-5)
    assert sample_step((1, 10, 10, 10)) == 1


def test_robust_z_median_mad_and_floors():
    x = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0], [100.0, 5.5]])
    z = robust_z(x, ["image.mean", "shape.i"])
    med, mad = 3.0, 1.0
    assert z[:, 0] == pytest.approx((x[:, 0] - med) / (1.4826 * mad))
    # a feature every case but one shares: MAD 0, the shape floor (1 voxel) is the scale
    assert z[:, 1] == pytest.approx([0, 0, 0, 0, 0.5])
    z = robust_z(np.array([[0.0], [0.0], [np.nan], [1e9]]), ["label.ml.3"])
    assert np.isnan(z[2, 0]) and z[3, 0] == 999.0  # clipped


# ----------------------------------------------------------------------------------- a built store
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    spec = yaml.safe_load((REPO / "preprocessing" / "ct_merlin.yaml").read_text())
    spec.update(spacing=[3.0, 3.0, 6.0], crop={"size": [32, 32, 16], "mode": "center"})
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    rows = []
    for i, cid in enumerate([f"ct{i:02d}" for i in range(5)] + [SHIFTED]):
        img, lab = make_ct(i, shift_hu=400.0 if cid == SHIFTED else 0.0)
        write_nifti(img, root / "images" / f"{cid}.nii.gz", dtype=np.int16)
        write_nifti(lab, root / "labels" / f"{cid}.nii.gz")
        rows.append({"case_id": cid, "image": f"images/{cid}.nii.gz", "label": f"labels/{cid}.nii.gz",
                     "split": "train" if i % 2 else "val", "age": str(40 + i)})
    (root / "bad").mkdir()
    gz = (root / "images" / "ct00.nii.gz").read_bytes()
    (root / "bad" / "trunc.nii.gz").write_bytes(gz[: len(gz) // 2])
    rows += [{"case_id": "bad_trunc", "image": "bad/trunc.nii.gz", "label": "", "split": "test", "age": ""},
             {"case_id": "bad_missing", "image": "bad/nope.nii.gz", "label": "", "split": "test", "age": ""}]
    table = write_csv(root / "cohort.csv", rows)
    out = root / "store"
    summary = run_cohort(root / "spec.yaml", out, cohort=table, workers=1, progress=False)
    return out, summary, root / "spec.yaml", table


def test_meta_json_records_stats(store):
    out, summary, _, _ = store
    meta = json.loads((out / "cases" / "ct00" / "meta.json").read_text())
    s = meta["stats"]
    img = np.load(out / "cases" / "ct00" / "image.npy")
    assert s["inputs"]["image"]["mean"] == pytest.approx(float(img.astype(np.float64).mean()), rel=1e-5)
    assert s["foreground"]["input"] == "image" and 0 < s["foreground"]["fraction"] < 1
    lab = np.load(out / "cases" / "ct00" / "label.npy")
    voxel_ml = math.prod(meta["spacing"]) / 1000
    assert s["labels"]["label"]["classes"]["1"] == pytest.approx(int((lab == 1).sum()) * voxel_ml, rel=1e-5)


def test_preprocess_writes_the_gallery_failed_first_outlier_next(store):
    out, summary, _, _ = store
    page = out / "qc" / "index.html"
    assert Path(summary["gallery"]) == page and page.is_file()
    index = json.loads((out / "qc" / "index.json").read_text())
    assert embedded_json(page.read_text(encoding="utf-8")) == index
    recs = as_records(index)
    assert [r["case_id"] for r in recs[:2]] == FAILED  # failed first, by case id
    assert all(r["status"] == "failed" and f"case {r['case_id']}" in r["error"] for r in recs[:2])
    assert recs[2]["case_id"] == SHIFTED, [(r["case_id"], r["outlier_score"], r["outlier_feature"]) for r in recs]
    assert recs[2]["outlier_feature"].startswith("image.") and recs[2]["outlier_score"] > 5
    scores = [r["outlier_score"] for r in recs[2:]]
    assert scores == sorted(scores, reverse=True)
    assert all(r["qc_png"] for r in recs[2:])
    assert index["counts"] == {"cases": 8, "ok": 6, "failed": 2, "with_statistics": 6, "cached": 0, "from_meta": 6,
                               "from_arrays": 0}
    assert "age" in index["numeric_columns"] and "elapsed_s" in index["numeric_columns"]
    assert {"image.mean", "foreground", "label.ml", "label.ml.1", "label.ml.2", "shape.i", "source.spacing.k"} \
        <= set(index["features"])
    # z of the outlier's driving feature is the score
    assert abs(recs[2][f"z:{recs[2]['outlier_feature']}"]) == recs[2]["outlier_score"]


def test_rerun_with_every_case_done_rewrites_it_from_the_cache(store, capsys):
    out, _, spec, table = store
    before = (out / "qc" / "index.json").stat().st_mtime_ns
    rc = main(["preprocess", "--spec", str(spec), "--cohort", str(table), "--out", str(out), "--quiet"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1  # two cases still fail
    assert f"gallery:  {out / 'qc' / 'index.html'} (failed cases first, then every case by outlier score)" in lines
    index = json.loads((out / "qc" / "index.json").read_text())
    assert (out / "qc" / "index.json").stat().st_mtime_ns > before
    assert index["counts"]["cached"] == 6 and index["counts"]["from_meta"] == 0  # no meta.json read again
    assert as_records(index)[2]["case_id"] == SHIFTED


def test_older_store_without_stats_gets_them_from_the_arrays(store, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(store[0], old)
    (old / "qc" / CACHE_NAME).unlink()
    want = {r[0]: r for r in json.loads((old / "qc" / "index.json").read_text())["rows"]}
    for meta_path in (old / "cases").glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
        del meta["stats"]
        meta_path.write_text(json.dumps(meta))
    index = build_index(old)
    assert index["counts"]["from_arrays"] == 6
    fields = index["fields"]
    for row in index["rows"]:
        for f in index["features"]:
            got, exp = row[fields.index(f)], want[row[0]][fields.index(f)]
            assert (got is None and exp is None) or got == pytest.approx(exp, rel=1e-4), (row[0], f)
    assert build_index(old)["counts"]["cached"] == 6  # computed once


def test_a_failed_statistics_computation_is_noted_and_retried_not_cached(store, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(store[0], old)
    (old / "qc" / CACHE_NAME).unlink()
    for meta_path in (old / "cases").glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
        del meta["stats"]
        meta_path.write_text(json.dumps(meta))
    image = old / "cases" / "ct01" / "image.npy"
    image.rename(old / "image.npy.away")  # its arrays cannot be read: no statistics, only its grid

    def ct01(index):
        return next(r for r in as_records(index) if r["case_id"] == "ct01")

    for attempt in range(2):  # the second gallery tries again (not served from the cache) and notes it again
        index = build_index(old)
        assert ct01(index)["qc_note"].startswith("statistics not computed: "), ct01(index)
        assert ct01(index)["image.mean"] is None and ct01(index)["shape.i"] is not None
        assert index["counts"]["with_statistics"] == 5  # the grid alone is not statistics
        assert index["counts"]["from_arrays"] == (5 if attempt == 0 else 0)
        assert index["counts"]["cached"] == (0 if attempt == 0 else 5)
    (old / "image.npy.away").rename(image)  # readable again: the next gallery computes it
    index = build_index(old)
    assert ct01(index)["qc_note"] == "" and ct01(index)["image.mean"] is not None
    assert index["counts"]["with_statistics"] == 6
    assert index["counts"]["from_arrays"] == 1 and index["counts"]["cached"] == 5


def test_inspect_html(store, tmp_path, capsys):
    out = store[0]
    assert main(["inspect", str(out), "--html", "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"QC gallery of 8 cases (2 failed, listed first; 6 with statistics): {out / 'qc' / 'index.html'}"
    assert main(["inspect", str(store[3]), "--html"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("volfm inspect: error: ") and "--html writes the QC gallery of a store" in err
    assert "\n" not in err
    with pytest.raises(StoreError, match="not a volfm store"):
        write_gallery(tmp_path)


# ----------------------------------------------------------------------------------- escaping, size
EVIL = '</script><script>alert("x")</script><img src=x onerror=alert(1)>&amp;'


def fake_store(root: Path, n_ok: int, n_failed: int, evil: bool = False) -> Path:
    """A manifest.csv (and spec.yaml) without case folders: the gallery of what the manifest says."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.yaml").write_text(yaml.safe_dump({"spec": {"name": "fake"}, "spec_hash": "0"}))
    cols = ["case_id", "status", "error", "shape", "spacing", "elapsed_s", "warnings", "split", "age"]
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i in range(n_failed):
            cid = f"{EVIL}{i}" if evil else f"f{i:05d}"
            w.writerow([cid, "failed", f"case {cid}: {EVIL if evil else 'broken'}", "", "", "0.1", "", "test", ""])
        for i in range(n_ok):
            w.writerow([f"c{i:05d}", "ok", "", "32x32x16", "3x3x6", f"{i % 7}.5", "", EVIL if evil else "train",
                        str(i % 90)])
    return root


def test_html_escapes_manifest_text(tmp_path):
    root = fake_store(tmp_path / "evil", 3, 2, evil=True)
    page = write_gallery(root).read_text(encoding="utf-8")
    assert page.count("</script>") == 2 and page.count("<script") == 2  # the data block and the page's script
    assert "<img src=x" not in page and 'alert("x")' not in page
    index = embedded_json(page)
    assert index == json.loads((root / "qc" / "index.json").read_text())
    recs = as_records(index)
    assert recs[0]["case_id"] == f"{EVIL}0" and recs[0]["error"] == f"case {EVIL}0: {EVIL}"
    assert recs[2]["split"] == EVIL
    assert all(r["qc_note"] == "no readable meta.json: no statistics" for r in recs[2:])


def write_fake_stats(root: Path, ids: list[str], outlier: str, seed: int = 0) -> None:
    """A meta.json with a grid and a ``stats`` block for each of ``ids`` (cheap: no arrays), the image's mean of
    ``outlier`` far above the others'."""
    rng = np.random.default_rng(seed)
    mean, p99, fg, ml = rng.normal(0.3, 0.02, len(ids)), rng.normal(0.9, 0.02, len(ids)), \
        rng.uniform(0.3, 0.4, len(ids)), rng.normal(150, 20, len(ids))
    for i, cid in enumerate(ids):
        stats = {"inputs": {"image": {"mean": 0.95 if cid == outlier else mean[i], "std": 0.2, "p1": 0.0,
                                      "p50": 0.25, "p99": p99[i]}},
                 "foreground": {"fraction": fg[i]}, "labels": {"label": {"total_ml": ml[i], "classes": {"1": ml[i]}}}}
        meta = {"case_id": cid, "shape": [32, 32, 16], "spacing": [3.0, 3.0, 6.0], "reference": "image",
                "source": {"image": {"shape": [1, 512, 512, 100 + i % 5], "spacing": [0.7, 0.7, 2.5]}},
                "stats": stats}
        (root / "cases" / cid).mkdir(parents=True)
        (root / "cases" / cid / "meta.json").write_text(json.dumps(meta))


def test_a_20000_case_index_keeps_its_layout_and_ranks_at_scale(tmp_path):
    root = fake_store(tmp_path / "big", 19_950, 50)
    with_stats = [f"c{i:05d}" for i in range(0, 19_950, 10)]  # a tenth of the ok cases have a meta.json
    outlier = with_stats[1234]
    write_fake_stats(root, with_stats, outlier)
    page = write_gallery(root)
    index = json.loads((root / "qc" / "index.json").read_text())
    assert index["counts"]["cases"] == 20_000 and len(index["rows"]) == 20_000
    assert index["counts"]["with_statistics"] == len(with_stats) and index["counts"]["from_meta"] == len(with_stats)
    width = len(index["fields"])
    assert all(len(r) == width for r in index["rows"])
    status = [r[1] for r in index["rows"]]
    assert status[:50] == ["failed"] * 50 and set(status[50:]) == {"ok"}
    assert index["numeric_columns"] == ["elapsed_s", "age"]
    # ok cases by descending outlier score, the cases without statistics (no score) last; the planted one first
    recs = as_records(index)[50:]
    scored = [r["outlier_score"] for r in recs[: len(with_stats)]]
    assert None not in scored and scored == sorted(scored, reverse=True)
    assert all(r["outlier_score"] is None for r in recs[len(with_stats):])
    assert {r["case_id"] for r in recs[: len(with_stats)]} == set(with_stats)
    assert recs[0]["case_id"] == outlier and recs[0]["outlier_feature"] == "image.mean"
    assert recs[0]["outlier_score"] > 10 > recs[1]["outlier_score"]
    assert abs(recs[0]["z:image.mean"]) == recs[0]["outlier_score"]
    assert page.stat().st_size < 8 * 2**20  # the README: 7.2 MiB with statistics for every case
