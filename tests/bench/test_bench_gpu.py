"""`volfm bench gpu`: the one-command GPU figures. CI has no GPU, so the dry run (every step on the CPU, tiny shapes,
Triton under its interpreter) checks that each step is wired and reports what it measured; the CUDA-only parts
(ceilings, bf16 autocast) only run on a GPU machine."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from volfm.bench import gpu, patch_embed


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu")
    rc = gpu.main(["--dry-run", "--out", str(out), "--cases", "4", "--fit-steps", "2", "--warmup-steps", "1"])
    doc = json.loads((out / "bench_gpu.json").read_text())
    return rc, out, doc


def test_no_cuda_is_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no CUDA device" in err and "--dry-run" in err
    assert not (tmp_path / "bench_gpu.json").exists()


def test_unknown_step_is_one_line_error(capsys, tmp_path):
    assert gpu.main(["--dry-run", "--steps", "env,fit-resnet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown step 'fit-resnet'" in err and len(err.splitlines()) == 1


def test_dry_run_runs_every_step(dry_run):
    rc, out, doc = dry_run
    status = {r["step"]: r["status"] for r in doc["steps"]}
    assert list(status) == list(gpu.STEPS)
    assert all(s == "ok" for s in status.values()), status
    assert rc == 0 and doc["dry_run"] is True


def test_dry_run_results_are_measured(dry_run):
    _, out, doc = dry_run
    res = {r["step"]: r["result"] for r in doc["steps"]}
    # env: the Triton patch embedding agrees with the torch path on the same weights
    assert res["env"]["autocast_ok"] and res["env"]["autocast_rel_diff"] <= res["env"]["autocast_tol"]
    # patch-embed: every method timed, every output checked against the linear path
    runs = res["patch-embed"]["runs"]
    assert set(runs) == set(patch_embed.DRY_RUNS)
    for run in runs.values():
        assert run["goals"]["match"]["pass"]
        for r in run["results"]:
            assert set(r["methods"]) == {"triton", "linear", "cudnn"}
            assert all(m["median_ms"] > 0 for m in r["methods"].values())
    # sliding window: volfm's output equals MONAI's
    sw = res["sliding-window"]["doc"]
    assert sw["goals"]["identical"]["pass"] and sw["max_abs_diff"] < 1e-4
    # store: both encodings hold every case; the byte ratio is the ratio of the real files
    st = res["store"]["stores"]
    assert st["npy"]["cases"] == st["blosc2"]["cases"] == 4
    for s in st.values():
        files = [f for f in (out / "work" / s["path"].split("/work/")[-1] / "cases").rglob("*")
                 if f.suffix in (".npy", ".b2nd")]
        assert s["bytes_per_case"] == pytest.approx(sum(f.stat().st_size for f in files) / 4)
    assert st["blosc2"]["ratio"] < 0.6  # int16 levels + compression: well under the float32 bytes
    # fits: timed steps, finite losses, the two parts of a step add up to the rate
    for step in gpu.FIT_MODELS:
        f = res[step]
        assert f["timed_steps"] == 2 and f["loss_finite"]
        assert 0 <= f["data_wait_fraction"] <= 1
        assert f["volumes_per_s"] > 0
        assert f["step_ms_median"] >= f["compute_ms_median"] > 0
    assert res["fit-vit-triton"]["patch_backend"] == "triton"
    assert res["fit-resnet152-blosc2"]["store_encoding"] == "blosc2"


def test_dry_run_markdown_has_every_table(dry_run):
    _, out, doc = dry_run
    md = (out / "bench_gpu.md").read_text()
    assert md == gpu.render_markdown(doc)
    for head in ("**Patch embedding**", "**Sliding window**", "**Store**", "**bf16-mixed fit", "Steps (total"):
        assert head in md
    assert md.count("| fit-") == 2 * len(gpu.FIT_MODELS)  # the fit table and the steps table
    assert "dry run on CPU" in md


def test_step_over_its_time_is_killed_and_recorded(tmp_path):
    (tmp_path / "logs").mkdir()
    args = gpu.build_parser().parse_args(["--dry-run"])
    t0 = time.perf_counter()
    rec = gpu.run_step("fit-resnet152", args, tmp_path, timeout=1.0)
    assert rec["status"] == "timeout" and rec["returncode"] is None
    assert time.perf_counter() - t0 < 15
    assert "result" not in rec


def test_gpu_host_without_simpleitk_or_torchio(tmp_path):
    """The GPU machine has no room for SimpleITK (53 MB) in what can be carried: every module the bench's steps use
    must import without it and torchio, NIfTI must still read, and the formats that need it fail in one line."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["SimpleITK"] = None
        sys.modules["torchio"] = None
        import numpy as np, nibabel as nib
        import volfm.bench.gpu, volfm.bench.patch_embed, volfm.bench.sliding_window, volfm.bench.step_timer
        import volfm.tasks, volfm.data.datamodules, volfm.store.build, volfm.synth.ct
        from volfm import VolfmError
        from volfm.data.augment import build_augmentation
        from volfm.io.readers import read_volume
        nib.save(nib.Nifti1Image(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4)), r"{tmp_path}/a.nii.gz")
        assert read_volume(r"{tmp_path}/a.nii.gz").array.shape == (1, 2, 3, 4)
        assert build_augmentation(None) is None
        for what, call in (("nrrd", lambda: read_volume(r"{tmp_path}/a.nrrd")),
                           ("aug", lambda: build_augmentation([{{"name": "RandomFlip"}}]))):
            try:
                call()
            except VolfmError as exc:
                print(what, "|", exc)
    """)
    (tmp_path / "a.nrrd").write_bytes(b"NRRD0004\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = dict(line.split(" | ", 1) for line in p.stdout.strip().splitlines())
    assert "needs SimpleITK" in lines["nrrd"] and "a.nrrd" in lines["nrrd"]
    assert "needs TorchIO" in lines["aug"] and "augmentation: null" in lines["aug"]
