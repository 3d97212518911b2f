"""A tiny run of `volfm bench pretraining` (14 synthetic cases, encoders of width 4/24, a few steps): every
objective pretrains and scores, the fine-tuning grid is complete and paired to the right baseline, the masked
objective carries its decoder, MAE gets its own scratch ViT baseline, the tables/JSON/PNG come out; bad input fails
with a one-line error before any training."""
import contextlib
import io
import json

import pytest
import yaml

from volfm.bench import pretraining as bp
from volfm.preprocess.spec import load_spec
from volfm.store.build import run_cohort
from volfm.synth.ct import make_ct_cohort

TINY = ["--cnn-kwargs", '{"in_chans": 1, "base_channels": 4}',
        "--vit-kwargs", '{"in_chans": 1, "patch_size": 8, "img_size": [16, 16, 16], "depth": 4, "embed_dim": 24, '
                        '"num_heads": 2, "pos_embed": "sincos"}',
        "--crop", "16,16,16", "--block", "4", "--pretrain-steps", "2", "--pretrain-batch", "2",
        "--finetune-steps", "2", "--finetune-batch", "2", "--jobs", "1", "--findings", "all"]


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = bp.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_pretraining")
    table = make_ct_cohort(root / "ct", 14, seed=5, shape=(40, 40, 24), progress=False)
    spec = load_spec("ct_merlin_demo")
    spec.update(spacing=[10.5, 10.5, 15.0], crop={"size": [32, 32, 32], "mode": "center"})
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert run_cohort(root / "spec.yaml", root / "store", cohort=table, progress=False, qc=False)["failed"] == 0
    return root


@pytest.fixture(scope="module")
def result(store):
    out = store / "out"
    rc, text, err = _main(["--store", store / "store", "--objectives", "scratch,masked,contrastive,mae",
                           "--counts", "1,2", "--seeds", "0,1", "--modes", "full,frozen", "--frozen-counts", "1",
                           "--recompute-bn-batches", "1", "--warmup-fraction", "0.5", *TINY, "--out", out])
    assert rc == 0, err
    return text, json.loads((out / "pretraining.json").read_text()), out


def test_every_objective_pretrains_and_is_scored(result):
    text, doc, out = result
    assert doc["objectives"] == ["scratch", "masked", "contrastive", "scratch_vit", "mae"]
    pre = doc["pretraining"]
    for o in ("masked", "contrastive", "mae"):
        assert pre[o]["steps"] == 2 and (out / "checkpoints" / f"{o}.ckpt").is_file()
        assert pre[o]["probe_auroc_all"] is None or 0.0 <= pre[o]["probe_auroc_all"] <= 1.0
    assert "masked_loss" in pre["masked"]["final_losses"] and "mae_loss" in pre["mae"]["final_losses"]
    assert "contrastive_loss" in pre["contrastive"]["final_losses"]
    # only the objective with a text tower has zero-shot scores
    assert "zeroshot_per_finding" in pre["contrastive"] and "zeroshot_per_finding" not in pre["masked"]
    assert pre["scratch"]["checkpoint"] is None and pre["scratch_vit"]["encoder"] == "vit_tiny_3d"
    for o in doc["objectives"]:
        assert f"| {o} |" in doc["tables"]["representations"]


