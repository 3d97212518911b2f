"""The `volfm` command line: preprocess (exit codes, summary, spec errors), inspect, synth, merge.

Most tests call volfm.cli.main.main() in-process; one runs the installed console script.
"""
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from volfm.cli.main import main
from volfm.io import Volume, write_nifti

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_slurm_array(monkeypatch):
    """Tests run inside a SLURM array job must not be sharded by its environment."""
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)


def small_ct_spec(**changes) -> dict:
    spec = yaml.safe_load((REPO / "preprocessing" / "ct_merlin.yaml").read_text())
    spec["crop"]["size"] = [32, 32, 16]
    spec["spacing"] = [3.0, 3.0, 6.0]
    spec.update(changes)
    return spec


def make_ct(seed, flip=False, shape=(48, 48, 20), sp=(2.0, 2.0, 5.0)):
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = np.array(shape) / 2
    r = (((ii - c[0]) * sp[0]) / 30) ** 2 + (((jj - c[1]) * sp[1]) / 25) ** 2 + (((kk - c[2]) * sp[2]) / 40) ** 2
    img = np.where(r < 1, 40.0, -1000.0) + rng.normal(0, 10, shape)
    aff = np.diag([*sp, 1.0])
    if flip:  # LPS
        aff[0, 0] *= -1
        aff[1, 1] *= -1
    aff[:3, 3] = [10.0, -20.0, 30.0]
    return Volume(img[None].astype(np.float32), aff), Volume((r < 0.3).astype(np.uint8)[None], aff)


