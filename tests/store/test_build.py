"""Cohort runner (volfm.store.build): store layout, per-case failures, resume, kill -9, shards.

Fixtures are small CT-like volumes (48 x 48 x 20 at 2.6 x 2.6 x 5.2 mm, a soft-tissue ellipsoid in air,
a label inside it) in RAS/LPS/LAS, written as NIfTI into tmp folders, plus one file per kind of
bad input. The spec is ct_merlin shrunk to 3 x 3 x 6 mm and a 32 x 32 x 16 crop to stay fast.
"""
import csv
import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from volfm import VolfmError
from volfm.io import Volume, axcodes, spacing_from_affine, voxel_to_world, write_nifti
from volfm.preprocess.pipeline import to_source_grid
from volfm.preprocess.spec import load_spec
from volfm.store.build import merge_shards, parse_shard, run_cohort, shard_of
from volfm.store.cohort import CohortError, load_cohort
from volfm.store.layout import StoreError

REPO = Path(__file__).resolve().parents[2]
CROP = [32, 32, 16]
N_GOOD = 8
ORIENTS = ["RAS", "LPS", "LAS", "RAS", "LPS", "LAS", "RAS", "LPS"]
# case id -> (file named in the error, regex for the cause)
BAD = {
    "bad_trunc": ("trunc.nii.gz", r"truncated or corrupt"),
    "bad_empty": ("empty.nii.gz", r"empty file \(0 bytes\)"),
    "bad_text": ("text.nii.gz", r"not a readable NIfTI"),
    "bad_nan": ("nan.nii.gz", r"NaN/inf voxels"),
    "bad_grid": ("grid_label.nii.gz", r"not on the grid .*shape \(40, 48, 20\) vs \(48, 48, 20\)"),
    "bad_shift": ("shift_label.nii.gz", r"not on the grid .*voxel positions differ by up to 4 mm"),
    "bad_missing": ("nope.nii.gz", r"file not found"),
    "bad_blank": ("", r"required input 'image' is empty"),
}
TABLE_COLUMNS = ["case_id", "image", "label", "icd_codes", "report", "split", "age", "scanner"]


@pytest.fixture(autouse=True)
def _no_slurm_array(monkeypatch):
    """Tests run inside a SLURM array job must not be sharded by its environment."""
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)


# ----------------------------------------------------------------------------------- helpers
def make_ct(seed, orient="RAS", shape=(48, 48, 20), sp=(2.6, 2.6, 5.2)):
    """A CT-like volume (HU, air outside a soft-tissue ellipsoid) and its label, on one grid.

    Voxels a little finer than the spec's 3 x 3 x 6 mm and not in a simple ratio with them (2 x 2 x 5 mm
    put half the stored voxel borders exactly on source voxel centres): the nearest round trip of the
    label is then exact to well under a voxel, as on patient data, and the map-back test can demand it.
    """
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    r = (((ii - c[0]) * sp[0]) / 30) ** 2 + (((jj - c[1]) * sp[1]) / 25) ** 2 + (((kk - c[2]) * sp[2]) / 40) ** 2
    img = np.where(r < 1, 40.0, -1000.0) + rng.normal(0, 10, shape)
    lab = (r < 0.3).astype(np.uint8)
    aff = np.diag([*sp, 1.0])
    for a, s in enumerate({"RAS": (1, 1, 1), "LPS": (-1, -1, 1), "LAS": (-1, 1, 1)}[orient]):
        aff[a, a] *= s
    aff[:3, 3] = rng.uniform(-30, 30, 3)
    return Volume(img[None].astype(np.float32), aff), Volume(lab[None], aff)


def small_spec(**changes) -> dict:
    spec = yaml.safe_load((REPO / "preprocessing" / "ct_merlin.yaml").read_text())
    spec["crop"]["size"] = list(CROP)
    spec["spacing"] = [3.0, 3.0, 6.0]
    spec.update(changes)
    return spec


def write_yaml(path, doc) -> Path:
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))
    return Path(path)


def write_csv(path, rows, columns=None, delimiter=",") -> Path:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter=delimiter, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hidden_entries(store) -> list[str]:
    store = Path(store)
    return sorted(p.name for d in (store / "cases", store / "qc") if d.is_dir() for p in d.iterdir()
                  if p.name.startswith("."))