def test_finetuning_grid_is_complete_and_paired(result):
    text, doc, out = result
    runs = doc["finetune_runs"]
    n_train = doc["n_train"]
    assert {r["k"] for r in runs if r["finetune"] == "full"} == {1, 2}
    assert {r["k"] for r in runs if r["finetune"] == "frozen"} == {1}
    assert len(runs) == 5 * 2 * 2 + 5 * 1 * 2  # objectives x (full counts x seeds + frozen counts x seeds)
    assert all(r["train_steps"] == 2 and r["train_patches"] == 4 and r["warmup_fraction"] == 0.5 for r in runs)
    # BatchNorm statistics are recomputed in the frozen runs only (full fine-tuning re-learns them anyway)
    assert {r["recompute_bn_batches"] for r in runs if r["finetune"] == "frozen"} == {1}
    assert {r["recompute_bn_batches"] for r in runs if r["finetune"] == "full"} == {0}
    assert n_train >= 2
    by = {(r["objective"], r["finetune"], r["k"], r["seed"]): r for r in runs}
    # same cases for every objective at a given (k, seed): the comparison is paired
    for (_o, mode, k, seed), r in by.items():
        assert r["train_case_ids"] == by[("scratch", mode, k, seed)]["train_case_ids"]
    # masked carries its pretrained decoder, the others start it fresh; pretrained encoders are loaded
    assert all(r["decoder_loaded"] for r in runs if r["objective"] == "masked")
    assert not any(r["decoder_loaded"] for r in runs if r["objective"] != "masked")
    assert all(r["pretrained_loaded"] for r in runs if not r["objective"].startswith("scratch"))
    assert not any(r["pretrained_loaded"] for r in runs if r["objective"].startswith("scratch"))
    summ = {(s["objective"], s["mode"], s["k"]): s for s in doc["summary"]}
    for (o, mode, k), s in summ.items():
        base = "scratch_vit" if o in ("mae", "scratch_vit") else "scratch"
        if o == base:
            assert s["diff_vs_scratch"] is None
            continue
        diffs = [by[(o, mode, k, sd)]["test_mean_dice"] - by[(base, mode, k, sd)]["test_mean_dice"] for sd in (0, 1)]
        assert s["diff_vs_scratch"]["mean"] == pytest.approx(sum(diffs) / 2)


def test_outputs(result):
    text, doc, out = result
    assert (out / "pretraining.png").stat().st_size > 1000
    assert "few-label segmentation of spleen" in text and "| mae | full |" in text
    assert doc["seconds"]["total"] > 0 and doc["settings"]["masked"]["masked"]["crop_size"] == [16, 16, 16]


def test_bad_input_fails_before_training(store, tmp_path):
    rc, _, err = _main(["--store", tmp_path, *TINY, "--out", tmp_path / "o"])
    assert rc == 2 and "is not a volfm store" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _main(["--store", store / "store", *TINY, "--findings", "nope", "--out", tmp_path / "o"])
    assert rc == 2 and "unknown finding 'nope'" in err
    rc, _, err = _main(["--store", store / "store", *TINY, "--counts", "500", "--out", tmp_path / "o"])
    assert rc == 2 and "training cases" in err
    rc, _, err = _main(["--store", store / "store", *TINY, "--warmup-fraction", "1", "--out", tmp_path / "o"])
    assert rc == 2 and "--warmup-fraction must be in [0, 1)" in err
    rc, _, err = _main(["--store", store / "store", *TINY, "--recompute-bn-batches", "-1", "--out", tmp_path / "o"])
    assert rc == 2 and "--recompute-bn-batches must be >= 0" in err
    with pytest.raises(SystemExit):
        _main(["--objectives", "scratch,bogus"])


def test_default_objectives_leave_out_the_vit_pair_and_all_adds_it():
    assert bp.build_parser().parse_args([]).objectives == ["scratch", "icd", "contrastive", "multitask", "masked",
                                                           "masked_enc", "hybrid"]
    assert bp.expand_objectives(bp.build_parser().parse_args(["--objectives", "all"]).objectives) == [
        "scratch", "icd", "contrastive", "multitask", "masked", "masked_enc", "hybrid", "scratch_vit", "mae"]
    assert bp.expand_objectives(["masked_enc", "mae"]) == ["scratch", "masked", "masked_enc", "scratch_vit", "mae"]
    assert "mae" in bp.OBJECTIVES and "mae" not in bp.DEFAULT_OBJECTIVES


def test_frozen_counts_are_ignored_without_the_frozen_mode(store, tmp_path):
    """--frozen-counts only matter with --modes ...,frozen: no error for a count the store lacks, no empty column."""
    rc, text, err = _main(["--store", store / "store", "--objectives", "scratch", "--counts", "1", "--seeds", "0",
                           "--frozen-counts", "500", *TINY, "--out", tmp_path / "o"])
    assert rc == 0, err
    doc = json.loads((tmp_path / "o" / "pretraining.json").read_text())
    assert [(r["finetune"], r["k"]) for r in doc["finetune_runs"]] == [("full", 1)]
    assert "| objective | fine-tuning | k=1 |\n" in doc["tables"]["dice"] and "(frozen:" not in text