def write_rows(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_cohort")
    rows = []
    for i in range(2):
        img, lab = make_ct(i, flip=bool(i))
        write_nifti(img, d / f"ct{i}.nii.gz", dtype=np.int16)
        write_nifti(lab, d / f"ct{i}_seg.nii.gz")
        rows.append({"case_id": f"ct{i}", "image": f"ct{i}.nii.gz", "label": f"ct{i}_seg.nii.gz",
                     "icd_codes": "I10", "report": "normal", "split": "train"})
    gz = (d / "ct0.nii.gz").read_bytes()
    (d / "broken.nii.gz").write_bytes(gz[: len(gz) // 2])
    bad = {"case_id": "broken", "image": "broken.nii.gz", "label": "", "icd_codes": "", "report": "", "split": "test"}
    spec = d / "small_ct.yaml"
    spec.write_text(yaml.safe_dump(small_ct_spec(), sort_keys=False))
    return {"dir": d, "spec": spec, "good": write_rows(d / "good.csv", rows),
            "mixed": write_rows(d / "mixed.csv", rows + [bad])}


@pytest.fixture(scope="module")
def mixed_store(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_store") / "store"
    with pytest.MonkeyPatch.context() as mp:
        for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
            mp.delenv(k, raising=False)
        rc = main(["preprocess", "--spec", str(cohort["spec"]), "--cohort", str(cohort["mixed"]), "--out", str(out),
                   "--quiet"])
    return out, rc


# ----------------------------------------------------------------------------------- preprocess
def test_preprocess_exit_1_when_a_case_failed(mixed_store, cohort, capsys):
    out, rc = mixed_store
    assert rc == 1
    rows = read_rows(out / "manifest.csv")
    assert [(r["case_id"], r["status"]) for r in rows] == [("ct0", "ok"), ("ct1", "ok"), ("broken", "failed")]
    # a rerun skips the two finished cases, still fails the broken one, prints the summary
    rc = main(["preprocess", "--spec", str(cohort["spec"]), "--cohort", str(cohort["mixed"]), "--out", str(out),
               "--quiet"])
    assert rc == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 ok, 1 failed, 2 already done (1 processed in ")
    assert f"store:    {out}" in lines
    assert f"manifest: {out / 'manifest.csv'}" in lines
    assert f"QC:       {out / 'qc'}" in lines
    failed = [ln for ln in lines if ln.startswith("FAILED ")]
    assert len(failed) == 1
    assert failed[0].startswith("FAILED broken: case broken: ") and "broken.nii.gz" in failed[0]
    assert "truncated or corrupt" in failed[0]


def test_preprocess_exit_0_when_all_ok(cohort, tmp_path, capsys):
    out = tmp_path / "store"
    rc = main(["preprocess", "--spec", str(cohort["spec"]), "--cohort", str(cohort["good"]), "--out", str(out),
               "--workers", "1", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.splitlines()[0].startswith("2 ok, 0 failed, 0 already done (2 processed in ")
    assert "cases/min" in captured.out and "FAILED" not in captured.out
    assert sorted(p.name for p in (out / "qc").iterdir()) == ["ct0.png", "ct1.png", "index.html", "index.json",
                                                             "stats_cache.json"]
    assert f"gallery:  {out / 'qc' / 'index.html'}" in captured.out
    assert np.load(out / "cases" / "ct1" / "image.npy", mmap_mode="r").shape == (1, 32, 32, 16)


def test_progress_bar_on_stderr(cohort, tmp_path, capsys):
    rc = main(["preprocess", "--spec", str(cohort["spec"]), "--cohort", str(cohort["good"]),
               "--out", str(tmp_path / "s"), "--no-qc"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "preprocess ct_merlin" in captured.err and "2/2" in captured.err
    assert not (tmp_path / "s" / "qc").exists() or not any((tmp_path / "s" / "qc").iterdir())


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, captured.err
    assert err.startswith("volfm preprocess: error: ")
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("text, match", [
    ("name: small\nspacing: [1, 2\ninputs: {image: {kind: image}}\n", "malformed YAML at line"),
    ("name: small\n\tspacing: 1\n", "malformed YAML at line 2"),
    ("inputs:\n  image: {kind: image\n", "malformed YAML"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    ("", "must be a YAML mapping"),
])
def test_malformed_spec_exit_2_one_line(cohort, tmp_path, capsys, text, match):
    spec = tmp_path / "broken_spec.yaml"
    spec.write_text(text)
    rc = main(["preprocess", "--spec", str(spec), "--cohort", str(cohort["good"]), "--out", str(tmp_path / "s")])
    assert rc == 2
    err = _one_line_error(capsys)
    assert str(spec) in err and match in err
    assert not (tmp_path / "s").exists()


def test_unknown_spec_key_exit_2(cohort, tmp_path, capsys):
    doc = small_ct_spec()
    doc["inputs"]["image"]["interpolaton"] = "linear"
    spec = tmp_path / "typo.yaml"
    spec.write_text(yaml.safe_dump(doc))
    rc = main(["preprocess", "--spec", str(spec), "--cohort", str(cohort["good"]), "--out", str(tmp_path / "s")])
    assert rc == 2
    err = _one_line_error(capsys)
    assert str(spec) in err and "'interpolaton'" in err and "inputs.image" in err and "did you mean 'interpolation'" in err
    doc = small_ct_spec(spacingg=[1, 1, 1])
    spec.write_text(yaml.safe_dump(doc))
    assert main(["preprocess", "--spec", str(spec), "--cohort", str(cohort["good"]), "--out", str(tmp_path / "s")]) == 2
    err = _one_line_error(capsys)
    assert str(spec) in err and "'spacingg'" in err


def test_usage_errors_exit_2(cohort, tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["preprocess", "--spec", str(cohort["spec"]), "--out", out]) == 2
    assert "exactly one of --cohort TABLE or --input-dir DIR" in _one_line_error(capsys)
    assert main(["preprocess", "--cohort", str(cohort["good"]), "--out", out]) == 2
    assert "needs --spec" in _one_line_error(capsys)
    assert main(["preprocess", "--spec", str(tmp_path / "nope.yaml"), "--cohort", str(cohort["good"]),
                 "--out", out]) == 2
    assert "spec file not found" in _one_line_error(capsys)
    assert main(["preprocess", "--spec", str(cohort["spec"]), "--cohort", str(cohort["good"]), "--out", out,
                 "--shard", "5/2"]) == 2
    assert "shard" in _one_line_error(capsys)
    dup = write_rows(tmp_path / "dup.csv", [{"case_id": "a", "image": "x.nii.gz"}, {"case_id": "a", "image": "y.nii.gz"}])
    assert main(["preprocess", "--spec", str(cohort["spec"]), "--cohort", str(dup), "--out", out]) == 2
    err = _one_line_error(capsys)
    assert str(dup) in err and "duplicate case_id 'a'" in err
    assert not Path(out).exists()
    with pytest.raises(SystemExit) as info:  # argparse: --cohort and --input-dir are exclusive
        main(["preprocess", "--spec", "x", "--cohort", "a.csv", "--input-dir", "d", "--out", out])
    assert info.value.code == 2


def test_shards_and_merge_via_cli(cohort, tmp_path, capsys, monkeypatch):
    out = tmp_path / "store"
    base = ["preprocess", "--spec", str(cohort["spec"]), "--cohort", str(cohort["mixed"]), "--out", str(out),
            "--quiet", "--no-qc"]
    main(base + ["--shard", "0/2"])
    capsys.readouterr()
    assert main(["preprocess", "--merge", "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "shards still to run: 1/2" in err
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    main(base)
    assert sorted(p.name for p in (out / "manifests").iterdir()) == ["shard-0-of-2.csv", "shard-1-of-2.csv"]
    capsys.readouterr()
    assert main(["preprocess", "--merge", "--out", str(out)]) == 1  # the broken case failed
    stdout = capsys.readouterr().out
    assert stdout.startswith("2 ok, 1 failed") and "FAILED broken:" in stdout
    assert [r["case_id"] for r in read_rows(out / "manifest.csv")] == ["ct0", "ct1", "broken"]


# ----------------------------------------------------------------------------------- inspect
def test_inspect_nifti_file(cohort, capsys):
    assert main(["inspect", str(cohort["dir"] / "ct1.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "shape       (48, 48, 20)" in out
    assert "spacing     2 x 2 x 5 mm" in out
    assert "orientation LPS" in out
    assert "sform_code 1" in out and "qform_code 1" in out
    assert "on-disk int16" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("intensity[0]"))
    for word in ("min", "median", "max", "mean", "std", "p99.5"):
        assert word in line
    assert main(["inspect", str(cohort["dir"] / "ct0_seg.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "orientation RAS" in out and "values: 0:" in out


def test_inspect_nifti_without_sform(tmp_path, capsys):
    import nibabel as nib

    img = nib.Nifti1Image(np.full((4, 5, 6), 3, np.int16), np.diag([1.5, 1.5, 3, 1]))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "bare.nii"))
    from volfm.io import GeometryWarning

    with pytest.warns(GeometryWarning, match="neither sform nor qform"):
        assert main(["inspect", str(tmp_path / "bare.nii")]) == 0
    out = capsys.readouterr().out
    assert "sform_code 0" in out and "qform_code 0" in out and "affine from pixdim" in out


def test_inspect_store_and_case(mixed_store, capsys):
    out, _ = mixed_store
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cases 3: 2 ok, 1 failed" in text
    assert "shapes   32x32x16 (2)" in text and "spacings 3x3x6 mm (2)" in text
    assert "image    (case ct0) float32 (1, 32, 32, 16)" in text
    assert "failures:" in text
    fail = next(ln for ln in text.splitlines() if ln.startswith("  broken: "))
    assert "truncated or corrupt" in fail
    assert main(["inspect", str(out / "cases" / "ct1")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("case ct1 in ")
    assert "shape       (32, 32, 16)" in text and "spacing     3 x 3 x 6 mm" in text and "orientation RAS" in text
    assert "image: float32 (1, 32, 32, 16) from " in text and "(LPS, 2 x 2 x 5 mm, shape (48, 48, 20))" in text
    assert "label: uint8" in text and "ct_window" in text


def test_inspect_bad_paths_exit_2(cohort, tmp_path, capsys):
    (tmp_path / "note.nii.gz").write_text("hello")
    for p, match in ((cohort["dir"] / "broken.nii.gz", "truncated or corrupt"),
                     (tmp_path / "note.nii.gz", "not a readable NIfTI"),
                     (tmp_path / "missing.nii.gz", "file not found")):
        assert main(["inspect", str(p)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("volfm inspect: error: ") and str(p) in err
        assert match in err


# ----------------------------------------------------------------------------------- synth
def test_synth_mripet_then_preprocess(tmp_path, capsys):
    d = tmp_path / "mripet"
    assert main(["synth", "mripet", "--out", str(d), "--cases", "2", "--spacing", "4", "--quiet"]) == 0
    assert "cohort table" in capsys.readouterr().out
    spec = yaml.safe_load((REPO / "preprocessing" / "mri_brain.yaml").read_text())
    spec["spacing"] = [4.0, 4.0, 4.0]
    spec_path = tmp_path / "mri_brain_4mm.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "store"
    rc = main(["preprocess", "--spec", str(spec_path), "--cohort", str(d / "cohort.csv"), "--out", str(out),
               "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    rows = read_rows(out / "manifest.csv")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert rows[0]["spacing"] == "4x4x4" and "hypometabolism" in rows[0]
    for r in rows:
        case = out / "cases" / r["case_id"]
        mri, pet, lab = (np.load(case / f"{n}.npy", mmap_mode="r") for n in ("mri", "pet", "label"))
        assert mri.shape == pet.shape == lab.shape and mri.dtype == np.float32 and lab.dtype == np.uint8
        assert set(np.unique(lab)) <= {0, 1, 2, 3}
        assert (out / "qc" / f"{r['case_id']}.png").exists()


def test_synth_ct_then_preprocess(tmp_path, capsys):
    d = tmp_path / "ct"
    assert main(["synth", "ct", "--out", str(d), "--cases", "2", "--shape", "48x48x24", "--quiet"]) == 0
    capsys.readouterr()
    spec_path = tmp_path / "ct_small.yaml"
    spec_path.write_text(yaml.safe_dump(small_ct_spec(spacing=[8.0, 8.0, 12.0], crop={"size": [32, 32, 16],
                                                                                          "mode": "center"})))
    out = tmp_path / "store"
    rc = main(["preprocess", "--spec", str(spec_path), "--cohort", str(d / "cohort.csv"), "--out", str(out),
               "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    rows = read_rows(out / "manifest.csv")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert rows[0]["icd_codes"] and rows[0]["report"]
    img = np.load(out / "cases" / rows[0]["case_id"] / "image.npy", mmap_mode="r")
    assert img.shape == (1, 32, 32, 16) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0


# ----------------------------------------------------------------------------------- console script
def test_console_script(cohort, tmp_path):
    exe = shutil.which("volfm")
    cmd = [exe] if exe else [sys.executable, "-m", "volfm.cli.main"]
    r = subprocess.run(cmd + ["inspect", str(cohort["dir"] / "ct0.nii.gz")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "shape       (48, 48, 20)" in r.stdout and "orientation RAS" in r.stdout
    bad = tmp_path / "bad spec.yaml"
    bad.write_text("name: x\ninputs: [unclosed\n")
    r = subprocess.run(cmd + ["preprocess", "--spec", str(bad), "--cohort", str(cohort["good"]),
                              "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, r.stderr
    assert err.startswith("volfm preprocess: error: ") and str(bad) in err and "malformed YAML" in err


def test_inspect_several_paths_and_damaged_store(mixed_store, cohort, tmp_path, capsys):
    out, _ = mixed_store
    # one bad path among several: the others are still printed, the exit code says something failed
    assert main(["inspect", str(cohort["dir"] / "broken.nii.gz"), str(cohort["dir"] / "ct0.nii.gz")]) == 2
    captured = capsys.readouterr()
    assert "truncated or corrupt" in captured.err and "shape       (48, 48, 20)" in captured.out
    damaged = tmp_path / "store"
    shutil.copytree(out, damaged)
    (damaged / "cases" / "ct0" / "image.npy").write_bytes(b"garbage" * 10)
    assert main(["inspect", str(damaged)]) == 0
    text = capsys.readouterr().out
    assert "cases 3: 2 ok, 1 failed" in text and "UNREADABLE case ct0" in text and "  broken: " in text
    assert main(["inspect", str(damaged / "cases" / "ct0")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image.npy" in err and "corrupt" in err
    (damaged / "cases" / "ct1" / "meta.json").write_text("{not json")
    assert main(["inspect", str(damaged / "cases" / "ct1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "meta.json" in err


# ----------------------------------------------------------------------------------- store encodings
def test_convert_store_then_inspect_and_verify(mixed_store, cohort, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(mixed_store[0], store)
    assert main(["preprocess", "--convert-store", str(store), "--storage", "codec=blosc2,dtype=compact",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 converted, 0 already blosc2 compact (chunks for 96x96x96 patches, clevel 5), 0 failed")
    assert "MiB ->" in out and "of before)" in out
    assert sorted(p.name for p in (store / "cases" / "ct0").iterdir()) == ["image.b2nd", "label.b2nd", "label_fg.npz",
                                                                          "meta.json"]
    assert main(["inspect", str(store)]) == 0
    text = capsys.readouterr().out
    assert "storage  blosc2 compact (chunks for 96x96x96 patches, clevel 5)" in text
    assert "image    (case ct0) float32 (1, 32, 32, 16)" in text
    assert "stored as blosc2 ct_level int16 in 1x32x32x16 chunks (lz4hc 5): " in text and "of the decoded float32" in text
    assert "stored as blosc2 raw uint8" in text
    assert main(["inspect", "--verify", str(store / "cases" / "ct1")]) == 0
    text = capsys.readouterr().out
    assert "verify   every array file matches its recorded sha256" in text and "max abs error" in text
    assert main(["inspect", "--verify", str(store)]) == 0
    assert "verified 2 ok cases: every array file matches its recorded sha256" in capsys.readouterr().out
    # damage that decoding cannot see (LZ4 has no checksum): --verify reports it on one line, exit 2
    p = store / "cases" / "ct1" / "image.b2nd"
    data = bytearray(p.read_bytes())
    data[-20] ^= 0x01
    p.write_bytes(bytes(data))
    assert main(["inspect", "--verify", str(store / "cases" / "ct1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "case ct1 fails verification" in err and "sha256 mismatch" in err
    assert str(p) in err and "volfm preprocess" in err
    assert main(["inspect", "--verify", str(store)]) == 2
    assert "1 of 2 ok cases fail verification" in capsys.readouterr().err
    # converting back to npy: the damaged case fails on one line saying what to do; spec.yaml keeps its storage
    assert main(["preprocess", "--convert-store", str(store), "--storage", "codec=npy", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("1 converted, 0 already npy float32, 1 failed")
    assert ("spec.yaml keeps storage blosc2 compact (chunks for 96x96x96 patches, clevel 5) while 1 case(s) failed"
            in out) and "FAILED ct1: " in out and "sha256 mismatch" in out
    assert (store / "cases" / "ct0" / "image.npy").is_file()
    row = next(r for r in read_rows(store / "manifest.csv") if r["case_id"] == "ct1")
    assert row["status"] == "failed" and "sha256 mismatch" in row["error"] and f"delete {store / 'cases' / 'ct1'}" in row["error"]
    # volfm preprocess with a spec without a storage block keeps the store's storage, converts nothing; the damaged
    # case, deleted, is rebuilt from its source file in that storage
    shutil.rmtree(store / "cases" / "ct1")
    argv = ["preprocess", "--spec", str(cohort["spec"]), "--cohort", str(cohort["mixed"]), "--out", str(store),
            "--quiet"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "2 ok, 1 failed, 1 already done (2 processed" in out  # ct1 and the broken one
    assert "storage:  blosc2 compact (chunks for 96x96x96 patches, clevel 5) (kept from the store's spec.yaml)" in out
    assert (store / "cases" / "ct0" / "image.npy").is_file() and (store / "cases" / "ct1" / "image.b2nd").is_file()
    # asked for explicitly, it converts: ct1 back to npy
    assert main([*argv, "--storage", "codec=npy"]) == 1
    assert "2 ok, 1 failed, 1 already done, 1 converted to the spec's storage" in capsys.readouterr().out
    assert isinstance(np.load(store / "cases" / "ct1" / "image.npy", mmap_mode="r"), np.memmap)
    # and once every case is npy, convert-store finishes: spec.yaml says npy
    assert main(["preprocess", "--convert-store", str(store), "--storage", "codec=npy", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("0 converted, 2 already npy float32, 0 failed")
    assert main(["inspect", str(store)]) == 0
    assert "storage  npy float32 (chunks" not in (text := capsys.readouterr().out) and "storage  npy float32" in text


def test_convert_store_usage_errors(mixed_store, tmp_path, capsys):
    for argv, match in ((["--convert-store", str(mixed_store[0])], "--convert-store needs --storage"),
                        (["--convert-store", str(mixed_store[0]), "--storage", "codec=blosc2", "--out", "x"],
                         "drop --out"),
                        (["--convert-store", str(tmp_path), "--storage", "codec=blosc2"], "not a volfm store"),
                        (["--convert-store", str(mixed_store[0]), "--storage", "codec=zarr"],
                         "storage.codec must be one of npy, blosc2"),
                        (["--spec", "ct_merlin", "--cohort", "x.csv"], "needs --out STORE")):
        assert main(["preprocess", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("volfm preprocess: error: ") and match in err, err
