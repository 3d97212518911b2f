"""Quick runs of `volfm bench label-efficiency` on a tiny synthetic store (6 train / 1 val / 1 test cases):
the table, JSON and PNG come out, k=1 cases are nested in k=2 cases, every run gets the same training budget,
runs are seeded, and bad input fails with a one-line error before any training."""
import contextlib
import csv
import io
import json
import math

import numpy as np
import pytest
import yaml

from volfm.bench import label_efficiency as ble
from volfm.preprocess.spec import load_spec
from volfm.store.build import run_cohort
from volfm.synth.ct import make_ct_cohort

TINY = ["--encoder", "resnet18_3d", "--encoder-kwargs", '{"in_chans": 1, "base_channels": 8}', "--patch", "16,16,16",
        "--batch-size", "2", "--steps-per-epoch", "3", "--threads", "1"]


def _spec(root):
    spec = load_spec("ct_merlin_demo")
    spec.update(spacing=[10.5, 10.5, 15.0], crop={"size": [32, 32, 32], "mode": "center"})
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from volfm.models import create_encoder, save_encoder

    root = tmp_path_factory.mktemp("label_eff")
    table = make_ct_cohort(root / "ct", 8, seed=11, shape=(40, 40, 24), progress=False)
    assert run_cohort(_spec(root), root / "store", cohort=table, progress=False, qc=False)["failed"] == 0
    # the same images without a label column: a store with no labels
    rows = list(csv.DictReader(open(table, newline="")))
    nolab = root / "ct" / "cohort_nolabel.csv"
    with open(nolab, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in rows[0] if c != "label"])
        w.writeheader()
        w.writerows({k: v for k, v in r.items() if k != "label"} for r in rows)
    assert run_cohort(_spec(root), root / "store_nolabel", cohort=nolab, progress=False, qc=False)["failed"] == 0
    ckpt = save_encoder(create_encoder("resnet18_3d", in_chans=1, base_channels=8), root / "enc8.safetensors")
    return {"root": root, "store": root / "store", "nolabel": root / "store_nolabel", "ckpt": ckpt}


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = ble.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def compared(data):
    out = data["root"] / "out"
    rc, text, err = _main(["--store", data["store"], "--pretrained", data["ckpt"], "--counts", "1,2,5", "--epochs", "2",
                           "--labels", "spleen", *TINY, "--out", out, "--json", data["root"] / "results.json"])
    assert rc == 0, err
    return text, json.loads((data["root"] / "results.json").read_text()), out


def _run(doc, k, init, seed=0):
    (r,) = [r for r in doc["runs"] if (r["k"], r["init"], r["seed"]) == (k, init, seed)]
    return r


def test_table_and_progress(compared):
    text, doc, _ = compared
    assert "test cases: 1" in text
    header = next(line for line in text.splitlines() if "scratch Dice" in line)
    assert "pretrained Dice" in header and "diff (p - s)" in header and "scratch HD95 mm" in header
    assert "pretrained HD95 mm" in header
    for i, (k, init) in enumerate([(k, init) for k in (1, 2, 5) for init in ("scratch", "pretrained")], 1):
        assert f"[{i}/6] k={k:<3} {init:<10} seed 0 done in " in text
    rows = {int(line.split()[0]): line.split() for line in text.split(header, 1)[1].strip().splitlines()[:3]}
    assert sorted(rows) == [1, 2, 5]
    for s in doc["summary"]:
        k = s["k"]
        assert rows[k][1] == f"{s['scratch']['dice']['mean']:.3f}"
        assert rows[k][2] == f"{s['pretrained']['dice']['mean']:.3f}"
        assert rows[k][3] == f"{round(s['diff_dice']['mean'], 3) + 0.0:+.3f}"
    assert "pretrained - scratch mean Dice: k=1 " in text and "no --pretrained" not in text


def test_json_runs(compared, data):
    _, doc, out = compared
    assert doc["inits"] == ["scratch", "pretrained"] and doc["scratch_only"] is False
    assert doc["counts"] == [1, 2, 5] and doc["n_train_available"] == 6 and doc["n_test_cases"] == 1
    assert doc["classes"] == ["spleen"] and len(doc["test_case_ids"]) == 1
    assert json.loads((out / "label_efficiency.json").read_text()) == doc
    assert len(doc["runs"]) == 6
    for r in doc["runs"]:
        assert 0.0 <= r["test_mean_dice"] <= 1.0 and r["dice"]["spleen"] == r["test_mean_dice"]
        assert r["test_mean_hd95_mm"] is None or r["test_mean_hd95_mm"] >= 0
        assert [c["case_id"] for c in r["per_case"]] == doc["test_case_ids"]
        assert r["pretrained_loaded"] is (r["init"] == "pretrained")
        assert len(r["train_case_ids"]) == r["k"]
        assert r["seconds"] > 0 and math.isfinite(r["final_train_loss"])
    for k, row in zip((1, 2, 5), doc["summary"]):
        s, p = _run(doc, k, "scratch"), _run(doc, k, "pretrained")
        assert s["train_case_ids"] == p["train_case_ids"]  # same cases for both inits
        assert s["final_train_loss"] != p["final_train_loss"]  # ... but another encoder start
        assert row["diff_dice"]["mean"] == pytest.approx(p["test_mean_dice"] - s["test_mean_dice"])
        assert row["scratch"]["dice"]["mean"] == s["test_mean_dice"]