def case_arrays(store, cid):
    d = Path(store) / "cases" / cid
    return {p.stem: np.load(p) for p in sorted(d.glob("*.npy"))}


class Cohort:
    def __init__(self, root: Path):
        self.root = root
        self.spec = write_yaml(root / "spec.yaml", small_spec())
        self.good = [f"ct{i:02d}" for i in range(N_GOOD)]
        self.rows = []
        for i, cid in enumerate(self.good):
            img, lab = make_ct(i, ORIENTS[i])
            write_nifti(img, root / "images" / f"{cid}.nii.gz", dtype=np.int16)
            write_nifti(lab, root / "labels" / f"{cid}.nii.gz")
            self.rows.append({"case_id": cid, "image": f"images/{cid}.nii.gz", "label": f"labels/{cid}.nii.gz",
                              "icd_codes": "I10;E11.9", "report": f"Findings for {cid}.", "split": "train",
                              "age": str(40 + i), "scanner": f"S{i % 2}"})
        bad_dir = root / "bad"
        bad_dir.mkdir()
        gz = (root / "images" / "ct00.nii.gz").read_bytes()
        (bad_dir / "trunc.nii.gz").write_bytes(gz[: len(gz) // 2])
        (bad_dir / "empty.nii.gz").write_bytes(b"")
        (bad_dir / "text.nii.gz").write_text("<html><body>404 Not Found</body></html>\n")
        img, _ = make_ct(50)
        a = img.array.copy()
        a[0, 10, 10, 5] = np.nan
        write_nifti(Volume(a, img.affine), bad_dir / "nan.nii.gz", dtype=np.float32)
        img, lab = make_ct(51)
        write_nifti(img, bad_dir / "grid_image.nii.gz", dtype=np.int16)
        write_nifti(Volume(lab.array[:, :40], lab.affine), bad_dir / "grid_label.nii.gz")
        shifted = lab.affine.copy()
        shifted[2, 3] += 4.0  # same shape, moved 4 mm
        write_nifti(Volume(lab.array, shifted), bad_dir / "shift_label.nii.gz")
        for cid, (fname, _) in BAD.items():
            image = "" if cid == "bad_blank" else f"bad/{fname}"
            label = ""
            if cid in ("bad_grid", "bad_shift"):
                image, label = "bad/grid_image.nii.gz", f"bad/{fname}"
            self.rows.append({"case_id": cid, "image": image, "label": label, "icd_codes": "", "report": "",
                              "split": "test", "age": "", "scanner": "S9"})
        self.table = write_csv(root / "cohort.csv", self.rows, TABLE_COLUMNS)
        self.good_table = write_csv(root / "good.csv", self.rows[:N_GOOD], TABLE_COLUMNS)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    return Cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def built(cohort, tmp_path_factory):
    """The mixed cohort preprocessed once (workers=1): (store path, summary)."""
    store = tmp_path_factory.mktemp("built") / "store"
    summary = run_cohort(cohort.spec, store, cohort=cohort.table, workers=1, progress=False)
    return store, summary


@pytest.fixture
def store_copy(built, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(built[0], dst)
    return dst


# ----------------------------------------------------------------------------------- one run
def test_summary_counts_and_failures(built):
    store, summary = built
    assert summary["ok"] == N_GOOD
    assert summary["failed"] == len(BAD)
    assert summary["skipped"] == 0
    assert summary["processed"] == N_GOOD + len(BAD)
    assert Path(summary["manifest"]) == store / "manifest.csv"
    assert Path(summary["store"]) == store
    assert sorted(cid for cid, _ in summary["failures"]) == sorted(BAD)


@pytest.mark.parametrize("cid", sorted(BAD))
def test_bad_case_fails_with_case_file_and_cause(built, cohort, cid):
    store, _ = built
    rows = {r["case_id"]: r for r in read_csv(store / "manifest.csv")}
    row = rows[cid]
    fname, cause = BAD[cid]
    assert row["status"] == "failed"
    err = row["error"]
    assert f"case {cid}" in err, err
    assert fname in err, err
    assert "\n" not in err
    assert re.search(cause, err), err
    assert "unexpected" not in err, f"a bad input must give a clear error, not a crash: {err}"
    assert not (store / "cases" / cid).exists()
    assert not (store / "qc" / f"{cid}.png").exists()


def test_manifest_rows_and_columns(built, cohort):
    store, _ = built
    rows = read_csv(store / "manifest.csv")
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in cohort.rows]
    header = list(rows[0].keys())
    assert header[:6] == ["case_id", "status", "error", "shape", "spacing", "elapsed_s"]
    for col in TABLE_COLUMNS:
        assert col in header
    by_id = {r["case_id"]: r for r in rows}
    for i, cid in enumerate(cohort.good):
        r = by_id[cid]
        assert r["status"] == "ok" and r["error"] == ""
        assert r["shape"] == "x".join(map(str, CROP))
        assert r["spacing"] == "3x3x6"
        assert r["icd_codes"] == "I10;E11.9"
        assert r["report"] == f"Findings for {cid}."
        assert r["split"] == "train" and r["age"] == str(40 + i) and r["scanner"] == f"S{i % 2}"
        # input paths are absolute, resolved against the table's folder
        assert Path(r["image"]).is_absolute() and Path(r["image"]) == cohort.root / "images" / f"{cid}.nii.gz"
        float(r["elapsed_s"])
    assert by_id["bad_trunc"]["split"] == "test" and by_id["bad_trunc"]["scanner"] == "S9"


def test_spec_yaml_has_hash_and_version(built, cohort):
    import volfm

    store, _ = built
    doc = yaml.safe_load((store / "spec.yaml").read_text())
    assert doc["volfm_version"] == volfm.__version__
    assert doc["spec"] == load_spec(cohort.spec)
    assert isinstance(doc["spec_hash"], str) and len(doc["spec_hash"]) >= 8


def test_case_folder_arrays_and_meta(built, cohort):
    store, _ = built
    h = yaml.safe_load((store / "spec.yaml").read_text())["spec_hash"]
    for i, cid in enumerate(cohort.good):
        d = store / "cases" / cid
        assert sorted(p.name for p in d.iterdir()) == ["image.npy", "label.npy", "label_fg.npz", "meta.json"]
        img = np.load(d / "image.npy", mmap_mode="r")
        lab = np.load(d / "label.npy", mmap_mode="r")
        assert isinstance(img, np.memmap) and isinstance(lab, np.memmap)
        assert img.dtype == np.float32 and img.shape == (1, *CROP)
        assert lab.dtype == np.uint8 and lab.shape == (1, *CROP)
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0  # ct_window to [0, 1]
        assert set(np.unique(lab)) == {0, 1}
        meta = json.loads((d / "meta.json").read_text())
        assert meta["case_id"] == cid and meta["spec_hash"] == h
        aff = np.asarray(meta["affine"])
        assert aff.shape == (4, 4)
        np.testing.assert_allclose(spacing_from_affine(aff), [3, 3, 6])
        assert axcodes(aff) == "RAS" and meta["orientation"] == "RAS"
        assert meta["shape"] == CROP
        assert meta["grid"]["crop_size"] == CROP and len(meta["grid"]["crop_start"]) == 3
        assert len(meta["grid"]["resampled_shape"]) == 3
        src_path = cohort.root / "images" / f"{cid}.nii.gz"
        for name, path in (("image", src_path), ("label", cohort.root / "labels" / f"{cid}.nii.gz")):
            src = meta["source"][name]
            assert Path(src["path"]) == path
            assert src["shape"] == [48, 48, 20]
            assert src["sha256"] == sha256(path)
            np.testing.assert_allclose(src["affine"], nib.load(str(path)).affine, atol=1e-5)
            assert src["orientation"] == ORIENTS[i]
        assert meta["intensity"]["image"]["type"] == "ct_window"
        assert meta["table"]["icd_codes"] == "I10;E11.9"


def dice(a, b):
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def one_voxel_shift_dice(truth):
    """The best Dice a copy of the (I, J, K) mask moved by one voxel along one axis (either way) gets."""
    best = 0.0
    for axis in range(3):
        for src, dst in ((slice(0, -1), slice(1, None)), (slice(1, None), slice(0, -1))):
            moved = np.zeros_like(truth)
            moved[(slice(None),) * axis + (dst,)] = truth[(slice(None),) * axis + (src,)]
            best = max(best, dice(moved, truth))
    return best


def world_centroid(mask, affine):
    """Centre of mass of a mask in RAS mm (voxel index -> mm through the affine, as nibabel)."""
    affine = np.asarray(affine, np.float64)
    return affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]


def test_meta_maps_the_label_back_to_the_source_grid(built, cohort):
    store, _ = built
    for cid in cohort.good[:3]:
        meta = json.loads((store / "cases" / cid / "meta.json").read_text())
        lab = np.load(store / "cases" / cid / "label.npy")
        back = to_source_grid(lab, meta, "label", order="nearest")
        src = nib.load(str(cohort.root / "labels" / f"{cid}.nii.gz"))
        np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
        assert back.shape == src.shape
        # exact to well under a voxel: world centroid within a quarter of a stored voxel, Dice above the best
        # the source label itself moved by one voxel gets
        a, b = back.array[0] > 0, np.asarray(src.dataobj) > 0
        stored = np.asarray(meta["affine"])
        off = np.linalg.solve(stored[:3, :3], world_centroid(a, src.affine) - world_centroid(b, src.affine))
        assert np.abs(off).max() <= 0.25, f"{cid}: centroid off by {off} stored voxels"
        dsc, bound = dice(a, b), one_voxel_shift_dice(b)
        assert dsc > bound, f"{cid}: Dice {dsc:.4f} <= {bound:.4f} of a one-voxel shift"
        # the stored grid keeps the source field of view's centre (centre crop, to half a stored voxel of rounding)
        centre = lambda aff, shape: voxel_to_world(np.asarray(aff), (np.asarray(shape) - 1) / 2.0)  # noqa: E731
        d = np.abs(centre(meta["affine"], meta["shape"]) - centre(src.affine, src.shape))
        assert np.all(d <= np.asarray(meta["spacing"]) / 2 + 1e-4), d


def test_qc_png_per_ok_case(built, cohort):
    import matplotlib.image as mpimg

    store, _ = built
    pngs = sorted(p.name for p in (store / "qc").glob("*.png"))
    assert pngs == sorted(f"{cid}.png" for cid in cohort.good)
    others = sorted(p.name for p in (store / "qc").iterdir() if p.suffix != ".png")
    assert others == ["index.html", "index.json", "stats_cache.json"]  # the gallery (volfm.store.gallery)
    for name in pngs[:2]:
        data = (store / "qc" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"IHDR" in data[:32] and b"IEND" in data[-12:]
        im = mpimg.imread(store / "qc" / name)
        assert im.ndim == 3 and im.shape[0] > 100 and im.shape[1] > 100


def test_no_leftover_temp_files(built):
    store, _ = built
    assert hidden_entries(store) == []
    assert [p.name for p in store.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------------- resume
def test_rerun_skips_ok_cases_and_redoes_failed(store_copy, cohort):
    before = {cid: (store_copy / "cases" / cid / "image.npy").stat().st_mtime_ns for cid in cohort.good}
    summary = run_cohort(cohort.spec, store_copy, cohort=cohort.table, progress=False)
    assert summary["skipped"] == summary["ok"] == N_GOOD
    assert summary["processed"] == len(BAD) and summary["failed"] == len(BAD)
    rows = {r["case_id"]: r for r in read_csv(store_copy / "manifest.csv")}
    for cid in cohort.good:
        assert rows[cid]["status"] == "ok" and rows[cid]["elapsed_s"] == "skipped"
        assert rows[cid]["shape"] == "32x32x16" and rows[cid]["spacing"] == "3x3x6"
        assert (store_copy / "cases" / cid / "image.npy").stat().st_mtime_ns == before[cid]
    for cid in BAD:
        assert rows[cid]["status"] == "failed" and rows[cid]["elapsed_s"] != "skipped"


def test_changed_spec_refused_unless_overwrite(store_copy, cohort, tmp_path):
    spec2 = write_yaml(tmp_path / "spec2.yaml", small_spec(spacing=[4.0, 4.0, 6.0]))
    manifest_before = (store_copy / "manifest.csv").read_bytes()
    with pytest.raises(StoreError, match="another spec.*--overwrite"):
        run_cohort(spec2, store_copy, cohort=cohort.good_table, progress=False)
    assert (store_copy / "manifest.csv").read_bytes() == manifest_before
    summary = run_cohort(spec2, store_copy, cohort=cohort.good_table, overwrite=True, progress=False)
    assert summary["ok"] == N_GOOD and summary["skipped"] == 0 and summary["processed"] == N_GOOD
    h2 = yaml.safe_load((store_copy / "spec.yaml").read_text())["spec_hash"]
    for cid in cohort.good:
        meta = json.loads((store_copy / "cases" / cid / "meta.json").read_text())
        assert meta["spec_hash"] == h2
        np.testing.assert_allclose(meta["spacing"], [4, 4, 6])
    assert hidden_entries(store_copy) == []


def test_overwrite_redoes_every_case(store_copy, cohort):
    summary = run_cohort(cohort.spec, store_copy, cohort=cohort.good_table, overwrite=True, progress=False)
    assert summary["skipped"] == 0 and summary["processed"] == summary["ok"] == N_GOOD


def test_simulated_kill_leftovers_are_redone(store_copy, cohort):
    cases = store_copy / "cases"
    h = yaml.safe_load((store_copy / "spec.yaml").read_text())["spec_hash"]
    # a half-written case folder of a killed run (pid 123), and a half-written QC image
    tmp = cases / f".{cohort.good[0]}.tmp-123"
    tmp.mkdir()
    (tmp / "image.npy").write_bytes(b"\x93NUMPY half")
    (store_copy / "qc" / f".{cohort.good[1]}.tmp-999.png").write_bytes(b"\x89PNG")
    (cases / "case.tmp-123").mkdir()  # not a temp name: a user folder is never touched
    (cases / cohort.good[2] / "meta.json").unlink()  # killed while building: no meta -> redo
    (store_copy / "qc" / f"{cohort.good[3]}.png").unlink()  # killed between case folder and QC -> redo
    meta4 = cases / cohort.good[4] / "meta.json"
    meta4.write_text(meta4.read_text()[:40])  # unreadable meta.json -> redo
    summary = run_cohort(cohort.spec, store_copy, cohort=cohort.good_table, progress=False)
    redone = {cohort.good[2], cohort.good[3], cohort.good[4]}
    assert summary["ok"] == N_GOOD and summary["failed"] == 0
    assert summary["skipped"] == N_GOOD - len(redone) and summary["processed"] == len(redone)
    rows = {r["case_id"]: r for r in read_csv(store_copy / "manifest.csv")}
    assert {cid for cid, r in rows.items() if r["elapsed_s"] != "skipped"} == redone
    for cid in cohort.good:
        assert json.loads((cases / cid / "meta.json").read_text())["spec_hash"] == h
        assert np.load(cases / cid / "image.npy", mmap_mode="r").shape == (1, *CROP)
        assert (store_copy / "qc" / f"{cid}.png").exists()
    assert hidden_entries(store_copy) == []
    assert (cases / "case.tmp-123").is_dir()


def _volfm_cmd():
    exe = shutil.which("volfm")
    return [exe] if exe else [sys.executable, "-m", "volfm.cli.main"]


def test_kill_minus_9_then_resume(cohort, tmp_path):
    # 16 cases (the 8 good files twice, absolute paths) leave ample time to kill the run mid-way
    n = 2 * N_GOOD
    rows = [dict(r, case_id=f"k{i:02d}", image=str(cohort.root / r["image"]), label=str(cohort.root / r["label"]))
            for i, r in enumerate(cohort.rows[:N_GOOD] * 2)]
    table = write_csv(tmp_path / "kill.csv", rows, TABLE_COLUMNS)
    ids = [r["case_id"] for r in rows]
    store = tmp_path / "store"
    cmd = _volfm_cmd() + ["preprocess", "--spec", str(cohort.spec), "--cohort", str(table),
                          "--out", str(store), "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    cases, qc = store / "cases", store / "qc"
    try:  # kill as soon as the first case is finished (its case folder and then its QC image)
        while time.monotonic() < deadline and proc.poll() is None:
            if qc.is_dir() and any(not p.name.startswith(".") for p in qc.iterdir()):
                break
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.read().decode()[-2000:])
    assert not (store / "manifest.csv").exists(), "the run finished before it was killed"
    done = {p.name for p in cases.iterdir() if not p.name.startswith(".")}
    assert 1 <= len(done) < n
    for cid in done:  # a case folder that exists is complete
        assert np.load(cases / cid / "image.npy", mmap_mode="r").shape == (1, *CROP)
        json.loads((cases / cid / "meta.json").read_text())
    with_qc = {cid for cid in done if (store / "qc" / f"{cid}.png").exists()}
    summary = run_cohort(cohort.spec, store, cohort=table, progress=False)
    assert summary["ok"] == n and summary["failed"] == 0
    assert summary["skipped"] == len(with_qc) >= 1
    rows = read_csv(store / "manifest.csv")
    assert [r["case_id"] for r in rows] == ids
    assert {r["case_id"] for r in rows if r["elapsed_s"] == "skipped"} == with_qc
    assert all(r["status"] == "ok" for r in rows)
    assert hidden_entries(store) == []


# ----------------------------------------------------------------------------------- table errors
@pytest.mark.parametrize("problem, match", [
    ("duplicate", r"duplicate case_id 'ct01' on rows 3 and 4"),
    ("no_case_id", r"no 'case_id' column"),
    ("no_image", r"column\(s\) image required by spec"),
    ("bad_id", r"case_id '\.\./x' must be"),
    ("extra_cells", r"row 3 \(case ct01\) has 9 cells but the header has 8"),
])
def test_table_errors_before_anything_is_written(cohort, tmp_path, problem, match):
    rows = [dict(r) for r in cohort.rows[:3]]
    columns = list(TABLE_COLUMNS)
    if problem == "duplicate":
        rows[2]["case_id"] = "ct01"
    elif problem == "no_case_id":
        columns.remove("case_id")
    elif problem == "no_image":
        columns.remove("image")
    elif problem == "bad_id":
        rows[1]["case_id"] = "../x"
    table = cohort.root / f"table_{problem}.csv"
    write_csv(table, rows, columns)
    if problem == "extra_cells":  # an unquoted comma in a report shifts the cells
        lines = table.read_text().splitlines()
        lines[2] = lines[2].replace("Findings for ct01.", "Findings, ct01")
        table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "store"
    with pytest.raises(CohortError, match=match) as info:
        run_cohort(cohort.spec, out, cohort=table, progress=False)
    assert str(table) in str(info.value)
    assert not out.exists()


def test_missing_table_and_both_sources(cohort, tmp_path):
    with pytest.raises(CohortError, match="not found"):
        run_cohort(cohort.spec, tmp_path / "s", cohort=tmp_path / "nope.csv", progress=False)
    with pytest.raises(VolfmError, match="exactly one"):
        run_cohort(cohort.spec, tmp_path / "s", cohort=cohort.table, input_dir=cohort.root, progress=False)
    assert not (tmp_path / "s").exists()


def test_unknown_image_column_warns(cohort, tmp_path):
    rows = [dict(r, ct_prior=f"images/{r['case_id']}.nii.gz", note="x") for r in cohort.rows[:2]]
    table = write_csv(tmp_path / "t.csv", rows)
    with pytest.warns(UserWarning, match=r"column\(s\) ct_prior hold image paths") as rec:
        out = load_cohort(table, load_spec(cohort.spec))
    assert not any("note" in str(w.message) for w in rec)
    assert out[0]["ct_prior"] == "images/ct00.nii.gz"  # carried as metadata, untouched


# ----------------------------------------------------------------------------------- workers
def test_two_workers_give_the_same_arrays(built, cohort, tmp_path):
    store1, _ = built
    # a table in another folder, with absolute paths
    rows = [dict(r, image=str(cohort.root / r["image"]), label=str(cohort.root / r["label"]) if r["label"] else "")
            for r in cohort.rows[:3] + [r for r in cohort.rows if r["case_id"] == "bad_trunc"]]
    table = write_csv(tmp_path / "t.csv", rows, TABLE_COLUMNS)
    store2 = tmp_path / "store"
    summary = run_cohort(cohort.spec, store2, cohort=table, workers=2, progress=False)
    assert summary["ok"] == 3 and summary["failed"] == 1
    rows2 = read_csv(store2 / "manifest.csv")
    assert [r["case_id"] for r in rows2] == [r["case_id"] for r in rows]  # table order, not finish order
    for cid in cohort.good[:3]:
        a, b = case_arrays(store1, cid), case_arrays(store2, cid)
        assert a.keys() == b.keys() == {"image", "label"}
        for k in a:
            assert a[k].dtype == b[k].dtype
            np.testing.assert_array_equal(a[k], b[k])
        m1 = json.loads((store1 / "cases" / cid / "meta.json").read_text())
        m2 = json.loads((store2 / "cases" / cid / "meta.json").read_text())
        assert m1["affine"] == m2["affine"] and m1["grid"] == m2["grid"] and m1["spec_hash"] == m2["spec_hash"]
    assert hidden_entries(store2) == []


def test_a_dead_worker_fails_its_cases_not_the_run(cohort, tmp_path, monkeypatch):
    """A worker killed (e.g. by the OOM killer) breaks the pool: the run still ends with a manifest."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    import volfm.store.build as runner

    class DyingPool:  # runs cases in-process; the pool "breaks" on the second case
        def __init__(self, *args, **kwargs):
            self.n = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *args):
            f = Future()
            self.n += 1
            if self.n >= 2:
                f.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
            else:
                f.set_result(fn(*args))
            return f

    monkeypatch.setattr(runner, "ProcessPoolExecutor", DyingPool)
    store = tmp_path / "store"
    summary = run_cohort(cohort.spec, store, cohort=cohort.good_table, workers=2, progress=False)
    assert summary["ok"] == 1 and summary["failed"] == N_GOOD - 1
    rows = read_csv(store / "manifest.csv")
    assert [r["case_id"] for r in rows] == cohort.good
    assert rows[0]["status"] == "ok"
    for r in rows[1:]:
        assert r["status"] == "failed"
        assert r["error"].startswith(f"case {r['case_id']}: worker process failed (BrokenProcessPool")
    monkeypatch.undo()
    summary = run_cohort(cohort.spec, store, cohort=cohort.good_table, workers=1, progress=False)
    assert summary["ok"] == N_GOOD and summary["skipped"] == 1


# ----------------------------------------------------------------------------------- shards
def test_parse_shard(monkeypatch):
    assert parse_shard(None) is None
    assert parse_shard("0/2") == (0, 2) and parse_shard("3/4") == (3, 4)
    for bad in ("2/2", "-1/2", "0/0", "a/b", "1", "1/2/3"):
        with pytest.raises(VolfmError, match="shard"):
            parse_shard(bad)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert parse_shard(None) == (1, 2)
    assert parse_shard("0/3") == (0, 3)  # an explicit --shard wins
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # sbatch --array=1-2
    assert parse_shard(None) == (1, 2)


def test_shards_then_merge(cohort, tmp_path, monkeypatch):
    ids = [r["case_id"] for r in cohort.rows]
    assert {shard_of(c, 2) for c in ids} == {0, 1}
    store = tmp_path / "store"
    s0 = run_cohort(cohort.spec, store, cohort=cohort.table, shard=(0, 2), progress=False)
    assert Path(s0["manifest"]) == store / "manifests" / "shard-0-of-2.csv"
    assert not (store / "manifest.csv").exists()
    in0 = [r["case_id"] for r in read_csv(store / "manifests" / "shard-0-of-2.csv")]
    assert in0 == [c for c in ids if shard_of(c, 2) == 0]
    assert sorted(p.name for p in (store / "cases").iterdir()) == sorted(c for c in in0 if c in cohort.good)
    with pytest.raises(StoreError, match=r"shards still to run: 1/2"):
        merge_shards(store)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    s1 = run_cohort(cohort.spec, store, cohort=cohort.table, shard=parse_shard(None), progress=False)
    assert s0["ok"] + s1["ok"] == N_GOOD and s0["failed"] + s1["failed"] == len(BAD)
    merged = merge_shards(store)
    assert merged["ok"] == N_GOOD and merged["failed"] == len(BAD)
    rows = read_csv(store / "manifest.csv")
    assert [r["case_id"] for r in rows] == ids
    assert list(rows[0].keys())[:6] == ["case_id", "status", "error", "shape", "spacing", "elapsed_s"]
    assert all(c in rows[0] for c in TABLE_COLUMNS)
    assert {r["case_id"] for r in rows if r["status"] == "ok"} == set(cohort.good)
    assert sorted(p.name for p in (store / "cases").iterdir()) == sorted(cohort.good)


def test_merge_errors(cohort, tmp_path):
    with pytest.raises(StoreError, match="no shard manifests"):
        merge_shards(tmp_path)
    store = tmp_path / "store"
    run_cohort(cohort.spec, store, cohort=cohort.good_table, shard=(0, 3), progress=False)
    run_cohort(cohort.spec, store, cohort=cohort.good_table, shard=(1, 2), progress=False)
    with pytest.raises(StoreError, match="different shard counts"):
        merge_shards(store)


def test_merge_with_an_empty_shard(cohort, tmp_path):
    """More shards than cases: a shard with no case writes a header-only manifest; merging still works."""
    table = write_csv(tmp_path / "one.csv", [dict(cohort.rows[0], image=str(cohort.root / cohort.rows[0]["image"]),
                                                  label=str(cohort.root / cohort.rows[0]["label"]))], TABLE_COLUMNS)
    store = tmp_path / "store"
    n = 3
    for i in range(n):
        run_cohort(cohort.spec, store, cohort=table, shard=(i, n), progress=False, qc=False)
    merged = merge_shards(store)
    assert merged["ok"] == 1
    rows = read_csv(store / "manifest.csv")
    assert [r["case_id"] for r in rows] == ["ct00"] and "split" in rows[0]


# ----------------------------------------------------------------------------------- --input-dir
def test_input_dir_nnunet_layout(tmp_path):
    d = tmp_path / "Dataset001"
    (d / "imagesTr").mkdir(parents=True)
    (d / "labelsTr").mkdir()
    for n, (cid, orient) in enumerate([("case_001", "RAS"), ("case_002", "LPS"), ("a_nolabel", "LAS")]):
        img, lab = make_ct(n, orient)
        write_nifti(img, d / "imagesTr" / f"{cid}_0000.nii.gz", dtype=np.int16)
        if cid != "a_nolabel":
            write_nifti(lab, d / "labelsTr" / f"{cid}.nii.gz")
    (d / "imagesTr" / "._case_001_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS litter
    (d / "dataset.json").write_text("{}")
    spec = write_yaml(tmp_path / "spec.yaml", small_spec())
    store = tmp_path / "store"
    summary = run_cohort(spec, store, input_dir=d, progress=False)
    assert summary["ok"] == 3 and summary["failed"] == 0, summary["failures"]
    rows = read_csv(store / "manifest.csv")
    assert [r["case_id"] for r in rows] == ["a_nolabel", "case_001", "case_002"]
    by_id = {r["case_id"]: r for r in rows}
    assert by_id["case_001"]["label"] == str(d / "labelsTr" / "case_001.nii.gz")
    assert by_id["a_nolabel"]["label"] == ""
    assert Path(by_id["case_002"]["image"]) == d / "imagesTr" / "case_002_0000.nii.gz"
    assert (store / "cases" / "case_001" / "label.npy").exists()
    assert not (store / "cases" / "a_nolabel" / "label.npy").exists()
    assert (store / "cohort.csv").exists()


def test_input_dir_relative_path(tmp_path, monkeypatch):
    d = tmp_path / "flat"
    d.mkdir()
    img, _ = make_ct(3)
    write_nifti(img, d / "scan1.nii.gz", dtype=np.int16)
    spec = write_yaml(tmp_path / "spec.yaml", small_spec())
    monkeypatch.chdir(tmp_path)
    summary = run_cohort("spec.yaml", "store", input_dir="flat", progress=False, qc=False)
    assert summary["ok"] == 1
    meta = json.loads((tmp_path / "store" / "cases" / "scan1" / "meta.json").read_text())
    assert Path(meta["source"]["image"]["path"]) == d / "scan1.nii.gz"  # absolute: usable from any folder
    assert spec.exists()
