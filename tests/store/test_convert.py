"""Re-encoding a store (volfm.store.arrays.convert_store, and volfm preprocess with another storage block): the same
bytes as a direct build, resumable, failures recorded, back to npy, never resampling."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import volfm.store.arrays as arrays_mod
from volfm.data.dataset import StoreDataset
from volfm.preprocess.pipeline import Pipeline
from volfm.preprocess.spec import SpecError
from volfm.store.arrays import convert_case, convert_store, open_array, try_convert_case
from volfm.store.build import run_cohort
from volfm.store.cohort import read_table, write_table
from volfm.store.foreground import load_foreground_locations
from volfm.synth.ct import make_ct_cohort

REPO = Path(__file__).resolve().parents[2]
COMPACT = "codec=blosc2,dtype=compact,chunk_patch=32"
CASES = ["ct_0000", "ct_0001", "ct_0002"]


@pytest.fixture(autouse=True)
def _no_slurm_array(monkeypatch):
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """3 synthetic CT cases (image + label) built twice from the same table: npy float32 and blosc2 compact."""
    d = tmp_path_factory.mktemp("convert")
    table = make_ct_cohort(d / "cohort", 3, seed=3, shape=(40, 40, 20), progress=False)
    spec = yaml.safe_load((REPO / "preprocessing" / "ct_merlin.yaml").read_text())
    spec["spacing"], spec["crop"] = [4.0, 4.0, 6.0], None
    (d / "spec.yaml").write_text(yaml.safe_dump(spec))
    quiet = {"progress": False, "qc": False, "log": lambda *a: None}
    assert run_cohort(d / "spec.yaml", d / "npy", cohort=table, **quiet)["ok"] == 3
    assert run_cohort(d / "spec.yaml", d / "b2", cohort=table, storage=COMPACT, **quiet)["ok"] == 3
    return {"dir": d, "table": table, "spec": d / "spec.yaml", "npy": d / "npy", "b2": d / "b2"}


def copy_store(src, dst) -> Path:
    shutil.copytree(src, dst)
    return dst


def meta(store, cid) -> dict:
    return json.loads((store / "cases" / cid / "meta.json").read_text())


def hidden(store) -> list[str]:
    return sorted(p.name for p in (store / "cases").iterdir() if p.name.startswith("."))


def spec_storage(store) -> dict:
    return yaml.safe_load((store / "spec.yaml").read_text())["spec"]["storage"]


def manifest_rows(store) -> dict:
    return {r["case_id"]: r for r in read_table(store / "manifest.csv")}


NPY = {"codec": "npy", "dtype": "float32", "chunk_patch": [96, 96, 96], "clevel": 5}
B2 = {"codec": "blosc2", "dtype": "compact", "chunk_patch": [32, 32, 32], "clevel": 5}


def test_convert_roundtrip_bytes_equal_direct_build(built, tmp_path):
    store = copy_store(built["npy"], tmp_path / "s")
    s = convert_store(store, COMPACT, progress=False)
    assert (s["converted"], s["skipped"], s["failed"]) == (3, 0, 0)
    assert s["bytes_after"] < 0.3 * s["bytes_before"]
    for cid in CASES:
        got, direct = store / "cases" / cid, built["b2"] / "cases" / cid
        assert sorted(p.name for p in got.iterdir()) == ["image.b2nd", "label.b2nd", "label_fg.npz", "meta.json"]
        for name in ("image.b2nd", "label.b2nd"):
            assert (got / name).read_bytes() == (direct / name).read_bytes(), (cid, name)
        assert meta(store, cid)["storage"] == meta(built["b2"], cid)["storage"]
        # decoded: labels equal, images within the recorded error of the float32 store
        rec = meta(store, cid)["storage"]
        old = {n: np.load(built["npy"] / "cases" / cid / f"{n}.npy") for n in ("image", "label")}
        new = {n: np.asarray(open_array(got, n, rec[n])) for n in ("image", "label")}
        assert np.array_equal(new["label"], old["label"])
        err = float(np.abs(new["image"].astype(np.float64) - old["image"]).max())
        assert err == pytest.approx(rec["image"]["max_abs_error"], rel=1e-12) and err <= 0.5 / 2000 + 1e-7
        # foreground locations recomputed, stamped with the new label file
        label = open_array(got, "label", rec["label"])
        locs = load_foreground_locations(got / "label_fg.npz", label, got / "label.b2nd")
        with np.load(direct / "label_fg.npz") as z:
            assert locs is not None and all(np.array_equal(locs[int(k[1:])], z[k]) for k in z.files if k[0] == "c")
    doc = yaml.safe_load((store / "spec.yaml").read_text())
    assert doc["spec"]["storage"] == {"codec": "blosc2", "dtype": "compact", "chunk_patch": [32, 32, 32], "clevel": 5}
    assert doc["spec_hash"] == yaml.safe_load((built["npy"] / "spec.yaml").read_text())["spec_hash"]
    assert hidden(store) == []
    # a rerun finds nothing to do
    s = convert_store(store, COMPACT, progress=False)
    assert (s["converted"], s["skipped"]) == (0, 3)


def test_convert_resumes_after_kill(built, tmp_path, monkeypatch):
    store = copy_store(built["npy"], tmp_path / "s")
    convert_case(store, "ct_0000", {"codec": "blosc2", "dtype": "compact", "chunk_patch": [32, 32, 32]})
    # what a run killed later left behind: a half-written temp folder, and a case renamed away but not replaced
    tmp = store / "cases" / ".ct_0001.tmp-99999"
    tmp.mkdir()
    (tmp / "image.b2nd").write_bytes(b"half")
    (store / "cases" / "ct_0002").rename(store / "cases" / ".ct_0002.old-99999")
    s = convert_store(store, COMPACT, progress=False)
    assert (s["converted"], s["skipped"], s["failed"]) == (2, 1, 0)
    assert hidden(store) == []
    for cid in CASES:
        assert (store / "cases" / cid / "image.b2nd").read_bytes() == \
            (built["b2"] / "cases" / cid / "image.b2nd").read_bytes()
    # a case that cannot be converted is failed in the manifest, the others go on, nothing half-written stays
    store2 = copy_store(built["npy"], tmp_path / "s2")
    bad = store2 / "cases" / "ct_0001" / "image.npy"
    bad.write_bytes(bad.read_bytes()[:500])
    s = convert_store(store2, COMPACT, progress=False)
    assert (s["converted"], s["failed"]) == (2, 1)
    cid, err = s["failures"][0]
    assert cid == "ct_0001" and "case ct_0001" in err and "image.npy" in err and "\n" not in err
    rows = {r["case_id"]: r for r in read_table(store2 / "manifest.csv")}
    assert rows["ct_0001"]["status"] == "failed" and rows["ct_0001"]["error"] == err
    assert rows["ct_0000"]["status"] == "ok" and (store2 / "cases" / "ct_0001" / "image.npy").is_file()
    assert hidden(store2) == []
    # while a case failed, spec.yaml does not claim the new storage (one case is still npy), and the summary says so
    assert spec_storage(store2) == NPY
    assert s["note"].startswith("spec.yaml keeps storage npy float32 while 1 case(s) failed") and not s["spec_updated"]


def test_convert_retries_a_failed_case_once_restored(built, tmp_path):
    """A case convert_store marked failed is retried by a rerun (its folder is whole again), set back to ok."""
    store = copy_store(built["npy"], tmp_path / "s")
    bad = store / "cases" / "ct_0001" / "image.npy"
    good = bad.read_bytes()
    bad.write_bytes(good[:500])
    s = convert_store(store, COMPACT, progress=False)
    assert (s["converted"], s["failed"]) == (2, 1)
    assert manifest_rows(store)["ct_0001"]["status"] == "failed" and spec_storage(store) == NPY
    assert (s["marked_failed"], s["retried"]) == (1, 0)
    # still damaged: retried, still failed (same reason), spec.yaml still npy
    s = convert_store(store, COMPACT, progress=False)
    assert (s["converted"], s["skipped"], s["failed"]) == (0, 2, 1)
    assert "image.npy" in s["failures"][0][1] and spec_storage(store) == NPY
    assert (s["retried"], s["recovered"]) == (1, 0)
    bad.write_bytes(good)  # restored (e.g. from a backup)
    s = convert_store(store, COMPACT, progress=False)
    assert (s["converted"], s["skipped"], s["failed"]) == (1, 2, 0)
    row = manifest_rows(store)["ct_0001"]
    assert (row["status"], row["error"]) == ("ok", "") and spec_storage(store) == B2
    assert (s["retried"], s["recovered"], s["note"], s["spec_updated"]) == (1, 1, "", True)
    assert (store / "cases" / "ct_0001" / "image.b2nd").read_bytes() == \
        (built["b2"] / "cases" / "ct_0001" / "image.b2nd").read_bytes()
    assert StoreDataset(store).array("ct_0001", "image").shape == (1,) + tuple(
        int(x) for x in row["shape"].split("x"))


def test_convert_retry_checks_files_even_without_reencoding(built, tmp_path):
    """A failed case already in the wanted encoding is not set back to ok unless its files match their sha256."""
    store = copy_store(built["npy"], tmp_path / "s")
    bad = store / "cases" / "ct_0001" / "image.npy"
    data = bytearray(bad.read_bytes())
    data[-100] ^= 0x01  # a flipped bit: only the sha256 sees it
    bad.write_bytes(bytes(data))
    assert convert_store(store, COMPACT, progress=False)["failed"] == 1
    s = convert_store(store, {"codec": "npy", "dtype": "float32"}, progress=False)  # ct_0001 is npy already
    assert s["failed"] == 1 and "sha256 mismatch" in s["failures"][0][1]
    assert manifest_rows(store)["ct_0001"]["status"] == "failed" and (s["retried"], s["recovered"]) == (1, 0)


def test_convert_does_not_retake_a_failed_case_whose_folder_is_stale(built, tmp_path):
    """A case failed by volfm preprocess (its source changed) keeps an older folder: not converted, not set ok."""
    store = copy_store(built["npy"], tmp_path / "s")
    rows = read_table(store / "manifest.csv")
    for r in rows:
        if r["case_id"] == "ct_0002":
            r.update(status="failed", error="case ct_0002: image: truncated or corrupt file")
    write_table(store / "manifest.csv", rows, list(rows[0]))
    src = meta(store, "ct_0002")["source"]["image"]
    m = meta(store, "ct_0002")
    m["source"]["image"]["mtime_ns"] = src["mtime_ns"] - 10**9  # the source file changed after the case was made
    (store / "cases" / "ct_0002" / "meta.json").write_text(json.dumps(m))
    s = convert_store(store, COMPACT, progress=False)
    assert (s["converted"], s["failed"]) == (2, 0) and spec_storage(store) == B2
    assert manifest_rows(store)["ct_0002"]["status"] == "failed"
    assert (store / "cases" / "ct_0002" / "image.npy").is_file() and s["retried"] == 0


def test_convert_failure_without_damage_keeps_the_case_ok(built, tmp_path, monkeypatch):
    """A full disk (or any failure that leaves the case whole) is no reason to take a case out of the store."""
    store = copy_store(built["npy"], tmp_path / "s")
    write_array = arrays_mod.write_array

    def disk_full(directory, name, *a, **k):
        if "ct_0001" in str(directory):
            raise OSError(28, "No space left on device")
        return write_array(directory, name, *a, **k)

    monkeypatch.setattr(arrays_mod, "write_array", disk_full)
    s = convert_store(store, COMPACT, progress=False)
    assert (s["converted"], s["failed"]) == (2, 1)
    assert manifest_rows(store)["ct_0001"]["status"] == "ok" and spec_storage(store) == NPY
    err = s["failures"][0][1]
    assert err.startswith("case ct_0001: unexpected OSError") and "left whole in its old encoding" in err
    assert s["marked_failed"] == 0 and s["note"].startswith("spec.yaml keeps storage npy float32 while 1 case(s) failed")
    assert np.array_equal(StoreDataset(store).array("ct_0001", "image"),
                          np.load(built["npy"] / "cases" / "ct_0001" / "image.npy"))
    assert hidden(store) == []
    monkeypatch.undo()
    s = convert_store(store, COMPACT, progress=False)
    assert (s["converted"], s["skipped"], s["failed"]) == (1, 2, 0) and spec_storage(store) == B2


def test_one_conversion_wrapper_for_both_commands(built, tmp_path, monkeypatch):
    """convert_store and volfm preprocess report a failed conversion with the same one-line error."""
    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(arrays_mod, "write_array", boom)
    a = copy_store(built["npy"], tmp_path / "a")
    b = copy_store(built["npy"], tmp_path / "b")
    via_convert = dict(convert_store(a, COMPACT, progress=False)["failures"])
    quiet = {"progress": False, "qc": False, "log": lambda *x: None}
    via_preprocess = dict(run_cohort(built["spec"], b, cohort=built["table"], storage=COMPACT, **quiet)["failures"])
    assert via_convert == via_preprocess and set(via_convert) == set(CASES)
    direct = try_convert_case(copy_store(built["npy"], tmp_path / "c"), "ct_0000", B2)
    assert via_convert["ct_0000"] == direct["error"] and "\n" not in direct["error"]
    assert direct["error"].startswith("case ct_0000: unexpected RuntimeError: boom second line while converting")


def test_convert_back_to_npy_float32(built, tmp_path):
    store = copy_store(built["b2"], tmp_path / "s")
    s = convert_store(store, {"codec": "npy", "dtype": "float32"}, workers=2, progress=False)  # worker processes
    assert s["converted"] == 3
    for cid in CASES:
        d = store / "cases" / cid
        assert sorted(p.name for p in d.iterdir()) == ["image.npy", "label.npy", "label_fg.npz", "meta.json"]
        b2 = meta(built["b2"], cid)["storage"]
        rec = meta(store, cid)["storage"]
        img = StoreDataset(store).array(cid, "image")
        assert isinstance(img, np.memmap) and img.dtype == np.float32
        # the decoded compact values, bit for bit; the error against the pipeline's floats is carried over
        want = np.asarray(open_array(built["b2"] / "cases" / cid, "image", b2["image"]))
        assert np.array_equal(np.asarray(img).view(np.uint32), want.view(np.uint32))
        assert rec["image"]["encoding"] == "raw" and rec["image"]["max_abs_error"] == b2["image"]["max_abs_error"]
        assert np.array_equal(np.load(d / "label.npy"), np.load(built["npy"] / "cases" / cid / "label.npy"))
        lab = np.load(d / "label.npy", mmap_mode="r")
        assert load_foreground_locations(d / "label_fg.npz", lab, d / "label.npy") is not None


def test_run_cohort_after_storage_change_converts_without_resampling(built, tmp_path, monkeypatch):
    store = copy_store(built["npy"], tmp_path / "s")

    def no_resampling(self, *a, **k):
        raise AssertionError("the pipeline ran: a storage change must not resample")

    monkeypatch.setattr(Pipeline, "__call__", no_resampling)
    quiet = {"progress": False, "qc": False, "log": lambda *a: None}
    s = run_cohort(built["spec"], store, cohort=built["table"], storage=COMPACT, **quiet)
    assert (s["ok"], s["failed"], s["processed"], s["converted"], s["skipped"]) == (3, 0, 0, 3, 0)
    for cid in CASES:
        assert (store / "cases" / cid / "image.b2nd").read_bytes() == \
            (built["b2"] / "cases" / cid / "image.b2nd").read_bytes()
    assert yaml.safe_load((store / "spec.yaml").read_text())["spec"]["storage"]["codec"] == "blosc2"
    s = run_cohort(built["spec"], store, cohort=built["table"], storage=COMPACT, **quiet)
    assert (s["processed"], s["converted"], s["skipped"]) == (0, 0, 3)
    # a spec without a storage block, no --storage: the store keeps its own storage, nothing is converted
    s = run_cohort(built["spec"], store, cohort=built["table"], **quiet)
    assert (s["processed"], s["converted"], s["skipped"]) == (0, 0, 3)
    assert s["storage"] == B2 and s["storage_from"] == "kept from the store's spec.yaml"
    assert (store / "cases" / "ct_0000" / "image.b2nd").is_file() and spec_storage(store) == B2
    # and back, when asked: by --storage, or by a storage block in the spec file
    s = run_cohort(built["spec"], store, cohort=built["table"], storage="codec=npy", **quiet)
    assert (s["processed"], s["converted"]) == (0, 3) and spec_storage(store) == NPY
    assert (store / "cases" / "ct_0000" / "image.npy").is_file()
    spec = yaml.safe_load(built["spec"].read_text())
    spec["storage"] = {"codec": "blosc2", "dtype": "compact", "chunk_patch": [32, 32, 32]}
    (tmp_path / "with_storage.yaml").write_text(yaml.safe_dump(spec))
    s = run_cohort(tmp_path / "with_storage.yaml", store, cohort=built["table"], **quiet)
    assert (s["processed"], s["converted"]) == (0, 3) and spec_storage(store) == B2
    assert s["storage_from"] == f"the storage block of {tmp_path / 'with_storage.yaml'}"


def test_plain_preprocess_writes_new_cases_in_the_stores_storage(built, tmp_path):
    """No storage asked for: a case (re)built in a converted store is written in the store's encoding."""
    store = copy_store(built["b2"], tmp_path / "s")
    shutil.rmtree(store / "cases" / "ct_0002")
    quiet = {"progress": False, "qc": False, "log": lambda *a: None}
    s = run_cohort(built["spec"], store, cohort=built["table"], **quiet)
    assert (s["ok"], s["processed"], s["converted"], s["skipped"]) == (3, 1, 0, 2)
    for cid in CASES:
        assert sorted(p.name for p in (store / "cases" / cid).iterdir()) == ["image.b2nd", "label.b2nd",
                                                                             "label_fg.npz", "meta.json"]
    assert (store / "cases" / "ct_0002" / "image.b2nd").read_bytes() == \
        (built["b2"] / "cases" / "ct_0002" / "image.b2nd").read_bytes()
    assert spec_storage(store) == B2
    # a new store gets the defaults
    s = run_cohort(built["spec"], tmp_path / "new", cohort=built["table"], **quiet)
    assert s["storage"] == NPY and s["storage_from"] == "the default"
    assert (tmp_path / "new" / "cases" / "ct_0000" / "image.npy").is_file()


def test_convert_refuses_compact_for_a_fractional_window(built, tmp_path):
    store = copy_store(built["npy"], tmp_path / "s")
    doc = yaml.safe_load((store / "spec.yaml").read_text())
    doc["spec"]["inputs"]["image"]["intensity"]["hu_min"] = -1000.5
    (store / "spec.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError, match=r"spec.yaml with --storage: .*hu_min must be a whole number"):
        convert_store(store, COMPACT, progress=False)
    assert (store / "cases" / "ct_0000" / "image.npy").is_file()