def test_subsets_are_nested_and_the_budget_is_equal(compared):
    _, doc, _ = compared
    one, two, five = (set(_run(doc, k, "scratch")["train_case_ids"]) for k in (1, 2, 5))
    assert len(one) == 1 and len(two) == 2 and len(five) == 5 and one < two < five
    assert not (five & set(doc["test_case_ids"]))
    assert doc["patches_per_epoch"] == 3 * 2
    # 2 epochs x 3 steps x 2 patches for every k: spv = ceil(6 / k); k=5 draws 10 patches an epoch, trains on 6
    for r in doc["runs"]:
        assert r["train_steps"] == 2 * 3 and r["train_patches"] == 12
        assert r["samples_per_volume"] == math.ceil(6 / r["k"])


def test_plot_is_written(compared):
    import matplotlib.image as mpimg

    _, doc, out = compared
    png = out / "label_efficiency.png"
    assert doc["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(str(png))
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert np.ptp(img[..., :3]) > 0.5  # not a blank canvas


def test_scratch_only_and_seeded_runs(compared, data):
    """No --pretrained: scratch only, said so; the same (k, init, seed) as in the first call gives the same run."""
    _, first, _ = compared
    rc, text, err = _main(["--store", data["store"], "--counts", "1", "--seeds", "0,1", "--epochs", "2", *TINY,
                           "--out", data["root"] / "out_scratch"])
    assert rc == 0, err
    assert "no --pretrained given: scratch (random init) runs only" in text
    header = next(line for line in text.splitlines() if "scratch Dice" in line)
    assert "pretrained" not in header and "±" in text.split(header, 1)[1].splitlines()[1]
    doc = json.loads((data["root"] / "out_scratch" / "label_efficiency.json").read_text())
    assert doc["inits"] == ["scratch"] and doc["scratch_only"] is True and doc["pretrained"] is None
    assert [(r["k"], r["init"], r["seed"]) for r in doc["runs"]] == [(1, "scratch", 0), (1, "scratch", 1)]
    again, before = _run(doc, 1, "scratch", 0), _run(first, 1, "scratch", 0)
    for key in ("train_case_ids", "final_train_loss", "test_mean_dice", "test_mean_hd95_mm"):
        assert again[key] == before[key], key
    s = doc["summary"][0]["scratch"]["dice"]
    vals = [r["test_mean_dice"] for r in doc["runs"]]
    assert s["n"] == 2 and s["mean"] == pytest.approx(np.mean(vals)) and s["sd"] == pytest.approx(np.std(vals, ddof=1))
    assert (data["root"] / "out_scratch" / "label_efficiency.png").stat().st_size > 10_000


@pytest.mark.parametrize("case, argv, message", [
    ("no labels", ["--store", "{nolabel}"], "has a 'label' array"),
    ("unknown organ", ["--store", "{store}", "--labels", "spleeen"], "did you mean 'spleen'"),
    ("too many cases", ["--store", "{store}", "--counts", "1,7"], "has only 6 ok labelled cases in split 'train'"),
    ("other encoder", ["--store", "{store}", "--pretrained", "{ckpt}", "--encoder-kwargs", '{"base_channels": 16}'],
     "shape-mismatched keys"),
    ("not a store", ["--store", "{root}"], "is not a volfm store"),
    ("BN recompute in full mode", ["--store", "{store}", "--recompute-bn-batches", "4"],
     "needs --finetune frozen, partial or lora"),
])
def test_errors_are_one_line_before_training(data, case, argv, message, tmp_path):
    for key in ("store", "nolabel", "ckpt", "root"):
        argv = [a.replace("{" + key + "}", str(data[key])) for a in argv]
    rc, text, err = _main([*argv, "--epochs", "1", "--out", tmp_path / "out"])
    assert rc == 2, (case, text, err)
    assert err.startswith("volfm bench label-efficiency: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert "training" not in text and not (tmp_path / "out" / "label_efficiency.json").exists()


@pytest.mark.parametrize("argv", [["--counts", "0"], ["--counts", "1,two"], ["--seeds", "0,0"],
                                  ["--encoder-kwargs", "[1]"]])
def test_bad_arguments_exit_2(data, argv):
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()):
        ble.main(["--store", str(data["store"]), *argv])
    assert exc.value.code == 2
